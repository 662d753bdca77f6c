"""iNMF / UINMF / joint NMF (scatlas.kernels.nmf)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scatlas._validate import ScatlasInputError
from scatlas.kernels.liger_prep import GeneMoments, excess_variance, liger_transform, row_totals
from scatlas.kernels.nmf import INMFResult, inmf, inmf_objective, jnmf, uinmf
from scatlas.kernels.quantile import quantile_norm
from tests.helpers.inmf_models import matched_cosines, planted_inmf

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _dense_objective(Xs, W, Vs, Hs, lam, Ps=None, Us=None) -> float:
    total = 0.0
    for i, (X, V, H) in enumerate(zip(Xs, Vs, Hs, strict=True)):
        X = X.toarray() if sp.issparse(X) else X
        total += ((X - H @ (W + V).T) ** 2).sum() + lam * ((H @ V.T) ** 2).sum()
        if Ps is not None and Ps[i] is not None:
            P = Ps[i].toarray() if sp.issparse(Ps[i]) else Ps[i]
            total += ((P - H @ Us[i].T) ** 2).sum() + lam * ((H @ Us[i].T) ** 2).sum()
    return float(total)


def _assert_monotone(obj: np.ndarray, rtol: float) -> None:
    """Float64 runs: every step non-increasing up to ``rtol`` of the objective (1e-12 is far
    above the float64 rounding of the objective, ~3 sqrt(n) eps64 sum ||X||^2 < 1e-13 of it)."""
    steps = np.diff(obj)
    assert (steps <= rtol * obj[:-1]).all(), f"objective increased: max step {steps.max()}"


def _assert_monotone_float32(obj: np.ndarray, Xs: list) -> None:
    """Float32 runs: non-increasing up to the objective's float32 rounding.

    The objective is sum ||X||^2 - 2 <L, X^T H> + <L^T L, H^T H> (+ penalties), with X^T H and
    H^T H float32 sums over n cells: each carries a relative error ~ sqrt(n) u32 (u32 = eps32 / 2,
    the probabilistic bound of Higham & Mary 2019 with lambda = 1), and each of the three terms is
    at most sum ||X||^2, so the computed objective moves by up to 3 sqrt(n) u32 sum ||X||^2
    (~1e-4 of the objective at a 3% residual). The former rtol 1e-5 of the objective was ~2 eps32
    sum ||X||^2, below that rounding (BPP steps of 2.2 eps32 sum ||X||^2 were seen at seed 3).
    A solver that raises the objective by more than rounding still fails.
    """
    n = max(X.shape[0] for X in Xs)
    total = sum(float((np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64) ** 2)
                      .sum()) for X in Xs)
    tol = 3.0 * np.sqrt(n) * (np.finfo(np.float32).eps / 2) * total
    steps = np.diff(obj)
    assert (steps <= tol).all(), f"objective increased: max step {steps.max()} > {tol}"


# --------------------------------------------------------------------------------------------
# objective and descent
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["bpp", "hals"])
def test_objective_never_increases_float64(solver):
    Xs, *_ = planted_inmf(noise=0.2, seed=1)
    res = inmf(Xs, k=6, lam=5.0, n_iter=40, solver=solver, dtype=np.float64)
    assert isinstance(res, INMFResult) and res.objective.shape == (40,)
    _assert_monotone(res.objective, 1e-12)
    assert res.objective[-1] < 0.5 * res.objective[0]


@pytest.mark.parametrize("solver", ["bpp", "hals"])
def test_objective_never_increases_float32(solver):
    Xs, *_ = planted_inmf(noise=0.2, seed=2)
    res = inmf([sp.csr_matrix(X) for X in Xs], k=5, n_iter=30, solver=solver)
    assert res.W.dtype == np.float32 and res.H[0].dtype == np.float32
    _assert_monotone_float32(res.objective, Xs)
    assert res.objective[-1] < 0.5 * res.objective[0]


@pytest.mark.parametrize("lam", [0.0, 5.0])
def test_efficient_objective_equals_dense_formula(lam):
    Xs, *_ = planted_inmf(noise=0.3, seed=3)
    res = inmf(Xs, k=5, lam=lam, n_iter=7, dtype=np.float64)
    dense = _dense_objective(Xs, res.W, res.V, res.H, lam)
    assert res.objective[-1] == pytest.approx(dense, rel=1e-10)
    assert inmf_objective(Xs, res.W, res.V, res.H, lam) == pytest.approx(dense, rel=1e-10)
    # arbitrary (non-optimal) factors too, with sparse data
    rng = np.random.default_rng(0)
    W, Vs = rng.random((60, 5)), [rng.random((60, 5)) for _ in Xs]
    Hs = [rng.random((X.shape[0], 5)) for X in Xs]
    sparse = [sp.csr_matrix(X) for X in Xs]
    assert inmf_objective(sparse, W, Vs, Hs, lam) == pytest.approx(
        _dense_objective(Xs, W, Vs, Hs, lam), rel=1e-10
    )


def test_per_dataset_lambda():
    Xs, *_ = planted_inmf(noise=0.3, seed=4)
    lams = [0.5, 5.0, 20.0]
    res = inmf(Xs, k=5, lam=lams, n_iter=10, dtype=np.float64)
    assert res.lam == lams
    dense = sum(
        _dense_objective([X], res.W, [V], [H], la)
        for X, V, H, la in zip(Xs, res.V, res.H, lams, strict=True)
    )
    assert res.objective[-1] == pytest.approx(dense, rel=1e-10)
    # a larger penalty shrinks the dataset-specific part
    assert np.linalg.norm(res.H[2] @ res.V[2].T) < np.linalg.norm(res.H[0] @ res.V[0].T)


# --------------------------------------------------------------------------------------------
# recovery of a planted model
# --------------------------------------------------------------------------------------------


def test_recovers_planted_shared_factors_noiseless():
    """V_i = 0 planted: the global minimum is 0 for any lam; W is identifiable (sparse H)."""
    Xs, W, _, _ = planted_inmf(n_cells=(150, 120), m=80, k=5, v_scale=0.0, seed=5)
    res = inmf(Xs, k=5, lam=5.0, n_iter=150, dtype=np.float64)
    total = sum((X**2).sum() for X in Xs)
    assert res.objective[-1] / total < 1e-8
    assert matched_cosines(res.W, W).min() > 0.999
    assert max(np.abs(V).max() for V in res.V) < 1e-3 * np.abs(res.W).max()


def test_recovers_planted_factors_low_noise_hals():
    Xs, W, _, _ = planted_inmf(n_cells=(200, 160), m=80, k=5, noise=0.01, v_scale=0.0, seed=6)
    res = inmf(Xs, k=5, lam=5.0, n_iter=300, solver="hals", dtype=np.float64)
    total = sum((X**2).sum() for X in Xs)
    assert res.objective[-1] / total < 1e-3
    assert matched_cosines(res.W, W).min() > 0.99


def test_bpp_blocks_are_exact_minimisers():
    """After a BPP iteration, H_i satisfies the KKT conditions of its own NNLS block."""
    Xs, *_ = planted_inmf(noise=0.2, seed=7)
    res = inmf(Xs, k=5, lam=5.0, n_iter=3, dtype=np.float64)
    # H_i was computed with the V_i, W of the previous step; check V_i's block instead, which
    # was computed with the final H_i and the W of before the W update: check W's block, the
    # last one, exactly: W minimises sum_i ||X_i - H_i (W + V_i)^T||^2 given H_i, V_i.
    G = sum(H.T @ H for H in res.H)
    R = sum(X.T @ H - V @ (H.T @ H) for X, V, H in zip(Xs, res.V, res.H, strict=True))
    grad = res.W @ G - R
    scale = np.abs(R).max()
    assert grad[res.W == 0].min() >= -1e-9 * scale
    assert np.abs(grad[res.W > 0]).max() <= 1e-8 * scale


# --------------------------------------------------------------------------------------------
# restarts, seeds, dtypes, sparse input, init
# --------------------------------------------------------------------------------------------


def test_restarts_really_restart_and_keep_the_best():
    Xs, *_ = planted_inmf(noise=0.5, seed=8)
    res = inmf(Xs, k=6, n_iter=8, n_restarts=3, seed=10, dtype=np.float64)
    finals = res.restart_objectives
    assert len(finals) == 3 and len(set(finals)) == 3  # three different fits
    best = int(np.argmin(finals))
    assert res.seed == 10 + best
    assert res.objective[-1] == min(finals)
    for r in range(3):  # restart r is the single fit with seed + r
        single = inmf(Xs, k=6, n_iter=8, seed=10 + r, dtype=np.float64)
        assert single.objective[-1] == pytest.approx(finals[r], rel=1e-12)
    again = inmf(Xs, k=6, n_iter=8, seed=10 + best, dtype=np.float64)
    np.testing.assert_allclose(again.W, res.W, rtol=1e-12, atol=1e-12)


def test_same_seed_identical_different_seed_differs():
    Xs, *_ = planted_inmf(noise=0.3, seed=9)
    a = inmf(Xs, k=4, n_iter=5, seed=3)
    b = inmf(Xs, k=4, n_iter=5, seed=3)
    c = inmf(Xs, k=4, n_iter=5, seed=4)
    np.testing.assert_array_equal(a.W, b.W)
    for Ha, Hb in zip(a.H, b.H, strict=True):
        np.testing.assert_array_equal(Ha, Hb)
    np.testing.assert_array_equal(a.objective, b.objective)
    assert not np.allclose(a.W, c.W)


def test_sparse_input_equals_dense_input():
    Xs, *_ = planted_inmf(noise=0.3, seed=10)
    Xs = [X * (X > np.quantile(X, 0.5)) for X in Xs]  # half zeros
    dense = inmf(Xs, k=5, n_iter=10, dtype=np.float64)
    for fmt in ("csr", "csc"):
        sparse = inmf([sp.csr_matrix(X).asformat(fmt) for X in Xs], k=5, n_iter=10,
                      dtype=np.float64)
        np.testing.assert_allclose(sparse.objective, dense.objective, rtol=1e-10)
        np.testing.assert_allclose(sparse.W, dense.W, rtol=1e-7, atol=1e-9)
        for Hs, Hd in zip(sparse.H, dense.H, strict=True):
            np.testing.assert_allclose(Hs, Hd, rtol=1e-7, atol=1e-9)


def test_dtypes_and_shapes():
    Xs, *_ = planted_inmf(seed=11)
    ints = [np.rint(10 * X).astype(np.int64) for X in Xs]
    r32 = inmf(ints, k=3, n_iter=2)
    r64 = inmf(ints, k=3, n_iter=2, dtype="float64")
    assert r32.W.dtype == np.float32 and r64.W.dtype == np.float64
    assert r64.W.shape == (60, 3)
    assert [V.shape for V in r64.V] == [(60, 3)] * 3
    assert [H.shape for H in r64.H] == [(120, 3), (90, 3), (150, 3)]
    assert all((A >= 0).all() for A in [r64.W, *r64.V, *r64.H])
    assert r64.objective.dtype == np.float64 and r64.n_iter == 2


def test_user_init_replaces_the_draws():
    Xs, *_ = planted_inmf(noise=0.2, seed=12)
    rng = np.random.default_rng(0)
    init = {"W": rng.uniform(0, 2, (60, 4)), "V": [rng.uniform(0, 2, (60, 4)) for _ in Xs],
            "H": [rng.uniform(0, 2, (X.shape[0], 4)) for X in Xs]}
    a = inmf(Xs, k=4, n_iter=4, seed=1, init=init, dtype=np.float64)
    b = inmf(Xs, k=4, n_iter=4, seed=99, init=init, dtype=np.float64)
    np.testing.assert_allclose(a.W, b.W, rtol=1e-12)
    with pytest.raises(ScatlasInputError, match="shape"):
        inmf(Xs, k=4, init={"W": np.ones((60, 5))})
    with pytest.raises(ScatlasInputError, match="unknown key"):
        inmf(Xs, k=4, init={"Q": np.ones((60, 4))})


def test_tolerance_stops_early():
    Xs, *_ = planted_inmf(noise=0.2, seed=13)
    res = inmf(Xs, k=4, n_iter=200, tol=1e-4, dtype=np.float64)
    assert res.converged and res.n_iter < 200
    o = res.objective
    assert abs(o[-2] - o[-1]) / ((o[-2] + o[-1]) / 2) < 1e-4
    full = inmf(Xs, k=4, n_iter=30)
    assert not full.converged and full.n_iter == 30


def test_single_dataset_is_plain_nmf_with_penalty():
    Xs, *_ = planted_inmf(n_cells=(100,), noise=0.1, seed=14)
    res = inmf(Xs, k=4, n_iter=20, dtype=np.float64)
    _assert_monotone(res.objective, 1e-12)
    assert len(res.H) == 1


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def test_validation_errors():
    Xs, *_ = planted_inmf(seed=15)
    bad = [X.copy() for X in Xs]
    bad[1][0, 0] = -1.0
    with pytest.raises(ScatlasInputError, match=r"Xs\[1\].*negative"):
        inmf(bad, k=3)
    bad = [X.copy() for X in Xs]
    bad[2][3, 3] = np.nan
    with pytest.raises(ScatlasInputError, match=r"Xs\[2\].*NaN"):
        inmf(bad, k=3)
    bad = [X.copy() for X in Xs]
    bad[0][[4, 7]] = 0.0
    with pytest.raises(ScatlasInputError, match=r"Xs\[0\] has 2 all-zero cell"):
        inmf([sp.csr_matrix(X) for X in bad], k=3)
    bad = [X.copy() for X in Xs]
    for X in bad:
        X[:, [1, 2, 3]] = 0.0
    with pytest.raises(ScatlasInputError, match="3 gene"):
        inmf(bad, k=3)
    with pytest.raises(ScatlasInputError, match="same features"):
        inmf([Xs[0], Xs[1][:, :50]], k=3)
    with pytest.raises(ScatlasInputError, match="empty"):
        inmf([], k=3)
    with pytest.raises(ScatlasInputError, match="list"):
        inmf(Xs[0], k=3)
    with pytest.raises(ScatlasInputError, match="number of cells"):
        inmf(Xs, k=90)
    with pytest.raises(ScatlasInputError, match="number of genes"):
        inmf([X[:, :5] for X in Xs], k=5)
    with pytest.raises(ScatlasInputError, match="k must be"):
        inmf(Xs, k=0)
    with pytest.raises(ScatlasInputError, match="solver"):
        inmf(Xs, k=3, solver="mu")
    with pytest.raises(ScatlasInputError, match="lam"):
        inmf(Xs, k=3, lam=-1.0)
    with pytest.raises(ScatlasInputError, match="lam"):
        inmf(Xs, k=3, lam=[1.0, 2.0])
    with pytest.raises(ScatlasInputError, match="n_restarts"):
        inmf(Xs, k=3, n_restarts=0)
    with pytest.raises(ValueError, match="dtype"):
        inmf(Xs, k=3, dtype=np.int32)


def test_gene_zero_in_one_dataset_only_is_allowed():
    Xs, *_ = planted_inmf(noise=0.1, seed=16)
    Xs[0][:, :4] = 0.0
    res = inmf(Xs, k=4, n_iter=10, dtype=np.float64)
    _assert_monotone(res.objective, 1e-12)
    assert np.isfinite(res.W).all() and (res.V[0][:4] == 0).all()  # V_0 >= 0 cannot cancel W


# --------------------------------------------------------------------------------------------
# UINMF
# --------------------------------------------------------------------------------------------


def _unshared(Xs, Hs, u=(15, None, 10), seed=0):
    rng = np.random.default_rng(seed)
    Ps, Us = [], []
    for H, ui in zip(Hs, u, strict=True):
        if ui is None:
            Ps.append(None)
            Us.append(None)
            continue
        U = rng.gamma(0.5, 1.0, (ui, H.shape[1]))
        Ps.append(H @ U.T + 0.05 * rng.random((H.shape[0], ui)))
        Us.append(U)
    return Ps, Us


@pytest.mark.parametrize("solver", ["bpp", "hals"])
def test_uinmf_descends_and_objective_matches_dense(solver):
    Xs, W, Vs, Hs = planted_inmf(noise=0.1, seed=17)
    Ps, _ = _unshared(Xs, Hs)
    res = uinmf(Xs, Ps, k=4, lam=[5.0, 1.0, 5.0], n_iter=25, solver=solver, dtype=np.float64)
    _assert_monotone(res.objective, 1e-12)
    assert res.U[1] is None and res.U[0].shape == (15, 4) and res.U[2].shape == (10, 4)
    dense = sum(
        _dense_objective([X], res.W, [V], [H], la, [P], [U])
        for X, V, H, la, P, U in zip(Xs, res.V, res.H, res.lam, Ps, res.U, strict=True)
    )
    assert res.objective[-1] == pytest.approx(dense, rel=1e-10)
    assert inmf_objective(Xs, res.W, res.V, res.H, res.lam, Us=Ps, U=res.U) == pytest.approx(
        dense, rel=1e-10
    )


def test_uinmf_without_unshared_features_is_inmf():
    Xs, *_ = planted_inmf(noise=0.2, seed=18)
    rng = np.random.default_rng(1)
    init = {"W": rng.uniform(0, 2, (60, 4)), "V": [rng.uniform(0, 2, (60, 4)) for _ in Xs],
            "H": [rng.uniform(0, 2, (X.shape[0], 4)) for X in Xs]}
    a = uinmf(Xs, [None] * 3, k=4, n_iter=6, init=init, dtype=np.float64)
    b = inmf(Xs, k=4, n_iter=6, init=init, dtype=np.float64)
    np.testing.assert_allclose(a.objective, b.objective, rtol=1e-12)
    np.testing.assert_allclose(a.W, b.W, rtol=1e-10, atol=1e-12)


def test_uinmf_unshared_features_help_the_fit_and_validate():
    Xs, W, Vs, Hs = planted_inmf(noise=0.05, seed=19)
    Ps, _ = _unshared(Xs, Hs)
    sparse_P = [None if P is None else sp.csr_matrix(P) for P in Ps]
    res = uinmf([sp.csr_matrix(X) for X in Xs], sparse_P, k=4, lam=0.0, n_iter=60)
    recon = np.linalg.norm(Ps[0] - res.H[0] @ res.U[0].T) / np.linalg.norm(Ps[0])
    assert recon < 0.1
    # with lam > 0 the last U_i is the exact minimiser of its block given the final H_i:
    # (1 + lam) U H^T H = P^T H on U > 0, gradient >= 0 on U == 0
    lam = 5.0
    res = uinmf(Xs, Ps, k=4, lam=lam, n_iter=10, dtype=np.float64)
    for P, H, U in zip(Ps, res.H, res.U, strict=True):
        if P is None:
            continue
        grad = (1 + lam) * U @ (H.T @ H) - P.T @ H
        scale = np.abs(P.T @ H).max()
        assert np.abs(grad[U > 0]).max() < 1e-9 * scale
        assert grad[U == 0].min() > -1e-9 * scale
    with pytest.raises(ScatlasInputError, match="same cells"):
        uinmf(Xs, [Ps[0][:10], None, None], k=4)
    with pytest.raises(ScatlasInputError, match="one entry"):
        uinmf(Xs, [None], k=4)
    with pytest.raises(ScatlasInputError, match=r"Us\[2\].*negative"):
        uinmf(Xs, [None, None, -Ps[2]], k=4)


# --------------------------------------------------------------------------------------------
# joint NMF
# --------------------------------------------------------------------------------------------


def test_jnmf_recovers_shared_cell_factors():
    rng = np.random.default_rng(20)
    n, k = 200, 4
    H = rng.gamma(1.0, 1.0, (n, k)) * (rng.random((n, k)) < 0.5)
    H[np.arange(n), rng.integers(0, k, n)] += 1.0
    Ws = [rng.gamma(0.5, 1.0, (m, k)) + 0.01 for m in (50, 30)]
    Xs = [H @ W.T for W in Ws]
    res = jnmf(Xs, k=k, n_iter=150, dtype=np.float64)
    _assert_monotone(res.objective, 1e-12)
    total = sum((X**2).sum() for X in Xs)
    assert res.objective[-1] / total < 1e-7
    assert matched_cosines(res.H, H).min() > 0.999
    dense = sum(((X - res.H @ W.T) ** 2).sum() for X, W in zip(Xs, res.W, strict=True))
    assert res.objective[-1] == pytest.approx(dense, rel=1e-6, abs=1e-9 * total)
    with pytest.raises(ScatlasInputError, match="same cells"):
        jnmf([Xs[0], Xs[1][:100]], k=3)


def test_jnmf_hals_and_restarts():
    rng = np.random.default_rng(21)
    Xs = [rng.random((80, 30)), rng.random((80, 12))]
    res = jnmf(Xs, k=3, n_iter=20, solver="hals", n_restarts=2, seed=5)
    _assert_monotone_float32(res.objective, Xs)
    assert len(res.restart_objectives) == 2
    assert res.seed == 5 + int(np.argmin(res.restart_objectives))
    assert res.H.shape == (80, 3) and [W.shape for W in res.W] == [(30, 3), (12, 3)]


# --------------------------------------------------------------------------------------------
# real data: CellBench lung cell lines, 5 batches
# --------------------------------------------------------------------------------------------


def liger_preprocess(adata, batch_key="batch", n_genes=1500, alpha=0.99, thresh=0.1):
    """rliger's pipeline (scatlas.kernels.liger_prep): normalize (no log), Poisson excess
    variance per batch, scaleNotCenter (per-batch gene RMS); the genes are the ``n_genes``
    passing in some batch with the highest score (max over batches), the set the libplanc
    objective below was measured on. Returns per-batch CSR float64 matrices (cells x genes) and
    the cell indices of each batch."""
    X = sp.csr_matrix(adata.X, dtype=np.float64)
    batches = list(adata.obs[batch_key].astype("category").cat.categories)
    parts, idx = [], []
    for b in batches:
        sel = np.flatnonzero((adata.obs[batch_key] == b).to_numpy())
        sel = sel[row_totals(X[sel]) > 0]
        parts.append(X[sel])
        idx.append(sel)
    moments = [GeneMoments.from_counts(P) for P in parts]
    score = np.zeros(X.shape[1])
    for m in moments:
        s, above = excess_variance(m, alpha=alpha, n_tests=X.shape[1])
        score = np.maximum(score, np.where(above & (s > thresh), s, 0.0))
    genes = np.argsort(-score)[:n_genes]
    out = [liger_transform(P, genes, m.rms[genes], dtype=np.float64)
           for P, m in zip(parts, moments, strict=True)]
    return out, idx


def _cross_batch_knn_accuracy(H, labels, batches, k=15):
    from sklearn.neighbors import KNeighborsClassifier

    Hn = H / np.linalg.norm(H, axis=1, keepdims=True)
    accs = []
    for b in np.unique(batches):
        q = batches == b
        clf = KNeighborsClassifier(n_neighbors=k).fit(Hn[~q], labels[~q])
        accs.append(float((clf.predict(Hn[q]) == labels[q]).mean()))
    return np.array(accs)


@pytest.fixture(scope="module")
def cellbench_inmf(cellbench):
    Xs, idx = liger_preprocess(cellbench)
    res = inmf(Xs, k=20, lam=5.0, seed=1, dtype=np.float64)  # LIGER defaults, 30 iterations
    order = np.concatenate(idx)
    labels = cellbench.obs["cell_line"].to_numpy()[order]
    batches = cellbench.obs["batch"].to_numpy()[order]
    return Xs, res, labels, batches


def test_cellbench_matches_libplanc_objective(cellbench_inmf):
    """Same init (U(0,2) from default_rng(1): W, V_1..5, H_1..5) fed to pyplanc 0.0.2's
    bppinmf(k=20, lambda=5, niter=30) gave objErr 639483.8468369724 (libplanc's BPP iNMF):
    exact block updates make the 30-iteration objective agree to rounding."""
    _, res, _, _ = cellbench_inmf
    assert [H.shape[0] for H in res.H] == [240, 156, 163, 252, 210]
    assert res.objective[-1] == pytest.approx(639483.8468369724, rel=1e-8)
    _assert_monotone(res.objective, 1e-12)


def test_cellbench_cell_lines_cluster_across_batches(cellbench_inmf):
    """kNN (k=15, cosine) label transfer from the other 4 batches to each batch, on raw H
    (no quantile normalisation). Chance is <= 0.4 (largest cell line share); measured
    0.99-1.0 per batch."""
    _, res, labels, batches = cellbench_inmf
    acc = _cross_batch_knn_accuracy(np.vstack(res.H), labels, batches)
    assert acc.min() > 0.9, acc


def test_cellbench_quantile_norm_improves_mixing_keeps_labels(cellbench_inmf):
    """quantile_norm (LIGER defaults) on the iNMF fit above: measured cross-batch kNN label
    transfer 0.98-1.0 per batch (raw H: 0.99-1.0); the fraction of a cell's 15 nearest
    neighbours (Euclidean) from another batch rises from 0.58 to 0.64 (at most ~0.8 here)."""
    from sklearn.neighbors import NearestNeighbors

    _, res, labels, batches = cellbench_inmf
    q = quantile_norm(res.H)
    assert q.reference == 3  # the largest batch (252 cells)

    def mixing(H):
        ind = NearestNeighbors(n_neighbors=16).fit(H).kneighbors(H, return_distance=False)
        return float((batches[ind[:, 1:]] != batches[:, None]).mean())

    raw, norm = np.vstack(res.H), np.vstack(q.H_norm)
    assert mixing(norm) > mixing(raw) + 0.03
    assert _cross_batch_knn_accuracy(norm, labels, batches).min() > 0.9


# --------------------------------------------------------------------------------------------
# GPU (skipped without CuPy and a CUDA device)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_inmf_uinmf_jnmf_match_cpu():
    cp = pytest.importorskip("cupy")
    import cupyx.scipy.sparse as csp

    Xs, _, _, Hs = planted_inmf(noise=0.2, seed=30)
    cpu = inmf(Xs, k=5, n_iter=10, dtype=np.float64)
    gpu = inmf([csp.csr_matrix(sp.csr_matrix(X)) for X in Xs], k=5, n_iter=10, dtype=np.float64)
    assert isinstance(gpu.W, cp.ndarray) and isinstance(gpu.H[0], cp.ndarray)
    np.testing.assert_allclose(gpu.objective, cpu.objective, rtol=1e-8)
    np.testing.assert_allclose(gpu.W.get(), cpu.W, rtol=1e-6, atol=1e-8)
    dense = inmf([cp.asarray(X) for X in Xs], k=5, n_iter=10, dtype=np.float64, solver="hals")
    np.testing.assert_allclose(
        dense.objective, inmf(Xs, k=5, n_iter=10, dtype=np.float64, solver="hals").objective,
        rtol=1e-8,
    )
    moved = inmf(Xs, k=5, n_iter=10, device="gpu")  # NumPy in, computed on the GPU, NumPy out
    assert isinstance(moved.W, np.ndarray)
    Ps, _ = _unshared(Xs, Hs)
    ug = uinmf([cp.asarray(X) for X in Xs], [None if P is None else cp.asarray(P) for P in Ps],
               k=4, n_iter=5, dtype=np.float64)
    uc = uinmf(Xs, Ps, k=4, n_iter=5, dtype=np.float64)
    np.testing.assert_allclose(ug.objective, uc.objective, rtol=1e-8)
    jg = jnmf([cp.asarray(X) for X in Xs[:1]] * 2, k=3, n_iter=5, dtype=np.float64)
    jc = jnmf(Xs[:1] * 2, k=3, n_iter=5, dtype=np.float64)
    np.testing.assert_allclose(jg.objective, jc.objective, rtol=1e-8)
