"""scatlas benchmarks: one module per benchmark, a runner that times them, a report.

Usage::

    python -m bench list
    python -m bench run rsvd --sizes 1e4,1e5,1e6 --repeats 3 --warmup 1 --device auto
    python -m bench report

Programmatic entry points: :func:`bench.runner.run_benchmark` and
:func:`bench.report.write_report`.
"""

from __future__ import annotations

import importlib

from .spec import Benchmark, Method, Metric, Workload

#: benchmark name -> (module, one-line description). Modules are imported only when run.
REGISTRY: dict[str, tuple[str, str]] = {
    "rsvd": ("bench.rsvd", "truncated SVD and PCA (k=50) of log-normalised sparse counts"),
    "cca": ("bench.cca", "Seurat-style CCA (k=20): implicit kernel vs explicit n1 x n2 matrix"),
    "inmf": ("bench.inmf", "LIGER batch iNMF (k=20, lambda=5, 30 it.): ours vs pyplanc, pyliger"),
    "online_inmf": ("bench.online_inmf", "online iNMF streamed from a backed .h5ad, peak RSS"),
    "integrate": ("bench.integrate",
                  "batch integration: fastMNN, Seurat CCA vs harmonypy, scanorama (metrics)"),
    "metric": ("bench.metric",
               "metric-learning cell encoder: train/embed cells/s vs SCimilarity (PyTorch)"),
    "mvae": ("bench.mvae", "multimodal VAE: training cells/s vs totalVI"),
}


def list_benchmarks() -> dict[str, str]:
    """Names and one-line descriptions of the registered benchmarks."""
    return {name: desc for name, (_, desc) in REGISTRY.items()}


def load_benchmark(name: str) -> Benchmark:
    """Import a registered benchmark module and return its ``BENCHMARK``."""
    if name not in REGISTRY:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(REGISTRY))}")
    module = importlib.import_module(REGISTRY[name][0])
    return module.BENCHMARK


__all__ = [
    "REGISTRY", "Benchmark", "Method", "Metric", "Workload", "list_benchmarks", "load_benchmark",
]
