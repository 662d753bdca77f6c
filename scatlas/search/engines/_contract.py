"""The engine contract: what :class:`~scatlas.search.CellIndex` needs from a search engine.

An engine stores prepared float32 vectors (unit rows for cosine) under stable int64 ids and
ranks by an internal key, smaller is better (``-q.x`` for ``kind == "ip"``, ``||q - x||^2``
for ``"l2"``); see :mod:`scatlas.search.engines`. :class:`Engine` is the ``typing.Protocol``
(structural: any class with these members is an engine, as scanpy's ``KnnTransformerLike``);
:class:`EngineBase` gives the optional steps no-op defaults so that an engine writes only what
it does. :class:`EngineSpec` is a registry entry (:data:`scatlas.search.engines.REGISTRY`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["Engine", "EngineBase", "EngineSpec"]

Chunks = Callable[[bool], Iterator[tuple[Any, Any]]]


@runtime_checkable
class Engine(Protocol):
    """A k-NN engine over prepared vectors (see the module docstring).

    Attributes: ``name`` (its :data:`REGISTRY` key, also written to the manifest), ``kind``
    (``"ip"`` or ``"l2"``), ``d``, ``nlist`` (None for engines without inverted lists),
    ``device`` (``"cpu"`` or ``"gpu"``), ``ntotal`` (live vectors), ``is_trained``.
    """

    name: str
    kind: str
    d: int
    nlist: int | None
    device: str

    @property
    def ntotal(self) -> int: ...

    @property
    def is_trained(self) -> bool: ...

    @classmethod
    def create(cls, d: int, kind: str, nlist: int | None, *, device: str, variant: str,
               seed: int, **options: Any) -> Engine:
        """A new untrained engine (``variant``: the registry name it was made for)."""

    def train(self, sample: Any) -> None:
        """Fit what the engine learns from a (n, d) float32 sample (no-op default)."""

    def reserve(self, n: int) -> None:
        """Prepare for a build of ``n`` rows (no-op default)."""

    def add(self, X: Any, ids: Any) -> None:
        """Append (n, d) float32 rows with their (n,) int64 ids."""

    def bulk_add(self, make_chunks: Chunks, reiterable: bool = True) -> None:
        """Build from ``make_chunks(record) -> iter((X, ids))`` (default: ``add`` per chunk)."""

    def finish(self) -> None:
        """Close a build (no-op default)."""

    def search(self, Q: Any, k: int, nprobe: int | None,
               allowed: Any = None) -> tuple[Any, Any]:
        """(m, k) float32 keys and int64 ids, sorted by (key, id), padded (+inf, -1)."""

    def range_search(self, Q: Any, max_key: float, nprobe: int | None,
                     allowed: Any = None) -> list[tuple[Any, Any]]:
        """Per query, every (key, id) with key <= max_key, sorted by (key, id)."""

    def remove(self, ids: Any) -> int:
        """Drop ids; returns how many were stored."""

    def meta(self) -> dict[str, Any]:
        """JSON facts for the manifest's ``engine_meta``."""

    def save(self, folder: Path) -> list[str]:
        """Write the engine's files into ``folder``; returns their names."""

    @classmethod
    def load(cls, folder: Path, meta: dict[str, Any], device: str) -> Engine:
        """Read an engine written by :meth:`save` (``meta``: the manifest)."""

    def bytes_per_cell(self) -> float:
        """Index memory per stored vector in bytes (device memory for GPU engines)."""

    def scan_counts(self) -> dict[str, float]:
        """Bytes read and flops of the last search (empty when not counted)."""


class EngineBase:
    """No-op defaults for the optional steps of :class:`Engine`."""

    name: str = ""
    nlist: int | None = None

    @property
    def is_trained(self) -> bool:
        return True

    def train(self, sample: Any) -> None:
        return None

    def reserve(self, n: int) -> None:
        return None

    def bulk_add(self, make_chunks: Chunks, reiterable: bool = True) -> None:
        for X, ids in make_chunks(True):
            self.add(X, ids)  # type: ignore[attr-defined]

    def finish(self) -> None:
        return None

    def meta(self) -> dict[str, Any]:
        return {}

    def scan_counts(self) -> dict[str, float]:
        return {}


@dataclass(frozen=True)
class EngineSpec:
    """A registry entry: the engine class ``cls`` in ``module`` (an absolute module path, or
    ``".name"`` for ``scatlas.search.engines.name``; imported on first use), whether it needs
    faiss or a GPU, whether it has inverted lists (``ivf``: an ``nlist`` and ``nprobe``), and
    its sharded form ``(module, class)`` if any."""

    name: str
    module: str
    cls: str
    needs_faiss: bool = False
    gpu_only: bool = False
    ivf: bool = True
    sharded: tuple[str, str] | None = None

    @staticmethod
    def _import(module: str, name: str) -> type:
        pkg = __name__.rsplit(".", 1)[0]
        mod = importlib.import_module(f"{pkg}{module}" if module.startswith(".") else module)
        return getattr(mod, name)

    def engine_class(self) -> type:
        return self._import(self.module, self.cls)

    def sharded_class(self) -> type:
        if self.sharded is None:
            from ...exceptions import ScatlasInputError

            raise ScatlasInputError(f"engine {self.name!r} has no sharded form",
                                    param="n_shards")
        return self._import(*self.sharded)
