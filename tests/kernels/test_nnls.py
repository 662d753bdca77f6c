"""Batched NNLS (scatlas.kernels.nnls): exactness against SciPy, KKT, HALS convergence."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import nnls as scipy_nnls

from scatlas.kernels import nnls as nnls_mod
from scatlas.kernels.nnls import kkt_violation, nnls_bpp, nnls_hals


def _problem(m: int, k: int, r: int, cond: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A (m, k) with condition number ``cond`` and B (m, r) of mixed sign (many active bounds)."""
    rng = np.random.default_rng(seed)
    U, _, Vt = np.linalg.svd(rng.normal(size=(m, k)), full_matrices=False)
    A = U @ np.diag(np.logspace(0, -np.log10(cond), k)) @ Vt
    B = rng.normal(size=(m, r)) + A @ np.abs(rng.normal(size=(k, r)))
    return A, B


def _scipy_columns(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    return np.stack([scipy_nnls(A, B[:, j], maxiter=50 * A.shape[1])[0] for j in range(B.shape[1])],
                    axis=1)


def _objective(A: np.ndarray, B: np.ndarray, X: np.ndarray) -> np.ndarray:
    return ((A @ X - B) ** 2).sum(axis=0)


def _objective_rounding(A: np.ndarray, B: np.ndarray, X: np.ndarray) -> float:
    """Bound on the float64 rounding error of ``_objective(A, B, X).sum()``.

    The residual R = A X - B is computed with |dR| <= (k + 1) eps (|A| |X| + |B|) entrywise (a
    length-k dot product, then one subtraction); f = ||R||_F^2 then moves by at most
    2 ||R||_F ||dR||_F + (m r) eps f (first order, plus the summation of m r squares). Two
    objectives that differ by less than the sum of their bounds are equal to rounding.
    """
    eps = np.finfo(np.float64).eps
    R = A @ X - B
    dR = (A.shape[1] + 1) * eps * (np.abs(A) @ np.abs(X) + np.abs(B))
    f = float((R**2).sum())
    return 2.0 * np.linalg.norm(R) * np.linalg.norm(dR) + R.size * eps * f


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4])
def test_bpp_equals_scipy_column_by_column(cond):
    A, B = _problem(60, 15, 300, cond, seed=int(cond))
    X = nnls_bpp(A.T @ A, A.T @ B)
    ref = _scipy_columns(A, B)
    assert X.shape == (15, 300) and X.dtype == np.float64
    assert (X >= 0).all()
    # same minimiser; objectives equal to rounding, solutions to the conditioning
    np.testing.assert_allclose(_objective(A, B, X), _objective(A, B, ref), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(X, ref, atol=1e-9 * cond * np.abs(ref).max())
    # zero patterns agree where SciPy's value is clearly non-zero / clearly zero
    assert ((X > 0) == (ref > 0))[np.abs(ref) > 1e-6].all()


@pytest.mark.parametrize("cond", [1.0, 1e3])
def test_bpp_meets_kkt_conditions(cond):
    A, B = _problem(40, 20, 500, cond, seed=7)
    C, D = A.T @ A, A.T @ B
    X = nnls_bpp(C, D)
    G = C @ X - D
    scale = np.abs(D).max()
    assert X.min() >= 0
    assert G[X == 0].min() >= -1e-10 * scale  # gradient >= 0 on the active set
    assert np.abs(G[X > 0]).max() <= 1e-9 * scale  # stationary on the passive set
    assert kkt_violation(C, D, X) < 1e-9


def test_bpp_float32_in_float32_out_and_accurate():
    A, B = _problem(50, 12, 200, 10.0, seed=3)
    C, D = (A.T @ A).astype(np.float32), (A.T @ B).astype(np.float32)
    X = nnls_bpp(C, D)
    assert X.dtype == np.float32
    ref = _scipy_columns(A, B)
    np.testing.assert_allclose(X, ref, atol=1e-4 * np.abs(ref).max())
    assert kkt_violation(C.astype(np.float64), D.astype(np.float64), X.astype(np.float64)) < 1e-4


def test_warm_start_and_backup_rule_give_the_same_minimiser():
    A, B = _problem(50, 18, 400, 1e2, seed=11)
    C, D = A.T @ A, A.T @ B
    cold = nnls_bpp(C, D)
    rng = np.random.default_rng(0)
    warm = nnls_bpp(C, D, X0=rng.random(cold.shape) - 0.5)  # random initial passive sets
    backup = nnls_bpp(C, D, p_bar=0)  # the single-exchange backup rule takes over at once
    np.testing.assert_allclose(warm, cold, atol=1e-10)
    np.testing.assert_allclose(backup, cold, atol=1e-10)


def test_repeated_and_all_positive_columns_use_grouped_solves():
    """Many identical passive sets (grouped path) and all-passive columns (one LU, many RHS)."""
    rng = np.random.default_rng(5)
    A = np.abs(rng.normal(size=(40, 10))) + 0.1
    Xtrue = np.abs(rng.normal(size=(10, 600))) + 0.5  # strictly positive: all passive
    B_pos = A @ Xtrue
    base = rng.normal(size=(40, 3))
    B_rep = np.repeat(base, 200, axis=1) * rng.uniform(0.5, 2.0, size=600)  # 3 patterns
    for B in (B_pos, B_rep):
        X = nnls_bpp(A.T @ A, A.T @ B)
        np.testing.assert_allclose(X, _scipy_columns(A, B), atol=1e-9 * np.abs(X).max())
    np.testing.assert_allclose(nnls_bpp(A.T @ A, A.T @ B_pos), Xtrue, rtol=1e-8)


def test_threaded_rows_match_single_thread(monkeypatch):
    A, B = _problem(30, 8, 5000, 10.0, seed=2)
    C, D = A.T @ A, A.T @ B
    monkeypatch.setenv("SCATLAS_NUM_THREADS", "1")
    one = nnls_bpp(C, D)
    monkeypatch.setenv("SCATLAS_NUM_THREADS", "3")
    three = nnls_bpp(C, D)
    np.testing.assert_allclose(one, three, rtol=1e-12, atol=1e-12)


def test_zero_gram_diagonal_is_pinned_to_zero():
    """A variable absent from the data (zero column of A) stays 0, nothing becomes NaN."""
    A, B = _problem(30, 6, 50, 1.0, seed=4)
    A[:, 2] = 0.0
    X = nnls_bpp(A.T @ A, A.T @ B)
    assert np.isfinite(X).all() and (X[2] == 0).all()
    np.testing.assert_allclose(X, _scipy_columns(A, B), atol=1e-9)


def test_collinear_columns_do_not_crash():
    rng = np.random.default_rng(8)
    A = np.abs(rng.normal(size=(30, 5)))
    A = np.column_stack([A, A[:, 0]])  # exactly collinear pair: singular Gram
    B = A @ np.abs(rng.normal(size=(6, 40)))
    X = nnls_bpp(A.T @ A, A.T @ B)
    assert np.isfinite(X).all() and (X >= 0).all()
    np.testing.assert_allclose(_objective(A, B, X), 0.0, atol=1e-8 * (B**2).sum())


@pytest.mark.parametrize("cond", [1.0, 30.0])
def test_hals_converges_to_bpp_solution(cond):
    A, B = _problem(50, 10, 200, cond, seed=21)
    C, D = A.T @ A, A.T @ B
    exact = nnls_bpp(C, D)
    X0 = np.ones_like(exact)
    one = nnls_hals(C, D, X0, 1)
    many = nnls_hals(C, D, X0, 3000)
    assert (one >= 0).all() and (X0 == 1).all()  # X0 untouched
    Xs = (X0, one, many, exact)
    obj = [_objective(A, B, X).sum() for X in Xs]
    tol = [_objective_rounding(A, B, X) for X in Xs]
    # Non-increasing up to rounding: with cond = 1 (A^T A = I to rounding) one exact coordinate
    # sweep already reaches the minimiser, so one, many and exact tie and a strict >= compared
    # rounding noise (1e-16 relative). The bound (~1e-11 of the objective here) still fails a
    # sweep that raises the objective by more than rounding, and the next assert pins the answer.
    for i in range(3):
        assert obj[i] >= obj[i + 1] - (tol[i] + tol[i + 1]), (i, obj, tol)
    np.testing.assert_allclose(many, exact, atol=1e-6 * np.abs(exact).max())


def test_hals_sweeps_never_increase_the_objective():
    A, B = _problem(40, 12, 100, 100.0, seed=9)
    C, D = A.T @ A, A.T @ B
    X = np.full((12, 100), 2.0)
    prev, prev_tol = _objective(A, B, X).sum(), _objective_rounding(A, B, X)
    first = prev
    for _ in range(20):
        X = nnls_hals(C, D, X, 1)
        cur, cur_tol = _objective(A, B, X).sum(), _objective_rounding(A, B, X)
        assert cur <= prev + prev_tol + cur_tol  # exact coordinate descent: up to rounding
        prev, prev_tol = cur, cur_tol
    assert prev < first - 1e3 * prev_tol  # and the sweeps do descend (X = 2 is no minimiser)


def test_group_rows_handles_more_than_62_variables():
    rng = np.random.default_rng(0)
    F = rng.random((50, 130)) < 0.5
    F = np.vstack([F, F[:10]])  # 10 repeated rows
    P, gid = nnls_mod._group_rows(np, F)
    assert P.shape[0] == 50
    np.testing.assert_array_equal(P[gid], F)


def test_bad_shapes_raise():
    C = np.eye(3)
    with pytest.raises(ValueError, match="AtB"):
        nnls_bpp(C, np.ones((4, 2)))
    with pytest.raises(ValueError, match="square"):
        nnls_bpp(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="X0"):
        nnls_hals(C, np.ones((3, 2)), np.ones((2, 3)))


def test_empty_right_hand_side():
    assert nnls_bpp(np.eye(4), np.zeros((4, 0))).shape == (4, 0)


@pytest.mark.gpu
def test_gpu_matches_cpu():
    cp = pytest.importorskip("cupy")
    A, B = _problem(50, 20, 3000, 1e2, seed=12)
    C, D = A.T @ A, A.T @ B
    D[:, 1000:2000] = D[:, [0]]  # a large group of identical passive sets
    cpu = nnls_bpp(C, D)
    gpu = nnls_bpp(cp.asarray(C), cp.asarray(D))
    assert isinstance(gpu, cp.ndarray) and gpu.dtype == cp.float64
    np.testing.assert_allclose(gpu.get(), cpu, atol=1e-9 * np.abs(cpu).max())
    g32 = nnls_bpp(cp.asarray(C, dtype=cp.float32), cp.asarray(D, dtype=cp.float32))
    assert g32.dtype == cp.float32
    h = nnls_hals(cp.asarray(C), cp.asarray(D), cp.ones_like(cp.asarray(D)), 5)
    np.testing.assert_allclose(h.get(), nnls_hals(C, D, np.ones_like(D), 5), rtol=1e-9,
                               atol=1e-12)
    F = np.random.default_rng(0).random((40, 130)) < 0.5
    P, gid = nnls_mod._group_rows(cp, cp.asarray(F))
    np.testing.assert_array_equal(P[gid].get(), F)


def test_iteration_cap_returns_a_nonnegative_answer():
    A, B = _problem(60, 15, 300, 1e4, seed=10000)  # needs > 75 rounds for a few columns
    C, D = A.T @ A, A.T @ B
    capped = nnls_bpp(C, D, max_iter=5)
    assert np.isfinite(capped).all() and (capped >= 0).all()
    full = nnls_bpp(C, D)
    ref = _scipy_columns(A, B)
    np.testing.assert_allclose(_objective(A, B, full), _objective(A, B, ref), rtol=1e-9)
    assert (_objective(A, B, capped) >= _objective(A, B, ref) * (1 - 1e-9)).all()
