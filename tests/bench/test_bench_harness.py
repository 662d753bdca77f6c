"""The benchmark harness's mechanics on a trivial workload (sorting): no timing asserts."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

import bench  # noqa: E402
from bench import Benchmark, Method, Metric, Workload, report, runner  # noqa: E402
from bench.__main__ import main, parse_params, parse_value  # noqa: E402


def _build(size: int, device: str, params) -> Workload:
    x = np.random.default_rng(params["seed"]).standard_normal(size)
    return Workload(host=x, data=x, info={"summary": f"{size} normal floats"},
                    extra={"ref": np.sort(x)})


def _fail(w: Workload):
    raise RuntimeError("boom")


def _methods(params) -> list[Method]:
    return [
        Method("np.sort", lambda w: np.sort(w.data), role="ours", on_device=True),
        Method("sorted", lambda w: np.asarray(sorted(w.host.tolist()))),
        Method("argsort", lambda w: w.host[np.argsort(w.host)], max_size=50,
               skip_reason="pretend it is slow"),
        Method("broken", _fail),
        Method("other.ours", lambda w: np.sort(w.host, kind="stable"), role="ours",
               group="g2"),
        Method("other.base", lambda w: np.sort(w.host, kind="heapsort"), group="g2"),
    ]


def _accuracy(w: Workload, method: Method, out) -> dict[str, float]:
    return {"max_abs_err": float(np.max(np.abs(out - w.extra["ref"]))), "n": len(out)}


TOY = Benchmark(
    name="toy", description="sorting", build=_build, methods=_methods, accuracy=_accuracy,
    metrics={"max_abs_err": Metric("max abs err", ".1e")}, default_sizes=(10, 100),
    default_params={"seed": 0}, size_label="items",
)


@pytest.fixture
def toy(monkeypatch):
    """Register the toy benchmark under the name ``toy``."""
    module = types.ModuleType("_bench_toy")
    module.BENCHMARK = TOY
    monkeypatch.setitem(sys.modules, "_bench_toy", module)
    monkeypatch.setitem(bench.REGISTRY, "toy", ("_bench_toy", "sorting"))
    return TOY


def test_summarize_median_min_max():
    assert runner.summarize([3.0, 1.0, 2.0]) == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0,
                                                  "repeats": 3}
    assert runner.summarize([4.0, 1.0, 2.0, 3.0])["median_s"] == 2.5
    with pytest.raises(ValueError):
        runner.summarize([])


def test_time_call_counts_warmup_repeats_and_sync():
    calls, syncs = [], []
    times, out = runner.time_call(lambda: calls.append(1) or len(calls), repeats=3, warmup=2,
                                  sync=lambda: syncs.append(1))
    assert len(calls) == 5 and len(times) == 3 and out == 5
    assert len(syncs) == 2 + 2 * 3  # after each warm-up, before and after each timed call
    times, _ = runner.time_call(lambda: None, repeats=5, warmup=0, budget_s=0.0)
    assert len(times) == 1  # budget used up after the first timed call


def test_parse_sizes_and_params():
    assert runner.parse_sizes("1e4,1e3, 2k,1e4") == [1000, 2000, 10000]
    assert runner.parse_sizes([5, "1M"]) == [5, 1_000_000]
    with pytest.raises(ValueError):
        runner.parse_sizes("0.5")
    assert parse_value("1e6") == 1_000_000 and parse_value("0.5") == 0.5
    assert parse_value("none") is None and parse_value("abc") == "abc"
    assert parse_params(["k=30", "method=gram"]) == {"k": 30, "method": "gram"}


def test_run_writes_schema_and_merges_sizes(toy, tmp_path):
    rec = runner.run_benchmark("toy", "10,100", repeats=3, warmup=1, device="cpu",
                               out=tmp_path)
    path = tmp_path / "toy_cpu.json"
    saved = json.loads(path.read_text())
    assert saved["schema_version"] == runner.SCHEMA_VERSION and saved["device"] == "cpu"
    assert list(saved["results"]) == ["10", "100"] == list(rec["results"])
    env = saved["runs"][saved["latest_run"]]
    for key in ("cpu_model", "cpu_cores", "versions", "git", "timestamp", "params"):
        assert key in env
    assert env["params"] == {"seed": 0} and "numpy" in env["versions"]

    small, big = saved["results"]["10"]["methods"], saved["results"]["100"]["methods"]
    ok = small["np.sort"]
    assert ok["status"] == "ok" and len(ok["times_s"]) == 3 and ok["repeats"] == 3
    assert ok["min_s"] <= ok["median_s"] <= ok["max_s"]
    assert ok["accuracy"] == {"max_abs_err": 0.0, "n": 10} and ok["run_id"] == saved["latest_run"]
    assert small["argsort"]["status"] == "ok"
    assert big["argsort"]["status"] == "skipped" and "pretend it is slow" in big["argsort"][
        "reason"]
    assert big["broken"]["status"] == "error" and "boom" in big["broken"]["error"]
    assert (tmp_path / "toy_cpu.md").is_file() and (tmp_path / "toy_cpu.png").is_file()
    assert not list(tmp_path.glob("*.tmp"))

    # a new size is added; re-running one method at an old size replaces only that entry
    old_sorted = saved["results"]["10"]["methods"]["sorted"]
    runner.run_benchmark("toy", "1000", repeats=1, warmup=0, device="cpu", out=tmp_path,
                         report=False)
    runner.run_benchmark("toy", "10", repeats=2, warmup=0, device="cpu", out=tmp_path,
                         methods=["np.*"], report=False)
    merged = json.loads(path.read_text())
    assert list(merged["results"]) == ["10", "100", "1000"]
    assert merged["results"]["10"]["methods"]["np.sort"]["repeats"] == 2
    assert merged["results"]["10"]["methods"]["sorted"] == old_sorted
    assert set(merged["runs"]) == {m["run_id"] for s in merged["results"].values()
                                   for m in s["methods"].values()} | {merged["latest_run"]}


def test_unknown_param_and_method_rejected(toy, tmp_path):
    with pytest.raises(ValueError, match="unknown parameters"):
        runner.run_benchmark("toy", "10", device="cpu", out=tmp_path, bogus=1)
    with pytest.raises(ValueError, match="no method matches"):
        runner.run_benchmark("toy", "10", device="cpu", out=tmp_path, methods=["nope"])


def _record(medians: dict[str, float]) -> dict:
    methods = {name: {"role": "ours" if name == "ours" else "baseline", "group": "main"}
               for name in medians}
    results = {name: {"status": "ok", "median_s": m, "min_s": m, "max_s": m, "repeats": 1,
                      "role": methods[name]["role"], "group": "main", "runs_on": "cpu",
                      "accuracy": {"err": 1e-3}}
               for name, m in medians.items()}
    results["slow"] = {"status": "skipped", "reason": "too big", "role": "baseline",
                       "group": "main"}
    methods["slow"] = {"role": "baseline", "group": "main"}
    return {"schema_version": 1, "benchmark": "demo", "device": "cpu", "size_label": "cells",
            "metrics": {"err": {"label": "rel err", "fmt": ".1e"}}, "methods": methods,
            "runs": {}, "latest_run": None,
            "results": {"1000": {"size": 1000, "methods": results}}}


def test_markdown_table_ratio_and_skips():
    table = report.markdown_table(_record({"ours": 0.5, "base": 2.0}), "main")
    lines = table.splitlines()
    assert lines[0].startswith("| cells | method | median s") and "rel err" in lines[0]
    assert "| 1,000 | **ours** | 0.5 |" in table and "| ours | 1.0e-03 |" in table
    assert "| 1,000 | base | 2 | 2–2 (×1) | 4.00 | 1.0e-03 |" in table
    assert "| 1,000 | slow | skipped |" in table and "too big" in table


def test_write_report_rewrites_readme_block(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "demo_cpu.json").write_text(json.dumps(_record({"ours": 1.0, "base": 3.0})))
    readme = tmp_path / "README.md"
    readme.write_text("# T\n\nbefore\n<!-- bench:start -->\nold\n<!-- bench:end -->\nafter\n")
    text = report.write_report(results, readme)
    new = readme.read_text()
    assert "old" not in new and new.startswith("# T\n\nbefore\n<!-- bench:start -->")
    assert new.rstrip().endswith("<!-- bench:end -->\nafter")
    assert "](results/demo_cpu.png)" in new and "3.00" in new and "3.00" in text
    assert (results / "REPORT.md").is_file() and (results / "demo_cpu.png").is_file()

    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    report.write_report(results, plain)
    assert plain.read_text() == "no markers\n"


def test_cli_list_and_report(tmp_path, capsys):
    assert main(["list"]) == 0
    assert "rsvd" in capsys.readouterr().out
    assert main(["report", "--results", str(tmp_path), "--no-readme"]) == 0
    assert "No benchmark results yet" in (tmp_path / "REPORT.md").read_text()


def test_select_methods_by_exact_name_glob_or_role():
    """Names with brackets select themselves (fnmatch alone would read [csr] as a class)."""
    ms = [Method("a.embed[csr]", lambda w: None, role="ours"), Method("b.embed", lambda w: None),
          Method("b.embed[csr]", lambda w: None)]
    pick = runner.select_methods
    assert [m.name for m in pick(ms, ["a.embed[csr]"])] == ["a.embed[csr]"]
    assert [m.name for m in pick(ms, ["b.*"])] == ["b.embed", "b.embed[csr]"]
    assert [m.name for m in pick(ms, ["ours"])] == ["a.embed[csr]"]
    with pytest.raises(ValueError, match="no method matches"):
        pick(ms, ["nope"])


def test_failed_methods_are_named_and_make_check_exit_1(toy, tmp_path, capsys):
    """A method that raises is recorded and the run goes on, but the run must not pass for a
    success: failed_methods names it, and `python -m bench.runner check` exits 1."""
    import subprocess

    rec = runner.run_benchmark("toy", "10,100", repeats=1, warmup=0, device="cpu",
                               out=tmp_path, report=False)
    failures = runner.failed_methods(rec)
    assert failures == ["size=10 broken: RuntimeError: boom", "size=100 broken: RuntimeError: boom"]
    assert "FAILED 2 method run(s)" in capsys.readouterr().err
    path = tmp_path / "toy_cpu.json"
    assert runner.check_results([path]) == 1
    assert "FAILED size=10 broken" in capsys.readouterr().err
    # a later run of the working methods only: the old failure belongs to an earlier run
    runner.run_benchmark("toy", "10", repeats=1, warmup=0, device="cpu", out=tmp_path,
                         methods=["np.sort", "sorted"], report=False)
    assert runner.check_results([path]) == 0
    assert runner.check_results([tmp_path / "missing_gpu.json"]) == 1  # nothing was written
    # the command line, as bench/gpu/run.sh calls it
    root = Path(runner.__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "bench.runner", "check", str(path),
                           str(tmp_path / "missing_gpu.json")], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "missing_gpu.json" in proc.stderr
    rec = json.loads(path.read_text())
    rec["results"]["10"]["methods"]["sorted"]["accuracy_error"] = "ValueError: bad"
    path.write_text(json.dumps(rec))
    assert runner.failed_methods(rec) == ["size=10 sorted: accuracy: ValueError: bad"]
