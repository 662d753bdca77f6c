"""Randomized SVD and PCA for dense or sparse cells x genes matrices, on CPU or GPU.

Sources
-------
- Halko, Martinsson & Tropp (2011), "Finding structure with randomness", Alg. 4.4 (randomized
  subspace iteration) and 5.1; oversampling ``p`` and ``q`` power iterations, each step
  re-orthonormalised.
- CholeskyQR2 (Fukaya et al. 2014; used for the GPU by rapids-singlecell, Tomás et al. 2024) for
  the tall-skinny orthonormalisations, falling back to Householder QR when ill-conditioned.
- The exact "Gram" / covariance-eigh route (scikit-learn's ``covariance_eigh`` solver): eigh of
  the p x p matrix A^T A, accumulated over dense row chunks.

Single-cell spectra are flat (a large isotropic noise bulk), so two power iterations, the default
of fbpca, torch and rapids-singlecell, leave errors of tens of percent in the singular values
(../shared/reference/cca_mnn_rsvd.md section 3). The default here follows scikit-learn's
``n_iter='auto'`` (7 iterations when k < 10% of the smaller dimension, else 4) with 10 oversamples,
and ``method='auto'`` takes the exact Gram route whenever it is estimated to be cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .. import _progress, backend
from .._params import NONNEGATIVE_INT, POSITIVE_INT, SEED, Options, validate_params
from .._validate import ScatlasInputError, check_matrix, check_positive_int
from ._operator import ColumnShifted, ShiftedOperator, _chunk_rows

Method = Literal["auto", "randomized", "gram"]

# The Gram route holds a p x p matrix and runs a p x p eigh; beyond this it is never chosen.
GRAM_MAX_FEATURES = 8192
# How much faster dense BLAS-3 runs than a sparse-times-dense product per flop. CPU: measured on
# the 2-core dev machine (~330 GFLOP/s float32 GEMM vs ~15 GFLOP/s per thread for CSR @ dense
# with 60 columns, 1e5 x 2000 at 10%). GPU: an unmeasured placeholder until a GPU run tunes it.
_DENSE_VS_SPARSE_RATE = {"cpu": 20.0, "gpu": 10.0}
_ALWAYS_EXACT_FLOPS = 5e10
_EXACT_PREMIUM = 2.0
# At or below this many features (or cells) the exact route is always taken, as
# rapids-singlecell's PCA takes covariance eigh for n_vars <= 8000 and scikit-learn's 'full' /
# 'covariance_eigh' solvers do for small problems: on a 2,000 x 2,000 scaled HVG matrix the
# randomized route (q = 4) left 14-17 of 30 PCs visibly off (issue 15), while the exact one
# costs one GEMM and a 2,000^2 eigh (about a second).
_ALWAYS_EXACT_FEATURES = 4096


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------
def as_compute_matrix(X: Any, dtype: Any, name: str = "X") -> Any:
    """Validate X (2-D, numeric, finite) and cast it to the compute dtype.

    Sparse matrices become CSR (CSC is kept: its transpose products are fast too); the cast
    copies only when the dtype differs. Never densifies.
    """
    check_matrix(X, name)
    dt = backend.resolve_dtype(dtype)
    if backend.issparse(X):
        if X.format not in ("csr", "csc"):
            X = X.tocsr()
        if X.dtype != dt:
            X = X.astype(dt)
        return X
    xp = backend.array_module(X)
    return xp.asarray(X, dtype=dt)


def prepare_input(X: Any, dtype: Any, device: str | None,
                  name: str = "X") -> tuple[Any, Any, Any]:
    """(X on the device as a compute matrix, its implicit column shift or None, restore).

    A :class:`~scatlas.kernels._operator.ColumnShifted` (scaled data held implicitly, from
    :func:`scatlas.kernels.anchors.scale_data` ``implicit=True``) gives its sparse matrix and
    its shift: the data are ``X - 1 shift^T``.
    """
    dt = backend.resolve_dtype(dtype)
    if isinstance(X, ColumnShifted):
        Xd, restore = backend.on_device(X.X, device, dt)
        shift = X.shift if Xd is X.X else backend.to_device(backend.to_host(X.shift),
                                                            backend.device_of(Xd))
        return as_compute_matrix(Xd, dtype, name), shift.astype(dt), restore
    Xd, restore = backend.on_device(X, device, dt)
    return as_compute_matrix(Xd, dtype, name), None, restore


def resolve_n_iter(n_iter: int | str, k: int, shape: tuple[int, int]) -> int:
    """scikit-learn's ``'auto'`` rule: 7 power iterations if k < 0.1 min(shape), else 4."""
    if n_iter == "auto":
        return 7 if k < 0.1 * min(shape) else 4
    if isinstance(n_iter, bool) or not isinstance(n_iter, int | np.integer) or n_iter < 0:
        raise ScatlasInputError(f"n_iter must be a non-negative integer or 'auto', got {n_iter!r}")
    return int(n_iter)


def choose_method(op: ShiftedOperator, k: int, n_oversamples: int, n_iter: int) -> str:
    """'gram' (exact) unless the randomized route is much cheaper, else 'randomized'.

    Cost model in flops, sparse ones weighted by how much slower they run than dense BLAS-3:
    Gram = 2 n m^2 + 10 m^3 with m = min(n, p) (chunked GEMM + eigh on the smaller side);
    randomized = (2q + 2) passes of 2 nnz l plus the orthonormalisations (2q + 2) 4 n l^2.
    The exact route is taken while it costs at most ``_EXACT_PREMIUM`` times the randomized one
    (single-cell spectra are flat, so the randomized answer is a few percent off in the tail of
    k = 50: exactness is worth a little time), or under ~5e10 flops (well under a second), and
    always when min(n, p) <= 4096 (``_ALWAYS_EXACT_FEATURES``).
    """
    n, p = op.shape
    m = min(n, p)
    if m > GRAM_MAX_FEATURES:
        return "randomized"
    if m <= _ALWAYS_EXACT_FEATURES:
        return "gram"
    ell = min(k + n_oversamples, n, p)
    nnz = op.X.nnz if op.sparse else n * p
    ratio = _DENSE_VS_SPARSE_RATE[backend.device_of(op.X)] if op.sparse else 1.0
    passes = 2 * n_iter + 2
    cost_random = passes * 2.0 * nnz * ell * ratio + passes * 4.0 * n * ell * ell
    cost_gram = 2.0 * max(n, p) * m * m + 10.0 * m**3
    budget = max(_EXACT_PREMIUM * cost_random, _ALWAYS_EXACT_FLOPS)
    return "gram" if cost_gram <= budget else "randomized"


# ----------------------------------------------------------------------------------------------
# small dense helpers (array-module generic)
# ----------------------------------------------------------------------------------------------
def orthonormalize(Y):
    """Orthonormal basis of the columns of a tall (n, l) matrix, of Y's dtype and array kind.

    CholeskyQR2 (Fukaya et al. 2014): R = chol(Y^T Y) in float64, Q = Y R^-1, done twice. Falls
    back to Householder QR when a pass cannot be trusted, checked the same way on NumPy and CuPy
    (CuPy's default ``linalg="ignore"`` returns a partial, finite factor where NumPy raises):

    - the factor is not a Cholesky factor of its Gram matrix (:func:`_cholesky_factor`);
    - the second pass's Gram matrix ``G2 = Q1^T Q1`` is further than 1/2 from the identity
      (Frobenius norm): then Y was too ill-conditioned (cond(Y) beyond ~u^-1/2 of its dtype) for
      the first pass, and the second would not restore orthogonality (Yamamoto et al. 2015:
      with ``||G2 - I||_2 <= 1/2``, cond(Q1) <= sqrt(3) and the second pass leaves an
      orthogonality error of O(n l u)).

    Extra work over plain CholeskyQR2: one l x l product per pass (l = k + oversamples).
    """
    xp = backend.array_module(Y)
    Q = Y
    for step in range(2):
        G = (Q.T @ Q).astype(np.float64)
        if step == 1 and float(xp.linalg.norm(G - xp.eye(G.shape[0]))) > 0.5:
            return xp.linalg.qr(Y)[0]
        L = _cholesky_factor(G)
        if L is None:
            return xp.linalg.qr(Y)[0]
        Rinv = xp.linalg.inv(L.T).astype(Y.dtype)
        Q = Q @ Rinv
    return Q


def _cholesky_factor(G):
    """Lower Cholesky factor of the symmetric (l, l) float64 ``G``, or None when ``G`` is not
    numerically positive definite.

    NumPy raises there; CuPy (``linalg="ignore"``, its default) returns NaNs or a partial factor
    whose columns past the failing pivot are not factored. So the factor is checked itself:
    finite, a positive diagonal, and ``|L L^T - G|_ij <= 8 (l + 1) u sqrt(G_ii G_jj)`` with u the
    float64 unit roundoff: twice Higham's backward-error bound for Cholesky (Accuracy and
    Stability of Numerical Algorithms, Thm 10.3: ``|dG| <= gamma_(l+1) |L| |L^T|``, and
    ``(|L||L^T|)_ij <= sqrt(G_ii G_jj)`` by Cauchy-Schwarz) plus the rounding of the check's own
    product. A partial factor misses by O(G_ij).
    """
    xp = backend.array_module(G)
    try:
        L = xp.linalg.cholesky(G)
    except np.linalg.LinAlgError:
        return None
    diag = xp.diagonal(L)
    if not (bool(xp.all(xp.isfinite(L))) and bool(xp.all(diag > 0))):
        return None
    scale = xp.sqrt(xp.maximum(xp.diagonal(G), 0))
    tol = 8.0 * (G.shape[0] + 1) * np.finfo(np.float64).eps / 2
    if bool(xp.any(xp.abs(L @ L.T - G) > tol * (scale[:, None] * scale[None, :]))):
        return None
    return L


def svd_flip_rows(U, Vt):
    """Deterministic signs: the largest-magnitude entry of each row of Vt is made positive.

    scikit-learn's ``svd_flip(u, v, u_based_decision=False)`` convention, used by its PCA.
    """
    xp = backend.array_module(Vt)
    idx = xp.argmax(xp.abs(Vt), axis=1)
    signs = xp.sign(Vt[xp.arange(Vt.shape[0]), idx])
    signs = xp.where(signs == 0, 1, signs).astype(Vt.dtype)
    return U * signs[None, :], Vt * signs[:, None]


def top_eigh(G, k: int):
    """Top-k eigenpairs of a symmetric PSD matrix, descending, eigenvalues clipped at 0.

    On the CPU with k well below the size, LAPACK's ``syevr`` computes only the k wanted pairs
    (``scipy.linalg.eigh(subset_by_index=...)``); otherwise a full ``eigh``. On the CPU it runs
    on one BLAS thread (:func:`backend.serial_blas`: threaded tridiagonalisation is 4-5x slower
    on a busy machine).
    """
    xp = backend.array_module(G)
    m = G.shape[0]
    if xp is np and k < m // 2:
        import scipy.linalg

        with backend.serial_blas():
            evals, evecs = scipy.linalg.eigh(G, subset_by_index=[m - k, m - 1], driver="evr")
    elif xp is np:
        with backend.serial_blas():
            evals, evecs = xp.linalg.eigh(G)
    else:
        evals, evecs = xp.linalg.eigh(G)
    order = xp.argsort(evals)[::-1][:k]
    return xp.clip(evals[order], 0, None), evecs[:, order]


# ----------------------------------------------------------------------------------------------
# solvers on an operator
# ----------------------------------------------------------------------------------------------
def svd_randomized(op: ShiftedOperator, k: int, n_oversamples: int, n_iter: int, seed: int,
                    progress: bool | None):
    xp = op.xp
    n, p = op.shape
    ell = min(k + n_oversamples, n, p)
    # The test matrix is drawn on the host so that CPU and GPU runs with one seed agree.
    omega = np.random.default_rng(seed).standard_normal((p, ell)).astype(op.dtype)
    omega = backend.to_device(omega, backend.device_of(op.X))
    with _progress.bar(desc="rsvd", total=2 * n_iter + 2, progress=progress, unit="pass") as pb:
        Q = orthonormalize(op.matmat(omega))
        pb.update(1)
        for _ in range(n_iter):
            Z = orthonormalize(op.rmatmat(Q))
            pb.update(1)
            Q = orthonormalize(op.matmat(Z))
            pb.update(1)
        Bt = op.rmatmat(Q)  # (p, ell) = (Q^T A)^T
        pb.update(1)
    Uh, S, Vt = xp.linalg.svd(Bt.T.astype(np.float64), full_matrices=False)
    U = Q @ Uh[:, :k].astype(op.dtype)
    return U, S[:k].astype(op.dtype), Vt[:k].astype(op.dtype)


def gram_factor(op: ShiftedOperator, k: int, progress: bool | None = None):
    """Top-k singular values and right singular vectors of A from the smaller side's Gram.

    p <= n: eigh of A^T A (p x p, accumulated over dense row chunks in float64).
    n < p: eigh of A A^T (n x n) in float64, then V = A^T U S^-1; a sparse X is never dense
    whole (:func:`_row_gram`), a dense one is copied once in float64.
    Returns ``S`` (r,) descending and ``V`` (p, r), float64, with r <= k: singular values at
    round-off level (below 10 sqrt(eps) S[0] of the compute dtype: rank deficiency) are dropped.

    Peak memory beyond X: p <= n: the (p, p) float64 Gram, one dense row chunk of
    :data:`~scatlas.kernels._operator.GRAM_CHUNK_BYTES` and its (p, p) product; n < p: the
    (n, n) float64 Gram and (sparse X) a float64 copy of X's entries plus two float64 chunks of
    at most that size, (dense X) an (n, p) float64 copy; eigh's workspace of the Gram.
    """
    xp = op.xp
    n, p = op.shape
    if n < p:
        if op.sparse:
            op64, CCt = _row_gram(op)
            C = None
        else:
            C = op.dense_rows(0, n).astype(np.float64)
            with backend.blas_for_flops(2.0 * n * n * p, like=C):
                CCt = C @ C.T
        evals, U = top_eigh(CCt, k)
        del CCt
    else:
        evals, V = top_eigh(op.gram(progress=progress), k)
    S = xp.sqrt(evals)
    # Eigenvalues of a Gram matrix carry an absolute error ~ eps * lambda_max, so singular values
    # below ~sqrt(eps) * S[0] are round-off (rank deficiency), not signal.
    keep = S > (S[0] if S.size else 0) * 10 * np.sqrt(np.finfo(op.dtype).eps)
    if n < p:
        if C is None:
            with op64:
                AtU = op64.rmatmat(U[:, keep])
        else:
            AtU = C.T @ U[:, keep]
        return S[keep], AtU / S[keep][None, :]
    return S[keep], V[:, keep]


def _row_gram(op: ShiftedOperator) -> tuple[ShiftedOperator, Any]:
    """(the operator in float64, to be closed by the caller; A A^T (n, n) float64) for a sparse
    X, by row chunks:
    ``(A A^T)[:, j] = A (A_j)^T`` for each dense chunk A_j of rows, so only chunks of
    :data:`~scatlas.kernels._operator.GRAM_CHUNK_BYTES` are ever dense."""
    xp = op.xp
    n, p = op.shape
    f64 = np.float64

    def cast(v: Any) -> Any:
        return None if v is None else v.astype(f64)

    op64 = ShiftedOperator(op.X.astype(f64), row_shift=cast(op.a), col_shift=cast(op.b),
                           row_scale=cast(op.r))
    G = xp.empty((n, n), dtype=f64)
    rows = _chunk_rows(p, f64)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        Ct = xp.ascontiguousarray(op64.dense_rows(lo, hi).T)
        G[:, lo:hi] = op64.matmat(Ct)
        del Ct
    return op64, G


def _svd_gram(op: ShiftedOperator, k: int, progress: bool | None = None):
    """Exact truncated SVD via :func:`gram_factor`; U = A V S^-1.

    For rank-deficient data the missing trailing triplets are returned as zeros.
    """
    xp = op.xp
    S, V = gram_factor(op, k, progress)
    V = V.astype(op.dtype)
    U = op.matmat(V) / S.astype(op.dtype)[None, :]
    r = S.shape[0]
    if r < k:
        n, p = op.shape
        U = xp.concatenate([U, xp.zeros((n, k - r), dtype=op.dtype)], axis=1)
        V = xp.concatenate([V, xp.zeros((p, k - r), dtype=op.dtype)], axis=1)
        S = xp.concatenate([S, xp.zeros(k - r, dtype=S.dtype)])
    return U, S.astype(op.dtype), V.T


def svd_operator(op: ShiftedOperator, k: int, *, method: Method = "auto", n_oversamples: int = 10,
                 n_iter: int | str = "auto", seed: int = 0, progress: bool | None = None):
    """Truncated SVD of an implicit operator: (U (n,k), S (k,), Vt (k,p)), signs flipped.

    The engine under :func:`rsvd`, :func:`pca` and the CCA kernels.
    """
    q = resolve_n_iter(n_iter, k, op.shape)
    if method == "auto":
        method = choose_method(op, k, n_oversamples, q)
    if method == "gram":
        U, S, Vt = _svd_gram(op, k, progress)
    elif method == "randomized":
        U, S, Vt = svd_randomized(op, k, n_oversamples, q, seed, progress)
    else:
        raise ScatlasInputError(f"method must be 'auto', 'randomized' or 'gram', got {method!r}")
    U, Vt = svd_flip_rows(U, Vt)
    return U, S, Vt


def _check_k(k: Any, shape: tuple[int, int], name: str = "k") -> int:
    what = f"min(n_cells, n_features) of {shape}"
    return check_positive_int(k, name, upper=min(shape), what=what)


# ----------------------------------------------------------------------------------------------
# public kernels
# ----------------------------------------------------------------------------------------------
#: the rules :func:`rsvd` and :func:`pca` share (``k`` at most min(n, p): checked on the data)
SVD_RULES = {"seed": SEED, "n_oversamples": NONNEGATIVE_INT,
             "n_iter": (NONNEGATIVE_INT, Options(("auto",))),
             "method": Options(("auto", "randomized", "gram"))}


@validate_params(k=POSITIVE_INT, **SVD_RULES)
def rsvd(
    X: Any,
    k: int,
    *,
    seed: int = 0,
    n_oversamples: int = 10,
    n_iter: int | str = "auto",
    method: Method = "auto",
    center: bool = False,
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
) -> tuple[Any, Any, Any]:
    """Truncated (randomized) SVD ``X ~ U diag(S) Vt`` of a cells x genes matrix.

    Parameters
    ----------
    X
        (n, p) numpy / scipy.sparse / cupy / cupyx.scipy.sparse matrix. Sparse input is never
        densified (only chunk by chunk on the Gram route).
    k
        Number of singular triplets, 1 <= k <= min(n, p).
    seed
        Seeds the Gaussian test matrix (drawn on the host, so CPU and GPU agree).
    n_oversamples, n_iter
        HMT oversampling ``p`` (default 10) and power iterations ``q`` (``'auto'``: 7 if
        k < 0.1 min(n, p), else 4); every iterate is re-orthonormalised.
    method
        ``'randomized'`` (HMT subspace iteration), ``'gram'`` (exact: eigh of the p x p Gram
        matrix) or ``'auto'`` (the cheaper of the two by a flop model; Gram only for p <= 8192).
    center
        Subtract the column means implicitly (the SVD of the centred matrix, as PCA needs).
    dtype
        Compute dtype, float32 (default) or float64.
    device
        ``None`` computes where X lives; ``'cpu'``/``'gpu'``/``'auto'`` moves X there and the
        results back to the caller's array kind.

    Returns
    -------
    U : (n, k), S : (k,) descending, Vt : (k, p)
        In the compute dtype, of the caller's array kind. Signs follow scikit-learn's PCA
        convention (the largest-|.| entry of each row of Vt is positive).

    Peak device memory: X (a cast copy when its dtype differs) plus, with l = k +
    n_oversamples and b the compute dtype's bytes: randomized route, 4 n l b (the old and
    new orthonormal bases during a power iteration) + 3 p l b; Gram route with p <= n, a
    (p, p) float64 Gram matrix and eigh's workspace (about 3 p^2 8 bytes), one dense row chunk
    of :data:`~scatlas.kernels._operator.GRAM_CHUNK_BYTES` (256 MiB) and its (p, p) product;
    with n < p, an (n, n) float64 Gram and eigh's workspace (about 3 n^2 8 bytes) and a
    float64 copy of the stored entries (sparse X; dense X: of X) with two float64 chunks of
    256 MiB; the outputs (n + p) k b. A sparse X is never dense whole.
    """
    Xd, shift, restore = prepare_input(X, dtype, device)
    k = _check_k(k, Xd.shape)
    col_shift = _column_means(Xd) if center else shift
    with ShiftedOperator(Xd, col_shift=col_shift) as op:
        U, S, Vt = svd_operator(op, k, method=method, n_oversamples=n_oversamples,
                                n_iter=n_iter, seed=seed, progress=progress)
    return restore(U), restore(S), restore(Vt)


def _column_means(X):
    xp = backend.array_module(X)
    means = X.mean(axis=0)
    return xp.asarray(means).ravel().astype(X.dtype)


@dataclass
class PCAResult:
    """Output of :func:`pca`, named as scanpy / scikit-learn report it.

    scores (n, k): cell coordinates (``.obsm['X_pca']``); components (k, p): loadings
    (``.varm['PCs']`` is its transpose); explained_variance (k,): S^2 / (n - 1);
    explained_variance_ratio (k,): over the total variance of the (centred) data;
    singular_values (k,); mean (p,) column means (zeros when not centred); method used.
    """

    scores: Any
    components: Any
    explained_variance: Any
    explained_variance_ratio: Any
    singular_values: Any
    mean: Any
    method: str


@validate_params(n_components=POSITIVE_INT, **SVD_RULES)
def pca(
    X: Any,
    n_components: int = 50,
    *,
    center: bool = True,
    seed: int = 0,
    n_oversamples: int = 10,
    n_iter: int | str = "auto",
    method: Method = "auto",
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
) -> PCAResult:
    """Principal components of a cells x genes matrix, with implicit centring of sparse input.

    Same arguments as :func:`rsvd`. With ``center=True`` (default) this is scikit-learn's
    ``PCA``; with ``center=False`` it is ``TruncatedSVD`` (scanpy's ``zero_center=False``).
    Explained variance is ``S^2 / (n - 1)`` and its ratio divides by the total variance
    ``||X - mean||_F^2 / (n - 1)``, computed exactly from the sparse data. ``X`` may also be
    the implicit form of :func:`scatlas.kernels.anchors.scale_data` (``implicit=True``).

    Peak device memory: :func:`rsvd`'s, plus the (n, k) scores; the total variance of an
    uncentred sparse X (or scaled data held implicitly) is summed over float64 row chunks of
    at most 256 MiB.

    A ``dask.array.Array`` is computed blockwise on the active Dask scheduler, exactly
    (:func:`scatlas.kernels.dask_linalg.pca`; ``scores`` then stays a lazy Dask array).
    """
    from .dask_linalg import is_dask_array

    if is_dask_array(X):
        from .dask_linalg import pca as dask_pca

        return dask_pca(X, n_components, center=center, seed=seed, n_oversamples=n_oversamples,
                        n_iter=n_iter, method=method, dtype=dtype, progress=progress)
    Xd, shift, restore = prepare_input(X, dtype, device)
    k = _check_k(n_components, Xd.shape, "n_components")
    if Xd.shape[0] < 2:
        raise ScatlasInputError("pca needs at least 2 cells")
    xp = backend.array_module(Xd)
    col_shift = _column_means(Xd) if center else shift  # the operator: Xd - 1 col_shift^T
    if not center:
        mean = xp.zeros(Xd.shape[1], dtype=Xd.dtype)
    else:  # the data's column means (a ColumnShifted's are Xd's minus its shift)
        mean = col_shift if shift is None else col_shift - shift
    with ShiftedOperator(Xd, col_shift=col_shift) as op:
        q = resolve_n_iter(n_iter, k, op.shape)
        chosen = method if method != "auto" else choose_method(op, k, n_oversamples, q)
        U, S, Vt = svd_operator(op, k, method=chosen, n_oversamples=n_oversamples, n_iter=q,
                                seed=seed, progress=progress)
        total = op.sq_norm_total()
    n = Xd.shape[0]
    ev = (S.astype(np.float64) ** 2) / (n - 1)
    ratio = ev / (total / (n - 1)) if total > 0 else ev * 0
    dt = Xd.dtype
    return PCAResult(
        scores=restore(U * S[None, :]),
        components=restore(Vt),
        explained_variance=restore(ev.astype(dt)),
        explained_variance_ratio=restore(ratio.astype(dt)),
        singular_values=restore(S),
        mean=restore(mean),
        method=chosen,
    )
