"""``scatlas train metric`` and ``scatlas embed``: train a cell encoder, embed cells with it.

Examples::

    scatlas train metric atlas.h5ad --label-key cell_type --study-key study --out model/
    scatlas embed --model model/ query.h5ad query_embedded.h5ad   # obsm['X_scatlas']
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path


def _read(path: str, backed: bool = False):
    from .io import read_h5ad

    return read_h5ad(path, backed="r" if backed else False)


def cmd_train_metric(args: argparse.Namespace) -> int:
    from . import tl
    from .models.train import plot_history

    t0 = time.perf_counter()
    adata = _read(args.input, backed=args.backed)
    log_path = args.log or str(Path(args.out).with_suffix("")) + ".train.jsonl"
    model = tl.train_metric(
        adata, args.label_key, args.study_key, seed=args.seed, layer=args.layer,
        input=args.input_kind, hierarchy=args.hierarchy, batch_size=args.batch_size,
        max_steps=args.max_steps, validation_fraction=args.validation_fraction,
        learning_rate=args.lr, patience=args.patience, checkpoint_dir=args.checkpoint_dir,
        log_path=log_path, progress=None if args.progress else False,
        hidden=tuple(args.hidden), latent_dim=args.latent_dim, objective=args.objective,
        mining=args.mining, margin=args.margin,
    )
    model.save(args.out)
    if args.plot:
        plot_history(log_path, args.plot)
    summary = {k: model.info[k] for k in ("steps", "best_step", "best_val", "cells_per_s")}
    print(f"scatlas train metric: {model!r} -> {args.out} in {time.perf_counter() - t0:.1f} s; "
          f"{json.dumps(summary)}; log {log_path}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from . import tl
    from .io import write_h5ad
    from .models.io import load

    t0 = time.perf_counter()
    model = load(args.model)
    adata = _read(args.input)
    tl.embed(adata, model, key_added=args.key_added, layer=args.layer, input=args.input_kind,
             batch_size=args.batch_size, min_overlap=args.min_overlap,
             progress=None if args.progress else False)
    write_h5ad(adata, args.output)
    print(f"scatlas embed: {adata.n_obs} cells -> obsm[{args.key_added!r}] "
          f"({model.latent_dim} dims) in {args.output} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", default=None, help="use adata.layers[LAYER] instead of X")
    p.add_argument("--input-kind", choices=("counts", "lognorm"), default="counts",
                   help="raw counts (log-normalised here; default) or already log-normalised")
    p.add_argument("--progress", action="store_true", help="show a progress bar")


def register(sub: argparse._SubParsersAction, *, common: Callable, io_args: Callable) -> None:
    train = sub.add_parser("train", help="train a cell encoder (metric)")
    models = train.add_subparsers(dest="model", required=True, metavar="MODEL")

    p = models.add_parser("metric", help="SCimilarity-style metric-learning encoder",
                          description="Train a metric-learning encoder (triplet + reconstruction "
                          "or InfoNCE) on labelled cells; writes a model folder.")
    p.add_argument("input", help="input .h5ad (raw counts; genes become the model's gene list)")
    p.add_argument("--out", required=True, help="model folder to write (atomically)")
    p.add_argument("--label-key", required=True, help="obs column with cell labels")
    p.add_argument("--study-key", default=None, help="obs column with the study / batch")
    p.add_argument("--hierarchy", default=None,
                   help="label hierarchy file (child,parent CSV/TSV or JSON): related labels are "
                   "never negatives")
    p.add_argument("--max-steps", type=int, default=None,
                   help="training steps (default ~20 passes over the cells, 200..50,000)")
    p.add_argument("--batch-size", type=int, default=1000, help="cells per step (default 1000)")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (default 5e-3)")
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024, 1024],
                   help="hidden layer sizes (default 1024 1024 1024)")
    p.add_argument("--latent-dim", type=int, default=128, help="embedding size (default 128)")
    p.add_argument("--objective", choices=("triplet", "infonce"), default="triplet")
    p.add_argument("--mining", choices=("semihard", "hardest", "random"), default="semihard")
    p.add_argument("--margin", type=float, default=0.05, help="triplet margin (default 0.05)")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--patience", type=int, default=None,
                   help="stop after this many validations without improvement")
    p.add_argument("--checkpoint-dir", default=None,
                   help="orbax checkpoints here; rerunning resumes from the latest")
    p.add_argument("--log", default=None, help="JSON-lines training log (default OUT.train.jsonl)")
    p.add_argument("--plot", default=None, help="write the loss curve to this PNG")
    p.add_argument("--backed", action="store_true", help="read the .h5ad backed (large files)")
    p.add_argument("--seed", type=int, default=0)
    _input_args(p)
    p.set_defaults(func=cmd_train_metric)

    p = sub.add_parser("embed", help="embed cells with a trained model (obsm['X_scatlas'])")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("input", help="input .h5ad (raw counts; genes matched by name)")
    p.add_argument("output", help="output .h5ad (written atomically)")
    p.add_argument("--key-added", default="X_scatlas", help="obsm key (default X_scatlas)")
    p.add_argument("--batch-size", type=int, default=10_000, help="cells per chunk")
    p.add_argument("--min-overlap", type=float, default=0.5,
                   help="minimum fraction of the model's genes present (default 0.5)")
    _input_args(p)
    p.set_defaults(func=cmd_embed)
