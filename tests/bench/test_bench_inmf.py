"""Mechanics of the ``inmf`` and ``online_inmf`` benchmarks at tiny sizes (no timing asserts).

The peers (pyplanc, pyliger) live in their own virtual environments (``bench/peers/install.sh``);
without them they are recorded as skipped, and the test that drives a real peer is skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import inmf as bench_inmf  # noqa: E402
from bench import runner  # noqa: E402

TINY = {"n_genes": 120, "n_iter": 5, "k": 4}


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SCATLAS_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_missing_peer_python_is_a_recorded_skip(monkeypatch, cache):
    monkeypatch.setenv("SCATLAS_PEER_PYTHON_PYPLANC", str(cache / "no" / "python"))
    monkeypatch.setenv("SCATLAS_PEER_PYTHON_PYLIGER", str(cache / "no" / "python"))
    assert bench_inmf.peer_python("pyplanc") is None
    rec = runner.run_benchmark("inmf", "600", repeats=1, warmup=0, device="cpu", out=cache,
                               report=False, **TINY)
    res = rec["results"]["600"]["methods"]
    for name in ("pyplanc.bppinmf", "pyliger.optimize_ALS"):
        assert res[name]["status"] == "skipped"
        assert "peer python not found" in res[name]["reason"]
        assert "install.sh" in res[name]["reason"]
    for name in ("scatlas.inmf[bpp]", "scatlas.inmf[hals]", "scatlas.inmf[bpp,f64]"):
        acc = res[name]["accuracy"]
        assert res[name]["status"] == "ok" and acc["n_iter"] == 5
        assert acc["s_per_iter"] == pytest.approx(acc["solver_s"] / 5)
    f32, f64 = (res[n]["accuracy"]["objective"] for n in ("scatlas.inmf[bpp]",
                                                          "scatlas.inmf[bpp,f64]"))
    assert f32 == pytest.approx(f64, rel=1e-5)
    info = rec["results"]["600"]["workload"]
    assert info["shape"][1] == info["n_genes_used"] <= 120 and len(info["cells_per_batch"]) == 2
    saved = json.loads((cache / "inmf_cpu.json").read_text())
    assert saved["results"]["600"]["methods"]["pyplanc.bppinmf"]["status"] == "skipped"


def test_pyliger_size_limit_is_recorded(monkeypatch):
    methods = {m.name: m for m in bench_inmf.methods({**bench_inmf.DEFAULT_PARAMS,
                                                      "pyliger_max_size": 500})}
    msg = methods["pyliger.optimize_ALS"].skip_message(600)
    if bench_inmf.peer_python("pyliger") is not None:
        assert "slower than pyplanc" in msg
    else:
        assert "peer python not found" in msg


@pytest.mark.skipif(bench_inmf.peer_python("pyplanc") is None,
                    reason="pyplanc peer venv missing (bench/peers/install.sh pyplanc)")
def test_pyplanc_peer_reaches_our_float64_objective(cache):
    """Same init, exact BPP blocks: libplanc and our float64 BPP agree to rounding."""
    rec = runner.run_benchmark("inmf", "600", repeats=1, warmup=1, device="cpu", out=cache,
                               methods=["pyplanc.bppinmf", "scatlas.inmf*f64*"],
                               report=False, peer_ncores=1, **TINY)
    res = rec["results"]["600"]["methods"]
    assert res["pyplanc.bppinmf"]["status"] == "ok", res["pyplanc.bppinmf"]
    theirs = res["pyplanc.bppinmf"]["accuracy"]["objective"]
    ours = res["scatlas.inmf[bpp,f64]"]["accuracy"]["objective"]
    assert theirs == pytest.approx(ours, rel=1e-8)


def test_online_benchmark_worker_reports_memory(cache):
    rec = runner.run_benchmark("online_inmf", "3000", repeats=1, warmup=0, device="cpu",
                               out=cache, report=False, n_genes=200, k=4, minibatch_size=1000,
                               max_epochs=2, sample=1000)
    res = rec["results"]["3000"]["methods"]["scatlas.online_inmf"]
    assert res["status"] == "ok", res
    acc = res["accuracy"]
    assert 0 < acc["peak_rss_gib"] < 4 and acc["fit_s"] > 0 and acc["n_iter"] >= 1
    assert 0 <= acc["label_transfer"] <= 1 and 0 <= acc["batch_mixing"] <= 1
    assert Path(rec["results"]["3000"]["workload"]["path"]).is_file()
