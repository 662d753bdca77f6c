"""``scatlas train metric|mvae``, ``scatlas embed``, ``scatlas impute``: train cell models and
apply them.

Examples::

    scatlas train metric atlas.h5ad --label-key cell_type --study-key study --out model/
    scatlas train metric atlas.zarr --backed --label-key cell_type --bf16 --out model/
    scatlas embed --model model/ query.h5ad query_embedded.h5ad   # obsm['X_scatlas']
    scatlas train mvae cite.h5ad --modality rna=X --modality protein=obsm/protein_counts \
        --n-top-genes 2000 --out mvae/
    scatlas embed --model mvae/ --modalities rna rna_only.h5ad out.h5ad
    scatlas impute --model mvae/ --source rna --target protein rna_only.h5ad out.h5ad

Errors name what the caller can change as flags: the library's messages name parameters as
Python does (``balance=None``, ``pass input='lognorm'``), and :func:`_in_cli_terms` rewrites
them with each command's flag table (``--balance none``, ``pass --input-kind lognorm``).
Progress bars (``--progress/--no-progress``) show by default when stderr is a terminal, as for
the other commands.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: library parameter -> flag, shared by the model commands (each adds its own below)
_COMMON_FLAGS = {"layer": "--layer", "input": "--input-kind", "use_raw": "--use-raw",
                 "batch_size": "--batch-size", "min_overlap": "--min-overlap",
                 "progress": "--progress", "seed": "--seed"}
_LOOP_FLAGS = {"max_steps": "--max-steps", "validation_fraction": "--validation-fraction",
               "learning_rate": "--lr", "patience": "--patience", "eval_every": "--eval-every",
               "checkpoint_dir": "--checkpoint-dir", "log_path": "--log", "n_top_genes":
               "--n-top-genes", "hidden": "--hidden", "latent_dim": "--latent-dim"}
FLAGS: dict[str, dict[str, str]] = {
    "train metric": {**_COMMON_FLAGS, **_LOOP_FLAGS,
                     "label_key": "--label-key", "study_key": "--study-key",
                     "hierarchy": "--hierarchy", "balance": "--balance", "preset": "--preset",
                     "sparse_step": "--sparse-step", "dropout": "--dropout",
                     "objective": "--objective", "mining": "--mining", "margin": "--margin",
                     "metric_weight": "--metric-weight", "temperature": "--temperature",
                     "l1": "--l1", "negatives": "--negatives", "bf16": "--bf16"},
    "train mvae": {**_COMMON_FLAGS, **_LOOP_FLAGS, "modalities": "--modality",
                   "likelihoods": "--likelihood", "batch_key": "--batch-key",
                   "kl_warmup_steps": "--kl-warmup-steps", "n_layers": "--n-layers"},
    "embed": {**_COMMON_FLAGS, "modalities": "--modalities", "precision": "--precision",
              "key_added": "--key-added"},
    "impute": {**_COMMON_FLAGS, "modalities": "--source", "source": "--source",
               "target": "--target", "library": "--library", "batch": "--batch",
               "n_samples": "--n-samples", "scale": "--scale", "key_added": "--key-added"},
}
#: Python values -> flag values where they differ ("" drops the value: a bare flag)
VALUES: dict[str, dict[str, str]] = {
    "balance": {"None": "none"}, "n_top_genes": {"None": "0"}, "patience": {"None": "0"},
    "sparse_step": {"True": "on", "False": "off", "None": "auto"},
}


def _read(path: str, backed: bool = False):
    """An ``.h5ad`` file, an AnnData zarr store (a folder or a ``.zarr`` path) or an ``.h5mu``.

    ``backed``: an h5ad is opened read-only with ``X`` on disk; a zarr store keeps ``X`` and the
    layers on disk, read lazily (:func:`scatlas.io.read_zarr`).
    """
    from ..io import read_h5ad, read_zarr

    if str(path).endswith(".h5mu"):
        return _read_h5mu(path)
    if Path(path).is_dir() or str(path).rstrip("/").endswith(".zarr"):
        return read_zarr(path, backed=bool(backed))
    return read_h5ad(path, backed="r" if backed else False)


def _read_h5mu(path: str):
    from .._validate import ScatlasInputError

    try:
        import mudata
    except ImportError:
        raise ScatlasInputError(f"reading {path!r} needs mudata (pip install mudata)") from None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path!r} does not exist")
    return mudata.read_h5mu(path)


def _write(data, path: str) -> None:
    from ..io import atomic_write, write_h5ad

    if hasattr(data, "mod"):  # MuData
        with atomic_write(Path(path)) as tmp:
            data.write(str(tmp))
        return
    write_h5ad(data, path)


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """``["name=value", ...]`` -> dict (order kept)."""
    from .._validate import ScatlasInputError

    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ScatlasInputError(f"{what} must look like NAME=VALUE, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def cmd_train_mvae(args: argparse.Namespace) -> int:
    from .. import tl

    t0 = time.perf_counter()
    _join_job(args)
    data = _read(args.input)
    modalities = _pairs(args.modality, "--modality") or None
    likelihoods = _pairs(args.likelihood, "--likelihood") or None
    log_path = args.log or str(Path(args.out).with_suffix("")) + ".train.jsonl"
    # options left unset follow tl.train_mvae's defaults (chosen by nested CV, docs/mvae.md)
    chosen = {name: value for name, value in (("batch_size", args.batch_size),
                                              ("validation_fraction", args.validation_fraction))
              if value is not None}
    if args.n_top_genes is not None:
        chosen["n_top_genes"] = args.n_top_genes or None  # 0: every feature
    model = tl.train_mvae(
        data, modalities, likelihoods, seed=args.seed, batch_key=args.batch_key,
        max_steps=args.max_steps, learning_rate=args.lr, **chosen,
        kl_warmup_steps=args.kl_warmup_steps, patience=args.patience,
        eval_every=args.eval_every, checkpoint_dir=args.checkpoint_dir, log_path=log_path,
        progress=args.progress, hidden=args.hidden, n_layers=args.n_layers,
        **({} if args.latent_dim is None else {"latent_dim": args.latent_dim}),
        train=_train_settings(args),
    )
    return _finish_training("mvae", model, args, log_path, t0, extra=("observed",))



def _finish_training(what: str, model, args: argparse.Namespace, log_path: str, t0: float,
                     extra: tuple[str, ...] = ()) -> int:
    """Save the trained model, plot the loss curve if asked, print a one-line summary (process 0
    of a multi-host job; the others only say they are done)."""
    import jax

    from ..models.train import plot_history

    if jax.process_index() != 0:
        print(f"scatlas train {what}: process {jax.process_index()} of {jax.process_count()} "
              f"done in {time.perf_counter() - t0:.1f} s; process 0 writes {args.out}")
        return 0
    model.save(args.out)
    if args.plot:
        plot_history(log_path, args.plot, terms=model.loss_terms)
    keys = ("steps", "best_step", "best_val", "cells_per_s", *extra)
    summary = {k: model.info[k] for k in keys}
    print(f"scatlas train {what}: {model!r} -> {args.out} in {time.perf_counter() - t0:.1f} s; "
          f"{json.dumps(summary)}; log {log_path}")
    return 0

def cmd_impute(args: argparse.Namespace) -> int:
    from .. import tl
    from .._validate import ScatlasInputError
    from ..models.io import load

    t0 = time.perf_counter()
    model = load(args.model)
    if getattr(model, "kind", None) != "mvae":
        raise ScatlasInputError(f"{args.model!r} is a {model.kind!r} model; impute needs an mvae")
    data = _read(args.input)
    library = args.library
    if library not in ("predicted", "observed"):
        try:
            library = float(library)
        except ValueError:
            raise ScatlasInputError(
                f"--library must be 'predicted', 'observed' or a number, got {library!r}"
            ) from None
    tl.impute(data, model, args.target, args.source, key_added=args.key_added, library=library,
              batch=args.batch, n_samples=args.n_samples, scale=args.scale, seed=args.seed,
              batch_size=args.batch_size, min_overlap=args.min_overlap, progress=args.progress)
    key = args.key_added or f"{args.target}_imputed"
    values = data.obsm[key]
    _write(data, args.output)
    print(f"scatlas impute: {args.target} ({values.shape[1]} features) for {values.shape[0]} "
          f"cells -> obsm[{key!r}] in {args.output} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_train_metric(args: argparse.Namespace) -> int:
    from .. import tl

    t0 = time.perf_counter()
    _join_job(args)
    adata = _read(args.input, backed=args.backed)
    log_path = args.log or str(Path(args.out).with_suffix("")) + ".train.jsonl"
    model = tl.train_metric(
        adata, args.label_key, args.study_key, seed=args.seed, layer=args.layer,
        input=args.input_kind or "counts", use_raw=bool(args.use_raw),
        hierarchy=args.hierarchy, batch_size=args.batch_size,
        max_steps=args.max_steps,
        validation_fraction=0.1 if args.validation_fraction is None else args.validation_fraction,
        balance=None if args.balance == "none" else args.balance, learning_rate=args.lr,
        patience="auto" if args.patience is None else (args.patience or None),
        eval_every=args.eval_every, checkpoint_dir=args.checkpoint_dir,
        log_path=log_path, progress=args.progress, preset=args.preset,
        n_top_genes="auto" if args.n_top_genes is None else (args.n_top_genes or None),
        sparse_step={"auto": None, "on": True, "off": False}[args.sparse_step],
        train=_train_settings(args),
        **_given(args, hidden=tuple, latent_dim=int, dropout=float, objective=str,
                 mining=str, margin=float, metric_weight=float, temperature=float, l1=float,
                 negatives=str),
        **({} if args.input_pcs is None else {"input_pcs": args.input_pcs or None}),
        bf16=args.bf16,
    )
    return _finish_training("metric", model, args, log_path, t0)


def _given(args: argparse.Namespace, **fields: Callable) -> dict[str, Any]:
    """The model options given on the command line (the others: the preset's defaults)."""
    return {k: conv(getattr(args, k)) for k, conv in fields.items()
            if getattr(args, k) is not None}


def cmd_embed(args: argparse.Namespace) -> int:
    from .. import tl
    from .._validate import ScatlasInputError
    from ..io import write_h5ad
    from ..models.io import load

    t0 = time.perf_counter()
    model = load(args.model)
    adata = _read(args.input)
    if getattr(model, "kind", None) == "mvae":
        if args.precision is not None:
            raise ScatlasInputError("--precision applies to metric models; this is an mvae model")
        Z = model.embed(adata, args.modalities, batch_size=args.batch_size,
                        min_overlap=args.min_overlap, progress=args.progress,
                        layer=args.layer, input=args.input_kind, use_raw=args.use_raw)
        adata.obsm[args.key_added] = Z
        adata.uns[args.key_added] = {"model": repr(model), "modalities": args.modalities or [],
                                     "latent_dim": int(Z.shape[1])}
        _write(adata, args.output)
    else:
        tl.embed(adata, model, key_added=args.key_added, layer=args.layer,
                 input=args.input_kind, use_raw=args.use_raw, batch_size=args.batch_size,
                 min_overlap=args.min_overlap, precision=args.precision,
                 progress=args.progress)
        write_h5ad(adata, args.output)
    print(f"scatlas embed: {adata.n_obs} cells -> obsm[{args.key_added!r}] "
          f"({model.latent_dim} dims) in {args.output} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _input_args(p: argparse.ArgumentParser, *, train: bool) -> None:
    """``--layer``, ``--input-kind``, ``--use-raw`` (training: recorded in the model; embedding:
    default the model's record) and ``--progress/--no-progress``."""
    if train:
        p.add_argument("--layer", default=None, help="train on adata.layers[LAYER] instead of "
                       "X (recorded in the model: embed reads it by default)")
        p.add_argument("--input-kind", choices=("counts", "lognorm"), default="counts",
                       help="the input's values: raw counts (log-normalised here; default) or "
                       "already log-normalised (log1p of normalised counts); scaled or z-scored "
                       "data are refused. Recorded in the model: embed, annotate and serve read "
                       "new data the same way")
        p.add_argument("--use-raw", action=argparse.BooleanOptionalAction, default=False,
                       help="train on adata.raw (its X and genes), e.g. the log-normalised "
                       "values of scanpy's processed files whose X is scaled (recorded in the "
                       "model)")
    else:
        p.add_argument("--layer", default=None,
                       help="read adata.layers[LAYER] (default: the layer the model was "
                       "trained on where the input has it, else X; 'X' for X)")
        p.add_argument("--input-kind", choices=("counts", "lognorm"), default=None,
                       help="the input's values (default: the kind the model was trained on; "
                       "another kind is honoured with a warning)")
        p.add_argument("--use-raw", action=argparse.BooleanOptionalAction, default=None,
                       help="read adata.raw (default: when the model was trained on .raw and "
                       "the input has one)")
    _progress_arg(p)


def _progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress bars (default: when stderr is a terminal)")



def _loop_args(p: argparse.ArgumentParser) -> None:
    """Options of the shared training loop (validation, early stopping, checkpoints, logs)."""
    p.add_argument("--validation-fraction", type=float, default=None,
                   help="cells held out for validation and early stopping (default: the "
                   "library's; metric 0.1, mvae none below 1,000 cells, else 0.1)")
    p.add_argument("--patience", type=int, default=None,
                   help="stop after this many validations without improvement")
    p.add_argument("--eval-every", type=int, default=100,
                   help="validation loss every this many steps (default 100)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="orbax checkpoints here; rerunning resumes from the latest")
    p.add_argument("--log", default=None, help="JSON-lines training log (default OUT.train.jsonl)")
    p.add_argument("--plot", default=None, help="write the loss curve to this PNG")
    g = p.add_argument_group(
        "multi-host", "run the same command on every machine of the job; process 0 writes the "
        "model, the log and the plot")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-host job (jax.distributed); the coordinator and process "
                   "ids come from SLURM / Open MPI, or from the three options below")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator service")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def _schedule_args(p: argparse.ArgumentParser) -> None:
    """Learning-rate schedule, clipping and checkpoint spacing: ``train=`` of tl.train_metric /
    train_mvae (:class:`scatlas.models.train.TrainConfig`); unset options keep its defaults."""
    g = p.add_argument_group("optimisation", "TrainConfig settings (default: the library's)")
    g.add_argument("--schedule", choices=("cosine", "constant"), default=None,
                   help="learning rate after the warm-up (default cosine decay)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="steps of linear warm-up from 0 (default 0)")
    g.add_argument("--clip-norm", default=None, metavar="X",
                   help="clip the global gradient norm at X; 'none': no clipping (default 1.0)")
    g.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints with --checkpoint-dir (default 500)")


def _train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``train=`` mapping of the options of :func:`_schedule_args` that were given."""
    from ..exceptions import ScatlasInputError

    out: dict[str, Any] = {}
    for name in ("schedule", "warmup_steps", "checkpoint_every"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    if args.clip_norm is not None:
        if args.clip_norm.lower() == "none":
            out["clip_norm"] = None
        else:
            try:
                out["clip_norm"] = float(args.clip_norm)
            except ValueError:
                raise ScatlasInputError(f"--clip-norm must be a number or 'none', got "
                                        f"{args.clip_norm!r}", param="clip_norm") from None
    return out


def _join_job(args: argparse.Namespace) -> None:
    """``--distributed``: :func:`scatlas.models.train.initialize_distributed` before any JAX
    work, with the options given (the rest detected from the cluster environment)."""
    if not args.distributed:
        return
    from ..models.train import initialize_distributed

    given = {"coordinator_address": args.coordinator, "num_processes": args.num_processes,
             "process_id": args.process_id}
    initialize_distributed(**{k: v for k, v in given.items() if v is not None})


def register(sub: argparse._SubParsersAction, *, common: Callable, io_args: Callable) -> None:
    train = sub.add_parser("train", help="train a cell model (metric, mvae, michigan)")
    models = train.add_subparsers(dest="model", required=True, metavar="MODEL")

    p = models.add_parser("metric", help="SCimilarity-style metric-learning encoder",
                          description="Train a metric-learning encoder (triplet + reconstruction "
                          "or InfoNCE) on labelled cells; writes a model folder.")
    p.add_argument("input", help="input .h5ad or AnnData zarr store (raw counts, or see "
                   "--input-kind; genes become the model's gene list)")
    p.add_argument("--out", required=True, help="model folder to write (atomically)")
    p.add_argument("--label-key", required=True, help="obs column with cell labels")
    p.add_argument("--study-key", default=None, help="obs column with the study / batch")
    p.add_argument("--hierarchy", default=None,
                   help="label hierarchy file (child,parent CSV/TSV or JSON): related labels are "
                   "never negatives")
    p.add_argument("--preset", choices=("auto", "scimilarity"), default="auto",
                   help="defaults for the options not given: auto (chosen by cross-validation on "
                   "real held-out batches, docs/models.md) or scimilarity (SCimilarity 0.4's: "
                   "every gene, 3 x 1024, triplet weight 0.001, batch 1000)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="training steps (default ~20 passes over the cells, 200..50,000)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="cells per step (default min(1000, half the training cells))")
    p.add_argument("--n-top-genes", type=int, default=None,
                   help="train on the N most variable genes (0: every gene; default: the "
                   "preset's)")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (default 5e-3)")
    p.add_argument("--hidden", type=int, nargs="+", default=None,
                   help="hidden layer sizes (default: the preset's)")
    p.add_argument("--latent-dim", type=int, default=None, help="embedding size")
    p.add_argument("--input-pcs", type=int, default=None, metavar="N",
                   help="the network's input: the N PCs of the training cells (0: the genes "
                   "themselves; default: the preset's, auto 50, scimilarity 0; --sparse-step "
                   "on trains on the genes)")
    p.add_argument("--dropout", type=float, default=None, help="dropout of the hidden layers")
    p.add_argument("--l1", type=float, default=None,
                   help="L1 penalty on the first layer's weights (SCimilarity: 1e-4)")
    p.add_argument("--objective", choices=("triplet", "infonce"), default=None)
    p.add_argument("--metric-weight", type=float, default=None,
                   help="weight w of the metric loss in w * metric + (1 - w) * MSE")
    p.add_argument("--mining", choices=("semihard", "hardest", "random"), default=None)
    p.add_argument("--negatives", choices=("all", "same_study"), default=None,
                   help="negatives of an anchor: any other label, or only its own study's")
    p.add_argument("--margin", type=float, default=None, help="triplet margin (SCimilarity 0.05)")
    p.add_argument("--temperature", type=float, default=None,
                   help="InfoNCE temperature (default 0.1)")
    p.add_argument("--balance", choices=("label_study", "label", "study", "none"),
                   default="label_study",
                   help="balance sampling over label x study, label, study or none (uniform; "
                   "default label_study)")
    p.add_argument("--bf16", action="store_true",
                   help="compute the dense layers in bfloat16 (default float32)")
    p.add_argument("--sparse-step", choices=("auto", "on", "off"), default="auto",
                   help="train on CSR batches (CPU; the first layer over the non-zeros). "
                   "auto: from 1,000 genes at <=30%% non-zero")
    _loop_args(p)
    _schedule_args(p)
    p.add_argument("--backed", action="store_true",
                   help="leave X on disk and stream mini-batches from it (large .h5ad / zarr)")
    p.add_argument("--seed", type=int, default=0)
    _input_args(p, train=True)
    p.set_defaults(func=cmd_train_metric, param_flags=FLAGS["train metric"], param_values=VALUES)

    p = sub.add_parser("embed", help="embed cells with a trained model (obsm['X_scatlas'])")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("input", help="input .h5ad or zarr store (read as the model was trained; "
                   "genes matched by name)")
    p.add_argument("output", help="output .h5ad (written atomically)")
    p.add_argument("--key-added", default="X_scatlas", help="obsm key (default X_scatlas)")
    p.add_argument("--batch-size", type=int, default=10_000, help="cells per chunk")
    p.add_argument("--min-overlap", type=float, default=0.5,
                   help="minimum fraction of the model's genes present (default 0.5)")
    p.add_argument("--modalities", nargs="+", default=None, metavar="NAME",
                   help="mvae models: embed from these modalities only (default: every model "
                   "modality present in the input)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default=None,
                   help="metric models: precision of the dense layers (default: the model's)")
    _input_args(p, train=False)
    p.set_defaults(func=cmd_embed, param_flags=FLAGS["embed"], param_values=VALUES)

    _register_mvae(models)
    _register_impute(sub)
    # the other models' commands add themselves to `scatlas train`
    from . import covel, michigan

    for module in (michigan, covel):
        module.register_train(models)


def _register_mvae(models: argparse._SubParsersAction) -> None:
    p = models.add_parser(
        "mvae", help="multimodal VAE with a product-of-experts posterior",
        description="Train a multimodal VAE (one expert per modality, product-of-experts "
        "posterior, sub-sampled ELBO) on paired or mosaic cells; writes a model folder.")
    p.add_argument("input", help="input .h5ad (or .h5mu with mudata installed), raw counts")
    p.add_argument("--out", required=True, help="model folder to write (atomically)")
    p.add_argument("--modality", action="append", metavar="NAME=LOCATION",
                   help="a modality and where it is: X, layers/NAME, obsm/NAME (MuData: MOD, "
                   "MOD/layers/NAME); repeat per modality (default rna=X "
                   "protein=obsm/protein_counts)")
    p.add_argument("--likelihood", action="append", metavar="NAME=LIKELIHOOD",
                   help="nb, nb_mixture or bernoulli (default by name: rna/protein nb, atac "
                   "bernoulli)")
    p.add_argument("--batch-key", default=None, help="obs column of a batch covariate")
    p.add_argument("--n-top-genes", type=int, default=None,
                   help="keep this many highly variable features of wide count modalities "
                   "(default 2000, as tl.train_mvae; 0 keeps every feature)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="training steps (default ~200 passes over the cells, 500..50,000)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="cells per step (default 128, as tl.train_mvae)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--kl-warmup-steps", type=int, default=None,
                   help="linear KL warm-up steps (default a third of the steps)")
    p.add_argument("--latent-dim", type=int, default=None,
                   help="latent size (default: tl.train_mvae's, 10)")
    p.add_argument("--hidden", type=int, default=128, help="hidden units (default 128)")
    p.add_argument("--n-layers", type=int, default=1, help="encoder hidden layers (default 1)")
    _loop_args(p)
    _schedule_args(p)
    p.add_argument("--seed", type=int, default=0)
    _progress_arg(p)
    p.set_defaults(func=cmd_train_mvae, param_flags=FLAGS["train mvae"], param_values=VALUES)


def _register_impute(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("impute", help="impute a modality with a multimodal VAE (obsm)",
                       description="Expected values of the target modality from the source "
                       "modalities (posterior mean of their product of experts), written to "
                       "obsm[KEY] as a DataFrame named by the target's features.")
    p.add_argument("--model", required=True, help="mvae model folder")
    p.add_argument("input", help="input .h5ad / .h5mu with the source modalities (raw counts)")
    p.add_argument("output", help="output file (written atomically)")
    p.add_argument("--target", required=True, help="modality to impute")
    p.add_argument("--source", nargs="+", default=None, metavar="NAME",
                   help="modalities to impute from (default: every other one present)")
    p.add_argument("--library", default="predicted",
                   help="'predicted' (default), 'observed' or a fixed total per cell")
    p.add_argument("--batch", default=None, help="batch category to decode in")
    p.add_argument("--scale", choices=("counts", "log1p"), default="counts",
                   help="expected counts, or their log1p averaged on that scale (default counts)")
    p.add_argument("--n-samples", type=int, default=0,
                   help="average over this many posterior samples (default 0: posterior mean)")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    p.add_argument("--key-added", default=None, help="obsm key (default TARGET_imputed)")
    p.add_argument("--batch-size", type=int, default=4096, help="cells per chunk")
    p.add_argument("--min-overlap", type=float, default=0.5,
                   help="minimum fraction of the model's features present (default 0.5)")
    _progress_arg(p)
    p.set_defaults(func=cmd_impute, param_flags=FLAGS["impute"], param_values=VALUES)
