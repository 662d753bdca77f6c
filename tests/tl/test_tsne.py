"""t-SNE views: tl.tsne (openTSNE on the CPU, cuML on the GPU), pl.embedding, and the report's
t-SNE panels beside its UMAPs."""

from __future__ import annotations

import sys
import types

import anndata as ad
import numpy as np
import pytest

from scatlas import backend, pl, tl
from scatlas.exceptions import ScatlasInputError
from scatlas.kernels import knn
from scatlas.report import _tsne, umap_figure
from tests.helpers import fake_gpu

pytest.importorskip("openTSNE")


def groups_adata(n_per: int = 50, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6, size=(3, 10))
    adata = ad.AnnData(np.zeros((3 * n_per, 2), dtype=np.float32))
    adata.obsm["X_pca"] = rng.normal(size=(3 * n_per, 10)) + np.repeat(centres, n_per, axis=0)
    adata.obs["group"] = np.repeat(["g1", "g2", "g10"], n_per)
    return adata


@pytest.fixture(scope="module")
def embedded() -> ad.AnnData:
    adata = groups_adata()
    tl.tsne(adata)
    return adata


def test_tsne_keeps_groups_apart_and_is_seeded(embedded):
    Y = embedded.obsm["X_tsne"]
    assert Y.shape == (150, 2) and Y.dtype == np.float32 and np.isfinite(Y).all()
    _, nn = knn(np.asarray(Y), None, 5, exclude_self=True)
    g = embedded.obs["group"].to_numpy()
    assert (g[nn] == g[:, None]).mean() > 0.95
    again = groups_adata()
    tl.tsne(again)
    np.testing.assert_array_equal(again.obsm["X_tsne"], Y)
    assert embedded.uns["tsne"]["params"]["use_rep"] == "X_pca"


def test_missing_opentsne_and_bad_input(monkeypatch):
    adata = groups_adata(5)
    with pytest.raises(ScatlasInputError) as err:
        tl.tsne(adata, use_rep="X_umap")
    assert err.value.param == "use_rep"
    with pytest.raises(ScatlasInputError) as err:
        tl.tsne(adata, perplexity=0)
    assert err.value.param == "perplexity"
    monkeypatch.setitem(sys.modules, "openTSNE", None)  # import openTSNE -> ImportError
    with pytest.raises(ScatlasInputError, match=r"pip install 'scatlas\[tsne\]'"):
        tl.tsne(adata)
    # the report leaves its t-SNE panels out, with a warning, instead of failing
    with pytest.warns(UserWarning, match="no t-SNE panels"):
        assert _tsne(adata.obsm["X_pca"], 0) is None


def test_gpu_input_goes_to_cuml(monkeypatch):
    fake_gpu.install(monkeypatch)
    calls = []

    class TSNE:  # cuML's interface
        def __init__(self, n_components, perplexity, random_state):
            calls.append((n_components, perplexity, random_state))

        def fit_transform(self, X):
            assert backend.is_gpu_array(X)
            return X[:, :2] * 1.0

    cuml = types.ModuleType("cuml")
    cuml.manifold = types.SimpleNamespace(TSNE=TSNE)
    monkeypatch.setitem(sys.modules, "cuml", cuml)
    monkeypatch.setitem(sys.modules, "cuml.manifold", cuml.manifold)
    X = fake_gpu.to_fake_gpu(np.random.default_rng(0).normal(size=(40, 5)))
    Y = tl._tsne.tsne_coordinates(X, seed=3)
    assert backend.is_gpu_array(Y) and Y.shape == (40, 2) and Y.dtype == np.float32
    assert calls == [(2, 13.0, 3)]  # perplexity capped at (n - 1) / 3

    monkeypatch.setitem(sys.modules, "cuml", None)  # no cuML: openTSNE on the host
    monkeypatch.setitem(sys.modules, "cuml.manifold", None)
    with pytest.warns(UserWarning, match="cuML is not installed"):
        Y = tl._tsne.tsne_coordinates(X, seed=3)
    assert backend.is_gpu_array(Y) and Y.shape == (40, 2)


def test_pl_embedding(embedded):
    import matplotlib

    matplotlib.use("Agg")
    fig = pl.embedding(embedded, "tsne", color="group")
    ax = fig.axes[0]
    assert ax.get_title() == "t-SNE: group" and ax.get_xlabel() == "t-SNE1"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["g1", "g2", "g10"]
    two = pl.embedding(embedded, "X_pca", color=["group", "group"], components=(1, 2))
    assert len([a for a in two.axes if a.get_visible()]) == 2
    for kwargs, param in (({"basis": "umap"}, "basis"),
                          ({"basis": "tsne", "color": "nope"}, "color"),
                          ({"basis": "tsne", "components": (0, 2)}, "components")):
        with pytest.raises(ScatlasInputError) as err:
            pl.embedding(embedded, **kwargs)
        assert err.value.param == param


def test_report_figure_puts_tsne_beside_umap(embedded):
    xy = np.asarray(embedded.obsm["X_tsne"])
    g = embedded.obs["group"].to_numpy()
    fig = umap_figure({"uncorrected": xy, "integrated": xy}, {"batch": g, "label": g},
                      tsne={"uncorrected": -xy, "integrated": -xy})
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:4] == ["uncorrected: batch", "uncorrected: label",
                          "uncorrected (t-SNE): batch", "uncorrected (t-SNE): label"]
    assert [ax.get_xlabel() for ax in fig.axes[:4]] == ["UMAP1", "UMAP1", "t-SNE1", "t-SNE1"]
    assert len(fig.axes) == 8
