"""Sparse x dense products for the first layer of cell encoders on the CPU (embedding).

Expression input is mostly zeros (10x data: ~5-10 % of 28k genes detected per cell), yet
encoders multiply it densely. For a chunk X (n, G) and a first-layer kernel W (G, H), ``X @ W`` is
computed here over the non-zeros only, ``nnz * H`` multiply-adds instead of ``n * G * H``:

- the rows are cut into blocks of ``rows_per_block`` (256: the block's (256, H) output stays in
  the 1 MiB L2 cache of a core for H = 1024); blocks run in parallel;
- inside a block the non-zeros are regrouped gene-major (a counting sort, read row by row, so a
  dense row-major X is scanned contiguously); each W row is then read once per block and added
  to the output rows of the cells that express that gene (a vectorised axpy).

With numba (a scanpy dependency) the loops are compiled and multi-threaded; without it scipy's
sparse product is used (single-threaded). Measured use: ``MetricEncoder.embed`` on the CPU
(``python -m bench.metric --genes 2000,28231``: bench/results/metric_cpu.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

try:  # numba ships with scanpy; fall back to scipy when it is missing
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

ROWS_PER_BLOCK = 256


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

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _csr_matmul(indptr, indices, data, W, out, block):  # pragma: no cover - compiled
        n, G = out.shape[0], W.shape[0]
        for b in numba.prange((n + block - 1) // block):
            r0 = b * block
            r1 = min(n, r0 + block)
            starts = np.zeros(G + 1, np.int64)
            for p in range(indptr[r0], indptr[r1]):
                starts[indices[p] + 1] += 1
            _prefix_sum(starts)
            fill = starts[:G].copy()
            rows = np.empty(starts[G], np.int32)
            vals = np.empty(starts[G], np.float32)
            for i in range(r0, r1):
                for p in range(indptr[i], indptr[i + 1]):
                    q = fill[indices[p]]
                    rows[q] = i - r0
                    vals[q] = data[p]
                    fill[indices[p]] = q + 1
            out[r0:r1] = 0
            _gene_major_axpy(r0, rows, vals, starts, W, out)

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _dense_matmul(X, W, out, block):  # pragma: no cover - compiled
        n, G = X.shape
        for b in numba.prange((n + block - 1) // block):
            r0 = b * block
            r1 = min(n, r0 + block)
            starts = np.zeros(G + 1, np.int64)
            for i in range(r0, r1):
                x = X[i]
                for j in range(G):
                    if x[j] != 0:
                        starts[j + 1] += 1
            _prefix_sum(starts)
            fill = starts[:G].copy()
            rows = np.empty(starts[G], np.int32)
            vals = np.empty(starts[G], np.float32)
            for i in range(r0, r1):
                x = X[i]
                for j in range(G):
                    if x[j] != 0:
                        q = fill[j]
                        rows[q] = i - r0
                        vals[q] = x[j]
                        fill[j] = q + 1
            out[r0:r1] = 0
            _gene_major_axpy(r0, rows, vals, starts, W, out)


def _check_shapes(X: Any, W: np.ndarray) -> None:
    if X.ndim != 2 or W.ndim != 2 or X.shape[1] != W.shape[0]:
        raise ValueError(f"cannot multiply {X.shape} by {W.shape}")


def sparse_matmul(X: Any, W: np.ndarray, *, rows_per_block: int = ROWS_PER_BLOCK) -> np.ndarray:
    """``X @ W`` for a scipy sparse (or dense) X (n, G) and dense W (G, H): float32 (n, H)."""
    if not sp.issparse(X):
        return dense_skip_matmul(X, W, rows_per_block=rows_per_block)
    _check_shapes(X, W)
    W = np.ascontiguousarray(W, dtype=np.float32)
    Xr = sp.csr_matrix(X)
    if numba is None:
        return np.asarray(Xr @ W, dtype=np.float32)
    out = np.empty((Xr.shape[0], W.shape[1]), dtype=np.float32)
    data = np.asarray(Xr.data, dtype=np.float32)
    _csr_matmul(Xr.indptr.astype(np.int64, copy=False), Xr.indices, data, W, out,
                rows_per_block)
    return out


def dense_skip_matmul(
    X: np.ndarray, W: np.ndarray, *, rows_per_block: int = ROWS_PER_BLOCK
) -> np.ndarray:
    """``X @ W`` for a dense but mostly-zero X (n, G), skipping its zeros; float32 (n, H)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    _check_shapes(X, W)
    W = np.ascontiguousarray(W, dtype=np.float32)
    if numba is None:
        return np.asarray(sp.csr_matrix(X) @ W, dtype=np.float32)
    out = np.empty((X.shape[0], W.shape[1]), dtype=np.float32)
    _dense_matmul(X, W, out, rows_per_block)
    return out
