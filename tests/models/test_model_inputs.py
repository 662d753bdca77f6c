"""A model records the input it was trained on and reads new data the same way (issue 16, 4).

Raw counts must be non-negative integers, log-normalised values (log1p of normalised counts)
non-negative and finite: scaled or z-scored data are refused at training and at embedding. A
model trained on log-normalised values (in a layer, or in ``adata.raw``) embeds without being
told so again; a model folder saved before the record existed still loads as a counts model.
"""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import scatlas
from scatlas import datasets
from scatlas._validate import ScatlasInputError
from scatlas.models import load
from scatlas.models.inputs import InputKindError, InputSpec, check_input_values
from tests.conftest import dataset_path

TINY = {"max_steps": 6, "batch_size": 64, "hidden": (16,), "latent_dim": 4, "progress": False,
        "n_top_genes": None}


def _lognorm(X) -> np.ndarray:
    """``log1p(1e4 x / total)`` per cell, float64 numpy (the reference normalisation)."""
    X = np.asarray(X.toarray() if sp.issparse(X) else X, np.float64)
    total = X.sum(axis=1, keepdims=True)
    return np.log1p(1e4 * X / np.where(total > 0, total, 1))


def _zscore(X) -> np.ndarray:
    """Per-gene z-scores (scanpy's ``pp.scale``): the scaled X of processed files."""
    X = np.asarray(X, np.float64)
    return ((X - X.mean(0)) / np.maximum(X.std(0), 1e-12)).astype(np.float32)


@pytest.fixture(scope="module")
def cells():
    """Synthetic counts with a log-normalised layer and a z-scored X beside them."""
    a = datasets.synthetic(300, 40, n_batches=2, n_cell_types=3, seed=0)
    counts = a.X.toarray().astype(np.float32)
    lognormed = _lognorm(counts).astype(np.float32)
    b = ad.AnnData(_zscore(lognormed), obs=a.obs.copy(), var=a.var.copy())
    b.layers["counts"] = sp.csr_matrix(counts)
    b.layers["lognorm"] = lognormed
    return b


@pytest.fixture(scope="module")
def lognorm_model(cells):
    return scatlas.tl.train_metric(cells, "cell_type", "batch", layer="lognorm",
                                   input="lognorm", **TINY)


def test_check_input_values_tells_the_kinds_apart(cells):
    counts = cells.layers["counts"]
    lognormed = cells.layers["lognorm"]
    check_input_values(counts, "counts")
    check_input_values(lognormed, "lognorm")
    assert (cells.X < 0).any()  # z-scores: negative wherever a cell is below a gene's mean
    for kind in ("counts", "lognorm"):
        with pytest.raises(InputKindError, match=r"negative value.*scaled or z-scored") as err:
            check_input_values(cells.X, kind, "X")
        assert err.value.kind == kind and err.value.param == "input"
        assert f"{int((cells.X < 0).sum())} negative" in str(err.value)
    with pytest.raises(InputKindError, match=r"non-integer.*input='lognorm'"):
        check_input_values(lognormed, "counts")
    big = counts.copy()
    big.data[0] = 500  # raw counts (above any log1p of normalised counts) as lognorm
    with pytest.raises(InputKindError, match=r"integer values up to 500.*input='counts'"):
        check_input_values(big, "lognorm")
    with pytest.raises(ScatlasInputError, match="NaN"):
        check_input_values(np.array([[np.nan, 1.0]]), "lognorm")


def test_training_refuses_scaled_data_as_lognorm(cells):
    with pytest.raises(InputKindError, match="negative value"):
        scatlas.tl.train_metric(cells, "cell_type", "batch", input="lognorm", **TINY)
    with pytest.raises(InputKindError, match="non-integer"):
        scatlas.tl.train_metric(cells, "cell_type", "batch", layer="lognorm", **TINY)


def test_training_refuses_scaled_backed_rows_as_lognorm(cells, tmp_path):
    """A backed matrix is checked as its rows are read: negative values refused for lognorm."""
    path = tmp_path / "scaled.h5ad"
    scaled = ad.AnnData(sp.csr_matrix(cells.X), obs=cells.obs.copy(), var=cells.var.copy())
    scaled.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(ScatlasInputError, match=r"negative value.*scaled or z-scored"):
        scatlas.tl.train_metric(backed, "cell_type", "batch", input="lognorm", **TINY)
    backed.file.close()


def test_a_lognorm_model_embeds_as_it_was_trained(cells, lognorm_model, tmp_path):
    model = lognorm_model
    assert model.input_spec == InputSpec("lognorm", "lognorm", False)
    assert model.input_kind == "lognorm" and "input='lognorm'" in repr(model)
    model.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert again.input_spec == model.input_spec
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults follow the record: no warning
        Z = again.embed(cells)  # X is z-scored: the recorded layer is read
        # a query with the log-normalised values in X only (no such layer): X is read
        plain = ad.AnnData(cells.layers["lognorm"].copy(), var=cells.var.copy())
        np.testing.assert_allclose(again.embed(plain), Z, rtol=1e-5, atol=1e-6)
    # reference: the same model reading the raw counts, log-normalised by the model over the
    # same genes, is the same computation (told explicitly: a warning says it differs)
    with pytest.warns(UserWarning, match="trained on log-normalised"):
        Zc = again.embed(cells, layer="counts", input="counts")
    np.testing.assert_allclose(Zc, Z, rtol=1e-4, atol=1e-5)
    # the scaled X, asked for explicitly (or all there is), is refused in the model's terms
    with pytest.raises(InputKindError, match=r"X holds \d+ negative value.*input='lognorm'"):
        again.embed(cells, layer="X")
    scaled = ad.AnnData(cells.X.copy(), var=cells.var.copy())
    with pytest.raises(InputKindError, match="scaled or z-scored"):
        again.embed(scaled)
    Z2 = scatlas.tl.embed(cells.copy(), tmp_path / "m")
    np.testing.assert_array_equal(Z2, Z)


def test_a_model_folder_without_the_record_reads_counts(cells, tmp_path):
    """Model folders saved before the input was recorded load as raw-count models."""
    model = scatlas.tl.train_metric(cells, "cell_type", "batch", layer="counts", **TINY)
    assert model.input_spec == InputSpec("counts", "counts", False)
    model.save(tmp_path / "m")
    manifest = tmp_path / "m" / "manifest.json"
    meta = json.loads(manifest.read_text())
    assert meta["extra"].pop("input") == {"kind": "counts", "layer": "counts",
                                          "use_raw": False}
    manifest.write_text(json.dumps(meta))  # as an older scatlas wrote it (not checksummed)
    old = load(tmp_path / "m")
    assert old.input_spec == InputSpec()
    query = ad.AnnData(cells.layers["counts"].copy(), var=cells.var.copy())
    np.testing.assert_array_equal(old.embed(query), model.embed(cells))
    with pytest.raises(InputKindError, match="negative value"):
        old.embed(cells)  # X (z-scored): the old model knows no layer


def test_use_raw_trains_and_embeds_from_adata_raw(cells):
    a = ad.AnnData(cells.X.copy(), obs=cells.obs.copy(), var=cells.var.copy())
    a.raw = ad.AnnData(cells.layers["lognorm"].copy(), var=cells.var.copy())
    model = scatlas.tl.train_metric(a, "cell_type", "batch", input="lognorm", use_raw=True,
                                    **TINY)
    assert model.input_spec == InputSpec("lognorm", None, True)
    Z = model.embed(a)  # reads .raw by default
    direct = ad.AnnData(cells.layers["lognorm"].copy(), var=cells.var.copy())
    np.testing.assert_array_equal(Z, model.embed(direct))
    with pytest.raises(InputKindError, match="negative value"):
        model.embed(a, use_raw=False)
    with pytest.raises(ScatlasInputError, match="adata.raw is empty"):
        scatlas.tl.train_metric(cells, "cell_type", input="lognorm", use_raw=True, **TINY)
    with pytest.raises(ScatlasInputError, match="not both"):
        model.embed(a, use_raw=True, layer="lognorm")


def test_pbmc68k_reduced_lognorm_raw_end_to_end(shared_data):
    """scanpy's pbmc68k_reduced: X scaled (refused as lognorm), .raw log-normalised."""
    a = ad.read_h5ad(dataset_path(shared_data, "scanpy_pbmc68k_reduced.h5ad"))
    with pytest.raises(InputKindError, match="scaled or z-scored"):
        scatlas.tl.train_metric(a, "bulk_labels", input="lognorm", **TINY)
    model = scatlas.tl.train_metric(a, "bulk_labels", input="lognorm", use_raw=True, **TINY)
    Z = model.embed(a)
    assert Z.shape == (a.n_obs, 4) and np.allclose(np.linalg.norm(Z, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(Z, model.embed(a.raw.to_adata()))


def test_mvae_reads_raw_counts_only():
    from scatlas.tl import train_mvae

    rng = np.random.default_rng(0)
    a = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (40, 15)).astype(np.float32)))
    model = train_mvae(a, {"rna": "X"}, max_steps=2, batch_size=20, progress=False,
                       n_top_genes=None)
    assert model.input_kind == "counts"
    Z = model.embed(a, input="counts")
    np.testing.assert_array_equal(Z, model.embed(a))
    with pytest.raises(ScatlasInputError, match="reads raw counts.*input='lognorm'"):
        model.embed(a, input="lognorm")
    with pytest.raises(ScatlasInputError, match="modalities="):
        model.embed(a, layer="counts")
    scaled = a.copy()
    scaled.X = _zscore(a.X.toarray())
    with pytest.raises(ScatlasInputError, match="negative values.*scaled or z-scored"):
        model.embed(scaled)
