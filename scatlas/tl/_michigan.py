"""Train MichiGAN (a beta-TCVAE, then a WGAN-GP conditioned on its latent means) from AnnData:
``train_michigan``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anndata as ad

from .._validate import check_positive_int, config_overrides
from ..models.data import training_batch_size
from ._training import (
    OWN_TRAIN_ARGS,
    check_adata,
    default_validation_fraction,
    holdout,
    in_memory,
    merged_model_settings,
    select_genes,
    training_data,
    training_matrix,
)

DEFAULT_N_TOP_GENES = 2000


def _steps(value: int | None, passes: int, n_train: int, batch_size: int, lo: int, hi: int,
           name: str) -> int:
    if value is None:
        return int(min(hi, max(lo, math.ceil(passes * n_train / batch_size))))
    return check_positive_int(value, name)


def train_michigan(
    adata: ad.AnnData,
    seed: int = 0,
    *,
    layer: str | None = None,
    input: str = "counts",
    use_raw: bool = False,
    n_top_genes: int | None = DEFAULT_N_TOP_GENES,
    batch_size: int = 128,
    vae_steps: int | None = None,
    gan_steps: int | None = None,
    validation_fraction: float | None = None,
    learning_rate: float = 1e-3,
    gan_learning_rate: float = 5e-4,
    patience: int | None = None,
    eval_every: int = 100,
    checkpoint_dir: str | Path | None = None,
    log_path: str | Path | None = None,
    progress: bool | None = None,
    data_parallel: bool = True,
    train: Any = None,
    gan_train: Any = None,
    model: Any = None,
    **model_kw: Any,
):
    """Train MichiGAN (Yu & Welch 2021) on cells: a beta-TCVAE, then a conditional WGAN-GP.

    Parameters
    ----------
    adata
        Cells x genes: raw counts (``input="counts"``, log-normalised here: ``log1p`` of counts
        per 1e4 over the model's genes) or log-normalised values (``input="lognorm"``), in
        ``X``, ``layers[layer]`` or, with ``use_raw``, ``adata.raw``; checked as
        :func:`train_metric` checks them (negative values, scaled data, are refused). The model
        records the kind and reads new cells the same way.
    seed
        Parameters, noise, the validation split and the batches derive from it.
    n_top_genes
        Train on the most variable genes of the training cells (scanpy's ``seurat`` flavour;
        default 2,000); None: every gene.
    batch_size
        Cells per step of both stages (default 128, capped at the training cells).
    vae_steps, gan_steps
        Steps of each stage (default: about 200 passes over the training cells, 500..20,000,
        for the VAE; 600 passes, 1,000..50,000, for the GAN, whose generator takes one step in
        ``n_critic``; 1,221 and 3,661 for 781 cells at batch 128, close to the 1,500 and 4,000
        of the CellBench benchmark, docs/generative.md).
    validation_fraction
        Cells held out for the VAE's validation loss (its best weights are kept; with
        ``patience`` training stops early). Default: none below 1,000 cells, else 0.1.
    learning_rate, gan_learning_rate
        VAE: AdamW with a cosine schedule (1e-3); GAN: Adam (``adam_b1``, ``adam_b2``) at a
        constant rate (5e-4, as the benchmark; WGAN-GP's own examples use 1e-4 to 2e-4 over
        many more steps).
    checkpoint_dir, log_path
        ``checkpoint_dir/vae`` and ``checkpoint_dir/gan`` hold each stage's orbax checkpoints
        (a rerun resumes); logs go to ``STEM.vae.jsonl`` and ``STEM.gan.jsonl`` beside
        ``log_path``.
    train, gan_train
        Further :class:`~scatlas.models.train.TrainConfig` settings of the VAE stage and of the
        GAN stage (a ``TrainConfig`` or a mapping: ``schedule``, ``warmup_steps``,
        ``clip_norm``, ``checkpoint_every``, ...); a setting this function takes itself is
        refused.
    model, **model_kw
        :class:`~scatlas.models.michigan.MichiGANConfig` fields (a config, a mapping or keywords;
        not the same field twice): ``latent_dim`` (10),
        ``hidden`` (256), ``n_layers`` (2), ``beta`` (2; 1: a plain VAE; docs/generative.md),
        ``alpha``, ``gamma`` (1), ``noise_dim`` (10), ``gen_hidden``, ``critic_hidden``
        (256), ``gen_layers``, ``critic_layers`` (2), ``gp_weight`` (10), ``n_critic`` (5),
        ``adam_b1`` (0.5), ``adam_b2`` (0.9).

    Returns
    -------
    :class:`~scatlas.models.michigan.MichiGAN`, the training summary in ``model.info`` and each
    stage's log records in ``model.history["vae"]`` / ``["gan"]``.
    """
    from ..models.data import MatrixSource
    from ..models.inputs import InputSpec
    from ..models.michigan import MichiGAN, MichiGANConfig
    from ..models.train import TrainConfig

    adata = check_adata(adata)
    spec = InputSpec(input, layer, bool(use_raw))
    adata = training_data(adata, layer, bool(use_raw))
    X = training_matrix(adata, layer, input, "adata.raw.X" if use_raw else
                "X" if layer is None else f"layers[{layer!r}]")
    if validation_fraction is None:
        validation_fraction = default_validation_fraction(adata.n_obs)
    train_rows, val_rows = holdout(adata.n_obs, validation_fraction, seed)
    genes = select_genes(X, train_rows, n_top_genes, input)
    batch_size, _ = training_batch_size(batch_size, train_rows.size, data_parallel)
    vae_steps = _steps(vae_steps, 200, train_rows.size, batch_size, 500, 20_000, "vae_steps")
    gan_steps = _steps(gan_steps, 600, train_rows.size, batch_size, 1000, 50_000, "gan_steps")
    names = adata.var_names if genes is None else adata.var_names[genes]
    model_kw = merged_model_settings(MichiGANConfig, model, model_kw)
    own = (*OWN_TRAIN_ARGS, "max_steps")
    vae_kw = config_overrides(TrainConfig, train, "train", own_args=own)
    gan_kw = {"schedule": "constant", "weight_decay": 0.0, "clip_norm": None,
              **config_overrides(TrainConfig, gan_train, "gan_train", own_args=own)}
    config = MichiGANConfig(n_genes=len(names), **model_kw)

    def stage(name: str, steps: int, lr: float, **kw: Any) -> TrainConfig:
        stem = None if log_path is None else Path(log_path).with_suffix("")
        return TrainConfig(
            max_steps=steps, learning_rate=lr, seed=seed, eval_every=eval_every,
            checkpoint_dir=None if checkpoint_dir is None else str(Path(checkpoint_dir) / name),
            log_path=None if stem is None else str(stem.with_name(f"{stem.name}.{name}.jsonl")),
            progress=progress, data_parallel=data_parallel, **kw)

    info = {"n_cells": int(adata.n_obs), "seed": seed, "n_top_genes": n_top_genes,
            "input": spec.to_dict()}
    return MichiGAN.fit(
        MatrixSource(X, columns=genes), names, config,
        vae_train=stage("vae", vae_steps, learning_rate, patience=patience, **vae_kw),
        gan_train=stage("gan", gan_steps, gan_learning_rate, **gan_kw),
        rows=train_rows, val_rows=val_rows, batch_size=batch_size,
        transform="lognorm" if input == "counts" else "none", input_spec=spec,
        check_input=not in_memory(X), info=info)
