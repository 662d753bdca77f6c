"""Train and apply JAX cell encoders from AnnData: ``train_metric``, ``embed``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._validate import ScatlasInputError, check_obs_key, check_positive_int

log = logging.getLogger(__name__)


def _check_adata(adata: Any) -> ad.AnnData:
    if not isinstance(adata, ad.AnnData):
        raise ScatlasInputError(f"expected an AnnData, got {type(adata).__name__}")
    if adata.n_obs < 2 or adata.n_vars < 1:
        raise ScatlasInputError(f"adata has shape {adata.shape}; need cells and genes")
    return adata


def _labels(adata: ad.AnnData, key: str, what: str) -> pd.Series:
    check_obs_key(adata, key, what)
    values = adata.obs[key]
    if values.isna().any():
        raise ScatlasInputError(
            f"{what} {key!r} has {int(values.isna().sum())} missing value(s); drop or fill them"
        )
    return values.astype(str)


def _check_label_sizes(labels: pd.Series, key: str) -> None:
    counts = labels.value_counts()
    single = counts[counts < 2]
    if len(single):
        raise ScatlasInputError(
            f"label(s) {list(single.index[:10])} of {key!r} have a single cell; metric learning "
            "needs at least two cells per label (drop them, or merge them into a parent label)"
        )
    if len(counts) < 2:
        raise ScatlasInputError(f"{key!r} has a single label; metric learning needs at least two")


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 <= fraction < 1:
        raise ScatlasInputError(f"validation_fraction must be in [0, 1), got {fraction!r}")
    rng = np.random.default_rng([seed, 7])
    perm = rng.permutation(n)
    n_val = int(round(fraction * n))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _matrix(adata: ad.AnnData, layer: str | None, input: str) -> Any:
    from ..models.inputs import check_integer_counts, matrix_of

    X = matrix_of(adata, layer)
    if _in_memory(X):
        # in memory: checked here in full; backed or lazily read matrices (h5ad backed, zarr)
        # are checked block by block as the loader reads them (CellBatches.take)
        from .._validate import check_matrix

        check_matrix(X, "X" if layer is None else f"layers[{layer!r}]",
                     nonnegative=input == "counts")
        if input == "counts":
            check_integer_counts(X)
    return X


def _in_memory(X: Any) -> bool:
    return isinstance(X, np.ndarray) or sp.issparse(X)


def train_metric(
    adata: ad.AnnData,
    label_key: str,
    study_key: str | None = None,
    *,
    seed: int = 0,
    layer: str | None = None,
    input: str = "counts",
    hierarchy: dict[str, Any] | str | Path | None = None,
    batch_size: int = 1000,
    max_steps: int | None = None,
    validation_fraction: float = 0.1,
    balance: str | None = "label_study",
    learning_rate: float = 5e-3,
    patience: int | None = None,
    eval_every: int = 100,
    checkpoint_dir: str | Path | None = None,
    log_path: str | Path | None = None,
    progress: bool | None = None,
    data_parallel: bool = True,
    sparse_step: bool | None = None,
    **model_kw: Any,
):
    """Train a SCimilarity-style metric-learning encoder on labelled cells.

    Parameters
    ----------
    adata
        Cells x genes, raw counts (``input="counts"``, log-normalised per batch) or already
        log-normalised data (``input="lognorm"``), in ``X`` or ``layers[layer]``; in memory or
        backed (rows are read per mini-batch). Its ``var_names`` become the model's gene list.
    label_key
        ``obs`` column of cell labels (every label needs >= 2 cells).
    study_key
        ``obs`` column of the study / batch: positives are preferably drawn across studies, and
        sampling balances studies. None: one study.
    hierarchy
        Labels related by a hierarchy are never used as negatives: a child -> parent(s) mapping
        or a file for :func:`scatlas.models.metric.read_hierarchy` (e.g. cell-ontology edges).
    batch_size, max_steps
        Cells per step (SCimilarity: 1000; capped at the training cells) and steps (default:
        about 20 passes over the training cells, between 200 and 50,000).
    validation_fraction
        Cells held out for the validation loss (logged every ``eval_every`` steps; with
        ``patience`` they stop training early and the best weights are kept).
    sparse_step
        Train on CSR batches (:mod:`scatlas.models.sparse_ops`: the first layer over the
        non-zeros; CPU, one device, float32). None (default): chosen when it pays, from 1,000
        genes at up to 30 % non-zero inputs (faster steps at every size measured, 1,000 to
        28,231 genes, with SCimilarity's 1,024-wide layers and batch 1,000:
        ``python -m bench.metric_parts``); True insists; False never. The loss
        is the same; the random dropout draws differ, so a run is reproducible for a given
        choice.
    **model_kw
        :class:`~scatlas.models.metric.MetricConfig` fields: ``hidden``, ``latent_dim``,
        ``dropout``, ``input_dropout``, ``objective`` ("triplet" | "infonce"), ``margin``,
        ``metric_weight``, ``mining`` ("semihard" | "hardest" | "random"), ``across_studies``,
        ``temperature``, ``l1``, ``bf16``.

    Returns
    -------
    :class:`~scatlas.models.MetricEncoder`, with the training summary in ``model.info``.
    """
    from ..models.data import CellBatches
    from ..models.metric import (
        MetricConfig,
        MetricEncoder,
        MetricTask,
        read_hierarchy,
        related_labels,
        use_sparse_step,
    )
    from ..models.train import TrainConfig, fit

    adata = _check_adata(adata)
    labels = _labels(adata, label_key, "label_key")
    _check_label_sizes(labels, label_key)
    studies = _labels(adata, study_key, "study_key") if study_key is not None else None
    X = _matrix(adata, layer, input)
    config = MetricConfig(n_genes=adata.n_vars, **model_kw)
    train_rows, val_rows = _split(adata.n_obs, validation_fraction, seed)
    batch_size, n_dev = _batch_size(batch_size, train_rows.size, data_parallel)
    if max_steps is None:
        max_steps = int(min(50_000, max(200, math.ceil(20 * train_rows.size / batch_size))))
    batches = CellBatches(
        X, labels=labels.to_numpy(), studies=None if studies is None else studies.to_numpy(),
        batch_size=batch_size, balance=balance, transform="lognorm" if input == "counts" else None,
        rows=train_rows, seed=seed, check_input=not _in_memory(X),
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
        data_parallel=data_parallel,
    )
    val = _validation_batches(batches, val_rows, batch_size, n_dev)
    result = fit(MetricTask(config, tcfg, related), batches, tcfg, val_batches=val)
    info = {
        "label_key": label_key, "study_key": study_key, "n_cells": int(adata.n_obs),
        "n_train": int(train_rows.size), "n_val": int(val_rows.size), "steps": result.steps,
        "batch_size": batch_size, "best_step": result.best_step, "best_val": result.best_val,
        "stopped_early": result.stopped_early, "cells_per_s": result.cells_per_s,
        "seed": seed, "sparse_step": batches.sparse, "train": tcfg.to_dict(),
    }
    model = MetricEncoder(config, result.variables, adata.var_names,
                          label_names=batches.label_names, info=info)
    model.history = result.history
    return model


def _batch_size(batch_size: int, n_train: int, data_parallel: bool) -> tuple[int, int]:
    """The step's batch size, capped at the training cells and a multiple of the devices used;
    returns ``(batch_size, n_devices)``."""
    batch_size = check_positive_int(batch_size, "batch_size")
    n_dev = _n_devices(data_parallel)
    if batch_size > n_train:
        batch_size = max(n_dev, n_train // n_dev * n_dev)
        log.warning("batch_size capped at %d (the training cells)", batch_size)
    return batch_size, n_dev


def _validation_batches(batches: Any, val_rows: np.ndarray, batch_size: int,
                        n_dev: int) -> list | None:
    """Fixed validation batches over ``val_rows`` (each split evenly over the devices; the few
    cells that do not fill a last batch are left out); None without enough cells."""
    if val_rows.size < n_dev:
        return None
    vb = max(n_dev, min(batch_size, val_rows.size) // n_dev * n_dev)
    usable = val_rows[: val_rows.size // vb * vb]
    return list(batches.sequential(usable, vb))


def _n_devices(data_parallel: bool) -> int:
    import jax

    return jax.device_count() if data_parallel else 1


def embed(
    adata: ad.AnnData,
    model: Any,
    *,
    key_added: str = "X_scatlas",
    layer: str | None = None,
    input: str = "counts",
    batch_size: int = 10_000,
    min_overlap: float = 0.5,
    precision: str | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Embed ``adata`` with a trained model (or a model folder) into ``.obsm[key_added]``.

    Genes are aligned to the model's by name (zero fill, ``min_overlap`` enforced) and raw
    counts log-normalised (``input="counts"``). ``precision`` ("float32" or "bfloat16"; default
    the model's) is passed to :meth:`MetricEncoder.embed`. Returns the (n_cells, latent_dim)
    float32 embedding and records the model in ``.uns[key_added]``.
    """
    from ..models.io import load

    if isinstance(model, str | Path):
        model = load(model)
    if not isinstance(adata, ad.AnnData):
        raise ScatlasInputError(f"expected an AnnData, got {type(adata).__name__}")
    extra = {} if precision is None else {"precision": precision}
    Z = model.embed(adata, layer=layer, input=input, batch_size=batch_size,
                    min_overlap=min_overlap, progress=progress, **extra)
    adata.obsm[key_added] = Z
    adata.uns[key_added] = {"model": repr(model), "n_genes": len(model.genes),
                            "latent_dim": int(Z.shape[1])}
    return Z
