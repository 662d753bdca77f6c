"""tl.integrate(method="harmony"): the PCA against a NumPy reading of Seurat's ScaleData +
RunPCA, the embedding against harmonypy called directly on the same PCA, batch mixing on
synthetic batches, and bad input."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from scatlas import datasets, metrics, tl
from scatlas._validate import ScatlasInputError
from scatlas.pp import log_normalized_hvg as _log_hvg
from scatlas.tl import _harmony
from scatlas.tl._common import scaled_pca
from scatlas.tl._harmony import run_harmony

needs_harmonypy = pytest.mark.skipif(importlib.util.find_spec("harmonypy") is None,
                                     reason="harmonypy not installed (scatlas[harmony])")


@pytest.fixture(scope="module")
def synth():
    """600 cells x 400 genes of raw counts in 3 batches, gene-wise batch effects twice the
    generator's default (uncorrected iLISI about 0.24)."""
    return datasets.synthetic(600, 400, n_batches=3, seed=0, batch_effect=0.6)


def _ref_pca(X, k):
    """Seurat ScaleData (sd with n - 1, clip at 10) and an exact float64 SVD."""
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)
    sd = X.std(axis=0, ddof=1)
    S = np.where(sd > 0, (X - X.mean(0)) / np.where(sd > 0, sd, 1), 0.0)
    S = np.minimum(S, 10.0)
    U, s, _ = np.linalg.svd(S, full_matrices=False)
    return U[:, :k] * s[:k], s


def test_pca_is_seurat_scaledata_runpca(synth):
    work, _ = _log_hvg(synth, "batch", None, 300, None, "seurat", None)
    Z = scaled_pca(work.X, 20, seed=0)
    ref, s = _ref_pca(work.X, 20)
    assert Z.shape == (synth.n_obs, 20) and Z.dtype == np.float32
    # PCs are defined up to sign; compare column by column after aligning signs.
    signs = np.sign(np.sum(Z * ref, axis=0))
    # float32 data (relative error ~1e-6 per entry, x sqrt(p) in the scores) and the gap of
    # the 20th singular value to the 21st bound how far a float32 PCA can move a direction
    gap = (s[19] - s[20]) / s[0]
    tol = 20 * np.sqrt(np.finfo(np.float32).eps) / gap
    err = np.abs(Z * signs - ref).max(axis=0) / np.abs(ref).max(axis=0)
    assert np.all(err < tol), (err.max(), tol)


@needs_harmonypy
def test_integrate_matches_harmonypy_on_the_same_pca(synth):
    import harmonypy
    import pandas as pd

    ad = synth.copy()
    tl.integrate(ad, "batch", method="harmony", n_top_genes=300)
    E = ad.obsm["X_harmony"]
    uns = ad.uns["harmony"]
    assert E.shape == (ad.n_obs, 30) and E.dtype == np.float32
    assert uns["method"] == "harmony" and uns["backend"] == "harmonypy"
    assert uns["batches"] == ["batch0", "batch1", "batch2"] and uns["n_pcs"] == 30
    assert list(uns["genes"]) == list(ad.var_names[np.isin(ad.var_names, uns["genes"])])
    # the same preprocessing, then harmonypy called directly (cells x PCs, its own defaults)
    work, genes = _log_hvg(ad, "batch", None, 300, None, "seurat", None)
    assert list(ad.var_names[genes]) == list(uns["genes"])
    Z = scaled_pca(work.X, 30, seed=0)
    ho = harmonypy.run_harmony(np.asarray(Z, dtype=np.float64),
                               pd.DataFrame({"b": ad.obs["batch"].astype(str).to_numpy()}),
                               "b", random_state=0, verbose=False)
    ref = np.asarray(ho.Z_corr)
    assert ref.shape == E.shape
    # same float64 computation, ours rounded to float32 once: half an ulp of the largest value
    np.testing.assert_allclose(E, ref, rtol=0,
                               atol=np.finfo(np.float32).eps * np.abs(ref).max())
    assert not np.allclose(E, Z, atol=1e-3 * np.abs(Z).max())  # harmony moved the cells


@needs_harmonypy
def test_harmony_mixes_batches_and_keeps_types(synth):
    ad = synth.copy()
    tl.integrate(ad, "batch", method="harmony", n_top_genes=300)
    work, _ = _log_hvg(ad, "batch", None, 300, None, "seurat", None)
    Z = scaled_pca(work.X, 30, seed=0)
    batch, types = ad.obs["batch"].to_numpy(), ad.obs["cell_type"].to_numpy()
    before, after = metrics.ilisi(Z, batch), metrics.ilisi(ad.obsm["X_harmony"], batch)
    assert after > before + 0.1, (before, after)  # measured 0.24 -> 0.41
    assert metrics.knn_label_transfer(ad.obsm["X_harmony"], types, batch) >= \
        metrics.knn_label_transfer(Z, types, batch) - 0.02


@needs_harmonypy
def test_run_harmony_orientation_square(synth):
    """n == d: the input must not be read as PCs x cells."""
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(40, 40))
    batch = np.repeat(["a", "b"], 20)
    Z[batch == "b"] += 3.0
    out, info = run_harmony(Z, batch)
    assert out.shape == (40, 40) and info["backend"] == "harmonypy"
    # batch b's centre moves towards a's (a transposed input would mix up cells and PCs)
    gap = lambda M: np.linalg.norm(M[batch == "a"].mean(0) - M[batch == "b"].mean(0))  # noqa: E731
    assert gap(out) < 0.5 * gap(Z)


def test_bad_input(synth):
    with pytest.raises(ScatlasInputError, match="at least 2 batches"):
        run_harmony(np.zeros((10, 3)), ["a"] * 10)
    with pytest.raises(ScatlasInputError, match="one label per cell"):
        run_harmony(np.zeros((10, 3)), ["a", "b"] * 4)
    Z = np.zeros((10, 3))
    Z[0, 0] = np.nan
    with pytest.raises(ScatlasInputError, match="NaN"):
        run_harmony(Z, ["a", "b"] * 5)
    with pytest.raises(ScatlasInputError, match="n_pcs"):
        tl.integrate(synth.copy(), "batch", method="harmony", n_pcs=0, n_top_genes=300)
    one = synth.copy()
    one.obs["one"] = "x"
    with pytest.raises(ScatlasInputError, match="at least 2"):
        tl.integrate(one, "one", method="harmony", n_top_genes=300)


def test_missing_harmonypy_names_the_install(synth, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(_harmony.importlib.util, "find_spec",
                        lambda name, *a: None if name == "harmonypy" else real(name, *a))
    with pytest.raises(ScatlasInputError, match=r"scatlas\[harmony\]"):
        tl.integrate(synth.copy(), "batch", method="harmony", n_top_genes=300)
