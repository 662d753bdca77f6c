"""bench/gpu/run.sh, the lent GPU machine's one-call runbook, on the CPU with stand-ins.

The script runs in a scratch tree: its own copy, stub benchmark modules (``bench``, whose
result files say ok or error as the test asks), and small test files (one passes, one aborts the
interpreter like a sticky CUDA fault, one hangs). Checked: a failing test file or benchmark
fails its step but not the steps after it, a missing capability skips only the steps that need
it, the time budget leaves steps out instead of overrunning, at most 8 files land in $OUT, and
the exit status says what happened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "bench" / "gpu" / "run.sh"

STUB_RESULT = '''
import json, os, sys
from pathlib import Path

def write(name, argv):
    out = Path(argv[argv.index("--out") + 1])
    dev = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    fail = name in os.environ.get("STUB_FAIL", "").split()
    res = {"status": "error", "error": "RuntimeError: boom"} if fail else {"status": "ok"}
    rec = {"latest_run": "r1", "results": {"10": {"methods": {f"ours.{name}": {**res,
                                                                           "run_id": "r1"}}}}}
    (out / f"{name}_{dev}.json").write_text(json.dumps(rec))
'''

STUBS = {
    "bench/__init__.py": "",
    "bench/_stub.py": STUB_RESULT,
    # `python -m bench run NAME ...`: like the harness, an error is recorded, the exit is 0
    "bench/__main__.py": "import sys\nfrom bench._stub import write\n"
                         "write(sys.argv[2], sys.argv[1:])\n",
    "bench/metric.py": "import sys\nfrom bench._stub import write\n"
                       "sys.argv += ['--device', 'cpu']\nwrite('metric', sys.argv)\n",
    "bench/mvae.py": "import sys\nfrom bench._stub import write\nwrite('mvae', sys.argv)\n",
    "bench/search.py": "import sys\nfrom bench._stub import write\nwrite('search', sys.argv)\n",
}

TESTS = {
    "tests/test_ok.py": "import pytest\n\n@pytest.mark.gpu\ndef test_ok():\n    assert True\n",
    "tests/test_crash.py": "import os\nimport pytest\n\n@pytest.mark.gpu\n"
                           "def test_sticky_fault():\n    os.abort()\n",
    "tests/test_hang.py": "import time\nimport pytest\n\n@pytest.mark.gpu\n"
                          "def test_hang():\n    time.sleep(120)\n",
    "tests/test_cpu_only.py": "def test_plain():\n    assert True\n",
}


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "repo"
    (root / "bench" / "gpu").mkdir(parents=True)
    shutil.copy(RUN_SH, root / "bench" / "gpu" / "run.sh")
    shutil.copy(ROOT / "bench" / "runner.py", root / "bench" / "runner_real.py")
    for rel, text in {**STUBS, **TESTS}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    # the real `python -m bench.runner check`, without the harness's other modules
    (root / "bench" / "runner.py").write_text(
        "import json, sys\nfrom pathlib import Path\n"
        "sys.modules.setdefault('bench.environment', type(sys)('e'))\n"
        + _runner_check_source())
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: gpu\n")
    for name in ("anndata", "scanpy", "faiss", "flax", "optax", "jax", "jaxlib", "numba",
                 "sklearn", "zarr", "h5py", "pandas", "scipy"):  # the probes' imports, quick
        (root / name).mkdir()
        (root / name / "__init__.py").write_text("__version__ = 'stub'\n")
    return root


def _runner_check_source() -> str:
    """failed_methods, check_results and main from bench/runner.py, verbatim."""
    import ast

    src = (ROOT / "bench" / "runner.py").read_text()
    keep = {"log", "failed_methods", "check_results", "main"}
    tree = ast.parse(src)
    parts = [ast.get_source_segment(src, node) for node in tree.body
             if isinstance(node, ast.FunctionDef) and node.name in keep]
    header = ("from collections.abc import Mapping, Sequence\nfrom typing import Any\n"
              "import argparse\n")
    return header + "\n\n".join(parts) + "\n\nif __name__ == '__main__':\n    sys.exit(main())\n"


def run(tree: Path, *steps: str, **env: str) -> tuple[int, dict, str, list[str]]:
    out = tree / "out"
    shutil.rmtree(out, ignore_errors=True)
    full = {**os.environ, "STANDIN": "1", "OUT": str(out), "FILE_TIMEOUT_S": "8",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # plugins would import the stubs
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    proc = subprocess.run(["bash", "bench/gpu/run.sh", *steps], cwd=tree, env=full,
                          capture_output=True, text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    return proc.returncode, summary, (out / "run.log").read_text(), sorted(
        p.name for p in out.iterdir())


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
