"""``scatlas train metric`` and ``scatlas embed`` round trips on a small synthetic atlas."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scatlas import cli, datasets, tl
from scatlas.models import load


def test_train_then_embed(tmp_path, capsys):
    data = tmp_path / "atlas.h5ad"
    datasets.write_synthetic_h5ad(data, 300, 40, n_batches=2, seed=0)
    model_dir = tmp_path / "model"
    rc = cli.main(["train", "metric", str(data), "--out", str(model_dir), "--label-key",
                   "cell_type", "--study-key", "batch", "--max-steps", "12", "--batch-size",
                   "64", "--hidden", "16", "--latent-dim", "4", "--plot",
                   str(tmp_path / "loss.png")])
    assert rc == 0
    assert "train metric" in capsys.readouterr().out
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "model.train.jsonl").read_text().count("\n") >= 2
    out = tmp_path / "embedded.h5ad"
    assert cli.main(["embed", "--model", str(model_dir), str(data), str(out)]) == 0
    emb = ad.read_h5ad(out).obsm["X_scatlas"]
    expect = load(model_dir).embed(ad.read_h5ad(data))
    np.testing.assert_allclose(emb, expect, rtol=1e-6)
    assert cli.main(["embed", "--model", str(model_dir), "--precision", "bfloat16", str(data),
                     str(out)]) == 0
    expect = load(model_dir).embed(ad.read_h5ad(data), precision="bfloat16")
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_scatlas"], expect, rtol=1e-6)


def test_errors_exit_2(tmp_path, capsys):
    data = tmp_path / "atlas.h5ad"
    datasets.write_synthetic_h5ad(data, 100, 20, n_batches=2, seed=0)
    rc = cli.main(["train", "metric", str(data), "--out", str(tmp_path / "m"), "--label-key",
                   "nope"])
    assert rc == 2 and "nope" in capsys.readouterr().err
    rc = cli.main(["embed", "--model", str(tmp_path), str(data), str(tmp_path / "o.h5ad")])
    assert rc == 2 and "manifest" in capsys.readouterr().err
    # a diverged run: a one-line error, exit 2, no model written
    data = tmp_path / "bigger.h5ad"
    datasets.write_synthetic_h5ad(data, 300, 40, n_batches=2, seed=0)
    rc = cli.main(["train", "metric", str(data), "--out", str(tmp_path / "m"), "--label-key",
                   "cell_type", "--max-steps", "12", "--batch-size", "64", "--hidden", "16",
                   "--latent-dim", "4", "--lr", "1e38"])
    err = capsys.readouterr().err
    assert rc == 2 and "training loss is nan" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("dense", [False, True])
def test_train_metric_from_zarr_backed_with_options(tmp_path, monkeypatch, capsys, dense,
                                                   write_zarr):
    a = datasets.synthetic(300, 40, n_batches=2, seed=0)
    if dense:
        a.X = a.X.toarray()
    store = tmp_path / "atlas.zarr"
    write_zarr(a, store)
    seen = {}
    train_metric = tl.train_metric

    def spy(adata, *args, **kw):
        seen["X"], seen["kw"] = adata.X, kw
        return train_metric(adata, *args, **kw)

    monkeypatch.setattr(tl, "train_metric", spy)
    model_dir = tmp_path / "model"
    rc = cli.main(["train", "metric", str(store), "--backed", "--out", str(model_dir),
                   "--label-key", "cell_type", "--study-key", "batch", "--max-steps", "6",
                   "--batch-size", "64", "--hidden", "16", "--latent-dim", "4", "--bf16",
                   "--eval-every", "3", "--balance", "none", "--objective", "infonce",
                   "--temperature", "0.25", "--l1", "0", "--dropout", "0.2"])
    assert rc == 0 and "train metric" in capsys.readouterr().out
    # X was streamed from the store, not loaded: a lazy sparse dataset / zarr array
    assert not isinstance(seen["X"], np.ndarray) and not sp.issparse(seen["X"])
    assert seen["kw"]["balance"] is None
    model = load(model_dir)
    cfg = model.config
    assert cfg.bf16 and cfg.objective == "infonce" and cfg.temperature == 0.25
    assert cfg.l1 == 0 and cfg.dropout == 0.2
    assert model.info["train"]["eval_every"] == 3 and model.info["steps"] == 6
    out = tmp_path / "embedded.h5ad"  # a zarr input, an h5ad output
    assert cli.main(["embed", "--model", str(model_dir), str(store), str(out)]) == 0
    expect = model.embed(a)
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_scatlas"], expect, rtol=1e-5,
                               atol=1e-6)


def test_train_metric_option_errors(tmp_path, capsys):
    store = tmp_path / "missing.zarr"
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "metric", str(store), "--out", str(tmp_path / "m"), "--label-key",
                  "cell_type", "--balance", "cells"])
    assert err.value.code == 2
    assert "--balance: invalid choice: 'cells'" in capsys.readouterr().err
    rc = cli.main(["train", "metric", str(store), "--out", str(tmp_path / "m"), "--label-key",
                   "cell_type"])
    assert rc == 2 and "no such zarr store" in capsys.readouterr().err


def test_train_mvae_passes_eval_every(tmp_path, monkeypatch, capsys):
    from scatlas._validate import ScatlasInputError

    data = tmp_path / "cite.h5ad"
    datasets.write_synthetic_h5ad(data, 50, 20, n_batches=2, seed=0)
    seen = {}

    def spy(*args, **kw):
        seen.update(kw)
        raise ScatlasInputError("stop here")

    monkeypatch.setattr(tl, "train_mvae", spy)
    rc = cli.main(["train", "mvae", str(data), "--out", str(tmp_path / "m"), "--eval-every",
                   "7"])
    assert rc == 2 and "stop here" in capsys.readouterr().err
    assert seen["eval_every"] == 7


def test_train_metric_across_two_processes(tmp_path):
    """``--distributed`` on two local CPU processes (gloo): one global batch split over them,
    the same loss curve as one process, and only process 0 writes the model and the log."""
    import json
    import os
    import socket
    import subprocess
    import sys

    data = tmp_path / "atlas.h5ad"
    datasets.write_synthetic_h5ad(data, 300, 40, n_batches=2, seed=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["train", "metric", str(data), "--label-key", "cell_type", "--study-key", "batch",
              "--max-steps", "6", "--batch-size", "64", "--hidden", "16", "--latent-dim", "4",
              "--dropout", "0", "--eval-every", "3"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "scatlas.cli", *common, "--out", str(tmp_path / "multi"),
         "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert "process 1 of 2 done" in outs[1][0] and "process 0 writes" in outs[1][0]
    assert cli.main([*common, "--out", str(tmp_path / "single")]) == 0
    multi = load(tmp_path / "multi")
    assert multi.info["train"]["data_parallel"] and multi.info["batch_size"] == 64

    def records(name):
        text = (tmp_path / f"{name}.train.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]

    got, want = records("multi"), records("single")
    assert [r["step"] for r in got] == [r["step"] for r in want]  # one writer, no repeats
    for key, rtol in (("loss", 1e-4), ("val_loss", 1e-3)):
        np.testing.assert_allclose([r[key] for r in got if key in r],
                                   [r[key] for r in want if key in r], rtol=rtol, err_msg=key)
