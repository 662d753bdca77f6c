"""scatlas: GPU-accelerated compute backend for atlas-scale single-cell analysis.

Subpackages: ``kernels`` (array in, array out), ``models`` (JAX), ``search`` (cell index);
scanpy-style layers ``pp`` and ``tl`` (AnnData in, results in ``.obsm`` / ``.varm`` / ``.uns``);
``io`` for h5ad reading, chunked iteration and gene alignment; ``datasets`` for synthetic atlases;
``exceptions`` for the errors scatlas raises.
Submodules load on first use, so ``import scatlas`` stays cheap.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scatlas")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

_SUBMODULES = (
    "atlas", "backend", "datasets", "exceptions", "io", "kernels", "metrics", "models", "pl",
    "pp", "search", "tl",
)

__all__ = [*_SUBMODULES, "gpu_available", "resolve_device", "__version__"]


#: names of :mod:`scatlas.backend` offered at the top (backend imports NumPy and SciPy, so it
#: too loads on first use: ``import scatlas`` stays well under 0.5 s)
_FROM_BACKEND = ("gpu_available", "resolve_device")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _FROM_BACKEND:
        return getattr(importlib.import_module(".backend", __name__), name)
    raise AttributeError(f"module 'scatlas' has no attribute {name!r}")
