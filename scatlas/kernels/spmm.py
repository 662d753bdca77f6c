"""Sparse x dense products for the first layer of cell encoders on the CPU (embedding).

Expression input is mostly zeros (10x data: ~5-10 % of 28k genes detected per cell), yet
encoders multiply it densely. For a chunk X (n, G) and a first-layer kernel W (G, H), ``X @ W`` is
computed here gene-major: each row of W is touched once per row block while that block's
(rows, H) output stays in cache, so the cost is ``nnz * H`` multiply-adds instead of
``n * G * H``.

With numba (a scanpy dependency) the loops run multi-threaded over row blocks; without it
scipy's CSC product is used (single-threaded). Measured use: ``MetricEncoder.embed`` on the CPU
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



def _csc(X: Any) -> sp.csc_matrix:
    X = sp.csc_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsc()
    return X.astype(np.float32, copy=False)


if numba is not None:

    @numba.njit(inline="always")
    def _first_at_least(indices, lo, hi, row):  # pragma: no cover - compiled
        while lo < hi:
            mid = (lo + hi) // 2
            if indices[mid] < row:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _csc_matmul(indptr, indices, data, W, out, n_parts):  # pragma: no cover - compiled
        G, H = W.shape
        n = out.shape[0]
        for part in numba.prange(n_parts):
            r0 = part * n // n_parts
            r1 = (part + 1) * n // n_parts
            for j in range(G):
                p0 = _first_at_least(indices, indptr[j], indptr[j + 1], r0)
                p = p0
                while p < indptr[j + 1] and indices[p] < r1:
                    i = indices[p]
                    v = data[p]
                    for c in range(H):
                        out[i, c] += v * W[j, c]
                    p += 1



def sparse_matmul(X: Any, W: np.ndarray) -> np.ndarray:
    """``X @ W`` for a mostly-zero X (n, G) (dense or scipy sparse) and dense W (G, H); float32."""
    Xc = _csc(X)
    W = np.ascontiguousarray(W, dtype=np.float32)
    if numba is None:
        return np.asarray(Xc @ W, dtype=np.float32)
    out = np.zeros((Xc.shape[0], W.shape[1]), dtype=np.float32)
    Xc.sort_indices()
    n_parts = max(1, min(Xc.shape[0], 4 * numba.get_num_threads()))
    _csc_matmul(Xc.indptr, Xc.indices, Xc.data, W, out, n_parts)
    return out


# ---------------------------------------------------------------------- dense input, zeros skipped
# Dense chunks would cost about as much to convert to CSC as the product saves, so this kernel
# reads the dense rows once and skips their zeros (a W row stays in cache while one gene is
# processed).

if numba is not None:

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _dense_skip_matmul(X, W, out, n_parts):  # pragma: no cover - compiled
        n, G = X.shape
        H = W.shape[1]
        for part in numba.prange(n_parts):
            r0 = part * n // n_parts
            r1 = (part + 1) * n // n_parts
            for j in range(G):
                for i in range(r0, r1):
                    v = X[i, j]
                    if v != 0.0:
                        for c in range(H):
                            out[i, c] += v * W[j, c]



def dense_skip_matmul(X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``X @ W`` for a dense but mostly-zero X (n, G), skipping its zeros; float32 (n, H)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    W = np.ascontiguousarray(W, dtype=np.float32)
    if numba is None:
        return sparse_matmul(X, W)
    out = np.zeros((X.shape[0], W.shape[1]), dtype=np.float32)
    _dense_skip_matmul(X, W, out, max(1, min(X.shape[0], 4 * numba.get_num_threads())))
    return out

