"""Train and apply JAX cell encoders from AnnData: ``train_metric``, ``embed``."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._validate import (
    ScatlasInputError,
    check_obs_key,
    config_overrides,
)
from ..models.data import DEFAULT_BATCH_SIZE, training_batch_size
from ._training import (
    GENE_SELECTION_CELLS,
    OWN_TRAIN_ARGS,
    check_adata,
    in_memory,
    merged_model_settings,
    select_genes,
    training_data,
    training_matrix,
)

log = logging.getLogger(__name__)


def _labels(adata: ad.AnnData, key: str, what: str) -> pd.Series:
    check_obs_key(adata, key, what)
    values = adata.obs[key]
    if values.isna().any():
        raise ScatlasInputError(
            f"{what} {key!r} has {int(values.isna().sum())} missing value(s); drop or fill them",
            param=what)
    return values.astype(str)


def _check_label_sizes(labels: pd.Series, key: str) -> list[str]:
    """The labels with a single cell (kept: they serve as negatives, never as anchors; a
    warning names them). Raises :class:`ScatlasInputError` unless at least two labels have two
    or more cells (a triplet needs an anchor, a positive and a negative of another label)."""
    counts = labels.value_counts()
    usable = counts[counts >= 2]
    if len(usable) < 2:
        raise ScatlasInputError(
            f"{key!r} has {len(usable)} label(s) with at least two cells ({len(counts)} labels "
            f"in all); metric learning needs at least two such labels"
        )
    rare = sorted(str(x) for x in counts.index[counts < 2])
    if rare:
        shown = rare[:10] + ([f"... ({len(rare)} in all)"] if len(rare) > 10 else [])
        warnings.warn(
            f"label(s) {shown} of {key!r} have a single cell: kept as negatives only (a cell "
            "without a same-label partner cannot anchor a triplet), as SCimilarity does",
            UserWarning, stacklevel=3,
        )
    return rare


def _split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, val_rows)``, sorted: about ``fraction`` of each label's cells held out for
    validation, never so many that fewer than two (or its only cell) stay in training."""
    if not 0 <= fraction < 1:
        raise ScatlasInputError(f"validation_fraction must be in [0, 1), got {fraction!r}")
    rng = np.random.default_rng([seed, 7])
    perm = rng.permutation(labels.size)
    codes = pd.factorize(labels[perm])[0]
    rank = np.zeros(perm.size, np.int64)  # a cell's rank among its label's cells in perm
    for c in range(codes.max() + 1 if codes.size else 0):
        at = np.flatnonzero(codes == c)
        rank[at] = np.arange(at.size)
    size = np.bincount(codes)[codes]
    n_val = np.minimum(np.round(fraction * size), np.maximum(size - 2, 0))
    held = rank < n_val
    return np.sort(perm[~held]), np.sort(perm[held])


def train_metric(
    adata: ad.AnnData,
    label_key: str,
    study_key: str | None = None,
    *,
    seed: int = 0,
    layer: str | None = None,
    input: str = "counts",
    use_raw: bool = False,
    hierarchy: dict[str, Any] | str | Path | None = None,
    batch_size: int | None = None,
    max_steps: int | None = None,
    validation_fraction: float = 0.1,
    balance: str | None = "label_study",
    learning_rate: float = 5e-3,
    patience: int | None | str = "auto",
    n_top_genes: int | None | str = "auto",
    preset: str = "auto",
    eval_every: int = 100,
    checkpoint_dir: str | Path | None = None,
    log_path: str | Path | None = None,
    progress: bool | None = None,
    data_parallel: bool = True,
    sparse_step: bool | None = None,
    train: Any = None,
    model: Any = None,
    **model_kw: Any,
):
    """Train a SCimilarity-style metric-learning encoder on labelled cells.

    Parameters
    ----------
    adata
        Cells x genes, raw counts (``input="counts"``, log-normalised per batch) or already
        log-normalised data (``input="lognorm"``: ``log1p`` of normalised counts), in ``X``,
        ``layers[layer]`` or, with ``use_raw=True``, ``adata.raw`` (its ``X`` and genes); in
        memory or backed (rows are read per mini-batch). Its ``var_names`` (or the
        ``n_top_genes`` most variable of them) become the model's gene list; counts are
        normalised over those genes (SCimilarity normalises over its gene order too), at
        training and embedding alike. The values must be of the kind given: raw counts are
        non-negative integers; log-normalised values are finite and never negative, so scaled
        or z-scored data are refused (:func:`scatlas.models.inputs.check_input_values`). The
        model records ``input``, ``layer`` and ``use_raw`` (``model.input_spec``, saved with
        it) and embeds new data the same way by default.
    label_key
        ``obs`` column of cell labels. At least two labels need two or more cells. A label with
        a single cell is kept with a warning naming it: it cannot anchor a triplet (no positive)
        but serves as a negative, as in SCimilarity (the log's ``n_negative_only`` counts the
        mined triplets whose negative has such a label).
    study_key
        ``obs`` column of the study / batch: positives are preferably drawn across studies, and
        sampling balances studies. None: one study.
    hierarchy
        Labels related by a hierarchy are never used as negatives: a child -> parent(s) mapping
        or a file for :func:`scatlas.models.metric.read_hierarchy` (e.g. cell-ontology edges).
    batch_size, max_steps
        Cells per step (default :func:`scatlas.models.data.default_batch_size`:
        ``min(1000, n_train // 2)``,
        SCimilarity's 1,000 from 2,000 training cells on; capped at the training cells) and
        steps (default: about 20 passes over the training cells, between 200 and 50,000).
        Cells are drawn without repeats within a batch; where the balanced sampling weights
        concentrate on few cells the batch is completed by weighted sampling without
        replacement (:func:`scatlas.models.data.draw_without_repeats`), so any batch size up to
        the training cells works.
    validation_fraction
        Cells held out for the validation loss, about this fraction of each label (labels keep
        at least two cells, or their only one, in training); at most 10 batches of them
        (SCimilarity's ``limit_val_batches``). The validation loss is logged every
        ``eval_every`` steps, and the weights of the best validation step are returned; with
        ``patience`` they also stop training early.
    patience, n_top_genes
        ``"auto"``: the preset's. ``n_top_genes``: train on the N most variable genes of the
        training cells (scanpy's ``flavor="seurat"``, on at most 20,000 of them); None: every
        gene.
    preset
        Defaults for what is not given (:func:`preset_settings`): ``"auto"`` (chosen by inner
        cross-validation on real held-out batches, docs/models.md) or ``"scimilarity"``
        (SCimilarity 0.4's: every gene, 3 x 1,024, triplet weight 0.001, batch 1,000).
    sparse_step
        Train on CSR batches (:mod:`scatlas.models.sparse_ops`: the first layer over the
        non-zeros; CPU, one device, float32). None (default): chosen when it pays, from 1,000
        genes at up to 30 % non-zero inputs (faster steps at every size measured, 1,000 to
        28,231 genes, with SCimilarity's 1,024-wide layers and batch 1,000:
        ``python -m bench.metric_parts``); True insists; False never. The loss
        is the same; the random dropout draws differ, so a run is reproducible for a given
        choice.
    train
        Further :class:`~scatlas.models.train.TrainConfig` settings, as a ``TrainConfig`` (its
        non-default fields) or a mapping: ``schedule`` ("cosine" | "constant"),
        ``warmup_steps``, ``min_lr_ratio``, ``clip_norm``, ``checkpoint_every``,
        ``keep_checkpoints``, ``log_every``, ``prefetch``, ``reuse_host_memory``. A setting this
        function takes as its own argument (``max_steps``, ``learning_rate``, ...) is refused
        here: pass it as that argument.
    model, **model_kw
        :class:`~scatlas.models.metric.MetricConfig` fields (defaults: the preset's), as a
        ``MetricConfig`` (its non-default fields; ``n_genes`` comes from the data), a mapping,
        or keywords (not the same field twice):
        ``hidden``, ``latent_dim``,
        ``dropout``, ``input_dropout``, ``objective`` ("triplet" | "infonce"), ``margin``,
        ``metric_weight``, ``mining`` ("semihard" | "hardest" | "random"), ``across_studies``,
        ``negatives`` ("all" | "same_study": only the anchor's own study's cells),
        ``temperature``, ``l1``, ``bf16``, ``input_pcs`` (the network's input: the scores on
        this many principal components of the training cells' log-normalised genes, a fixed
        first layer fitted before training, :func:`scatlas.models.metric.fit_input_pca`, kept
        in the model and applied when embedding; None: the genes themselves; preset "auto":
        50, unless ``sparse_step=True`` is asked for, which trains on the genes).

    Returns
    -------
    :class:`~scatlas.models.MetricEncoder`, with the training summary in ``model.info``.
    """
    from ..models.data import CellBatches, MatrixSource, StoreBatches, validation_batches
    from ..models.inputs import InputSpec
    from ..models.metric import (
        INPUT_PCA,
        MetricConfig,
        MetricEncoder,
        MetricTask,
        read_hierarchy,
        related_labels,
        use_sparse_step,
    )
    from ..models.train import TrainConfig, fit

    adata = check_adata(adata)
    model_kw = merged_model_settings(MetricConfig, model, model_kw)
    train_kw = config_overrides(TrainConfig, train, "train", own_args=OWN_TRAIN_ARGS)
    spec = InputSpec(input, layer, bool(use_raw))
    labels = _labels(adata, label_key, "label_key")
    rare = _check_label_sizes(labels, label_key)
    studies = _labels(adata, study_key, "study_key") if study_key is not None else None
    adata = training_data(adata, layer, bool(use_raw))
    X = training_matrix(adata, layer, input, "adata.raw.X" if use_raw else
                "X" if layer is None else f"layers[{layer!r}]")
    train_rows, val_rows = _split(labels.to_numpy(), validation_fraction, seed)
    chosen = preset_settings(preset, train_rows.size)
    if n_top_genes == "auto":
        n_top_genes = chosen["n_top_genes"]
    if patience == "auto":
        patience = chosen["patience"]
    genes = select_genes(X, train_rows, n_top_genes, input)
    preset_model = dict(chosen["model"])
    if sparse_step and "input_pcs" not in model_kw:
        preset_model.pop("input_pcs", None)  # an explicit sparse step trains on the genes
    config = MetricConfig(n_genes=adata.n_vars if genes is None else genes.size,
                          **{**preset_model, **model_kw})
    projection = None
    if config.input_pcs is not None:
        projection = _input_pca(X, train_rows, genes, input, config.input_pcs, seed)
        config = dataclasses.replace(config, input_pcs=projection["components"].shape[1])
    if batch_size is None and chosen["batch_size"] is not None:
        batch_size = chosen["batch_size"]
    batch_size, n_dev = training_batch_size(batch_size, train_rows.size, data_parallel)
    if max_steps is None:
        max_steps = int(min(50_000, max(200, math.ceil(20 * train_rows.size / batch_size))))
    source = MatrixSource(X, columns=genes)
    # uniform sampling from a store on disk: block-shuffled slabs, not one random read per cell
    loader = StoreBatches if balance is None and not in_memory(X) else CellBatches
    batches = loader(
        source, labels=labels.to_numpy(), studies=None if studies is None else studies.to_numpy(),
        batch_size=batch_size, balance=balance, transform="lognorm" if input == "counts" else None,
        rows=train_rows, seed=seed, check_input=not in_memory(X), nonnegative=True,
    )
    density = batches.density() if sparse_step is None else None
    batches.sparse = use_sparse_step(sparse_step, config, n_dev, density)
    if isinstance(hierarchy, str | Path):
        hierarchy = read_hierarchy(hierarchy)
    related = related_labels(batches.label_names, hierarchy)
    tcfg = TrainConfig(
        max_steps=max_steps, learning_rate=learning_rate, seed=seed, eval_every=eval_every,
        patience=patience, checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        log_path=None if log_path is None else str(log_path), progress=progress,
        data_parallel=data_parallel, **train_kw,
    )
    val = validation_batches(batches, val_rows, batch_size, n_dev)
    negative_only = np.isin(batches.label_names, rare)
    result = fit(MetricTask(config, tcfg, related, negative_only, projection), batches, tcfg,
                 val_batches=val)
    variables = dict(result.variables)
    if projection is not None:
        variables[INPUT_PCA] = projection
    info = {
        "label_key": label_key, "study_key": study_key, "n_cells": int(adata.n_obs),
        "n_train": int(train_rows.size), "n_val": int(val_rows.size), "steps": result.steps,
        "batch_size": batch_size, "best_step": result.best_step, "best_val": result.best_val,
        "stopped_early": result.stopped_early, "cells_per_s": result.cells_per_s,
        "seed": seed, "sparse_step": batches.sparse, "train": tcfg.to_dict(),
        "negative_only_labels": rare, "preset": preset, "n_top_genes": n_top_genes,
        "patience": patience,
    }
    var_names = adata.var_names if genes is None else adata.var_names[genes]
    encoder = MetricEncoder(config, variables, var_names,
                            label_names=batches.label_names, info=info, input_spec=spec)
    encoder.history = result.history
    return encoder


PRESETS = ("auto", "scimilarity")


def preset_settings(preset: str, n_train: int) -> dict[str, Any]:
    """The defaults :func:`train_metric` fills in for what the caller leaves out.

    ``"scimilarity"``: SCimilarity 0.4's settings (every gene, hidden 3 x 1,024, latent 128,
    triplet weight 0.001, batch 1,000 capped at the training cells, no early stopping).
    ``"auto"``: the defaults chosen by inner cross-validation on real held-out batches
    (docs/models.md, "Defaults on real data").
    Returns ``{"model": MetricConfig fields, "n_top_genes", "patience", "batch_size"}``.
    """
    if preset == "scimilarity":
        return {"model": {}, "n_top_genes": None, "patience": None,
                "batch_size": DEFAULT_BATCH_SIZE}
    if preset == "auto":
        return {"model": dict(AUTO_MODEL), "n_top_genes": AUTO_N_TOP_GENES,
                "patience": AUTO_PATIENCE, "batch_size": None}
    raise ScatlasInputError(f"preset must be one of {PRESETS}, got {preset!r}")


#: the "auto" preset, chosen by inner leave-one-batch-out cross-validation on CellBench and
#: Baron among ``bench.quality.encoder.GRID`` (docs/models.md, "Defaults on real data"): the
#: 2,000 most variable genes, one hidden layer of 256, a 64-dimensional embedding, supervised
#: InfoNCE weighted 0.5 against the reconstruction, on the 50 PCs of the training cells as the
#: network's input (inner CV over both seeds: Baron +0.011, CellBench tie; docs/models.md);
#: SCimilarity's dropout, L1 and optimiser
AUTO_MODEL: dict[str, Any] = {"hidden": (256,), "latent_dim": 64, "objective": "infonce",
                              "metric_weight": 0.5, "input_pcs": 50}
AUTO_N_TOP_GENES: int | None = 2000
AUTO_PATIENCE: int | None = None


def _input_pca(X: Any, train_rows: np.ndarray, genes: np.ndarray | None, input: str,
               n_components: int, seed: int) -> dict[str, np.ndarray]:
    """:func:`scatlas.models.metric.fit_input_pca` on at most :data:`GENE_SELECTION_CELLS`
    evenly spaced training cells, log-normalised over the model's genes as the training batches
    are (``input="counts"``) or as given."""
    from ..models.data import lognorm
    from ..models.inputs import check_input_values
    from ..models.metric import fit_input_pca

    step = max(1, -(-train_rows.size // GENE_SELECTION_CELLS))
    block = X[np.sort(train_rows)[::step]]
    if genes is not None:
        block = block[:, genes]
    if not sp.issparse(block):
        block = np.asarray(block, np.float32)
    # the cells read from a backed file are checked here, before the loader sees any
    check_input_values(block, input, "the cells read for the input PCA")
    if input == "counts":
        block = lognorm(block)
    return fit_input_pca(block, n_components, seed)


def embed(
    adata: ad.AnnData,
    model: Any,
    *,
    key_added: str = "X_scatlas",
    layer: str | None = None,
    input: str | None = None,
    use_raw: bool | None = None,
    batch_size: int = 10_000,
    min_overlap: float = 0.5,
    precision: str | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Embed ``adata`` with a trained model (or a model folder) into ``.obsm[key_added]``.

    Genes are aligned to the model's by name (zero fill, ``min_overlap`` enforced). The data
    are read as the model was trained (``model.input_spec``): ``input`` None is the recorded
    kind (raw counts are log-normalised, log-normalised values used as they are), ``layer``
    None the recorded layer where ``adata`` has it, ``use_raw`` None ``adata.raw`` where the
    model was trained on it (:meth:`MetricEncoder.embed`). ``precision`` ("float32" or
    "bfloat16"; default the model's) is passed on. Returns the (n_cells, latent_dim) float32
    embedding and records the model in ``.uns[key_added]``.
    """
    from ..models.io import load

    if isinstance(model, str | Path):
        model = load(model)
    if not isinstance(adata, ad.AnnData):
        raise ScatlasInputError(f"expected an AnnData, got {type(adata).__name__}")
    extra = {} if precision is None else {"precision": precision}
    if use_raw is not None:
        extra["use_raw"] = use_raw
    Z = model.embed(adata, layer=layer, input=input, batch_size=batch_size,
                    min_overlap=min_overlap, progress=progress, **extra)
    adata.obsm[key_added] = Z
    adata.uns[key_added] = {"model": repr(model), "n_genes": len(model.genes),
                            "latent_dim": int(Z.shape[1])}
    return Z

