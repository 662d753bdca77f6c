"""bench/tour.sh, the CLI tour of issue 16, runs without a failure or a traceback (slow: the
synthetic leg alone takes minutes; the real datasets join when ../shared/data is present)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="the tour's service leg needs curl")
def test_cli_tour_on_synthetic_data(tmp_path):
    env = dict(os.environ, SCATLAS_TOUR_DATA=str(tmp_path / "no-real-data"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run(["bash", str(ROOT / "bench" / "tour.sh"), str(tmp_path / "tour")],
                         capture_output=True, text=True, timeout=3600, env=env)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert "# 0 failure(s)" in run.stdout and "FAIL" not in run.stdout
    for step in ("synthetic.pca", "synthetic.integrate-harmony", "synthetic.train-metric",
                 "synthetic.serve.annotate"):
        assert f"ok    {step}" in run.stdout, run.stdout
