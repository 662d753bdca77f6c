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

- ``"euclidean"``: true (not squared) distances.
- ``"cosine"``: ``1 - cos(q, r)``, clipped at 0; an all-zero row has cosine 0 to everything
  (distance 1), as scikit-learn's ``cosine_distances`` gives.
- ``"ip"``: the NEGATIVE inner product ``-q.r`` (so smaller is more similar and the order is the
  same as for the other metrics). faiss reports similarities for inner products instead; negate
  these distances to compare.

Two stages per query block:

1. Search (GEMM): ranking keys ``||q||^2 - 2 q.r + ||r||^2`` (``-q.r`` on unit rows for cosine,
   ``-q.r`` for ip) for ``k + 8`` candidates. The reference is visited in a fixed pseudo-random
   row order (every block is then a random sample of it, whatever the input's ordering), in
   blocks growing from a few hundred rows up to the memory budget. A key is a candidate only when
   it is <= the row's current (k+8)-th best key; a row with more than ``cap`` candidates in a
   block first tightens its threshold to the block's own (k+8)-th smallest key (partition).
   Candidates merge into the running top list by a (key, index) sort of a few hundred entries per
   row. With the random order a row meets about 2k candidates per block, so the cost is the GEMM
   plus a few passes over each block. On the GPU one fused kernel reads each block once and
   appends candidates to per-row buffers, merged when half full (``_GPU_FUSED``).
2. Re-ranking: each candidate pair's key is recomputed on its own (``sum((q - r)^2)``, or the
   products on unit rows), then sorted on (key, index) and cut to k. Identical reference rows
   get bit-identical keys wherever the GEMM tiled them, and near-zero distances carry no
   cancellation error (the expanded GEMM form has ~sqrt(eps) |x| absolute error there; 8 spare
   candidates absorb its effect on the ranking).

Ties: among equal keys the smaller reference index comes first (squared distance for
euclidean, ``-cos`` for cosine). Two keys one ulp apart can round to one reported distance; they
keep their key order.

Size (about 760 lines): exact k-NN and MNN pairs share the blocked brute-force scan, its
streaming top-k merge and the faiss route; the merge helpers (``append_reference``,
``lexsort_rows``) are the scan's inner loop.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal

import numpy as np

from .. import _progress, backend
from .._params import POSITIVE_INT, Options, validate_params
from .._validate import ScatlasInputError, check_positive_int, check_same_features
from .linalg import as_compute_matrix

Metric = Literal["euclidean", "cosine", "ip"]
Engine = Literal["auto", "brute", "faiss"]

_METRICS = ("euclidean", "cosine", "ip")
_ENGINES = ("auto", "brute", "faiss")
# Bytes of scores (plus the boolean mask) per block on the CPU.
_CPU_BLOCK_BYTES = 256 * 2**20
# On the GPU: this fraction of the free device memory per block, within [2^22, 2^30] scores;
# a block needs the scores, and on the generic path a mask and cupy.nonzero's int64 scan
# (about 14 bytes per score).
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
# The GEMM search keeps k + _SLACK candidates for the exact re-ranking.
_SLACK = 8
# Bytes of gathered pairs per re-ranking chunk.
_RERANK_BYTES = 64 * 2**20


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
#: the rules :func:`knn` and :func:`mnn_pairs` share (``k`` within the reference: on the data)
KNN_RULES = {"k": POSITIVE_INT, "metric": Options(_METRICS), "engine": Options(_ENGINES),
             "block_size": (None, POSITIVE_INT)}


@validate_params(exclude_self=Options((False, True)), **KNN_RULES)
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
        memory (at most 2^30 scores) on the GPU.
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
        Sorted ascending (best first) per row; each recomputed from its own pair (no
        cancellation error: a duplicate is at distance exactly 0).
    indices : (n_query, k) int64
        Reference row indices; among equal distances the smaller index first.

    Peak device memory (b: the compute dtype's bytes): the inputs plus their augmented copies
    ((n_query + n_ref)(p + 2) b, with up to two transient copies of the reference while it is
    permuted and scaled; unit-row copies first for cosine; sparse input stays sparse and its
    reference blocks are densified one at a time within the budget), one block of
    scores: at most 256 MiB with its mask on the CPU, on the GPU a quarter of the free device
    memory at the first block (between 2^22 and 2^30 scores, about 14 + b bytes each with the
    candidate scan), the (q, k + 8) running lists of a query block (q = 2048 rows on the CPU,
    8192 on the GPU), 64 MiB of re-ranked pairs, and the outputs n_query k (b + 8).
    """
    if metric not in _METRICS:
        raise ScatlasInputError(f"metric must be one of {_METRICS}, got {metric!r}")
    if engine not in _ENGINES:
        raise ScatlasInputError(f"engine must be one of {_ENGINES}, got {engine!r}")
    same = ref is None or ref is query
    Qd, restore = backend.on_device(query, device, backend.resolve_dtype(dtype))
    Rd = Qd if same else backend.on_device(ref, device, backend.resolve_dtype(dtype))[0]
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


@validate_params(k2=(None, POSITIVE_INT), **KNN_RULES)
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

    Peak device memory: one :func:`knn` at a time (the a -> b search, then b -> a, each as
    documented there) plus both neighbour lists (n_a k + n_b k2) 8 bytes and the pairs.
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
    = -cos (for cosine, Q and R arrive as unit rows); ip: q . -r. ``Ra`` rows are permuted by
    ``order``.
    """
    xp = backend.array_module(Q)
    Rp = R[order]
    if metric == "euclidean":
        qn, rn = _row_sq_norms(Q), _row_sq_norms(Rp)
        return _hstack(Q, [qn, xp.ones_like(qn)]), _hstack(Rp * -2, [xp.ones_like(rn), rn])
    return Q, Rp * -1


def _inv_norms(X: Any) -> Any:
    """1 / ||row|| (in float64, then cast), 0 for all-zero rows."""
    xp = backend.array_module(X)
    n = xp.sqrt(_row_sq_norms(X).astype(np.float64))
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
    return int(min(max(n, 2**22), 2**30))


def _block_shape(Q: Any, R: Any, block_size: int | None) -> tuple[int, int]:
    """(query rows, maximum reference rows) per block."""
    nq, nr = Q.shape[0], R.shape[0]
    xp = backend.array_module(Q)
    qmax = nq if xp is np else min(nq, _GPU_MAX_GRID_Y)
    if block_size is not None:
        b = check_positive_int(block_size, "block_size")
        return min(b, qmax), min(b, nr)
    itemsize = np.dtype(Q.dtype).itemsize
    budget = _score_budget(xp, itemsize)
    bq = min(qmax, _CPU_QUERY_ROWS if xp is np else _GPU_QUERY_ROWS)
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
def _slack(k: int) -> int:
    """Extra candidates kept by the GEMM search for the exact re-ranking."""
    return _SLACK


def _knn_brute(Q: Any, R: Any, k: int, metric: str, exclude_self: bool, block_size: int | None,
               progress: bool | None) -> tuple[Any, Any]:
    """Blocked GEMM search for ``k + slack`` candidates, then exact re-ranking of those."""
    xp = backend.array_module(Q)
    nq, nr = Q.shape[0], R.shape[0]
    k_search = min(k + _slack(k), nr - 1 if exclude_self else nr)
    if metric == "cosine":  # cosine = ip on unit rows, in the search and the re-ranking
        same = R is Q
        Q = _scale_rows(Q, _inv_norms(Q))
        R = Q if same else _scale_rows(R, _inv_norms(R))
    order_host = np.random.default_rng(_ORDER_SEED).permutation(nr)
    order = xp.asarray(order_host)
    Qa, Ra = _operands(Q, R, metric, order)
    inv_order = None
    if exclude_self:
        inv_host = np.empty(nr, dtype=np.int64)
        inv_host[order_host] = np.arange(nr)
        inv_order = xp.asarray(inv_host)
    bq, br = _block_shape(Qa, Ra, block_size)
    blocks = _ref_blocks(nr, br, min(_cap(k_search), br))
    D = xp.empty((nq, k), dtype=Qa.dtype)
    idx = xp.empty((nq, k), dtype=np.int64)
    with _progress.bar(desc="knn", total=nq, progress=progress, unit="cell") as pb:
        for qs in range(0, nq, bq):
            qe = min(nq, qs + bq)
            self_pos = inv_order[qs:qe] if exclude_self else None
            _, ids = _topk_block(Qa[qs:qe], Ra, order, blocks, k_search, self_pos)
            D[qs:qe], idx[qs:qe] = _rerank(Q[qs:qe], R, ids, k, metric)
            pb.update(qe - qs)
    return D, idx


class _RunningTopK:
    """Per-row best ``k`` (key, original index) pairs, sorted, and each row's threshold: its
    current k-th best key, the float maximum until k are known. A key can enter only when it is
    <= the threshold, and equal keys are ordered by index."""

    def __init__(self, xp: Any, n: int, k: int, dtype: Any):
        self.xp, self.k = xp, k
        self.key = xp.full((n, k), xp.inf, dtype=dtype)
        self.idx = xp.full((n, k), -1, dtype=np.int64)
        self.thr = xp.full(n, np.finfo(dtype).max, dtype=dtype)

    def absorb(self, rows: Any, ck: Any, ci: Any) -> None:
        """Merge candidates ``ck``/``ci`` (len(rows), m), padded with (inf, -1), into ``rows``."""
        xp, k = self.xp, self.k
        keys = xp.concatenate([self.key[rows], ck], axis=1)
        ids = xp.concatenate([self.idx[rows], ci], axis=1)
        top = lexsort_rows(keys, ids)[:, :k]
        new_k = xp.take_along_axis(keys, top, axis=1)
        self.key[rows] = new_k
        self.idx[rows] = xp.take_along_axis(ids, top, axis=1)
        kth = new_k[:, k - 1]
        self.thr[rows] = xp.where(xp.isfinite(kth), kth, self.thr[rows])


def _topk_block(Qb: Any, Ra: Any, order: Any, blocks: list[tuple[int, int]], k: int,
                self_pos: Any) -> tuple[Any, Any]:
    """Running exact top-k (key, original index) of one query block over all reference blocks.

    ``self_pos[i]`` (exclude_self) is the position of query row i in the permuted reference.
    Returns (keys, indices), (n, k) each.
    """
    xp = backend.array_module(Ra)
    n = Qb.shape[0]
    top = _RunningTopK(xp, n, k, Qb.dtype)
    fused = _fused_kernel(xp, Qb.dtype)
    buf = _CandidateBuffer(xp, n, _cap(k), Qb.dtype) if fused is not None else None
    rows = xp.arange(n)
    for rs, re_ in blocks:
        S = _scores(Qb, Ra[rs:re_])
        if self_pos is not None:
            inside = (self_pos >= rs) & (self_pos < re_)
            S[rows[inside], self_pos[inside] - rs] = xp.inf
        if buf is None:
            _merge(S, order[rs:re_], top, rows)
        else:
            buf.collect(fused, S, order[rs:re_], top)
    if buf is not None:
        buf.flush(top)
    return top.key, top.idx


def _scores(Qb: Any, Rb: Any) -> Any:
    """Ranking keys of a query block against a reference block: Qb @ Rb.T, dense (bq, br)."""
    xp = backend.array_module(Rb)
    if backend.issparse(Rb):
        Rb = Rb.toarray()
    with backend.blas_for_flops(2.0 * Qb.shape[0] * Rb.shape[0] * Rb.shape[1], like=Rb):
        if backend.issparse(Qb):
            return xp.ascontiguousarray(Qb @ xp.ascontiguousarray(Rb.T))
        return xp.ascontiguousarray(Qb @ Rb.T)


def _merge(S: Any, col_ids: Any, top: _RunningTopK, rows: Any) -> None:
    """Merge one block of keys ``S`` (len(rows), w) into the running top-k of ``rows``.

    ``col_ids`` are the original reference indices of S's columns. Rows with more than
    ``cap`` candidates first tighten their threshold to the block's own k-th smallest key.
    """
    xp, k = top.xp, top.k
    thr = top.thr[rows]
    mask = S <= thr[:, None]
    cnt = mask.sum(axis=1)
    heavy = xp.nonzero(cnt > _cap(k))[0]
    if heavy.size:  # width > cap > k here
        Sh = S[heavy]
        kth = xp.partition(Sh, k - 1, axis=1)[:, k - 1]
        mh = Sh <= xp.minimum(thr[heavy], kth)[:, None]
        mask[heavy] = mh
        cnt[heavy] = mh.sum(axis=1)
    width = int(cnt.max())
    if width == 0:
        return
    if int(cnt.min()) == S.shape[1]:  # every key is a candidate (first blocks): no compaction
        top.absorb(rows, S, xp.broadcast_to(col_ids, S.shape))
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
    top.absorb(rows[act], ck, ci)


# ----------------------------------------------------------------------------------------------
# GPU: one fused pass per block appends candidates to per-row buffers (no mask, no scan)
# ----------------------------------------------------------------------------------------------
_GPU_FUSED = True  # False: the generic array-API merge on the GPU too
_GPU_BUFFER_MIN = 256  # candidate slots per row: max(2 cap, this)
_GPU_MAX_GRID_Y = 65535  # query rows per block (one grid row each)
_APPEND_SRC = r"""
extern "C" __global__ void knn_append(
        const TYPE* __restrict__ S, const long long width, const TYPE* __restrict__ thr,
        int* __restrict__ cnt, TYPE* __restrict__ buf_key, long long* __restrict__ buf_idx,
        const long long* __restrict__ col_ids, const int cap) {
    // grid: (column tiles, rows); row r's keys S[r, :] are read once, coalesced.
    const long long r = blockIdx.y;
    const TYPE t = thr[r];
    const TYPE* row = S + r * width;
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < width;
         c += (long long)gridDim.x * blockDim.x) {
        const TYPE s = row[c];
        if (s <= t) {
            const int p = atomicAdd(&cnt[r], 1);
            if (p < cap) {
                buf_key[r * cap + p] = s;
                buf_idx[r * cap + p] = col_ids[c];
            }
        }
    }
}
"""


def append_reference(S: Any, thr: Any, cnt: Any, buf_key: Any, buf_idx: Any, col_ids: Any,
                     order: str = "reverse") -> None:
    """The CPU twin of the ``knn_append`` CUDA kernel, in place (tests compare the two).

    For every row r of the keys ``S`` (n, w): each column c with ``S[r, c] <= thr[r]`` takes the
    slot ``p = cnt[r]++`` and, when ``p < cap`` (``cap = buf_key.shape[1]``), writes
    ``buf_key[r, p] = S[r, c]`` and ``buf_idx[r, p] = col_ids[c]``. ``cnt[r]`` counts every
    candidate, also those past ``cap`` (the caller's overflow test). The CUDA kernel's atomics
    hand out the slots in no fixed order; ``order="reverse"`` fills them from the last column to
    the first, so that a caller relying on column order fails the comparison.
    """
    cap = buf_key.shape[1]
    for r in range(S.shape[0]):
        cols = np.flatnonzero(np.asarray(S[r] <= thr[r]))
        if order == "reverse":
            cols = cols[::-1]
        p = int(cnt[r]) + np.arange(cols.size)
        ok = p < cap
        buf_key[r, p[ok]] = S[r, cols[ok]]
        buf_idx[r, p[ok]] = col_ids[cols[ok]]
        cnt[r] += cols.size


def _fused_kernel(xp: Any, dtype: Any):
    """The compiled append kernel for ``dtype`` on the GPU; None on the CPU, when disabled, or
    when compilation failed (then the generic path runs)."""
    if xp is np or not _GPU_FUSED:
        return None
    return _compile_append(np.dtype(dtype).name)


@functools.lru_cache(maxsize=4)
def _compile_append(dtype_name: str):
    cp = backend.gpu_module()  # only reached with CuPy arrays
    ctype = {"float32": "float", "float64": "double"}[dtype_name]
    try:
        kernel = cp.RawKernel(_APPEND_SRC.replace("TYPE", ctype), "knn_append")
        kernel.compile()
        return kernel
    except Exception as err:  # pragma: no cover - depends on the CUDA toolchain
        warnings.warn(f"knn: fused GPU kernel unavailable ({err}); using the generic path",
                      stacklevel=3)
        return None


class _CandidateBuffer:
    """Per-row candidate buffers on the GPU, filled by the append kernel and merged into the
    running top-k only when half full (so most blocks cost one GEMM and one read pass)."""

    def __init__(self, xp: Any, n: int, cap: int, dtype: Any):
        self.xp, self.n = xp, n
        self.size = max(2 * cap, _GPU_BUFFER_MIN)
        self.key = xp.empty((n, self.size), dtype=dtype)
        self.idx = xp.empty((n, self.size), dtype=np.int64)
        self.cnt = xp.zeros(n, dtype=np.int32)

    def collect(self, kernel: Any, S: Any, col_ids: Any, top: _RunningTopK) -> None:
        xp = self.xp
        n, w = S.shape
        before = self.cnt.copy()
        threads = 256
        grid = (min((w + threads - 1) // threads, 1024), n)
        kernel(grid, (threads,), (S, np.int64(w), top.thr, self.cnt, self.key, self.idx,
                                  xp.ascontiguousarray(col_ids), np.int32(self.size)))
        most = int(self.cnt.max())
        if most > self.size:  # some rows overflowed: redo this block for them, generically
            over = xp.nonzero(self.cnt > self.size)[0]
            self.cnt[over] = before[over]
            self.flush(top)
            _merge(S[over], col_ids, top, over)
        elif most > self.size // 2:
            self.flush(top)

    def flush(self, top: _RunningTopK) -> None:
        xp = self.xp
        act = xp.nonzero(self.cnt > 0)[0]
        if act.size:
            valid = xp.arange(self.size)[None, :] < self.cnt[act][:, None]
            ck = xp.where(valid, self.key[act], xp.inf)
            ci = xp.where(valid, self.idx[act], -1)
            top.absorb(act, ck, ci)
        self.cnt[:] = 0


def lexsort_rows(keys: Any, ids: Any) -> Any:
    """Per-row order by (key, id): int64 indices (n, m) into each row of ``keys`` (n, m).

    NumPy: a plain (SIMD) argsort on the keys, and a lexsort only for the rows where two finite
    keys tie (empty slots hold +inf and are interchangeable). CuPy: two stable sorts
    (:func:`lexsort_rows_stable`, which the tests run on NumPy too).
    """
    xp = backend.array_module(keys)
    if xp is np:
        o = np.argsort(keys, axis=1)
        ks = np.take_along_axis(keys, o, axis=1)
        tied = np.flatnonzero(((ks[:, 1:] == ks[:, :-1]) & np.isfinite(ks[:, 1:])).any(axis=1))
        if tied.size:
            o[tied] = np.lexsort((ids[tied], keys[tied]), axis=1)
        return o
    return lexsort_rows_stable(keys, ids)


def lexsort_rows_stable(keys: Any, ids: Any) -> Any:
    """:func:`lexsort_rows` by two stable sorts, on ids then keys (any array module; CuPy's
    path). Equal (key, id) pairs keep their column order."""
    xp = backend.array_module(keys)
    o1 = xp.argsort(ids, axis=1, kind="stable")
    o2 = xp.argsort(xp.take_along_axis(keys, o1, axis=1), axis=1, kind="stable")
    return xp.take_along_axis(o1, o2, axis=1)


def _pair_keys(Qb: Any, R: Any, ids: Any, metric: str) -> Any:
    """Exact keys of the pairs (query row i, reference row ids[i, j]), (n, m).

    Each pair is computed on its own (differences for euclidean, products for cosine / ip,
    summed along the features), so identical reference rows get identical keys wherever they
    sit, and near-zero euclidean distances carry no cancellation error.
    """
    xp = backend.array_module(ids)
    n, m = ids.shape
    if backend.issparse(R):
        spm = backend.sparse_module(R)
        Qs = Qb if backend.issparse(Qb) else spm.csr_matrix(Qb)
        Qg, Rg = Qs[xp.repeat(xp.arange(n), m)], R[ids.ravel()]
        if metric == "euclidean":
            diff = Qg - Rg
            keys = diff.multiply(diff).sum(axis=1)
        else:
            keys = -Qg.multiply(Rg).sum(axis=1)
        return xp.asarray(keys).reshape(n, m).astype(R.dtype)
    Rg = R[ids]  # (n, m, p)
    Qd = Qb.toarray() if backend.issparse(Qb) else Qb
    if metric == "euclidean":
        diff = Qd[:, None, :] - Rg
        return (diff * diff).sum(axis=2)
    return -(Qd[:, None, :] * Rg).sum(axis=2)


def _rerank_rows(Qb: Any, R: Any, m: int) -> int:
    """Query rows per re-ranking chunk, so that the gathered pairs stay within budget."""
    itemsize = np.dtype(R.dtype).itemsize
    if backend.issparse(Qb) and backend.issparse(R):
        width = 2 * (Qb.nnz / max(Qb.shape[0], 1) + R.nnz / max(R.shape[0], 1)) + 1
        per_row = m * width * (itemsize + 8)
    else:
        per_row = m * R.shape[1] * itemsize * 2
    return max(1, int(_RERANK_BYTES // per_row))


def _rerank(Qb: Any, R: Any, ids: Any, k: int, metric: str) -> tuple[Any, Any]:
    """Distances (n, k) and indices of the k best of the candidate ``ids`` (n, m >= k), sorted
    on (exact key, index)."""
    xp = backend.array_module(ids)
    n, m = ids.shape
    step = _rerank_rows(Qb, R, m)
    keys = xp.concatenate(
        [_pair_keys(Qb[s : s + step], R, ids[s : s + step], metric) for s in range(0, n, step)]
    )
    o = lexsort_rows(keys, ids)[:, :k]
    D = _key_to_distance(xp.take_along_axis(keys, o, axis=1), metric)
    return D, xp.take_along_axis(ids, o, axis=1)


def _finalize(key: Any, ids: Any, metric: str) -> tuple[Any, Any]:
    """Reported distances, re-sorted per row on (distance, index)."""
    xp = backend.array_module(key)
    D = _key_to_distance(key, metric)
    o = lexsort_rows(D, ids)
    return xp.take_along_axis(D, o, axis=1), xp.take_along_axis(ids, o, axis=1)


# ----------------------------------------------------------------------------------------------
# faiss engine (optional)
# ----------------------------------------------------------------------------------------------
def _knn_faiss(Q: Any, R: Any, k: int, metric: str, exclude_self: bool) -> tuple[Any, Any]:
    """Exact search with faiss ``IndexFlatL2`` / ``IndexFlatIP`` on the host (float32, dense).

    Inputs on the GPU or sparse are moved to host / densified. Results follow this module's
    conventions (true euclidean distances, 1 - cos, -q.r), re-sorted on (distance, index); faiss
    breaks ties at the k-th boundary by its own rule.
    """
    try:
        import faiss
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


def _dense_host32(X: Any) -> np.ndarray:
    X = backend.to_host(X)
    X = X.toarray() if backend.issparse(X) else X
    return np.ascontiguousarray(X, dtype=np.float32)


def _drop_self(sim: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 results per row drop the row's own index (or the last one when absent)."""
    n = ids.shape[0]
    drop = ids == np.arange(n)[:, None]
    missing = ~drop.any(axis=1)
    drop[missing, -1] = True
    first = np.argmax(drop, axis=1)  # drop only one entry per row
    drop[:] = False
    drop[np.arange(n), first] = True
    return sim[~drop].reshape(n, k), ids[~drop].reshape(n, k)
