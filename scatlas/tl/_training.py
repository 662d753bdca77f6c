"""AnnData-side preparation the ``tl.train_*`` trainers share: which matrix and genes they read,
the validation split, and how ``train=`` / ``model=`` settings merge with their own arguments.

Public names in a private module (as optax's ``_src``): used by :mod:`._models`, :mod:`._mvae`,
:mod:`._michigan` and :mod:`._covel`; batch sizes and devices are in
:mod:`scatlas.models.data`.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .. import backend
from .._validate import ScatlasInputError, check_positive_int, config_overrides


def check_adata(adata: Any) -> ad.AnnData:
    if not isinstance(adata, ad.AnnData):
        raise ScatlasInputError(f"expected an AnnData, got {type(adata).__name__}")
    if adata.n_obs < 2 or adata.n_vars < 1:
        raise ScatlasInputError(f"adata has shape {adata.shape}; need cells and genes")
    return adata


def training_matrix(adata: ad.AnnData, layer: str | None, input: str, where: str) -> Any:
    """The training matrix, its values checked against ``input`` when it is in memory
    (:func:`scatlas.models.inputs.check_input_values`: finite and non-negative; integers for
    raw counts; not raw counts for log-normalised input); backed or lazily read matrices (h5ad
    backed, zarr) are checked block by block as the loader reads them (``CellBatches.take``:
    finite, non-negative)."""
    from ..models.inputs import INPUTS, check_input_values, matrix_of

    if input not in INPUTS:
        raise ScatlasInputError(f"input must be one of {INPUTS}, got {input!r}", param="input")
    X = backend.to_host(matrix_of(adata, layer))  # GPU AnnData: the loader reads host rows
    if in_memory(X):
        check_input_values(X, input, where)
    return X


def training_data(adata: ad.AnnData, layer: str | None, use_raw: bool) -> ad.AnnData:
    """``adata``, or with ``use_raw`` its ``.raw`` as an AnnData (raw ``X`` and genes, the
    cells' ``obs``)."""
    if not use_raw:
        return adata
    if layer is not None:
        raise ScatlasInputError("pass layer= or use_raw=True, not both (adata.raw has no "
                                "layers)", param="use_raw")
    if adata.raw is None:
        raise ScatlasInputError("use_raw=True but adata.raw is empty; train on X or a layer "
                                "(use_raw=False, layer=)", param="use_raw")
    return adata.raw.to_adata()


def in_memory(X: Any) -> bool:
    return isinstance(X, np.ndarray) or sp.issparse(X)


#: TrainConfig fields the tl trainers take as their own arguments (refused in ``train=``)
OWN_TRAIN_ARGS = ("max_steps", "learning_rate", "weight_decay", "seed", "eval_every",
                   "patience", "checkpoint_dir", "log_path", "progress", "data_parallel")


def merged_model_settings(cls: type, model: Any, model_kw: dict[str, Any],
                           own_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """``model=`` (a config or a mapping) and the ``**model_kw`` keywords as one dict of config
    fields; a field given both ways is refused."""
    given = config_overrides(cls, model, "model", own_args=own_args,
                             exclude=DATA_FIELDS.get(cls.__name__, ()))
    twice = sorted(set(given) & set(model_kw))
    if twice:
        raise ScatlasInputError(f"{twice} given both in model= and as keywords; give each "
                                "once", param="model")
    return {**given, **model_kw}


#: config fields the trainers fill in from the data (never taken from ``model=``)
DATA_FIELDS = {
    "MetricConfig": ("n_genes",),
    "MVAEConfig": ("modalities", "likelihoods", "n_features", "log_lib_mean", "log_lib_sd",
                   "n_batches"),
    "CoVELConfig": ("modalities", "likelihoods", "n_features", "log_lib_mean", "paired"),
    "MichiGANConfig": ("n_genes",),
}


#: cells (evenly spaced training cells) on which the genes are chosen
GENE_SELECTION_CELLS = 20_000


def select_genes(X: Any, train_rows: np.ndarray, n_top: int | None,
                  input: str) -> np.ndarray | None:
    """Sorted indices of the ``n_top`` most variable genes of the training cells (scanpy's
    ``flavor="seurat"`` on counts per 1e4, :func:`scatlas.models.mvae_data.highly_variable`),
    judged on at most :data:`GENE_SELECTION_CELLS` of them; None: every gene."""
    if n_top is None:
        return None
    n_top = check_positive_int(n_top, "n_top_genes")
    if n_top >= X.shape[1]:
        return None
    from ..models.mvae_data import highly_variable

    step = max(1, -(-train_rows.size // GENE_SELECTION_CELLS))
    rows = np.sort(train_rows)[::step]
    block = X[rows]
    if input != "counts":  # log-normalised: back to counts per 1e4 (renormalising is a no-op)
        block = block.expm1() if sp.issparse(block) else np.expm1(np.asarray(block, np.float64))
    if not sp.issparse(block):
        block = np.asarray(block)
    return highly_variable(block, np.arange(rows.size), n_top)


#: below this many cells no validation split is held out by default
SMALL_N = 1000


def default_validation_fraction(n_cells: int) -> float:
    """0 below ``SMALL_N`` cells (every cell trains; a best-of-validation pick from a few dozen
    cells chose under-trained weights), else 0.1."""
    return 0.0 if n_cells < SMALL_N else 0.1


def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, val_rows)``, sorted: ``round(fraction * n)`` random cells held out."""
    if not 0 <= fraction < 1:
        raise ScatlasInputError(f"validation_fraction must be in [0, 1), got {fraction!r}")
    perm = np.random.default_rng([seed, 7]).permutation(n)
    n_val = int(round(fraction * n))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
