"""``scatlas train metric`` and ``scatlas embed`` round trips on a small synthetic atlas."""

from __future__ import annotations

import anndata as ad
import numpy as np

from scatlas import cli, datasets
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
