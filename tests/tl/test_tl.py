"""The scanpy-style layer: same keys and numbers as scanpy, results equal to the kernels."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from scatlas import tl
from scatlas._validate import ScatlasInputError
from scatlas.kernels import cca


@pytest.fixture
def lognorm_mesc(mesc):
    a = mesc.copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a


def test_pca_matches_scanpy(lognorm_mesc):
    ours = lognorm_mesc.copy()
    ref = lognorm_mesc.copy()
    tl.pca(ours, 20, dtype=np.float64)
    sc.pp.pca(ref, n_comps=20, svd_solver="arpack", dtype="float64")
    assert ours.obsm["X_pca"].shape == (ours.n_obs, 20)
    assert ours.varm["PCs"].shape == (ours.n_vars, 20)
    np.testing.assert_allclose(ours.uns["pca"]["variance"], ref.uns["pca"]["variance"], rtol=1e-5)
    np.testing.assert_allclose(ours.uns["pca"]["variance_ratio"],
                               ref.uns["pca"]["variance_ratio"], rtol=1e-5)
    # leading components agree up to sign (scanpy's arpack path, in float32, has its own sign
    # rule; components 14-16 are nearly degenerate, so only the first 10 are compared)
    signs = np.sign((ours.obsm["X_pca"] * ref.obsm["X_pca"]).sum(0))[:10]
    np.testing.assert_allclose(ours.obsm["X_pca"][:, :10], ref.obsm["X_pca"][:, :10] * signs,
                               atol=1e-3)
    np.testing.assert_allclose(ours.varm["PCs"][:, :10], ref.varm["PCs"][:, :10] * signs,
                               atol=1e-5)


def test_pca_uses_highly_variable_genes_and_key_added(lognorm_mesc):
    a = lognorm_mesc
    hv = np.zeros(a.n_vars, dtype=bool)
    hv[::3] = True
    a.var["highly_variable"] = hv
    tl.pca(a, 5, key_added="hv_pca")
    loadings = a.varm["hv_pca"]
    assert not loadings[~hv].any() and loadings[hv].any()
    assert a.uns["hv_pca"]["params"]["use_highly_variable"] is True
    sub = a[:, hv].X
    from scatlas.kernels import pca as kpca

    np.testing.assert_allclose(a.obsm["hv_pca"], kpca(sub, 5).scores, rtol=1e-5, atol=1e-5)
    with pytest.raises(ScatlasInputError, match="no 'highly_variable'"):
        tl.pca(ad.AnnData(a.X), 3, use_highly_variable=True)
    with pytest.raises(ScatlasInputError, match="layer"):
        tl.pca(a, 3, layer="counts")


def test_pca_copy_leaves_input_untouched(lognorm_mesc):
    out = tl.pca(lognorm_mesc, 4, copy=True)
    assert "X_pca" in out.obsm and "X_pca" not in lognorm_mesc.obsm


def _three_batches():
    rng = np.random.default_rng(0)
    programs = rng.gamma(1.0, 1.0, size=(4, 80))
    X = rng.poisson(rng.gamma(0.5, 1.0, size=(90, 4)) @ programs).astype(np.float32)
    obs = pd.DataFrame({"batch": np.repeat(["a", "b", "c"], 30)},
                       index=[f"c{i}" for i in range(90)])
    return ad.AnnData(sp.csr_matrix(X), obs=obs)


def test_cca_writes_pair_embedding_and_nan_elsewhere():
    a = _three_batches()
    tl.cca(a, "batch", groups=("a", "c"), k=5)
    Z = a.obsm["X_cca"]
    assert Z.shape == (90, 5)
    assert np.isnan(Z[30:60]).all() and np.isfinite(Z[:30]).all() and np.isfinite(Z[60:]).all()
    Z1, Z2 = cca(a.X[:30], a.X[60:], 5)
    np.testing.assert_allclose(Z[:30], Z1, atol=1e-6)
    np.testing.assert_allclose(Z[60:], Z2, atol=1e-6)
    assert a.uns["X_cca"]["params"]["groups"] == ["a", "c"]


def test_cca_errors():
    a = _three_batches()
    with pytest.raises(ScatlasInputError, match="3 groups"):
        tl.cca(a, "batch", k=3)
    with pytest.raises(ScatlasInputError, match="not a column"):
        tl.cca(a, "donor", k=3)
    with pytest.raises(ScatlasInputError, match="no cells"):
        tl.cca(a, "batch", groups=("a", "zzz"), k=3)
