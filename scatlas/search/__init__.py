"""Cell search: a k-NN index over cell embeddings (exact, faiss IVF, native CuPy/NumPy IVF).

- :class:`CellIndex` (``build``, ``search``, ``range_search``, ``add``, ``remove``, ``save``,
  ``load``; metadata filters),
- :func:`annotate` (k-NN label vote with confidence and an OOD flag), :func:`search_centroid`,
  :func:`aggregate_hits`,
- :func:`scatlas.search.synthetic.clustered_embeddings` (test/benchmark data).

See ``docs/search.md`` ("Cell search") for the defaults and how they were chosen.
"""

from __future__ import annotations

from .index import CellIndex, default_nlist, default_nprobe, default_train_size
from .query import aggregate_hits, annotate, search_centroid

__all__ = [
    "CellIndex",
    "aggregate_hits",
    "annotate",
    "default_nlist",
    "default_nprobe",
    "default_train_size",
    "search_centroid",
]
