"""Atlas scale, end to end on Dask: raw counts on disk -> embeddings -> a served index.

- :func:`build`: ``scatlas atlas build RAW --model ENC --out DIR`` (stages, resumable; see
  :mod:`scatlas.atlas._build`).
- :func:`write_synthetic_zarr`: a synthetic atlas written to a zarr store chunk by chunk,
  generated in parallel on Dask at bounded memory.

See ``docs/atlas.md``.
"""

from __future__ import annotations

from ._build import STAGES, build, resolve_sources
from ._synthetic import write_synthetic_zarr

__all__ = ["STAGES", "build", "resolve_sources", "write_synthetic_zarr"]
