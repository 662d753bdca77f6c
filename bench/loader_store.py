"""Shuffled training mini-batches from a 1e6 x 2,000 store on disk: scatlas ``StoreBatches``
vs annbatch's ``Loader``, side by side in one run (issue 20 item 4).

    python -m bench.atlas_synthetic --n-cells 1000000 --out /tmp/atlas_1m.zarr
    python -m bench.loader_store --store /tmp/atlas_1m.zarr  # annbatch: bench/.peers/annbatch

Both read the same CSR zarr store with the same block shuffling (blocks of 512 consecutive cells,
32 blocks per pool, batches of 1,024) and are timed over the same number of batches after a
first batch (warm-up), alternating scatlas / annbatch ``--rounds`` times on the shared CPU.
Reported per loader: cells/s of raw CSR batches and of the trainer's input (log1p of counts per
1e4, dense float32 (1024, 2000); annbatch's batches are normalised and densified by the same
NumPy code in the consumer). annbatch needs Python >= 3.12: it runs in its own venv
(``bench/.peers/annbatch``, ``pip install annbatch``) through ``--peer``. Writes
``bench/results/loader_store_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def dense_lognorm(X) -> np.ndarray:
    """log1p(1e4 x / rowsum) of a CSR batch, dense float32 (the trainer's input)."""
    X = X.tocsr() if hasattr(X, "tocsr") else X
    counts = np.diff(X.indptr)
    totals = np.add.reduceat(X.data, X.indptr[:-1]) if X.nnz else np.zeros(X.shape[0])
    totals = np.where(counts > 0, totals, 0).astype(np.float32)
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    out = np.zeros(X.shape, dtype=np.float32)
    out[np.repeat(np.arange(X.shape[0]), counts), X.indices] = np.log1p(
        X.data * np.repeat(scale, counts))
    return out


def run_annbatch(store: str, n_batches: int, dense: bool) -> float:
    import anndata as ad
    import zarr
    from annbatch import Loader

    X = ad.io.sparse_dataset(zarr.open_group(store, mode="r")["X"])
    loader = Loader(chunk_size=512, preload_nchunks=32, batch_size=1024, shuffle=True,
                    preload_to_gpu=False, rng=np.random.default_rng(0))
    loader.add_dataset(X)
    it = iter(loader)
    n, t0 = 0, None
    for i in range(n_batches + 1):
        b = next(it)
        x = b["X"] if isinstance(b, dict) else b[0] if isinstance(b, tuple) else b
        if dense:
            x = dense_lognorm(x)
        if i == 0:
            t0 = time.perf_counter()
        else:
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def run_scatlas(store: str, n_batches: int, dense: bool) -> float:
    import zarr
    from anndata.io import sparse_dataset

    from scatlas.models.data import StoreBatches

    X = sparse_dataset(zarr.open_group(store, mode="r")["X"])
    sb = StoreBatches(X, batch_size=1024, block_rows=512, fetch_blocks=32, seed=0,
                      sparse=not dense, transform="lognorm" if dense else "none",
                      check_input=False)
    it = sb.iterate(prefetch=4)
    n, t0 = 0, None
    for i, b in zip(range(n_batches + 1), it, strict=False):
        if i == 0:
            t0 = time.perf_counter()
        else:
            n += b["x"].shape[0] if dense else b["label"].shape[0]
    it.close()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--n-batches", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peer-python", default=str(ROOT / "bench/.peers/annbatch/bin/python"))
    ap.add_argument("--peer", choices=["annbatch"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=str(RESULTS / "loader_store_cpu.json"))
    args = ap.parse_args()
    if args.peer:  # inside the peer's venv: print one number
        print(json.dumps(run_annbatch(args.store, args.n_batches, args.dense)))
        return
    import os

    rows: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for dense in (False, True):
            kind = "dense_lognorm" if dense else "raw_csr"
            rows.setdefault(f"scatlas_{kind}", []).append(
                run_scatlas(args.store, args.n_batches, dense))
            if Path(args.peer_python).exists():
                cmd = [args.peer_python, "-m", "bench.loader_store", "--store", args.store,
                       "--n-batches", str(args.n_batches), "--peer", "annbatch"]
                res = subprocess.run(cmd + (["--dense"] if dense else []), cwd=ROOT,
                                     capture_output=True, text=True, check=False)
                val = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 \
                    else None
                if val is None:
                    print(res.stderr[-2000:], file=sys.stderr)
                rows.setdefault(f"annbatch_{kind}", []).append(val)
    out = {"store": args.store, "batch_size": 1024, "block_rows": 512, "blocks_per_pool": 32,
           "n_batches": args.n_batches, "rounds": args.rounds,
           "cells_per_s": rows, "best_cells_per_s": {k: max(v for v in vals if v is not None)
                                                     for k, vals in rows.items()
                                                     if any(v is not None for v in vals)},
           "load_average_at_end": os.getloadavg(), "cpu_count": os.cpu_count(),
           "note": "raw_csr (scatlas): sparse=True batches of counts (transform none) as CSR "
                   "arrays; dense_lognorm: the trainer's dense float32 input. The CPU is shared "
                   "with other jobs (see load average): compare the two loaders within a run."}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
