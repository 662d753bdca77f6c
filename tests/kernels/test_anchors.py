"""Seurat anchor integration (kernels.anchors) against a step-by-step NumPy reading of
FindIntegrationAnchors / IntegrateData, plus ground truth, CellBench and bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from scatlas import backend, metrics
from scatlas._validate import ScatlasInputError
from scatlas.kernels.anchors import SmallBatchWarning, find_anchors, scale_data, top_dim_features
from scatlas.kernels.linalg import pca
from scatlas.kernels.seurat import (
    anchor_weights,
    count_anchors,
    integrate_pair,
    sample_tree,
    seurat_integrate,
)

# ----------------------------------------------------------------------------------------------
# plain-NumPy reference, written from the Seurat sources (one step per function)
# ----------------------------------------------------------------------------------------------


def ref_scale(X):
    """ScaleData / FastRowScale: centre, divide by sd (n - 1), clip above 10."""
    S = (X - X.mean(0)) / X.std(0, ddof=1)
    return np.minimum(S, 10.0)


def ref_cca(S1, S2, k):
    """RunCCA.default: standardise cells, SVD of the explicit n1 x n2 cross product, sign."""

    def standardise(S):
        S = S - S.mean(1, keepdims=True)
        return S / S.std(1, ddof=1, keepdims=True)

    U, _, Vt = np.linalg.svd(standardise(S1) @ standardise(S2).T)
    U, V = U[:, :k], Vt[:k].T
    sign = np.where(U[0] < 0, -1.0, 1.0)
    return U * sign, V * sign


def ref_l2(X):
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, n, out=np.zeros_like(X), where=n > 0)


def ref_knn(Q, R, k, exclude_self=False):
    """All distances, sorted by (distance, index)."""
    D = np.sqrt(((Q[:, None, :] - R[None, :, :]) ** 2).sum(-1))
    if exclude_self:
        np.fill_diagonal(D, np.inf)
    idx = np.array([np.lexsort((np.arange(R.shape[0]), row))[:k] for row in D])
    return np.take_along_axis(D, idx, 1), idx


def ref_top(col, y):
    """SeuratObject Top(balanced=TRUE) on one loading column (num == 1: unbalanced)."""
    p = col.size
    num = min(y, p)
    if num == 1:
        return [int(np.argmax(np.abs(col)))]
    num = round(num / 2)  # Python's round is R's: half to even
    order = sorted(range(p), key=lambda i: -col[i])  # stable, decreasing
    return order[:num] + order[-num:][::-1]


def ref_top_dim_features(L, max_features, per_dim=100):
    dims = L.shape[1]
    limit = max(2 * dims, max_features)

    def union(y):
        return set().union(*[ref_top(L[:, d], y) for d in range(dims)])

    counts = [len(union(y)) for y in range(1, per_dim + 1)]
    below = [c for c in counts if c < limit]
    y = int(np.argmax(below)) + 1  # which.max: first maximum
    return np.array(sorted(union(y)))


def ref_find_anchors(X1, X2, *, dims, k_anchor, k_score, k_filter, max_features):
    """FindIntegrationAnchors for one pair, X1 / X2 log-normalised (scale = TRUE)."""
    S1, S2 = ref_scale(X1), ref_scale(X2)
    U, V = ref_cca(S1, S2, dims)
    E1, E2 = ref_l2(U), ref_l2(V)
    k = max(k_anchor, k_score)
    n1, n2 = len(E1), len(E2)
    nnaa = np.c_[np.arange(n1), ref_knn(E1, E1, k, exclude_self=True)[1]]
    nnbb = np.c_[np.arange(n2), ref_knn(E2, E2, k, exclude_self=True)[1]]
    nnab = ref_knn(E1, E2, k)[1]
    nnba = ref_knn(E2, E1, k)[1]
    anchors = []  # FindAnchorPairs
    for a in range(n1):
        for b in nnab[a, :k_anchor]:
            if a in nnba[b, :k_anchor]:
                anchors.append((a, int(b)))
    n_mnn = len(anchors)
    L = S1.T @ U + S2.T @ V  # ProjectDim
    feats = ref_top_dim_features(L, max_features)
    F1, F2 = ref_l2(X1[:, feats]), ref_l2(X2[:, feats])
    nn_f = ref_knn(F1, F2, k_filter)[1]
    anchors = [(a, b) for a, b in anchors if b in nn_f[a]]  # FilterAnchors
    raw = []
    for a, b in anchors:  # ScoreAnchors
        set_a = set(nnaa[a, :k_score]) | {n1 + j for j in nnab[a, :k_score]}
        set_b = set(nnba[b, :k_score]) | {n1 + j for j in nnbb[b, :k_score]}
        raw.append(len(set_a & set_b))
    raw = np.array(raw, dtype=float)
    lo, hi = np.quantile(raw, 0.01), np.quantile(raw, 0.90)
    score = np.clip((raw - lo) / (hi - lo), 0, 1)
    a, b = (np.array(v) for v in zip(*anchors, strict=True))
    return a, b, score, n_mnn, feats


def ref_integrate(R, Q, a, b, score, Wq, k, sd=1.0):
    """FindIntegrationMatrix + FindWeights + FindWeightsC + IntegrateDataC, literally."""
    cells2 = list(dict.fromkeys(b.tolist()))  # unique, order of appearance
    dist, idx = ref_knn(Wq, Wq[cells2], k)
    dist = 1 - dist / dist[:, -1:]
    rows_of = {c: [r for r in range(len(b)) if b[r] == c] for c in cells2}
    W = np.zeros((len(b), len(Q)))
    for cell in range(len(Q)):
        taken = 0
        for i in range(k):
            for r in rows_of[cells2[idx[cell, i]]]:
                if taken < k:
                    W[r, cell] = 1 - np.exp(-dist[cell, i] * score[r] / (2 / sd) ** 2)
                    taken += 1
    W /= W.sum(0, keepdims=True)
    M = Q[b] - R[a]
    return Q - W.T @ M


def lognorm(counts):
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)


def toy_counts(rng, n, centers, types=None, scale=1.0):
    """Poisson counts of cells drawn from `centers` (types x genes, log-rates)."""
    t = rng.integers(0, len(centers), n) if types is None else types
    return rng.poisson(np.exp(centers[t]) * scale).astype(float), t


@pytest.fixture(scope="module")
def worked():
    rng = np.random.default_rng(7)
    centers = rng.normal(0.5, 1.0, size=(3, 40))
    C1, t1 = toy_counts(rng, 90, centers)
    C2, t2 = toy_counts(rng, 70, centers + rng.normal(0, 0.3, size=40))
    return lognorm(C1), lognorm(C2), t1, t2


ARGS = dict(dims=6, k_anchor=5, k_score=10, k_filter=30, max_features=12)


# ----------------------------------------------------------------------------------------------
# (a) worked example
# ----------------------------------------------------------------------------------------------
def test_find_anchors_reproduces_reference(worked):
    X1, X2, t1, t2 = worked
    a, b, score, n_mnn, feats = ref_find_anchors(X1, X2, **ARGS)
    anc = find_anchors(X1, X2, scale=True, filter_data1=X1, filter_data2=X2,
                       dtype=np.float64, **ARGS)
    assert anc.n_mnn == n_mnn > len(a) > 20  # the filter removed some
    np.testing.assert_array_equal(anc.filter_features, feats)
    np.testing.assert_array_equal(anc.cell1, a)
    np.testing.assert_array_equal(anc.cell2, b)
    np.testing.assert_allclose(anc.score, score, rtol=0, atol=1e-12)
    assert np.mean(t1[a] == t2[b]) > 0.9
    c1, c2, s = anc  # unpacks like Seurat's (cell1, cell2, score)
    assert c1 is anc.cell1 and s is anc.score


def test_genes_constant_in_one_dataset_are_left_out_of_the_pair(worked):
    """RunCCA's CheckFeatures: a gene with zero variance in either dataset takes no part in that
    pair's CCA, loadings or filter, so adding such genes changes nothing (Seurat 4.3 drops
    281-508 of 1,767 genes per pair on PBMC data; keeping them changed the anchor counts)."""
    X1, X2, _, _ = worked
    rng = np.random.default_rng(3)
    n1, n2 = len(X1), len(X2)
    extra1 = np.column_stack([np.zeros(n1), np.full(n1, 2.0), rng.normal(size=n1)])
    extra2 = np.column_stack([rng.normal(size=n2), rng.normal(size=n2), np.zeros(n2)])
    Y1, Y2 = np.hstack([X1, extra1]), np.hstack([X2, extra2])
    base = find_anchors(X1, X2, scale=True, filter_data1=X1, filter_data2=X2,
                        dtype=np.float64, **ARGS)
    wide = find_anchors(Y1, Y2, scale=True, filter_data1=Y1, filter_data2=Y2,
                        dtype=np.float64, **ARGS)
    np.testing.assert_array_equal(wide.cell1, base.cell1)
    np.testing.assert_array_equal(wide.cell2, base.cell2)
    np.testing.assert_allclose(wide.score, base.score, atol=1e-12)
    np.testing.assert_array_equal(wide.filter_features, base.filter_features)
    np.testing.assert_allclose(np.abs(wide.embeddings[0]), np.abs(base.embeddings[0]),
                               atol=1e-10)


def test_integrate_pair_reproduces_reference(worked):
    X1, X2, _, _ = worked
    anc = find_anchors(X1, X2, scale=True, filter_data1=X1, filter_data2=X2,
                       dtype=np.float64, **ARGS)
    Wq = np.random.default_rng(1).normal(size=(len(X2), 5))
    expected = ref_integrate(X1, X2, anc.cell1, anc.cell2, anc.score, Wq, k=15)
    got, W = integrate_pair(X1, X2, anc, Wq, k_weight=15, dtype=np.float64,
                            return_weights=True)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    assert W.shape == (len(X2), len(anc)) and np.all(np.diff(W.indptr) == 15)
    np.testing.assert_allclose(np.asarray(W.sum(1)).ravel(), 1.0)
    # sparse input, float32: same answer to float32 precision
    got32 = integrate_pair(sp.csr_matrix(X1), sp.csr_matrix(X2), anc, Wq, k_weight=15)
    np.testing.assert_allclose(got32, expected, atol=1e-4)


def test_anchor_weights_cut_at_k_entries():
    # query cell 0's nearest anchor cell (position 0) is in 3 anchors: with k = 2 it takes two
    # entries from it and none from the next neighbour (FindWeightsC's running count)
    dist = np.array([[0.0, 1.0]])
    nbr = np.array([[0, 1]])
    pos = np.array([0, 1, 0, 0])  # anchor rows -> anchor cell positions
    score = np.array([1.0, 1.0, 0.5, 0.25])
    W = anchor_weights(dist, nbr, pos, score, 1.0).toarray()
    w0 = 1 - np.exp(-1.0 * np.array([1.0, 0.5]) / 4)  # D = 1 for the first neighbour
    np.testing.assert_allclose(W[0], np.r_[w0[0], 0, w0[1], 0] / w0.sum())


def test_seurat_integrate_two_datasets_is_one_merge(worked):
    X1, X2, _, _ = worked
    res = seurat_integrate([X2, X1], dtype=np.float64, **ARGS, k_weight=15)
    assert res.merges == [([1], [0])]  # the larger dataset (X1) is the reference
    anc = res.anchors[(0, 1)]  # found as (X2, X1): the reversed copy is used
    S = ref_scale(np.vstack([X1, X2]))  # ScaleData + RunPCA(npcs = dims) of the merged pair
    U, D, _ = np.linalg.svd(S, full_matrices=False)
    Wq = (U[:, :6] * D[:6])[len(X1):]
    expected = ref_integrate(X1, X2, anc.cell2, anc.cell1, anc.score, Wq, k=15)
    np.testing.assert_allclose(res.corrected[:len(X2)], expected, rtol=1e-8, atol=1e-8)
    np.testing.assert_array_equal(res.corrected[len(X2):], X1)  # reference unchanged


def test_top_dim_features_matches_literal_rule():
    rng = np.random.default_rng(3)
    for p, dims, maxf in ((50, 4, 20), (300, 30, 200), (9, 3, 200)):
        L = rng.normal(size=(p, dims))
        np.testing.assert_array_equal(top_dim_features(L, maxf), ref_top_dim_features(L, maxf))


def test_scale_data_matches_seurat_rule():
    X = np.random.default_rng(0).gamma(0.3, 2.0, size=(200, 8))
    X[:, 3] = 2.0  # constant gene -> 0 (Seurat: NaN)
    X[0, 5] = 500.0  # one outlier (z ~ 14): clipped at 10, upper side only
    S = scale_data(sp.csr_matrix(X), dtype=np.float64)
    ref = ref_scale(np.delete(X, 3, axis=1))
    np.testing.assert_allclose(np.delete(S, 3, axis=1), ref, rtol=1e-12)
    assert np.all(S[:, 3] == 0) and S[0, 5] == 10.0 and S.min() < -0.1


def test_sample_tree_follows_hclust_convention():
    sim = np.array([[0, 0.5, 0.1, 0.1], [0.5, 0, 0.1, 0.1], [0.1, 0.1, 0, 0.9],
                    [0.1, 0.1, 0.9, 0]])
    assert sample_tree(sim) == [(-3, -4), (-1, -2), (1, 2)]
    sim0 = np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 0]])  # dataset 3 has no anchors
    assert sample_tree(sim0) == [(-1, -2), (-3, 1)]


# Similarity matrices with many tied distances and the merge matrices R 4 returns for them,
# ``hclust(as.dist(1 / S))$merge`` (printed by Rscript; SciPy's linkage broke these ties
# differently, so Seurat merged datasets in another order).
_R_HCLUST_TIES = [
    ([[0, 2, 1, 1, 1, 1, 1], [2, 0, 2, 3, 2, 2, 3], [1, 2, 0, 2, 3, 1, 3],
      [1, 3, 2, 0, 2, 1, 3], [1, 2, 3, 2, 0, 1, 2], [1, 2, 1, 1, 1, 0, 1],
      [1, 3, 3, 3, 2, 1, 0]],
     [(-2, -4), (-7, 1), (-3, -5), (2, 3), (-1, 4), (-6, 5)]),
    ([[0, 2, 3, 3, 3, 2], [2, 0, 2, 3, 3, 3], [3, 2, 0, 2, 3, 3], [3, 3, 2, 0, 2, 3],
      [3, 3, 3, 2, 0, 3], [2, 3, 3, 3, 3, 0]],
     [(-1, -3), (-5, 1), (-2, -4), (-6, 3), (2, 4)]),
    ([[0, 1, 1, 3, 2, 2], [1, 0, 2, 3, 3, 3], [1, 2, 0, 2, 2, 3], [3, 3, 2, 0, 2, 3],
      [2, 3, 2, 2, 0, 3], [2, 3, 3, 3, 3, 0]],
     [(-1, -4), (-2, -5), (-6, 2), (-3, 3), (1, 4)]),
]


@pytest.mark.parametrize("case", range(len(_R_HCLUST_TIES)))
def test_sample_tree_breaks_ties_as_r_hclust(case):
    sim, merge = _R_HCLUST_TIES[case]
    assert sample_tree(np.array(sim, dtype=float)) == merge


# ----------------------------------------------------------------------------------------------
# (b) ground truth: a constant offset between batches
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shifted():
    """Three batches of the same 4 cell types; batch 1 and 2 are copies of batch-0 cells plus a
    constant offset vector (and a little noise): every cell has a known counterpart."""
    rng = np.random.default_rng(11)
    p, T = 300, 4
    centers = rng.normal(0, 1.5, size=(T, p))
    t0 = rng.integers(0, T, 400)
    X0 = centers[t0] + rng.normal(0, 1.0, size=(400, p))
    parts, types, twins, offsets = [X0], [t0], [np.arange(400)], [np.zeros(p)]
    for n in (300, 250):
        pick = rng.choice(400, n, replace=False)
        off = rng.normal(0, 2.0, size=p)
        parts.append(X0[pick] + off + rng.normal(0, 0.1, size=(n, p)))
        types.append(t0[pick])
        twins.append(pick)
        offsets.append(off)
    return parts, types, twins, offsets


def test_seurat_removes_a_constant_offset(shifted):
    parts, types, twins, offsets = shifted
    res = seurat_integrate(parts, dims=20, k_filter=None)
    starts = np.cumsum([0] + [len(X) for X in parts])
    out = [res.corrected[starts[i]:starts[i + 1]] for i in range(3)]
    np.testing.assert_allclose(out[0], parts[0], atol=1e-5)  # the largest is the reference
    for i in (1, 2):
        before = np.linalg.norm(parts[i] - parts[0][twins[i]], axis=1).mean()
        after = np.linalg.norm(out[i] - parts[0][twins[i]], axis=1).mean()
        assert after < 0.35 * before  # cells land near their counterparts
        assert np.linalg.norm((out[i] - parts[i]).mean(0) + offsets[i]) < 0.1 * np.linalg.norm(
            offsets[i])
    E = np.vstack(out)
    batch = np.repeat([0, 1, 2], [len(X) for X in parts])
    assert metrics.knn_label_transfer(E, np.concatenate(types), batch) > 0.98
    assert metrics.silhouette_label(E, np.concatenate(types)) > 0.6


def test_seurat_v5_embedding_path(shifted):
    parts, types, twins, _ = shifted
    batch = np.repeat([0, 1, 2], [len(X) for X in parts])
    X = np.vstack(parts)
    emb = pca(scale_data(X), 20).scores  # joint PCA, as IntegrateLayers(orig = "pca")
    res = seurat_integrate(X, batch, embeddings=emb, scale="joint", dims=20, k_filter=None)
    assert res.corrected.shape == emb.shape and res.batches == [0, 1, 2]
    lab = np.concatenate(types)
    assert metrics.ilisi(res.corrected, batch) > metrics.ilisi(emb, batch) + 0.3
    assert metrics.knn_label_transfer(res.corrected, lab, batch) > 0.98


# ----------------------------------------------------------------------------------------------
# (c) CellBench: batch mixing up, cross-batch label transfer kept
# ----------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::scatlas.kernels.anchors.SmallBatchWarning")  # 156-252 cells
def test_cellbench_seurat_improves_mixing(cellbench_hvg, capsys):
    X, batch, labels, base = cellbench_hvg
    res = seurat_integrate(X, batch)
    E = pca(scale_data(res.corrected), 30).scores
    after = {"ilisi": metrics.ilisi(E, batch),
             "transfer": metrics.knn_label_transfer(E, labels, batch),
             "asw_label": metrics.silhouette_label(E, labels)}
    with capsys.disabled():
        print(f"\nCellBench Seurat CCA: before {base} after "
              f"{ {k: round(v, 3) for k, v in after.items()} }")
    assert after["ilisi"] > base["ilisi"] + 0.1
    assert after["transfer"] > 0.9


# ----------------------------------------------------------------------------------------------
# (d) bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_is_rejected(worked):
    X1, X2, _, _ = worked
    with pytest.raises(ScatlasInputError, match="at least 2 cells"):
        find_anchors(X1, X2[:1], dims=5)
    with pytest.raises(ScatlasInputError, match="k_score must be >= 1"):
        find_anchors(X1, X2, k_score=0)
    with pytest.raises(ScatlasInputError, match="at least 2"):
        seurat_integrate([X1])
    with pytest.raises(ScatlasInputError, match="at least 2"):
        seurat_integrate(X1, np.zeros(len(X1)))
    with pytest.raises(ScatlasInputError, match="same features"):
        find_anchors(X1, X2[:, :30])
    bad = X2.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ScatlasInputError, match="NaN"):
        seurat_integrate([X1, bad])
    with pytest.raises(ScatlasInputError, match="no anchors"):
        integrate_pair(X1, X2, (np.zeros(0), np.zeros(0), np.zeros(0)), X2[:, :5])
    with pytest.raises(ScatlasInputError, match="batch="):
        seurat_integrate(X1)


def test_few_anchors_lower_k_weight_and_small_filter_warns(worked):
    X1, X2, _, _ = worked
    Wq = X2[:, :5]
    with pytest.warns(SmallBatchWarning, match="k_weight=100; k_weight lowered to 3") as rec:
        out = integrate_pair(X1, X2, ([0, 1, 2], [0, 1, 2], [1.0, 0.5, 0.2]), Wq, k_weight=100)
    assert rec[0].filename == __file__  # points at the caller's line
    assert out.shape == X2.shape and np.all(np.isfinite(out))
    # 3 anchors but 2 distinct query cells (Seurat's FindWeights stops): k_weight 2, exactly
    # what an explicit k_weight=2 gives (the reference, ref_integrate)
    anchors = (np.array([0, 1, 2]), np.array([0, 0, 1]), np.array([1.0, 0.5, 0.2]))
    with pytest.warns(SmallBatchWarning, match="distinct query cells \\(2\\)"):
        got = integrate_pair(X1, X2, anchors, Wq, k_weight=3, dtype=np.float64)
    expected = ref_integrate(X1, X2, *anchors, Wq, k=2)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    with pytest.warns(SmallBatchWarning, match="k_filter=200 skipped"):
        anc = find_anchors(X1, X2, scale=True, dims=6, k_score=10, k_filter=200)
    assert anc.params == {"dims": 6, "k_anchor": 5, "k_score": 10, "k_filter": None}


def test_find_anchors_on_small_datasets_equals_explicit_lower_values(worked):
    """20 cells cannot give dims=30 / k_score=30 (Seurat 4.3 stops): the values are lowered to
    19 with one warning, and the anchors are exactly those of an explicit dims=19, k_score=19
    run (which warns about nothing but the filter's skip)."""
    X1, X2, _, _ = worked
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        anc = find_anchors(X1, X2[:20], scale=True, dims=30, k_score=30, k_filter=None,
                           dtype=np.float64)
    assert len(rec) == 1 and issubclass(rec[0].category, SmallBatchWarning)
    assert rec[0].filename == __file__
    assert "dims 30 -> 19" in str(rec[0].message) and "k_score 30 -> 19" in str(rec[0].message)
    assert anc.params == {"dims": 19, "k_anchor": 5, "k_score": 19, "k_filter": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = find_anchors(X1, X2[:20], scale=True, dims=19, k_score=19, k_filter=None,
                           dtype=np.float64)
    np.testing.assert_array_equal(anc.cell1, ref.cell1)
    np.testing.assert_array_equal(anc.cell2, ref.cell2)
    np.testing.assert_array_equal(anc.score, ref.score)
    a, b, score, _, _ = ref_find_anchors(X1, X2[:20], dims=19, k_anchor=5, k_score=19,
                                         k_filter=len(X1), max_features=200)
    np.testing.assert_array_equal(anc.cell1, a)  # and the literal NumPy reading agrees
    np.testing.assert_allclose(anc.score, score, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# (d2) many small batches (Baron donors: 23-102 cells; Seurat 4.3 stops at dims = 30)
# ----------------------------------------------------------------------------------------------
SMALL_SIZES = {"donorA": 22, "donorB": 35, "donorC": 40, "donorD": 28}


@pytest.fixture(scope="module")
def small_batches():
    """Four batches of 22-40 cells (3 cell types, 60 genes, a gene offset per batch), rows
    interleaved across batches."""
    rng = np.random.default_rng(5)
    centers = rng.normal(0.5, 1.0, size=(3, 60))
    X, batch, types = [], [], []
    for name, n in SMALL_SIZES.items():
        C, t = toy_counts(rng, n, centers + rng.normal(0, 0.4, size=60))
        X.append(lognorm(C))
        batch += [name] * n
        types.append(t)
    order = rng.permutation(sum(SMALL_SIZES.values()))
    return (np.vstack(X)[order], np.array(batch)[order], np.concatenate(types)[order])


def test_small_batches_adapt_with_one_warning_naming_them(small_batches):
    X, batch, types = small_batches
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = seurat_integrate(X, batch)  # Seurat's defaults: dims 30, k.score 30, k.filter 200
    assert len(rec) == 1 and issubclass(rec[0].category, SmallBatchWarning), rec
    assert rec[0].filename == __file__  # stacklevel: the caller's line, not an internal one
    msg = str(rec[0].message)
    assert res.adapted == msg
    assert "'donorA' (22 cells): dims=21, k_score=21" in msg
    assert "'donorD' (28 cells): dims=27, k_score=27" in msg
    assert "donorB' (35 cells):" not in msg  # 35 cells allow dims = 30
    assert "k_filter=200: anchors not filtered in 6 of 6 pair(s)" in msg
    sizes = dict(SMALL_SIZES)
    for (i, j), anc in res.anchors.items():
        m = min(sizes[res.batches[i]], sizes[res.batches[j]])
        assert anc.params == {"dims": min(30, m - 1), "k_anchor": 5, "k_score": min(30, m - 1),
                              "k_filter": None}
    # per merge, k_weight is the number of distinct anchor query cells (<= the query's cells)
    for (_, q), mp in zip(res.merges, res.merge_params, strict=True):
        assert 1 <= mp["k_weight"] <= min(100, sum(sizes[res.batches[d]] for d in q))
    assert np.all(np.isfinite(res.corrected)) and res.corrected.shape == X.shape
    E = pca(scale_data(res.corrected), 10).scores
    assert metrics.knn_label_transfer(E, types, batch) > 0.9


def test_small_batch_pair_equals_explicit_lower_values(small_batches):
    """A pair's anchors in the driver equal find_anchors with the lowered values given."""
    X, batch, _ = small_batches
    with pytest.warns(SmallBatchWarning):
        res = seurat_integrate(X, batch)
    i, j = res.batches.index("donorA"), res.batches.index("donorC")
    XA, XC = X[batch == "donorA"], X[batch == "donorC"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = find_anchors(scale_data(XA), scale_data(XC), dims=21, k_score=21, k_filter=None)
    anc = res.anchors[(i, j)]
    np.testing.assert_array_equal(anc.cell1, ref.cell1)
    np.testing.assert_array_equal(anc.cell2, ref.cell2)
    np.testing.assert_array_equal(anc.score, ref.score)


def test_small_batch_errors_name_the_batch(small_batches):
    X, batch, _ = small_batches
    lonely = batch.astype(object)
    lonely[np.flatnonzero(batch == "donorB")[0]] = "lonely"
    with pytest.raises(ScatlasInputError, match="'lonely' \\(1 cell\\) has fewer than 2 cells"):
        seurat_integrate(X, lonely)
    dup = X.copy()
    rows = np.flatnonzero(batch == "donorC")
    dup[rows] = dup[rows[0]]  # every cell of donorC identical: no gene varies there
    with pytest.raises(ScatlasInputError, match="'donorC' \\(40 cells\\).*features vary"):
        seurat_integrate(dup, batch, k_filter=None)
    with pytest.raises(ScatlasInputError, match="k_weight must be >= 1"):
        seurat_integrate(X, batch, k_weight=0)


def test_count_anchors_is_doubled_rows_over_smaller_dataset(worked):
    X1, X2, _, _ = worked
    anc = find_anchors(X1, X2, scale=True, **ARGS)
    sim = count_anchors({(0, 1): anc}, [90, 70])
    assert sim[0, 1] == sim[1, 0] == 2 * len(anc) / 70


# ----------------------------------------------------------------------------------------------
# (e) GPU against CPU
# ----------------------------------------------------------------------------------------------
def _anchor_pairs(anc) -> set[tuple[int, int]]:
    return set(zip(backend.to_host(anc.cell1).tolist(), backend.to_host(anc.cell2).tolist(),
                   strict=True))


@pytest.mark.gpu
def test_gpu_matches_cpu(worked):
    """Anchors are mutual neighbours: where the data hold near-ties (decided by rounding), two
    devices may pick different ones. So the GPU must reproduce the CPU's anchors exactly only
    when the CPU's own anchors survive a 1e-10 relative jitter of the input (no near-ties);
    otherwise they must overlap as much as the jittered CPU run overlaps the CPU run."""
    from tests.helpers.neighbour_sets import stable_under_rounding

    cp = backend.gpu_module()
    X1, X2, _, _ = worked
    kw = dict(scale=True, dtype=np.float64, **ARGS)

    def run(arrays):
        A, B = arrays
        return find_anchors(A, B, filter_data1=A, filter_data2=B, **kw)

    cpu = run([X1, X2])
    gpu = run([cp.asarray(X1), cp.asarray(X2)])
    if stable_under_rounding(run, [X1, X2], key=_anchor_pairs):
        np.testing.assert_array_equal(cp.asnumpy(gpu.cell1), cpu.cell1)
        np.testing.assert_array_equal(cp.asnumpy(gpu.cell2), cpu.cell2)
        # scores: shared-neighbour counts (integers) scaled by two quantiles in float64
        np.testing.assert_allclose(cp.asnumpy(gpu.score), cpu.score, rtol=0, atol=1e-12)
    else:
        common = _anchor_pairs(cpu) & _anchor_pairs(gpu)
        assert len(common) >= 0.9 * len(cpu), (len(common), len(cpu))
    Wq = np.random.default_rng(1).normal(size=(len(X2), 5))
    c_cpu = integrate_pair(X1, X2, cpu, Wq, k_weight=15, dtype=np.float64)
    # the same anchors on both devices: float64 weighted sums of 15 neighbours
    c_gpu = integrate_pair(cp.asarray(X1), cp.asarray(X2), cpu, cp.asarray(Wq), k_weight=15,
                           dtype=np.float64)
    np.testing.assert_allclose(cp.asnumpy(c_gpu), c_cpu, rtol=0,
                               atol=1e-10 * max(np.abs(c_cpu).max(), 1))
    res_cpu = seurat_integrate([X1, X2], **ARGS)
    res_gpu = seurat_integrate([sp.csr_matrix(X1), sp.csr_matrix(X2)], device="gpu", **ARGS)
    assert isinstance(res_gpu.corrected, np.ndarray)  # device= moves results back
    # float32 end to end: anchors may differ at near-ties, so the corrected values are
    # compared in bulk: 99% of the entries within 1e-3 of their scale
    close = np.abs(res_gpu.corrected - res_cpu.corrected) <= 1e-3 * np.abs(
        res_cpu.corrected).max()
    assert close.mean() >= 0.99, close.mean()


def test_no_warnings_on_the_default_path(worked):
    X1, X2, _, _ = worked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seurat_integrate([X1, X2], k_weight=15, **ARGS)
