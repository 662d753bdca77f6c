"""scatlas.atlas.build and ``scatlas atlas build`` at small size on a 2-worker LocalCluster.

Checks against exact references: the stored embeddings equal the model's in-memory
``embed`` of the same counts; the index answers recall@10 >= 0.95 against exact search over
the stored embeddings (computed here by brute force); a crash leaves no half-written output and
a rerun resumes from the last finished stage; the served index answers expression queries.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

import scatlas
from scatlas.atlas import _build, _dask
from scatlas.exceptions import ScatlasInputError

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

N_CELLS, N_GENES = 3000, 220


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, env=dict(_dask.WORKER_ENV)) as lc, \
            distributed.Client(lc) as cl:
        yield cl


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    """(the counts AnnData, a folder with two stores of it (zarr + h5ad), a model folder)."""
    root = tmp_path_factory.mktemp("atlas")
    adata = scatlas.datasets.synthetic(N_CELLS, N_GENES, progress=False, seed=2)
    train = adata[:, :200].copy()  # the model knows 200 of the store's 220 genes
    model = scatlas.tl.train_metric(train, "cell_type", max_steps=20, batch_size=128,
                                    validation_fraction=0.0, progress=False)
    model.save(root / "model")
    raw = root / "raw"
    raw.mkdir()
    half = N_CELLS // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        adata[:half].copy().write_zarr(raw / "a.zarr")
    adata[half:].copy().write_h5ad(raw / "b.h5ad")
    return adata, raw, root / "model"


def _build_it(atlas, out, client, **kw):
    _, raw, model = atlas
    return scatlas.atlas.build(raw, model, out, client=client, chunk_rows=700, n_queries=300,
                               progress=False, **kw)


def _exact_recall(emb: np.ndarray, index, k: int = 10) -> float:
    E = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q = np.arange(0, len(E), 7)
    S = E[q] @ E.T
    S[np.arange(len(q)), q] = -np.inf  # leave each query itself out
    truth = np.argsort(-S, axis=1, kind="stable")[:, :k]
    _, got = index.search(emb[q], k + 1)
    hits = [len(set(g[g != i][:k]) & set(t)) for i, g, t in zip(q, got, truth, strict=True)]
    return float(np.mean(hits) / k)


def test_build_end_to_end(atlas, client, tmp_path):
    adata, _, model_dir = atlas
    out = tmp_path / "out"
    report = _build_it(atlas, out, client)  # exact engine below 50k cells (the default)
    emb = zarr.open_array(str(out / "embeddings.zarr"), mode="r")[:]
    model = scatlas.models.load(model_dir)
    np.testing.assert_allclose(emb, model.embed(adata, progress=False), atol=1e-5)
    meta = pd.read_parquet(out / "metadata.parquet")
    assert list(meta["cell"]) == list(adata.obs_names)
    assert list(meta["source"].unique()) == ["a.zarr", "b.h5ad"]
    index = scatlas.search.CellIndex.load(out / "index")
    assert len(index) == N_CELLS
    assert _exact_recall(emb, index) >= 0.95
    assert report["recall"]["recall"] >= 0.95
    assert set(report["stages"]) == set(_build.STAGES)
    for st in report["stages"].values():
        assert st["seconds"] >= 0 and st["driver_peak_rss"] > 0
    assert len(report["stages"]["embed"]["worker_peak_rss"]) == 2
    assert report["disk_bytes"] > 0
    for name in ("report.json", "report.md", "report.png"):
        assert (out / name).is_file()
    assert not list(out.glob(".*"))  # no temporaries


def test_crash_leaves_no_partial_output_and_rerun_resumes(atlas, client, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    # a crash inside the embed stage (after every block is written): no embeddings.zarr
    monkeypatch.setattr(_dask, "worker_peak_rss", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        _build_it(atlas, out, client)
    assert not (out / "embeddings.zarr").exists() and not list(out.glob(".*"))
    monkeypatch.undo()

    monkeypatch.setattr(_build, "_stage_index", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        _build_it(atlas, out, client)
    state = json.loads((out / _build.STATE).read_text())
    assert set(state["stages"]) == {"embed", "metadata"}
    assert (out / "embeddings.zarr").is_dir() and not (out / "index").exists()
    assert not list(out.glob(".*"))
    monkeypatch.undo()

    monkeypatch.setattr(_build, "_stage_embed", crash)  # must not run again
    monkeypatch.setattr(_build, "_stage_metadata", crash)
    report = _build_it(atlas, out, client)
    assert report["recall"]["recall"] >= 0.95
    assert set(report["stages"]) == set(_build.STAGES)

    with pytest.raises(ScatlasInputError, match="other settings"):
        _build_it(atlas, out, client, metric="euclidean")


def test_cli_with_scheduler_address_and_serve(atlas, client, tmp_path):
    adata, raw, model_dir = atlas
    out = tmp_path / "cli"
    from scatlas import cli

    rc = cli.main(["atlas", "build", str(raw / "a.zarr"), "--model", str(model_dir),
                           "--out", str(out), "--scheduler", client.scheduler.address,
                           "--chunk-rows", "500", "--n-queries", "200", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_cells"] == N_CELLS // 2 and report["recall"]["recall"] >= 0.95
    with warnings.catch_warnings():  # starlette 1.x suggests httpx2 for its TestClient
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from scatlas.search.service import create_app

    cells = adata[:5]
    counts = cells.X.toarray()
    emb = zarr.open_array(str(out / "embeddings.zarr"), mode="r")[:5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = create_app(str(out / "index"), str(model_dir), max_wait_ms=1.0)
        with TestClient(app) as http:
            r = http.post("/search/expression", json={
                "genes": list(cells.var_names), "counts": counts.tolist(), "k": 3,
                "return_embeddings": True})
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(np.asarray(body["embeddings"]), emb, atol=1e-5)


def test_errors(atlas, tmp_path):
    _, _, model = atlas
    with pytest.raises(FileNotFoundError):
        scatlas.atlas.build(tmp_path / "missing.zarr", model, tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScatlasInputError, match="neither"):
        scatlas.atlas.build(tmp_path / "empty", model, tmp_path / "o")


def test_synthetic_zarr_equals_in_memory(client, tmp_path):
    rec = scatlas.atlas.write_synthetic_zarr(tmp_path / "s.zarr", 2500, 150, chunk_size=700,
                                             client=client, seed=4)
    ref = scatlas.datasets.synthetic(2500, 150, seed=4, progress=False)
    got = scatlas.io.read_zarr(tmp_path / "s.zarr")
    assert (got.X != ref.X).nnz == 0
    assert got.obs.equals(ref.obs) and list(got.var_names) == list(ref.var_names)
    assert rec["n_cells"] == 2500 and rec["disk_bytes"] > 0
    assert not list(tmp_path.glob(".*"))


def test_cli_synthetic_zarr(client, tmp_path):
    from scatlas import cli

    out = tmp_path / "s.zarr"
    rc = cli.main(["synthetic", str(out), "--n-cells", "600", "--n-genes", "50",
                   "--scheduler", client.scheduler.address, "--no-progress"])
    assert rc == 0
    got = scatlas.io.read_zarr(out)
    ref = scatlas.datasets.synthetic(600, 50, progress=False)
    assert got.shape == (600, 50) and (got.X != ref.X).nnz == 0
