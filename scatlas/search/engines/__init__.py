"""Search engines behind :class:`scatlas.search.CellIndex`.

Every engine works on *prepared* float32 vectors (unit rows for cosine) and ranks by an internal
key, smaller is better:

- ``kind == "ip"`` (metrics ``cosine`` and ``ip``): ``key = -q.x``;
- ``kind == "l2"`` (metric ``euclidean``): ``key = ||q - x||^2``.

:class:`CellIndex` turns keys into the reported distances (``1 + key`` for cosine, ``sqrt`` for
euclidean). An engine stores stable int64 ids beside the vectors and returns them.

Engine interface (duck-typed):

``name``, ``kind``, ``d``, ``ntotal``, ``nlist`` (None for exact), ``is_trained``,
``train(sample)``, ``add(X, ids)``, ``search(Q, k, nprobe, allowed) -> (keys, ids)`` sorted by
(key, id) with (+inf, -1) padding, ``range_search(Q, max_key, nprobe, allowed) -> list[(keys,
ids)]``, ``remove(ids) -> int``, ``save(folder) -> list[str]`` (file names written),
``load(folder, meta, device) -> engine`` (classmethod), ``meta() -> dict`` (JSON facts for the
manifest). ``allowed`` is None or a boolean mask over the id space (host numpy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ... import backend
from ...kernels.neighbors import lexsort_rows

ENGINES = ("exact", "faiss-ivf", "faiss-ivfpq", "native-ivf", "faiss-gpu")


def smallest_k(keys: Any, ids: Any, k: int) -> tuple[Any, Any]:
    """The k best (key, id) per row of (m, w) candidates, sorted; pads with (inf, -1) if w < k.

    All candidates tied with the k-th key enter the final (key, id) sort, so ties at the cut are
    resolved by the smaller id, deterministically.
    """
    xp = backend.array_module(keys)
    m, w = keys.shape
    if w > k:
        part = xp.argpartition(keys, k - 1, axis=1)
        kth = xp.take_along_axis(keys, part[:, k - 1 : k], axis=1)
        # > k only where finite ties cross the cut (+inf pads are interchangeable)
        width = max(k, int(((keys <= kth) & xp.isfinite(keys)).sum(axis=1).max()))
        if width > k:
            part = xp.argpartition(keys, width - 1, axis=1) if width < w else None
        if part is not None:
            sel = part[:, :width]
            keys = xp.take_along_axis(keys, sel, axis=1)
            ids = xp.take_along_axis(ids, sel, axis=1)
    o = lexsort_rows(keys, ids)[:, :k]
    keys = xp.take_along_axis(keys, o, axis=1)
    ids = xp.take_along_axis(ids, o, axis=1)
    ids = xp.where(xp.isfinite(keys), ids, -1)
    if keys.shape[1] < k:
        pad = k - keys.shape[1]
        keys = xp.concatenate([keys, xp.full((m, pad), xp.inf, dtype=keys.dtype)], axis=1)
        ids = xp.concatenate([ids, xp.full((m, pad), -1, dtype=ids.dtype)], axis=1)
    return keys, ids


def hits_per_query(qidx: Any, keys: Any, ids: Any, n_queries: int) -> list[tuple[Any, Any]]:
    """Range-search hits (query index, key, id), in any order, as one ``(keys, ids)`` pair per
    query for ``n_queries`` queries, each sorted by key then id (deterministic ties)."""
    xp = backend.array_module(keys)
    # one dtype for the sort keys (CuPy's lexsort wants it; ids and query indices < 2**53)
    order = xp.lexsort(xp.stack([ids.astype(np.float64), keys.astype(np.float64),
                                 qidx.astype(np.float64)]))
    qidx, keys, ids = qidx[order], keys[order], ids[order]
    bounds = backend.to_host(xp.searchsorted(qidx, xp.arange(n_queries + 1)))
    return [(keys[bounds[i] : bounds[i + 1]], ids[bounds[i] : bounds[i + 1]])
            for i in range(n_queries)]


def pair_keys(Q: Any, X: Any, qrows: Any, xrows: Any, kind: str) -> Any:
    """Exact keys of the pairs (Q[qrows[i]], X[xrows[i]]), each summed on its own (no GEMM
    tiling effects: identical vectors get bit-identical keys). 1-D inputs of equal length."""
    xp = backend.array_module(Q)
    out = xp.empty(qrows.shape[0], dtype=np.float32)
    step = max(1, (32 * 2**20) // (4 * Q.shape[1]))
    for s in range(0, qrows.shape[0], step):
        a, b = Q[qrows[s : s + step]], X[xrows[s : s + step]]
        if kind == "l2":
            diff = a - b
            out[s : s + step] = (diff * diff).sum(axis=1)
        else:
            out[s : s + step] = -(a * b).sum(axis=1)
    return out


def faiss_module():
    """``import faiss`` with a clear error when it is missing."""
    try:
        import faiss  # noqa: PLC0415
    except ImportError as err:
        from ..._validate import ScatlasInputError  # noqa: PLC0415

        raise ScatlasInputError("this engine needs faiss (pip install faiss-cpu, or faiss-gpu "
                                "for GPUs); engines 'exact' and 'native-ivf' work without "
                                "it") from err
    return faiss


def mismatch(folder: Any, what: str, got: Any, want: Any) -> Exception:
    """The error for a saved index whose files disagree with its manifest."""
    from ..._validate import ScatlasInputError  # noqa: PLC0415

    return ScatlasInputError(f"saved index {str(folder)!r} is inconsistent: {what} {got} in "
                             f"the files != {want} in the manifest")


def get_engine_class(name: str):
    """The engine class for a name in :data:`ENGINES`."""
    if name == "exact":
        from .exact import ExactEngine  # noqa: PLC0415

        return ExactEngine
    if name == "native-ivf":
        from .ivf_native import NativeIVF  # noqa: PLC0415

        return NativeIVF
    from .faiss_ivf import FaissIVF  # noqa: PLC0415

    return FaissIVF
