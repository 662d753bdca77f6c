"""Seurat-style CCA, PLS and ridge CCA against explicit-matrix references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cross_decomposition import PLSSVD

from scatlas import backend
from scatlas._validate import ScatlasInputError
from scatlas.kernels import cca, pls, ridge_cca


def two_datasets(n1=150, n2=120, p=300, density=0.3, seed=0, shared_rank=5):
    """Two sparse non-negative datasets sharing low-rank gene programs."""
    rng = np.random.default_rng(seed)
    programs = rng.gamma(1.0, 1.0, size=(shared_rank, p))

    def one(n):
        loadings = rng.gamma(0.5, 1.0, size=(n, shared_rank))
        mean = loadings @ programs
        X = rng.poisson(mean * density)
        return sp.csr_matrix(X.astype(np.float64))

    return one(n1), one(n2)


def explicit_seurat_cca(X1, X2, k, scale=True):
    """Seurat RunCCA step by step: standardise cells, form X1s X2s^T, SVD, sign rule."""

    def standardise(X):
        D = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
        D = D - D.mean(axis=1, keepdims=True)
        if scale:
            D = D / D.std(axis=1, ddof=1, keepdims=True)
        return D

    M = standardise(X1) @ standardise(X2).T  # the dense n1 x n2 matrix we never form
    U, D, Vt = np.linalg.svd(M, full_matrices=False)
    U, V = U[:, :k], Vt[:k].T
    signs = np.where(U[0] < 0, -1.0, 1.0)
    return U * signs, V * signs, D[:k]


@pytest.mark.parametrize("method", ["gram", "explicit", "auto"])
@pytest.mark.parametrize("sparse", [True, False])
def test_cca_equals_explicit_cross_product_svd(sparse, method):
    X1, X2 = two_datasets()
    if not sparse:
        X1, X2 = X1.toarray(), X2.toarray()
    Z1, Z2, D = cca(X1, X2, 8, l2_norm=False, dtype=np.float64, return_d=True, method=method)
    E1, E2, ED = explicit_seurat_cca(X1, X2, 8)
    np.testing.assert_allclose(D, ED, rtol=1e-9)
    np.testing.assert_allclose(Z1, E1, atol=1e-8)
    np.testing.assert_allclose(Z2, E2, atol=1e-8)


def test_cca_and_pls_equal_sklearn_plssvd():
    X1, X2 = two_datasets(seed=3)
    for fn, scale in ((cca, True), (pls, False)):
        Z1, Z2 = fn(X1, X2, 5, l2_norm=False, dtype=np.float64)
        ref = PLSSVD(n_components=5, scale=scale).fit(X1.T.toarray(), X2.T.toarray())
        signs = np.sign(Z1[0]) * np.sign(ref.x_weights_[0])
        np.testing.assert_allclose(Z1, ref.x_weights_ * signs, atol=1e-8)
        np.testing.assert_allclose(Z2, ref.y_weights_ * signs, atol=1e-8)


def test_l2_norm_rows_and_float32_default():
    X1, X2 = two_datasets()
    Z1, Z2 = cca(X1, X2, 6)
    assert Z1.dtype == np.float32 and Z1.shape == (150, 6) and Z2.shape == (120, 6)
    np.testing.assert_allclose(np.linalg.norm(Z1, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(Z2, axis=1), 1, rtol=1e-5)
    # same directions as the unnormalised vectors
    U1, _ = cca(X1, X2, 6, l2_norm=False)
    cos = (U1 * Z1).sum(1) / np.linalg.norm(U1, axis=1)
    np.testing.assert_allclose(cos, 1, rtol=1e-4)


def test_randomized_route_recovers_the_leading_canonical_vectors():
    X1, X2 = two_datasets(n1=400, n2=300, p=500, seed=1)
    E1, E2, _ = cca(X1, X2, 4, l2_norm=False, method="gram", dtype=np.float64, return_d=True)
    R1, R2 = cca(X1, X2, 4, l2_norm=False, method="randomized", dtype=np.float64)
    np.testing.assert_allclose(np.abs((E1 * R1).sum(0)), 1, atol=1e-6)
    np.testing.assert_allclose(np.abs((E2 * R2).sum(0)), 1, atol=1e-6)


def explicit_ridge(X1, X2, k, lam):
    def centre(X):
        D = X.toarray()
        return D - D.mean(axis=1, keepdims=True)

    A1, A2 = centre(X1), centre(X2)
    p = A1.shape[1]
    C11, C22, C12 = A1 @ A1.T / (p - 1), A2 @ A2.T / (p - 1), A1 @ A2.T / (p - 1)

    def inv_sqrt(C):
        w, V = np.linalg.eigh(C)
        return (V / np.sqrt(w)) @ V.T

    R1, R2 = inv_sqrt(C11 + lam * np.eye(len(C11))), inv_sqrt(C22 + lam * np.eye(len(C22)))
    U, D, Vt = np.linalg.svd(R1 @ C12 @ R2)
    a, b = R1 @ U[:, :k], R2 @ Vt[:k].T
    a, b = a / np.linalg.norm(a, axis=0), b / np.linalg.norm(b, axis=0)
    signs = np.where(a[0] < 0, -1.0, 1.0)
    return a * signs, b * signs, D[:k]


@pytest.mark.parametrize("lam", [0.05, 1.0, 20.0])
def test_ridge_cca_equals_explicit_regularised_covariances(lam):
    X1, X2 = two_datasets(n1=60, n2=50, p=200, seed=2)  # n < p: C11, C22 invertible
    Z1, Z2, D = ridge_cca(X1, X2, 5, lam=lam, dtype=np.float64, return_d=True)
    E1, E2, ED = explicit_ridge(X1, X2, 5, lam)
    np.testing.assert_allclose(D, ED, rtol=1e-7)
    np.testing.assert_allclose(Z1, E1, atol=1e-7)
    np.testing.assert_allclose(Z2, E2, atol=1e-7)


def test_ridge_cca_tends_to_pls():
    X1, X2 = two_datasets(seed=4)
    R1, R2 = ridge_cca(X1, X2, 4, lam=1e9, dtype=np.float64)
    P1, P2 = pls(X1, X2, 4, dtype=np.float64)
    np.testing.assert_allclose(R1, P1, atol=1e-6)
    np.testing.assert_allclose(R2, P2, atol=1e-6)


def test_cca_aligns_cell_lines_across_batches(cellbench):
    """Real data: CCA of CEL-seq2 and Drop-seq CellBench batches (same three cell lines, two
    technologies) puts each cell next to its own cell line, and its MNN anchors (Seurat's
    k.anchor = 5) join cells of the same line."""
    import scanpy as sc

    ad = cellbench.copy()
    sc.pp.normalize_total(ad, target_sum=1e4)
    sc.pp.log1p(ad)
    sc.pp.highly_variable_genes(ad, n_top_genes=2000, batch_key="batch")
    ad = ad[:, ad.var["highly_variable"]].copy()
    batches = ["sc_celseq2", "sc_dropseq"]
    parts = []
    for b in batches:
        sub = ad[ad.obs["batch"] == b]
        X = sub.X.toarray()
        X = np.clip((X - X.mean(0)) / np.maximum(X.std(0, ddof=1), 1e-8), -10, 10)
        parts.append((X, sub.obs["cell_line"].to_numpy()))
    (X1, y1), (X2, y2) = parts
    Z1, Z2 = cca(X1, X2, 20)
    # nearest neighbour of each batch-2 cell among batch-1 cells (cosine on L2-normalised rows)
    nearest = np.argmax(Z2 @ Z1.T, axis=1)
    accuracy = (y1[nearest] == y2).mean()
    assert accuracy > 0.9, accuracy
    S = Z1 @ Z2.T
    nn12, nn21 = np.argsort(-S, 1)[:, :5], np.argsort(-S.T, 1)[:, :5]
    anchors = [(i, j) for i in range(len(y1)) for j in nn12[i] if i in nn21[j]]
    precision = np.mean([y1[i] == y2[j] for i, j in anchors])
    assert len(anchors) > 300 and precision > 0.9, (len(anchors), precision)


def decaying_pair(n1=60, n2=50, p=400, seed=0):
    """Two full-rank datasets whose cross-product spectrum decays fast (sigma_20 / sigma_1 ~
    1e-3, below the old explicit route's cut-off of 10 sqrt(eps32) = 3.5e-3): shared gene
    programs (orthogonal to the all-ones vector, so per-cell standardisation keeps them) with
    strengths falling from 1 to 1e-4."""
    rng = np.random.default_rng(seed)
    r = min(n1, n2)
    W = np.linalg.qr(rng.standard_normal((p, r)))[0]
    W -= W.mean(axis=0)
    d = np.logspace(0, -4, r)
    X1 = (np.linalg.qr(rng.standard_normal((n1, r)))[0] * d) @ W.T + 5.0
    X2 = (np.linalg.qr(rng.standard_normal((n2, r)))[0] * d) @ W.T + 5.0
    return X1, X2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ["explicit", "gram", "auto"])
def test_fast_decaying_full_rank_spectrum_keeps_all_k_vectors(method, dtype):
    """Decay is not rank deficiency: all k = 20 vectors come back, with singular values equal
    to a dense float64 SVD of the same (dtype-rounded) input to 1e-6 relative."""
    X1, X2 = (X.astype(dtype) for X in decaying_pair())
    E1, E2, ED = explicit_seurat_cca(X1.astype(np.float64), X2.astype(np.float64), 20)
    assert ED[-1] / ED[0] < 3e-3  # the regime the old cut-off mistook for rank deficiency
    Z1, Z2, D = cca(X1, X2, 20, l2_norm=False, dtype=dtype, method=method, return_d=True)
    assert Z1.shape == (60, 20) and Z2.shape == (50, 20)
    # explicit: float64 arithmetic whatever the dtype (then rounded to it); gram in float32
    # squares the data in float32 chunks (eps32 sigma_1^2 absolute on sigma_i^2)
    rtol = 1e-6 if (method != "gram" or dtype == np.float64) else 1e-3
    np.testing.assert_allclose(D, ED, rtol=rtol)
    if dtype == np.float64:  # vectors of well-separated values, 1e-6 relative gaps
        np.testing.assert_allclose(np.abs((Z1 * E1).sum(0)), 1, atol=1e-6)
        np.testing.assert_allclose(np.abs((Z2 * E2).sum(0)), 1, atol=1e-6)


def _real_pairs(shared_data, only=None):
    """(dataset, batch 1, batch 2, X1, X2): every pair of batches of the real multi-batch sets,
    log-normalised (1e4, log1p) on all genes, CSR float32."""
    import itertools

    import scanpy as sc

    from bench.quality.data import load

    for name in only or ("cellbench", "baron_donor", "baron_species", "mesc"):
        ad = load(name, shared_data)
        sc.pp.normalize_total(ad, target_sum=1e4)
        sc.pp.log1p(ad)
        batch = ad.obs["batch"].astype(str).to_numpy()
        for b1, b2 in itertools.combinations(sorted(set(batch)), 2):
            yield name, b1, b2, ad.X[batch == b1], ad.X[batch == b2]


def test_issue_cellbench_pair_returns_20_vectors(shared_data):
    """The pair of the report (CEL-seq2 240 cells, Drop-seq 210, log-normalised, all 11,533
    genes): it raised 'only 7 canonical vectors exist' with sigma_8 / sigma_1 = 3.5e-3."""
    for _name, b1, b2, X1, X2 in _real_pairs(shared_data, only=("cellbench",)):
        if (b1, b2) != ("sc_celseq2", "sc_dropseq"):
            continue
        _, _, ED = explicit_seurat_cca(X1.astype(np.float64), X2.astype(np.float64), 20)
        Z1, Z2, D = cca(X1, X2, 20, return_d=True)
        assert Z1.shape == (240, 20) and Z2.shape == (210, 20)
        np.testing.assert_allclose(D, ED, rtol=1e-6)
        return
    pytest.fail("CellBench batches sc_celseq2 / sc_dropseq not found")


@pytest.mark.slow
def test_real_pairs_return_k_vectors_matching_dense_svd(shared_data):
    """Issue 15 item 1: every pair of batches in ../shared/data (CellBench, Baron donors and
    species, mESC) gives k = 20 and 30 canonical vectors where min(n1, n2, p) allows; singular
    values equal a dense float64 SVD to 1e-6 relative; the explicit (auto) route spans the same
    vectors as the Gram route."""
    checked = 0
    for name, b1, b2, X1, X2 in _real_pairs(shared_data):
        _, _, ED = explicit_seurat_cca(X1.astype(np.float64), X2.astype(np.float64), 30)
        for k in (20, 30):
            if k > min(X1.shape[0], X2.shape[0]):
                continue
            Z1, Z2, D = cca(X1, X2, k, l2_norm=False, return_d=True)  # defaults: float32, auto
            assert Z1.shape[1] == Z2.shape[1] == k, (name, b1, b2, k)
            np.testing.assert_allclose(D, ED[:k], rtol=1e-6, err_msg=f"{name} {b1} {b2}")
            if k == 30:
                G1, _, GD = cca(X1, X2, k, l2_norm=False, return_d=True, method="gram",
                                dtype=np.float64)
                Y1, _ = cca(X1, X2, k, l2_norm=False, method="explicit", dtype=np.float64)
                np.testing.assert_allclose(GD, ED[:k], rtol=1e-6)
                # each singular vector (values >= 1e-3 relative apart, except near-ties whose
                # vectors mix: compare the spanned subspaces by principal angles)
                cosines = np.linalg.svd(G1.T @ Y1, compute_uv=False)
                np.testing.assert_allclose(cosines, 1, atol=1e-6)
            checked += 1
    assert checked >= 30  # 10 CellBench + 15 + 9 Baron-donor + 1 + 1 + 1 + 1 at k = 20 / 30


def test_bad_input():
    X1, X2 = two_datasets()
    with pytest.raises(ScatlasInputError, match="same features"):
        cca(X1, X2[:, :-1], 3)
    with pytest.raises(ScatlasInputError, match="exceeds"):
        cca(X1[:5], X2, 6)
    Z = X1.toarray()
    Z[3] = 0.0
    with pytest.raises(ScatlasInputError, match="zero variance"):
        cca(Z, X2, 3)
    Z[3, 0] = np.inf
    with pytest.raises(ScatlasInputError, match="NaN or infinite"):
        cca(Z, X2, 3)
    with pytest.raises(ScatlasInputError, match="lam"):
        ridge_cca(X1, X2, 3, lam=-1)


@pytest.mark.gpu
def test_gpu_equals_cpu():
    X1, X2 = two_datasets()
    c1, c2 = cca(X1, X2, 5)
    g1, g2 = cca(backend.to_device(X1, "gpu"), backend.to_device(X2, "gpu"), 5)
    np.testing.assert_allclose(backend.to_host(g1), c1, atol=1e-3)
    np.testing.assert_allclose(backend.to_host(g2), c2, atol=1e-3)
