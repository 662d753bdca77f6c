"""Search engines behind :class:`scatlas.search.CellIndex`.

Every engine works on *prepared* float32 vectors (unit rows for cosine) and ranks by an internal
key, smaller is better:

- ``kind == "ip"`` (metrics ``cosine`` and ``ip``): ``key = -q.x``;
- ``kind == "l2"`` (metric ``euclidean``): ``key = ||q - x||^2``.

:class:`CellIndex` turns keys into the reported distances (``1 + key`` for cosine, ``sqrt`` for
euclidean). An engine stores stable int64 ids beside the vectors and returns them.

The engine contract is :class:`Engine` (a ``typing.Protocol``, in :mod:`._contract`); engines
subclass :class:`EngineBase` for the no-op defaults of the optional steps (``reserve``,
``bulk_add``, ``finish``, ``train``, ``meta``, ``scan_counts``). Engines are found by name in
:data:`REGISTRY` (``name -> EngineSpec``: module, class, whether it needs faiss, its sharded form);
:func:`register_engine` adds one (the slot for cuVS / faiss-GPU-cuVS engines), :func:`create_engine`
makes one, :func:`get_engine_class` returns the class that loads a saved one. ``allowed`` is None or
a boolean mask over the id space (host numpy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ... import backend
from ...kernels.neighbors import lexsort_rows
from ._contract import Engine, EngineBase, EngineSpec

__all__ = ["ENGINES", "REGISTRY", "Engine", "EngineBase", "EngineSpec", "create_engine",
           "faiss_gpu_available", "get_engine_class", "register_engine", "shard_engine"]

REGISTRY: dict[str, EngineSpec] = {}


def register_engine(spec: EngineSpec) -> None:
    """Make an engine known by ``spec.name`` (replacing one of that name)."""
    REGISTRY[spec.name] = spec


for _spec in (
    EngineSpec("exact", ".exact", "ExactEngine", ivf=False),
    EngineSpec("faiss-ivf", ".faiss_ivf", "FaissIVF", needs_faiss=True),
    EngineSpec("faiss-ivfpq", ".faiss_ivf", "FaissIVF", needs_faiss=True),
    EngineSpec("native-ivf", ".ivf_native", "NativeIVF",
               sharded=(".ivf_sharded", "ShardedNativeIVF")),
    EngineSpec("faiss-gpu", ".faiss_ivf", "FaissIVF", needs_faiss=True, gpu_only=True),
):
    register_engine(_spec)

ENGINES = tuple(REGISTRY)  # the built-in names (REGISTRY holds any registered later too)


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
        import faiss
    except ImportError as err:
        from ..._validate import ScatlasInputError

        raise ScatlasInputError("this engine needs faiss (pip install faiss-cpu, or faiss-gpu "
                                "for GPUs); engines 'exact' and 'native-ivf' work without "
                                "it") from err
    return faiss


def mismatch(folder: Any, what: str, got: Any, want: Any) -> Exception:
    """The error for a saved index whose files disagree with its manifest."""
    from ..._validate import ScatlasInputError

    return ScatlasInputError(f"saved index {str(folder)!r} is inconsistent: {what} {got} in "
                             f"the files != {want} in the manifest")


def faiss_gpu_available() -> bool:
    """True when faiss imports with GPU support and sees a GPU."""
    try:
        import faiss
    except ImportError:
        return False
    return (hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "index_cpu_to_gpu")
            and faiss.get_num_gpus() > 0)


def _spec(name: str) -> EngineSpec:
    spec = REGISTRY.get(name)
    if spec is None:
        from ...exceptions import ScatlasInputError

        raise ScatlasInputError(f"engine must be one of {tuple(REGISTRY)}, got {name!r}",
                                param="engine")
    return spec


def get_engine_class(name: str) -> type:
    """The engine class registered as ``name`` (the one whose ``load`` reads it back)."""
    return _spec(name).engine_class()


def create_engine(name: str, d: int, kind: str, nlist: int | None, *, device: str = "cpu",
                  seed: int = 0, n_shards: int = 1, **options: Any) -> Engine:
    """A new, untrained engine ``name`` for ``d``-dimensional vectors ranked by ``kind``;
    ``n_shards > 1`` makes its sharded form (only engines registered with one). ``options``
    go to the class's ``create`` (e.g. ``list_dtype`` of the native IVF)."""
    spec = _spec(name)
    cls = spec.engine_class() if n_shards <= 1 else spec.sharded_class()
    extra = {"n_shards": n_shards} if n_shards > 1 else {}
    return cls.create(d, kind, nlist, device=device, variant=name, seed=seed, **extra,
                      **options)


def shard_engine(eng: Engine, n_shards: int, device: str) -> Engine:
    """``eng`` (loaded unsharded, on the host) re-sharded over ``n_shards`` devices."""
    return _spec(eng.name).sharded_class().from_native(eng, n_shards, device)
