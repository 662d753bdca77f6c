"""``scatlas atlas build``: raw counts on disk -> embeddings, metadata, index and report.

    scatlas atlas build RAW.zarr --model model/ --out atlas/ [--scheduler tcp://host:8786]
    scatlas serve --index atlas/index --model model/

RAW is a zarr store or ``.h5ad`` of raw counts, or a folder of them. The stages run on Dask
(a local cluster of single-threaded worker processes by default, ``--scheduler`` for an
existing one); a rerun after a crash resumes after the last finished stage
(:func:`scatlas.atlas.build`).
"""

from __future__ import annotations

import argparse
import sys


def cmd_atlas_build(args: argparse.Namespace) -> int:
    from ..atlas import build

    report = build(args.raw, args.model, args.out, scheduler=args.scheduler,
                   n_workers=args.n_workers, chunk_rows=args.chunk_rows,
                   batch_size=args.batch_size, min_overlap=args.min_overlap, metric=args.metric,
                   engine=args.engine, nlist=args.nlist, nprobe=args.nprobe,
                   n_queries=args.n_queries, recall_target=args.recall_target,
                   seed=args.seed, restart=args.restart, progress=args.progress)
    rec = report.get("recall") or {}
    print(f"scatlas atlas build: {report['n_cells']:,} cells -> {args.out} in "
          f"{report['total_seconds']:.1f} s; recall@{rec.get('k', 10)} "
          f"{rec.get('recall', float('nan')):.4f}; report {args.out}/report.md", file=sys.stderr)
    return 0


def register(subparsers, *, common, io_args) -> None:  # noqa: ARG001 - shared signature
    """Add ``atlas build``."""
    p = subparsers.add_parser("atlas", help="build a searchable atlas from raw counts on disk")
    sub = p.add_subparsers(dest="atlas_command", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="align, normalise, embed, index and report, on Dask")
    b.add_argument("raw", help="zarr store or .h5ad of raw counts, or a folder of them")
    b.add_argument("--model", required=True, help="trained encoder folder")
    b.add_argument("--out", required=True, help="atlas folder (resumed when it holds a build)")
    b.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="Dask scheduler address (default: a local cluster)")
    b.add_argument("--n-workers", type=int, default=None,
                   help="workers of the local cluster (default: usable cores, at most 4)")
    b.add_argument("--chunk-rows", type=int, default=20_000, help="cells per Dask block")
    b.add_argument("--batch-size", type=int, default=4096, help="cells per model batch")
    b.add_argument("--min-overlap", type=float, default=0.5,
                   help="smallest fraction of the model's genes a store must have")
    b.add_argument("--metric", choices=["cosine", "euclidean", "ip"], default="cosine")
    b.add_argument("--engine", default="auto",
                   help="auto, exact, faiss-ivf, faiss-ivfpq, native-ivf, faiss-gpu")
    b.add_argument("--nlist", type=int, default=None, help="IVF lists (default: from n)")
    b.add_argument("--nprobe", type=int, default=None, help="default lists probed per query")
    b.add_argument("--n-queries", type=int, default=1000,
                   help="stored cells searched for the report's recall@10 (default 1000)")
    b.add_argument("--recall-target", type=float, default=0.95,
                   help="raise an IVF index's nprobe (unless --nprobe) until recall@10 reaches "
                        "this (default 0.95)")
    b.add_argument("--restart", action="store_true", help="discard an earlier build in --out")
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress bars (default: when stderr is a terminal)")
    b.set_defaults(func=cmd_atlas_build, command="atlas build")
