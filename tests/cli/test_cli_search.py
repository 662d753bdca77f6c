"""``scatlas index build`` / ``index info`` / ``search`` / ``annotate`` round trips on small data,
and :func:`scatlas.search.pipeline.annotate_adata` with a model double (``LinearModel`` from
test_search_service: genes alignment, log-normalisation, fixed linear map, L2 normalisation)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scatlas import datasets
from scatlas.cli import main
from scatlas.search import CellIndex, annotate
from scatlas.search.pipeline import annotate_adata
from tests.helpers.search_models import LinearModel, reference


@pytest.fixture(scope="module")
def ref():
    X, meta = reference(n=500, d=12, seed=4)
    meta.index = [f"ref{i}" for i in range(len(meta))]
    return X, meta


@pytest.fixture
def ref_h5ad(tmp_path, ref):
    X, meta = ref
    adata = ad.AnnData(np.zeros((X.shape[0], 3), np.float32), obs=meta)
    adata.obsm["X_emb"] = X
    path = tmp_path / "ref.h5ad"
    adata.write_h5ad(path)
    return path


def _queries(m: int, d: int = 12, seed: int = 9) -> np.ndarray:
    Q = np.random.default_rng(seed).standard_normal((m, d)).astype(np.float32)
    return Q / np.linalg.norm(Q, axis=1, keepdims=True)


def test_index_build_from_h5ad_and_info(tmp_path, ref_h5ad, ref, capsys):
    X, meta = ref
    out = tmp_path / "idx"
    assert main(["index", "build", str(ref_h5ad), "--out", str(out), "--obsm-key", "X_emb",
                 "--engine", "exact"]) == 0
    idx = CellIndex.load(out)
    assert (idx.ntotal, idx.dim, idx.metric, idx.engine) == (500, 12, "cosine", "exact")
    assert list(idx.metadata["donor"]) == list(meta["donor"])
    Q = _queries(7)
    direct = CellIndex.build(X, meta, engine="exact")
    for a, b in zip(idx.search(Q, 5), direct.search(Q, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    capsys.readouterr()
    assert main(["index", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ntotal"] == 500 and set(info["metadata_columns"]) == set(meta.columns)


def test_index_build_int8_lists(tmp_path, ref_h5ad, ref):
    """--list-dtype/--rerank reach CellIndex.build: the saved index equals the library's."""
    X, meta = ref
    out = tmp_path / "idx8"
    assert main(["index", "build", str(ref_h5ad), "--out", str(out), "--obsm-key", "X_emb",
                 "--list-dtype", "int8", "--rerank", "2", "--nlist", "8", "--nprobe", "8"]) == 0
    idx = CellIndex.load(out)
    direct = CellIndex.build(X, meta, list_dtype="int8", rerank=2, nlist=8, nprobe=8)
    assert idx.engine == direct.engine == "native-ivf"
    Q = _queries(6)
    for a, b in zip(idx.search(Q, 5), direct.search(Q, 5), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_index_build_from_npy_with_metadata(tmp_path, ref):
    X, meta = ref
    np.save(tmp_path / "emb.npy", X)
    meta.to_csv(tmp_path / "meta.csv")
    out = tmp_path / "idx"
    assert main(["index", "build", str(tmp_path / "emb.npy"), "--out", str(out), "--metric",
                 "euclidean", "--metadata", str(tmp_path / "meta.csv")]) == 0
    idx = CellIndex.load(out)
    assert idx.metric == "euclidean" and idx.ntotal == 500
    assert list(idx.metadata["cell_type"].astype(str)) == list(meta["cell_type"].astype(str))
    D, I = idx.search(_queries(3), 4)
    ref_d = np.linalg.norm(_queries(3)[:, None, :] - X[None], axis=2)
    np.testing.assert_array_equal(I, np.argsort(ref_d, axis=1, kind="stable")[:, :4])


def test_index_build_errors(tmp_path, ref_h5ad, ref, capsys):
    assert main(["index", "build", str(ref_h5ad), "--out", str(tmp_path / "i")]) == 2
    assert "X_scatlas" in capsys.readouterr().err  # default obsm key absent: clear message
    np.save(tmp_path / "bad.npy", np.zeros(5, np.float32))
    assert main(["index", "build", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "i")]) == 2
    assert "2-D" in capsys.readouterr().err
    X, meta = ref
    np.save(tmp_path / "emb.npy", X)
    meta.iloc[:10].to_csv(tmp_path / "short.csv")
    assert main(["index", "build", str(tmp_path / "emb.npy"), "--out", str(tmp_path / "i"),
                 "--metadata", str(tmp_path / "short.csv")]) == 2
    assert main(["index", "build", str(tmp_path / "missing.npy"), "--out",
                 str(tmp_path / "i")]) == 2


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_search_round_trip(tmp_path, ref, suffix):
    X, meta = ref
    idx = CellIndex.build(X, meta, engine="exact")
    idx.save(tmp_path / "idx")
    Q = _queries(6)
    qa = ad.AnnData(np.zeros((6, 2), np.float32))
    qa.obs_names = [f"q{i}" for i in range(6)]
    qa.obsm["X_scatlas"] = Q
    qa.write_h5ad(tmp_path / "q.h5ad")
    out = tmp_path / f"hits{suffix}"
    assert main(["search", "--index", str(tmp_path / "idx"), str(tmp_path / "q.h5ad"), "--k",
                 "4", "--out", str(out)]) == 0
    table = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    D, I = idx.search(Q, 4)
    assert list(table["query"]) == [f"q{i}" for i in range(6) for _ in range(4)]
    assert list(table["rank"]) == [0, 1, 2, 3] * 6
    np.testing.assert_array_equal(table["id"].to_numpy().reshape(6, 4), I)
    np.testing.assert_allclose(table["distance"].to_numpy().reshape(6, 4), D, rtol=1e-6)
    assert list(table["donor"]) == list(meta["donor"].to_numpy()[I.ravel()])


def test_search_npy_with_filter_to_stdout(tmp_path, ref, capsys):
    X, meta = ref
    idx = CellIndex.build(X, meta, engine="exact")
    idx.save(tmp_path / "idx")
    Q = _queries(2, seed=3)
    np.save(tmp_path / "q.npy", Q)
    filt = {"donor": ["d2"]}
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), str(tmp_path / "q.npy"), "--k", "3",
                 "--filter", json.dumps(filt), "--columns", "donor"]) == 0
    import io

    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    _, I = idx.search(Q, 3, filter=filt)
    np.testing.assert_array_equal(table["id"].to_numpy().reshape(2, 3), I)
    assert set(table["donor"]) == {"d2"} and list(table.columns) == [
        "query", "rank", "id", "distance", "donor"]
    # pandas query strings work on the command line
    assert main(["search", "--index", str(tmp_path / "idx"), str(tmp_path / "q.npy"), "--k", "3",
                 "--filter", "donor == 'd2'", "--no-metadata"]) == 0
    table2 = pd.read_csv(io.StringIO(capsys.readouterr().out))
    np.testing.assert_array_equal(table2["id"].to_numpy(), table["id"].to_numpy())
    # wrong dimension, bad output suffix
    np.save(tmp_path / "q5.npy", np.ones((2, 5), np.float32))
    assert main(["search", "--index", str(tmp_path / "idx"), str(tmp_path / "q5.npy")]) == 2
    assert "dimension" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "idx"), str(tmp_path / "q.npy"), "--out",
                 str(tmp_path / "hits.json")]) == 2


def test_annotate_cli_from_obsm(tmp_path, ref):
    X, meta = ref
    idx = CellIndex.build(X, meta, engine="exact")
    idx.save(tmp_path / "idx")
    Q = _queries(9, seed=5)
    qa = ad.AnnData(np.zeros((9, 2), np.float32))
    qa.obsm["X_scatlas"] = Q
    qa.write_h5ad(tmp_path / "q.h5ad")
    out = tmp_path / "annotated.h5ad"
    assert main(["annotate", "--index", str(tmp_path / "idx"), str(tmp_path / "q.h5ad"),
                 "--label-key", "cell_type", "--k", "20", "--out", str(out)]) == 0
    got = ad.read_h5ad(out)
    expected = annotate(idx, Q, k=20, label_key="cell_type")
    assert list(got.obs["scatlas_label"].astype(str)) == list(expected["label"].astype(str))
    np.testing.assert_allclose(got.obs["scatlas_confidence"], expected["confidence"], rtol=1e-6)
    np.testing.assert_allclose(got.obs["scatlas_min_dist"], expected["min_dist"], rtol=1e-6)
    assert list(got.obs["scatlas_is_ood"]) == list(expected["is_ood"])
    assert got.uns["scatlas"]["label_key"] == "cell_type"
    assert main(["annotate", "--index", str(tmp_path / "idx"), str(tmp_path / "q.h5ad"),
                 "--label-key", "nope"]) == 2


def test_annotate_records_the_threshold_it_applied(tmp_path, ref):
    """uns['scatlas'] names the threshold actually used and where it came from (it used to say
    'none' whenever the default was applied)."""
    X, meta = ref
    idx = CellIndex.build(X[:400], meta.iloc[:400], engine="exact")
    qa = ad.AnnData(np.zeros((100, 2), np.float32))
    qa.obsm["X_scatlas"] = X[400:]
    annotate_adata(qa, idx, label_key="cell_type", k=10)
    uns = qa.uns["scatlas"]
    assert uns["ood_source"] == "index" and uns["ood_distance"] == idx.ood_distance(0.99)
    assert uns["ood_quantile"] == 0.99 and "1-NN" in uns["ood_rule"]
    assert (qa.obs["scatlas_is_ood"] == (qa.obs["scatlas_min_dist"] > uns["ood_distance"])).all()
    annotate_adata(qa, idx, label_key="cell_type", k=10, ood_distance=0.05)
    assert qa.uns["scatlas"]["ood_source"] == "given"
    assert qa.uns["scatlas"]["ood_distance"] == 0.05
    assert np.isnan(qa.uns["scatlas"]["ood_quantile"])
    qa.write_h5ad(tmp_path / "a.h5ad")  # the record is h5ad-writable (NaN, not None)
    assert ad.read_h5ad(tmp_path / "a.h5ad").uns["scatlas"]["ood_source"] == "given"


def test_index_calibrate_cli(tmp_path, ref_h5ad, ref, capsys):
    X, meta = ref
    out = tmp_path / "idx"
    sub = ad.read_h5ad(ref_h5ad)
    sub[:350].copy().write_h5ad(tmp_path / "r.h5ad")
    held = sub[350:450].copy()
    held.obs["cell_type"] = held.obs["cell_type"].astype(str)
    held.obs.loc[held.obs_names[:10], "cell_type"] = "novel"  # left out of the calibration
    held.write_h5ad(tmp_path / "held.h5ad")
    qa = sub[450:].copy()
    qa.obsm["X_scatlas"] = qa.obsm["X_emb"]
    qa.write_h5ad(tmp_path / "q.h5ad")
    assert main(["index", "build", str(tmp_path / "r.h5ad"), "--out", str(out), "--obsm-key",
                 "X_emb", "--engine", "exact"]) == 0
    assert main(["index", "calibrate", str(out), str(tmp_path / "held.h5ad"), "--obsm-key",
                 "X_emb", "--label-key", "cell_type"]) == 0
    direct = CellIndex.build(X[:350], meta.iloc[:350], engine="exact")
    rec = direct.calibrate_ood(X[350:450], labels=held.obs["cell_type"], label_key="cell_type")
    assert rec["n_cells"] == 90
    idx = CellIndex.load(out)
    assert idx.ood_threshold() == direct.ood_threshold()
    capsys.readouterr()
    assert main(["index", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ood"]["source"] == "calibration"
    assert info["ood"]["threshold"] == pytest.approx(rec["quantiles"]["0.99"])
    assert main(["annotate", "--index", str(out), str(tmp_path / "q.h5ad"), "--label-key",
                 "cell_type", "--out", str(tmp_path / "o.h5ad")]) == 0
    uns = ad.read_h5ad(tmp_path / "o.h5ad").uns["scatlas"]
    assert uns["ood_source"] == "calibration"
    assert uns["ood_distance"] == pytest.approx(rec["quantiles"]["0.99"])
    assert main(["index", "calibrate", str(out), str(tmp_path / "held.h5ad"), "--obsm-key",
                 "X_emb", "--label-key", "nope"]) == 2
    assert "--label-key 'nope'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def atlas():
    """Raw-count reference and query cells of the same 4 cell types."""
    adata = datasets.synthetic(900, 300, n_cell_types=4, n_batches=1, library_size=3000,
                               density=None, seed=2)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    return adata[:700].copy(), adata[700:].copy()


def test_annotate_adata_with_model_double(atlas):
    reference_cells, query = atlas
    # the double's linear map: the reference's top principal axes (a stand-in for training)
    genes = reference_cells.var_names[::-1]
    L = LinearModel(genes, 1).lognorm_of(reference_cells[:, genes])
    center = L.mean(axis=0)
    W = np.linalg.svd(L - center, full_matrices=False)[2][:24].T
    model = LinearModel(genes, 24, W=W, center=center)
    idx = CellIndex.build(model.embed(reference_cells), reference_cells.obs, engine="exact")
    table = annotate_adata(query, idx, model, label_key="cell_type", k=15)
    emb = model.embed(query)
    np.testing.assert_allclose(query.obsm["X_scatlas"], emb, atol=1e-6)
    expected = annotate(idx, emb, k=15, label_key="cell_type")
    assert list(table["label"]) == list(expected["label"])
    assert list(query.obs["scatlas_label"].astype(str)) == list(expected["label"].astype(str))
    np.testing.assert_allclose(query.obs["scatlas_min_dist"], expected["min_dist"])
    # the annotation recovers the held-out cells' true types (independent ground truth)
    accuracy = np.mean(query.obs["scatlas_label"].astype(str) == query.obs["cell_type"])
    assert accuracy > 0.9, accuracy
    hits = json.loads(query.obs["scatlas_hits"].iloc[0])
    assert sum(hits.values()) == 15


def test_annotate_cli_with_model_dir(tmp_path, atlas, monkeypatch):
    """``--model DIR`` goes through ``scatlas.models.load`` (patched here to the double)."""
    reference_cells, query = atlas
    model = LinearModel(reference_cells.var_names, 16, seed=5)
    idx = CellIndex.build(model.embed(reference_cells), reference_cells.obs, engine="exact")
    idx.save(tmp_path / "idx")
    query.write_h5ad(tmp_path / "raw.h5ad")
    seen = []

    def fake_load(path):
        seen.append(str(path))
        return model

    import scatlas.models

    monkeypatch.setattr(scatlas.models, "load", fake_load, raising=False)
    out = tmp_path / "out.h5ad"
    assert main(["annotate", "--index", str(tmp_path / "idx"), "--model", str(tmp_path / "m"),
                 str(tmp_path / "raw.h5ad"), "--label-key", "cell_type", "--out", str(out)]) == 0
    assert seen == [str(tmp_path / "m")]
    got = ad.read_h5ad(out)
    expected = annotate(idx, model.embed(query), k=50, label_key="cell_type")
    assert list(got.obs["scatlas_label"].astype(str)) == list(expected["label"].astype(str))
    # search with --model embeds the raw counts too
    assert main(["search", "--index", str(tmp_path / "idx"), "--model", str(tmp_path / "m"),
                 str(tmp_path / "raw.h5ad"), "--k", "2", "--out",
                 str(tmp_path / "hits.csv")]) == 0
    hits = pd.read_csv(tmp_path / "hits.csv")
    _, I = idx.search(model.embed(query), 2)
    np.testing.assert_array_equal(hits["id"].to_numpy().reshape(-1, 2), I)


@pytest.mark.slow
def test_annotate_cli_with_a_trained_metric_encoder(tmp_path, atlas):
    """End to end with the real model stack: train a tiny metric encoder, save it, build the
    reference index with ``scatlas embed``-style embeddings, then ``scatlas annotate --model``
    on raw counts equals annotating the model's own embedding; labels mostly right."""
    from scatlas import models, tl

    reference_cells, query = atlas
    model = tl.train_metric(reference_cells, "cell_type", max_steps=60, batch_size=128,
                            validation_fraction=0.0, progress=False)
    model.save(tmp_path / "model")
    loaded = models.load(tmp_path / "model")
    idx = CellIndex.build(loaded.embed(reference_cells), reference_cells.obs, engine="exact")
    idx.save(tmp_path / "idx")
    query.write_h5ad(tmp_path / "raw.h5ad")
    out = tmp_path / "out.h5ad"
    assert main(["annotate", "--index", str(tmp_path / "idx"), "--model", str(tmp_path / "model"),
                 str(tmp_path / "raw.h5ad"), "--label-key", "cell_type", "--k", "15", "--out",
                 str(out)]) == 0
    got = ad.read_h5ad(out)
    expected = annotate(idx, loaded.embed(query), k=15, label_key="cell_type")
    assert list(got.obs["scatlas_label"].astype(str)) == list(expected["label"].astype(str))
    np.testing.assert_allclose(got.obsm["X_scatlas"], loaded.embed(query), atol=1e-5)
    accuracy = np.mean(got.obs["scatlas_label"].astype(str) == query.obs["cell_type"])
    assert accuracy > 0.8, accuracy
