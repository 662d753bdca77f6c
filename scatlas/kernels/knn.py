"""Exact k-nearest neighbours and mutual nearest neighbours by blocked matrix products.

One code path for NumPy/SciPy (CPU) and CuPy (GPU). The distance matrix is never held whole:
query rows are taken in blocks, the reference in blocks, each block's scores come from one matrix
product (GEMM, or sparse x dense), and a running top-k per query row is merged block by block.

Sources and conventions
-----------------------
- Brute-force exact search as in faiss ``IndexFlatL2`` / ``IndexFlatIP`` (Johnson, Douze & Jegou
  2019): squared euclidean distances from ``||q||^2 - 2 q.r + ||r||^2``, here folded into the
  product itself by augmenting the operands with the norms (``[q, ||q||^2, 1] . [-2r, 1,
  ||r||^2]``), so a block costs one GEMM and no extra pass over it.
- Mutual nearest neighbours as in batchelor's ``findMutualNN`` (Haghverdi et al. 2018) and
  Seurat's ``FindAnchorPairs`` (Stuart et al. 2019; ../shared/reference/cca_mnn_rsvd.md 1.2
  step 6, 2.1-2.2), with exact neighbours instead of Annoy / KMKNN.

Metrics (results always sorted best first, i.e. by increasing "distance"):

- ``"euclidean"``: true (not squared) distances ``sqrt(max(||q||^2 - 2 q.r + ||r||^2, 0))``.
- ``"cosine"``: ``1 - cos(q, r)``, clipped at 0; an all-zero row has cosine 0 to everything
  (distance 1), as scikit-learn's ``cosine_distances`` gives.
- ``"ip"``: the NEGATIVE inner product ``-q.r`` (so smaller is more similar and the order is the
  same as for the other metrics). faiss reports similarities for inner products instead; negate
  these distances to compare.

Ties: among equal distances the smaller reference index comes first. The selection and the order
are made on the exact computed key (squared distance for euclidean, ``-cos`` for cosine, ``-q.r``
for ip), then re-sorted on the reported distances; two keys that differ only in the last bit can
round to one reported distance (sqrt, ``1 + key``), and those keep their key order at the k-th
boundary (a rounding-level deviation, never a wrong neighbour).

Algorithm per query block: the reference is visited in a fixed pseudo-random row order (so that
every block is a random sample of it, whatever the input's ordering), in blocks that grow from a
few hundred rows up to the memory budget. A reference score is a candidate only when it is at most
the row's current k-th best key; rows with more than ``cap`` candidates in a block first tighten
their threshold to the block's own k-th smallest key (``partition``). Candidates are merged into
the running top-k by a stable (key, index) sort of at most ``k + cap`` entries per row. With the
random order the expected number of candidates per block is about 2k per row, so the cost is the
GEMM plus a few cheap passes over each block.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from .. import _progress, backend
from .._validate import ScatlasInputError, check_positive_int, check_same_features
from .linalg import as_compute_matrix

Metric = Literal["euclidean", "cosine", "ip"]
Engine = Literal["auto", "brute", "faiss"]

_METRICS = ("euclidean", "cosine", "ip")
_ENGINES = ("auto", "brute", "faiss")
# Bytes of scores (plus the boolean mask) per block on the CPU.
_CPU_BLOCK_BYTES = 256 * 2**20
# On the GPU: this fraction of the free device memory per block, within [2^22, 2^28] scores;
# a block needs the scores, a mask and cupy.nonzero's int64 scan (about 14 bytes per score).
_GPU_FREE_FRACTION = 0.25
_GPU_BYTES_PER_SCORE = 14
# Query rows per block.
_CPU_QUERY_ROWS = 2048
_GPU_QUERY_ROWS = 8192
# Candidates per row and block before its threshold is tightened by a partition: max(factor k, min).
_CAP_FACTOR = 4
_CAP_MIN = 64
# Seed of the fixed reference visiting order.
_ORDER_SEED = 0


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def knn(
    query: Any,
    ref: Any = None,
    k: int = 15,
    *,
    metric: Metric = "euclidean",
    exclude_self: bool = False,
    block_size: int | None = None,
    engine: Engine = "auto",
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
) -> tuple[Any, Any]:
    """Exact k nearest reference rows of every query row.

    Parameters
    ----------
    query
        (n_query, p) numpy / scipy.sparse / cupy / cupyx.scipy.sparse matrix. Sparse matrices are
        never densified whole (reference blocks are, one at a time).
    ref
        (n_ref, p) matrix of the same kind and device; ``None`` means ``query`` itself.
    k
        Neighbours per query row, 1 <= k <= n_ref (n_ref - 1 with ``exclude_self``).
    metric
        ``"euclidean"`` (true distances), ``"cosine"`` (1 - cosine similarity) or ``"ip"``
        (negative inner product); see the module docstring.
    exclude_self
        Query row i is reference row i (``ref`` is None or the same cells): drop each row's own
        index from its neighbours. Duplicates of a cell (other indices) are kept.
    block_size
        Force query and reference blocks of this many rows (tests, memory caps). ``None``: from a
        memory budget, ~256 MiB of scores per block on the CPU and a quarter of the free device
        memory (at most 2^28 scores) on the GPU.
    engine
        ``"brute"`` (this blocked GEMM search), ``"faiss"`` (faiss ``IndexFlat*`` on the host,
        when faiss is installed; float32, dense) or ``"auto"`` (= ``"brute"``).
    dtype
        Compute dtype, float32 (default) or float64.
    device
        ``None`` computes where the data live; ``'cpu'``/``'gpu'``/``'auto'`` moves them there
        and the results back to the caller's array kind.
    progress
        Show a progress bar over query rows (see :mod:`scatlas._progress`).

    Returns
    -------
    distances : (n_query, k) compute dtype
        Sorted ascending (best first) per row.
    indices : (n_query, k) int64
        Reference row indices; among equal distances the smaller index first.
    """
    if metric not in _METRICS:
        raise ScatlasInputError(f"metric must be one of {_METRICS}, got {metric!r}")
    if engine not in _ENGINES:
        raise ScatlasInputError(f"engine must be one of {_ENGINES}, got {engine!r}")
    same = ref is None or ref is query
    Qd, restore = backend.on_device(query, device)
    Rd = Qd if same else backend.on_device(ref, device)[0]
    if backend.device_of(Qd) != backend.device_of(Rd):
        raise ScatlasInputError(
            "query and ref live on different devices; move them together or pass device="
        )
    Q = _as_csr(as_compute_matrix(Qd, dtype, "query"))
    R = Q if same else _as_csr(as_compute_matrix(Rd, dtype, "ref"))
    check_same_features([Q, R], ["query", "ref"])
    if exclude_self and Q.shape[0] != R.shape[0]:
        raise ScatlasInputError(
            f"exclude_self=True needs query row i to be ref row i, but query has "
            f"{Q.shape[0]} rows and ref {R.shape[0]}"
        )
    k = _check_k(k, R.shape[0], exclude_self)
    if engine == "faiss":
        D, idx = _knn_faiss(Q, R, k, metric, exclude_self)
    else:
        D, idx = _knn_brute(Q, R, k, metric, exclude_self, block_size, progress)
    return restore(D), restore(idx)


def mnn_pairs(
    a: Any,
    b: Any,
    k: int = 20,
    *,
    k2: int | None = None,
    metric: Metric = "euclidean",
    block_size: int | None = None,
    engine: Engine = "auto",
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
) -> tuple[Any, Any]:
    """Mutual nearest neighbour pairs between two sets of cells.

    ``(i, j)`` is kept when ``b[j]`` is among the ``k`` nearest cells of ``a[i]`` in ``b`` and
    ``a[i]`` is among the ``k2`` (default ``k``) nearest of ``b[j]`` in ``a``: batchelor's
    ``findMutualNN(data1, data2, k1=k, k2=k2)`` and Seurat's ``FindAnchorPairs`` (k.anchor = 5),
    with exact neighbours from :func:`knn`.

    Parameters
    ----------
    a, b
        (n_a, p) and (n_b, p) matrices (dense or sparse, same device).
    k, k2
        Neighbours searched from a into b, and from b into a (``None``: ``k``).
    metric, block_size, engine, dtype, device, progress
        As in :func:`knn`.

    Returns
    -------
    ia, ib : (n_pairs,) int64
        Row indices into ``a`` and ``b``, sorted lexicographically by ``(ia, ib)``; the caller's
        array kind.
    """
    k2 = k if k2 is None else k2
    opts = dict(metric=metric, block_size=block_size, engine=engine, dtype=dtype,
                device=device, progress=progress)
    _, nn_ab = knn(a, b, k, **opts)
    _, nn_ba = knn(b, a, k2, **opts)
    return _mutual(nn_ab, nn_ba)


def _mutual(nn_ab: Any, nn_ba: Any) -> tuple[Any, Any]:
    """Pairs present in both directed kNN lists, as sorted (i, j) int64 arrays.

    Each pair is encoded as ``i * n_b + j``; both lists hold distinct codes, so a code seen twice
    in their concatenation is mutual, and sorting the codes sorts by (i, j).
    """
    xp = backend.array_module(nn_ab)
    n_a, n_b = nn_ab.shape[0], nn_ba.shape[0]
    codes_ab = (xp.arange(n_a, dtype=np.int64)[:, None] * n_b + nn_ab).ravel()
    codes_ba = (nn_ba * n_b + xp.arange(n_b, dtype=np.int64)[:, None]).ravel()
    allc = xp.sort(xp.concatenate([codes_ab, codes_ba]))
    both = allc[1:][allc[1:] == allc[:-1]]
    return both // n_b, both % n_b


# ----------------------------------------------------------------------------------------------
# validation and operands
# ----------------------------------------------------------------------------------------------
def _as_csr(X: Any) -> Any:
    return X.tocsr() if backend.issparse(X) and X.format != "csr" else X


def _check_k(k: Any, n_ref: int, exclude_self: bool) -> int:
    k = check_positive_int(k, "k")
    avail = n_ref - 1 if exclude_self else n_ref
    if k > avail:
        extra = " other" if exclude_self else ""
        raise ScatlasInputError(
            f"k={k} neighbours requested but the reference has only {avail}{extra} cell(s): "
            "fewer cells than k"
        )
    return k


def _row_sq_norms(X: Any) -> Any:
    """Squared L2 norm of every row (dense or sparse), in X's dtype."""
    xp = backend.array_module(X)
    if backend.issparse(X):
        return xp.asarray(X.multiply(X).sum(axis=1)).ravel().astype(X.dtype)
    return xp.einsum("ij,ij->i", X, X)


def _scale_rows(X: Any, s: Any) -> Any:
    """diag(s) @ X for dense or CSR X."""
    if not backend.issparse(X):
        return X * s[:, None]
    xp = backend.array_module(X)
    rows = xp.searchsorted(X.indptr, xp.arange(X.nnz), side="right") - 1
    csr = backend.sparse_module(X).csr_matrix
    return csr((X.data * s[rows], X.indices.copy(), X.indptr.copy()), shape=X.shape)


def _hstack(X: Any, cols: list[Any]) -> Any:
    """[X, c1, c2, ...] for dense or CSR X and 1-D columns."""
    xp = backend.array_module(X)
    extra = xp.stack(cols, axis=1).astype(X.dtype)
    if not backend.issparse(X):
        return xp.concatenate([X, extra], axis=1)
    spm = backend.sparse_module(X)
    return spm.hstack([X, spm.csr_matrix(extra)], format="csr").astype(X.dtype)


def _operands(Q: Any, R: Any, metric: str, order: Any) -> tuple[Any, Any]:
    """(Qa, Ra) with ``Qa[i] . Ra[j]`` = the ranking key of (query i, reference order[j]).

    euclidean: [q, |q|^2, 1] . [-2 r, 1, |r|^2] = squared distance; cosine: q/|q| . -r/|r|
    = -cos; ip: q . -r. ``Ra`` rows are permuted by ``order``.
    """
    xp = backend.array_module(Q)
    Rp = R[order]
    if metric == "euclidean":
        qn, rn = _row_sq_norms(Q), _row_sq_norms(Rp)
        Qa = _hstack(Q, [qn, xp.ones_like(qn)])
        Ra = _hstack(Rp * -2, [xp.ones_like(rn), rn])
    elif metric == "cosine":
        Qa = _scale_rows(Q, _inv_norms(Q))
        Ra = _scale_rows(Rp, -_inv_norms(Rp))
    else:
        Qa, Ra = Q, Rp * -1
    return Qa, Ra


def _inv_norms(X: Any) -> Any:
    """1 / ||row||, 0 for all-zero rows."""
    xp = backend.array_module(X)
    n = xp.sqrt(_row_sq_norms(X))
    return xp.where(n > 0, 1 / xp.where(n > 0, n, 1), 0).astype(X.dtype)


def _key_to_distance(key: Any, metric: str) -> Any:
    xp = backend.array_module(key)
    if metric == "euclidean":
        return xp.sqrt(xp.maximum(key, 0))
    if metric == "cosine":
        return xp.maximum(key + 1, 0)
    return key


# ----------------------------------------------------------------------------------------------
# block sizes
# ----------------------------------------------------------------------------------------------
def _score_budget(xp: Any, itemsize: int) -> int:
    """How many scores one block may hold."""
    if xp is np:
        return _CPU_BLOCK_BYTES // (itemsize + 1)
    free = xp.cuda.runtime.memGetInfo()[0] + xp.get_default_memory_pool().free_bytes()
    n = int(free * _GPU_FREE_FRACTION) // (_GPU_BYTES_PER_SCORE + itemsize)
    return int(min(max(n, 2**22), 2**28))


def _block_shape(Q: Any, R: Any, block_size: int | None) -> tuple[int, int]:
    """(query rows, maximum reference rows) per block."""
    nq, nr = Q.shape[0], R.shape[0]
    if block_size is not None:
        b = check_positive_int(block_size, "block_size")
        return min(b, nq), min(b, nr)
    xp = backend.array_module(Q)
    itemsize = np.dtype(Q.dtype).itemsize
    budget = _score_budget(xp, itemsize)
    bq = min(nq, _CPU_QUERY_ROWS if xp is np else _GPU_QUERY_ROWS)
    br = max(1, budget // bq)
    if backend.issparse(R):  # reference blocks are densified: (br, p) must fit the budget too
        br = min(br, max(1, budget // R.shape[1]))
    return bq, min(br, nr)


def _ref_blocks(n_ref: int, br: int, first: int) -> list[tuple[int, int]]:
    """Reference block bounds: widths grow from ``first`` (each block at most twice the rows
    already seen) up to ``br``, so that thresholds tighten before the wide blocks."""
    bounds, start = [], 0
    width = min(first, br)
    while start < n_ref:
        stop = min(n_ref, start + width)
        bounds.append((start, stop))
        start = stop
        width = min(br, max(first, 2 * start))
    return bounds


def _cap(k: int) -> int:
    return max(_CAP_FACTOR * k, _CAP_MIN)


# ----------------------------------------------------------------------------------------------
# brute-force engine
# ----------------------------------------------------------------------------------------------
def _knn_brute(Q, R, k, metric, exclude_self, block_size, progress):
    xp = backend.array_module(Q)
    nq, nr = Q.shape[0], R.shape[0]
    order_host = np.random.default_rng(_ORDER_SEED).permutation(nr)
    order = xp.asarray(order_host)
    Qa, Ra = _operands(Q, R, metric, order)
    inv_order = None
    if exclude_self:
        inv_host = np.empty(nr, dtype=np.int64)
        inv_host[order_host] = np.arange(nr)
        inv_order = xp.asarray(inv_host)
    bq, br = _block_shape(Qa, Ra, block_size)
    blocks = _ref_blocks(nr, br, min(_cap(k), br))
    D = xp.empty((nq, k), dtype=Qa.dtype)
    idx = xp.empty((nq, k), dtype=np.int64)
    with _progress.bar(desc="knn", total=nq, progress=progress, unit="cell") as pb:
        for qs in range(0, nq, bq):
            qe = min(nq, qs + bq)
            self_pos = inv_order[qs:qe] if exclude_self else None
            key, ids = _topk_block(Qa[qs:qe], Ra, order, blocks, k, self_pos)
            D[qs:qe], idx[qs:qe] = _finalize(key, ids, metric)
            pb.update(qe - qs)
    return D, idx


def _topk_block(Qb, Ra, order, blocks, k, self_pos):
    """Running exact top-k (key, original index) of one query block over all reference blocks.

    ``self_pos[i]`` (exclude_self) is the position of query row i in the permuted reference.
    """
    xp = backend.array_module(Ra)
    n = Qb.shape[0]
    dt = Qb.dtype
    best_k = xp.full((n, k), xp.inf, dtype=dt)
    best_i = xp.full((n, k), -1, dtype=np.int64)
    thr = xp.full(n, np.finfo(dt).max, dtype=dt)
    rows = xp.arange(n)
    for rs, re_ in blocks:
        S = _scores(Qb, Ra[rs:re_])
        if self_pos is not None:
            inside = (self_pos >= rs) & (self_pos < re_)
            S[rows[inside], self_pos[inside] - rs] = xp.inf
        _merge(S, order[rs:re_], best_k, best_i, thr, k)
    return best_k, best_i


def _scores(Qb, Rb):
    """Ranking keys of a query block against a reference block: Qb @ Rb.T, dense (bq, br)."""
    xp = backend.array_module(Rb)
    if backend.issparse(Rb):
        Rb = Rb.toarray()
    if backend.issparse(Qb):
        return xp.ascontiguousarray(Qb @ xp.ascontiguousarray(Rb.T))
    return Qb @ Rb.T


def _merge(S, col_ids, best_k, best_i, thr, k):
    """Merge one block of keys ``S`` (n, w) into the running top-k, in place.

    ``col_ids`` are the original reference indices of S's columns; ``thr`` holds each row's
    current k-th best key (the float maximum until k are known). Only keys <= thr can enter.
    """
    xp = backend.array_module(S)
    cap = _cap(k)
    mask = S <= thr[:, None]
    cnt = mask.sum(axis=1)
    heavy = xp.nonzero(cnt > cap)[0]
    if heavy.size:  # tighten to the block's own k-th smallest key (width > cap > k here)
        Sh = S[heavy]
        kth = xp.partition(Sh, k - 1, axis=1)[:, k - 1]
        mh = Sh <= xp.minimum(thr[heavy], kth)[:, None]
        mask[heavy] = mh
        cnt[heavy] = mh.sum(axis=1)
    width = int(cnt.max())
    if width == 0:
        return
    flat = xp.flatnonzero(mask)  # row-major: columns ascend within a row
    r = flat // mask.shape[1]
    c = flat - r * mask.shape[1]
    has = cnt > 0
    act = xp.nonzero(has)[0]
    slot = xp.cumsum(has) - 1
    pos = xp.arange(r.size) - (xp.cumsum(cnt) - cnt)[r]
    ck = xp.full((act.size, width), xp.inf, dtype=S.dtype)
    ci = xp.full((act.size, width), -1, dtype=np.int64)
    ck[slot[r], pos] = S[r, c]
    ci[slot[r], pos] = col_ids[c]
    keys = xp.concatenate([best_k[act], ck], axis=1)
    ids = xp.concatenate([best_i[act], ci], axis=1)
    top = _lexsort_rows(keys, ids)[:, :k]
    new_k = xp.take_along_axis(keys, top, axis=1)
    best_k[act] = new_k
    best_i[act] = xp.take_along_axis(ids, top, axis=1)
    kth = new_k[:, k - 1]
    thr[act] = xp.where(xp.isfinite(kth), kth, thr[act])


def _lexsort_rows(keys, ids):
    """Per-row order by (key, id): indices (n, m) into each row."""
    xp = backend.array_module(keys)
    if xp is np:
        return np.lexsort((ids, keys), axis=1)
    o1 = xp.argsort(ids, axis=1)  # cupy sorts are stable
    o2 = xp.argsort(xp.take_along_axis(keys, o1, axis=1), axis=1)
    return xp.take_along_axis(o1, o2, axis=1)


def _finalize(key, ids, metric):
    """Reported distances, re-sorted per row on (distance, index)."""
    xp = backend.array_module(key)
    D = _key_to_distance(key, metric)
    o = _lexsort_rows(D, ids)
    return xp.take_along_axis(D, o, axis=1), xp.take_along_axis(ids, o, axis=1)


# ----------------------------------------------------------------------------------------------
# faiss engine (optional)
# ----------------------------------------------------------------------------------------------
def _knn_faiss(Q, R, k, metric, exclude_self):
    """Exact search with faiss ``IndexFlatL2`` / ``IndexFlatIP`` on the host (float32, dense).

    Inputs on the GPU or sparse are moved to host / densified. Results follow this module's
    conventions (true euclidean distances, 1 - cos, -q.r), re-sorted on (distance, index); faiss
    breaks ties at the k-th boundary by its own rule.
    """
    try:
        import faiss  # noqa: PLC0415
    except ImportError as err:
        raise ScatlasInputError(
            "engine='faiss' needs the faiss package (pip install faiss-cpu); use engine='brute'"
        ) from err
    xp = backend.array_module(Q)
    q, r = (_dense_host32(X) for X in (Q, R))
    if metric == "cosine":
        q, r = (np.ascontiguousarray(X * _inv_norms(X)[:, None]) for X in (q, r))
    index = faiss.IndexFlatL2(q.shape[1]) if metric == "euclidean" else faiss.IndexFlatIP(
        q.shape[1])
    index.add(r)
    sim, ids = index.search(q, k + 1 if exclude_self else k)
    ids = ids.astype(np.int64)
    if exclude_self:
        sim, ids = _drop_self(sim, ids, k)
    key = sim if metric == "euclidean" else -sim
    D, ids = _finalize(key.astype(np.float32), ids, metric)
    return xp.asarray(D), xp.asarray(ids)


def _dense_host32(X):
    X = backend.to_host(X)
    X = X.toarray() if backend.issparse(X) else X
    return np.ascontiguousarray(X, dtype=np.float32)


def _drop_self(sim, ids, k):
    """From k+1 results per row drop the row's own index (or the last one when absent)."""
    n = ids.shape[0]
    drop = ids == np.arange(n)[:, None]
    missing = ~drop.any(axis=1)
    drop[missing, -1] = True
    first = np.argmax(drop, axis=1)  # drop only one entry per row
    drop[:] = False
    drop[np.arange(n), first] = True
    return sim[~drop].reshape(n, k), ids[~drop].reshape(n, k)
