"""Sparse x dense products for the first layer of cell encoders on the CPU (embedding).

Expression input is mostly zeros (10x data: ~5-10 % of 28k genes detected per cell), yet
encoders multiply it densely. For a chunk X (n, G) and a first-layer kernel W (G, H), ``X @ W`` is
computed here over the non-zeros only, ``nnz * H`` multiply-adds instead of ``n * G * H``.
While W fits the last-level cache (``ROW_MAJOR_MAX_BYTES``), each cell's output row sums four
scaled W rows a pass (the kernel of ``X.T @ D`` below). A larger W (28,231 genes: 115 MB) is
walked in gene chunks of ``GENES_PER_CHUNK`` (256 W rows = the 1 MiB L2) inside blocks of
``rows_per_block`` cells (blocks in parallel): each cell's output row stays in L1 while it sums
its non-zeros of the chunk, four W rows a pass (10,000 cells at 10 % non-zero: 0.96 s vs
1.44 s for the previous row-blocked gene-major axpy, which loaded and stored an output row from
L2 per non-zero). That gene-major kernel (``_csr_matmul``) stays for the training step's custom
call, whose dropped-out inputs are explicit zeros it skips (:mod:`scatlas.models.xla_ffi`).

``X.T @ D`` (the first layer's weight gradient in the sparse training step) is
computed gene-major: the non-zeros are regrouped by gene (a counting sort that drops explicit
zeros, e.g. dropped-out inputs) and each gene's output row sums four scaled rows of D per pass
(fewer loads and stores of the output row; 0.13 s vs scipy's 1.45 s for a 1,000 x 28,231
batch at 10 % non-zero and D of 1,024 columns, 2-core Zen 4).

Figures: ``python -m bench.metric_parts`` (bench/results/metric_parts_cpu.md).

With numba (a scanpy dependency) the loops are compiled and multi-threaded; without it scipy's
sparse product is used (single-threaded). Measured use: ``MetricEncoder.embed`` on the CPU
(``python -m bench.metric --genes 2000,28231``: bench/results/metric_cpu.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from ..exceptions import ScatlasInputError

try:  # numba ships with scanpy; fall back to scipy when it is missing
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

ROWS_PER_BLOCK = 256
#: genes per chunk of the large-W kernel: 256 rows of a 1,024-wide W are the 1 MiB L2
GENES_PER_CHUNK = 256
#: up to this size W is read row by row for each cell (it stays in the L3 cache: 2,000 genes x
#: 1,024 is 8 MiB; 10,000 cells at 10 % non-zero took 0.069 s vs 0.102 s row-blocked); larger
#: W (28,231 genes: 115 MB) goes through the gene chunks
ROW_MAJOR_MAX_BYTES = 16 * 2**20


if numba is not None:

    @numba.njit(inline="always", fastmath=True)
    def _gene_major_axpy(r0, rows, vals, starts, W, out):  # pragma: no cover - compiled
        """out[r0 + rows[q]] += vals[q] * W[j] for the block's non-zeros of each gene j."""
        for j in range(W.shape[0]):
            if starts[j] == starts[j + 1]:
                continue
            w = W[j]
            for q in range(starts[j], starts[j + 1]):
                acc = out[r0 + rows[q]]
                v = vals[q]
                for c in range(w.shape[0]):
                    acc[c] += v * w[c]

    @numba.njit(inline="always")
    def _prefix_sum(counts):  # pragma: no cover - compiled
        for j in range(counts.shape[0] - 1):
            counts[j + 1] += counts[j]

    @numba.njit(cache=True)
    def _gene_major(indptr, indices, data, n_cols):  # pragma: no cover - compiled
        """(starts, rows, vals): the non-zeros of a CSR matrix regrouped by column (CSC)."""
        n = indptr.shape[0] - 1
        starts = np.zeros(n_cols + 1, np.int64)
        for p in range(indptr[n]):
            if data[p] != 0:
                starts[indices[p] + 1] += 1
        _prefix_sum(starts)
        fill = starts[:n_cols].copy()
        rows = np.empty(starts[n_cols], np.int32)
        vals = np.empty(starts[n_cols], np.float32)
        for i in range(n):
            for p in range(indptr[i], indptr[i + 1]):
                if data[p] != 0:
                    q = fill[indices[p]]
                    rows[q] = i
                    vals[q] = data[p]
                    fill[indices[p]] = q + 1
        return starts, rows, vals

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _csr_matmul(indptr, indices, data, W, out, block):  # pragma: no cover - compiled
        """out = X @ W, row blocks in parallel, each block's non-zeros regrouped by gene and
        each W row added to the block's output rows of the cells expressing the gene."""
        n = out.shape[0]
        for b in numba.prange((n + block - 1) // block):
            r0 = b * block
            r1 = min(n, r0 + block)
            p0, p1 = indptr[r0], indptr[r1]
            starts, rows, vals = _gene_major(indptr[r0: r1 + 1] - p0, indices[p0:p1],
                                             data[p0:p1], W.shape[0])
            out[r0:r1] = 0
            _gene_major_axpy(r0, rows, vals, starts, W, out)

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _sum_scaled_rows(starts, rows, vals, D, out):  # pragma: no cover - compiled
        """out[j] = sum_q vals[q] * D[rows[q]] for q in starts[j]:starts[j + 1], four rows of D
        a pass: a CSR product ``X @ D`` (starts, rows, vals = indptr, indices, data), or
        ``X.T @ D`` given X regrouped column-major."""
        K = out.shape[1]
        for j in numba.prange(out.shape[0]):
            o = out[j]
            o[:] = 0
            q, end = starts[j], starts[j + 1]
            while q + 4 <= end:
                v0, v1, v2, v3 = vals[q], vals[q + 1], vals[q + 2], vals[q + 3]
                d0, d1, d2, d3 = D[rows[q]], D[rows[q + 1]], D[rows[q + 2]], D[rows[q + 3]]
                for c in range(K):
                    o[c] += v0 * d0[c] + v1 * d1[c] + v2 * d2[c] + v3 * d3[c]
                q += 4
            while q < end:
                v, d = vals[q], D[rows[q]]
                for c in range(K):
                    o[c] += v * d[c]
                q += 1

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _csr_matmul_gene_chunks(indptr, indices, data, W, out, block, chunk):  # pragma: no cover
        """out = X @ W for a CSR X with sorted column indices per row: row blocks in parallel;
        inside a block the genes are walked in chunks of ``chunk`` (256 x 1,024 float32 = the
        1 MiB L2), and each cell's output row (in L1) sums its chunk's W rows four a pass."""
        n, G, K = out.shape[0], W.shape[0], W.shape[1]
        for b in numba.prange((n + block - 1) // block):
            r0 = b * block
            r1 = min(n, r0 + block)
            ptr = indptr[r0:r1].copy()
            out[r0:r1] = 0
            for g1 in range(chunk, G + chunk, chunk):
                for r in range(r0, r1):
                    q, end = ptr[r - r0], indptr[r + 1]
                    o = out[r]
                    while q + 4 <= end and indices[q + 3] < g1:
                        v0, v1, v2, v3 = data[q], data[q + 1], data[q + 2], data[q + 3]
                        d0, d1 = W[indices[q]], W[indices[q + 1]]
                        d2, d3 = W[indices[q + 2]], W[indices[q + 3]]
                        for c in range(K):
                            o[c] += v0 * d0[c] + v1 * d1[c] + v2 * d2[c] + v3 * d3[c]
                        q += 4
                    while q < end and indices[q] < g1:
                        v, d = data[q], W[indices[q]]
                        for c in range(K):
                            o[c] += v * d[c]
                        q += 1
                    ptr[r - r0] = q

    @numba.njit(parallel=True, cache=True)
    def _dense_to_csr(X):  # pragma: no cover - compiled
        """(indptr, indices, data) of the non-zeros of a dense row-major X (rows in parallel)."""
        n, G = X.shape
        counts = np.zeros(n + 1, np.int64)
        for i in numba.prange(n):
            c = 0
            for j in range(G):
                if X[i, j] != 0:
                    c += 1
            counts[i + 1] = c
        _prefix_sum(counts)
        indices = np.empty(counts[n], np.int32)
        data = np.empty(counts[n], np.float32)
        for i in numba.prange(n):
            q = counts[i]
            for j in range(G):
                if X[i, j] != 0:
                    indices[q] = j
                    data[q] = X[i, j]
                    q += 1
        return counts, indices, data

    @numba.njit(parallel=True, cache=True)
    def _csr_to_dense(indptr, indices, data, out):  # pragma: no cover - compiled
        """out (n, G) = the CSR matrix, rows in parallel (duplicate entries summed, column
        indices outside [0, G) ignored)."""
        G = out.shape[1]
        for i in numba.prange(out.shape[0]):
            o = out[i]
            o[:] = 0
            for p in range(indptr[i], indptr[i + 1]):
                j = indices[p]
                if 0 <= j < G:
                    o[j] += data[p]

    @numba.njit(cache=True)
    def _csr_t_matmul(indptr, indices, data, D, out):  # pragma: no cover - compiled
        starts, rows, vals = _gene_major(indptr, indices, data, out.shape[0])
        _sum_scaled_rows(starts, rows, vals, D, out)


class CSRArrays(NamedTuple):
    """A matrix's non-zeros in CSR form for the kernels here: ``indptr`` int64 (n + 1),
    ``indices`` int32 and ``data`` float32 (nnz), column indices sorted within each row."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]


def csr_arrays(X: Any) -> CSRArrays:
    """The non-zeros of a scipy sparse or dense (mostly zero) X (n, G), as :class:`CSRArrays`
    (a dense X is scanned in parallel; a sparse one is sorted if needed)."""
    if X.ndim != 2:
        raise ScatlasInputError(f"X must be 2-D, got shape {X.shape}")
    if not sp.issparse(X):
        X = np.ascontiguousarray(X, dtype=np.float32)
        if numba is not None:
            return CSRArrays(*_dense_to_csr(X), X.shape)
    Xr = sp.csr_matrix(X)
    if not Xr.has_sorted_indices:
        Xr = Xr.sorted_indices()
    return CSRArrays(Xr.indptr.astype(np.int64, copy=False),
                     Xr.indices.astype(np.int32, copy=False),
                     np.asarray(Xr.data, dtype=np.float32), Xr.shape)


def matmul_rows(A: CSRArrays, W: np.ndarray, start: int = 0, stop: int | None = None, *,
                out: np.ndarray | None = None,
                rows_per_block: int = ROWS_PER_BLOCK) -> np.ndarray:
    """Rows ``start:stop`` of ``A @ W`` for W (G, H): float32 (stop - start, H), written into
    ``out`` when given (C-contiguous float32 of that shape)."""
    stop = A.shape[0] if stop is None else stop
    if W.ndim != 2 or A.shape[1] != W.shape[0]:
        raise ScatlasInputError(f"cannot multiply {A.shape} by {W.shape}")
    W = np.ascontiguousarray(W, dtype=np.float32)
    if out is None:
        out = np.empty((stop - start, W.shape[1]), dtype=np.float32)
    p0, p1 = A.indptr[start], A.indptr[stop]
    indptr, indices, data = A.indptr[start: stop + 1] - p0, A.indices[p0:p1], A.data[p0:p1]
    if numba is None:
        shape = (stop - start, A.shape[1])
        out[:] = sp.csr_matrix((data, indices, indptr), shape=shape) @ W
    elif W.nbytes <= ROW_MAJOR_MAX_BYTES:
        _sum_scaled_rows(indptr, indices, data, W, out)
    else:
        _csr_matmul_gene_chunks(indptr, indices, data, W, out, rows_per_block, GENES_PER_CHUNK)
    return out


def sparse_matmul(X: Any, W: np.ndarray, *, rows_per_block: int = ROWS_PER_BLOCK) -> np.ndarray:
    """``X @ W`` for a scipy sparse or dense (mostly zero) X (n, G) and dense W (G, H), over
    X's non-zeros: float32 (n, H)."""
    return matmul_rows(csr_arrays(X), W, rows_per_block=rows_per_block)


def sparse_t_matmul(X: Any, D: np.ndarray) -> np.ndarray:
    """``X.T @ D`` for a scipy sparse X (n, G) and dense D (n, K): float32 (G, K)."""
    if not sp.issparse(X):
        raise TypeError(f"X must be a scipy sparse matrix, got {type(X).__name__}")
    if X.ndim != 2 or D.ndim != 2 or X.shape[0] != D.shape[0]:
        raise ScatlasInputError(f"cannot multiply the transpose of {X.shape} by {D.shape}")
    D = np.ascontiguousarray(D, dtype=np.float32)
    Xr = sp.csr_matrix(X)
    if numba is None:
        return np.asarray(Xr.T @ D, dtype=np.float32)
    out = np.empty((Xr.shape[1], D.shape[1]), dtype=np.float32)
    _csr_t_matmul(Xr.indptr.astype(np.int64, copy=False), Xr.indices,
                  np.asarray(Xr.data, dtype=np.float32), D, out)
    return out
