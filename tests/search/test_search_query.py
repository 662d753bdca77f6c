"""annotate (hand-computed votes), search_centroid, aggregate_hits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scatlas._validate import ScatlasInputError
from scatlas.search import CellIndex, aggregate_hits, annotate, search_centroid
from scatlas.search.synthetic import clustered_embeddings


@pytest.fixture(scope="module")
def line_index():
    """Cells on a line (euclidean), labels chosen so the votes are easy to compute by hand."""
    X = np.array([[0.0], [1.0], [2.0], [4.0], [10.0], [11.0]], np.float32)
    X = np.hstack([X, np.zeros_like(X)])
    meta = pd.DataFrame({"label": ["a", "a", "b", "b", "c", None],
                         "study": ["s1", "s1", "s2", "s2", "s2", "s3"]})
    return CellIndex.build(X, meta, metric="euclidean")


def test_annotate_matches_hand_vote(line_index):
    Q = np.array([[1.9, 0.0], [10.4, 0.0]], np.float32)
    out = annotate(line_index, Q, k=4, label_key="label", ood_distance=0.5)
    # query 0: neighbours 2 (b, 0.1), 1 (a, 0.9), 0 (a, 1.9), 3 (b, 2.1)
    wa, wb = 1 / 0.9 + 1 / 1.9, 1 / 0.1 + 1 / 2.1
    assert out.label[0] == "b"
    np.testing.assert_allclose(out.confidence[0], wb / (wa + wb))
    np.testing.assert_allclose(out.vs_second[0], wb / (wb + wa))
    np.testing.assert_allclose(out.min_dist[0], 0.1, rtol=1e-5)
    assert out.hits[0] == {"a": 2, "b": 2} and not out.is_ood[0]
    # query 1: 4 (c, 0.4), 5 (unlabelled, skipped), 3 (b, 6.4), 2 (b, 8.4)
    wc, wb = 1 / 0.4, 1 / 6.4 + 1 / 8.4
    assert out.label[1] == "c"
    np.testing.assert_allclose(out.confidence[1], wc / (wc + wb), rtol=1e-5)
    assert out.hits[1] == {"b": 2, "c": 1}
    assert not out.is_ood[1]
    # uniform weights: b has 2 votes vs c's 1
    uni = annotate(line_index, Q, k=4, label_key="label", weighting="uniform")
    assert uni.label[1] == "b"
    np.testing.assert_allclose(uni.confidence[1], 2 / 3)
    np.testing.assert_allclose(uni.vs_second[1], 2 / 3)
    # a vote tie goes to the label with the nearest hit
    tie = annotate(line_index, np.array([[1.4, 0.0]], np.float32), k=2, label_key="label",
                   weighting="uniform")
    assert tie.label[0] == "a"  # 1 (a, 0.4), 2 (b, 0.6)


def test_annotate_ood_and_filter(line_index):
    Q = np.array([[30.0, 0.0], [0.1, 0.0]], np.float32)
    out = annotate(line_index, Q, k=2, label_key="label", ood_distance=5.0)
    assert out.is_ood.tolist() == [True, False]
    f = annotate(line_index, Q[1:], k=1, label_key="label", filter={"study": "s2"})
    assert f.label[0] == "b"
    with pytest.raises(ScatlasInputError, match="label_key"):
        annotate(line_index, Q, label_key="nope")


def test_annotate_default_ood_from_index():
    X, lab = clustered_embeddings(3000, 16, n_clusters=8, labels=True, seed=1)
    idx = CellIndex.build(X, pd.DataFrame({"t": lab}))
    thr = idx.ood_distance(0.99)
    assert thr is not None and 0 < thr < 1
    far = -X[:5]  # antipodal points: far from everything
    out = annotate(idx, np.vstack([X[:50], far]), k=10, label_key="t")
    assert out.is_ood[-5:].all() and out.is_ood[:50].mean() < 0.1
    assert (out.label[:50].to_numpy() == lab[:50]).mean() > 0.95


def test_search_centroid():
    X = clustered_embeddings(2000, 8, n_clusters=4, seed=2)
    idx = CellIndex.build(X)
    grp = X[10:60] * 3.0
    c, D, ids = search_centroid(idx, grp, k=7)
    want = X[10:60] / np.linalg.norm(X[10:60], axis=1, keepdims=True)
    want = want.mean(0) / np.linalg.norm(want.mean(0))
    np.testing.assert_allclose(c, want, atol=1e-6)
    D2, I2 = idx.search(want[None].astype(np.float32), 7)
    np.testing.assert_array_equal(ids, I2[0])
    np.testing.assert_allclose(D, D2[0], atol=1e-6)


def test_aggregate_hits(line_index):
    ids = np.array([[0, 1, 2, -1], [2, 3, 4, 5]])
    out = aggregate_hits(line_index, ids, by="study")
    assert out.study.tolist() == ["s2", "s1", "s3"]
    assert out.n_hits.tolist() == [4, 2, 1]
    np.testing.assert_allclose(out.fraction_of_hits, [4 / 7, 2 / 7, 1 / 7])
    assert out.n_cells.tolist() == [3, 2, 1]
    np.testing.assert_allclose(out.fraction_of_group, [4 / 3, 1.0, 1.0])
    two = aggregate_hits(line_index, ids, by=("study", "label"))
    ref = (pd.DataFrame({"study": ["s1", "s1", "s2", "s2", "s2", "s2", "s3"],
                         "label": ["a", "a", "b", "b", "b", "c", None]})
           .value_counts(dropna=False))
    got = two.set_index(["study", "label"]).n_hits
    for (s, lab_), n in ref.items():
        assert got.loc[(s, lab_)] == n
    with pytest.raises(ScatlasInputError, match="not in the metadata"):
        aggregate_hits(line_index, ids, by="tissue")


# ------------------------------------------------------------------------------------------------
# the out-of-distribution threshold: recorded rule, held-out calibration
# ------------------------------------------------------------------------------------------------
def test_annotate_records_the_rule_it_applied():
    X, lab = clustered_embeddings(1500, 16, n_clusters=6, labels=True, seed=5)
    idx = CellIndex.build(X, pd.DataFrame({"t": lab}))
    out = annotate(idx, X[:20], k=5, label_key="t")
    assert out.attrs["ood_source"] == "index"
    assert out.attrs["ood_distance"] == idx.ood_distance(0.99)
    assert out.attrs["ood_quantile"] == 0.99 and "1-NN distances" in out.attrs["ood_rule"]
    assert (out.is_ood == (out.min_dist > idx.ood_distance(0.99))).all()
    q95 = annotate(idx, X[:20], k=5, label_key="t", ood_quantile=0.95)
    assert q95.attrs["ood_distance"] == idx.ood_distance(0.95)
    given = annotate(idx, X[:20], k=5, label_key="t", ood_distance=0.001)
    assert given.attrs["ood_source"] == "given" and given.attrs["ood_distance"] == 0.001
    assert (given.is_ood == (given.min_dist > 0.001)).all()
    with pytest.raises(ScatlasInputError, match="ood_quantile must be one of"):
        annotate(idx, X[:2], label_key="t", ood_quantile=0.97)
    with pytest.raises(ScatlasInputError, match="not both"):
        annotate(idx, X[:2], label_key="t", ood_distance=0.1, ood_quantile=0.99)


def test_calibrate_ood_is_the_conformal_order_statistic(tmp_path):
    X, lab = clustered_embeddings(3000, 16, n_clusters=6, labels=True, seed=6)
    ref, cal, test = X[:1500], X[1500:2499], X[2499:]
    idx = CellIndex.build(ref, pd.DataFrame({"t": [f"t{v}" for v in lab[:1500]]}))
    rec = idx.calibrate_ood(cal)
    # independent reference: float64 brute-force cosine distance to the nearest indexed cell
    u = lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)  # noqa: E731
    d = np.sort((1.0 - u(cal.astype(np.float64)) @ u(ref.astype(np.float64)).T).min(axis=1))
    n = len(cal)
    for q in (0.5, 0.9, 0.95, 0.99):
        want = d[int(np.ceil((n + 1) * q)) - 1]
        assert rec["quantiles"][str(q)] == pytest.approx(want, abs=2e-6)
        # at most a fraction 1 - q of the calibration cells lie above their own threshold
        assert (d > rec["quantiles"][str(q)] + 2e-6).mean() <= 1 - q
    assert rec["n_cells"] == n and rec["levels_at_largest_distance"] == []  # ceil(1000 q) <= 999
    small = idx.calibrate_ood(cal[:50])  # ceil(51 q) > 50 for q = 0.99, 0.999
    assert small["levels_at_largest_distance"] == ["0.99", "0.999"]
    assert small["quantiles"]["0.99"] == small["quantiles"]["0.999"] == pytest.approx(
        (1.0 - u(cal[:50].astype(np.float64)) @ u(ref.astype(np.float64)).T).min(axis=1).max(),
        abs=2e-6)
    assert "too few" in idx.ood_threshold()[2]
    idx.calibrate_ood(cal)
    thr, source, rule = idx.ood_threshold()
    assert source == "calibration" and thr == rec["quantiles"]["0.99"] and "999" in rule
    # fresh cells from the same distribution: flagged at about 1 % (binomial, n = 501)
    out = annotate(idx, test, k=10, label_key="t")
    assert out.attrs["ood_source"] == "calibration" and out.is_ood.mean() <= 0.035
    # labels: cells of a type the index lacks are left out of the calibration
    labels = np.array([f"t{v}" for v in lab[1500:2499]], dtype=object)
    labels[:100] = "unknown"
    rec2 = idx.calibrate_ood(cal, labels=labels, label_key="t")
    assert rec2["n_cells"] == n - 100 and rec2["n_given"] == n
    with pytest.raises(ScatlasInputError, match="together"):
        idx.calibrate_ood(cal, labels=labels)
    # saved and loaded with the index
    idx.save(tmp_path / "ix")
    back = CellIndex.load(tmp_path / "ix")
    assert back.ood_threshold() == idx.ood_threshold()


def test_index_distances_mis_set_the_threshold_held_out_cells_fix_it():
    """The root cause, reproduced: embeddings fitted on the indexed cells (here PCA, 50 PCs of
    200 cells in 200 dimensions) put those cells farther from each other than a new cell is from
    them (each indexed cell keeps its own noise in the components fitted to it; a new cell's is
    mostly projected away). The index's own 1-NN quantile then flags nothing, not even a new
    cell type; held-out calibration cells give a threshold that flags it and ~1 % of seen ones."""
    rng = np.random.default_rng(0)
    p = 200
    C = rng.standard_normal((6, p))
    C[5] = np.sqrt(1 - 0.7**2) * C[0] + 0.7 * C[5]  # the unseen type: a relative of type 0

    def draw(types, n):
        t = np.repeat(types, n)
        return C[t] + rng.standard_normal((t.size, p)), t

    Xr, tr = draw(range(5), 40)
    Xc, _ = draw(range(5), 60)
    Xs, ts = draw(range(5), 60)
    Xu, _ = draw([5], 300)
    mu = Xr.mean(0)
    W = np.linalg.svd(Xr - mu, full_matrices=False)[2][:50].T
    f = lambda X: ((X - mu) @ W).astype(np.float32)  # noqa: E731
    idx = CellIndex.build(f(Xr), pd.DataFrame({"t": tr.astype(str)}))
    seen_b = annotate(idx, f(Xs), 10, label_key="t")
    unseen_b = annotate(idx, f(Xu), 10, label_key="t")
    own = idx.search(f(Xr), 2)[0][:, 1]
    assert np.median(own) > 1.2 * np.median(seen_b.min_dist)  # indexed cells: in-sample
    assert seen_b.is_ood.mean() == 0 and unseen_b.is_ood.mean() < 0.05
    assert (seen_b.label.astype(int) == ts).mean() > 0.95
    idx.calibrate_ood(f(Xc))
    assert idx.ood_threshold()[0] < idx.ood_distance(0.99)
    seen_a = annotate(idx, f(Xs), 10, label_key="t")
    unseen_a = annotate(idx, f(Xu), 10, label_key="t")
    assert seen_a.is_ood.mean() <= 0.05 and unseen_a.is_ood.mean() >= 0.3
