"""fastMNN (kernels.fastmnn) against a step-by-step NumPy reading of batchelor, plus ground
truth, CellBench and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from scatlas import backend, metrics
from scatlas._validate import ScatlasInputError
from scatlas.kernels.fastmnn import (
    center_along_batch_vector,
    fastmnn,
    multi_batch_norm,
    multi_batch_pca,
    tricube_weights,
)

# ----------------------------------------------------------------------------------------------
# plain-NumPy reference, written from batchelor's R code
# ----------------------------------------------------------------------------------------------


def ref_cosine(X):
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-8)


def ref_multi_pca(batches, d):
    """multiBatchPCA: grand centre of batch means, batches scaled by 1/sqrt(n_b), SVD,
    unscaled centred data projected."""
    centre = np.mean([B.mean(0) for B in batches], axis=0)
    scaled = np.vstack([(B - centre) / math.sqrt(len(B)) for B in batches])
    _, _, Vt = np.linalg.svd(scaled, full_matrices=False)
    V = Vt[:d].T
    return [(B - centre) @ V for B in batches], V


def ref_knn(Q, R, k):
    D = np.sqrt(((Q[:, None, :] - R[None, :, :]) ** 2).sum(-1))
    idx = np.array([np.lexsort((np.arange(len(R)), row))[:k] for row in D])
    return np.take_along_axis(D, idx, 1), idx


def ref_center(mat, vec):
    u = vec / np.sqrt((vec**2).sum())
    loc = mat @ u
    return mat + np.outer(loc.mean() - loc, u)


def ref_average(left, m1, right, m2):
    """.average_correction: rowsum by right cell / count, cells in sorted order."""
    cells = sorted(set(m2.tolist()))
    ave = np.array([(left[m1[m2 == c]] - right[c]).mean(0) for c in cells])
    return ave, np.array(cells)


def ref_merge(left, right, k, ndist):
    """One .fast_mnn_core step on (data, vectors) nodes."""
    (ldata, lvec), (rdata, rvec) = left, right
    for v in lvec:
        rdata = ref_center(rdata, v)
    for v in rvec:
        ldata = ref_center(ldata, v)
    nn_lr = ref_knn(ldata, rdata, k)[1]  # findMutualNN(left, right, k1 = k, k2 = k)
    nn_rl = ref_knn(rdata, ldata, k)[1]
    pairs = [(i, j) for i in range(len(ldata)) for j in nn_lr[i] if i in nn_rl[j]]
    m1, m2 = (np.array(v) for v in zip(*pairs, strict=True))
    ave, _ = ref_average(ldata, m1, rdata, m2)
    overall = ave.mean(0)
    ldata, rdata = ref_center(ldata, overall), ref_center(rdata, overall)
    ave, cells = ref_average(ldata, m1, rdata, m2)
    kk = min(k, len(cells))  # .tricube_weighted_correction / .compute_tricube_average
    dist, idx = ref_knn(rdata, rdata[cells], kk)
    bw = np.maximum(dist[:, math.ceil(kk / 2) - 1] * ndist, 1e-8)
    rel = np.minimum(dist / bw[:, None], 1)
    tri = (1 - rel**3) ** 3
    w = tri / tri.sum(1, keepdims=True)
    corr = sum(ave[idx[:, j]] * w[:, j : j + 1] for j in range(kk))
    return np.vstack([ldata, rdata + corr]), lvec + rvec + [overall]


def ref_fastmnn(batches, k, d, ndist, tree):
    pcs, V = ref_multi_pca([ref_cosine(B) for B in batches], d)

    def build(node):
        if not isinstance(node, list):
            return pcs[node], []
        acc = build(node[0])
        for child in node[1:]:
            acc = ref_merge(acc, build(child), k, ndist)
        return acc

    data, _ = build(tree)
    order = np.concatenate([_flat(tree)])
    starts = np.cumsum([0] + [len(B) for B in batches])
    rows = np.concatenate([np.arange(starts[b], starts[b + 1]) for b in order])
    out = np.empty_like(data)
    out[rows] = data
    return out, V


def _flat(tree):
    return [x for c in tree for x in _flat(c)] if isinstance(tree, list) else [tree]


@pytest.fixture(scope="module")
def toy():
    """Four small batches of log-expression with 3 shared cell types and batch shifts."""
    rng = np.random.default_rng(5)
    centers = rng.normal(1.0, 1.0, size=(3, 30))
    out, types = [], []
    for n in (60, 45, 50, 40):
        t = rng.integers(0, 3, n)
        X = np.exp(centers[t] + rng.normal(0, 0.4, size=(n, 30)) + rng.normal(0, 0.5, 30))
        out.append(np.log1p(X))
        types.append(t)
    return out, types


def _signs(V_got, V_ref):
    return np.sign((V_got * V_ref).sum(0))


# ----------------------------------------------------------------------------------------------
# (a) worked example
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [None, [2, 0, 3, 1], [[0, 3], [1, 2]]])
def test_fastmnn_reproduces_reference(toy, order):
    batches, _ = toy
    tree = [0, 1, 2, 3] if order is None else order
    expected, V = ref_fastmnn(batches, k=7, d=8, ndist=3.0, tree=tree)
    res = fastmnn(batches, k=7, d=8, merge_order=order, dtype=np.float64)
    s = _signs(res.rotation, V)
    np.testing.assert_allclose(res.rotation * s, V, atol=1e-10)
    np.testing.assert_allclose(res.corrected, expected * s, rtol=1e-9, atol=1e-9)
    assert len(res.merges) == 3 and not any(m.skipped for m in res.merges)
    np.testing.assert_array_equal(res.batch, np.repeat([0, 1, 2, 3], [60, 45, 50, 40]))


def test_single_matrix_with_labels_keeps_cell_order(toy):
    batches, _ = toy
    X = np.vstack(batches)
    labels = np.repeat(np.array(["d", "a", "c", "b"]), [60, 45, 50, 40])  # sorted: a b c d
    perm = np.random.default_rng(0).permutation(len(X))
    res = fastmnn(sp.csr_matrix(X[perm]), labels[perm], k=7, d=8, dtype=np.float64,
                  merge_order=["d", "a", "c", "b"])
    ref = fastmnn(batches, k=7, d=8, dtype=np.float64)
    s = _signs(res.rotation, ref.rotation)
    np.testing.assert_allclose(res.corrected * s, ref.corrected[perm], atol=1e-9)
    assert res.batches == ["a", "b", "c", "d"]
    assert [m.right for m in res.merges] == [["a"], ["c"], ["b"]]


def test_auto_merge(toy):
    """batchelor auto.merge: the first merge is the leaf pair with most MNN pairs (counted
    with the reference kNN), and the whole run equals the explicit tree of its merges."""
    batches, _ = toy
    rng = np.random.default_rng(9)
    batches = [batches[0], batches[1], batches[1] + rng.normal(0, 0.01, batches[1].shape),
               batches[3]]  # batch 2 is a copy of batch 1: their pair has the most MNNs
    res = fastmnn(batches, k=7, d=8, dtype=np.float64, auto_merge=True)
    pcs, _ = ref_multi_pca([ref_cosine(B) for B in batches], 8)

    def n_pairs(a, b):
        nn_ab, nn_ba = ref_knn(a, b, 7)[1], ref_knn(b, a, 7)[1]
        return sum(i in nn_ba[j] for i in range(len(a)) for j in nn_ab[i])

    counts = {(i, j): n_pairs(pcs[i], pcs[j]) for i in range(4) for j in range(i)}
    assert max(counts, key=counts.get) == (2, 1)
    assert (res.merges[0].left, res.merges[0].right) == ([2], [1])
    assert res.merges[0].pairs[0].size == counts[(2, 1)]
    trees = {}

    def tree_of(batch_ids):
        return trees.get(tuple(batch_ids), batch_ids[0])

    for m in res.merges:
        trees[tuple(m.left + m.right)] = [tree_of(m.left), tree_of(m.right)]
    explicit = fastmnn(batches, k=7, d=8, dtype=np.float64,
                       merge_order=trees[tuple(res.merges[-1].left + res.merges[-1].right)])
    np.testing.assert_allclose(res.corrected, explicit.corrected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ScatlasInputError, match="auto_merge"):
        fastmnn(batches, auto_merge=True, merge_order=[0, 1, 2, 3])


def test_building_blocks():
    rng = np.random.default_rng(2)
    M, v = rng.normal(size=(20, 4)), rng.normal(size=4)
    C = center_along_batch_vector(M, v)
    u = v / np.linalg.norm(v)
    np.testing.assert_allclose(C @ u, np.full(20, (M @ u).mean()))  # one position along u
    np.testing.assert_allclose(C - np.outer(C @ u, u), M - np.outer(M @ u, u))  # rest kept
    dist = np.sort(rng.uniform(size=(5, 6)), axis=1)
    w = tricube_weights(dist, 3.0)
    bw = 3 * dist[:, 2:3]  # ceil(6 / 2) = 3rd neighbour
    tri = (1 - np.minimum(dist / bw, 1) ** 3) ** 3
    np.testing.assert_allclose(w, tri / tri.sum(1, keepdims=True))
    batches = [rng.normal(size=(n, 12)) for n in (30, 80)]
    pcs, V = multi_batch_pca(batches, 4)
    pcs_ref, V_ref = ref_multi_pca(batches, 4)
    s = _signs(V, V_ref)
    np.testing.assert_allclose(pcs[1] * s, pcs_ref[1], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# (b) ground truth: a constant offset between batches
# ----------------------------------------------------------------------------------------------
def test_fastmnn_removes_a_constant_offset():
    rng = np.random.default_rng(3)
    p, T = 200, 4
    centers = rng.normal(0, 1.5, size=(T, p))
    t0 = rng.integers(0, T, 500)
    X0 = centers[t0] + rng.normal(0, 1.0, size=(500, p))
    pick = rng.choice(500, 350, replace=False)
    X1 = X0[pick] + rng.normal(0, 2.0, size=p) + rng.normal(0, 0.1, size=(350, p))
    res = fastmnn([X0, X1], d=30, cos_norm=False)
    C0, C1 = res.corrected[:500], res.corrected[500:]
    pc0, pc1 = (X - np.mean([X0.mean(0), X1.mean(0)], 0) for X in (X0, X1))
    before = np.linalg.norm(pc1 @ res.rotation - (pc0 @ res.rotation)[pick], axis=1).mean()
    after = np.linalg.norm(C1 - C0[pick], axis=1).mean()
    assert after < 0.3 * before  # cells land near their counterparts
    batch = np.repeat([0, 1], [500, 350])
    lab = np.concatenate([t0, t0[pick]])
    assert metrics.knn_label_transfer(res.corrected, lab, batch) > 0.98
    assert metrics.silhouette_label(res.corrected, lab) > 0.6
    assert metrics.ilisi(res.corrected, batch) > 0.5


# ----------------------------------------------------------------------------------------------
# (c) CellBench
# ----------------------------------------------------------------------------------------------
def test_cellbench_fastmnn_improves_mixing(cellbench_hvg, capsys):  # noqa: F811
    X, batch, labels, base = cellbench_hvg
    E = fastmnn(X, batch).corrected
    after = {"ilisi": metrics.ilisi(E, batch),
             "transfer": metrics.knn_label_transfer(E, labels, batch),
             "asw_label": metrics.silhouette_label(E, labels)}
    with capsys.disabled():
        print(f"\nCellBench fastMNN: before {base} after "
              f"{ {k: round(v, 3) for k, v in after.items()} }")
    assert after["ilisi"] > base["ilisi"] + 0.1
    assert after["transfer"] > 0.9


# ----------------------------------------------------------------------------------------------
# (c') multiBatchNorm
# ----------------------------------------------------------------------------------------------
def ref_multi_batch_norm(C, batch, min_mean=1.0):
    """batchelor multiBatchNorm (R/multiBatchNorm.R) + scater logNormCounts, cell by cell."""
    names = sorted(set(batch))
    sf = np.empty(len(C))
    ave = {}
    for b in names:
        rows = [i for i in range(len(C)) if batch[i] == b]
        lib = C[rows].sum(1)
        sf[rows] = lib / lib.mean()
        ave[b] = np.mean([C[i] / sf[i] for i in rows], axis=0)  # calculateAverage
    R = np.ones((len(names), len(names)))
    for i, bi in enumerate(names):
        for j, bj in enumerate(names):
            if j <= i:
                continue
            si, sj = ave[bi].sum(), ave[bj].sum()
            keep = (ave[bi] / si + ave[bj] / sj) / 2 * (si + sj) / 2 >= min_mean
            R[i, j] = np.median(ave[bj][keep] / ave[bi][keep])
            R[j, i] = 1 / R[i, j]
    rescale = R[:, np.argmin(R.min(axis=0))]
    for i in range(len(C)):
        sf[i] /= rescale[names.index(batch[i])]
    return np.log2(C / sf[:, None] + 1)


@pytest.fixture(scope="module")
def counts3():
    """Negative-binomial-like counts of 3 batches with mean depths 1x, 3x and 0.5x."""
    rng = np.random.default_rng(11)
    mu = rng.gamma(0.6, 4.0, size=60)
    batch = np.repeat(np.array(["b", "a", "c"]), [40, 30, 35])
    depth = np.where(batch == "b", 1.0, np.where(batch == "a", 3.0, 0.5))
    lib = depth * rng.lognormal(0, 0.3, size=len(batch))
    C = rng.poisson(rng.gamma(2.0, mu[None, :] * lib[:, None] / 2.0)).astype(np.float64)
    C[:, 0] += 1  # no empty cell
    return C, batch


def test_multi_batch_norm_matches_reference(counts3):
    C, batch = counts3
    ref = ref_multi_batch_norm(C, list(batch))
    np.testing.assert_allclose(multi_batch_norm(C, batch, dtype=np.float64), ref, rtol=1e-12,
                               atol=1e-12)
    out = multi_batch_norm(sp.csr_matrix(C), batch, genes=[3, 0, 7])
    assert sp.issparse(out) and out.dtype == np.float32 and out.shape == (len(C), 3)
    np.testing.assert_allclose(out.toarray(), ref[:, [3, 0, 7]], rtol=1e-6, atol=1e-6)
    # a lower min_mean keeps more genes for the ratios and changes only the rescaling
    np.testing.assert_allclose(multi_batch_norm(C, batch, min_mean=0.1, dtype=np.float64),
                               ref_multi_batch_norm(C, list(batch), 0.1), rtol=1e-12)


def test_multi_batch_norm_removes_coverage():
    """Batch b is batch a with every count x4: after multiBatchNorm each cell of b equals its
    copy in a, and both are on a's (the shallower batch's) scale."""
    rng = np.random.default_rng(4)
    A = rng.poisson(2.0, size=(25, 40)).astype(np.float64) + np.eye(25, 40)
    C = np.vstack([A, 4 * A])
    batch = np.repeat(["a", "b"], 25)
    out = multi_batch_norm(C, batch, dtype=np.float64)
    np.testing.assert_allclose(out[25:], out[:25], rtol=1e-12)
    lib = A.sum(1)
    np.testing.assert_allclose(out[:25], np.log2(A / (lib / lib.mean())[:, None] + 1),
                               rtol=1e-12)


def test_multi_batch_norm_bad_input(counts3):
    C, batch = counts3
    Z = C.copy()
    Z[3] = 0
    with pytest.raises(ScatlasInputError, match="no counts"):
        multi_batch_norm(Z, batch)
    with pytest.raises(ScatlasInputError, match="negative"):
        multi_batch_norm(-C, batch)
    with pytest.raises(ScatlasInputError, match="one label per row"):
        multi_batch_norm(C, batch[:-1])
    with pytest.warns(UserWarning, match="no gene averages 1000000000.0 counts"):
        multi_batch_norm(C, batch, min_mean=1e9)  # falls back to the genes detected in both
    disjoint = np.zeros((6, 4))
    disjoint[:3, :2], disjoint[3:, 2:] = 1, 1  # the two batches detect different genes
    with pytest.raises(ScatlasInputError, match="'a' and 'b' share no gene"):
        multi_batch_norm(disjoint, np.array(["a"] * 3 + ["b"] * 3))


# ----------------------------------------------------------------------------------------------
# (d) bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_is_rejected(toy):
    batches, _ = toy
    with pytest.raises(ScatlasInputError, match="fewer cells than k"):
        fastmnn([batches[0], batches[1][:10]], k=20)
    with pytest.raises(ScatlasInputError, match="at least 2"):
        fastmnn([batches[0]])
    with pytest.raises(ScatlasInputError, match="at least 2"):
        fastmnn(batches[0], np.zeros(len(batches[0])))
    with pytest.raises(ScatlasInputError, match="same features"):
        fastmnn([batches[0], batches[1][:, :20]])
    bad = batches[1].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ScatlasInputError, match="NaN"):
        fastmnn([batches[0], bad])
    with pytest.raises(ScatlasInputError, match="merge_order"):
        fastmnn(batches, merge_order=[0, 1, 2])
    with pytest.raises(ScatlasInputError, match="unknown batch"):
        fastmnn(batches, merge_order=[0, 1, 2, "x"])
    with pytest.raises(ScatlasInputError, match="batch"):
        fastmnn(batches[0], np.zeros(5))
    with pytest.raises(ScatlasInputError, match="d="):
        fastmnn(batches, d=1000)
    labels = np.r_[np.zeros(30), np.ones(29), np.nan]
    with pytest.raises(ScatlasInputError, match="missing"):
        fastmnn(batches[0], labels)


def test_low_dimensional_input(toy):
    batches, _ = toy
    pcs, _ = multi_batch_pca([b / np.linalg.norm(b, axis=1, keepdims=True) for b in batches], 8)
    a = fastmnn(pcs, d=None, k=7)
    b = fastmnn(batches, d=8, k=7)
    s = _signs(np.asarray(a.corrected[:5]), np.asarray(b.corrected[:5]))
    np.testing.assert_allclose(a.corrected * s, b.corrected, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# (e) GPU against CPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_matches_cpu(toy):
    """float64 on both devices. The corrections rest on mutual nearest neighbours: the GPU must
    reproduce the CPU to float64 rounding (1e-8 of the scale, after the per-component sign)
    when the CPU's own result survives a 1e-10 relative jitter of the input (no near-ties);
    otherwise only most cells need agree."""
    from tests.helpers.neighbour_sets import stable_under_rounding

    cp = backend.gpu_module()
    batches, _ = toy

    def run(arrays):
        return fastmnn(arrays, k=7, d=8, dtype=np.float64)

    cpu = run(batches)
    stable = stable_under_rounding(
        run, batches, key=lambda r: np.round(r.corrected * _signs(r.rotation, cpu.rotation),
                                             6).tobytes())
    tol = 1e-8 * np.abs(cpu.corrected).max()

    def check(corrected, rotation):
        err = np.abs(corrected * _signs(rotation, cpu.rotation) - cpu.corrected)
        if stable:
            assert err.max() <= tol, err.max()
        else:
            assert (err.max(axis=1) <= tol).mean() >= 0.95

    gpu = run([cp.asarray(b) for b in batches])
    check(cp.asnumpy(gpu.corrected), cp.asnumpy(gpu.rotation))
    moved = fastmnn([sp.csr_matrix(b) for b in batches], k=7, d=8, device="gpu",
                    dtype=np.float64)
    assert isinstance(moved.corrected, np.ndarray)  # device= moves results back
    check(moved.corrected, moved.rotation)


def test_multi_batch_norm_on_shallow_data_compares_detected_genes():
    """No gene averages min_mean counts: the coverage ratio comes from the genes detected in
    both batches (with a warning) instead of an error; a batch sampled at twice the depth of
    another is scaled down by about 2 (the truth)."""
    from scatlas.kernels.fastmnn import multi_batch_norm

    rng = np.random.default_rng(0)
    rate = rng.uniform(0.01, 0.2, size=300)  # every gene far below 1 count per cell
    shallow = rng.poisson(rate, size=(400, 300))
    deep = rng.poisson(2 * rate, size=(400, 300))
    counts = np.vstack([shallow, deep]).astype(np.float64)
    counts[counts.sum(1) == 0, 0] = 1  # no empty cells
    batch = np.array(["a"] * 400 + ["b"] * 400)
    with pytest.warns(UserWarning, match="'a' / 'b'.*shallow"):
        out = multi_batch_norm(counts, batch, min_mean=1.0, dtype=np.float64)
    # after rescaling the two batches have equal mean expression per gene (up to noise)
    back = np.exp2(out) - 1
    ratio = back[400:].mean(0).sum() / back[:400].mean(0).sum()
    assert abs(ratio - 1) < 0.1, ratio
