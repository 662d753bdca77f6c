"""tl.integrate on AnnData of raw counts: keys written, equal to the kernels on the same
preprocessing, h5ad round trip, bad input."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scatlas import metrics
from scatlas._validate import ScatlasInputError
from scatlas.kernels.anchors import SmallBatchWarning
from scatlas.kernels.fastmnn import fastmnn, multi_batch_norm
from scatlas.kernels.seurat import seurat_integrate
from scatlas.tl._integrate import integrate


def _poisson_batches(seed: int, sizes: dict[str, int], n_genes: int, n_types: int,
                     effect_sd: float) -> ad.AnnData:
    """Poisson counts of ``n_types`` cell types in batches ``{name: n_cells}``, each batch with
    its own gene effect (sd ``effect_sd``) and per-cell depth; obs 'batch' and 'type'."""
    rng = np.random.default_rng(seed)
    logmu = rng.normal(0.0, 1.2, size=(n_types, n_genes))
    X, types, batch = [], [], []
    for name, n in sizes.items():
        t = rng.integers(0, n_types, n)
        effect = rng.normal(0, effect_sd, n_genes)
        X.append(rng.poisson(np.exp(logmu[t] + effect) * rng.gamma(8, 0.125, (n, 1))))
        types.append(t)
        batch += [name] * n
    obs = pd.DataFrame({"batch": pd.Categorical(batch), "type": np.concatenate(types).astype(str)},
                       index=[f"c{i}" for i in range(len(batch))])
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(np.vstack(X).astype(np.float32)), obs=obs, var=var)


@pytest.fixture(scope="module")
def counts():
    """Three batches of Poisson counts (4 cell types, 400 genes, a per-batch gene effect)."""
    return _poisson_batches(4, {"b0": 260, "b1": 200, "b2": 220}, 400, 4, 0.6)


def _log_hvg(adata, n_top=200):
    from scatlas import pp

    work = adata.copy()
    pp.normalize_log1p(work)
    pp.highly_variable_genes(work, n_top, batch_key="batch")
    pos = np.flatnonzero(work.var["highly_variable"].to_numpy())
    return work.X[:, pos], pos


def test_mnn_writes_embedding_and_matches_kernel(counts, tmp_path):
    adata = counts.copy()
    X0 = adata.X.copy()
    integrate(adata, "batch", method="mnn", n_top_genes=200, d=20)
    assert (adata.X != X0).nnz == 0  # raw counts untouched
    E = adata.obsm["X_mnn"]
    assert E.shape == (adata.n_obs, 20)
    _, pos = _log_hvg(counts)  # HVGs from log-normalised counts, fastMNN on multiBatchNorm
    batch_labels = counts.obs["batch"].astype(str).to_numpy()
    ref = fastmnn(multi_batch_norm(counts.X, batch_labels, genes=pos), batch_labels, d=20)
    np.testing.assert_allclose(E, ref.corrected, atol=1e-5)
    assert adata.varm["X_mnn"].shape == (adata.n_vars, 20)
    assert np.all(adata.varm["X_mnn"][np.setdiff1d(np.arange(adata.n_vars), pos)] == 0)
    uns = adata.uns["mnn"]
    assert uns["method"] == "mnn" and list(uns["genes"]) == list(adata.var_names[pos])
    assert list(uns["merges"]["right"]) == ["b1", "b2"] and uns["params"]["d"] == 20
    batch, lab = adata.obs["batch"], adata.obs["type"]
    assert metrics.knn_label_transfer(E, lab, batch) > 0.95
    adata.write_h5ad(tmp_path / "mnn.h5ad")
    back = ad.read_h5ad(tmp_path / "mnn.h5ad")
    np.testing.assert_array_equal(back.obsm["X_mnn"], E)


def test_cca_writes_pca_of_corrected_expression(counts, tmp_path):
    adata = counts.copy()
    out = integrate(adata, "batch", method="cca", key_added="X_seurat", n_top_genes=200,
                    hvg_flavor="seurat", dims=20, k_weight=50, copy=True)
    assert "X_seurat" not in adata.obsm  # copy=True leaves the input alone
    E, C = out.obsm["X_seurat"], out.obsm["X_seurat_corrected"]
    assert E.shape == (out.n_obs, 30) and C.shape == (out.n_obs, 200)
    X, _ = _log_hvg(counts)
    ref = seurat_integrate(X, counts.obs["batch"].astype(str).to_numpy(), dims=20, k_weight=50)
    np.testing.assert_allclose(C, ref.corrected, atol=1e-5)
    uns = out.uns["seurat"]
    assert uns["flavor"] == "v3" and len(uns["n_anchors"]) == 3
    assert len(uns["merges"]["reference"]) == len(uns["merges"]["query"]) == 2
    batch, lab = out.obs["batch"], out.obs["type"]
    before = metrics.ilisi(_pca_of(X), batch)
    assert metrics.ilisi(E, batch) > before + 0.2
    assert metrics.knn_label_transfer(E, lab, batch) > 0.95
    out.write_h5ad(tmp_path / "cca.h5ad")
    assert ad.read_h5ad(tmp_path / "cca.h5ad").uns["seurat"]["flavor"] == "v3"


def _pca_of(X):
    from scatlas.kernels.anchors import scale_data
    from scatlas.kernels.linalg import pca

    return pca(scale_data(X), 30).scores


def test_cca_v5_corrects_the_joint_pca(counts):
    adata = counts.copy()
    integrate(adata, "batch", method="cca", flavor="v5", n_top_genes=200, n_pcs=20,
              k_weight=50)
    E = adata.obsm["X_cca"]
    assert E.shape == (adata.n_obs, 20) and "X_cca_corrected" not in adata.obsm
    batch, lab = adata.obs["batch"], adata.obs["type"]
    assert metrics.knn_label_transfer(E, lab, batch) > 0.95
    assert metrics.ilisi(E, batch) > 0.5


def test_gene_list_and_layer(counts):
    adata = counts.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = None
    genes = list(adata.var_names[:150])
    integrate(adata, "batch", method="mnn", layer="counts", genes=genes, d=10)
    assert list(adata.uns["mnn"]["genes"]) == genes


def test_inmf_is_delegated(counts):
    adata = counts.copy()
    integrate(adata, "batch", method="inmf", k=5, n_iter=5)
    assert adata.obsm["X_inmf"].shape == (adata.n_obs, 5)
    assert "X_inmf_norm" in adata.obsm


def test_bad_input(counts):
    adata = counts.copy()
    with pytest.raises(ScatlasInputError, match="method"):
        integrate(adata, "batch", method="scvi")
    with pytest.raises(ScatlasInputError, match="batch_key"):
        integrate(adata, "nope", method="mnn")
    one = adata[adata.obs["batch"] == "b0"].copy()
    one.obs["batch"] = one.obs["batch"].cat.remove_unused_categories()
    with pytest.raises(ScatlasInputError, match="at least 2"):
        integrate(one, "batch", method="mnn")
    bad = adata.copy()
    bad.X = bad.X.toarray()
    bad.X[0, 0] = np.nan
    with pytest.raises(ScatlasInputError, match="NaN"):
        integrate(bad, "batch", method="cca")
    with pytest.raises(ScatlasInputError, match="not in var_names"):
        integrate(adata, "batch", method="mnn", genes=["g1", "zzz"])
    with pytest.raises(ScatlasInputError, match="fewer cells than k"):
        integrate(adata, "batch", method="mnn", n_top_genes=100, k=300)
    with pytest.raises(ScatlasInputError, match="flavor"):
        integrate(adata, "batch", method="cca", flavor="v4", n_top_genes=100)


# ----------------------------------------------------------------------------------------------
# cca at defaults on many small batches (Seurat 4.3 stops at dims = 30 on a 23-cell donor)
# ----------------------------------------------------------------------------------------------
SMALL = {"d1": 21, "d2": 26, "d3": 33, "d4": 38, "d5": 40}


@pytest.fixture(scope="module")
def small_counts():
    """Five batches of 21-40 cells (3 cell types, 300 genes, a per-batch gene effect)."""
    return _poisson_batches(8, SMALL, 300, 3, 0.5)


@pytest.mark.parametrize("flavor", ["v3", "v5"])
def test_cca_defaults_run_on_small_batches(small_counts, flavor, tmp_path):
    adata = small_counts.copy()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        integrate(adata, "batch", method="cca", flavor=flavor)
    ours = [w for w in rec if issubclass(w.category, SmallBatchWarning)]
    assert len(ours) == 1, [str(w.message) for w in rec]  # one warning for every adaptation
    assert ours[0].filename == __file__  # it points at the caller's line
    msg = str(ours[0].message)
    assert "'d1' (21 cells): dims=20, k_score=20" in msg
    assert "'d2' (26 cells): dims=25, k_score=25" in msg and "'d3'" not in msg.split(";")[0]
    E = adata.obsm["X_cca"]
    assert E.shape == (adata.n_obs, 30) and np.all(np.isfinite(E))
    params = adata.uns["cca"]["params"]
    assert params["dims"] == 30 and params["k_score"] == 30 and params["adapted"] == msg
    pairs = params["effective"]["pairs"]
    for b1, b2, d, ks in zip(pairs["dataset1"], pairs["dataset2"], pairs["dims"],
                             pairs["k_score"], strict=True):
        m = min(SMALL[b1], SMALL[b2])
        assert d == min(30, m - 1) and ks == min(30, m - 1)
    assert len(pairs["dims"]) == 10 and np.all(pairs["k_anchor"] == 5)
    assert np.all(pairs["k_filter"] == 0)  # v3: skipped (< 200 cells); v5: no filter
    merges = params["effective"]["merges"]
    assert len(merges["k_weight"]) == 4 and np.all(merges["k_weight"] <= 100)
    batch, lab = adata.obs["batch"], adata.obs["type"]
    assert metrics.knn_label_transfer(E, lab, batch) > 0.95  # measured 1.000 / 0.994
    adata.write_h5ad(tmp_path / "small.h5ad")
    back = ad.read_h5ad(tmp_path / "small.h5ad").uns["cca"]["params"]
    np.testing.assert_array_equal(back["effective"]["pairs"]["dims"], pairs["dims"])


def test_cca_error_names_the_batch(small_counts):
    adata = small_counts.copy()
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    adata.obs.iloc[0, adata.obs.columns.get_loc("batch")] = "lonely"
    with pytest.raises(ScatlasInputError, match="batch 'lonely' \\(1 cell\\)"):
        integrate(adata, "batch", method="cca")


@pytest.fixture(scope="module")
def baron_donor(shared_data):
    """Baron pancreas, human and mouse donors as batches (23-102 cells), cell types as labels."""
    from tests.conftest import dataset_path

    src = ad.read_h5ad(dataset_path(shared_data, "baron_pancreas_human_mouse_cider.h5ad"))
    obs = pd.DataFrame({"batch": src.obs["donor"].astype(str).to_numpy(),
                        "label": src.obs["cell_type"].astype(str).to_numpy()},
                       index=src.obs_names)
    out = ad.AnnData(X=sp.csr_matrix(src.X, dtype=np.float32), obs=obs,
                     var=src.var.iloc[:, :0].copy())
    out.var_names_make_unique()
    return out


@pytest.mark.parametrize("flavor", ["v3", "v5"])
def test_cca_defaults_on_baron_donors(baron_donor, flavor, capsys):
    """Every default runs (human4 has 23 cells); batches mix and labels transfer across donors
    about as well as in the uncorrected PCA of the same genes. Measured (uncorrected -> v3 / v5):
    label transfer 0.826 -> 0.723 / 0.738, iLISI 0.208 -> 0.510 / 0.537."""
    from scatlas import pp
    from scatlas.kernels.anchors import scale_data
    from scatlas.kernels.linalg import pca

    adata = baron_donor.copy()
    with pytest.warns(SmallBatchWarning, match="'human4' \\(23 cells\\): dims=22, k_score=22"):
        integrate(adata, "batch", method="cca", flavor=flavor)
    E = adata.obsm["X_cca"]
    assert E.shape == (adata.n_obs, 30) and np.all(np.isfinite(E))
    work = adata.copy()
    pp.normalize_log1p(work)
    genes = adata.var_names.get_indexer(adata.uns["cca"]["genes"])
    base = pca(scale_data(work.X[:, genes]), 30, center=False).scores
    batch, lab = adata.obs["batch"].to_numpy(), adata.obs["label"].to_numpy()
    lt = {k: metrics.knn_label_transfer(X, lab, batch) for k, X in (("pca", base), ("cca", E))}
    il = {k: metrics.ilisi(X, batch) for k, X in (("pca", base), ("cca", E))}
    with capsys.disabled():
        print(f"\nBaron donors cca {flavor}: label transfer {lt['pca']:.3f} -> {lt['cca']:.3f}, "
              f"iLISI {il['pca']:.3f} -> {il['cca']:.3f}")
    assert lt["cca"] > 0.6 and lt["cca"] > lt["pca"] - 0.2  # 5 labels: chance ~0.2
    assert il["cca"] > il["pca"] + 0.15


def test_scaled_pca_of_sparse_input_equals_dense():
    """Harmony's and cca v5's PCA: a CSR input (scaled implicitly, CSR + shift) gives the dense
    input's scores (float64, up to the sign of each PC); that it never densifies a large input
    is tests/kernels/test_kernel_memory.py's."""
    import scipy.sparse as sp

    from scatlas.tl._common import scaled_pca

    rng = np.random.default_rng(0)
    dense = np.log1p(rng.poisson(0.3, size=(300, 120)).astype(np.float64))
    want = scaled_pca(dense, 10, dtype=np.float64)
    got = scaled_pca(sp.csr_matrix(dense), 10, dtype=np.float64)
    signs = np.sign((got * want).sum(0))
    np.testing.assert_allclose(got * signs, want, rtol=1e-8, atol=1e-8 * np.abs(want).max())
