"""bench/gpu/run.sh, the lent GPU machine's one-call runbook, on the CPU with stand-ins.

The script runs in a scratch tree: its own copy, stub benchmark modules (``bench``, whose
result files say ok or error as the test asks), and small test files (one passes, one aborts the
interpreter like a sticky CUDA fault, one hangs). Checked: a failing test file or benchmark
fails its step but not the steps after it, a missing capability skips only the steps that need
it, the time budget leaves steps out instead of overrunning, at most 8 files land in $OUT, and
the exit status says what happened.
"""

from __future__ import annotations

import pytest

from tests.helpers.gpu_runbook import make_tree, run


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path)


def _status(summary: dict) -> dict[str, str]:
    return {s["step"]: s["status"] for s in summary["steps"]}


def test_failures_are_isolated_and_named(tree):
    rc, summary, log, files = run(tree, STUB_FAIL="cca")
    assert rc == 1
    files_status = {t["file"]: t["status"] for t in summary["test_files"]}
    # the aborting file and the hanging one fail alone; the passing one passes
    assert files_status == {"test_crash": "FAILED", "test_hang": "FAILED (timeout)",
                            "test_ok": "ok"}
    assert _status(summary) == {"tests": "FAILED", "kernels": "FAILED", "metric": "ok",
                                "mvae": "ok", "search": "ok"}
    assert "FAILED size=10 ours.cca: RuntimeError: boom" in log
    assert "FAILED steps: tests kernels" in log
    assert len(files) <= 8 and "kernels_cpu.tar.gz" in files and "device.txt" in files


def test_missing_capability_skips_only_its_steps(tree):
    rc, summary, log, _ = run(tree, "kernels", "metric", "search", DISABLE="faiss jax_gpu")
    assert rc == 0
    assert _status(summary) == {"kernels": "ok", "metric": "skipped", "search": "skipped"}
    notes = {s["step"]: s["note"] for s in summary["steps"]}
    assert notes["metric"] == "needs jax_gpu" and notes["search"] == "needs faiss"


def test_budget_leaves_steps_out_instead_of_overrunning(tree):
    """With less time left than a step's minimum (45-60 s), no step starts: the call ends
    with its summary instead of being cut off by the tool's timeout mid-step."""
    rc, summary, log, _ = run(tree, "kernels", "metric", "mvae", BUDGET_S="40")
    assert rc == 3 and "NO STEP RAN" in log
    assert set(_status(summary).values()) == {"not run (budget)"}


def test_nothing_can_run(tree):
    rc, summary, _, _ = run(tree, "metric", DISABLE="jax_gpu")
    assert rc == 3 and _status(summary) == {"metric": "skipped"}
