"""Progress bars for long steps (tqdm), silent unless asked for or attached to a terminal.

``progress=None`` (the default everywhere) shows a bar only when stderr is a terminal and the
environment variable ``SCATLAS_PROGRESS`` is not ``0``; ``True`` / ``False`` force it on / off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled(progress: bool | None) -> bool:
    """Resolve the ``progress`` argument to a bool."""
    if progress is not None:
        return bool(progress)
    if os.environ.get("SCATLAS_PROGRESS", "").strip() == "0":
        return False
    if os.environ.get("SCATLAS_PROGRESS", "").strip() == "1":
        return True
    return sys.stderr.isatty()


def track(
    iterable: Iterable[T], *, desc: str, total: int | None = None, progress: bool | None = None,
    unit: str = "it",
) -> Iterator[T]:
    """Iterate with a tqdm bar when progress is enabled."""
    return iter(
        tqdm(iterable, desc=desc, total=total, unit=unit, disable=not progress_enabled(progress),
             leave=False)
    )


def bar(*, desc: str, total: int | None, progress: bool | None = None, unit: str = "it") -> Any:
    """A manually updated tqdm bar (use as a context manager, call ``.update(n)``)."""
    return tqdm(desc=desc, total=total, unit=unit, disable=not progress_enabled(progress),
                leave=False)
