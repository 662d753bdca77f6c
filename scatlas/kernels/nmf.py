"""Integrative NMF (LIGER's iNMF), unshared-feature iNMF (UINMF) and joint NMF.

Orientation: the public API is cells x features, as everywhere in scatlas. For dataset ``i`` with
``X_i`` (cells_i x genes), iNMF fits ``X_i ~ H_i (W + V_i)^T`` with

* ``W``   (genes x k): shared metagenes,
* ``V_i`` (genes x k): dataset-specific metagenes,
* ``H_i`` (cells_i x k): cell factor loadings,

all non-negative, minimising LIGER's objective (Welch et al., Cell 2019), transposed::

    sum_i ||X_i - H_i (W + V_i)^T||_F^2 + lam * sum_i ||H_i V_i^T||_F^2

Algorithm (libplanc ``nmf/bppinmf.hpp``, used by RcppPlanc / rliger >= 2.0): block coordinate
descent where each block is an exact non-negative least-squares solve by block principal pivoting
(:func:`scatlas.kernels.nnls.nnls_bpp`), from ``k x k`` Gram matrices and ``k x r`` products. Per
iteration, for each dataset ``i`` (with ``L_i = W + V_i``)::

    H_i:  (L_i^T L_i + lam V_i^T V_i) h = L_i^T x            (one column per cell)
    V_i:  (1 + lam) (H_i^T H_i) v = H_i^T X_i - (H_i^T H_i) W^T   (one column per gene)
    G += H_i^T H_i;   R += H_i^T X_i - (H_i^T H_i) V_i^T
    W:    G w = R                                            (one column per gene)

The data enter only through ``X_i L_i`` (cells x k) and ``H_i^T X_i`` (k x genes), computed with
sparse-aware products (a sparse ``X_i`` is never densified). The objective is evaluated without a
residual matrix (libplanc ``INMF::computeObjectiveError``), in float64::

    ||X_i||^2 - 2 tr(H_i^T X_i L_i) + tr((L_i^T L_i)(H_i^T H_i)) + lam tr((V_i^T V_i)(H_i^T H_i))

Internally factors are stored in the public orientation (genes x k, cells x k); each block is a
row-oriented NNLS problem (one row per gene or cell) handed to the solvers of
:mod:`scatlas.kernels.nnls`.

Arrays: NumPy dense or SciPy sparse (CSR preferred; other formats are converted) on the CPU,
CuPy / cupyx sparse on the GPU; the result is of the caller's kind. float32 by default, float64 on
request (``dtype=``).

Size (about 880 lines): iNMF, UINMF and jNMF share one block-coordinate state, one NNLS dispatch
and one restart / convergence loop (:func:`_restarts`); splitting them would put private state
types across modules for no reader's gain.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .. import backend
from .._params import NONNEGATIVE, POSITIVE_INT, SEED, Each, Options, validate_params
from .._progress import bar
from .._validate import (
    ScatlasInputError,
    check_matrix,
    check_rank,
    check_same_features,
)
from .nnls import bpp_rows, cpu_threads, executor, hals_rows

__all__ = [
    "INMFResult",
    "JNMFResult",
    "inmf",
    "inmf_objective",
    "jnmf",
    "uinmf",
]

Solver = Literal["bpp", "hals"]
#: Floor of HALS block updates: 0 keeps every step an exact coordinate minimiser (monotone).
_HALS_FLOOR = 0.0
#: Sparse matrices with at least this many stored values use threaded row-block products.
_PAR_NNZ = 200_000


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass
class INMFResult:
    """Factors of an (U)iNMF fit, cells x factors / genes x factors, in the caller's array kind.

    Attributes
    ----------
    W
        (genes, k) shared metagenes.
    V
        List of (genes, k) dataset-specific metagenes, one per dataset.
    H
        List of (cells_i, k) cell loadings, one per dataset.
    objective
        float64 NumPy array, the objective after each iteration of the kept (best) restart.
    seed
        The seed of the kept restart (``seed + r`` for restart ``r``).
    n_iter
        Iterations run by the kept restart.
    converged
        True when the tolerance test stopped the kept restart before ``n_iter``.
    restart_objectives
        Final objective of every restart, in restart order.
    U
        UINMF only: list of (unshared_genes_i, k) loadings of the unshared features (None for a
        dataset without unshared features); None for iNMF.
    lam
        The penalty per dataset.
    """

    W: Any
    V: list[Any]
    H: list[Any]
    objective: np.ndarray
    seed: int
    n_iter: int
    converged: bool
    restart_objectives: list[float] = field(default_factory=list)
    U: list[Any] | None = None
    lam: list[float] = field(default_factory=list)


@dataclass
class JNMFResult:
    """Joint NMF factors: ``H`` (cells, k) shared, ``W`` list of (features_m, k) per modality."""

    H: Any
    W: list[Any]
    objective: np.ndarray
    seed: int
    n_iter: int
    converged: bool
    restart_objectives: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# data access
# --------------------------------------------------------------------------------------------


class _Data:
    """One cells x features matrix in the working dtype, with the two products iNMF needs.

    On the CPU a sparse matrix is also split into row blocks, one per thread, so that both
    products run in parallel (SciPy's sparse kernels release the GIL).
    """

    def __init__(self, X: Any, dtype: np.dtype) -> None:
        self.xp = backend.array_module(X)
        self.sparse = backend.issparse(X)
        if self.sparse:
            if X.format != "csr":
                X = X.tocsr()
            if X.dtype != dtype:
                X = X.astype(dtype)
            vals = X.data
        else:
            X = self.xp.asarray(X, dtype=dtype)
            vals = X
        self.X = X
        self.shape = X.shape
        # on the GPU a CSR copy of X^T makes X^T H a plain CSR x dense product
        self.Xt = X.T.tocsr() if (self.sparse and backend.is_gpu_array(X)) else None
        self.blocks: list[tuple[int, int, Any]] = []
        n_threads = cpu_threads()
        if self.sparse and self.xp is np and n_threads > 1 and X.nnz >= _PAR_NNZ:
            bounds = np.linspace(0, X.shape[0], n_threads + 1).astype(int)
            self.blocks = [
                (a, b, _csr_rows_view(X, a, b))
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
        self.sq_norm = float((vals.astype(np.float64) ** 2).sum())

    def times(self, L: Any) -> Any:
        """``X @ L``: (cells, k) from ``L`` (features, k)."""
        if self.blocks:
            parts = executor(len(self.blocks)).map(lambda blk: blk[2] @ L, self.blocks)
            return np.concatenate(list(parts), axis=0)
        return self.xp.ascontiguousarray(self.X @ L)

    def t_times(self, H: Any) -> Any:
        """``X^T @ H``: (features, k) from ``H`` (cells, k)."""
        xp = self.xp
        if self.blocks:
            parts = executor(len(self.blocks)).map(
                lambda blk: blk[2].T @ H[blk[0] : blk[1]], self.blocks
            )
            return functools.reduce(np.add, parts)
        if self.Xt is not None:
            return xp.ascontiguousarray(self.Xt @ H)
        return xp.ascontiguousarray(self.X.T @ H)


def _csr_rows_view(X: Any, a: int, b: int) -> Any:
    """Rows [a, b) of a SciPy CSR matrix sharing its data and indices (no copy)."""
    lo, hi = int(X.indptr[a]), int(X.indptr[b])
    view = type(X)((b - a, X.shape[1]), dtype=X.dtype)  # the constructor would copy
    view.data, view.indices = X.data[lo:hi], X.indices[lo:hi]
    view.indptr = (X.indptr[a : b + 1] - lo).astype(X.indptr.dtype)
    return view


def _row_col_zero_counts(X: Any) -> tuple[Any, Any]:
    """Boolean masks of all-zero rows and all-zero columns of a non-negative matrix."""
    xp = backend.array_module(X)
    rs = xp.asarray(X.sum(axis=1)).ravel()
    cs = xp.asarray(X.sum(axis=0)).ravel()
    return rs == 0, cs == 0


def _move(Xs: Sequence[Any], device: str | None,
          dtype: Any = None) -> tuple[list[Any], Any]:
    """Move every matrix for a ``device=`` override (cast to ``dtype`` on the host first when
    moving to the GPU); return them and the result mover."""
    moved, restore = [], None
    for X in Xs:
        Y, r = backend.on_device(X, device, dtype)
        moved.append(Y)
        restore = restore or r
    kinds = {backend.device_of(Y) for Y in moved}
    if len(kinds) > 1:
        raise ScatlasInputError(
            "all matrices must live on the same device (got a mix of NumPy/SciPy and CuPy); "
            "move them with scatlas.backend.to_device or pass device="
        )
    return moved, restore


def _check_list(Xs: Any, name: str) -> list[Any]:
    if Xs is None or isinstance(Xs, str) or not isinstance(Xs, Sequence) or hasattr(Xs, "shape"):
        raise ScatlasInputError(
            f"{name} must be a list of cells x genes matrices (one per dataset), got "
            f"{type(Xs).__name__}"
        )
    if len(Xs) == 0:
        raise ScatlasInputError(f"{name} is an empty list; give at least one dataset")
    return list(Xs)


def _validate_datasets(Xs: list[Any], name: str, *, shared: bool = True) -> None:
    """Non-negative, finite, no all-zero cells; no gene zero in every dataset."""
    for i, X in enumerate(Xs):
        check_matrix(X, f"{name}[{i}]", nonnegative=True)
    if shared:
        check_same_features(Xs, [f"{name}[{i}]" for i in range(len(Xs))])
    zero_genes = None
    for i, X in enumerate(Xs):
        zr, zc = _row_col_zero_counts(X)
        n_zero = int(zr.sum())
        if n_zero:
            raise ScatlasInputError(
                f"{name}[{i}] has {n_zero} all-zero cell(s) (rows) out of {X.shape[0]}; remove "
                "them before factorising (LIGER drops them too)"
            )
        if shared:
            zc = backend.to_host(zc)
            zero_genes = zc if zero_genes is None else zero_genes & zc
    if shared and zero_genes is not None and zero_genes.any():
        raise ScatlasInputError(
            f"{int(zero_genes.sum())} gene(s) (columns) are zero in every dataset of {name}; "
            "remove them before factorising"
        )


def _check_k(k: Any, Xs: list[Any], name: str) -> int:
    """:func:`scatlas._validate.check_rank` on the datasets ``Xs`` (cells x shared genes; a
    jNMF's modalities each count their own features)."""
    k = check_rank(k, [(f"{name}[{i}]", X.shape[0]) for i, X in enumerate(Xs)],
                   min(X.shape[1] for X in Xs))
    return k


def _check_lam(lam: Any, n: int) -> list[float]:
    """``lam`` (one number, or one per dataset: its values are checked by the declared rule)
    as ``n`` floats."""
    vals = [lam] * n if np.ndim(lam) == 0 else list(np.asarray(lam, dtype=float).ravel())
    if len(vals) != n:
        raise ScatlasInputError(f"lam must be a number or one value per dataset ({n}), got "
                                f"{lam!r}", param="lam")
    return [float(v) for v in vals]


#: the rules :func:`inmf`, :func:`uinmf` and :func:`jnmf` share (``k`` below the cells and
#: genes is checked against the data by :func:`_check_k`)
FIT_RULES = {
    "k": POSITIVE_INT, "n_iter": POSITIVE_INT, "tol": (None, NONNEGATIVE),
    "solver": Options(("bpp", "hals")), "n_restarts": POSITIVE_INT, "seed": SEED,
    "hals_sweeps": POSITIVE_INT,
}


# --------------------------------------------------------------------------------------------
# the block coordinate descent
# --------------------------------------------------------------------------------------------


@dataclass
class _State:
    """Factors: W (m, k), V[i] (m, k), H[i] (n_i, k), U[i] (u_i, k) or None."""

    W: Any
    V: list[Any]
    H: list[Any]
    U: list[Any | None]


def _solve(solver: Solver, G: Any, R: Any, X0: Any, sweeps: int) -> Any:
    """Row-oriented NNLS block: ``R`` (r, k), Gram ``G`` (k, k), current value ``X0`` (r, k)."""
    if solver == "bpp":
        return bpp_rows(G, R, X0)
    return hals_rows(G, R, X0, sweeps, floor=_HALS_FLOOR)


def _fro_dot(A: Any, B: Any) -> float:
    """``sum(A * B)`` accumulated in float64."""
    xp = backend.array_module(A)
    return float(xp.einsum("ij,ij->", A.astype(np.float64), B.astype(np.float64)))


def _bcd_iteration(
    data: list[_Data],
    udata: list[_Data | None],
    st: _State,
    lams: list[float],
    solver: Solver,
    sweeps: int,
    first: bool = False,
) -> float:
    """One sweep H_i -> V_i (-> U_i) per dataset, then W; returns the objective after it."""
    xp = backend.array_module(st.W)
    k = st.W.shape[1]
    GW = xp.zeros((k, k), dtype=st.W.dtype)
    RW = xp.zeros_like(st.W)
    stats = []
    for i, D in enumerate(data):
        lam, V, U, P = lams[i], st.V[i], st.U[i], udata[i]
        L = st.W + V
        G = L.T @ L + lam * (V.T @ V)
        R = D.times(L)
        if U is not None:
            G += (1.0 + lam) * (U.T @ U)
            R += P.times(U)
        # HALS from the U(0, 2) init can switch factors off in its first sweep: solve H exactly
        H = _solve("bpp" if first else solver, G, R, st.H[i], sweeps)
        HtH = H.T @ H
        XtH = D.t_times(H)
        V = _solve(solver, (1.0 + lam) * HtH, XtH - st.W @ HtH, V, sweeps)
        PtH = None
        if U is not None:
            PtH = P.t_times(H)
            U = _solve(solver, (1.0 + lam) * HtH, PtH, U, sweeps)
        st.H[i], st.V[i], st.U[i] = H, V, U
        GW += HtH
        RW += XtH - V @ HtH
        stats.append((HtH, XtH, PtH))
    st.W = _solve(solver, GW, RW, st.W, sweeps)
    return _objective_from_stats(data, udata, st, lams, stats)


def _objective_from_stats(
    data: list[_Data],
    udata: list[_Data | None],
    st: _State,
    lams: list[float],
    stats: list[tuple[Any, Any, Any]],
) -> float:
    """LIGER's objective from Gram matrices and ``X^T H`` products (no residual matrix)."""
    total = 0.0
    for i, D in enumerate(data):
        HtH, XtH, PtH = stats[i]
        L, V, lam = st.W + st.V[i], st.V[i], lams[i]
        total += D.sq_norm - 2.0 * _fro_dot(L, XtH)
        total += _fro_dot(L.T @ L, HtH) + lam * _fro_dot(V.T @ V, HtH)
        if st.U[i] is not None:
            U = st.U[i]
            total += udata[i].sq_norm - 2.0 * _fro_dot(U, PtH)
            total += (1.0 + lam) * _fro_dot(U.T @ U, HtH)
    return total


def _iterate(
    step: Any, state: Any, *, n_iter: int, tol: float | None, pbar: Any,
) -> tuple[Any, list[float], bool]:
    """``state, obj = step(state, first)`` until ``n_iter`` or the relative-change test
    ``|o0 - o| / mean(o0, o) < tol``; returns the state, the objective history and whether the
    test stopped it."""
    history: list[float] = []
    for it in range(n_iter):
        state, obj = step(state, it == 0)
        pbar.update(1)
        history.append(obj)
        if len(history) > 1 and tol is not None:
            prev = history[-2]
            if abs(prev - obj) / max((abs(prev) + abs(obj)) / 2.0, 1e-300) < tol:
                return state, history, True
    return state, history, False


def _uniform(rng: np.random.Generator, shape: tuple[int, int], xp: Any, dtype: np.dtype) -> Any:
    """U(0, 2) draws on the host (identical on CPU and GPU for a seed), moved to ``xp``."""
    return xp.asarray(rng.uniform(0.0, 2.0, size=shape).astype(dtype))


def _user_init(
    init: dict[str, Any] | None, shapes: dict[str, Any], xp: Any, dtype: np.dtype
) -> dict[str, Any]:
    """Validate a user ``init`` dict (public orientation) and transpose it to (k, .) arrays."""
    if init is None:
        return {}
    if not isinstance(init, dict):
        raise ScatlasInputError("init must be None or a dict with keys among 'W', 'V', 'H', 'U'")
    out: dict[str, Any] = {}
    for key, val in init.items():
        if key not in shapes:
            raise ScatlasInputError(f"init has unknown key {key!r}; allowed: {sorted(shapes)}")
        want = shapes[key]
        if isinstance(want, list):
            if not isinstance(val, Sequence) or len(val) != len(want):
                raise ScatlasInputError(f"init[{key!r}] must be a list of {len(want)} matrices")
            out[key] = [
                _init_matrix(v, w, f"init[{key!r}][{j}]", xp, dtype) for j, (v, w) in
                enumerate(zip(val, want, strict=True))
            ]
        else:
            out[key] = _init_matrix(val, want, f"init[{key!r}]", xp, dtype)
    return out


def _init_matrix(v: Any, want: tuple[int, int] | None, name: str, xp: Any, dt: np.dtype) -> Any:
    if want is None:
        return None if v is None else _bad_init(name)
    v = xp.asarray(backend.to_host(v) if xp is np else v, dtype=dt)
    if tuple(v.shape) != tuple(want):
        raise ScatlasInputError(f"{name} must have shape {want}, got {tuple(v.shape)}")
    check_matrix(v, name, nonnegative=True)
    return xp.ascontiguousarray(v)


def _bad_init(name: str) -> None:
    raise ScatlasInputError(f"{name} must be None (that dataset has no unshared features)")


def _finish(
    st: _State, restore: Any, hist: list[float], seed: int, converged: bool, finals: list[float],
    lams: list[float], uinmf: bool,
) -> INMFResult:
    def pub(A: Any) -> Any:
        return None if A is None else restore(A)

    return INMFResult(
        W=pub(st.W),
        V=[pub(V) for V in st.V],
        H=[pub(H) for H in st.H],
        objective=np.asarray(hist, dtype=np.float64),
        seed=seed,
        n_iter=len(hist),
        converged=converged,
        restart_objectives=finals,
        U=[pub(U) for U in st.U] if uinmf else None,
        lam=list(lams),
    )


def _restarts(
    make_state: Any,
    step: Any,
    *,
    n_restarts: int,
    seed: int,
    n_iter: int,
    tol: float | None,
    progress: bool | None,
    desc: str,
) -> tuple[Any, list[float], int, bool, list[float]]:
    """Run ``n_restarts`` fits from fresh inits (``make_state(r, rng)``, seeds ``seed + r``)
    with :func:`_iterate`; keep the lowest final objective. Returns ``(state, history, seed,
    converged, final objective of every restart)``."""
    best: tuple[Any, list[float], int, bool] | None = None
    finals: list[float] = []
    with bar(desc=desc, total=n_restarts * n_iter, progress=progress) as pbar:
        for r in range(n_restarts):
            state = make_state(r, np.random.default_rng(seed + r))
            state, hist, conv = _iterate(step, state, n_iter=n_iter, tol=tol, pbar=pbar)
            finals.append(hist[-1])
            if best is None or hist[-1] < best[1][-1]:
                best = (state, hist, seed + r, conv)
    assert best is not None
    return best[0], best[1], best[2], best[3], finals


def _bcd_step(data: list[_Data], udata: list[_Data | None], lams: list[float], solver: Solver,
              sweeps: int) -> Any:
    """The iNMF / UINMF step for :func:`_restarts` (updates the state in place)."""

    def step(st: _State, first: bool) -> tuple[_State, float]:
        return st, _bcd_iteration(data, udata, st, lams, solver, sweeps, first=first)

    return step


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


@validate_params(lam=Each(NONNEGATIVE), **FIT_RULES)
def inmf(
    Xs: Sequence[Any],
    k: int = 20,
    lam: float | Sequence[float] = 5.0,
    *,
    n_iter: int = 30,
    tol: float | None = None,
    solver: Solver = "bpp",
    n_restarts: int = 1,
    seed: int = 1,
    init: dict[str, Any] | None = None,
    dtype: Any = None,
    progress: bool | None = None,
    device: str | None = None,
    hals_sweeps: int = 1,
) -> INMFResult:
    """Integrative NMF (LIGER iNMF) of several datasets sharing the same genes.

    Parameters
    ----------
    Xs
        List of (cells_i, genes) non-negative matrices, NumPy dense or SciPy sparse (CuPy /
        cupyx on the GPU), same genes in the same order; typically LIGER-preprocessed
        (normalised per cell, variable genes, scaled without centring). No all-zero cell; a
        gene may be zero in some datasets but not in all.
    k
        Number of factors; ``k < min_i cells_i`` and ``k < genes`` (rliger's requirement).
    lam
        Penalty on the dataset-specific part, a number or one per dataset (LIGER default 5).
    n_iter
        Maximum number of iterations (LIGER default 30; rliger 2.x runs exactly 30).
    tol
        Optional stop when ``|obj_prev - obj| / mean(obj_prev, obj) < tol`` (rliger <= 1.0 /
        pyliger use 1e-6; rliger 1.0 computes the mean wrongly, here the true mean is used).
    solver
        ``"bpp"`` (exact NNLS per block, libplanc's algorithm) or ``"hals"`` (``hals_sweeps`` HALS
        sweeps per block from the current values: cheaper iterations, not the same iterates).
    n_restarts
        Independent fits from fresh U(0, 2) inits with seeds ``seed, seed + 1, ...``; the fit with
        the lowest final objective is kept (rliger 2.x reuses the first init for every restart, a
        bug not reproduced here).
    seed
        Seed of the first restart (NumPy ``default_rng``; draws on the host, so a seed gives the
        same init on CPU and GPU).
    init
        Optional dict with any of ``"W"`` (genes, k), ``"V"`` (list of (genes, k)), ``"H"`` (list
        of (cells_i, k)) replacing the random draws of restart 0 (later restarts draw).
    dtype
        float32 (default) or float64 working precision; the objective is accumulated in float64.
    progress
        Show a progress bar (see :mod:`scatlas._progress`).
    device
        ``"cpu"`` / ``"gpu"`` to compute there (results come back as the input's kind).
    hals_sweeps
        HALS sweeps per block when ``solver="hals"``.

    Returns
    -------
    INMFResult
        ``W`` (genes, k), ``V`` list of (genes, k), ``H`` list of (cells_i, k), all >= 0 in the
        working dtype; ``objective`` (one float64 value per iteration); ``seed`` of the kept
        restart.

    Peak device memory (m genes, b: the working dtype's bytes): the datasets (a cast copy
    when the dtype differs; on the GPU a sparse X_i also keeps a CSR copy of its transpose, so
    twice its stored entries), the factors (m (B + 1) + n) k b for B datasets of n cells in
    all (twice with ``n_restarts > 1``: the best run is kept), and per block update about
    eight (r, k) float64 arrays of the NNLS solver, r = max(n_i, m), with its (8192, k, k)
    float64 chunk. Sparse data are never densified.

    Notes
    -----
    Source: Welch et al. 2019 (objective), libplanc ``bppinmf.hpp`` (BPP block updates, W from
    accumulated statistics), rliger 2.x defaults (k=20, lam=5, 30 iterations, W, V_i, H_i ~ U(0,2),
    seed 1). Deviations: BPP warm-starts from the previous block's passive sets (same minimiser,
    fewer pivots); the objective is computed after every iteration (it is cheap here), not once;
    the random streams differ from R / Armadillo, so iterates match libplanc in distribution, not
    bit for bit.
    """
    Xs = _check_list(Xs, "Xs")
    hals_sweeps = int(hals_sweeps)
    Xs, restore = _move(Xs, device, backend.resolve_dtype(dtype))
    _validate_datasets(Xs, "Xs")
    k = _check_k(k, Xs, "Xs")
    lams = _check_lam(lam, len(Xs))
    dt = backend.resolve_dtype(dtype)
    data = [_Data(X, dt) for X in Xs]
    xp = data[0].xp
    m = data[0].shape[1]
    user = _user_init(
        init, {"W": (m, k), "V": [(m, k)] * len(data), "H": [(D.shape[0], k) for D in data]},
        xp, dt,
    )

    def make_state(r: int, rng: np.random.Generator) -> _State:
        W = _uniform(rng, (m, k), xp, dt)
        V = [_uniform(rng, (m, k), xp, dt) for _ in data]
        H = [_uniform(rng, (D.shape[0], k), xp, dt) for D in data]
        if r == 0:
            W, V, H = user.get("W", W), user.get("V", V), user.get("H", H)
        return _State(W=W, V=list(V), H=list(H), U=[None] * len(data))

    st, hist, best_seed, conv, finals = _restarts(
        make_state, _bcd_step(data, [None] * len(data), lams, solver, hals_sweeps),
        n_restarts=n_restarts, seed=seed, n_iter=n_iter, tol=tol, progress=progress, desc="iNMF",
    )
    return _finish(st, restore, hist, best_seed, conv, finals, lams, uinmf=False)


@validate_params(lam=Each(NONNEGATIVE), **FIT_RULES)
def uinmf(
    Xs: Sequence[Any],
    Us: Sequence[Any | None],
    k: int = 20,
    lam: float | Sequence[float] = 5.0,
    *,
    n_iter: int = 30,
    tol: float | None = None,
    solver: Solver = "bpp",
    n_restarts: int = 1,
    seed: int = 1,
    init: dict[str, Any] | None = None,
    dtype: Any = None,
    progress: bool | None = None,
    device: str | None = None,
    hals_sweeps: int = 1,
) -> INMFResult:
    """iNMF with unshared features (UINMF, Kriebel & Welch, Nat Commun 2022).

    Parameters
    ----------
    Xs
        List of (cells_i, shared_genes) matrices, as in :func:`inmf`.
    Us
        List (same length) of (cells_i, unshared_genes_i) matrices of features measured in that
        dataset only (same cells, same order as ``Xs[i]``), or None for a dataset without any.
    k, lam, n_iter, tol, solver, n_restarts, seed, dtype, progress, device, hals_sweeps
        As :func:`inmf`; ``lam`` may be one value per dataset (RcppPlanc ``uinmf(lambda=)``).
    init
        Optional dict with ``"W"``, ``"V"``, ``"H"`` as :func:`inmf` and ``"U"`` (list of
        (unshared_genes_i, k) or None) replacing restart 0's draws.

    Returns
    -------
    INMFResult
        As :func:`inmf`, plus ``U``: list of (unshared_genes_i, k) loadings (None where
        ``Us[i]`` is None).

    Peak device memory: :func:`inmf`'s, with the unshared matrices ``Us`` held like the
    datasets and their (unshared_genes_i, k) factors.

    Notes
    -----
    Objective (cells x features orientation, ``P_i`` = ``Us[i]``)::

        sum_i ||[X_i, P_i] - H_i [W + V_i, U_i]^T||^2 + lam_i ||H_i [V_i, U_i]^T||^2

    Updates (libplanc ``uinmf.hpp``), BPP, order H_i -> V_i -> U_i per dataset, then W:
    H_i Gram ``L^T L + lam V^T V + (1 + lam) U^T U``, right side ``L^T x + U^T p``;
    ``(1 + lam) H^T H u = H^T p`` for U_i; V_i and W as iNMF. Init as libplanc: V_i and U_i are
    the shared / unshared rows of the same k random cells of dataset i (not normalised); W and
    H_i ~ U(0, 2). Deviations as :func:`inmf`.
    """
    Xs = _check_list(Xs, "Xs")
    if Us is None or isinstance(Us, str) or not isinstance(Us, Sequence) or len(Us) != len(Xs):
        raise ScatlasInputError(
            f"Us must be a list with one entry (matrix or None) per dataset ({len(Xs)})"
        )
    hals_sweeps = int(hals_sweeps)
    Xs, restore = _move(Xs, device, backend.resolve_dtype(dtype))
    Us = [None if P is None else _move([P], device, backend.resolve_dtype(dtype))[0][0]
          for P in Us]
    _validate_datasets(Xs, "Xs")
    for i, P in enumerate(Us):
        if P is None:
            continue
        check_matrix(P, f"Us[{i}]", nonnegative=True)
        if P.shape[0] != Xs[i].shape[0]:
            raise ScatlasInputError(
                f"Us[{i}] has {P.shape[0]} cells but Xs[{i}] has {Xs[i].shape[0]}; they must be "
                "the same cells in the same order"
            )
        if backend.device_of(P) != backend.device_of(Xs[i]):
            raise ScatlasInputError(f"Us[{i}] and Xs[{i}] live on different devices")
    k = _check_k(k, Xs, "Xs")
    lams = _check_lam(lam, len(Xs))
    dt = backend.resolve_dtype(dtype)
    data = [_Data(X, dt) for X in Xs]
    udata = [None if P is None else _Data(P, dt) for P in Us]
    xp = data[0].xp
    m = data[0].shape[1]
    shapes = {
        "W": (m, k), "V": [(m, k)] * len(data), "H": [(D.shape[0], k) for D in data],
        "U": [None if P is None else (P.shape[1], k) for P in udata],
    }
    user = _user_init(init, shapes, xp, dt)

    def make_state(r: int, rng: np.random.Generator) -> _State:
        W = _uniform(rng, (m, k), xp, dt)
        V, U, H = [], [], []
        for D, P in zip(data, udata, strict=True):
            idx = np.sort(rng.choice(D.shape[0], size=k, replace=False))
            V.append(_rows(D.X, idx, xp, dt))
            U.append(None if P is None else _rows(P.X, idx, xp, dt))
            H.append(_uniform(rng, (D.shape[0], k), xp, dt))
        if r == 0:
            W, V, H = user.get("W", W), user.get("V", V), user.get("H", H)
            U = user.get("U", U)
        return _State(W=W, V=list(V), H=list(H), U=list(U))

    st, hist, best_seed, conv, finals = _restarts(
        make_state, _bcd_step(data, udata, lams, solver, hals_sweeps), n_restarts=n_restarts,
        seed=seed, n_iter=n_iter, tol=tol, progress=progress, desc="UINMF",
    )
    return _finish(st, restore, hist, best_seed, conv, finals, lams, uinmf=True)


def _rows(X: Any, idx: np.ndarray, xp: Any, dt: np.dtype) -> Any:
    """Rows ``idx`` of X, transposed: a dense (features, len(idx)) array, dtype ``dt``."""
    sel = X[xp.asarray(idx)]
    sel = sel.toarray() if backend.issparse(sel) else sel
    return xp.ascontiguousarray(xp.asarray(sel, dtype=dt).T)


@validate_params(lam=Each(NONNEGATIVE))
def inmf_objective(
    Xs: Sequence[Any],
    W: Any,
    V: Sequence[Any],
    H: Sequence[Any],
    lam: float | Sequence[float] = 5.0,
    Us: Sequence[Any | None] | None = None,
    U: Sequence[Any | None] | None = None,
) -> float:
    """LIGER's (U)iNMF objective of given factors, without forming residual matrices.

    ``Xs`` list of (cells_i, genes); ``W`` (genes, k); ``V`` list of (genes, k); ``H`` list of
    (cells_i, k); optional UINMF ``Us`` (cells_i, unshared_i) and ``U`` (unshared_i, k). Returns
    ``sum_i ||X_i - H_i (W + V_i)^T||^2 + lam_i ||H_i V_i^T||^2`` (+ the unshared terms), computed
    in float64 from Gram matrices and ``H_i^T X_i``.
    """
    lams = _check_lam(lam, len(Xs))
    dt = np.dtype(np.float64)
    xp = backend.array_module(W)
    st = _State(
        W=xp.asarray(W, dtype=dt),
        V=[xp.asarray(v, dtype=dt) for v in V],
        H=[xp.ascontiguousarray(xp.asarray(h, dtype=dt)) for h in H],
        U=[None] * len(Xs) if U is None else [
            None if u is None else xp.asarray(u, dtype=dt) for u in U
        ],
    )
    data = [_Data(X, dt) for X in Xs]
    udata = [None] * len(Xs) if Us is None else [None if P is None else _Data(P, dt) for P in Us]
    stats = []
    for i, D in enumerate(data):
        H = st.H[i]
        PtH = None if udata[i] is None or st.U[i] is None else udata[i].t_times(H)
        stats.append((H.T @ H, D.t_times(H), PtH))
    return _objective_from_stats(data, udata, st, lams, stats)


# --------------------------------------------------------------------------------------------
# joint NMF
# --------------------------------------------------------------------------------------------


@validate_params(**FIT_RULES)
def jnmf(
    Xs_modalities: Sequence[Any],
    k: int = 20,
    *,
    n_iter: int = 30,
    tol: float | None = None,
    solver: Solver = "bpp",
    n_restarts: int = 1,
    seed: int = 1,
    dtype: Any = None,
    progress: bool | None = None,
    device: str | None = None,
    hals_sweeps: int = 1,
) -> JNMFResult:
    """Joint NMF of several modalities measured on the same cells: ``X^(m) ~ H W^(m)^T``.

    Parameters
    ----------
    Xs_modalities
        List of (cells, features_m) non-negative matrices, same cells in the same order (e.g. RNA
        and ATAC gene activity, or RNA and ADT of a CITE-seq experiment, each scaled beforehand:
        the objective weighs modalities by their scale).
    k
        Number of factors, ``k < cells`` and ``k < features_m``.
    n_iter, tol, solver, n_restarts, seed, dtype, progress, device, hals_sweeps
        As :func:`inmf`.

    Returns
    -------
    JNMFResult
        ``H`` (cells, k) shared; ``W`` list of (features_m, k).

    Peak device memory: the modalities (as :func:`inmf`'s datasets), the factors (n + sum_m
    features_m) k in the working dtype (twice with ``n_restarts > 1``) and the NNLS solver's
    about eight (r, k) float64 arrays, r = max(n, features_m), with its (8192, k, k) chunk.

    Notes
    -----
    Minimises ``sum_m ||X^(m) - H W^(m)T||_F^2`` (ordinary NMF of the feature-concatenated matrix)
    by alternating exact NNLS (BPP) or HALS blocks: H from the Gram ``sum_m W_m^T W_m`` and
    right side ``sum_m W_m^T x^(m)``; each W_m from ``H^T H`` and ``H^T X^(m)``. Init W_m, H ~
    U(0, 2). This is the joint-NMF building block of multi-modal LIGER-style integration (Kriebel
    & Welch 2022 treat paired modalities as one dataset with unshared features); it is not an
    rliger function.
    """
    Xs = _check_list(Xs_modalities, "Xs_modalities")
    hals_sweeps = int(hals_sweeps)
    Xs, restore = _move(Xs, device, backend.resolve_dtype(dtype))
    for i, X in enumerate(Xs):
        check_matrix(X, f"Xs_modalities[{i}]", nonnegative=True)
    n = Xs[0].shape[0]
    for i, X in enumerate(Xs):
        if X.shape[0] != n:
            raise ScatlasInputError(
                f"modalities must share the same cells: Xs_modalities[0] has {n} cells, "
                f"Xs_modalities[{i}] has {X.shape[0]}"
            )
    zero = None
    for X in Xs:
        zr, _ = _row_col_zero_counts(X)
        zr = backend.to_host(zr)
        zero = zr if zero is None else zero & zr
    if zero is not None and zero.any():
        raise ScatlasInputError(
            f"{int(zero.sum())} cell(s) are zero in every modality; remove them first"
        )
    k = _check_k(k, Xs, "Xs_modalities")
    dt = backend.resolve_dtype(dtype)
    data = [_Data(X, dt) for X in Xs]
    xp = data[0].xp

    def make_state(r: int, rng: np.random.Generator) -> tuple[Any, list[Any]]:
        Ws = [_uniform(rng, (D.shape[1], k), xp, dt) for D in data]
        return _uniform(rng, (n, k), xp, dt), Ws

    def step(state: tuple[Any, list[Any]], first: bool) -> tuple[tuple[Any, list[Any]], float]:
        H, Ws, obj = _jnmf_iteration(data, *state, solver, hals_sweeps, first=first)
        return (H, Ws), obj

    (H, Ws), hist, best_seed, conv, finals = _restarts(
        make_state, step, n_restarts=n_restarts, seed=seed, n_iter=n_iter, tol=tol,
        progress=progress, desc="jNMF",
    )
    return JNMFResult(
        H=restore(H),
        W=[restore(W) for W in Ws],
        objective=np.asarray(hist, dtype=np.float64),
        seed=best_seed,
        n_iter=len(hist),
        converged=conv,
        restart_objectives=finals,
    )


def _jnmf_iteration(
    data: list[_Data], H: Any, Ws: list[Any], solver: Solver, sweeps: int, first: bool = False
) -> tuple[Any, list[Any], float]:
    G = sum(W.T @ W for W in Ws)
    R = sum(D.times(W) for D, W in zip(data, Ws, strict=True))
    H = _solve("bpp" if first else solver, G, R, H, sweeps)
    HtH = H.T @ H
    obj = 0.0
    new = []
    for D, W in zip(data, Ws, strict=True):
        XtH = D.t_times(H)
        W = _solve(solver, HtH, XtH, W, sweeps)
        new.append(W)
        obj += D.sq_norm - 2.0 * _fro_dot(W, XtH) + _fro_dot(W.T @ W, HtH)
    return H, new, obj
