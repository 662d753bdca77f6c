"""The README's quickstart runs as written (Python and CLI)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np

from scatlas import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    text = README.read_text()
    quick = text[text.index("## Quickstart"):text.index("## Python API")]
    return re.findall(rf"```{lang}\n(.*?)```", quick, flags=re.S)


def test_quickstart_python_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in _blocks("python"):
        exec(compile(code, "README quickstart", "exec"), namespace)  # noqa: S102
    adata = namespace["adata"]
    assert adata.obsm["X_pca"].shape == (20_000, 50)
    assert np.isfinite(adata.obsm["X_cca"]).all()
    raw = namespace["raw"]
    assert raw.obsm["X_mnn"].shape[0] == raw.n_obs and np.isfinite(raw.obsm["X_mnn"]).all()
    # the embedding carries the generating cell types: nearest neighbours share them
    Z = adata.obsm["X_pca"][:2000, :20]
    d = ((Z[:, None, :] - Z[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    labels = adata.obs["cell_type"].to_numpy()[:2000]
    assert (labels[d.argmin(1)] == labels).mean() > 0.8
    # the encoder + index annotate the query's cell types
    hits, query = namespace["hits"], namespace["query"]
    truth = query.obs["cell_type"].astype(str).to_numpy()
    seen = truth != "type7"  # type7 is kept out of the atlas: it cannot be labelled right
    assert (hits["label"].to_numpy()[seen] == truth[seen]).mean() > 0.8
    # the calibrated flag marks the unseen type far more often than the others
    flagged = hits["is_ood"].to_numpy()
    assert flagged[~seen].mean() > 5 * max(flagged[seen].mean(), 0.01), flagged[~seen].mean()
    assert namespace["cal"].n_scored == int(seen.sum())
    assert (tmp_path / "reliability.png").stat().st_size > 5_000
    assert (tmp_path / "atlas.index").is_dir() and (tmp_path / "encoder").is_dir()


def test_quickstart_cli_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = [ln.split("#")[0].strip() for block in _blocks("bash") for ln in block.splitlines()]
    for line in filter(None, lines):
        argv = shlex.split(line)
        assert argv[0] == "scatlas"
        if argv[1] == "serve":  # a server runs until stopped: check that the command parses
            assert cli.build_parser().parse_args(argv[1:]).func is not None
            continue
        assert cli.main(argv[1:]) == 0, line
    assert (tmp_path / "report" / "metrics.json").exists()
    for out in ("atlas_pca.h5ad", "atlas_cca.h5ad", "atlas_inmf.h5ad", "atlas_mnn.h5ad",
                "atlas_emb.h5ad", "q.h5ad", "annotate_report/calibration.json",
                "annotate_report/reliability.png"):
        assert (tmp_path / out).exists(), out
