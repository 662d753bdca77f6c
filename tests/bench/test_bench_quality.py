"""The held-out quality driver (`python -m bench.quality`) on stand-in sections, and the real
datasets' loaders (skipped without ../shared/data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.quality import __main__ as quality  # noqa: E402
from bench.quality import data, report  # noqa: E402


def _rows(values, method="ours.a", role="ours", dataset="d1"):
    return [{"dataset": dataset, "split": str(i), "method": method, "role": role,
             "seconds": 1.0, "error": None, "score": v} for i, v in enumerate(values)]


def _good(quick=False):
    rows = _rows([0.5, 0.7, 0.9]) + _rows([0.4, 0.4], method="pca", role="baseline")
    checks = [{"dataset": "d1", "check": "ours above pca", "value": 0.7, "target": 0.4,
               "passed": True}]
    return {"rows": rows, "checks": checks}


def _one_failed(quick=False):
    rows = _rows([0.5]) + [{"dataset": "d1", "split": "0", "method": "peer", "role": "peer",
                            "seconds": None, "error": "ValueError: no"}]
    return {"rows": rows, "checks": [{"dataset": "d1", "check": "c", "value": 0.1,
                                      "target": 0.2, "passed": False}]}


def _crash(quick=False):
    raise RuntimeError("section exploded")


def test_pooled_mean_and_sd_match_numpy():
    vals = [0.5, 0.7, 0.9]
    entries = report.pooled(_rows(vals) + _rows([0.4], method="pca", role="baseline"),
                            ["score"])
    assert [e["method"] for e in entries] == ["ours.a", "pca"]  # ours before baselines
    mean, sd, n = entries[0]["score"]
    assert n == 3
    np.testing.assert_allclose([mean, sd], [np.mean(vals), np.std(vals, ddof=1)], rtol=1e-12)
    assert entries[1]["score"] == (0.4, 0.0, 1)


def test_failed_runs_are_counted_not_averaged():
    rows = _rows([0.5, 0.9]) + [dict(_rows([123.0])[0], error="boom")]
    (entry,) = report.pooled(rows, ["score"])
    assert entry["runs"] == 3 and entry["failed"] == 1 and entry["errors"] == ["boom"]
    assert entry["score"][0] == pytest.approx(0.7)
    assert "(1 failed)" in report.section_table("x", rows)


def test_skipped_runs_are_listed_not_failed(tmp_path, monkeypatch):
    def section(quick=False):
        rows = _rows([0.5]) + [dict(_rows([0.0], method="peer", role="peer")[0], score=None,
                                    skipped="needs more cells")]
        return {"rows": rows, "checks": []}

    monkeypatch.setattr(quality, "_load_section", lambda name: section)
    assert quality.main(["--sections", "encoder", "--out", str(tmp_path), "--no-readme"]) == 0
    md = (tmp_path / "quality_cpu.md").read_text()
    assert "| d1 | peer | skipped |" in md and "peer: needs more cells" in md


def test_run_section_records_a_crash_and_stamps_rows():
    entry = quality.run_section("encoder", False, loader=lambda name: _crash)
    assert entry["error"] == "RuntimeError: section exploded" and entry["rows"] == []
    entry = quality.run_section("encoder", True, loader=lambda name: _good)
    assert {r["section"] for r in entry["rows"]} == {"encoder"} and entry["quick"]
    assert entry["checks"][0]["section"] == "encoder"


def test_replace_block_is_idempotent_and_keeps_the_rest():
    text = "# title\n\nintro\n"
    once = report.replace_block(text, "table one")
    assert once.startswith(text.rstrip("\n")) and "table one" in once
    twice = report.replace_block(once + "tail\n", "table two")
    assert "table one" not in twice and "table two" in twice and twice.endswith("tail\n")
    assert twice.count(report.START_MARKER) == 1


@pytest.mark.parametrize(("section", "status"), [(_good, 0), (_one_failed, 1), (_crash, 1)])
def test_main_writes_outputs_and_exit_status(tmp_path, monkeypatch, section, status):
    monkeypatch.setattr(quality, "_load_section", lambda name: section)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    code = quality.main(["--sections", "encoder", "--out", str(tmp_path),
                         "--readme", str(readme)])
    assert code == status
    record = json.loads((tmp_path / "quality_cpu.json").read_text())
    assert list(record["sections"]) == ["encoder"]
    assert (tmp_path / "quality_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "quality_cpu.md").read_text()
    assert "encoder" in md and report.START_MARKER in readme.read_text()
    if section is _one_failed:
        assert "**no**" in md and "ValueError: no" in md
        assert quality.main(["--report-only", "--out", str(tmp_path), "--no-readme",
                             "--strict"]) == 1


def test_rerunning_one_section_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "_load_section", lambda name: _good)
    args = ["--out", str(tmp_path), "--no-readme"]
    assert quality.main(["--sections", "vae,encoder", *args]) == 0
    monkeypatch.setattr(quality, "_load_section", lambda name: _one_failed)
    assert quality.main(["--sections", "encoder", *args]) == 1
    record = json.loads((tmp_path / "quality_cpu.json").read_text())
    assert list(record["sections"]) == ["encoder", "vae"]  # declared order
    assert len(record["sections"]["vae"]["rows"]) == 5  # kept from the first run
    monkeypatch.setattr(quality, "_load_section", lambda name: _good)
    assert quality.main(["--sections", "vae", "--strict", *args]) == 0  # encoder not judged
    assert quality.main(["--report-only", "--strict", *args]) == 1  # everything judged


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        quality.main(["--sections", "nope", "--out", str(tmp_path)])


@pytest.mark.skipif(not data.DATA_DIR.exists(), reason="../shared/data is absent")
@pytest.mark.parametrize("name", list(data.DATASETS))
def test_loaders_give_raw_counts_with_standard_keys(name):
    if not data.available(name):
        pytest.skip(f"{name} is absent")
    adata = data.load(name)
    X = adata.X
    assert X.dtype == np.float32 and X.nnz > 0
    assert np.all(X.data >= 0) and np.all(X.data == np.round(X.data))  # counts
    file, label_key, batch_key = data.DATASETS[name]
    assert ("label" in adata.obs) == (label_key is not None)
    assert ("batch" in adata.obs) == (batch_key is not None)
    if batch_key is not None:
        assert adata.obs["batch"].nunique() >= 2
    if name == "cite":
        assert adata.obsm["protein_counts"].shape == (adata.n_obs, 49)
