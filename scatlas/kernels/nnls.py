"""Batched non-negative least squares for many right-hand sides, from the Gram matrix.

Every solver here takes the normal-equation pieces of ``min_{X >= 0} ||A X - B||_F^2``:

* ``AtA`` -- ``A^T A``, shape ``(k, k)``, symmetric positive (semi-)definite;
* ``AtB`` -- ``A^T B``, shape ``(k, r)``: one column per right-hand side;

and returns ``X`` of shape ``(k, r)`` with ``X >= 0``. ``A`` and ``B`` themselves are never
needed, which is what iNMF's block updates provide (``k x k`` Gram matrices, ``k x r`` products).

Arrays may be NumPy or CuPy; the array module comes from the input
(:func:`scatlas.backend.array_module`) and the result is of the same kind and dtype (float32 or
float64). All work is vectorised over the ``r`` columns: the only Python loops run over solver
iterations, passive-set sizes, the ``k`` coordinates (HALS), column chunks or CPU threads.

Solvers
-------
:func:`nnls_bpp`
    Block principal pivoting, Kim & Park (2011), "Fast nonnegative matrix factorization: an
    active-set-like method and comparisons", SIAM J. Sci. Comput. 33(6):3261-3281, Algorithm 2
    (multiple right-hand sides, column grouping), the solver of libplanc's ``bppnnls.hpp`` used by
    RcppPlanc / rliger's iNMF. Exact: it returns the NNLS minimiser (unique when ``AtA`` is
    positive definite).
:func:`nnls_hals`
    Hierarchical alternating least squares (exact coordinate descent over the ``k`` rows,
    Cichocki & Phan 2009), cheaper per sweep, converging to the same minimiser.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .. import backend
from ..exceptions import ScatlasInputError

__all__ = ["nnls_bpp", "nnls_hals", "kkt_violation"]

#: Rows solved per gathered batch (bounds the float64 ``(chunk, k, k)`` temporary).
_CHUNK = 1 << 13
#: Bits per word when packing passive sets into integer keys (stays clear of the sign bit).
_BITS = 62
#: Default cap on pivoting rounds per variable (libplanc: 5; Murty's single-exchange backup
#: rule may need many more rounds on ill-conditioned Gram matrices, for a few columns only).
_MAX_ITER_PER_K = 50
#: Rounds per variable after which the best iterate of each still-pivoting row is tracked.
_TRACK_FROM_PER_K = 10
#: Rounding tolerance of the sign tests, in units of float64 eps times the row's scale.
_TOL = 256
#: Fewest rows per thread worth a parallel split on the CPU.
_PAR_MIN = 1024
#: Buckets smaller than this skip the search for repeated passive sets.
_GROUP_MIN = 256


def cpu_threads() -> int:
    """Threads for CPU row-parallel solves: the CPU thread budget (:func:`backend.cpu_threads`:
    ``$SCATLAS_NUM_THREADS``, else the BLAS thread limit, capped by the usable cores)."""
    return backend.cpu_threads()


class _SerialBlasPool:
    """A thread pool whose ``map`` holds :func:`backend.serial_blas` in the calling thread for
    as long as its tasks run, so that ``workers x BLAS threads`` stays within the budget."""

    def __init__(self, n: int):
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="scatlas-nnls")

    def map(self, fn: Any, items: Any) -> list:
        with backend.serial_blas():
            return list(self.pool.map(backend.serial_blas_task(fn), items))


@functools.lru_cache(maxsize=4)
def executor(n: int) -> _SerialBlasPool:
    return _SerialBlasPool(n)


def _check_system(AtA: Any, AtB: Any) -> tuple[Any, Any, Any]:
    """Validate shapes / dtypes; return ``(xp, AtA, AtB)`` in a common float dtype."""
    xp = backend.array_module(AtB)
    if AtA.ndim != 2 or AtA.shape[0] != AtA.shape[1]:
        raise ScatlasInputError(f"AtA must be square (k, k), got shape {AtA.shape}")
    if AtB.ndim != 2 or AtB.shape[0] != AtA.shape[0]:
        raise ScatlasInputError(f"AtB must be (k, r) with k={AtA.shape[0]}, got shape {AtB.shape}")
    dt = np.result_type(AtA.dtype, AtB.dtype)
    if dt not in (np.float32, np.float64):
        dt = np.dtype(np.float64)
    return xp, xp.asarray(AtA, dtype=dt), xp.asarray(AtB, dtype=dt)


def _group_rows(xp: Any, F: Any) -> tuple[Any, Any]:
    """Group the rows of the boolean ``F`` (c, k) by identical pattern.

    Returns ``(patterns, gid)``: ``patterns`` (u, k) holds each distinct row once and ``gid``
    (c,) the pattern index of every row. Patterns are packed into 62-bit integer words and
    grouped by sorting, which works for any ``k`` on NumPy and CuPy alike.
    """
    c, k = F.shape
    words = []
    for start in range(0, k, _BITS):
        block = F[:, start : start + _BITS].astype(xp.int64)
        shifts = xp.left_shift(xp.int64(1), xp.arange(block.shape[1], dtype=xp.int64))
        words.append((block * shifts[None, :]).sum(axis=1))
    if len(words) == 1:
        _, first, gid = _unique_1d(xp, words[0])
        return F[first], gid
    W = xp.stack(words)
    order = xp.lexsort(W)
    Ws = W[:, order]
    new = xp.concatenate([xp.ones(1, dtype=bool), xp.any(Ws[:, 1:] != Ws[:, :-1], axis=0)])
    gid_sorted = xp.cumsum(new) - 1
    gid = xp.empty(c, dtype=gid_sorted.dtype)
    gid[order] = gid_sorted
    return F[order[new]], gid


def _unique_1d(xp: Any, key: Any) -> tuple[Any, Any, Any]:
    """``np.unique(key, return_index=True, return_inverse=True)`` by one sort, for NumPy and
    CuPy alike: (unique keys (u,), the index of one occurrence of each (u,), the group of every
    key (c,)). ``index`` may name any occurrence (np.unique names the first)."""
    order = xp.argsort(key)
    ks = key[order]
    new = xp.concatenate([xp.ones(1, dtype=bool), ks[1:] != ks[:-1]])
    gid_sorted = xp.cumsum(new) - 1
    gid = xp.empty(key.shape[0], dtype=gid_sorted.dtype)
    gid[order] = gid_sorted
    return ks[new], order[new], gid


def _batched_solve(xp: Any, M: Any, B: Any) -> Any:
    """``solve(M, B)`` for SPD (..., s, s) ``M`` (float64), robust to singular sub-blocks.

    A system that LAPACK / cuSOLVER finds singular (or that yields non-finite values, CuPy's way
    of failing) is retried with a relative diagonal jitter of ``1e-12 ... 1e-6`` (a ridge-like
    regularisation; it only happens for exactly collinear factors).
    """
    s = M.shape[-1]
    eye = xp.eye(s, dtype=M.dtype)
    scale = xp.max(xp.abs(xp.diagonal(M, axis1=-2, axis2=-1)), axis=-1)[..., None, None]
    scale = xp.where(scale > 0, scale, 1.0)
    for jitter in (0.0, 1e-12, 1e-9, 1e-6):
        try:
            out = xp.linalg.solve(M + (jitter * scale) * eye if jitter else M, B)
        except np.linalg.LinAlgError:
            continue
        if bool(xp.isfinite(out).all()):  # CuPy fails with NaNs; a NumPy solve may overflow
            return out
    return xp.matmul(xp.linalg.pinv(M), B)


def _solve_bucket(xp: Any, C64: Any, D: Any, F: Any, s: int) -> tuple[Any, Any]:
    """Solve rows whose passive sets all have ``s`` members; return ``(idx, x)`` (c, s) each.

    ``idx`` holds each row's passive variables in increasing order and ``x`` their values. Rows
    sharing a passive set share one factorisation (Kim & Park's column grouping) when at least a
    quarter of the rows are repeats; otherwise every row gets its own compressed ``s x s`` solve.
    """
    c = F.shape[0]
    idx = xp.nonzero(F)[1].reshape(c, s)
    d = xp.take_along_axis(D, idx, axis=1).astype(xp.float64)
    if c < _GROUP_MIN:
        x = _batched_solve(xp, C64[idx[:, :, None], idx[:, None, :]], d[:, :, None])[:, :, 0]
        return idx, x
    P, gid = _group_rows(xp, F)
    u = P.shape[0]
    if 4 * u <= 3 * c:
        pidx = xp.nonzero(P)[1].reshape(u, s)
        eye = xp.broadcast_to(xp.eye(s), (u, s, s)).copy()  # CuPy needs explicit batches
        inv = _batched_solve(xp, C64[pidx[:, :, None], pidx[:, None, :]], eye)
        x = xp.matmul(inv[gid], d[:, :, None])[:, :, 0]
    else:
        x = _batched_solve(xp, C64[idx[:, :, None], idx[:, None, :]], d[:, :, None])[:, :, 0]
    return idx, x


def _solve_passive(xp: Any, C: Any, D: Any, F: Any) -> Any:
    """Rows ``x`` (c, k) with ``x[F] = C_FF^{-1} D_F`` row by row and ``x[~F] = 0``.

    ``D`` and ``F`` are (c, k): one right-hand side per row. Rows are bucketed by the size ``s``
    of their passive set and each bucket is solved with compressed ``s x s`` systems (batched
    LU in float64, chunked); the all-passive bucket is one system with many right-hand sides.
    """
    c, k = F.shape
    X = xp.zeros((c, k), dtype=D.dtype)
    if c == 0:
        return X
    C64 = C.astype(xp.float64)
    sizes = F.sum(axis=1)
    chunk = _CHUNK if xp is np else 8 * _CHUNK
    for s in np.unique(backend.to_host(sizes)).tolist():
        if s == 0:
            continue
        rows = xp.flatnonzero(sizes == s)
        if s == k:
            X[rows] = _batched_solve(xp, C64, D[rows].T.astype(xp.float64)).T
            continue
        for a in range(0, rows.shape[0], chunk):
            r = rows[a : a + chunk]
            idx, x = _solve_bucket(xp, C64, D[r], F[r], s)
            X[r[:, None], idx] = x
    return X


def _infeasible(xp: Any, X: Any, Y: Any, F: Any, tol_x: Any, tol_y: Any) -> Any:
    """Kim & Park's infeasible set: passive with x < 0, or active with gradient y < 0."""
    return xp.where(F, X < -tol_x, Y < -tol_y)


def bpp_rows(C: Any, D: Any, X0: Any = None, max_iter: int | None = None, p_bar: int = 3) -> Any:
    """Block principal pivoting on row-oriented data: ``D`` (r, k), returns ``X`` (r, k).

    The workhorse of :func:`nnls_bpp` (which takes and returns the (k, r) orientation); iNMF
    calls it directly on its (cells, k) / (genes, k) factors. On the CPU, large problems are
    split into row blocks solved in parallel threads (rows are independent; NumPy and LAPACK
    release the GIL), one per available core.
    """
    xp = backend.array_module(D)
    n_threads = cpu_threads() if xp is np else 1
    if n_threads > 1 and D.shape[0] >= 2 * _PAR_MIN:
        bounds = np.linspace(0, D.shape[0], min(n_threads, D.shape[0] // _PAR_MIN) + 1)
        bounds = bounds.astype(int)
        parts = [
            (D[a:b], None if X0 is None else X0[a:b])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        outs = executor(n_threads).map(
            lambda p: _bpp_block(C, p[0], p[1], max_iter, p_bar), parts
        )
        return np.concatenate(outs, axis=0)
    return _bpp_block(C, D, X0, max_iter, p_bar)


def _bpp_block(C: Any, D: Any, X0: Any, max_iter: int | None, p_bar: int) -> Any:
    """:func:`bpp_rows` on one block of rows, in the calling thread (float64 inside)."""
    xp = backend.array_module(D)
    r, k = D.shape
    out_dtype = D.dtype
    if r == 0:
        return xp.zeros((0, k), dtype=out_dtype)
    C = C.astype(xp.float64)
    D = D.astype(xp.float64)
    max_iter = _MAX_ITER_PER_K * k if max_iter is None else int(max_iter)
    eps = float(np.finfo(np.float64).eps)
    diag = xp.diagonal(C)
    c_max = float(xp.max(xp.abs(diag)))
    usable = (diag > eps * c_max)[None, :]  # (1, k)

    if X0 is not None:
        F = (X0 > 0) & usable
        X = _solve_passive(xp, C, D, F)
    else:
        F = xp.zeros((r, k), dtype=bool)
        X = xp.zeros((r, k), dtype=xp.float64)
    d_max = xp.max(xp.abs(D), axis=1, keepdims=True)
    # best non-negative iterate of rows still pivoting late (cycling guard), tracked lazily
    track_from = min(_TRACK_FROM_PER_K * k, max_iter)
    best_X = best_f = None
    todo = xp.arange(r)
    alpha = xp.full(r, p_bar, dtype=xp.int32)
    beta = xp.full(r, k + 1, dtype=xp.int32)
    Xs, Fs, Ds = X, F, D
    for it in range(max_iter + 1):
        Y = Xs @ C - Ds
        x_max = xp.max(xp.abs(Xs), axis=1, keepdims=True)
        tol_x = _TOL * eps * x_max
        tol_y = _TOL * eps * (d_max[todo] + c_max * x_max)
        V = _infeasible(xp, Xs, Y, Fs, tol_x, tol_y) & usable
        n_inf = V.sum(axis=1).astype(xp.int32)
        keep = n_inf > 0
        if not bool(keep.any()) or it == max_iter:
            todo = todo[keep]
            break
        todo, V, n_inf, Fs, Ds = todo[keep], V[keep], n_inf[keep], Fs[keep], Ds[keep]
        a, b = alpha[todo], beta[todo]
        better = n_inf < b
        full = better | (a >= 1)
        alpha[todo] = xp.where(better, p_bar, xp.where(full, a - 1, a))
        beta[todo] = xp.where(better, n_inf, b)
        # backup rule: flip only the largest-index infeasible variable
        last = k - 1 - xp.argmax(V[:, ::-1], axis=1)
        single = xp.arange(k)[None, :] == last[:, None]
        Fs = Fs ^ xp.where(full[:, None], V, single & V)
        Xs = _solve_passive(xp, C, Ds, Fs)
        F[todo] = Fs
        X[todo] = Xs
        if it + 1 >= track_from:
            if best_X is None:
                best_X, best_f = xp.zeros_like(X), xp.full(r, xp.inf)
            Xc, f = _clipped_objective(xp, C, Ds, Xs)
            improved = f < best_f[todo]
            best_f[todo] = xp.where(improved, f, best_f[todo])
            best_X[todo] = xp.where(improved[:, None], Xc, best_X[todo])
    X = xp.maximum(X, 0, out=X)
    if todo.shape[0] and best_X is not None:
        # Rounding noise made these rows cycle (possible only when C[F, F] is very badly
        # conditioned), or the cap was too low: keep the best non-negative late iterate.
        X[todo] = best_X[todo]
    return X.astype(out_dtype, copy=False)


def _clipped_objective(xp: Any, C: Any, D: Any, X: Any) -> tuple[Any, Any]:
    """``max(X, 0)`` and its NNLS objective ``x^T C x / 2 - d^T x`` per row."""
    Xc = xp.maximum(X, 0)
    return Xc, 0.5 * xp.einsum("ij,ij->i", Xc @ C, Xc) - xp.einsum("ij,ij->i", D, Xc)


def nnls_bpp(
    AtA: Any,
    AtB: Any,
    *,
    X0: Any = None,
    max_iter: int | None = None,
    p_bar: int = 3,
) -> Any:
    """Solve ``min_{X >= 0} ||A X - B||_F^2`` for all columns by block principal pivoting.

    Parameters
    ----------
    AtA
        ``A^T A``, (k, k), float32/float64, symmetric positive semi-definite.
    AtB
        ``A^T B``, (k, r), same kind (NumPy or CuPy) as ``AtA``.
    X0
        Optional warm start (k, r): its positive entries give the initial passive sets. The result
        does not depend on it (the minimiser is unique for positive definite ``AtA``), only the
        number of pivoting rounds does. libplanc starts cold (``X0=None``) at every call.
    max_iter
        Cap on pivoting rounds; default ``50 k`` (libplanc uses ``5 k``, too few for Murty's
        single-exchange backup rule on ill-conditioned problems: columns cut off there are not
        optimal). Only the columns still infeasible take part in later rounds; a column still
        infeasible at the cap returns its best non-negative iterate.
    p_bar
        Number of full exchanges allowed without a decrease of the infeasible count before the
        single-variable backup rule takes over (Kim & Park's ``p̄ = 3``).

    Returns
    -------
    X : (k, r) array, dtype of the inputs, ``X >= 0``.

    Notes
    -----
    Kim & Park (2011), Algorithm 2: for every column, variables are split into a passive set F
    (solved by least squares on ``AtA[F, F]``) and an active set G (held at 0, with gradient
    ``y = AtA x - AtB``). Infeasible variables (``x_F < 0`` or ``y_G < 0``) are exchanged all at
    once while their count decreases, with ``p̄`` extra full exchanges, then one at a time (the
    largest index, Murty's backup rule). Each round solves only the still-infeasible columns,
    bucketed by passive-set size ``s``: compressed ``s x s`` systems ``AtA[F, F]`` in one
    batched LU per bucket; when many columns share a passive set (Kim & Park's column grouping)
    one inverse per distinct set serves them all, and the all-passive bucket is one solve with
    many right-hand sides. On the CPU large problems are split into row blocks solved in
    parallel threads. Computation is in float64 whatever the input dtype (results are returned
    in the input dtype). Deviations from libplanc:
    optional warm start; the sign tests use a rounding tolerance of ``256 eps`` relative to each
    column's scale; variables whose Gram diagonal is 0 (a factor absent from the data) are pinned
    at 0 instead of making the system singular; a column still infeasible at ``max_iter``
    (rounding noise on a very badly conditioned ``AtA``) returns its best non-negative iterate
    of the rounds after ``min(10 k, max_iter)``, not the last one.
    """
    xp, C, D = _check_system(AtA, AtB)
    X0r = None if X0 is None else xp.ascontiguousarray(xp.asarray(X0).T)
    X = bpp_rows(C, xp.ascontiguousarray(D.T), X0r, max_iter=max_iter, p_bar=p_bar)
    return xp.ascontiguousarray(X.T)


def nnls_hals(AtA: Any, AtB: Any, X0: Any, n_iter: int = 1, *, floor: float = 0.0) -> Any:
    """Approximate ``min_{X >= 0} ||A X - B||_F^2`` by ``n_iter`` HALS sweeps from ``X0``.

    Parameters
    ----------
    AtA
        ``A^T A``, (k, k).
    AtB
        ``A^T B``, (k, r).
    X0
        Starting point (k, r), not modified. Entries below ``floor`` are raised to it first.
    n_iter
        Number of sweeps over the ``k`` rows.
    floor
        Lower bound of the entries (default 0: the exact coordinate minimiser). A tiny positive
        floor (online iNMF uses 1e-16) keeps a factor from being switched off for good when HALS
        is used as an NMF block update: a row that is exactly 0 makes the other factor's Gram
        diagonal 0 and can never recover.

    Returns
    -------
    X : (k, r) array >= 0, dtype of the inputs.

    Notes
    -----
    Each step is the exact minimiser over one row ``j`` (all columns at once):
    ``X[j] <- max(floor, X[j] + (AtB[j] - AtA[j] X) / AtA[j, j])`` (Gauss-Seidel order, updated
    rows are used immediately). With ``floor=0`` the objective never increases and the iterates
    converge to the NNLS solution. Rows with ``AtA[j, j] = 0`` are set to ``floor``.
    """
    xp, C, D = _check_system(AtA, AtB)
    if X0.shape != D.shape:
        raise ScatlasInputError(f"X0 must have shape {D.shape}, got {X0.shape}")
    X = xp.maximum(xp.asarray(X0, dtype=D.dtype), floor)  # a fresh copy
    return _hals_inplace(C, D, X, int(n_iter), floor)


def _hals_inplace(C: Any, D: Any, X: Any, n_iter: int, floor: float) -> Any:
    """HALS sweeps on (k, r) ``X`` in place (see :func:`nnls_hals`)."""
    xp = backend.array_module(X)
    k = C.shape[0]
    diag = xp.diagonal(C).copy()
    ok = diag > 0
    inv_diag = xp.where(ok, 1.0 / xp.where(ok, diag, 1.0), 0.0).astype(D.dtype)
    ok_h = backend.to_host(ok)
    for _ in range(n_iter):
        for j in range(k):
            if not ok_h[j]:
                X[j] = floor
                continue
            step = (D[j] - C[j] @ X) * inv_diag[j]
            X[j] = xp.maximum(X[j] + step, floor)
    return X


def hals_rows(C: Any, D: Any, X0: Any, n_iter: int = 1, floor: float = 0.0) -> Any:
    """HALS on row-oriented data: ``D``, ``X0`` (r, k) -> ``X`` (r, k) (see :func:`nnls_hals`)."""
    xp = backend.array_module(D)
    Xt = xp.maximum(xp.ascontiguousarray(X0.T), floor)
    Xt = _hals_inplace(C, xp.ascontiguousarray(D.T), Xt, int(n_iter), floor)
    return xp.ascontiguousarray(Xt.T)


def kkt_violation(AtA: Any, AtB: Any, X: Any) -> float:
    """Largest violation of the NNLS optimality conditions, relative to ``max |AtB|``.

    KKT for ``min_{x >= 0} 1/2 x^T C x - d^T x``: ``x >= 0``, ``g = C x - d >= 0`` and
    ``x * g = 0``. Returns ``max(max(-x)*max(diag C), max(-g), max |x * g| / max x)`` scaled by
    ``max |d|``; 0 for an exact solution.
    """
    xp = backend.array_module(X)
    G = AtA @ X - AtB
    scale = float(xp.max(xp.abs(AtB))) or 1.0
    xmax = float(xp.max(X)) or 1.0
    neg_x = float(xp.max(-X)) * float(xp.max(xp.diagonal(AtA)))
    neg_g = float(xp.max(-G))
    comp = float(xp.max(xp.abs(X * G))) / xmax
    return max(neg_x, neg_g, comp, 0.0) / scale
