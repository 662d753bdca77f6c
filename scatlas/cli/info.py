"""``scatlas info``: version, backend and devices, optional components found."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import sys
from collections.abc import Callable

from .. import __version__, backend

OPTIONAL_COMPONENTS = (
    ("cupy", "cupy", "GPU arrays (scatlas[gpu])"),
    ("jax", "jax", "models"),
    ("flax", "flax", "models"),
    ("optax", "optax", "models"),
    ("faiss", "faiss-cpu", "search (CPU)"),
    ("rapids_singlecell", "rapids-singlecell", "GPU preprocessing"),
    ("scanpy", "scanpy", "preprocessing"),
    ("anndata", "anndata", "I/O"),
    ("torch", "torch", "baselines"),
)


def _component_version(module: str, dist: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    for name in (dist, module, f"{dist}-cuda12x", f"{dist}-cuda13x", "faiss-gpu-cu12"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed"


def cmd_info(args: argparse.Namespace) -> int:
    info = {
        "scatlas": __version__,
        "python": sys.version.split()[0],
        "backend": backend.describe(),
        "components": {
            module: _component_version(module, dist) for module, dist, _ in OPTIONAL_COMPONENTS
        },
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    be = info["backend"]
    print(f"scatlas {info['scatlas']} (Python {info['python']})")
    print(f"device: {be['resolved_device']}  (SCATLAS_DEVICE={be['device_env'] or 'unset'})")
    if be["gpus"]:
        for g in be["gpus"]:
            print(f"  GPU {g['index']}: {g['name']}, {g['memory_gib']} GiB")
    else:
        print("  no usable GPU (CuPy missing or no CUDA device)")
    print("optional components:")
    for module, _dist, purpose in OPTIONAL_COMPONENTS:
        ver = info["components"][module]
        print(f"  {module:<18} {ver or 'not installed':<14} {purpose}")
    return 0


def register(sub: argparse._SubParsersAction, *, common: Callable, io_args: Callable) -> None:
    p = sub.add_parser("info", help="backend, devices and optional components")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)
