"""An implicitly shifted and scaled matrix, applied without densifying it.

``ShiftedOperator`` represents

    A = diag(r) @ (X - a 1^T - 1 b^T)            (n x p)

for a data matrix X (dense or sparse, CPU or GPU), a per-row shift ``a`` (n,), a per-column
shift ``b`` (p,) and a per-row scale ``r`` (n,). PCA's mean-centring is ``b = column means``;
Seurat's per-cell standardisation is ``a = cell means``, ``r = 1 / cell sd``. Products with A
cost one product with X plus rank-one corrections, so a sparse X is never densified (the
"implicit centring" of fbpca / rapids-singlecell).

On the CPU, products of a large scipy CSR matrix are split into row blocks and run on a thread
pool: SciPy's sparse kernels release the GIL, so this uses every core (measured 1.8x on 2 cores
for 1e5 x 2000 at 10% density, 60 columns). The pool has :func:`scatlas.backend.cpu_threads`
workers (the user's BLAS thread budget) and runs under :func:`scatlas.backend.serial_blas`, so
OpenBLAS's own threads never compete with it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .. import _progress, backend

# Below this many stored values a sparse product is not worth splitting across threads.
_THREAD_MIN_NNZ = 2_000_000
#: Stored entries per block where a sparse matrix's entries are rewritten in float64.
ENTRY_BLOCK = 2**20
#: Bytes of one dense row chunk of :meth:`ShiftedOperator.gram` (256 MiB): the most of a sparse
#: X that is ever dense at once there.
GRAM_CHUNK_BYTES = 2**28


def _n_threads() -> int:
    """Workers of the row-block pool: the CPU thread budget (:func:`backend.cpu_threads`)."""
    return backend.cpu_threads()


def _csr_row_blocks(X, n_blocks: int) -> list[tuple[int, int, Any]]:
    """Zero-copy row blocks of a scipy CSR matrix with roughly equal numbers of non-zeros."""
    import scipy.sparse as sp

    indptr = X.indptr
    targets = np.linspace(0, X.nnz, n_blocks + 1)
    cuts = np.unique(np.searchsorted(indptr, targets, side="left").clip(0, X.shape[0]))
    cuts[0], cuts[-1] = 0, X.shape[0]
    blocks = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        if hi <= lo:
            continue
        s, e = indptr[lo], indptr[hi]
        sub = sp.csr_matrix(
            (X.data[s:e], X.indices[s:e], indptr[lo : hi + 1] - s), shape=(hi - lo, X.shape[1])
        )
        blocks.append((int(lo), int(hi), sub))
    return blocks


def _chunk_rows(p: int, dtype: Any) -> int:
    """Rows of a dense (rows, p) chunk of :data:`GRAM_CHUNK_BYTES` (at least 256)."""
    return max(256, int(GRAM_CHUNK_BYTES // (max(p, 1) * np.dtype(dtype).itemsize)))


class ShiftedOperator:
    """``A = diag(r) (X - a 1^T - 1 b^T)`` with products that never densify X.

    Parameters
    ----------
    X
        (n, p) numpy / scipy.sparse / cupy / cupyx.scipy.sparse matrix, already of the compute
        dtype (float32 or float64).
    row_shift, col_shift, row_scale
        Optional (n,), (p,), (n,) arrays of the same array module and dtype as X.
    """

    def __init__(self, X, *, row_shift=None, col_shift=None, row_scale=None):
        self.X = X
        self.shape = X.shape
        self.dtype = X.dtype
        self.xp = backend.array_module(X)
        self.sparse = backend.issparse(X)
        self.a, self.b, self.r = row_shift, col_shift, row_scale
        self._pool = None
        self._blocks = None
        if self.sparse and not backend.is_gpu_array(X) and X.format == "csr":
            n_threads = _n_threads()
            if n_threads > 1 and X.nnz >= _THREAD_MIN_NNZ:
                self._blocks = _csr_row_blocks(X, n_threads)
                self._pool = ThreadPoolExecutor(max_workers=len(self._blocks))

    # -- raw products with X -------------------------------------------------------------------
    def _x_matmat(self, V):
        if self._blocks is None:
            return self.X @ V
        out = np.empty((self.shape[0], V.shape[1]), dtype=np.result_type(self.dtype, V.dtype))

        @backend.serial_blas_task
        def work(block):
            lo, hi, sub = block
            out[lo:hi] = sub @ V

        with backend.serial_blas():
            list(self._pool.map(work, self._blocks))
        return out

    def _x_rmatmat(self, Q):
        if self._blocks is None:
            return self.X.T @ Q
        with backend.serial_blas():
            parts = list(self._pool.map(
                backend.serial_blas_task(lambda blk: blk[2].T @ Q[blk[0] : blk[1]]),
                self._blocks))
        return sum(parts)

    # -- products with A -----------------------------------------------------------------------
    def matmat(self, V):
        """A @ V for V (p, l) -> (n, l)."""
        Y = self._x_matmat(V)
        if self.a is not None:
            Y = Y - self.a[:, None] * V.sum(axis=0)[None, :]
        if self.b is not None:
            Y = Y - (self.b @ V)[None, :]
        if self.r is not None:
            Y = Y * self.r[:, None]
        return Y

    def rmatmat(self, Q):
        """A^T @ Q for Q (n, l) -> (p, l)."""
        if self.r is not None:
            Q = Q * self.r[:, None]
        Z = self._x_rmatmat(Q)
        if self.a is not None:
            Z = Z - (self.a @ Q)[None, :]
        if self.b is not None:
            Z = Z - self.b[:, None] * Q.sum(axis=0)[None, :]
        return Z

    def dense_rows(self, lo: int, hi: int):
        """Rows lo:hi of A as a dense (hi-lo, p) array (the only place X is densified, by chunk)."""
        chunk = self.X[lo:hi]
        chunk = chunk.toarray() if self.sparse else self.xp.array(chunk, copy=True)
        if self.a is not None:
            chunk -= self.a[lo:hi, None]
        if self.b is not None:
            chunk -= self.b[None, :]
        if self.r is not None:
            chunk *= self.r[lo:hi, None]
        return chunk

    def gram(self, *, chunk_rows: int | None = None, accumulate_dtype=np.float64,
             progress: bool | None = None):
        """A^T A (p, p), accumulated over dense row chunks in ``accumulate_dtype``.

        Each chunk product runs in the compute dtype (BLAS-3); partial sums are added in float64
        so that long accumulations over millions of cells keep their precision.

        Peak memory beyond X: the (p, p) result in ``accumulate_dtype``, one dense (c, p) chunk
        (c = ``chunk_rows``, default :data:`GRAM_CHUNK_BYTES` of rows, at least 256) and its
        (p, p) product in the compute dtype (plus its cast when the dtypes differ).
        """
        n, p = self.shape
        if chunk_rows is None:
            chunk_rows = _chunk_rows(p, self.dtype)
        G = self.xp.zeros((p, p), dtype=accumulate_dtype)
        starts = range(0, n, chunk_rows)
        for lo in _progress.track(starts, desc="Gram matrix", total=len(starts),
                                  progress=progress, unit="chunk"):
            C = self.dense_rows(lo, min(n, lo + chunk_rows))
            with backend.blas_for_flops(2.0 * C.shape[0] * p * p, like=C):
                G += (C.T @ C).astype(accumulate_dtype, copy=False)
            del C  # the next chunk is not allocated while this one is alive
        return G

    def sq_norm_total(self) -> float:
        """||A||_F^2 without densifying (used for explained-variance ratios)."""
        n, p = self.shape
        xp = self.xp
        X = self.X
        if self.a is None and self.r is None:
            if self.sparse:
                ssq = float((X.data.astype(np.float64) ** 2).sum())
                col_sum = xp.asarray(X.sum(axis=0)).ravel().astype(np.float64)
            else:
                ssq = float((X.astype(np.float64) ** 2).sum())
                col_sum = X.sum(axis=0, dtype=np.float64)
            if self.b is None:
                return ssq
            b = self.b.astype(np.float64)
            return float(ssq - 2.0 * (b @ col_sum) + n * (b @ b))
        total = 0.0
        rows = min(4096, _chunk_rows(p, np.float64))
        for lo in range(0, n, rows):
            C = self.dense_rows(lo, min(n, lo + rows)).astype(np.float64)
            total += float((C * C).sum())
            del C
        return total

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ColumnShifted:
    """``S = X - 1 b^T`` for a sparse X and a per-column shift b, never formed densely.

    How :func:`scatlas.kernels.anchors.scale_data` (``implicit=True``) holds Seurat's scaled
    data of a sparse matrix: X are the values clipped at ``mean + clip sd`` and divided by the
    gene's sd (its sparsity pattern unchanged), ``b = mean / sd``; an all-zero (unstored) entry
    of the data is ``-b``. Memory: one CSR of the input's pattern and a (p,) vector, instead of
    the dense (n, p) array.

    Parameters
    ----------
    X
        (n, p) CSR matrix (scipy.sparse or cupyx.scipy.sparse) in the compute dtype, canonical
        (no duplicate entries).
    shift
        (p,) array of the same array module and dtype.
    """

    def __init__(self, X: Any, shift: Any):
        self.X = X
        self.shift = shift
        self.shape = X.shape
        self.dtype = X.dtype
        self.xp = backend.array_module(shift)

    def operator(self, **kwargs: Any) -> ShiftedOperator:
        """The :class:`ShiftedOperator` of S (``row_shift`` / ``row_scale`` may be added)."""
        return ShiftedOperator(self.X, col_shift=self.shift, **kwargs)

    def toarray(self) -> Any:
        """The dense (n, p) S (what this class exists to avoid; for small pieces and tests)."""
        D = self.X.toarray()
        D -= self.shift[None, :]
        return D

    def take_columns(self, cols: Any) -> ColumnShifted:
        """S[:, cols] (cols: integer positions on S's device)."""
        return ColumnShifted(self.X[:, cols].tocsr(), self.shift[cols])

    def astype(self, dtype: Any) -> ColumnShifted:
        if np.dtype(dtype) == self.dtype:
            return self
        return ColumnShifted(self.X.astype(dtype), self.shift.astype(dtype))

    def rmatmat(self, Q: Any) -> Any:
        """S^T Q for Q (n, l) -> (p, l)."""
        return self.X.T @ Q - self.shift[:, None] * Q.sum(axis=0)[None, :]

    def column_moments(self) -> tuple[Any, Any, Any]:
        """Per-column float64 (sum, sum of squares) of X (not S: S's variance is X's) and the
        shift in float64."""
        xp = self.xp
        X = self.X
        s1 = xp.asarray(X.sum(axis=0)).ravel().astype(np.float64)
        s2 = xp.asarray(X.multiply(X).sum(axis=0)).ravel().astype(np.float64)
        return s1, s2, self.shift.astype(np.float64)

    def row_moments(self) -> tuple[Any, Any]:
        """Per-row float64 sums and sums of squares of S (over the p columns), from the stored
        entries, ``sum_j (x_j - b_j)^2 = sum_stored ((x - b)^2 - b^2) + ||b||^2``, in row
        blocks of about :data:`ENTRY_BLOCK` entries (float64 temporaries)."""
        xp = self.xp
        X = self.X
        n = X.shape[0]
        b = self.shift.astype(np.float64)
        row_x = xp.zeros(n, dtype=np.float64)
        row_t = xp.zeros(n, dtype=np.float64)
        indptr = backend.to_host(X.indptr).astype(np.int64)
        cuts = np.unique(np.searchsorted(indptr, np.arange(0, indptr[-1], ENTRY_BLOCK),
                                         side="right") - 1)
        bounds = [*(int(c) for c in cuts if 0 < c < n), n]
        lo = 0
        for hi in bounds:
            s, e = int(indptr[lo]), int(indptr[hi])
            if e > s:
                d = X.data[s:e].astype(np.float64)
                bj = b[X.indices[s:e]]
                t = (d - bj) ** 2 - bj**2
                rows = xp.repeat(xp.arange(lo, hi), xp.asarray(np.diff(indptr[lo:hi + 1])))
                row_x += xp.bincount(rows, weights=d, minlength=n)
                row_t += xp.bincount(rows, weights=t, minlength=n)
            lo = hi
        return row_x - b.sum(), row_t + float((b * b).sum())
