"""Facts about the machine and software a benchmark ran on, and access to scatlas's backend.

:func:`get_backend` returns ``scatlas.backend``. If the ``scatlas`` package itself fails to
import (a sibling subpackage broken mid-development, say), the backend module is loaded straight
from its file, which needs only NumPy/SciPy, so the harness keeps working.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib
import importlib.metadata as _metadata
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

#: distribution name -> importable module (for the fallback when no metadata is installed)
VERSIONED = {
    "numpy": "numpy",
    "scipy": "scipy",
    "scikit-learn": "sklearn",
    "scanpy": "scanpy",
    "anndata": "anndata",
    "matplotlib": "matplotlib",
    "scatlas": "scatlas",
    "cupy": "cupy",
}

#: what counts as code for the ``dirty`` flag (changes there, tracked or not, make a run dirty)
CODE_PATHS = ("scatlas", "bench", "pyproject.toml")
NOT_CODE = ("bench/results/", "bench/.cache/")

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "SCATLAS_DEVICE")


@functools.lru_cache(maxsize=1)
def get_backend() -> ModuleType:
    """``scatlas.backend`` (loaded from its file if the ``scatlas`` package fails to import)."""
    try:
        return importlib.import_module("scatlas.backend")
    except Exception:  # noqa: BLE001 - any failure of a sibling module
        path = REPO_ROOT / "scatlas" / "backend.py"
        spec = importlib.util.spec_from_file_location("_bench_scatlas_backend", path)
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """Total RAM in GiB (from /proc/meminfo), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_cores() -> int:
    """Cores this process may run on (its affinity mask), falling back to ``os.cpu_count``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def package_version(dist: str) -> str | None:
    """Installed version of a distribution, or its module's ``__version__``; None if absent."""
    try:
        return _metadata.version(dist)
    except _metadata.PackageNotFoundError:
        pass
    module = VERSIONED.get(dist, dist)
    if module == "cupy" and not get_backend().gpu_available():
        return None  # do not import CuPy just to read a version where it is unusable
    try:
        return str(getattr(importlib.import_module(module), "__version__", None) or "") or None
    except Exception:  # noqa: BLE001 - a missing or broken package has no version
        return None


def blas_info() -> str | None:
    """The BLAS NumPy links against (name and version), if NumPy reports it."""
    try:
        import numpy as np

        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - older NumPy, unusual builds
        return None


def git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The checkout's commit and whether its code has uncommitted changes (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", *CODE_PATHS) if commit else None
    if status is None:
        return {"commit": commit, "dirty": None}
    changed = [line[3:] for line in status.splitlines()
               if not line[3:].startswith(NOT_CODE)]
    return {"commit": commit, "dirty": bool(changed)}


def gpu_facts() -> list[dict[str, Any]]:
    """Name and memory of each visible GPU (``backend.describe()``), empty without one."""
    try:
        return list(get_backend().describe().get("gpus", []))
    except Exception:  # noqa: BLE001 - a broken driver must not stop a CPU benchmark
        return []


def capture(device: str) -> dict[str, Any]:
    """Everything recorded about the run's environment."""
    gpus = gpu_facts()
    return {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_available": available_cores(),
        "memory_gib": memory_gib(),
        "gpu_name": gpus[0]["name"] if gpus and device == "gpu" else None,
        "gpus": gpus,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "blas": blas_info(),
        "versions": {dist: package_version(dist) for dist in VERSIONED},
        "git": git_info(),
        "env": {var: os.environ[var] for var in _THREAD_VARS if var in os.environ},
    }


def describe_hardware(env: dict[str, Any]) -> str:
    """A short one-line description: GPU name on GPU runs, CPU model and cores otherwise."""
    cpu = f"{env.get('cpu_model', '?')}, {env.get('cpu_cores_available', '?')} cores"
    if env.get("device") == "gpu" and env.get("gpu_name"):
        return f"{env['gpu_name']} (host: {cpu})"
    return cpu
