"""scib-family metrics against independent computations and constructed known answers."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from scatlas import backend, metrics
from scatlas._validate import ScatlasInputError


# ----------------------------------------------------------------------------------------------
# independent references (plain loops over cells, straight from the definitions)
# ----------------------------------------------------------------------------------------------
def ref_silhouette_samples(X, lab):
    """Rousseeuw's silhouette per cell; 0 for cells alone in their cluster (scikit-learn)."""
    D = cdist(X, X)
    out = np.zeros(len(X))
    for i in range(len(X)):
        own = lab == lab[i]
        if own.sum() == 1:
            continue
        a = D[i, own].sum() / (own.sum() - 1)
        b = min(D[i, lab == g].mean() for g in np.unique(lab) if g != lab[i])
        out[i] = (b - a) / max(a, b)
    return out


def ref_knn_excl_self(X, m):
    D = cdist(X, X)
    np.fill_diagonal(D, np.inf)
    idx = np.argsort(D, axis=1, kind="stable")[:, :m]
    return np.take_along_axis(D, idx, 1), idx


def ref_lisi(X, lab, k, perplexity, tol=1e-5):
    """Harmony's compute_simpson_index as scib-metrics runs it: per cell, P = exp(-beta d) over
    the k-1 nearest other cells, bisection on beta from 1 (50 tries), Simpson = sum_l P_l^2."""
    dist, idx = ref_knn_excl_self(X, k - 1)
    logU = np.log(perplexity)
    out = np.empty(len(X))
    for i in range(len(X)):
        d = dist[i]
        beta, lo, hi = 1.0, -np.inf, np.inf

        def entropy(beta, d=d):
            P = np.exp(-d * beta)
            s = P.sum()
            return np.log(s) + beta * (d * P).sum() / s, P / s

        H, P = entropy(beta)
        tries = 0
        while abs(H - logU) >= tol and tries < 50:
            if H - logU > 0:
                lo = beta
                beta = beta * 2 if np.isinf(hi) else (beta + hi) / 2
            else:
                hi = beta
                beta = beta / 2 if np.isinf(lo) else (beta + lo) / 2
            H, P = entropy(beta)
            tries += 1
        simpson = sum(P[lab[idx[i]] == g].sum() ** 2 for g in np.unique(lab))
        out[i] = 1 / simpson
    return out


def blobs(n_per, centres, spread, seed):
    rng = np.random.default_rng(seed)
    X = np.concatenate([c + spread * rng.standard_normal((n_per, len(c))) for c in centres])
    lab = np.repeat(np.arange(len(centres)), n_per)
    return X, lab


# ----------------------------------------------------------------------------------------------
# silhouettes
# ----------------------------------------------------------------------------------------------
def test_silhouette_label_matches_sklearn_and_reference():
    X, lab = blobs(30, [[0, 0, 0], [3, 0, 0], [0, 4, 1]], 1.0, seed=0)
    got = metrics.silhouette_label(X, lab)
    assert got == pytest.approx((silhouette_score(X, lab) + 1) / 2, abs=1e-12)
    assert got == pytest.approx((ref_silhouette_samples(X, lab).mean() + 1) / 2, abs=1e-12)
    assert metrics.silhouette_label(X, lab, rescale=False) == pytest.approx(2 * got - 1)
    names = np.array(["a", "b", "c"])[lab]  # any label values
    assert metrics.silhouette_label(X, names) == pytest.approx(got)


def test_silhouette_batch_matches_reference():
    rng = np.random.default_rng(1)
    X, lab = blobs(40, [[0, 0], [6, 0], [0, 6]], 1.0, seed=1)
    batch = rng.integers(0, 2, size=len(X))
    X[batch == 1, 0] += 1.5  # a batch shift
    lab[:5] = 3  # a label in a single batch? make it so and check it is skipped
    batch[:5] = 0
    per_label = []
    for g in np.unique(lab):
        sel = lab == g
        if np.unique(batch[sel]).size in (1, sel.sum()):
            continue
        per_label.append(np.mean(1 - np.abs(ref_silhouette_samples(X[sel], batch[sel]))))
    expect = np.mean(per_label)
    assert len(per_label) == 3
    assert metrics.silhouette_batch(X, lab, batch) == pytest.approx(expect, abs=1e-12)
    # a stronger batch shift lowers it
    X2 = X.copy()
    X2[batch == 1, 0] += 5
    assert metrics.silhouette_batch(X2, lab, batch) < expect


def test_silhouette_batch_all_skipped_warns_nan():
    X, lab = blobs(10, [[0, 0], [5, 5]], 1.0, seed=2)
    with pytest.warns(UserWarning, match="NaN"):
        assert np.isnan(metrics.silhouette_batch(X, lab, lab))


# ----------------------------------------------------------------------------------------------
# LISI
# ----------------------------------------------------------------------------------------------
def test_lisi_matches_loop_reference():
    rng = np.random.default_rng(3)
    X, lab = blobs(40, [[0, 0, 0], [2, 0, 0], [0, 2, 0]], 1.0, seed=3)
    batch = rng.integers(0, 3, size=len(X))
    got = metrics.lisi(X, batch, k=30)
    expect = ref_lisi(X, batch, 30, 10)
    np.testing.assert_allclose(got, expect, rtol=1e-4)
    # the scaled summaries
    B = 3
    assert metrics.ilisi(X, batch, k=30) == pytest.approx((np.median(expect) - 1) / (B - 1),
                                                          rel=1e-4)
    L = 3
    assert metrics.clisi(X, lab, k=30) == pytest.approx(
        (L - np.median(ref_lisi(X, lab, 30, 10))) / (L - 1), rel=1e-4)
    assert metrics.ilisi(X, batch, k=30, scale=False) == pytest.approx(np.median(expect),
                                                                        rel=1e-4)


def test_lisi_known_answers_from_neighbour_lists():
    """Equidistant neighbours: P is uniform whatever beta, so LISI = 1 / sum_l (n_l / m)^2."""
    dist = np.ones((3, 4))
    idx = np.array([[1, 2, 3, 4], [0, 2, 3, 4], [0, 1, 3, 4]])
    codes = np.array([0, 0, 1, 1, 1])
    got = metrics._lisi_from_neighbors(dist, idx, codes, 2, perplexity=2)
    # rows 0 and 1 see labels 0,1,1,1 -> 1 / (1/16 + 9/16) = 1.6; row 2 sees 0,0,1,1 -> 2
    np.testing.assert_allclose(got, [1.6, 1.6, 2.0])
    got = metrics._lisi_from_neighbors(dist, idx, np.array([0, 1, 0, 1, 2]), 3, perplexity=2)
    np.testing.assert_allclose(got[0], 1 / ((2 / 4) ** 2 + (1 / 4) ** 2 + (1 / 4) ** 2))


def test_ilisi_mixed_is_one_and_separated_is_zero():
    # perfectly mixed: the two batches alternate along a line, so every neighbourhood holds
    # both in (nearly) equal kernel mass: p_other = 1 / (1 + exp(-beta)) with beta small
    g = np.arange(400.0)[:, None]
    batch = np.arange(400) % 2
    mixed = metrics.ilisi(g, batch)  # default k = 90, perplexity 30
    assert 0.95 < mixed <= 1.0
    # perfectly separated: the same two batches far apart
    sep = g + np.where(batch[:, None] == 1, 1000.0, 0.0)
    assert metrics.ilisi(sep, batch, k=30) == pytest.approx(0.0, abs=1e-9)
    assert metrics.clisi(sep, batch, k=30) == pytest.approx(1.0, abs=1e-9)


def test_lisi_large_distances_do_not_underflow():
    X, lab = blobs(50, [[0, 0], [1, 1]], 1.0, seed=4)
    a = metrics.lisi(X, lab, k=20)
    b = metrics.lisi(X * 1e4, lab, k=20)  # distances ~1e4: exp(-d) underflows without the shift
    assert np.all(np.isfinite(b)) and np.all(b >= 1 - 1e-9)
    np.testing.assert_allclose(a, b, rtol=1e-3)


# ----------------------------------------------------------------------------------------------
# kNN label transfer
# ----------------------------------------------------------------------------------------------
def test_knn_label_transfer_known_answer():
    X, lab = blobs(40, [[0, 0], [20, 0], [0, 20]], 1.0, seed=5)
    batch = np.tile([0, 1], len(X) // 2)
    assert metrics.knn_label_transfer(X, lab, batch, k=15) == 1.0
    # one batch-1 cell of cluster 0 mislabelled as 1: only it is predicted wrongly (its
    # neighbours from batch 0 say 0; it is 1 vote of 15 for batch-0 cells near it)
    lab2 = lab.copy()
    lab2[1] = 1
    assert metrics.knn_label_transfer(X, lab2, batch, k=15) == pytest.approx(1 - 1 / len(X))


def test_majority_vote_ties_go_to_the_nearest():
    votes = np.array([[2, 1, 1, 2, 0], [0, 1, 2, 3, 3], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(metrics._majority_vote(votes, 4), [2, 3, 0])
    np.testing.assert_array_equal(metrics._majority_vote(np.array([[1, 0, 0, 1]]), 2), [1])


def test_knn_label_transfer_against_loop():
    rng = np.random.default_rng(6)
    X, lab = blobs(30, [[0, 0], [2, 0], [1, 2]], 1.0, seed=6)
    batch = rng.integers(0, 3, size=len(X))
    hits = 0
    for i in range(len(X)):
        other = np.flatnonzero(batch != batch[i])
        d = np.linalg.norm(X[other] - X[i], axis=1)
        nn = other[np.lexsort((other, d))[:7]]
        counts = np.bincount(lab[nn], minlength=3)
        best = np.flatnonzero(counts == counts.max())
        pred = next(lab[j] for j in nn if lab[j] in best)  # tie: the nearest one's label
        hits += pred == lab[i]
    assert metrics.knn_label_transfer(X, lab, batch, k=7) == pytest.approx(hits / len(X))


# ----------------------------------------------------------------------------------------------
# NMI / ARI and graph connectivity
# ----------------------------------------------------------------------------------------------
def test_nmi_ari():
    X, lab = blobs(30, [[0, 0], [10, 0], [0, 10]], 0.5, seed=7)
    assert metrics.nmi_ari(X, lab) == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}
    rng = np.random.default_rng(7)
    clusters = rng.integers(0, 3, size=len(X))
    got = metrics.nmi_ari(clusters, lab)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(lab, clusters))
    assert got["ari"] == pytest.approx(adjusted_rand_score(lab, clusters))
    assert got["nmi"] < 0.2


def ring(n, centre, radius=1.0):
    t = 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], 1) * radius + centre


def test_graph_connectivity_known_answers():
    X = np.concatenate([ring(60, [0, 0]), ring(60, [100, 0])])
    lab = np.repeat([0, 1], 60)
    assert metrics.graph_connectivity(X, lab, k=15) == 1.0
    # label 0 split into two far rings of 30: its largest component holds half its cells
    X2 = np.concatenate([ring(30, [0, 0]), ring(30, [0, 100]), ring(60, [100, 0])])
    assert metrics.graph_connectivity(X2, lab, k=15) == pytest.approx(0.75)


def test_graph_connectivity_matches_scib_style_reference():
    rng = np.random.default_rng(8)
    X, lab = blobs(50, [[0, 0], [1.5, 0], [0, 1.5]], 1.0, seed=8)
    lab = np.where(rng.random(len(lab)) < 0.2, rng.integers(0, 3, len(lab)), lab)
    for conn in ("strong", "weak"):
        _, idx = ref_knn_excl_self(X, 6)
        n = len(X)
        G = csr_matrix((np.ones(n * 6), (np.repeat(np.arange(n), 6), idx.ravel())), (n, n))
        fracs = []
        for g in np.unique(lab):  # scib-metrics: per-label subgraph, components
            sel = lab == g
            _, comp = connected_components(G[sel][:, sel], connection=conn)
            fracs.append(np.bincount(comp).max() / sel.sum())
        got = metrics.graph_connectivity(X, lab, k=7, connection=conn)
        assert got == pytest.approx(np.mean(fracs))
        assert got < 1


# ----------------------------------------------------------------------------------------------
# summary, validation
# ----------------------------------------------------------------------------------------------
def test_summary_consistent_with_single_metrics():
    rng = np.random.default_rng(9)
    X, lab = blobs(40, [[0, 0, 0], [4, 0, 0], [0, 4, 0]], 1.0, seed=9)
    batch = rng.integers(0, 2, size=len(X))
    s = metrics.summary(X, lab, batch, k_lisi=30, k_graph=10, k_transfer=5)
    assert set(s) == {"silhouette_label", "silhouette_batch", "ilisi", "clisi",
                      "knn_label_transfer", "nmi", "ari", "graph_connectivity"}
    assert s["ilisi"] == pytest.approx(metrics.ilisi(X, batch, k=30))
    assert s["clisi"] == pytest.approx(metrics.clisi(X, lab, k=30))
    assert s["graph_connectivity"] == pytest.approx(metrics.graph_connectivity(X, lab, k=10))
    assert s["knn_label_transfer"] == pytest.approx(metrics.knn_label_transfer(X, lab, batch,
                                                                               k=5))
    assert s["silhouette_label"] == pytest.approx(metrics.silhouette_label(X, lab))
    assert all(0 <= v <= 1 for v in s.values())


def test_validation_errors():
    X = np.zeros((10, 2))
    X[:, 0] = np.arange(10)
    lab = np.repeat([0, 1], 5)
    with pytest.raises(ScatlasInputError, match="one entry per cell"):
        metrics.ilisi(X, lab[:9], k=5)
    with pytest.raises(ScatlasInputError, match="missing"):
        metrics.clisi(X, np.array(["a", None] * 5, dtype=object), k=5)
    with pytest.raises(ScatlasInputError, match="fewer cells than k"):
        metrics.ilisi(X, lab, k=90)
    with pytest.raises(ScatlasInputError, match="2 batches"):
        metrics.knn_label_transfer(X, lab, np.zeros(10))
    with pytest.raises(ScatlasInputError, match="dense"):
        metrics.silhouette_label(csr_matrix(X), lab)
    with pytest.raises(ScatlasInputError, match="perplexity"):
        metrics.lisi(X, lab, k=2)


# ----------------------------------------------------------------------------------------------
# real data: CellBench lung cell lines, 5 batches, uncorrected PCA
# ----------------------------------------------------------------------------------------------
def test_cellbench_uncorrected_pca(cellbench):
    import scanpy as sc
    from sklearn.decomposition import PCA

    adata = cellbench.copy()
    adata.X = adata.X.astype(np.float32)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    Z = PCA(30, random_state=0).fit_transform(adata.X.toarray()).astype(np.float32)
    line, batch = adata.obs["cell_line"], adata.obs["batch"]
    il = metrics.ilisi(Z, batch)
    sil = metrics.silhouette_label(Z, line)
    print(f"CellBench uncorrected PCA30: batch iLISI {il:.3f}, cell-line silhouette {sil:.3f}")
    assert il < 0.25  # batches (CEL-seq2 vs Drop-seq protocols) stay apart; measured 0.100
    assert sil > 0.58  # cell lines are well separated ((s + 1) / 2 scale; measured 0.625)
    # and the directions against shuffled controls
    rng = np.random.default_rng(0)
    assert metrics.ilisi(Z, rng.permutation(batch.to_numpy())) > 0.6  # unequal batch sizes
    assert metrics.silhouette_label(Z, rng.permutation(line.to_numpy())) < 0.52


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_metrics_equal_cpu():
    rng = np.random.default_rng(10)
    X, lab = blobs(60, [[0, 0, 0], [3, 0, 0], [0, 3, 0]], 1.0, seed=10)
    X = X.astype(np.float32)
    batch = rng.integers(0, 3, size=len(X))
    cpu = metrics.summary(X, lab, batch, k_lisi=30)
    gpu = metrics.summary(backend.to_device(X, "gpu"), lab, batch, k_lisi=30)
    for key, val in cpu.items():
        assert gpu[key] == pytest.approx(val, rel=1e-4, abs=1e-6), key


# ----------------------------------------------------------------------------------------------
# against scib-metrics itself (the field's implementation), on one exact neighbour graph
# ----------------------------------------------------------------------------------------------
SCIB_PEER = Path(__file__).resolve().parents[1] / "bench" / ".peers" / "scib" / "bin" / "python"


def _scib_python() -> str:
    """An interpreter with scib-metrics: ``$SCATLAS_PEER_PYTHON_SCIB``, this one when it imports
    scib_metrics, else ``bench/.peers/scib`` (made by ``python3.12 -m venv bench/.peers/scib &&
    bench/.peers/scib/bin/pip install 'scib-metrics==0.6.*'``; 0.6 needs Python >= 3.12)."""
    env = os.environ.get("SCATLAS_PEER_PYTHON_SCIB", "").strip()
    if env:
        return env
    if importlib.util.find_spec("scib_metrics") is not None:
        return sys.executable
    if SCIB_PEER.is_file():
        return str(SCIB_PEER)
    pytest.skip("scib-metrics is not installed (see _scib_python's docstring)")


def _scib_case(seed: int = 0):
    """600 cells, 10 dims: 4 labels (well-separated blobs, so any k-means finds them) seen in
    3 batches shifted partly apart; 8% of the labels are reassigned at random so that NMI/ARI,
    cLISI and graph connectivity are not all at their maxima."""
    rng = np.random.default_rng(seed)
    n, d = 600, 10
    blob = rng.integers(0, 4, n)
    batch = rng.integers(0, 3, n)
    centres = rng.normal(scale=12.0, size=(4, d))
    shifts = rng.normal(scale=1.5, size=(3, d))
    X = (centres[blob] + shifts[batch] + rng.normal(size=(n, d))).astype(np.float32)
    labels = blob.copy()
    flip = rng.random(n) < 0.08
    labels[flip] = rng.integers(0, 4, int(flip.sum()))
    return X, labels, batch


@pytest.mark.slow
def test_metrics_agree_with_scib_metrics(tmp_path):
    """scatlas.metrics against scib-metrics 0.6 on the same float32 embedding, with scib-metrics
    given our exact 90-NN graph (self in column 0, as its NeighborsResults expects), so that any
    difference is one of definition. Where the definitions differ on purpose (module docstring:
    BRAS, kBET) the test shows the gap instead of hiding it."""
    import json
    import subprocess

    from scatlas.kernels.neighbors import knn

    python = _scib_python()
    X, labels, batch = _scib_case()
    n = X.shape[0]
    dist, idx = knn(X.astype(np.float64), None, 89, exclude_self=True)
    knn_idx = np.concatenate([np.arange(n)[:, None], idx], axis=1).astype(np.int64)
    knn_dist = np.concatenate([np.zeros((n, 1)), dist], axis=1).astype(np.float32)
    src, dst = tmp_path / "in.npz", tmp_path / "out.json"
    np.savez(src, X=X, labels=labels, batch=batch, knn_idx=knn_idx, knn_dist=knn_dist)
    peer = Path(__file__).parent / "helpers" / "scib_metrics_peer.py"
    run = subprocess.run([python, str(peer), str(src), str(dst)], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-3000:]
    ref = json.loads(dst.read_text())
    assert ref["version"].startswith("0.6"), ref["version"]

    # LISI, per cell: both bisect beta from 1 with tol 1e-5 on the entropy H, ours in float64,
    # scib-metrics in float32. Each stops with |H - log(perplexity)| < 1e-5, so the two kernels
    # differ by |dH| <= 2e-5; the Simpson index ~ exp(-H_2) moves by |d log S| <= c |dH| with
    # c = O(1) (the Renyi-2 / Shannon entropy slope of a peaked kernel, below 4 here), plus the
    # float32 rounding of 89 kernel weights (89 * 6e-8 = 5e-6): rtol 1e-4. A different
    # perplexity (30 vs 29.67), a kernel including the cell itself, or squared distances moves
    # LISI by 1e-2 or more.
    for key, values in (("lisi_batch", batch), ("lisi_label", labels)):
        ours = metrics.lisi(X, values, k=90)
        np.testing.assert_allclose(ours, ref[key], rtol=1e-4, err_msg=key)
    # the scaled medians inherit the per-cell bound (a median of values each within 1e-4)
    assert metrics.ilisi(X, batch) == pytest.approx(ref["ilisi"], rel=1e-4, abs=1e-6)
    assert metrics.clisi(X, labels) == pytest.approx(ref["clisi"], rel=1e-4, abs=1e-6)

    # Silhouettes: scib-metrics sums float32 squared differences over d = 10 dimensions, so each
    # distance has relative error <= (d + 2) eps32; a, b inherit it and s = (b - a) / max(a, b)
    # moves by <= 4 (d + 2) eps32 = 5.7e-6 (scikit-learn works in float64 here). The rescaled
    # label ASW and 1 - |s| batch ASW averaged per label must agree to that.
    tol = 4 * (X.shape[1] + 2) * float(np.finfo(np.float32).eps)
    assert metrics.silhouette_label(X, labels) == pytest.approx(ref["silhouette_label"], abs=tol)
    assert metrics.silhouette_batch(X, labels, batch) == pytest.approx(ref["silhouette_batch"],
                                                                       abs=tol)
    assert metrics.silhouette_batch(X, labels, batch, metric="cosine") == pytest.approx(
        ref["silhouette_batch_cosine"], abs=tol)
    # BRAS (scib-metrics' default batch metric since 0.5.x: cosine, mean distance to all other
    # batches instead of the nearest one) is a different number: documented, not computed here.
    assert abs(ref["bras"] - metrics.silhouette_batch(X, labels, batch, metric="cosine")) > tol

    # Graph connectivity is combinatorial on the same 15-NN graph: exactly equal.
    assert metrics.graph_connectivity(X, labels, k=15) == ref["graph_connectivity"]

    # NMI / ARI after k-means with k = #labels: the blobs are 12 sd apart, so scikit-learn's and
    # scib-metrics' JAX k-means both return the 4 blobs and the scores, computed by the same
    # scikit-learn functions with arithmetic NMI averaging, are equal to float64 rounding.
    got = metrics.nmi_ari(X, labels)
    assert got["nmi"] == pytest.approx(ref["nmi"], abs=1e-12)
    assert got["ari"] == pytest.approx(ref["ari"], abs=1e-12)
