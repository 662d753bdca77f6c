"""The CuPy branches of the kernels and search engines, run on the CPU with NumPy stand-ins.

``tests/helpers/fake_gpu.py`` makes scatlas's backend take NumPy arrays for CuPy ones, so every
``xp is np`` test takes its GPU branch, the CUDA append kernel of the kNN search runs as its
CPU twin, and CuPy's habits (no exception from a failed Cholesky or solve, stable sorts) are
imitated. The arithmetic is NumPy's on both sides, so results must agree exactly (integer data)
or to float rounding. The ``gpu``-marked tests run the same comparisons on a real device.
"""

from __future__ import annotations

import numpy as np
import pytest

from scatlas import backend
from scatlas.kernels import neighbors as knn_mod
from scatlas.kernels import nnls as nnls_mod
from scatlas.kernels.linalg import pca
from scatlas.kernels.neighbors import knn, lexsort_rows, lexsort_rows_stable, mnn_pairs
from scatlas.search.engines import _kmeans
from tests.helpers import fake_gpu


@pytest.fixture
def gpu(monkeypatch):
    """The NumPy stand-in for CuPy, with the fused kNN kernel compiled from its twin."""
    fake = fake_gpu.install(monkeypatch)
    knn_mod._compile_append.cache_clear()
    yield fake
    knn_mod._compile_append.cache_clear()


def on_gpu(X):
    return fake_gpu.to_fake_gpu(X)


def int_data(n, p, seed):
    """Small integers (exact products in float32: ties where true distances tie), with runs of
    duplicated rows."""
    rng = np.random.default_rng(seed)
    X = rng.integers(-2, 3, size=(n, p)).astype(np.float32)
    X[n // 3 : n // 3 + 8] = X[2]
    X[n - 5 :] = X[n // 2]
    return X


# ----------------------------------------------------------------------------------------------
# kNN: the fused append kernel (its CPU twin), the candidate buffers, the GPU sort
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "ip"])
def test_knn_gpu_branch_equals_cpu(gpu, monkeypatch, fused, metric):
    monkeypatch.setattr(knn_mod, "_GPU_FUSED", fused)
    R, Q = int_data(400, 7, seed=1), int_data(150, 7, seed=2)
    Dc, Ic = knn(Q, R, 9, metric=metric, block_size=64)
    Dg, Ig = knn(on_gpu(Q), on_gpu(R), 9, metric=metric, block_size=64)
    assert backend.is_gpu_array(Dg) and backend.is_gpu_array(Ig)
    np.testing.assert_array_equal(backend.to_host(Ig), Ic)
    np.testing.assert_array_equal(backend.to_host(Dg), Dc)


def test_knn_gpu_buffers_overflow_and_partition(gpu, monkeypatch):
    """Tiny candidate buffers: rows overflow and are redone by the generic merge; a small GPU
    grid limit splits the queries into blocks; exclude_self and mutual pairs."""
    for name, value in (("_CAP_MIN", 1), ("_CAP_FACTOR", 1), ("_GPU_BUFFER_MIN", 1),
                        ("_GPU_MAX_GRID_Y", 97)):
        monkeypatch.setattr(knn_mod, name, value)
    X = int_data(400, 6, seed=3)
    _, I0 = knn(X, None, 6, exclude_self=True, block_size=90)
    _, Ig = knn(on_gpu(X), None, 6, exclude_self=True, block_size=90)
    np.testing.assert_array_equal(backend.to_host(Ig), I0)
    A, B = int_data(200, 5, seed=4), int_data(150, 5, seed=5)
    ja, jb = mnn_pairs(A, B, 5)
    ia, ib = mnn_pairs(on_gpu(A), on_gpu(B), 5)
    np.testing.assert_array_equal(backend.to_host(ia), ja)
    np.testing.assert_array_equal(backend.to_host(ib), jb)


def test_knn_device_override_on_counts(gpu):
    """device="gpu" on int32 counts: cast on the host, computed on the "GPU", NumPy back."""
    C = np.random.default_rng(6).poisson(1.0, (120, 9)).astype(np.int32)
    Dc, Ic = knn(C, None, 5, exclude_self=True)
    Dd, Id = knn(C, None, 5, exclude_self=True, device="gpu")
    assert type(Dd) is np.ndarray and type(Id) is np.ndarray
    np.testing.assert_array_equal(Id, Ic)
    np.testing.assert_array_equal(Dd, Dc)


def test_append_twin_collects_every_candidate_in_any_order():
    rng = np.random.default_rng(7)
    S = rng.integers(0, 10, size=(6, 40)).astype(np.float32)
    thr = np.array([3, 0, 9, -1, 5, 2], dtype=np.float32)
    col_ids = rng.permutation(1000)[:40].astype(np.int64)
    for order in ("reverse", "forward"):
        cnt = np.zeros(6, np.int32)
        key, idx = np.empty((6, 8), np.float32), np.empty((6, 8), np.int64)
        knn_mod.append_reference(S, thr, cnt, key, idx, col_ids, order=order)
        for r in range(6):
            hit = np.flatnonzero(S[r] <= thr[r])
            assert cnt[r] == hit.size
            m = min(hit.size, 8)
            got = sorted(zip(key[r, :m].tolist(), idx[r, :m].tolist(), strict=True))
            if hit.size <= 8:  # all of them, in some order
                assert got == sorted(zip(S[r, hit].tolist(), col_ids[hit].tolist(), strict=True))
            else:
                assert set(idx[r]) <= set(col_ids[hit].tolist())


def test_two_stable_sorts_equal_lexsort():
    rng = np.random.default_rng(8)
    keys = rng.integers(0, 4, size=(50, 30)).astype(np.float32)
    keys[:, -5:] = np.inf  # empty slots
    ids = np.stack([rng.permutation(30) for _ in range(50)]).astype(np.int64)
    ref = np.lexsort((ids, keys), axis=1)
    np.testing.assert_array_equal(lexsort_rows_stable(keys, ids), ref)
    np.testing.assert_array_equal(lexsort_rows(keys, ids)[:, :25], ref[:, :25])


def test_gpu_block_budget_from_free_memory(gpu, monkeypatch):
    """A quarter of the free device memory (pool included), within [2^22, 2^30] scores."""
    rt = gpu.cuda.runtime
    monkeypatch.setattr(rt, "free_bytes", 8 * 2**30)
    assert knn_mod._score_budget(gpu, 4) == (2 * 2**30) // 18
    monkeypatch.setattr(rt, "free_bytes", 2**20)
    assert knn_mod._score_budget(gpu, 4) == 2**22
    monkeypatch.setattr(rt, "free_bytes", 2**40)
    assert knn_mod._score_budget(gpu, 8) == 2**30
    Q = on_gpu(np.zeros((70_000, 4), np.float32))
    bq, br = knn_mod._block_shape(Q, Q, None)
    assert bq == knn_mod._GPU_QUERY_ROWS and br == min(2**30 // bq, 70_000)
    assert knn_mod._block_shape(Q, Q, 100_000)[0] == knn_mod._GPU_MAX_GRID_Y


# ----------------------------------------------------------------------------------------------
# NNLS: grouping of passive sets, CuPy's failing solves
# ----------------------------------------------------------------------------------------------
def test_nnls_gpu_branch_equals_cpu(gpu):
    rng = np.random.default_rng(9)
    A, B = rng.random((60, 12)), rng.random((60, 900))
    C, D = A.T @ A, A.T @ B
    D[:, 300:600] = D[:, [0]]  # a large group of identical passive sets
    cpu = nnls_mod.nnls_bpp(C, D)
    g = nnls_mod.nnls_bpp(on_gpu(C), on_gpu(D))
    assert backend.is_gpu_array(g)
    # same arithmetic, other batching: float64 rounding of the solves (cond(C) ~ 1e3 here)
    np.testing.assert_allclose(backend.to_host(g), cpu, rtol=0, atol=1e-10 * np.abs(cpu).max())
    h = nnls_mod.nnls_hals(on_gpu(C), on_gpu(D), on_gpu(np.ones_like(D)), 5)
    np.testing.assert_allclose(backend.to_host(h), nnls_mod.nnls_hals(C, D, np.ones_like(D), 5),
                               rtol=1e-12, atol=1e-14)


def test_unique_by_one_sort_equals_numpy_unique():
    rng = np.random.default_rng(10)
    key = rng.integers(0, 20, 500)
    u, first, gid = nnls_mod._unique_1d(np, key)
    u0, inv0 = np.unique(key, return_inverse=True)
    np.testing.assert_array_equal(u, u0)
    np.testing.assert_array_equal(gid, inv0)
    np.testing.assert_array_equal(key[first], u0)
    F = rng.random((300, 130)) < 0.5  # 3 words of 62 bits
    F[100:200] = F[0]
    P, g = nnls_mod._group_rows(np, F)
    np.testing.assert_array_equal(P[g], F)
    assert P.shape[0] == len({r.tobytes() for r in F})


def test_batched_solve_retries_a_singular_system_that_does_not_raise(gpu):
    """CuPy returns NaNs for a singular system: the jittered retry must run (as NumPy's
    LinAlgError triggers it)."""
    M = np.array([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 1.0]]])
    B = np.ones((2, 2, 1))
    assert np.isnan(np.asarray(gpu.linalg.solve(on_gpu(M), on_gpu(B)))).all()
    out = nnls_mod._batched_solve(gpu, on_gpu(M), on_gpu(B))
    ref = nnls_mod._batched_solve(np, M, B)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# PCA, k-means and the native IVF
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gram", "randomized"])
def test_pca_gpu_branch_equals_cpu(gpu, method):
    rng = np.random.default_rng(11)
    X = (rng.standard_normal((300, 6)) @ rng.standard_normal((6, 40))
         + 0.1 * rng.standard_normal((300, 40)))
    cpu = pca(X, 5, method=method, seed=1, dtype=np.float64)
    g = pca(on_gpu(X), 5, method=method, seed=1, dtype=np.float64)
    assert backend.is_gpu_array(g.scores)
    # full eigh on the GPU vs LAPACK's subset eigh on the CPU: float64 rounding
    np.testing.assert_allclose(backend.to_host(g.explained_variance), cpu.explained_variance,
                               rtol=1e-10)
    np.testing.assert_allclose(np.abs(backend.to_host(g.components)), np.abs(cpu.components),
                               atol=1e-8)


def test_kmeans_step_on_cupyx_sparse_equals_cpu(gpu):
    """The centroid update builds a one-hot cupyx COO matrix (float32 data, as cupyx demands)."""
    rng = np.random.default_rng(12)
    X = np.concatenate([rng.normal(c, 0.3, (80, 6)) for c in range(5)]).astype(np.float32)
    X[:3] = 50.0  # an outlier cluster, so that empty clusters get split
    C_cpu = _kmeans.kmeans(X, 8, niter=5, seed=3)
    C_gpu = _kmeans.kmeans(on_gpu(X), 8, niter=5, seed=3)
    assert backend.is_gpu_array(C_gpu)
    assert ("coo", np.dtype(np.float32)) in fake_gpu.CONSTRUCTED
    np.testing.assert_array_equal(backend.to_host(C_gpu), C_cpu)
    lab_c, key_c = _kmeans.assign(X, C_cpu, "l2")
    lab_g, key_g = _kmeans.assign(on_gpu(X), C_gpu, "l2")
    np.testing.assert_array_equal(backend.to_host(lab_g), lab_c)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_native_ivf_gpu_branch_equals_cpu(gpu, metric):
    from scatlas.search import CellIndex

    rng = np.random.default_rng(13)
    X = np.concatenate([rng.normal(c, 1.0, (150, 8)) for c in range(6)]).astype(np.float32)
    Q = X[::17] + 0.01
    kw = dict(metric=metric, engine="native-ivf", nlist=6)
    cpu = CellIndex.build(X[:700], device="cpu", **kw)
    g = CellIndex.build(X[:700], device="gpu", **kw)
    assert g.device == "gpu" and backend.is_gpu_array(g._engine.vectors)
    for idx in (cpu, g):
        idx.add(X[700:])
        idx.remove(np.arange(0, 900, 7))
    for nprobe in (1, 3, 6):
        Dc, Ic = cpu.search(Q, 10, nprobe=nprobe)
        Dg, Ig = g.search(Q, 10, nprobe=nprobe)
        np.testing.assert_array_equal(backend.to_host(Ig), Ic)
        np.testing.assert_allclose(backend.to_host(Dg), Dc, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# every kernel, device="gpu", on integer counts (as every real dataset stores them)
# ----------------------------------------------------------------------------------------------
def _kernel_calls():
    from scatlas.kernels import cca, fastmnn, inmf, online_inmf, seurat_integrate
    from scatlas.kernels.linalg import pca as pca_

    f64 = dict(dtype=np.float64)
    return {
        "pca-gram": lambda Xs, kw: pca_(Xs[0], 5, method="gram", **f64, **kw).scores,
        "pca-randomized": lambda Xs, kw: pca_(Xs[0], 5, method="randomized", **f64,
                                              **kw).scores,
        # fewer cells than genes: A A^T by row chunks of the sparse matrix
        "pca-wide": lambda Xs, kw: pca_(Xs[0].T.tocsr(), 5, method="gram", **f64,
                                        **kw).scores,
        "knn": lambda Xs, kw: knn(Xs[0], None, 5, exclude_self=True, **kw),
        "cca": lambda Xs, kw: cca(Xs[0], Xs[1], 4, **f64, **kw),
        "fastmnn": lambda Xs, kw: fastmnn(Xs, k=5, d=5, **f64, **kw).corrected,
        "seurat": lambda Xs, kw: seurat_integrate(Xs, dims=5, k_weight=10, **f64,
                                                  **kw).corrected,
        # v5: one ScaleData over all cells, held implicitly (ColumnShifted) on the device
        "seurat-v5-joint": lambda Xs, kw: seurat_integrate(
            Xs, embeddings=[X[:, :6].toarray().astype(np.float64) for X in Xs], scale="joint",
            k_filter=None, dims=5, k_weight=10, **f64, **kw).corrected,
        "inmf": lambda Xs, kw: inmf(Xs, k=3, n_iter=3, **f64, **kw).W,
        "online_inmf": lambda Xs, kw: online_inmf(Xs, k=3, max_epochs=1, minibatch_size=50,
                                                  **f64, **kw).W,
    }


@pytest.mark.filterwarnings("ignore::UserWarning")  # small batches: parameters lowered
@pytest.mark.parametrize("name", list(_kernel_calls()))
def test_kernels_take_int32_counts_to_the_gpu(gpu, name):
    """int32 CSR counts with device="gpu": moved (cast on the host: the stand-in refuses int
    data as cupyx does), computed on the GPU branches, returned as NumPy, equal to the CPU.

    Tolerance: float64 throughout; the GPU branches order some sums differently (full eigh
    instead of LAPACK's subset eigh, other blocking), so results agree to rounding amplified by
    the conditioning of these small problems: 1e-9 of the largest entry."""
    import scipy.sparse as sp

    rng = np.random.default_rng(14)
    Xs = [sp.csr_matrix(rng.poisson(0.5, (n, 40)).astype(np.int32)) for n in (150, 120)]
    call = _kernel_calls()[name]
    cpu, g = call(Xs, {}), call(Xs, {"device": "gpu"})
    cpu, g = (out if isinstance(out, tuple) else (out,) for out in (cpu, g))
    assert fake_gpu.CONSTRUCTED and all(dt != np.int32 for _, dt in fake_gpu.CONSTRUCTED)
    for c, d in zip(cpu, g, strict=True):
        assert type(d) is np.ndarray, type(d)  # device= returns the caller's kind
        np.testing.assert_allclose(d, c, rtol=0, atol=1e-9 * max(np.abs(c).max(), 1))


def test_quantile_clusters_on_the_gpu_branch_use_float64_neighbours(gpu, monkeypatch):
    """The GPU branch's kNN must compute in float64, as the CPU's tree search does (in float32,
    rounding decides near-ties and the clusters can differ)."""
    from scatlas.kernels import quantile

    seen = []
    real = knn_mod.knn

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(knn_mod, "knn", spy)
    rng = np.random.default_rng(15)
    H = np.abs(rng.standard_normal((120, 4)))
    idx_g = quantile._knn_indices(on_gpu(H), 10)
    assert seen == [np.float64]
    np.testing.assert_array_equal(backend.to_host(idx_g), quantile._knn_indices(H, 10))
