"""``scatlas train michigan`` and ``scatlas generate``: train MichiGAN and sample profiles.

Examples::

    scatlas train michigan cells.h5ad --out michigan/ --plot michigan.png
    scatlas generate --model michigan/ cells.h5ad generated.h5ad --n-per-cell 5

``train michigan`` is added to ``scatlas train`` (owned by :mod:`scatlas.cli.models`) through
:func:`register_train`; ``generate`` writes an AnnData of generated log-normalised profiles,
``n_per_cell`` per input cell (``obs["source_cell"]``, ``obs["sample"]``, and the input's
``obs`` columns repeated).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from .models import (
    FLAGS,
    VALUES,
    _finish_training,
    _input_args,
    _join_job,
    _loop_args,
    _read,
)

#: library parameter -> flag where the flag is not the parameter's own name
TRAIN_FLAGS = {**FLAGS["train mvae"], "gan_learning_rate": "--gan-lr"}
GENERATE_FLAGS = {**FLAGS["embed"], "z": "--latent-key"}


def cmd_train_michigan(args: argparse.Namespace) -> int:
    from .. import tl

    t0 = time.perf_counter()
    _join_job(args)
    adata = _read(args.input)
    log_path = args.log or str(Path(args.out).with_suffix("")) + ".train.jsonl"
    given = {k: getattr(args, k) for k in ("latent_dim", "beta", "hidden", "n_critic",
                                           "gp_weight", "noise_dim", "validation_fraction")
             if getattr(args, k) is not None}
    if args.n_top_genes is not None:
        given["n_top_genes"] = args.n_top_genes or None  # 0: every gene
    model = tl.train_michigan(
        adata, seed=args.seed, layer=args.layer, input=args.input_kind,
        use_raw=bool(args.use_raw), batch_size=args.batch_size, vae_steps=args.vae_steps,
        gan_steps=args.gan_steps, learning_rate=args.lr, gan_learning_rate=args.gan_lr,
        patience=args.patience, eval_every=args.eval_every,
        checkpoint_dir=args.checkpoint_dir, log_path=log_path, progress=args.progress, **given)
    model.info.update(steps=model.info["vae"]["steps"] + model.info["gan"]["steps"],
                      best_step=model.info["vae"]["best_step"],
                      best_val=model.info["vae"]["best_val"],
                      cells_per_s={s: model.info[s]["cells_per_s"] for s in ("vae", "gan")})
    plot, args.plot = args.plot, None  # two stages, two plots (MichiGAN.plot_history)
    code = _finish_training("michigan", model, args, log_path, t0)
    if plot:
        paths = model.plot_history(plot)
        print(f"scatlas train michigan: loss curves {', '.join(map(str, paths))}")
    return code


def cmd_generate(args: argparse.Namespace) -> int:
    import anndata as ad
    import numpy as np
    import pandas as pd

    from .._validate import ScatlasInputError
    from ..io import write_h5ad
    from ..models.io import load

    t0 = time.perf_counter()
    model = load(args.model)
    if getattr(model, "kind", None) != "michigan":
        raise ScatlasInputError(f"{args.model!r} is a {model.kind!r} model; generate needs a "
                                "michigan model", param="model")
    data = _read(args.input)
    if args.latent_key is not None:
        if args.latent_key not in data.obsm:
            raise ScatlasInputError(f"obsm has no {args.latent_key!r} (it has "
                                    f"{sorted(data.obsm)})", param="z")
        source = np.asarray(data.obsm[args.latent_key])
        read = {}
    else:
        source = data
        read = {"layer": args.layer, "input": args.input_kind, "use_raw": args.use_raw,
                "min_overlap": args.min_overlap}
    X = model.generate(source, args.n_per_cell, seed=args.seed, batch_size=args.batch_size,
                       **read)
    k = args.n_per_cell
    obs = data.obs.iloc[np.repeat(np.arange(data.n_obs), k)].copy()
    obs.insert(0, "source_cell", np.repeat(np.asarray(data.obs_names), k))
    obs.insert(1, "sample", np.tile(np.arange(k), data.n_obs))
    obs.index = pd.Index([f"{c}-{s}" for c, s in zip(obs["source_cell"], obs["sample"],
                                                       strict=True)])
    out = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=model.genes))
    out.uns["michigan"] = {"model": repr(model), "n_per_cell": k, "seed": args.seed,
                           "values": "log1p of counts per 1e4 (generated)"}
    write_h5ad(out, args.output)
    print(f"scatlas generate: {X.shape[0]} profiles ({k} per cell, {X.shape[1]} genes) -> "
          f"{args.output} ({time.perf_counter() - t0:.1f} s)")
    return 0


def register_train(models: argparse._SubParsersAction) -> None:
    """Add ``michigan`` to ``scatlas train`` (called by :func:`scatlas.cli.models.register`)."""
    p = models.add_parser(
        "michigan", help="MichiGAN: beta-TCVAE + latent-conditioned WGAN-GP (generative)",
        description="Train MichiGAN (Yu & Welch 2021): a beta-TCVAE on log-normalised "
        "expression, then a Wasserstein GAN with gradient penalty conditioned on its latent "
        "means; writes a model folder (scatlas generate samples from it).")
    p.add_argument("input", help="input .h5ad (raw counts, or see --input-kind)")
    p.add_argument("--out", required=True, help="model folder to write (atomically)")
    p.add_argument("--n-top-genes", type=int, default=None,
                   help="train on the N most variable genes (0: every gene; default 2000)")
    p.add_argument("--batch-size", type=int, default=128, help="cells per step (default 128)")
    p.add_argument("--vae-steps", type=int, default=None,
                   help="VAE steps (default ~200 passes over the cells, 500..20,000)")
    p.add_argument("--gan-steps", type=int, default=None,
                   help="GAN steps (default ~600 passes, 1,000..50,000; the generator steps "
                   "once per --n-critic)")
    p.add_argument("--lr", type=float, default=1e-3, help="VAE peak learning rate (1e-3)")
    p.add_argument("--gan-lr", type=float, default=5e-4, help="GAN learning rate (5e-4)")
    p.add_argument("--latent-dim", type=int, default=None, help="latent size (default 10)")
    p.add_argument("--beta", type=float, default=None,
                   help="weight of the total correlation (default 2; 1: a plain VAE)")
    p.add_argument("--hidden", type=int, default=None, help="VAE hidden units (default 256)")
    p.add_argument("--noise-dim", type=int, default=None, help="generator noise (default 10)")
    p.add_argument("--n-critic", type=int, default=None,
                   help="critic steps per generator step (default 5)")
    p.add_argument("--gp-weight", type=float, default=None,
                   help="gradient-penalty weight lambda (default 10)")
    _loop_args(p)
    p.add_argument("--seed", type=int, default=0)
    _input_args(p, train=True)
    p.set_defaults(func=cmd_train_michigan, param_flags=TRAIN_FLAGS, param_values=VALUES)


def register(sub: argparse._SubParsersAction, *, common: Callable, io_args: Callable) -> None:
    p = sub.add_parser("generate", help="sample profiles with a MichiGAN model",
                       description="Generate log-normalised profiles with a MichiGAN model's "
                       "generator, conditioned on each input cell's latent code (its posterior "
                       "mean, or obsm[--latent-key]); writes them as a new AnnData.")
    p.add_argument("--model", required=True, help="michigan model folder")
    p.add_argument("input", help="input .h5ad (cells read as the model was trained)")
    p.add_argument("output", help="output .h5ad of generated profiles (written atomically)")
    p.add_argument("--n-per-cell", type=int, default=1, help="profiles per cell (default 1)")
    p.add_argument("--latent-key", default=None,
                   help="condition on obsm[KEY] (latent codes) instead of encoding the cells")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator's noise")
    p.add_argument("--batch-size", type=int, default=4096, help="cells per chunk")
    p.add_argument("--min-overlap", type=float, default=0.5,
                   help="minimum fraction of the model's genes present (default 0.5)")
    _input_args(p, train=False)
    p.set_defaults(func=cmd_generate, param_flags=GENERATE_FLAGS, param_values=VALUES)
