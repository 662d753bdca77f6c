"""Synthetic atlas to zarr on Dask (issue 20 item 5): cells/s, peak RSS, disk, and the 1e7
projection from the measured rate.

    python -m bench.atlas_synthetic --n-cells 1000000 --out /tmp/atlas_1m.zarr

Writes ``bench/results/atlas_synthetic_cpu.json``. The store is kept (``--out``) as the input
of ``bench/atlas_build.py``. The 1e7 figure is a projection (linear in cells: chunks are
independent and memory is bounded by the in-flight window), labelled as such.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cells", type=int, default=1_000_000)
    ap.add_argument("--n-genes", type=int, default=2000)
    ap.add_argument("--chunk-size", type=int, default=50_000)
    ap.add_argument("--n-workers", type=int, default=2)
    ap.add_argument("--out", required=True, help="zarr store to write (replaced)")
    ap.add_argument("--json", default=str(RESULTS / "atlas_synthetic_cpu.json"))
    args = ap.parse_args()

    from scatlas.atlas import write_synthetic_zarr

    if Path(args.out).exists():
        shutil.rmtree(args.out)
    rec = write_synthetic_zarr(args.out, args.n_cells, args.n_genes, chunk_size=args.chunk_size,
                               n_workers=args.n_workers, progress=False)
    rec["n_workers"] = args.n_workers
    rec["chunk_size"] = args.chunk_size
    rec["projection_1e7_seconds"] = 1e7 / rec["cells_per_s"]
    rec["projection_note"] = ("1e7 cells: projected from the measured cells/s on this CPU, not "
                              "run; disk scales linearly too")
    rec["projection_1e7_disk_bytes"] = rec["disk_bytes"] * 1e7 / args.n_cells
    Path(args.json).write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
