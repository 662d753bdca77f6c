"""Seurat-style CCA integration of two datasets of 1e5 cells each: wall time and peak memory.

The issue's requirement: "Seurat-style CCA on two datasets of 1e5 cells each must run within
24 GiB of memory" (Seurat itself forms the dense n1 x n2 matrix: 1e5 x 1e5 float64 = 75 GiB, and
fails to allocate it at 1.8e5 cells per dataset). Each size runs in a fresh worker process so
that its peak resident memory is its own (``ru_maxrss`` and a sampling thread, as
``bench/online_inmf.py``): synthetic raw counts (2 batches of ``size`` cells, 2,000 genes) ->
``scatlas.tl.integrate(method="cca")`` (log-normalisation, 2,000 HVGs, per-batch scaling, CCA,
anchors with Seurat's defaults, IntegrateData-style correction, PCA).

Run: ``python -m bench.seurat_memory --sizes 1e4,1e5`` (size = cells per dataset); writes
``bench/results/seurat_memory_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from .online_inmf import RssSampler

RESULTS = Path(__file__).resolve().parent / "results"


def _worker(size: int, n_genes: int, seed: int) -> dict:
    import numpy as np

    from scatlas import datasets, tl

    t0 = time.perf_counter()
    adata = datasets.synthetic(3 * size, n_genes, n_batches=2, seed=seed)  # batch sizes vary
    batch = adata.obs["batch"].to_numpy()
    keep = np.sort(np.concatenate([np.flatnonzero(batch == b)[:size] for b in np.unique(batch)]))
    adata = adata[keep].copy()  # exactly `size` cells per dataset
    data_s = time.perf_counter() - t0
    counts = adata.obs["batch"].value_counts().to_dict()
    with RssSampler() as rss:
        start = time.perf_counter()
        tl.integrate(adata, "batch", method="cca", progress=False)
        fit_s = time.perf_counter() - start
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "cells_per_dataset": size, "batches": {str(k): int(v) for k, v in counts.items()},
        "n_genes": n_genes, "data_s": data_s, "integrate_s": fit_s,
        "peak_rss_gib": max(maxrss, rss.peak) / 2**30,
        "embedding_shape": list(adata.obsm["X_cca"].shape),
        "seurat_dense_matrix_gib": size * size * 8 / 2**30,
    }


def _run(size: int, n_genes: int, seed: int) -> dict:
    cmd = [sys.executable, "-m", "bench.seurat_memory", "--worker", str(size),
           "--n-genes", str(n_genes), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if proc.returncode != 0:
        return {"cells_per_dataset": size, "error": proc.stderr[-2000:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_1min"] = os.getloadavg()[0]
    return out


def _markdown(rows: list[dict]) -> str:
    lines = [
        "# Seurat-style CCA integration: two datasets, time and peak memory (CPU)",
        "",
        "`python -m bench.seurat_memory --sizes ...`: synthetic raw counts, 2 batches x N cells,",
        "2,000 genes -> `scatlas.tl.integrate(method='cca')` in a fresh process. Seurat's own",
        "route forms the dense N x N matrix (last column).",
        "",
        "| cells per dataset | integrate s | peak RSS GiB | Seurat's dense matrix GiB | load |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['cells_per_dataset']:,} | error | | | |")
            continue
        lines.append(
            f"| {r['cells_per_dataset']:,} | {r['integrate_s']:.0f} | {r['peak_rss_gib']:.2f} | "
            f"{r['seurat_dense_matrix_gib']:.1f} | {r['load_1min']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1e5", help="cells per dataset, comma-separated")
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(int(args.worker), args.n_genes, args.seed)))
        return 0
    rows = []
    for size in (int(float(s)) for s in args.sizes.split(",")):
        print(f"[seurat_memory] {size:,} + {size:,} cells ...", file=sys.stderr, flush=True)
        rows.append(_run(size, args.n_genes, args.seed))
        print(json.dumps(rows[-1])[:400], file=sys.stderr, flush=True)
    RESULTS.mkdir(exist_ok=True)
    env = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / "seurat_memory_cpu.json").write_text(json.dumps({"env": env, "rows": rows},
                                                               indent=1))
    (RESULTS / "seurat_memory_cpu.md").write_text(_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
