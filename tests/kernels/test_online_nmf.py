"""Online iNMF, scenarios 1-3 (scatlas.kernels.online_nmf)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import nnls as scipy_nnls

from scatlas._validate import ScatlasInputError
from scatlas.kernels.nmf import inmf
from scatlas.kernels.nnls import nnls_bpp
from scatlas.kernels.online_nmf import OnlineINMFResult, online_inmf, project_inmf
from tests.helpers.inmf_models import matched_cosines, planted_inmf


@pytest.fixture(scope="module")
def planted():
    return planted_inmf(n_cells=(1500, 1200, 1000), m=80, k=5, noise=0.05, v_scale=0.1, seed=0)


@pytest.fixture(scope="module")
def batch_fit(planted):
    Xs = planted[0]
    return inmf(Xs, k=5, n_iter=30, dtype=np.float64)


def test_scenario1_matches_batch_inmf(planted, batch_fit):
    """Documented tolerance: after 10 epochs the objective is within 3% of 30 batch
    iterations (measured 1.1%) and W recovers the planted metagenes as well (cos > 0.99)."""
    Xs, W, _, _ = planted
    res = online_inmf(Xs, k=5, minibatch_size=300, max_epochs=10, dtype=np.float64)
    assert isinstance(res, OnlineINMFResult)
    assert res.objective <= 1.03 * batch_fit.objective[-1]
    assert matched_cosines(res.W, W).min() > 0.99
    assert [H.shape for H in res.H] == [(1500, 5), (1200, 5), (1000, 5)]
    assert [A.shape for A in res.A] == [(5, 5)] * 3 and [B.shape for B in res.B] == [(80, 5)] * 3
    assert res.minibatch_sizes == [122, 97, 81]  # round(n_i / sum(n) * 300)
    assert res.W.dtype == np.float64 and (res.W >= 0).all()


def test_final_h_and_objective_are_exact_for_the_final_factors(planted):
    Xs = planted[0]
    res = online_inmf(Xs, k=5, minibatch_size=500, max_epochs=2, dtype=np.float64)
    total = 0.0
    for X, V, H in zip(Xs, res.V, res.H, strict=True):
        L = res.W + V
        G = L.T @ L + 5.0 * V.T @ V
        np.testing.assert_allclose(H, nnls_bpp(G, L.T @ X.T).T, rtol=1e-8, atol=1e-10)
        total += ((X - H @ L.T) ** 2).sum() + 5.0 * ((H @ V.T) ** 2).sum()
    assert res.objective == pytest.approx(total, rel=1e-9)


def test_epochs_iterations_and_dropped_last_minibatch():
    """libplanc's schedule: n=1000, b=300, 3 epochs -> iterations 1..9 run, the 10th would
    complete epoch 3 and stops the run."""
    Xs, *_ = planted_inmf(n_cells=(1000,), m=40, k=3, seed=1)
    res = online_inmf(Xs, k=3, minibatch_size=300, max_epochs=3)
    assert res.n_iter == 9 and res.epochs == 3


def test_chunked_and_sliceable_inputs_equal_in_memory(planted, tmp_path):
    h5py = pytest.importorskip("h5py")
    Xs = [X[:700] for X in planted[0]]
    kw = {"k": 5, "minibatch_size": 400, "max_epochs": 3, "chunk_size": 100, "seed": 3,
          "dtype": np.float64}
    ref = online_inmf(Xs, **kw)
    chunks = [[sp.csr_matrix(X[a : a + 100]) for a in range(0, X.shape[0], 100)] for X in Xs]
    res = online_inmf(chunks, **kw)
    np.testing.assert_allclose(res.W, ref.W, rtol=1e-9, atol=1e-12)
    assert res.objective == pytest.approx(ref.objective, rel=1e-10)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        for i, X in enumerate(Xs):
            f.create_dataset(f"X{i}", data=X, chunks=(100, X.shape[1]))
    with h5py.File(tmp_path / "x.h5", "r") as f:
        res = online_inmf([f[f"X{i}"] for i in range(3)], **kw)
    np.testing.assert_allclose(res.W, ref.W, rtol=1e-9, atol=1e-12)


def test_same_seed_same_result(planted):
    Xs = [X[:600] for X in planted[0]]
    a = online_inmf(Xs, k=4, minibatch_size=300, max_epochs=2, seed=5)
    b = online_inmf(Xs, k=4, minibatch_size=300, max_epochs=2, seed=5)
    c = online_inmf(Xs, k=4, minibatch_size=300, max_epochs=2, seed=6)
    np.testing.assert_array_equal(a.W, b.W)
    assert not np.allclose(a.W, c.W)


def test_scenario2_refines_w_without_touching_old_statistics(planted, batch_fit):
    """Documented tolerance: datasets 1-2 fitted online, dataset 3 added in scenario 2: the
    objective over all three is within 10% of batch iNMF on all three (measured 3.0%)."""
    Xs = planted[0]
    old = online_inmf(Xs[:2], k=5, minibatch_size=300, max_epochs=5, dtype=np.float64)
    new = online_inmf(Xs[2:], reference=old, minibatch_size=200, max_epochs=5, dtype=np.float64)
    assert new.H[:2] == [None, None] and new.H[2].shape == (1000, 5)
    for i in range(2):  # frozen
        np.testing.assert_array_equal(new.V[i], old.V[i])
        np.testing.assert_array_equal(new.A[i], old.A[i])
        np.testing.assert_array_equal(new.B[i], old.B[i])
    assert not np.allclose(new.W, old.W)
    full = online_inmf(Xs[2:], reference=old, reference_Xs=Xs[:2], minibatch_size=200,
                       max_epochs=5, dtype=np.float64)
    assert all(H is not None for H in full.H)
    np.testing.assert_allclose(full.W, new.W)
    assert full.objective <= 1.10 * batch_fit.objective[-1]
    with pytest.raises(ScatlasInputError, match="differs"):
        online_inmf(Xs[2:], k=3, reference=old)


def test_scenario3_projection_is_nnls_on_fixed_w(planted):
    Xs = planted[0]
    fit = online_inmf(Xs[:2], k=5, minibatch_size=300, max_epochs=2, dtype=np.float64)
    X = Xs[2]
    (H,) = project_inmf([sp.csr_matrix(X)], fit.W, dtype=np.float64, chunk_size=300)
    expected = nnls_bpp(fit.W.T @ fit.W, fit.W.T @ X.T).T
    np.testing.assert_allclose(H, expected, rtol=1e-9, atol=1e-12)
    for c in (0, 17, 999):
        np.testing.assert_allclose(H[c], scipy_nnls(fit.W, X[c])[0], rtol=1e-7, atol=1e-9)
    gen = (X[a : a + 250] for a in range(0, 1000, 250))
    parts = project_inmf(gen, fit.W, dtype=np.float64)
    np.testing.assert_allclose(np.vstack(parts), H, rtol=1e-9, atol=1e-12)


def test_validation(planted):
    Xs = [X[:300] for X in planted[0]]
    with pytest.raises(ScatlasInputError, match="smaller minibatch_size"):
        online_inmf(Xs, k=4, minibatch_size=5000)
    with pytest.raises(ScatlasInputError, match="same genes"):
        online_inmf([Xs[0], Xs[1][:, :10]], k=4, minibatch_size=100)
    with pytest.raises(ScatlasInputError, match="negative"):
        online_inmf([Xs[0], -Xs[1]], k=4, minibatch_size=100)
    bad_chunks = [[Xs[0][:150], -Xs[0][150:]]]
    with pytest.raises(ScatlasInputError, match="negative"):
        online_inmf(bad_chunks, k=4, minibatch_size=100, chunk_size=50)
    with pytest.raises(ScatlasInputError, match="k="):
        online_inmf(Xs, k=500, minibatch_size=100)
    with pytest.raises(ScatlasInputError, match="empty"):
        online_inmf([], k=4)
    with pytest.raises(ScatlasInputError, match="reference_Xs"):
        online_inmf(Xs, k=4, minibatch_size=100, reference_Xs=Xs)


@pytest.mark.gpu
def test_gpu_online_and_projection_match_cpu(planted):
    cp = pytest.importorskip("cupy")
    Xs = [X[:600] for X in planted[0]]
    kw = {"k": 4, "minibatch_size": 300, "max_epochs": 2, "dtype": np.float64}
    cpu = online_inmf(Xs, **kw)
    gpu = online_inmf([cp.asarray(X) for X in Xs], **kw)
    assert isinstance(gpu.W, cp.ndarray)
    np.testing.assert_allclose(gpu.W.get(), cpu.W, rtol=1e-6, atol=1e-9)
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-8)
    moved = online_inmf(Xs, device="gpu", **kw)
    assert isinstance(moved.W, np.ndarray)
    (Hg,) = project_inmf([cp.asarray(Xs[0])], gpu.W, dtype=np.float64)
    (Hc,) = project_inmf([Xs[0]], cpu.W, dtype=np.float64)
    np.testing.assert_allclose(Hg.get(), Hc, rtol=1e-6, atol=1e-8)
