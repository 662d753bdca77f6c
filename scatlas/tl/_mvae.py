"""Train a multimodal VAE (product-of-experts posterior) from AnnData / MuData: ``train_mvae``."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._validate import ScatlasInputError, check_positive_int, config_overrides
from ._training import (
    OWN_TRAIN_ARGS,
    default_validation_fraction,
    holdout,
    merged_model_settings,
)

log = logging.getLogger(__name__)

DEFAULT_MODALITIES = {"rna": "X", "protein": "obsm/protein_counts"}
DEFAULT_N_TOP_GENES = 2000
#: model defaults of ``train_mvae`` (chosen by nested cross-validation on CITE-seq, docs/mvae.md)
DEFAULT_MODEL = {"dropout": 0.3, "alignment_weight": 0.1, "library_weight": 5.0,
                 "latent_dim": 10}
#: experts of modalities with more features than this read that many principal components
#: (``train_mvae(input_pcs=...)``; chosen by nested cross-validation, docs/mvae.md)
DEFAULT_INPUT_PCS = 50


def _select_features(mods: list, train_rows: np.ndarray, n_top: int | None) -> None:
    """Keep the ``n_top`` most variable features of every count modality wider than that."""
    import scipy.sparse as sp

    from ..models.mvae_data import COUNT_LIKELIHOODS, highly_variable

    if n_top is None:
        return
    n_top = check_positive_int(n_top, "n_top_genes")
    for mod in mods:
        if mod.likelihood not in COUNT_LIKELIHOODS or mod.n_features <= n_top:
            continue
        rows = train_rows[mod.observed[train_rows]]
        keep = highly_variable(mod.matrix, rows, n_top)
        mod.matrix = mod.matrix[:, keep]
        if sp.issparse(mod.matrix):
            mod.matrix = sp.csr_matrix(mod.matrix)
        mod.features = mod.features[keep]
        empty = np.asarray(mod.matrix.sum(axis=1)).ravel() == 0
        mod.observed = mod.observed & ~empty
    observed = np.stack([m.observed for m in mods])
    if not observed.any(axis=0).all():
        raise ScatlasInputError(
            f"{int((~observed.any(axis=0)).sum())} cell(s) have no counts in the selected "
            f"features of any modality; drop them or raise n_top_genes"
        )


def _input_pcs(mods: list, input_pcs: Any) -> list[int]:
    """Requested PCA input width per modality: an int ``k`` applies to every modality with more
    than ``k`` features; a mapping names them (others 0); None / 0: none."""
    if input_pcs is None:
        return [0] * len(mods)
    if isinstance(input_pcs, Mapping):
        unknown = set(input_pcs) - {m.name for m in mods}
        if unknown:
            raise ScatlasInputError(f"input_pcs given for unknown modalities {sorted(unknown)}")
        want = [input_pcs.get(m.name) or 0 for m in mods]
        return [check_positive_int(k, "input_pcs") if k else 0 for k in want]
    if not input_pcs:
        return [0] * len(mods)
    k = check_positive_int(input_pcs, "input_pcs")
    return [k if m.n_features > k else 0 for m in mods]


def _library_stats(mods: list, rows: np.ndarray) -> tuple[list[float], list[float]]:
    means, sds = [], []
    for mod in mods:
        r = rows[mod.observed[rows]]
        if r.size == 0:
            raise ScatlasInputError(f"no training cell has modality {mod.name!r}")
        loglib = np.log(np.maximum(np.asarray(mod.matrix[r].sum(axis=1)).ravel(), 1.0))
        means.append(float(loglib.mean()))
        sds.append(float(max(loglib.std(), 0.1)))
    return means, sds


def train_mvae(
    adata: Any,
    modalities: Mapping[str, Any] | None = None,
    likelihoods: Mapping[str, str] | None = None,
    seed: int = 0,
    *,
    batch_key: str | None = None,
    masks: Mapping[str, Any] | None = None,
    n_top_genes: int | None = DEFAULT_N_TOP_GENES,
    batch_size: int = 128,
    max_steps: int | None = None,
    validation_fraction: float | None = None,
    learning_rate: float = 2e-3,
    weight_decay: float = 0.01,
    kl_warmup_steps: int | None = None,
    patience: int | None = None,
    eval_every: int = 100,
    checkpoint_dir: str | Path | None = None,
    log_path: str | Path | None = None,
    progress: bool | None = None,
    data_parallel: bool = True,
    input_pcs: int | Mapping[str, int] | None = DEFAULT_INPUT_PCS,
    train: Any = None,
    model: Any = None,
    **model_kw: Any,
):
    """Train a multimodal VAE with a product-of-experts posterior on paired or mosaic cells.

    Parameters
    ----------
    adata
        AnnData (or MuData, with ``mudata`` installed) of the cells.
    modalities
        ``{name: location}``; a location is ``"X"``, ``"layers/NAME"``, ``"obsm/NAME"`` (MuData:
        ``"MOD"``, ``"MOD/layers/NAME"``, ...) or a (n_cells, n_features) matrix. Default
        ``{"rna": "X", "protein": "obsm/protein_counts"}``. Raw counts for count likelihoods.
        A cell misses a modality where its row is all-NaN or all-zero (or ``masks`` says so);
        every cell needs at least one modality.
    likelihoods
        ``{name: "nb" | "nb_mixture" | "bernoulli" | "log1p_normal"}``; missing names get the
        default for the modality name (rna/gex/... and protein/adt/...: ``"nb"``;
        atac/peaks/...: ``"bernoulli"``). ``"log1p_normal"``: a Gaussian on ``log1p`` of the
        counts, no library offset (raw counts in; docs/mvae.md).
    seed
        Parameters, dropout, noise, the validation split and the batches derive from it.
    batch_key
        ``obs`` column of a batch covariate given to the decoders (batch correction).
    masks
        ``{name: bool array or obs column}``: False marks the modality missing in that cell.
    n_top_genes
        Keep only this many highly variable features (scanpy's ``seurat`` flavour, on the
        training cells) of every count modality wider than that (default 2,000); None: all.
    batch_size, max_steps
        Cells per step (default 128, capped at the training cells) and steps (default: about
        200 passes over the training cells, between 500 and 50,000).
    validation_fraction
        Cells held out for the validation negative ELBO (every ``eval_every`` steps; the
        weights of the best validation are returned, and with ``patience`` training stops
        early). Default None: 0 below 1,000 cells (every cell trains), else 0.1.
    learning_rate, weight_decay
        AdamW with a cosine schedule (:class:`~scatlas.models.train.TrainConfig`).
    kl_warmup_steps
        Steps of linear KL warm-up from 0 to 1 (default: a third of ``max_steps``).
    input_pcs
        ``k`` (default 50): the expert of every modality with more than ``k`` features (RNA
        after the HVG selection, ATAC, wide protein panels; not the 49 ADTs of the CITE-seq
        benchmark) reads the ``k`` principal-component scores of its input instead
        (``log1p(1e4 x / total)``, or the 0/1 peaks), a fixed centred linear layer fitted on
        (at most 20,000 of) the training cells before training
        (:func:`scatlas.models.mvae.fit_expert_pca`; at most ``n_train - 1`` components), as
        the metric encoder's ``input_pcs`` and GLUE's PCA / LSI encoder inputs; a mapping
        ``{name: k}`` sets it per modality; None or 0: every expert reads its features.
    train
        Further :class:`~scatlas.models.train.TrainConfig` settings, as a ``TrainConfig`` (its
        non-default fields) or a mapping: ``schedule`` ("cosine" | "constant"),
        ``warmup_steps``, ``min_lr_ratio``, ``clip_norm``, ``checkpoint_every``,
        ``keep_checkpoints``, ``log_every``, ``prefetch``, ``reuse_host_memory``. A setting this
        function takes as its own argument (``max_steps``, ``learning_rate``, ...) is refused
        here: pass it as that argument.
    model, **model_kw
        :class:`~scatlas.models.mvae.MVAEConfig` fields, as an ``MVAEConfig`` (its
        non-default fields; the modalities' sizes and library statistics come from the data),
        a mapping, or keywords (not the same field twice): ``latent_dim`` (10), ``hidden`` (128),
        ``n_layers`` (1), ``decoder_layers`` (1), ``dropout`` (0.3), ``n_random_subsets`` (1),
        ``cross_reconstruction`` (True), ``alignment_weight`` (0.1), ``library_weight`` (5),
        ``contrastive_weight`` (0), ``contrastive_temperature`` (0.1), ``library_input``
        (True), ``bf16`` (False). The defaults in brackets are ``train_mvae``'s
        (``DEFAULT_MODEL`` for latent size, dropout, alignment and library weight; chosen by nested
        cross-validation on CITE-seq cells and checked on the synthetic mosaic data, see
        docs/mvae.md).

    Returns
    -------
    :class:`~scatlas.models.mvae.MultimodalVAE`, with the training summary in ``model.info``
    and the log records in ``model.history``.
    """
    from ..models.data import training_batch_size, validation_batches
    from ..models.mvae import MultimodalVAE, MVAEConfig, MVAETask, fit_expert_pca
    from ..models.mvae_data import (
        MultiModalBatches,
        batch_codes,
        read_modalities,
        resolve_likelihoods,
    )
    from ..models.train import TrainConfig, fit

    model_kw = merged_model_settings(MVAEConfig, model, model_kw,
                                     own_args=("kl_warmup_steps", "input_pcs"))
    train_kw = config_overrides(TrainConfig, train, "train", own_args=OWN_TRAIN_ARGS)
    if not hasattr(adata, "n_obs") or not hasattr(adata, "obs"):
        raise ScatlasInputError(f"expected an AnnData or MuData, got {type(adata).__name__}")
    if adata.n_obs < 2:
        raise ScatlasInputError(f"need at least 2 cells, got {adata.n_obs}")
    modalities = dict(DEFAULT_MODALITIES if modalities is None else modalities)
    liks = resolve_likelihoods(list(modalities), likelihoods)
    mods = read_modalities(adata, modalities, liks, masks=masks)
    if validation_fraction is None:
        validation_fraction = default_validation_fraction(adata.n_obs)
    train_rows, val_rows = holdout(adata.n_obs, validation_fraction, seed)
    _select_features(mods, train_rows, n_top_genes)
    cov, batch_names = batch_codes(adata, batch_key)
    lib_mean, lib_sd = _library_stats(mods, train_rows)

    batch_size, n_dev = training_batch_size(batch_size, train_rows.size, data_parallel)
    if max_steps is None:
        max_steps = int(min(50_000, max(500, math.ceil(200 * train_rows.size / batch_size))))
    max_steps = check_positive_int(max_steps, "max_steps")
    if kl_warmup_steps is None:
        kl_warmup_steps = max_steps // 3
    projections = {m: fit_expert_pca(mod, train_rows, k, seed)
                   for m, (mod, k) in enumerate(zip(mods, _input_pcs(mods, input_pcs),
                                                    strict=True)) if k}
    model_kw["input_pcs"] = tuple(projections[m]["components"].shape[1] if m in projections
                                  else 0 for m in range(len(mods)))
    config = MVAEConfig(
        modalities=tuple(modalities), likelihoods=tuple(liks[m] for m in modalities),
        n_features=tuple(m.n_features for m in mods), log_lib_mean=tuple(lib_mean),
        log_lib_sd=tuple(lib_sd), n_batches=len(batch_names) if batch_key else 0,
        kl_warmup_steps=int(kl_warmup_steps), **{**DEFAULT_MODEL, **model_kw},
    )
    batches = MultiModalBatches(mods, cov, batch_size=batch_size, rows=train_rows, seed=seed)
    tcfg = TrainConfig(
        max_steps=max_steps, learning_rate=learning_rate, weight_decay=weight_decay, seed=seed,
        eval_every=eval_every, patience=patience,
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        log_path=None if log_path is None else str(log_path), progress=progress,
        data_parallel=data_parallel, **train_kw,
    )
    val = validation_batches(batches, val_rows, batch_size, n_dev)
    result = fit(MVAETask(config, projections), batches, tcfg, val_batches=val)
    observed = {m.name: int(m.observed.sum()) for m in mods}
    info = {
        "n_cells": int(adata.n_obs), "n_train": int(train_rows.size), "n_val": int(val_rows.size),
        "observed": observed, "steps": result.steps, "batch_size": batch_size,
        "best_step": result.best_step, "best_val": result.best_val,
        "stopped_early": result.stopped_early, "cells_per_s": result.cells_per_s,
        "compile_s": result.compile_s, "seed": seed, "n_top_genes": n_top_genes,
        "input_pcs": dict(zip(modalities, config.input_pcs, strict=True)),
        "train": tcfg.to_dict(),
    }
    locations = {name: loc for name, loc in modalities.items() if isinstance(loc, str)}
    vae = MultimodalVAE(
        config, result.variables, {m.name: m.features for m in mods}, locations=locations,
        batch_key=batch_key, batch_names=batch_names, info=info,
    )
    vae.history = result.history
    return vae


def impute(
    adata: Any,
    model: Any,
    target: str,
    source: Any = None,
    *,
    key_added: str | None = None,
    library: str | float = "predicted",
    copy: bool = False,
    **kwargs: Any,
) -> Any:
    """Impute a modality of the cells with a trained multimodal VAE, into ``.obsm``.

    ``model``: a :class:`~scatlas.models.mvae.MultimodalVAE` or its saved folder. The expected
    ``target`` values from the ``source`` modalities (:meth:`MultimodalVAE.impute
    <scatlas.models.mvae.MultimodalVAE.impute>`, which ``library`` and ``**kwargs`` —
    ``batch``, ``n_samples``, ``scale``, ``seed``, ``batch_size``, ``min_overlap``,
    ``progress`` — go to) are written to ``adata.obsm[key_added]`` (default
    ``f"{target}_imputed"``) as a DataFrame of the cells x the model's target features, with the
    settings in ``adata.uns[key_added]``. Returns None, or the modified copy with ``copy=True``.
    """
    import pandas as pd

    from ..models.io import load

    if isinstance(model, str | Path):
        model = load(model)
    if getattr(model, "kind", None) != "mvae":
        raise ScatlasInputError(
            "impute needs a multimodal VAE (kind 'mvae'), got a "
            f"{getattr(model, 'kind', type(model).__name__)!r} model", param="model")
    if copy:
        adata = adata.copy()
    values = model.impute(adata, source, target, library=library, **kwargs)
    key = key_added or f"{target}_imputed"
    adata.obsm[key] = pd.DataFrame(values, index=pd.Index(adata.obs_names),
                                   columns=model.features[target])
    adata.uns[key] = {"model": repr(model), "source": list(source or []), "target": target,
                      "library": str(library), "scale": kwargs.get("scale", "counts"),
                      "n_samples": kwargs.get("n_samples", 0)}
    return adata if copy else None
