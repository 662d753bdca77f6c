"""Similarity network fusion (SNF): one affinity network per view, fused by cross-diffusion.

Sources
-------
- Wang, Mezlini, Demir, Fiume, Tu, Brudno, Haibe-Kains & Goldenberg (2014), "Similarity network
  fusion for aggregating data types on a genomic scale", Nat Methods 11:333.
- snfpy 0.2.2 (``snf/compute.py``, LGPL-3; read, not copied): ``make_affinity`` +
  ``affinity_matrix`` (scaled exponential kernel), ``snf`` (cross-diffusion), ``get_n_clusters``
  (eigengap). Defaults are snfpy's: ``K=20``, ``mu=0.5``, ``t=20``, ``alpha=1``,
  ``metric="sqeuclidean"``, features z-scored per column (``ddof=1``).

The steps, for views ``v = 1..m`` of the same ``n`` cells:

1. ``Z_v``: each feature z-scored (a constant feature becomes 0); ``d_v(i, j)`` the metric
   between cells (``"sqeuclidean"`` is the squared distance, and, as in snfpy, the kernel below
   squares it again).
2. Affinity (:func:`affinity`): ``rho_i`` = mean distance to the ``K`` nearest other cells (+ eps),
   ``sigma_ij = (rho_i + rho_j + d_ij) / 3`` (kept above eps), and
   ``W_ij = N(d_ij; 0, mu sigma_ij)``, the normal density.
3. ``P_v = (D^-1 W_v + W_v D^-1) / 2`` (row-normalised, symmetrised); ``S_v`` keeps the ``K``
   largest entries of each row of ``P_v`` (the cell itself included), row-normalised.
4. ``t`` times, all views at once from the previous sum ``Psum``:
   ``P_v <- S_v (Psum - P_v) S_v^T / (m - 1) + alpha I``.
5. Fused: ``F = Psum / m``, row-normalised, then ``(F + F^T + I) / 2``.

Two routes, one code path for NumPy/SciPy and CuPy/cupyx each:

- **dense** (exact, equals snfpy): ``P_v`` are n x n arrays and ``S_v`` sparse (K per row), so an
  iteration costs two sparse x dense products, O(n^2 K), where snfpy does two dense GEMMs,
  O(n^3). Taken when its peak, ``(m + 4) n^2`` values of the compute dtype, fits
  ``max_dense_bytes`` (default :data:`MAX_DENSE_BYTES`, 2 GiB: n <= 6,553 in float64 for two
  views).
- **sparse** (above the budget, or ``sparse=True``): every network lives on one fixed support,
  the union over views of each cell's ``n_support`` exact nearest neighbours
  (:func:`scatlas.kernels.knn`; default ``max(2 K, 30)``), symmetrised, plus the diagonal. The
  kernel values, normalisations and diffusion are those above restricted to the support (a
  masked ``S (Psum - P) S^T``, computed by row blocks); ``rho_i`` is exact. With the support
  holding every pair it equals the dense route; otherwise the affinities of pairs that are not
  near neighbours in any view are dropped (an approximation: the kernel's exponential factor
  falls with distance relative to the cells' neighbourhood scale, towards
  ``exp(-9 / (2 mu^2))``, exp(-18) at mu = 0.5, for distant pairs, but the mass of many small
  entries is lost). Memory: the support's entries,
  ``nnz <= n (1 + 2 m n_support)``, times about (m + 6) values and indices, plus one dense block
  of rows (16 MiB on the CPU, :data:`BLOCK_BYTES` = 256 MiB on the GPU) and its sparse product
  ``S_v[block] Q``; never an n x n array.

Deliberate differences from snfpy: ``S_v`` keeps exactly K entries per row (snfpy keeps every
entry at or above a linearly interpolated percentile, so ties at the K-th value keep more);
non-finite input is refused (snfpy propagates NaN as missing data); metrics are
``"sqeuclidean"``, ``"euclidean"`` and ``"cosine"`` (snfpy: any of ``scipy.spatial.distance``).

Clustering (:func:`spectral_clusters`): the eigengap estimate of snfpy's ``get_n_clusters``
(normalised Laplacian of ``(F + F^T) / 2`` with a zero diagonal; gap ``|l_{c} - l_{c-1}|
(1 - l_{c-1}) / (1 - l_c)``), then Ng-Jordan-Weiss spectral clustering (top eigenvectors of
``D^-1/2 F D^-1/2``, rows normalised, k-means).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .. import backend
from .._validate import ScatlasInputError, check_matrix, check_positive_int
from .neighbors import knn

Metric = Literal["sqeuclidean", "euclidean", "cosine"]
_METRICS = ("sqeuclidean", "euclidean", "cosine")
#: Default memory budget of the dense route: (m + 4) n^2 values must fit (bytes).
MAX_DENSE_BYTES = 2 * 2**30
#: Bytes of one dense block (distances on the dense route, diffusion rows on the sparse one).
BLOCK_BYTES = 256 * 2**20
#: The sparse route's diffusion buffer on the CPU (bytes): small enough to stay in cache.
_CPU_BUFFER_BYTES = 16 * 2**20
#: Edges per chunk when per-edge distances are computed (sparse route).
_EDGE_CHUNK = 1 << 16
_EPS = float(np.spacing(1))  # snfpy's np.spacing(1), in float64 whatever the compute dtype
_SQRT_2PI = math.sqrt(2 * math.pi)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _check_views(views: Any, min_views: int, name: str = "views") -> list[Any]:
    if name != "views":  # one matrix (affinity's X)
        try:
            return [check_matrix(views, name)]
        except ScatlasInputError as err:
            raise ScatlasInputError(str(err), param=name) from None
    if backend.issparse(views) or hasattr(views, "shape") or not isinstance(views, Sequence):
        raise ScatlasInputError(
            "views must be a list of cells x features matrices (one per modality), got "
            f"{type(views).__name__}", param="views")
    views = list(views)
    if len(views) < min_views:
        raise ScatlasInputError(
            f"views holds {len(views)} matri{'x' if len(views) == 1 else 'ces'}; SNF fuses at "
            f"least {min_views}", param="views")
    for i, X in enumerate(views):
        try:
            check_matrix(X, f"views[{i}]")
        except ScatlasInputError as err:
            raise ScatlasInputError(str(err), param="views") from None
    n = views[0].shape[0]
    for i, X in enumerate(views[1:], 1):
        if X.shape[0] != n:
            raise ScatlasInputError(
                f"views[{i}] has {X.shape[0]} cells but views[0] has {n}: every view must hold "
                "the same cells in the same order", param="views")
    kinds = {backend.device_of(X) for X in views}
    if len(kinds) > 1:
        raise ScatlasInputError("views live on different devices; move them together or pass "
                                "device=", param="views")
    return views


def _check_params(n: int, K: Any, mu: Any, metric: Any) -> int:
    if n < 3:
        raise ScatlasInputError(f"SNF needs at least 3 cells, got {n}", param="views")
    K = check_positive_int(K, "K")
    if K >= n:
        raise ScatlasInputError(
            f"K={K} neighbours must be fewer than the number of cells ({n}); pass K < {n}",
            param="K")
    if isinstance(mu, bool) or not isinstance(mu, int | float) or not 0 < mu < math.inf:
        raise ScatlasInputError(f"mu must be a positive number, got {mu!r}", param="mu")
    if metric not in _METRICS:
        raise ScatlasInputError(f"metric must be one of {_METRICS}, got {metric!r}",
                                param="metric")
    return K


def _check_nonneg_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ScatlasInputError(f"{name} must be an integer >= 0, got {value!r}", param=name)
    return int(value)


def _compute_dtype(dtype: Any) -> np.dtype:
    return backend.resolve_dtype(np.float64 if dtype is None else dtype)


# ----------------------------------------------------------------------------------------------
# features, distances and the scaled exponential kernel
# ----------------------------------------------------------------------------------------------
def _zscore(X: Any, dtype: np.dtype, normalize: bool) -> Any:
    """Dense compute-dtype copy of a view, each column z-scored (ddof=1; constant -> 0)."""
    xp = backend.array_module(X)
    Z = X.toarray() if backend.issparse(X) else X
    Z = xp.array(Z, dtype=dtype, copy=True)
    if not normalize:
        return Z
    Z -= Z.mean(axis=0)
    sd = xp.sqrt((Z * Z).sum(axis=0) / (Z.shape[0] - 1))
    Z *= xp.where(sd > 0, 1 / xp.where(sd > 0, sd, 1), 0)
    return Z


def _knn_metric(metric: str) -> str:
    return "euclidean" if metric == "sqeuclidean" else metric


def _from_knn(D: Any, metric: str) -> Any:
    """A :func:`knn` distance in ``metric``'s terms (knn gives true euclidean distances)."""
    return D * D if metric == "sqeuclidean" else D


def _neighbours(Z: Any, k: int, metric: str) -> tuple[Any, Any]:
    """(distances in the metric, indices) of each cell's k nearest other cells, best first."""
    D, idx = knn(Z, None, k, metric=_knn_metric(metric), exclude_self=True, dtype=Z.dtype)
    return _from_knn(D, metric), idx


def _rho(D: Any, K: int) -> Any:
    """snfpy's ``TT``: mean distance to the K nearest other cells, plus eps."""
    return D[:, :K].mean(axis=1) + _EPS


def _block_distances(Za: Any, Zb: Any, metric: str, sq_a: Any, sq_b: Any) -> Any:
    """All distances between the rows of ``Za`` (a block) and ``Zb`` (every cell)."""
    xp = backend.array_module(Za)
    G = Za @ Zb.T
    if metric == "cosine":
        inv_a, inv_b = (xp.where(s > 0, 1 / xp.sqrt(xp.where(s > 0, s, 1)), 0)
                        for s in (sq_a, sq_b))
        return xp.maximum(1 - G * inv_a[:, None] * inv_b[None, :], 0)
    D = xp.maximum(sq_a[:, None] + sq_b[None, :] - 2 * G, 0)
    return D if metric == "sqeuclidean" else xp.sqrt(D)


def _edge_distances(Z: Any, rows: Any, cols: Any, metric: str) -> Any:
    """Distances of the pairs (rows[e], cols[e]), each from its own difference (chunked)."""
    xp = backend.array_module(Z)
    out = xp.empty(rows.shape[0], dtype=Z.dtype)
    for s in range(0, rows.shape[0], _EDGE_CHUNK):
        a, b = Z[rows[s:s + _EDGE_CHUNK]], Z[cols[s:s + _EDGE_CHUNK]]
        if metric == "cosine":
            na, nb = xp.sqrt((a * a).sum(axis=1)), xp.sqrt((b * b).sum(axis=1))
            nab = na * nb
            cos = xp.where(nab > 0, (a * b).sum(axis=1) / xp.where(nab > 0, nab, 1), 0)
            out[s:s + _EDGE_CHUNK] = xp.maximum(1 - cos, 0)
        else:
            diff = a - b
            d2 = (diff * diff).sum(axis=1)
            out[s:s + _EDGE_CHUNK] = d2 if metric == "sqeuclidean" else xp.sqrt(d2)
    return out


def _kernel(d: Any, rho_i: Any, rho_j: Any, mu: float) -> Any:
    """snfpy's ``affinity_matrix`` on distances ``d`` (any shape, broadcasting with the rhos):
    ``sigma = (rho_i + rho_j + d) / 3``, zeroed at or below eps then + eps, and the normal
    density of ``d`` with scale ``mu sigma``."""
    xp = backend.array_module(d)
    sigma = (rho_i + rho_j + d) / 3
    sigma = xp.where(sigma > _EPS, sigma, 0) + _EPS
    scale = mu * sigma
    y = d / scale
    return xp.exp(-0.5 * y * y) / (_SQRT_2PI * scale)


# ----------------------------------------------------------------------------------------------
# support of the sparse route
# ----------------------------------------------------------------------------------------------
@dataclass
class _Support:
    """A symmetric CSR sparsity pattern with its diagonal: entries in row-major order."""

    n: int
    indptr: Any
    indices: Any
    rows: Any
    tpos: Any  # position of entry (j, i) for entry (i, j)
    diag: Any  # position of entry (i, i)

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def csr(self, data: Any) -> Any:
        spm = backend.sparse_module(data)
        return spm.csr_matrix((data, self.indices, self.indptr), shape=(self.n, self.n))


def _support(n: int, neighbour_lists: list[Any]) -> _Support:
    """The union of the kNN graphs (each (n, k) int64), symmetrised, with the diagonal."""
    xp = backend.array_module(neighbour_lists[0])
    ar = xp.arange(n, dtype=np.int64)
    rows = [ar] + [xp.repeat(ar, nb.shape[1]) for nb in neighbour_lists]
    cols = [ar] + [nb.ravel().astype(np.int64) for nb in neighbour_lists]
    r, c = xp.concatenate(rows), xp.concatenate(cols)
    codes = xp.sort(xp.concatenate([r * n + c, c * n + r]))  # sorted: row-major CSR order
    first = xp.ones(codes.shape[0], dtype=bool)
    first[1:] = codes[1:] != codes[:-1]
    codes = codes[first]
    rows, indices = codes // n, codes % n
    indptr = xp.searchsorted(rows, xp.arange(n + 1, dtype=np.int64))
    tpos = xp.searchsorted(codes, indices * n + rows)
    diag = xp.searchsorted(codes, ar * n + ar)
    return _Support(n, indptr, indices, rows, tpos, diag)


def _row_sums(S: _Support, data: Any) -> Any:
    xp = backend.array_module(data)
    csum = xp.concatenate([xp.zeros(1, dtype=data.dtype), xp.cumsum(data)])
    return csum[S.indptr[1:]] - csum[S.indptr[:-1]]


def _top_k_rows(S: _Support, P: Any, K: int) -> tuple[Any, Any]:
    """Each row's K largest entries of ``P`` on the support, row-normalised: (indices, weights),
    both (n, K), columns in increasing order. Ties go to the smaller column."""
    xp = backend.array_module(P)
    o1 = xp.argsort(-P, kind="stable")
    order = o1[xp.argsort(S.rows[o1], kind="stable")]  # by row, then by decreasing value
    rank = xp.arange(S.nnz) - S.indptr[S.rows[order]]
    keep = xp.zeros(S.nnz, dtype=bool)
    keep[order[rank < K]] = True
    idx = S.indices[keep].reshape(S.n, K)
    w = P[keep].reshape(S.n, K)
    return idx, w / w.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def affinity(
    X: Any,
    K: int = 20,
    mu: float = 0.5,
    *,
    metric: Metric = "sqeuclidean",
    normalize: bool = True,
    sparse: bool | None = None,
    n_support: int | None = None,
    max_dense_bytes: int = MAX_DENSE_BYTES,
    dtype: Any = None,
    device: str | None = None,
) -> Any:
    """Scaled exponential similarity of the cells of one view (snfpy's ``make_affinity``).

    Parameters
    ----------
    X
        (n, p) numpy / scipy.sparse / cupy / cupyx.scipy.sparse matrix, finite; densified per
        column block for the z-scores (views are low-dimensional: PCs, proteins, scores).
    K, mu
        Neighbours averaged in ``rho_i`` (1 <= K < n) and the kernel's width factor (> 0).
    metric
        ``"sqeuclidean"`` (snfpy's default), ``"euclidean"`` or ``"cosine"``.
    normalize
        Z-score each feature first (ddof=1), as snfpy.
    sparse, n_support, max_dense_bytes
        ``sparse=None``: dense when the n x n result (and one block) fits ``max_dense_bytes``,
        else on the support of each cell's ``n_support`` (default ``max(2 K, 30)``) nearest
        neighbours, symmetrised, with the diagonal (see the module docstring).
    dtype
        Compute dtype, float64 (default, snfpy's) or float32.
    device
        ``None`` computes where ``X`` lives; ``'cpu'``/``'gpu'``/``'auto'`` moves it there and
        the result back to the caller's kind.

    Returns
    -------
    (n, n) array of the compute dtype (dense route) or CSR matrix (sparse route), symmetric; the
    caller's array kind.
    """
    X = _check_views(X, 1, "X")[0]
    Xd, restore = backend.on_device(X, device, _compute_dtype(dtype))
    n = Xd.shape[0]
    K = _check_params(n, K, mu, metric)
    dt = _compute_dtype(dtype)
    Z = _zscore(Xd, dt, normalize)
    use_sparse = _use_sparse(sparse, n, 1, dt, max_dense_bytes, extra=0)
    if not use_sparse:
        D, _ = _neighbours(Z, K, metric)
        return restore(_dense_affinity(Z, _rho(D, K), float(mu), metric))
    k_s = _support_width(n_support, K, n)
    D, idx = _neighbours(Z, k_s, metric)
    S = _support(n, [idx])
    W = _support_affinity(Z, S, _rho(D, K), float(mu), metric)
    return restore(S.csr(W))


def snf(
    views: Sequence[Any],
    K: int = 20,
    mu: float = 0.5,
    t: int = 20,
    metric: Metric = "sqeuclidean",
    *,
    alpha: float = 1.0,
    normalize: bool = True,
    sparse: bool | None = None,
    n_support: int | None = None,
    max_dense_bytes: int = MAX_DENSE_BYTES,
    dtype: Any = None,
    device: str | None = None,
) -> Any:
    """Fuse the cell-cell networks of several views by cross-diffusion (Wang et al. 2014).

    Equals ``snf.snf(*snf.make_affinity(*views, K=K, mu=mu, metric=metric), K=K, t=t,
    alpha=alpha)`` of snfpy 0.2.2 on the dense route (tests/kernels/test_snf.py: to 1e-6).

    Parameters
    ----------
    views
        List of m >= 2 matrices (n, p_v), one per modality, the same n cells in the same order;
        numpy / scipy.sparse or cupy / cupyx.scipy.sparse (all on one device), finite.
    K
        Neighbours of the affinity kernel and of the diffusion's kNN networks, 1 <= K < n.
    mu
        Width factor of the scaled exponential kernel (> 0; snfpy: 0.5).
    t
        Diffusion iterations (>= 0).
    metric
        ``"sqeuclidean"`` (snfpy's default), ``"euclidean"`` or ``"cosine"``.
    alpha
        Self-affinity added to the diagonal at every iteration (snfpy: 1).
    normalize
        Z-score each view's features first (ddof=1), as snfpy.
    sparse
        ``None``: dense when ``(m + 4) n^2`` values fit ``max_dense_bytes``, else sparse;
        True / False force a route.
    n_support
        Sparse route: nearest neighbours per cell and view in the support (default
        ``max(2 K, 30)``, at most n - 1; n - 1 makes the sparse route exact).
    max_dense_bytes
        Memory budget of the dense route in bytes (default :data:`MAX_DENSE_BYTES`, 2 GiB).
    dtype
        Compute dtype, float64 (default) or float32.
    device
        ``None`` computes where the views live; ``'cpu'``/``'gpu'``/``'auto'`` moves them there
        and the result back to the caller's kind.

    Returns
    -------
    The fused affinity, (n, n), symmetric, diagonal about 1/2 + 1/(2n'): a dense array
    (dense route) or a CSR matrix on the support (sparse route), of the compute dtype and the
    caller's array kind.
    """
    views = _check_views(views, 2)
    dt = _compute_dtype(dtype)
    moved = [backend.on_device(X, device, dt) for X in views]
    restore = moved[0][1]
    Xs = [X for X, _ in moved]
    n, m = Xs[0].shape[0], len(Xs)
    K = _check_params(n, K, mu, metric)
    t = _check_nonneg_int(t, "t")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ScatlasInputError(f"alpha must be a finite number, got {alpha!r}", param="alpha")
    Zs = [_zscore(X, dt, normalize) for X in Xs]
    if not _use_sparse(sparse, n, m, dt, max_dense_bytes, extra=4):
        W = [_dense_affinity(Z, _rho(_neighbours(Z, K, metric)[0], K), float(mu), metric)
             for Z in Zs]
        return restore(_fuse_dense(W, K, t, float(alpha)))
    k_s = _support_width(n_support, K, n)
    knns = [_neighbours(Z, k_s, metric) for Z in Zs]
    S = _support(n, [idx for _, idx in knns])
    W = [_support_affinity(Z, S, _rho(D, K), float(mu), metric)
         for Z, (D, _) in zip(Zs, knns, strict=True)]
    del knns
    return restore(S.csr(_fuse_sparse(S, W, K, t, float(alpha))))


def _use_sparse(sparse: bool | None, n: int, m: int, dt: np.dtype, budget: Any,
                extra: int) -> bool:
    if sparse is not None:
        return bool(sparse)
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 0:
        raise ScatlasInputError(f"max_dense_bytes must be an integer >= 0, got {budget!r}",
                                param="max_dense_bytes")
    return (m + extra) * n * n * dt.itemsize + BLOCK_BYTES > budget


def _support_width(n_support: int | None, K: int, n: int) -> int:
    if n_support is None:
        return min(max(2 * K, 30), n - 1)
    k_s = check_positive_int(n_support, "n_support")
    if not K <= k_s < n:
        raise ScatlasInputError(
            f"n_support={k_s} must be at least K={K} and below the number of cells ({n})",
            param="n_support")
    return k_s


# ----------------------------------------------------------------------------------------------
# dense route
# ----------------------------------------------------------------------------------------------
def _block_rows(n: int, itemsize: int) -> int:
    """Rows of an n-wide block of a few temporaries within :data:`BLOCK_BYTES`."""
    return max(1, BLOCK_BYTES // (4 * n * itemsize))


def _dense_affinity(Z: Any, rho: Any, mu: float, metric: str) -> Any:
    """The n x n affinity, by row blocks of distances (the diagonal's distance is 0)."""
    xp = backend.array_module(Z)
    n = Z.shape[0]
    sq = (Z * Z).sum(axis=1)
    W = xp.empty((n, n), dtype=Z.dtype)
    step = _block_rows(n, Z.dtype.itemsize)
    for s in range(0, n, step):
        e = min(n, s + step)
        D = _block_distances(Z[s:e], Z, metric, sq[s:e], sq)
        D[xp.arange(e - s), xp.arange(s, e)] = 0
        W[s:e] = _kernel(D, rho[s:e, None], rho[None, :], mu)
    return W


def _normalise_symmetric(W: Any) -> Any:
    """``(D^-1 W + (D^-1 W)^T) / 2`` of a dense n x n matrix, in W's memory where possible."""
    W /= W.sum(axis=1, keepdims=True)
    P = W + W.T
    P *= 0.5
    return P


def _dense_top_k(P: Any, K: int) -> Any:
    """CSR of each row's K largest entries of the dense ``P``, row-normalised (row blocks)."""
    xp = backend.array_module(P)
    n = P.shape[0]
    step = _block_rows(n, 8)
    idx = xp.empty((n, K), dtype=np.int64)
    for s in range(0, n, step):
        idx[s:s + step] = xp.argpartition(-P[s:s + step], K - 1, axis=1)[:, :K]
    idx = xp.sort(idx, axis=1)
    w = xp.take_along_axis(P, idx, axis=1)
    w /= w.sum(axis=1, keepdims=True)
    spm = backend.sparse_module(P)
    indptr = xp.arange(0, n * K + 1, K, dtype=np.int64)
    return spm.csr_matrix((w.ravel(), idx.ravel(), indptr), shape=(n, n))


def _fuse_dense(W: list[Any], K: int, t: int, alpha: float) -> Any:
    """Steps 3-5 on dense n x n affinities (consumed)."""
    xp = backend.array_module(W[0])
    m, n = len(W), W[0].shape[0]
    P = []
    while W:
        P.append(_normalise_symmetric(W.pop(0)))
    Sk = [_dense_top_k(Pv, K) for Pv in P]
    diag = xp.arange(n)
    for _ in range(t):
        Psum = P[0].copy()
        for Pv in P[1:]:
            Psum += Pv
        for v in range(m):
            Q = xp.subtract(Psum, P[v], out=P[v])  # P[v] is not needed again
            Q /= m - 1
            SQ = Sk[v] @ Q
            del Q
            P[v] = Sk[v] @ SQ.T  # S (Psum - P) S^T: Psum - P is symmetric
            del SQ
            P[v][diag, diag] += alpha
        del Psum
    F = P.pop()
    while P:
        F += P.pop()
    F /= m
    F /= F.sum(axis=1, keepdims=True)
    out = F + F.T
    del F
    out[diag, diag] += 1
    out *= 0.5
    return out


# ----------------------------------------------------------------------------------------------
# sparse route
# ----------------------------------------------------------------------------------------------
def _support_affinity(Z: Any, S: _Support, rho: Any, mu: float, metric: str) -> Any:
    """Affinities on the support's entries (data array in CSR order)."""
    d = _edge_distances(Z, S.rows, S.indices, metric)
    d[S.diag] = 0
    return _kernel(d, rho[S.rows], rho[S.indices], mu).astype(Z.dtype, copy=False)


def _normalise_support(S: _Support, W: Any) -> Any:
    W = W / _row_sums(S, W)[S.rows]
    return 0.5 * (W + W[S.tpos])


def _masked_diffusion(S: _Support, Q: Any, nb_idx: Any, nb_w: Any, buf: Any) -> Any:
    """``(S_v Q S_v^T)`` on the support's entries, with ``S_v`` given as (n, K) neighbour
    indices and weights and ``Q`` a data array on the support.

    By blocks of ``b = buf.shape[0]`` rows: ``R = S_v[block] Q`` (sparse x sparse), scattered
    into the dense (b, n) buffer ``buf`` (all zero on entry), then every support entry (i, j >= i)
    of the block gathers ``sum_c w[j, c] R[i, idx[j, c]]``. The entries written are zeroed again
    after use, so the buffer is never cleared whole. Entries (j, i) copy (i, j): the product
    is symmetric for a symmetric ``Q``.
    """
    xp = backend.array_module(Q)
    spm = backend.sparse_module(Q)
    n, K = nb_idx.shape
    Sv = spm.csr_matrix((nb_w.ravel(), nb_idx.ravel(),
                         xp.arange(0, n * K + 1, K, dtype=np.int64)), shape=(n, n))
    Qm = S.csr(Q)
    step = buf.shape[0]
    flat_buf = buf.reshape(-1)
    out = xp.empty(S.nnz, dtype=Q.dtype)
    indptr = backend.to_host(S.indptr)
    for s in range(0, n, step):
        e = min(n, s + step)
        R = (Sv[s:e] @ Qm).tocoo()
        pos = R.row.astype(np.int64) * n + R.col
        flat_buf[pos] = R.data
        lo, hi = int(indptr[s]), int(indptr[e])
        upper = lo + xp.nonzero(S.indices[lo:hi] >= S.rows[lo:hi])[0]  # (j, i) mirrors (i, j)
        j = S.indices[upper]
        gather = xp.take(flat_buf, ((S.rows[upper] - s) * n)[:, None] + nb_idx[j])
        out[upper] = xp.einsum("ek,ek->e", gather, nb_w[j])
        flat_buf[pos] = 0
    lower = xp.nonzero(S.indices < S.rows)[0]
    out[lower] = out[S.tpos[lower]]
    return out


def _fuse_sparse(S: _Support, W: list[Any], K: int, t: int, alpha: float) -> Any:
    """Steps 3-5 on the support (data arrays, CSR order)."""
    m = len(W)
    P = [_normalise_support(S, Wv) for Wv in W]
    nbs = [_top_k_rows(S, Pv, K) for Pv in P]
    xp = backend.array_module(P[0])
    rows = max(1, (_CPU_BUFFER_BYTES if xp is np else BLOCK_BYTES) // (S.n * P[0].itemsize))
    buf = xp.zeros((min(rows, S.n), S.n), dtype=P[0].dtype)
    for _ in range(t):
        Psum = sum(P[1:], P[0])
        for v in range(m):
            P[v] = _masked_diffusion(S, (Psum - P[v]) / (m - 1), *nbs[v], buf)
            P[v][S.diag] += alpha
    F = sum(P[1:], P[0]) / m
    F = F / _row_sums(S, F)[S.rows]
    F = F + F[S.tpos]
    F[S.diag] += 1
    return 0.5 * F
