"""The scatlas command, run in-process and as a console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from scatlas import cli
from scatlas.kernels import pca


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"]["resolved_device"] in ("cpu", "gpu")
    assert "faiss" in info["components"] and info["components"]["anndata"]


def test_every_subcommand_has_help():
    for cmd in ("info", "pca", "cca", "synthetic", "integrate"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([cmd, "--help"])
        assert exit_info.value.code == 0


def test_pca_round_trip(tmp_path, mesc):
    src = tmp_path / "in.h5ad"
    mesc.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    assert cli.main(["pca", str(src), str(out), "--normalize", "--n-comps", "10",
                     "--method", "gram"]) == 0
    res = ad.read_h5ad(out)
    assert res.obsm["X_pca"].shape == (mesc.n_obs, 10)
    # equals the kernel on the same log-normalised matrix
    X = mesc.X.astype(np.float64)
    X = X / X.sum(1, keepdims=True) * 1e4 if isinstance(X, np.ndarray) else X
    ref = pca(res.X, 10, method="gram")
    np.testing.assert_allclose(np.abs(res.obsm["X_pca"]), np.abs(ref.scores), rtol=1e-4,
                               atol=1e-3)


def test_cca_cli_and_clear_errors(tmp_path, mesc, capsys):
    src = tmp_path / "in.h5ad"
    mesc.write_h5ad(src)
    out = tmp_path / "cca.h5ad"
    assert cli.main(["cca", str(src), str(out), "--normalize", "--scale", "--k", "5"]) == 0
    res = ad.read_h5ad(out)
    assert res.obsm["X_cca"].shape == (mesc.n_obs, 5)
    np.testing.assert_allclose(np.linalg.norm(res.obsm["X_cca"], axis=1), 1, rtol=1e-5)
    code = cli.main(["cca", str(src), str(out), "--batch-key", "donor"])
    assert code == 2
    assert "donor" in capsys.readouterr().err
    assert cli.main(["pca", str(tmp_path / "missing.h5ad"), str(out)]) == 2


@pytest.mark.skipif(shutil.which("scatlas") is None and not (
    __import__("pathlib").Path(sys.executable).parent / "scatlas").exists(),
    reason="console script not installed")
def test_console_script():
    from pathlib import Path

    exe = shutil.which("scatlas") or str(Path(sys.executable).parent / "scatlas")
    run = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "device:" in run.stdout


def _truncated_copy(mesc, tmp_path):
    whole = tmp_path / "whole.h5ad"
    mesc.write_h5ad(whole)
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(whole.read_bytes()[:50_000])
    return cut


@pytest.mark.parametrize("command", [
    ["pca", "{cut}", "{out}"],
    ["integrate", "{cut}", "{out}", "--method", "mnn"],
    ["train", "metric", "{cut}", "--out", "{out}", "--label-key", "cell_type"],
])
def test_truncated_input_is_a_one_line_error_naming_the_file(tmp_path, mesc, capsys, command):
    cut = _truncated_copy(mesc, tmp_path)
    argv = [a.format(cut=cut, out=tmp_path / "out") for a in command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cut.h5ad" in err and "truncated" in err and "Traceback" not in err


def test_normalize_on_scaled_data_names_the_flags(tmp_path, mesc, capsys):
    scaled = mesc.copy()
    X = np.log1p(np.asarray(scaled.X.todense() if hasattr(scaled.X, "todense") else scaled.X,
                            dtype=np.float32))
    scaled.X = (X - X.mean(0)) / (X.std(0) + 1e-6)  # z-scored, as scanpy's pp.scale leaves it
    src = tmp_path / "scaled.h5ad"
    scaled.write_h5ad(src)
    assert cli.main(["pca", str(src), str(tmp_path / "o.h5ad"), "--normalize"]) == 2
    err = capsys.readouterr().err
    assert "--normalize" in err and "--layer" in err and "negative" in err
    # --layer is honoured by --normalize too (it used to normalise X whatever the layer)
    scaled.layers["counts"] = mesc.X.copy()
    scaled.write_h5ad(src)
    assert cli.main(["pca", str(src), str(tmp_path / "o.h5ad"), "--normalize", "--layer",
                     "counts", "--n-comps", "5", "--no-progress"]) == 0


def test_cli_warnings_are_one_line_without_source(tmp_path, mesc):
    from pathlib import Path

    exe = shutil.which("scatlas") or str(Path(sys.executable).parent / "scatlas")
    if not Path(exe).exists():
        pytest.skip("console script not installed")
    src = tmp_path / "in.h5ad"
    mesc.write_h5ad(src)  # 1,047 genes: asking for 5,000 variable genes warns
    run = subprocess.run([exe, "pca", str(src), str(tmp_path / "o.h5ad"), "--normalize",
                          "--n-top-genes", "5000", "--n-comps", "5", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    warned = [line for line in run.stderr.splitlines() if "--n-top-genes 5000" in line]
    assert warned and warned[0].startswith("scatlas pca: warning: "), run.stderr
    assert ".py:" not in run.stderr, run.stderr


def test_synthetic_skip_writes_the_next_cells_of_the_same_atlas(tmp_path):
    whole, rest = tmp_path / "whole.h5ad", tmp_path / "rest.h5ad"
    assert cli.main(["synthetic", str(whole), "--n-cells", "300", "--n-genes", "50"]) == 0
    assert cli.main(["synthetic", str(rest), "--n-cells", "100", "--n-genes", "50",
                     "--skip", "250"]) == 0
    a, b = ad.read_h5ad(whole), ad.read_h5ad(rest)
    assert b.n_obs == 100 and list(b.obs_names[:50]) == list(a.obs_names[250:])
    np.testing.assert_array_equal(b.X[:50].toarray(), a.X[250:].toarray())
