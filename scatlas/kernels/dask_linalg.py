"""PCA of a Dask array, computed block by block on any Dask scheduler (threads, a
``distributed.LocalCluster`` with several worker processes, or a remote cluster).

:func:`pca` is what :func:`scatlas.kernels.pca` (and so ``scatlas.tl.pca``) runs when ``X`` is a
``dask.array.Array`` (row blocks of NumPy or ``scipy.sparse`` chunks, as
``anndata.experimental.read_elem_lazy`` gives for zarr and h5ad stores). Nothing but the small
(p, p) / (p, l) summaries ever reaches the driver; the (n, k) scores stay a lazy Dask array.

Routes
------
- ``'gram'`` (exact; the default for p <= 8192, as in :func:`scatlas.kernels.linalg.choose_method`
  and rapids-singlecell's Dask PCA): every row block gives its count, column means and centred
  cross-product matrix ``M2 = (X_b - 1 m_b^T)^T (X_b - 1 m_b^T)`` in float64, and these are merged
  by a tree reduction (``split_every`` blocks per node) with the pairwise update of Chan, Golub &
  LeVeque (1979), "Updating formulae and a pairwise algorithm for computing sample variances":
  ``M2 = M2_a + M2_b + (n_a n_b / n) d d^T``, ``d = m_b - m_a``. Centring per block, rather than
  subtracting ``n m m^T`` from the raw Gram at the end, keeps the float64 result exact to
  round-off for count data with large means. Then the top-k ``eigh`` of the (p, p) matrix
  (:func:`scatlas.kernels.linalg.top_eigh`).
- ``'randomized'``: Halko, Martinsson & Tropp (2011) Alg. 4.4, as
  :func:`scatlas.kernels.linalg.svd_randomized`, with every product blockwise: ``A Omega`` by
  ``map_blocks``, ``A^T Q`` as a tree sum of per-block ``X_b^T Q_b``, and the tall-skinny
  orthonormalisation by CholeskyQR2 whose Gram ``Q^T Q`` is again a tree sum (centring implicit,
  ``A = X - 1 m^T``).

Threads: every block task runs under :func:`scatlas.backend.serial_blas`, so a worker thread's
BLAS never spawns threads of its own (``distributed``'s nannies also start workers with
``OMP_NUM_THREADS=1`` etc., its ``distributed.nanny.pre-spawn-environ`` default). Dense
sub-blocks are at most :data:`SUB_BLOCK_BYTES` in float64, so a task's memory is bounded by its
chunk plus about 2 (p, p) float64 matrices.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from .. import backend
from .._validate import ScatlasInputError, check_positive_int
from .linalg import (
    GRAM_MAX_FEATURES,
    PCAResult,
    orthonormalize,
    resolve_n_iter,
    svd_flip_rows,
    top_eigh,
)

__all__ = ["is_dask_array", "pca"]

#: float64 bytes of one dense sub-block of a row chunk (densified sparse rows or cast dense ones)
SUB_BLOCK_BYTES = 64 * 2**20
#: blocks merged per node of the tree reductions
SPLIT_EVERY = 8


def is_dask_array(X: Any) -> bool:
    """True for a ``dask.array.Array`` (without importing Dask when it was never loaded)."""
    if "dask.array" not in sys.modules:
        return False
    import dask.array as da

    return isinstance(X, da.Array)


# ----------------------------------------------------------------------------------------------
# block tasks (run on the workers)
# ----------------------------------------------------------------------------------------------
def _dense_rows(x: Any, lo: int, hi: int) -> np.ndarray:
    sub = x[lo:hi]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    return sub.astype(np.float64, copy=False)


def _sub_rows(p: int) -> int:
    return max(1, SUB_BLOCK_BYTES // (8 * max(p, 1)))


Moments = tuple[int, np.ndarray, np.ndarray]  # (n, mean (p,), centred M2 (p, p) or (p,))


def _merge_pair(a: Moments, b: Moments) -> Moments:
    na, ma, Ma = a
    nb, mb, Mb = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    d = mb - ma
    w = na * nb / n
    M = Ma + Mb + (w * np.outer(d, d) if Ma.ndim == 2 else w * d * d)
    return n, ma + d * (nb / n), M


def _merge(parts: Sequence[Moments]) -> Moments:
    out = parts[0]
    for part in parts[1:]:
        out = _merge_pair(out, part)
    return out


@backend.serial_blas_task
def _block_moments(x: Any, full: bool) -> Moments:
    """(rows, column means, centred cross products) of one row chunk, float64; ``full``: the
    (p, p) matrix, else only its diagonal (the column sums of squares)."""
    n, p = x.shape
    acc: Moments = (0, np.zeros(p), np.zeros((p, p)) if full else np.zeros(p))
    step = _sub_rows(p)
    for lo in range(0, n, step):
        d = _dense_rows(x, lo, min(n, lo + step))
        m = d.mean(axis=0)
        d -= m
        M = d.T @ d if full else np.einsum("ij,ij->j", d, d)
        acc = _merge_pair(acc, (d.shape[0], m, M))
    return acc


@backend.serial_blas_task
def _block_project(x: Any, V: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
    """(x - 1 shift^T) V for one row chunk, in V's dtype."""
    out = np.asarray(x @ V) if sp.issparse(x) else np.asarray(x, dtype=V.dtype) @ V
    out = out.astype(V.dtype, copy=False)
    if shift is not None:
        out -= shift @ V
    return out


@backend.serial_blas_task
def _block_rproject(x: Any, Q: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
    """(x - 1 shift^T)^T Q for one row chunk: (p, l) float64."""
    Q = np.asarray(Q, dtype=np.float64)
    out = np.asarray(x.T @ Q) if sp.issparse(x) else np.asarray(x, dtype=np.float64).T @ Q
    if shift is not None:
        out = out - np.outer(shift, Q.sum(axis=0))
    return out


@backend.serial_blas_task
def _block_gram(Q: np.ndarray) -> np.ndarray:
    Q = np.asarray(Q, dtype=np.float64)
    return Q.T @ Q


def _sum(parts: Sequence[np.ndarray]) -> np.ndarray:
    out = parts[0].copy()
    for part in parts[1:]:
        out += part
    return out


# ----------------------------------------------------------------------------------------------
# graph helpers (run on the driver)
# ----------------------------------------------------------------------------------------------
def _tree(parts: list[Any], combine: Callable[[Sequence[Any]], Any]) -> Any:
    """A Dask tree reduction of delayed ``parts`` with ``combine`` on ``SPLIT_EVERY`` at a time."""
    from dask import delayed

    while len(parts) > 1:
        parts = [delayed(combine, pure=True)(parts[i:i + SPLIT_EVERY])
                 for i in range(0, len(parts), SPLIT_EVERY)]
    return parts[0]


def _row_blocks(X: Any) -> list[Any]:
    return list(X.to_delayed().ravel())


def _compute(*objs: Any) -> tuple[Any, ...]:
    import dask

    return dask.compute(*objs)


def _moments(X: Any, full: bool) -> Moments:
    from dask import delayed

    task = delayed(_block_moments, pure=True)
    return _compute(_tree([task(b, full) for b in _row_blocks(X)], _merge))[0]


def _project(X: Any, V: np.ndarray, shift: np.ndarray | None) -> Any:
    """The lazy (n, k) Dask array (X - 1 shift^T) V, chunked as X's rows."""
    return X.map_blocks(_block_project, V, shift, dtype=V.dtype,
                        chunks=(X.chunks[0], (V.shape[1],)),
                        meta=np.empty((0, 0), dtype=V.dtype))


def _rproject(X: Any, Q: Any, shift: np.ndarray | None) -> np.ndarray:
    """(X - 1 shift^T)^T Q (p, l) float64 on the driver, Q a Dask array chunked as X's rows."""
    from dask import delayed

    task = delayed(_block_rproject, pure=True)
    parts = [task(x, q, shift) for x, q in
             zip(_row_blocks(X), _row_blocks(Q), strict=True)]
    return _compute(_tree(parts, _sum))[0]


def _orthonormalize(Y: Any) -> Any:
    """CholeskyQR2 of a tall Dask array (n, l): Q = Y R^-1 twice, R from the tree-summed Gram;
    the factor is checked as :func:`scatlas.kernels.linalg.orthonormalize` checks it, and a
    failed pass falls back to Dask's TSQR."""
    import dask.array as da
    from dask import delayed

    task = delayed(_block_gram, pure=True)
    for _ in range(2):
        G = _compute(_tree([task(q) for q in _row_blocks(Y)], _sum))[0]
        try:
            L = np.linalg.cholesky(G)
        except np.linalg.LinAlgError:
            L = None
        if L is None or not np.all(np.isfinite(L)):
            Q, _ = da.linalg.tsqr(Y.rechunk({1: -1}))
            return Q.persist()
        Rinv = np.linalg.inv(L.T).astype(Y.dtype)
        Y = Y.map_blocks(lambda q, R=Rinv: q @ R, dtype=Y.dtype).persist()
    return Y


# ----------------------------------------------------------------------------------------------
# PCA
# ----------------------------------------------------------------------------------------------
def _as_row_chunked(X: Any) -> Any:
    if X.ndim != 2:
        raise ScatlasInputError(f"X must be 2-D, got a Dask array of shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ScatlasInputError(f"X must be real numeric, got dtype {X.dtype}")
    if any(np.isnan(c) for c in X.chunks[0]):
        raise ScatlasInputError("X has unknown row chunk sizes; call X.compute_chunk_sizes()")
    return X.rechunk({1: -1}) if len(X.chunks[1]) > 1 else X


def pca(
    X: Any,
    n_components: int = 50,
    *,
    center: bool = True,
    seed: int = 0,
    n_oversamples: int = 10,
    n_iter: int | str = "auto",
    method: str = "auto",
    dtype: Any = None,
    progress: bool | None = None,
) -> PCAResult:
    """PCA of an (n, p) Dask array, blockwise; same arguments and result as
    :func:`scatlas.kernels.pca` (``device`` is not taken: chunks are computed where they live).

    ``X``: row blocks of ``numpy`` or ``scipy.sparse`` chunks (columns are rechunked to one
    block), any real dtype; never densified beyond sub-blocks of :data:`SUB_BLOCK_BYTES`.
    Returns a :class:`~scatlas.kernels.linalg.PCAResult` whose ``scores`` is a lazy (n, k)
    Dask array of ``dtype`` (float32 by default), chunked as ``X``'s rows, and whose other
    fields are NumPy arrays; ``method`` is ``'gram'`` (exact, taken for p <= 8192 under
    ``'auto'``) or ``'randomized'``. Explained variance is ``S^2 / (n - 1)``, its ratio over the
    total variance (the trace of the centred Gram, summed blockwise in float64).

    Driver memory: two (p, p) float64 matrices (Gram route) or (p, l) ones (randomized);
    each task holds its chunk, a dense float64 sub-block and one (p, p) float64 partial sum.
    """
    X = _as_row_chunked(X)
    n, p = (int(s) for s in X.shape)
    k = check_positive_int(n_components, "n_components", upper=min(n, p),
                           what=f"min(n_cells, n_features) of {(n, p)}")
    if n < 2:
        raise ScatlasInputError("pca needs at least 2 cells")
    if method not in ("auto", "gram", "randomized"):
        raise ScatlasInputError(
            f"method must be 'auto', 'randomized' or 'gram', got {method!r}", param="method")
    dt = backend.resolve_dtype(dtype)
    chosen = method if method != "auto" else ("gram" if p <= GRAM_MAX_FEATURES
                                              else "randomized")
    if chosen == "gram":
        _, mean, M2 = _moments(X, full=True)
        G = M2 if center else M2 + n * np.outer(mean, mean)
        total = float(np.trace(G))
        evals, V = top_eigh(G, k)
        S = np.sqrt(evals)
        Vt = V.T
    else:
        _, mean, m2 = _moments(X, full=False)
        total = float(m2.sum() if center else m2.sum() + n * mean @ mean)
        S, Vt = _randomized(X, k, mean if center else None, n_oversamples,
                            resolve_n_iter(n_iter, k, (n, p)), seed, dt)
    _, Vt = svd_flip_rows(np.zeros((1, k)), Vt)
    if not center:
        mean = np.zeros(p)
    components = Vt.astype(dt)
    ev = S.astype(np.float64) ** 2 / (n - 1)
    ratio = ev / (total / (n - 1)) if total > 0 else ev * 0
    scores = _project(X, components.T.copy(), mean.astype(dt) if center else None)
    return PCAResult(scores=scores, components=components,
                     explained_variance=ev.astype(dt), explained_variance_ratio=ratio.astype(dt),
                     singular_values=S.astype(dt), mean=mean.astype(dt), method=chosen)


def _randomized(X: Any, k: int, shift: np.ndarray | None, n_oversamples: int, n_iter: int,
                seed: int, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(S (k,), Vt (k, p)) of HMT subspace iteration on ``X - 1 shift^T``, blockwise."""
    n, p = X.shape
    ell = min(k + n_oversamples, n, p)
    omega = np.random.default_rng(seed).standard_normal((p, ell)).astype(dt)
    Q = _orthonormalize(_project(X, omega, shift))
    for _ in range(n_iter):
        Z = orthonormalize(_rproject(X, Q, shift).astype(dt))
        Q = _orthonormalize(_project(X, Z, shift))
    Bt = _rproject(X, Q, shift)  # (p, ell) = (Q^T A)^T
    with backend.serial_blas():
        _, S, Vt = np.linalg.svd(Bt.T, full_matrices=False)
    return S[:k], Vt[:k]
