"""``scatlas train mvae``, ``scatlas embed`` and ``scatlas impute`` on a small synthetic file."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from scatlas import cli
from scatlas.io import read_h5ad, write_h5ad


def test_train_embed_impute_cli(tmp_path, capsys):
    from scatlas.datasets import synthetic

    adata = synthetic(240, 120, n_cell_types=4, n_batches=2, protein=True, n_proteins=12,
                      seed=1, progress=False)
    adata.uns.pop("synthetic", None)
    src = tmp_path / "cite.h5ad"
    write_h5ad(adata, src)
    model_dir = tmp_path / "mvae"
    log = tmp_path / "train.jsonl"
    code = cli.main(["train", "mvae", str(src), "--out", str(model_dir),
                     "--modality", "rna=X", "--modality", "protein=obsm/protein_counts",
                     "--likelihood", "protein=nb_mixture", "--batch-key", "batch",
                     "--n-top-genes", "100", "--max-steps", "30", "--batch-size", "64",
                     "--log", str(log), "--plot", str(tmp_path / "loss.png")])
    assert code == 0
    assert "scatlas train mvae" in capsys.readouterr().out
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["kind"] == "mvae"
    assert manifest["config"]["likelihoods"] == ["nb", "nb_mixture"]
    assert manifest["config"]["n_features"] == [100, 12]
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert sum(1 for _ in open(log)) >= 3

    rna_only = adata.copy()
    del rna_only.obsm["protein_counts"]
    q = tmp_path / "rna_only.h5ad"
    write_h5ad(rna_only, q)
    out = tmp_path / "embedded.h5ad"
    assert cli.main(["embed", "--model", str(model_dir), str(q), str(out)]) == 0
    emb = read_h5ad(out)
    from scatlas.models import load

    model = load(model_dir)
    np.testing.assert_allclose(emb.obsm["X_scatlas"], model.embed(adata, ["rna"]), rtol=1e-5,
                               atol=1e-6)
    out2 = tmp_path / "imputed.h5ad"
    assert cli.main(["impute", "--model", str(model_dir), str(q), str(out2),
                     "--target", "protein", "--source", "rna"]) == 0
    imp = read_h5ad(out2).obsm["protein_imputed"]
    assert isinstance(imp, pd.DataFrame) and list(imp.columns) == list(
        adata.obsm["protein_counts"].columns)
    np.testing.assert_allclose(imp.to_numpy(), model.impute(adata, ["rna"], "protein"),
                               rtol=1e-4)
    from scatlas import tl

    direct = rna_only.copy()  # tl.impute, what the command runs, on the same cells
    assert tl.impute(direct, model_dir, "protein", ["rna"], key_added="p") is None
    np.testing.assert_allclose(direct.obsm["p"].to_numpy(), imp.to_numpy(), rtol=1e-6)
    assert direct.uns["p"]["target"] == "protein" and direct.uns["p"]["source"] == ["rna"]
    assert cli.main(["impute", "--model", str(model_dir), str(q), str(out2), "--target",
                     "protein", "--source", "rna", "--scale", "log1p", "--n-samples", "3"]) == 0
    expect = model.impute(adata, ["rna"], "protein", scale="log1p", n_samples=3)
    np.testing.assert_allclose(read_h5ad(out2).obsm["protein_imputed"].to_numpy(), expect,
                               rtol=1e-4, atol=1e-6)
    # bad input: a clear error and exit code 2
    assert cli.main(["embed", "--model", str(model_dir), str(q), str(out),
                     "--modalities", "protein"]) == 2
    assert "protein" in capsys.readouterr().err
    assert cli.main(["embed", "--model", str(model_dir), str(q), str(out),
                     "--precision", "bfloat16"]) == 2
    assert "metric models" in capsys.readouterr().err
    assert cli.main(["impute", "--model", str(model_dir), str(q), str(out2),
                     "--target", "atac"]) == 2


def test_train_mvae_cli_defaults_follow_the_library(tmp_path, monkeypatch):
    """Unset CLI options reach tl.train_mvae as its own defaults (no CLI copy of them)."""
    import inspect

    from scatlas import tl
    from scatlas.datasets import synthetic

    adata = synthetic(60, 30, n_batches=1, protein=True, n_proteins=4, seed=0, progress=False)
    adata.uns.pop("synthetic", None)
    src = tmp_path / "cite.h5ad"
    write_h5ad(adata, src)
    seen: list[dict] = []

    class Stop(Exception):
        pass

    def fake(*args, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(tl, "train_mvae", fake)
    base = ["train", "mvae", str(src), "--out", str(tmp_path / "m")]
    for extra in ([], ["--n-top-genes", "0", "--batch-size", "32",
                       "--validation-fraction", "0.2"]):
        try:
            cli.main(base + extra)
        except Stop:
            pass
    defaults, explicit = seen
    params = inspect.signature(tl._mvae.train_mvae).parameters
    for name in ("n_top_genes", "batch_size", "validation_fraction"):
        assert name not in defaults  # so the library's default applies
        assert params[name].default is not inspect.Parameter.empty
    assert explicit["n_top_genes"] is None  # 0 keeps every feature
    assert explicit["batch_size"] == 32 and explicit["validation_fraction"] == 0.2
