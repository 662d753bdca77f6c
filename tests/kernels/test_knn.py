"""Exact blocked kNN and MNN against brute-force numpy references."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp

from scatlas import backend
from scatlas._validate import ScatlasInputError
from scatlas.kernels import neighbors as knn_mod
from scatlas.kernels.neighbors import knn, mnn_pairs
from tests.helpers.neighbour_sets import assert_same_neighbours, float32_sum_tolerance


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
def ref_distances(Q, R, metric):
    """Full float64 distance matrix, straight from the definitions, each pair summed on its own
    (no BLAS: identical rows give bit-identical distances)."""
    Q = (Q.toarray() if sp.issparse(Q) else np.asarray(Q)).astype(np.float64)
    R = (R.toarray() if sp.issparse(R) else np.asarray(R)).astype(np.float64)
    if metric == "euclidean":
        return np.sqrt(((Q[:, None, :] - R[None, :, :]) ** 2).sum(-1))
    if metric == "ip":
        return -(Q[:, None, :] * R[None, :, :]).sum(-1)
    nq, nr = np.linalg.norm(Q, axis=1), np.linalg.norm(R, axis=1)
    Qn, Rn = Q / np.where(nq > 0, nq, 1)[:, None], R / np.where(nr > 0, nr, 1)[:, None]
    return 1 - (Qn[:, None, :] * Rn[None, :, :]).sum(-1)


def ref_knn(Q, R, k, metric, exclude_self=False):
    """Top-k by a full lexicographic sort on (distance, index)."""
    D = ref_distances(Q, R, metric)
    if exclude_self:
        np.fill_diagonal(D, np.inf)
    idx = np.broadcast_to(np.arange(D.shape[1]), D.shape)
    order = np.lexsort((idx, D), axis=1)[:, :k]
    return np.take_along_axis(D, order, axis=1), order


def int_data(n, p, seed, dup=True):
    """Small-integer data: every product and norm is exact in float32, so keys tie exactly
    where the true distances tie (duplicated rows and many coincidental ties)."""
    rng = np.random.default_rng(seed)
    X = rng.integers(-2, 3, size=(n, p)).astype(np.float64)
    if dup:
        X[n // 3 : n // 3 + 8] = X[2]  # a run of duplicates of row 2 (later indices)
        X[n - 5 :] = X[n // 2]
    return X


def cont_data(n, p, seed):
    """Continuous data with duplicated rows (the only ties)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    X[n // 3 : n // 3 + 6] = X[4]
    X[-3:] = X[n // 2]
    return X


def as_kind(X, sparse, dtype):
    X = X.astype(dtype)
    if sparse:
        X = np.where(np.abs(X) < 0.5, 0, X) if X.dtype.kind == "f" else X
        return sp.csr_matrix(X)
    return X


# ----------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------
@pytest.fixture(params=["slack", "no_slack"])
def slack(request, monkeypatch):
    """Run with the default re-ranking slack, and with none (the GEMM search alone exact)."""
    if request.param == "no_slack":
        monkeypatch.setattr(knn_mod, "_slack", lambda k: 0)
    return request.param


@pytest.mark.parametrize("metric", ["euclidean", "ip"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block_size", [7, 64, None])
def test_exact_with_ties_integer_data(metric, sparse, dtype, block_size, slack):
    R = int_data(230, 6, seed=1)
    Q = int_data(90, 6, seed=2, dup=False)
    Q[:3] = R[2]  # queries identical to a duplicated reference row: ties at distance 0
    q, r = as_kind(Q, sparse, dtype), as_kind(R, sparse, dtype)
    D0, I0 = ref_knn(q, r, 12, metric)
    D, idx = knn(q, r, 12, metric=metric, block_size=block_size, dtype=dtype)
    assert D.shape == idx.shape == (90, 12)
    assert D.dtype == dtype and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, I0)
    np.testing.assert_allclose(D, D0, rtol=1e-6, atol=1e-6)
    if metric == "euclidean":  # the duplicates of row 2 tie at 0, in index order
        dup_ids = [2] + list(range(230 // 3, 230 // 3 + 8))
        np.testing.assert_array_equal(idx[0, :9], dup_ids)
        np.testing.assert_array_equal(D[0, :9], 0)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "ip"])
@pytest.mark.parametrize("sparse", [False, True])
def test_exact_continuous_float64(metric, sparse):
    R = cont_data(300, 10, seed=3)
    Q = cont_data(120, 10, seed=4)
    Q[0] = R[4]
    q, r = as_kind(Q, sparse, np.float64), as_kind(R, sparse, np.float64)
    D0, I0 = ref_knn(q, r, 9, metric)
    D, idx = knn(q, r, 9, metric=metric, block_size=16, dtype=np.float64)
    np.testing.assert_array_equal(idx, I0)
    np.testing.assert_allclose(D, D0, rtol=1e-9, atol=1e-9)
    if metric == "cosine":  # the duplicates of row 4 tie at distance 0 in index order
        np.testing.assert_array_equal(idx[0, :7], [4] + list(range(100, 106)))


@pytest.mark.parametrize("sparse", [False, True])
def test_exact_cosine_float32(sparse):
    R = cont_data(150, 12, seed=5)
    Q = cont_data(80, 12, seed=6)
    q, r = as_kind(Q, sparse, np.float32), as_kind(R, sparse, np.float32)
    D0, I0 = ref_knn(q, r, 6, "cosine")
    D, idx = knn(q, r, 6, metric="cosine", block_size=9)
    np.testing.assert_array_equal(idx, I0)
    np.testing.assert_allclose(D, D0, atol=2e-6)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "ip"])
@pytest.mark.parametrize("sparse", [False, True])
def test_exclude_self(metric, sparse):
    # (cosine on continuous data in 12 dimensions: sparsified small-integer rows would be
    # parallel without being equal, ties that rounding may break either way)
    X = int_data(150, 5, seed=7) if metric != "cosine" else cont_data(150, 12, seed=7)
    x = as_kind(X, sparse, np.float64)
    D0, I0 = ref_knn(x, x, 8, metric, exclude_self=True)
    for ref in (None, x):
        D, idx = knn(x, ref, 8, metric=metric, exclude_self=True, block_size=11,
                     dtype=np.float64)
        np.testing.assert_array_equal(idx, I0)
        np.testing.assert_allclose(D, D0, atol=1e-9)
        assert not (idx == np.arange(150)[:, None]).any()
    # a duplicated cell keeps its twin (another index) at distance 0
    if metric == "euclidean":
        D, idx = knn(x, None, 1, exclude_self=True, dtype=np.float64)
        assert idx[2, 0] == 150 // 3 and D[2, 0] == 0


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "ip"])
@pytest.mark.parametrize("kinds", [(True, False), (False, True)])
def test_mixed_dense_and_sparse(metric, kinds):
    R = int_data(120, 7, seed=20)
    Q = int_data(50, 7, seed=21, dup=False)
    if metric == "cosine":
        R, Q = cont_data(120, 12, seed=20), cont_data(50, 12, seed=21)
    q, r = as_kind(Q, kinds[0], np.float64), as_kind(R, kinds[1], np.float64)
    D0, I0 = ref_knn(q, r, 6, metric)
    D, idx = knn(q, r, 6, metric=metric, block_size=13, dtype=np.float64)
    np.testing.assert_array_equal(idx, I0)
    np.testing.assert_allclose(D, D0, atol=1e-9)


def test_k_equals_n_ref_and_exclude_self_maximum():
    R = cont_data(40, 4, seed=8).astype(np.float32)
    Q = cont_data(13, 4, seed=9).astype(np.float32)
    D, idx = knn(Q, R, 40, block_size=6)
    D0, I0 = ref_knn(Q, R, 40, "euclidean")
    np.testing.assert_array_equal(idx, I0)
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.tile(np.arange(40), (13, 1)))
    D, idx = knn(R, None, 39, exclude_self=True, block_size=5)
    _, I0 = ref_knn(R, R, 39, "euclidean", exclude_self=True)
    np.testing.assert_array_equal(idx, I0)


def test_partition_path_on_sorted_clusters(monkeypatch, slack):
    """Force the per-row threshold tightening (partition) on every block."""
    monkeypatch.setattr(knn_mod, "_CAP_MIN", 1)
    monkeypatch.setattr(knn_mod, "_CAP_FACTOR", 1)
    rng = np.random.default_rng(10)
    centres = rng.integers(-30, 30, size=(6, 8))
    X = np.repeat(centres, 60, axis=0) + rng.integers(-2, 3, size=(360, 8))
    X[200:210] = X[3]
    D0, I0 = ref_knn(X, X, 5, "euclidean", exclude_self=True)
    D, idx = knn(X, None, 5, exclude_self=True, block_size=100)
    np.testing.assert_array_equal(idx, I0)
    np.testing.assert_allclose(D, D0, rtol=1e-5)


def _emulated_append(grid, block, args):
    """NumPy stand-in for the GPU append kernel (atomics: candidates land in any order)."""
    S, _, thr, cnt, key, idx, col_ids, cap = args
    rng = np.random.default_rng(0)
    for r in range(S.shape[0]):
        hits = rng.permutation(np.flatnonzero(S[r] <= thr[r]))
        pos = cnt[r] + np.arange(hits.size)
        ok = pos < cap
        key[r, pos[ok]] = S[r, hits[ok]]
        idx[r, pos[ok]] = col_ids[hits[ok]]
        cnt[r] += hits.size


@pytest.mark.parametrize("buffer_min", [1, 40, 256])
def test_gpu_buffered_merge_logic_emulated(monkeypatch, buffer_min, slack):
    """The GPU path's candidate buffers (flushes, overflow redo) with the kernel emulated."""
    calls = {"generic": 0}
    generic = knn_mod._merge

    def counting_merge(*args):
        calls["generic"] += 1
        return generic(*args)

    monkeypatch.setattr(knn_mod, "_fused_kernel", lambda xp, dtype: _emulated_append)
    monkeypatch.setattr(knn_mod, "_merge", counting_merge)
    monkeypatch.setattr(knn_mod, "_GPU_BUFFER_MIN", buffer_min)
    monkeypatch.setattr(knn_mod, "_CAP_MIN", 1)
    monkeypatch.setattr(knn_mod, "_CAP_FACTOR", 1)
    X = int_data(300, 6, seed=22)
    for metric in ("euclidean", "ip"):
        D0, I0 = ref_knn(X, X, 7, metric, exclude_self=True)
        D, idx = knn(X, None, 7, metric=metric, exclude_self=True, block_size=64)
        np.testing.assert_array_equal(idx, I0)
        np.testing.assert_allclose(D, D0, rtol=1e-6)
    if buffer_min == 1:  # buffers of 2 cap slots overflow: the generic redo ran
        assert calls["generic"] > 0
    if buffer_min == 256:
        assert calls["generic"] == 0


@pytest.mark.slow
def test_larger_scale_against_sklearn():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(23)
    centres = rng.standard_normal((20, 30)) * 3
    X = centres[np.sort(rng.integers(0, 20, 30000))] + rng.standard_normal((30000, 30))
    D, idx = knn(X, None, 10, exclude_self=True, dtype=np.float64)
    D0, I0 = NearestNeighbors(n_neighbors=11, algorithm="brute").fit(X).kneighbors(X)
    np.testing.assert_array_equal(idx, I0[:, 1:])
    np.testing.assert_allclose(D, D0[:, 1:], rtol=1e-7)


def test_ref_blocks_grow_and_cover():
    blocks = knn_mod._ref_blocks(1000, 300, 20)
    assert blocks[0] == (0, 20) and blocks[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    assert max(b - a for a, b in blocks) == 300


def test_zero_rows_cosine():
    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    D, idx = knn(X[:1], X, 4, metric="cosine", dtype=np.float64)
    np.testing.assert_allclose(D, 1.0)  # the zero vector has cosine 0 to everything
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3]])


def test_default_dtype_is_float32_and_accepts_int_input():
    X = np.arange(40).reshape(20, 2)
    D, idx = knn(X, None, 2, exclude_self=True)
    assert D.dtype == np.float32
    np.testing.assert_array_equal(idx[5], [4, 6])  # equidistant: smaller index first
    np.testing.assert_allclose(D[5], np.sqrt(8))


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_errors():
    X = np.ones((5, 3))
    with pytest.raises(ScatlasInputError, match="fewer cells than k"):
        knn(X, X, 6)
    with pytest.raises(ScatlasInputError, match="fewer cells than k"):
        knn(X, None, 5, exclude_self=True)
    with pytest.raises(ScatlasInputError, match=">= 1"):
        knn(X, X, 0)
    with pytest.raises(ScatlasInputError, match="same features"):
        knn(X, np.ones((5, 4)), 2)
    bad = X.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ScatlasInputError, match="NaN"):
        knn(bad, X, 2)
    with pytest.raises(ScatlasInputError, match="NaN"):
        knn(X, sp.csr_matrix(bad), 2)
    with pytest.raises(ScatlasInputError, match="metric"):
        knn(X, X, 2, metric="manhattan")
    with pytest.raises(ScatlasInputError, match="exclude_self"):
        knn(X, np.ones((6, 3)), 2, exclude_self=True)
    with pytest.raises(ScatlasInputError, match="engine"):
        knn(X, X, 2, engine="annoy")
    with pytest.raises(ScatlasInputError):
        mnn_pairs(X, np.ones((3, 3)), 4)


# ----------------------------------------------------------------------------------------------
# MNN
# ----------------------------------------------------------------------------------------------
def ref_mnn(A, B, k1, k2, metric):
    _, nab = ref_knn(A, B, k1, metric)
    _, nba = ref_knn(B, A, k2, metric)
    fwd = {(i, j) for i in range(len(A)) for j in nab[i]}
    bwd = {(i, j) for j in range(len(B)) for i in nba[j]}
    return sorted(fwd & bwd)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k2", [None, 3])
def test_mnn_pairs_equal_set_computation(metric, k2):
    rng = np.random.default_rng(11)
    A = rng.standard_normal((140, 6))
    B = rng.standard_normal((110, 6)) + 0.3
    ia, ib = mnn_pairs(A, B, 7, k2=k2, metric=metric, block_size=20, dtype=np.float64)
    expect = ref_mnn(A, B, 7, 7 if k2 is None else k2, metric)
    assert ia.dtype == ib.dtype == np.int64
    assert list(zip(ia.tolist(), ib.tolist(), strict=True)) == expect
    assert len(expect) > 50


def test_mnn_pairs_sparse_and_identity():
    rng = np.random.default_rng(12)
    A = rng.standard_normal((50, 5))
    ia, ib = mnn_pairs(sp.csr_matrix(A), A, 1)  # every cell is its own unique nearest
    np.testing.assert_array_equal(ia, np.arange(50))
    np.testing.assert_array_equal(ib, np.arange(50))


# ----------------------------------------------------------------------------------------------
# faiss engine (with a stand-in module: faiss is not installed here)
# ----------------------------------------------------------------------------------------------
class _FakeFlat:
    def __init__(self, d, ip):
        self.d, self.ip, self.X = d, ip, None

    def add(self, X):
        assert X.dtype == np.float32 and X.flags.c_contiguous
        self.X = X

    def search(self, Q, k):
        S = Q.astype(np.float64) @ self.X.T.astype(np.float64)
        if not self.ip:  # squared L2, ascending
            S = (Q.astype(np.float64) ** 2).sum(1)[:, None] - 2 * S + (
                self.X.astype(np.float64) ** 2).sum(1)[None, :]
            o = np.argsort(S, axis=1, kind="stable")[:, :k]
        else:  # similarities, descending
            o = np.argsort(-S, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(S, o, 1).astype(np.float32), o.astype(np.int64)


@pytest.fixture
def fake_faiss(monkeypatch):
    mod = types.SimpleNamespace(IndexFlatL2=lambda d: _FakeFlat(d, False),
                                IndexFlatIP=lambda d: _FakeFlat(d, True))
    monkeypatch.setitem(sys.modules, "faiss", mod)
    return mod


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "ip"])
def test_faiss_engine_conventions(fake_faiss, metric):
    X = cont_data(80, 6, seed=13)
    D0, I0 = ref_knn(X, X, 5, metric, exclude_self=True)
    D, idx = knn(X, None, 5, metric=metric, exclude_self=True, engine="faiss")
    np.testing.assert_array_equal(idx, I0)
    np.testing.assert_allclose(D, D0, atol=1e-4)


def test_faiss_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ScatlasInputError, match="faiss"):
        knn(np.ones((4, 2)), None, 2, engine="faiss")


def test_progress_bar_runs():
    X = cont_data(30, 3, seed=14)
    D, idx = knn(X, None, 3, progress=True, block_size=8)
    assert D.shape == (30, 3)
    _, I0 = ref_knn(X, X, 3, "euclidean")
    np.testing.assert_array_equal(idx, I0)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
@pytest.fixture(params=["fused", "generic"])
def gpu_path(request, monkeypatch):
    """Run the GPU tests with the fused append kernel and with the generic array-API merge."""
    monkeypatch.setattr(knn_mod, "_GPU_FUSED", request.param == "fused")
    return request.param


@pytest.mark.gpu
@pytest.mark.filterwarnings("error::UserWarning")  # the fused kernel must compile
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "ip"])
@pytest.mark.parametrize("sparse", [False, True])
def test_gpu_equals_cpu(metric, sparse, gpu_path):
    R = int_data(500, 8, seed=15)
    Q = int_data(300, 8, seed=16, dup=False)
    q, r = as_kind(Q, sparse, np.float32), as_kind(R, sparse, np.float32)
    Dc, Ic = knn(q, r, 10, metric=metric, block_size=64)
    Dg, Ig = knn(backend.to_device(q, "gpu"), backend.to_device(r, "gpu"), 10, metric=metric,
                 block_size=64)
    assert backend.is_gpu_array(Dg) and backend.is_gpu_array(Ig)
    if metric != "cosine":
        # integer data: every product and sum is exact in float32 on any device, and ties go
        # to the smaller index (the kernel's contract), so the results are identical
        np.testing.assert_array_equal(backend.to_host(Ig), Ic)
        np.testing.assert_array_equal(backend.to_host(Dg), Dc)
    else:
        # 1 - cos of normalised rows: the norms and 8-term dot products round (< 1 in sum of
        # magnitudes): equal up to ties within that bound
        tol = 2 * float32_sum_tolerance(8, scale=1.0)
        assert_same_neighbours(Dc, Ic, Dg, Ig, atol=tol)
    Dd, Id = knn(q, r, 10, metric=metric, device="gpu")  # device= moves and returns host arrays
    assert isinstance(Dd, np.ndarray)
    assert_same_neighbours(Dc, Ic, Dd, Id, atol=2 * float32_sum_tolerance(8, scale=1.0)
                           if metric == "cosine" else 0.0)


@pytest.mark.gpu
@pytest.mark.filterwarnings("error::UserWarning")
def test_gpu_exclude_self_partition_and_mnn(monkeypatch, gpu_path):
    monkeypatch.setattr(knn_mod, "_CAP_MIN", 1)
    monkeypatch.setattr(knn_mod, "_CAP_FACTOR", 1)
    monkeypatch.setattr(knn_mod, "_GPU_BUFFER_MIN", 1)  # overflowing buffers: the redo path
    X = int_data(400, 6, seed=17)
    _, I0 = ref_knn(X, X, 6, "euclidean", exclude_self=True)
    _, Ig = knn(backend.to_device(X, "gpu"), None, 6, exclude_self=True, block_size=90)
    np.testing.assert_array_equal(backend.to_host(Ig), I0)  # integer data: exact (see above)
    # continuous float64 data, whose only ties are exact duplicates (bit-identical keys, pair
    # by pair): the mutual pairs are determined unless a distance gap is below float64
    # rounding, which these 350 cells' non-zero gaps (>= 1e-5) are far above
    A, B = cont_data(200, 5, seed=18), cont_data(150, 5, seed=19)
    ia, ib = mnn_pairs(backend.to_device(A, "gpu"), backend.to_device(B, "gpu"), 5,
                       dtype=np.float64)
    ja, jb = mnn_pairs(A, B, 5, dtype=np.float64)
    np.testing.assert_array_equal(backend.to_host(ia), ja)
    np.testing.assert_array_equal(backend.to_host(ib), jb)


# ----------------------------------------------------------------------------------------------
# the helper that compares neighbours up to ties (used by the GPU-vs-CPU tests)
# ----------------------------------------------------------------------------------------------
def test_neighbour_sets_equal_up_to_ties():
    from tests.helpers.neighbour_sets import assert_same_neighbours, neighbour_mismatches, recall

    D = np.array([[0.0, 1.0, 2.0, 2.0], [0.5, 0.5, 0.7, np.inf]])
    I = np.array([[4, 7, 1, 9], [3, 2, 8, -1]])
    assert_same_neighbours(D, I, D, I, atol=0)
    # the k-th place is tied: another id at the same distance may take it
    assert not neighbour_mismatches(D, I, D, np.array([[4, 7, 9, 5], [3, 2, 8, -1]]), atol=0)
    # an interior neighbour may not change, nor a distance move beyond the tolerance
    assert neighbour_mismatches(D, I, D, np.array([[4, 6, 1, 9], [3, 2, 8, -1]]), atol=1e-6)
    assert neighbour_mismatches(D, I, D + 1e-3, I, atol=1e-6)
    assert not neighbour_mismatches(D, I, D + 1e-7, I, atol=1e-6)
    assert neighbour_mismatches(D, I, D, np.array([[4, 7, 1, 9], [3, 2, 8, 5]]), atol=0)
    assert recall(np.array([[4, 7, 1, 5]]), I[:1]) == 0.75


def test_range_hits_and_rounding_stability_helpers():
    from tests.helpers.neighbour_sets import assert_same_range_hits, stable_under_rounding

    ref = [(np.array([0.1, 0.5]), np.array([3, 8])), (np.array([]), np.array([], int))]
    assert_same_range_hits(ref, ref, 0.5, atol=1e-6)
    # an id at the radius may come or go; one well inside may not
    assert_same_range_hits(ref, [(np.array([0.1]), np.array([3])), ref[1]], 0.5, atol=1e-6)
    with pytest.raises(AssertionError, match="id 3"):
        assert_same_range_hits(ref, [(np.array([0.5]), np.array([8])), ref[1]], 0.5, atol=1e-6)
    X = np.array([[0.0], [1.0], [2.0], [10.0]])

    def nearest_of_first(arrays):
        return knn(arrays[0][:1], arrays[0][1:], 1, dtype=np.float64)[1]

    assert stable_under_rounding(nearest_of_first, [X], key=lambda i: i.tolist())
    X[1, 0], X[2, 0] = -1.0, 1.0  # the first cell is exactly between two: rounding decides
    assert not all(stable_under_rounding(nearest_of_first, [X], key=lambda i: i.tolist(),
                                         seed=s) for s in range(5))


def test_float32_and_float64_knn_agree_up_to_ties():
    """Near-duplicate cells (1e-7 apart: one float32 ulp) tie in float32 but not in float64;
    exact id equality fails there, the comparison up to ties does not."""
    from tests.helpers.neighbour_sets import assert_same_neighbours, float32_sum_tolerance

    rng = np.random.default_rng(21)
    X = rng.standard_normal((300, 16))
    X[100:140] = X[:40] + 1e-7 * rng.standard_normal((40, 16))
    D64, I64 = knn(X, None, 10, dtype=np.float64)
    D32, I32 = knn(X, None, 10, dtype=np.float32)
    assert not np.array_equal(I32, I64)  # the brittle comparison
    # squared distances: 16 terms of magnitude up to |x|^2 (~4 * 16 here); distances ~ sqrt
    sq_tol = float32_sum_tolerance(16, scale=4.0 * np.abs(X).max() ** 2 * 16, sides=1)
    assert_same_neighbours(D64, I64, D32, I32, atol=np.sqrt(sq_tol))
