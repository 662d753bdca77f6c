"""bench/gpu/run.sh in a scratch tree (stub benchmarks, stub test files): shared by
tests/bench/test_gpu_runbook.py and tests/bench/test_bench_search.py."""


from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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


def make_tree(tmp_path):
    """The scratch tree bench/gpu/run.sh runs in: the script, stub benchmarks and test files."""
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


