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
    assert "lower --lr" in err and "learning_rate" not in err  # the flag, not the argument
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


@pytest.mark.slow  # 13-30 s: opt in with -m slow (default suite under 10 min)
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


# ------------------------------------------------------------ issue 16: inputs, errors, progress

#: Python argument forms (``name=value``) that a command-line user cannot type
PYTHON_ARGS = __import__("re").compile(r"\b[a-z][a-z0-9_]*=(None|True|False|'|\"|\d|$|\s)")
TINY_ARGS = ["--max-steps", "6", "--batch-size", "64", "--hidden", "16", "--latent-dim", "4",
             "--n-top-genes", "0"]


def _lognorm_files(tmp_path):
    """An atlas whose X is z-scored (as scanpy's processed files), with the log-normalised
    values in ``layers['lognorm']`` and in ``.raw``; a query with them in X only."""
    a = datasets.synthetic(300, 40, n_batches=2, seed=0)
    counts = a.X.toarray()
    lognormed = np.log1p(1e4 * counts / np.maximum(counts.sum(1, keepdims=True), 1)).astype(
        np.float32)
    atlas = ad.AnnData((lognormed - lognormed.mean(0)) / (lognormed.std(0) + 1e-6),
                       obs=a.obs.copy(), var=a.var.copy())
    atlas.layers["lognorm"] = lognormed
    atlas.raw = ad.AnnData(lognormed.copy(), var=a.var.copy())
    atlas.write_h5ad(tmp_path / "atlas.h5ad")
    ad.AnnData(lognormed.copy(), obs=a.obs.copy(), var=a.var.copy()).write_h5ad(
        tmp_path / "query.h5ad")
    return tmp_path / "atlas.h5ad", tmp_path / "query.h5ad"


def test_a_lognorm_model_goes_end_to_end(tmp_path, capsys):
    """``--input-kind lognorm`` (and ``--layer`` / ``--use-raw``) is recorded in the model: embed
    needs no flag; the scaled X is refused with advice in flags."""
    atlas, query = _lognorm_files(tmp_path)
    for where, flags in (("layer", ["--layer", "lognorm"]), ("raw", ["--use-raw"])):
        model_dir = tmp_path / f"model_{where}"
        rc = cli.main(["train", "metric", str(atlas), "--out", str(model_dir), "--label-key",
                       "cell_type", "--input-kind", "lognorm", *flags, *TINY_ARGS])
        assert rc == 0, capsys.readouterr().err
        model = load(model_dir)
        assert model.input_kind == "lognorm"
        out = tmp_path / f"embedded_{where}.h5ad"
        for data in (atlas, query):  # the atlas: from the recorded layer / .raw; query: X
            assert cli.main(["embed", "--model", str(model_dir), str(data), str(out)]) == 0
            err = capsys.readouterr().err
            assert "warning" not in err, err
            np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_scatlas"],
                                       model.embed(ad.read_h5ad(query)), rtol=1e-5, atol=1e-6)
    # the z-scored X: refused at training and at embedding, the advice in flags
    rc = cli.main(["train", "metric", str(atlas), "--out", str(tmp_path / "bad"), "--label-key",
                   "cell_type", "--input-kind", "lognorm", *TINY_ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and "negative value" in err and "scaled or z-scored" in err
    assert "--layer" in err and "--use-raw" in err and "--input-kind" in err
    assert not PYTHON_ARGS.search(err), err
    rc = cli.main(["embed", "--model", str(tmp_path / "model_layer"), "--layer", "X",
                   str(atlas), str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "scaled or z-scored" in err and not PYTHON_ARGS.search(err), err
    # another kind than the model's is honoured, with a warning
    with pytest.warns(UserWarning, match="trained on log-normalised"):
        rc = cli.main(["embed", "--model", str(tmp_path / "model_layer"), "--input-kind",
                       "counts", str(query), str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "non-integer" in err and "--input-kind lognorm" in err


def test_errors_name_flags(tmp_path, capsys):
    """Library errors reach the command line with flags, not Python argument names."""
    data = tmp_path / "atlas.h5ad"
    datasets.write_synthetic_h5ad(data, 300, 40, n_batches=2, seed=0)
    model_dir = tmp_path / "m"
    assert cli.main(["train", "metric", str(data), "--out", str(model_dir), "--label-key",
                     "cell_type", *TINY_ARGS]) == 0
    capsys.readouterr()
    small = tmp_path / "small.h5ad"
    ad.read_h5ad(data)[:, :5].copy().write_h5ad(small)
    train = ["train", "metric", str(data), "--out", str(tmp_path / "x"), "--label-key",
             "cell_type", "--max-steps", "6"]
    embed = ["embed", "--model", str(model_dir)]
    cases = [
        (train + ["--batch-size", "0"], "--batch-size must be >= 1"),
        (train + ["--validation-fraction", "1.5"], "--validation-fraction must be in [0, 1)"),
        (train + ["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (train + ["--lr", "-1"], "--lr must be > 0"),
        (train + ["--latent-dim", "0"], "--latent-dim must be >= 1"),
        (train + ["--n-top-genes", "-3"], "--n-top-genes must be >= 1"),
        (train + ["--layer", "nope"], "--layer 'nope' not in adata.layers"),
        (train + ["--use-raw"], "--use-raw but adata.raw is empty"),
        (["train", "metric", str(data), "--out", str(tmp_path / "x"), "--label-key", "nope"],
         "--label-key 'nope' is not a column"),
        (train + ["--study-key", "nope"], "--study-key 'nope' is not a column"),
        (train + ["--input-kind", "lognorm", "--layer", "nope"], "--layer 'nope'"),
        (embed + [str(small), str(tmp_path / "o.h5ad")], "below --min-overlap 0.5; lower "
                                                          "--min-overlap"),
        (embed + ["--batch-size", "0", str(data), str(tmp_path / "o.h5ad")],
         "--batch-size must be >= 1"),
        (embed + ["--use-raw", str(data), str(tmp_path / "o.h5ad")], "--use-raw but"),
    ]
    for argv, expect in cases:
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert expect in err, (argv, err)
        assert not PYTHON_ARGS.search(err), (argv, err)


def test_progress_follows_the_terminal(tmp_path, capsys, monkeypatch):
    """``--progress/--no-progress`` on the model commands; by default a bar when stderr is a
    terminal (as ``scatlas pca``)."""
    import sys

    monkeypatch.delenv("SCATLAS_PROGRESS", raising=False)
    data = tmp_path / "atlas.h5ad"
    datasets.write_synthetic_h5ad(data, 300, 40, n_batches=2, seed=0)
    model_dir = tmp_path / "m"
    train = ["train", "metric", str(data), "--out", str(model_dir), "--label-key", "cell_type",
             *TINY_ARGS]
    embed = ["embed", "--model", str(model_dir), str(data), str(tmp_path / "e.h5ad")]
    for flag, tty, shown in ((None, True, True), ("--no-progress", True, False),
                             ("--progress", False, True), (None, False, False)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        extra = [] if flag is None else [flag]
        if tty:  # training runs the same bar code: two cases suffice
            assert cli.main(train + extra) == 0
            err = capsys.readouterr().err
            assert ("training:" in err) == shown, (flag, tty, err)
        assert cli.main(embed[:3] + extra + embed[3:]) == 0
        err = capsys.readouterr().err
        assert ("embedding:" in err) == shown, (flag, tty, err)
    for argv in (["train", "mvae", "x.h5ad", "--out", "m"], ["impute", "--model", "m", "x",
                                                             "y", "--target", "protein"]):
        for flag, want in (([], None), (["--progress"], True), (["--no-progress"], False)):
            assert cli.build_parser().parse_args(argv + flag).progress is want


def test_loss_plot_has_a_panel_per_term(tmp_path):
    """``--plot``: the total and each loss term of the log on its own panel (SCimilarity's
    preset: triplet at weight 0.001 beside MSE at 0.999)."""
    from scatlas.models.train import history_panels, read_log

    data = tmp_path / "atlas.h5ad"
    datasets.write_synthetic_h5ad(data, 300, 40, n_batches=2, seed=0)
    assert cli.main(["train", "metric", str(data), "--out", str(tmp_path / "m"), "--label-key",
                     "cell_type", "--preset", "scimilarity", "--max-steps", "20",
                     "--batch-size", "64", "--hidden", "16", "--latent-dim", "4",
                     "--eval-every", "10", "--plot", str(tmp_path / "loss.png")]) == 0
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    log = read_log(tmp_path / "m.train.jsonl")
    panels = {p.key: p for p in history_panels(log, load(tmp_path / "m").loss_terms)}
    assert list(panels) == ["loss", "triplet", "mse", "l1"]
    assert panels["triplet"].title == "triplet (weight 0.001)"
    assert panels["triplet"].train == [(r["step"], r["triplet"]) for r in log if "triplet" in r]
    assert panels["triplet"].val == [(r["step"], r["val_triplet"]) for r in log
                                     if "val_triplet" in r] and panels["triplet"].val
    assert panels["l1"].val == []  # left out of the validation loss: 0 there


def test_train_schedule_options_reach_the_run(tmp_path, capsys):
    """--schedule/--warmup-steps/--clip-norm/--checkpoint-every become tl's ``train=``: the
    saved run records them and the logged learning rate follows the constant schedule."""
    data = tmp_path / "atlas.h5ad"
    datasets.write_synthetic_h5ad(data, 200, 30, n_batches=2, seed=0)
    model_dir, ck = tmp_path / "model", tmp_path / "ck"
    rc = cli.main(["train", "metric", str(data), "--out", str(model_dir), "--label-key",
                   "cell_type", "--max-steps", "8", "--batch-size", "50", "--hidden", "16",
                   "--latent-dim", "4", "--lr", "0.001", "--schedule", "constant",
                   "--warmup-steps", "2", "--clip-norm", "none", "--checkpoint-every", "4",
                   "--checkpoint-dir", str(ck)])
    assert rc == 0
    train = load(model_dir).info["train"]
    assert (train["schedule"], train["warmup_steps"], train["clip_norm"],
            train["checkpoint_every"]) == ("constant", 2, None, 4)
    assert {4, 8} <= {int(p.name) for p in ck.iterdir() if p.name.isdigit()}
    rc = cli.main(["train", "metric", str(data), "--out", str(tmp_path / "m2"), "--label-key",
                   "cell_type", "--max-steps", "2", "--clip-norm", "big"])
    assert rc == 2 and "--clip-norm" in capsys.readouterr().err
