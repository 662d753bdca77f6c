"""Every CLI error names what the caller can change in the CLI's own terms (issue 16): a flag of
the command that was run, never a Python parameter (``n_components``, ``groups=(a, b)``,
``k_anchor``) the command line does not have."""

from __future__ import annotations

import re

import pytest

from scatlas import cli, datasets


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    path = d / "atlas.h5ad"
    datasets.write_synthetic_h5ad(path, 300, 400, n_batches=3, seed=0)
    return path


CASES = [
    (["pca", "{atlas}", "{out}", "--n-comps", "5000"], "--n-comps"),
    (["pca", "{atlas}", "{out}", "--n-comps", "0"], "--n-comps"),
    (["pca", "{atlas}", "{out}", "--layer", "nope"], "--layer"),
    (["cca", "{atlas}", "{out}"], "--groups"),
    (["cca", "{atlas}", "{out}", "--batch-key", "nope"], "--batch-key"),
    (["cca", "{atlas}", "{out}", "--groups", "batch1", "batch2", "--k", "500"], "--k"),
    (["integrate", "{atlas}", "{out}", "--method", "mnn", "--mnn-k", "0"], "--mnn-k"),
    (["integrate", "{atlas}", "{out}", "--method", "mnn", "--mnn-d", "0"], "--mnn-d"),
    (["integrate", "{atlas}", "{out}", "--method", "inmf", "--k", "0"], "--k"),
    (["integrate", "{atlas}", "{out}", "--method", "cca", "--k-anchor", "0"], "--k-anchor"),
    (["integrate", "{atlas}", "{out}", "--method", "cca", "--n-pcs", "0"], "--n-pcs"),
    (["integrate", "{atlas}", "{out}", "--method", "harmony", "--n-top-genes", "0"],
     "--n-top-genes"),
    (["integrate", "{atlas}", "{out}", "--method", "inmf", "--k", "3", "--lam", "-1"], "--lam"),
    (["integrate", "{atlas}", "{out}", "--method", "inmf", "--k", "3", "--reference", "nope"],
     "--reference"),
    (["integrate", "{atlas}", "{out}", "--batch-key", "nope"], "--batch-key"),
]


@pytest.mark.parametrize(("argv", "flag"), CASES, ids=[" ".join(c[0][:1] + c[0][3:])
                                                         for c in CASES])
def test_error_names_the_flag(atlas, tmp_path, capsys, argv, flag):
    argv = [a.format(atlas=atlas, out=tmp_path / "out.h5ad") for a in argv]
    assert cli.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if ": error: " in x]
    assert line, err
    message = line[-1]
    assert flag in message, message
    # no Python spelling of a parameter: name=value or snake_case names
    assert not re.search(r"\b[a-z]+_[a-z_]+\s*=|\bgroups=", message), message


def test_warnings_name_flags_too(tmp_path):
    """The small-batch adaptation warning of cca (written with Seurat's / the library's names:
    dims, k_score) reaches a CLI user as the flags --n-pcs, --k-score."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("scatlas") or str(Path(sys.executable).parent / "scatlas")
    if not Path(exe).exists():
        pytest.skip("console script not installed")
    src = tmp_path / "small.h5ad"
    datasets.write_synthetic_h5ad(src, 50, 300, n_batches=2, seed=0)  # ~25 cells per batch
    run = subprocess.run([exe, "integrate", str(src), str(tmp_path / "o.h5ad"), "--method",
                          "cca", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    warned = [x for x in run.stderr.splitlines() if "SmallBatchWarning" in x]
    assert warned and "--n-pcs" in warned[0] and "--k-score" in warned[0], run.stderr
    assert "dims=" not in warned[0] and "k_score" not in warned[0]
