"""Seurat-style CCA, PLS-SVD and ridge-regularised CCA between two cells x genes matrices.

Orientation: genes are the observations and cells the variables, as in Seurat's ``RunCCA``
(../shared/reference/cca_mnn_rsvd.md sections 1.2-1.3):

- ``cca``: each cell is z-scored across the shared genes (sd with n - 1, Seurat's
  ``Standardize``); the canonical vectors are the top singular vectors of the n1 x n2 cross-product
  ``M = X1s X2s^T``; Seurat's sign rule (a column whose entry for the first cell of dataset 1 is
  negative is negated, in both datasets); rows L2-normalised (``L2Dim``) when ``l2_norm=True``.
  This is scikit-learn's ``PLSSVD(scale=True)`` fitted on the genes x cells matrices.
- ``pls``: the same with per-cell centring only (``PLSSVD(scale=False)``): the SVD of the
  cross-covariance.
- ``ridge_cca``: classical CCA with ridge-regularised within-set covariances,
  ``(C11 + lam1 I)^-1/2 C12 (C22 + lam2 I)^-1/2`` (Vinod 1976; CRAN ``CCA::rcc``); lam -> infinity
  gives ``pls``.

None of them forms the n1 x n2 matrix beyond small problems (Seurat always does, and fails to
allocate it at 1.8e5 cells per dataset); for small pairs (n1 n2 <= 1e7) ``method='auto'`` forms
the explicit product (``python -m bench run cca --sizes 1e3``: 0.20 s, as fast as Seurat's
explicit ``svds`` route, where the two p x p Gram factorisations took 0.93 s). That route works
in float64 whatever the compute dtype and treats only singular values below
``10 sqrt(n eps64) sigma_1`` as rank deficiency: real cross-products decay fast (sigma_30 /
sigma_1 ~ 6e-4 between CellBench batches) but are full rank, and every pair of batches in
../shared/data gives k = 20 and 30 vectors whose singular values equal a dense float64 SVD to
1.6e-14 (float64) / 5.6e-8 (float32) relative (``tests/kernels/test_cca.py``).
With SVDs ``A_i = U_i S_i W_i^T`` from the p x p Gram matrices (exact route),
``M = U1 (S1 W1^T W2 S2) U2^T``, so one SVD of a small p x p core gives the answer, and
``U1 = A1 W1 S1^-1`` costs one pass over each dataset. For p > 8192 genes (or
``method='randomized'``) ``cca``/``pls`` run randomized subspace iteration on the implicit operator
``w -> A1 (A2^T w)`` instead, O(p (n1 + n2)) per vector.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend
from .._validate import ScatlasInputError, check_positive_int, check_same_features
from ._operator import ColumnShifted, ShiftedOperator
from .linalg import (
    GRAM_MAX_FEATURES,
    gram_factor,
    prepare_input,
    resolve_n_iter,
    svd_randomized,
    top_eigh,
)


def _per_cell_operator(X, name: str, scale: bool) -> ShiftedOperator:
    """Operator for X with each row centred (and scaled to unit sd, ddof=1) across features."""
    xp = backend.array_module(getattr(X, "shift", X))
    n, p = X.shape
    if p < 2:
        raise ScatlasInputError(f"{name} needs at least 2 shared features, got {p}")
    col_shift = None
    if isinstance(X, ColumnShifted):  # scaled data held implicitly: X.X - 1 shift^T
        row_sum, row_ssq = X.row_moments()
        X, col_shift = X.X, X.shift
    elif backend.issparse(X):
        row_sum = xp.asarray(X.sum(axis=1)).ravel().astype(np.float64)
        row_ssq = xp.asarray(X.multiply(X).sum(axis=1)).ravel().astype(np.float64)
    else:
        row_sum = X.sum(axis=1, dtype=np.float64)
        row_ssq = (X.astype(np.float64) ** 2).sum(axis=1)
    mean = row_sum / p
    var = xp.clip(row_ssq - p * mean**2, 0, None) / (p - 1)
    flat = var <= 1e-12 * xp.maximum(row_ssq / p, 1e-300)
    n_flat = int(xp.count_nonzero(flat))
    if n_flat:
        raise ScatlasInputError(
            f"{name} has {n_flat} cell(s) with zero variance across the {p} shared features "
            "(empty cells?); remove them before CCA"
        )
    scale_vec = (1.0 / xp.sqrt(var)).astype(X.dtype) if scale else None
    return ShiftedOperator(X, row_shift=mean.astype(X.dtype), col_shift=col_shift,
                           row_scale=scale_vec)


class _CrossOperator:
    """The implicit n1 x n2 matrix ``A1 A2^T`` for randomized SVD."""

    def __init__(self, op1: ShiftedOperator, op2: ShiftedOperator):
        self.op1, self.op2 = op1, op2
        self.shape = (op1.shape[0], op2.shape[0])
        self.dtype, self.xp, self.X = op1.dtype, op1.xp, op1.X

    def matmat(self, V):
        return self.op1.matmat(self.op2.rmatmat(V))

    def rmatmat(self, Q):
        return self.op2.matmat(self.op1.rmatmat(Q))


def _cross_svd_exact(op1, op2, k: int, lam: tuple[float, float] | None, progress=None):
    """Top-k left/right canonical vectors via the p x p cores (see module docstring)."""
    xp = op1.xp
    p = op1.shape[1]
    s1, W1 = gram_factor(op1, p, progress)
    s2, W2 = gram_factor(op2, p, progress)
    if lam is None:  # cross-product: core = S1 W1^T W2 S2, vectors U_i = A_i W_i S_i^-1 A
        f1, f2, g1, g2 = s1, s2, 1.0 / s1, 1.0 / s2
    else:  # ridge: whitening by (s^2/(p-1) + lam)^-1/2
        d1 = xp.sqrt(s1**2 / (p - 1) + lam[0])
        d2 = xp.sqrt(s2**2 / (p - 1) + lam[1])
        f1, f2 = s1 / (d1 * np.sqrt(p - 1)), s2 / (d2 * np.sqrt(p - 1))
        g1, g2 = 1.0 / (s1 * d1), 1.0 / (s2 * d2)
    core = (f1[:, None] * (W1.T @ W2)) * f2[None, :]
    Ac, D, Bct = xp.linalg.svd(core, full_matrices=False)
    k_eff = min(k, D.shape[0])
    P1 = (W1 * g1[None, :]) @ Ac[:, :k_eff]
    P2 = (W2 * g2[None, :]) @ Bct[:k_eff].T
    Z1 = op1.matmat(P1.astype(op1.dtype))
    Z2 = op2.matmat(P2.astype(op2.dtype))
    return Z1, Z2, D[:k_eff]


# The explicit route forms M (n1 x n2) and the dense standardised rows: only for small problems,
# where it beats the two p x p Gram factorisations (CellBench-sized pairs).
_EXPLICIT_MAX_CROSS = 10_000_000
_EXPLICIT_MAX_DENSE = 100_000_000


def _explicit_is_small(n1: int, n2: int, p: int) -> bool:
    return n1 * n2 <= _EXPLICIT_MAX_CROSS and (n1 + n2) * p <= _EXPLICIT_MAX_DENSE


def _standardized_rows64(op: ShiftedOperator):
    """The operator's rows, centred (and scaled to unit sd when ``op.r`` is set), in float64.

    Recomputed from the raw rows in float64 rather than taken from the compute-dtype operator:
    in float32 each entry would carry a relative error ~6e-8, which shifts the trailing singular
    values of the cross-product (1e-3 to 1e-4 of the first on real data) by ~1e-4 relative.
    """
    X = op.X
    D = X.toarray() if op.sparse else op.xp.array(X, copy=True)
    D = D.astype(np.float64, copy=False)
    if op.b is not None:  # a ColumnShifted input (scaled data held implicitly)
        D -= op.b.astype(np.float64)[None, :]
    D -= D.mean(axis=1, keepdims=True)
    if op.r is not None:
        D /= op.xp.sqrt((D * D).sum(axis=1, keepdims=True) / (D.shape[1] - 1))
    return D


def _cross_svd_explicit(op1, op2, k: int):
    """Top-k singular triplets of M = A1 A2^T formed explicitly in float64 (Seurat's route).

    The top-k eigenvectors E of the smaller of M M^T / M^T M (LAPACK ``syevr`` subset) give the
    subspace; a Rayleigh-Ritz step, the SVD of the small k x n matrix E^T M, then gives the
    singular values and both sets of vectors from M itself, so no singular value is taken as the
    square root of a (squared, hence relatively imprecise) eigenvalue. Eigenvalues of M M^T carry
    an absolute error ~ n eps64 sigma_1^2, so a direction of the null space of M gets a Ritz value
    up to ~ sqrt(n eps64) sigma_1; only values below ``10 sqrt(n eps64) sigma_1`` (~1e-6 sigma_1
    for n = 3000) are rank deficiency. Real cross-products decay fast but stay far above that
    (sigma_30 / sigma_1 ~ 6e-4 on CellBench), which the former cut-off ``10 sqrt(eps32) sigma_1``
    (3.5e-3) wrongly truncated.
    """
    xp = op1.xp
    n1, n2 = op1.shape[0], op2.shape[0]
    p = op1.shape[1]
    with backend.blas_for_flops(2.0 * n1 * n2 * max(p, min(n1, n2)), like=op1.X):
        M = _standardized_rows64(op1) @ _standardized_rows64(op2).T
        small_left = n1 <= n2
        Ms = M if small_left else M.T  # (small, large)
        MMt = Ms @ Ms.T
    _, E = top_eigh(MMt, k)
    Ub, D, Vbt = xp.linalg.svd(E.T @ Ms, full_matrices=False)  # Rayleigh-Ritz on M
    left, right = E @ Ub, Vbt.T
    tol = 10 * np.sqrt(max(n1, n2) * np.finfo(np.float64).eps) * (D[0] if D.size else 0)
    keep = D > tol
    left, right, D = left[:, keep], right[:, keep], D[keep]
    return (left, right, D) if small_left else (right, left, D)


def _cross_svd_randomized(op1, op2, k, n_oversamples, n_iter, seed, progress):
    cross = _CrossOperator(op1, op2)
    q = resolve_n_iter(n_iter, k, cross.shape)
    U, D, Vt = svd_randomized(cross, k, n_oversamples, q, seed, progress)
    return U, Vt.T, D


def _finish(Z1, Z2, D, k: int, l2_norm: bool, return_d: bool):
    """Unit columns, Seurat's sign rule, optional per-cell L2 normalisation, padding check."""
    xp = backend.array_module(Z1)
    if Z1.shape[1] < k:
        raise ScatlasInputError(
            f"only {Z1.shape[1]} canonical vectors exist (rank of the data), k={k} was requested"
        )
    Z1 = Z1 / xp.linalg.norm(Z1, axis=0)[None, :]
    Z2 = Z2 / xp.linalg.norm(Z2, axis=0)[None, :]
    signs = xp.where(Z1[0] < 0, -1, 1).astype(Z1.dtype)  # Seurat: first cell of dataset 1
    Z1, Z2 = Z1 * signs[None, :], Z2 * signs[None, :]
    if l2_norm:
        Z1 = Z1 / xp.maximum(xp.linalg.norm(Z1, axis=1, keepdims=True), 1e-30)
        Z2 = Z2 / xp.maximum(xp.linalg.norm(Z2, axis=1, keepdims=True), 1e-30)
    return (Z1, Z2, D) if return_d else (Z1, Z2)


def _prepare_one(X, dtype, device, name):
    """(X on the device in the compute dtype, restore); a ColumnShifted keeps its form."""
    Xd, shift, restore = prepare_input(X, dtype, device, name)
    return (Xd if shift is None else ColumnShifted(Xd, shift)), restore


def _prepare_pair(X1, X2, k, dtype, device):
    X1d, restore = _prepare_one(X1, dtype, device, "X1")
    X2d, _ = _prepare_one(X2, dtype, device, "X2")
    if backend.device_of(getattr(X1d, "X", X1d)) != backend.device_of(getattr(X2d, "X", X2d)):
        raise ScatlasInputError("X1 and X2 must live on the same device (or pass device=...)")
    p = check_same_features([X1d, X2d], ["X1", "X2"])
    limit = min(X1d.shape[0], X2d.shape[0], p)
    k = check_positive_int(k, "k", upper=limit, what="min(n1, n2, n_features)")
    return X1d, X2d, k, restore


def _cross_decomposition(X1, X2, k, *, scale, lam, l2_norm, method, n_oversamples, n_iter,
                         seed, dtype, device, progress, return_d):
    X1d, X2d, k, restore = _prepare_pair(X1, X2, k, dtype, device)
    p = X1d.shape[1]
    n1, n2 = X1d.shape[0], X2d.shape[0]
    if method == "auto":
        if lam is None and _explicit_is_small(n1, n2, p):
            method = "explicit"
        else:
            method = "gram" if (p <= GRAM_MAX_FEATURES or lam is not None) else "randomized"
    if method not in ("gram", "randomized", "explicit"):
        raise ScatlasInputError(
            f"method must be 'auto', 'gram', 'explicit' or 'randomized', got {method!r}"
        )
    if method != "gram" and lam is not None:
        raise ScatlasInputError("ridge_cca supports only method='gram'")
    with _per_cell_operator(X1d, "X1", scale) as op1, _per_cell_operator(X2d, "X2", scale) as op2:
        if method == "gram":
            Z1, Z2, D = _cross_svd_exact(op1, op2, k, lam, progress)
        elif method == "explicit":
            Z1, Z2, D = _cross_svd_explicit(op1, op2, k)
        else:
            Z1, Z2, D = _cross_svd_randomized(op1, op2, k, n_oversamples, n_iter, seed, progress)
    out = _finish(Z1[:, :k], Z2[:, :k], D[:k], k, l2_norm, return_d)
    dt = X1d.dtype
    return tuple(restore(o.astype(dt)) for o in out)


_COMMON_DOC = """
    Parameters
    ----------
    X1, X2
        (n1, p) and (n2, p) cells x genes matrices on the same genes in the same order (numpy /
        scipy.sparse, or cupy / cupyx.scipy.sparse on the GPU); typically log-normalised and
        gene-scaled expression of the integration features. Sparse input is never densified as
        a whole.
    k
        Number of canonical vectors, 1 <= k <= min(n1, n2, p).
    l2_norm
        L2-normalise each cell's k-vector (Seurat's ``L2Dim``, on by default as in
        ``FindIntegrationAnchors``).
    method
        ``'gram'`` (exact, p x p Gram matrices; default for p <= 8192), ``'explicit'`` (exact,
        forms the n1 x n2 cross-product as Seurat does; ``auto`` takes it when n1 n2 <= 1e7 and
        (n1 + n2) p <= 1e8; see the module docstring), ``'randomized'`` (randomized
        subspace iteration on the implicit cross-product), or ``'auto'``.
    n_oversamples, n_iter, seed
        Randomized route only (see :func:`scatlas.kernels.rsvd`).
    dtype
        float32 (default) or float64.
    device
        ``None`` computes where the data lives; ``'cpu'``/``'gpu'``/``'auto'`` moves it there and
        the results back.
    return_d
        Also return the k singular values / canonical correlations.

    Returns
    -------
    Z1 : (n1, k), Z2 : (n2, k)
        Per-cell canonical vectors of the caller's array kind (and ``D`` : (k,) if requested).

    Peak device memory (b: the compute dtype's bytes): the inputs (a cast copy when the
    dtype differs) and per-cell row statistics; ``'gram'``: for each dataset a (p, p) float64
    Gram matrix with eigh's workspace and its (p, r) factor, the (p, p) core and its SVD (about
    8 p^2 8 bytes in all), one dense row chunk of
    :data:`~scatlas.kernels._operator.GRAM_CHUNK_BYTES` (256 MiB) and its product (with
    n_i < p the (n_i, n_i) Gram route of :func:`scatlas.kernels.linalg.gram_factor` instead);
    ``'explicit'``: the dense standardised rows of both datasets in float64, (n1 + n2) p 8
    bytes (at most 800 MB under ``auto``'s limit), the (n1, n2) product and its (m, m) Gram,
    m = min(n1, n2), in float64; ``'randomized'``: about 4 max(n1, n2) l b + 3 p l b, l = k +
    n_oversamples; the outputs (n1 + n2) k b. Sparse input (and the implicit scaled data of
    :func:`scatlas.kernels.anchors.scale_data`) is dense whole only on the explicit route.
"""


def cca(X1: Any, X2: Any, k: int = 20, *, l2_norm: bool = True, method: str = "auto",
        n_oversamples: int = 10, n_iter: int | str = "auto", seed: int = 42, dtype: Any = None,
        device: str | None = None, progress: bool | None = None, return_d: bool = False):
    return _cross_decomposition(X1, X2, k, scale=True, lam=None, l2_norm=l2_norm, method=method,
                                n_oversamples=n_oversamples, n_iter=n_iter, seed=seed,
                                dtype=dtype, device=device, progress=progress, return_d=return_d)


def pls(X1: Any, X2: Any, k: int = 20, *, l2_norm: bool = False, method: str = "auto",
        n_oversamples: int = 10, n_iter: int | str = "auto", seed: int = 42, dtype: Any = None,
        device: str | None = None, progress: bool | None = None, return_d: bool = False):
    return _cross_decomposition(X1, X2, k, scale=False, lam=None, l2_norm=l2_norm, method=method,
                                n_oversamples=n_oversamples, n_iter=n_iter, seed=seed,
                                dtype=dtype, device=device, progress=progress, return_d=return_d)


def ridge_cca(X1: Any, X2: Any, k: int = 20, *, lam: float | tuple[float, float] = 1.0,
              standardize: bool = False, l2_norm: bool = False, dtype: Any = None,
              device: str | None = None, return_d: bool = False):
    if isinstance(lam, int | float):
        lam = (float(lam), float(lam))
    lam = tuple(float(v) for v in lam)
    if len(lam) != 2 or min(lam) < 0 or not all(np.isfinite(lam)):
        raise ScatlasInputError(f"lam must be a non-negative number or a pair of them, got {lam}")
    return _cross_decomposition(X1, X2, k, scale=standardize, lam=lam, l2_norm=l2_norm,
                                method="gram", n_oversamples=0, n_iter=0, seed=0, dtype=dtype,
                                device=device, progress=None, return_d=return_d)


cca.__doc__ = (
    """Seurat-style CCA (``RunCCA``): per-cell standardisation, SVD of X1s X2s^T, sign rule.

    Equal to scikit-learn's ``PLSSVD(n_components=k, scale=True)`` fitted on ``X1.T, X2.T``
    (x/y weights), up to sign, without forming the n1 x n2 matrix.
    """
    + _COMMON_DOC
)
pls.__doc__ = (
    """PLS-SVD between cells: per-cell centring, SVD of the cross-covariance X1c X2c^T.

    Equal to scikit-learn's ``PLSSVD(n_components=k, scale=False)`` on ``X1.T, X2.T``.
    """
    + _COMMON_DOC
)
ridge_cca.__doc__ = """Ridge-regularised CCA with cells as variables and genes as observations.

    Canonical weights of ``(C11 + lam1 I)^-1/2 C12 (C22 + lam2 I)^-1/2`` with
    ``C_ij = A_i A_j^T / (p - 1)`` for per-cell centred (``standardize=True``: also scaled) data,
    computed exactly from p x p Gram matrices. ``lam=0`` is classical CCA (degenerate when
    n_i >= p: all canonical correlations are 1); ``lam -> inf`` gives :func:`pls`. Columns are
    unit-norm with Seurat's sign rule; ``return_d=True`` also returns the regularised canonical
    correlations.
    """
