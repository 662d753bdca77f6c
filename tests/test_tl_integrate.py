"""tl.integrate on AnnData of raw counts: keys written, equal to the kernels on the same
preprocessing, h5ad round trip, bad input."""

from __future__ import annotations

import importlib.util

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scatlas import metrics
from scatlas._validate import ScatlasInputError
from scatlas.kernels.anchors import seurat_integrate
from scatlas.kernels.fastmnn import fastmnn, multi_batch_norm
from scatlas.tl._integrate import integrate


@pytest.fixture(scope="module")
def counts():
    """Three batches of Poisson counts (4 cell types, 400 genes, a per-batch gene effect)."""
    rng = np.random.default_rng(4)
    n_genes, T = 400, 4
    logmu = rng.normal(0.0, 1.2, size=(T, n_genes))
    X, types, batch = [], [], []
    for b, n in enumerate((260, 200, 220)):
        t = rng.integers(0, T, n)
        effect = rng.normal(0, 0.6, n_genes)
        X.append(rng.poisson(np.exp(logmu[t] + effect) * rng.gamma(8, 0.125, (n, 1))))
        types.append(t)
        batch += [f"b{b}"] * n
    obs = pd.DataFrame({"batch": pd.Categorical(batch), "type": np.concatenate(types).astype(str)},
                       index=[f"c{i}" for i in range(len(batch))])
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(np.vstack(X).astype(np.float32)), obs=obs, var=var)


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


@pytest.mark.skipif(importlib.util.find_spec("scatlas.tl._inmf") is None,
                    reason="scatlas.tl._inmf not available")
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
