"""Helpers shared by the tools: which matrix, which genes, index arrays on the right device."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend
from .._validate import ScatlasInputError, check_positive_int
from ..kernels.anchors import scale_data
from ..kernels.linalg import pca as _pca


def get_matrix(adata, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]``, with a clear error when it is missing."""
    if layer is None:
        X = adata.X
        if X is None:
            raise ScatlasInputError("adata.X is empty (None); pass layer=", param="layer")
        return X
    if layer not in adata.layers:
        raise ScatlasInputError(
            f"layer {layer!r} not found in adata.layers (available: {list(adata.layers)})",
            param="layer")
    return adata.layers[layer]


def var_mask(adata, mask_var: Any, use_highly_variable: bool | None) -> np.ndarray | None:
    """scanpy's rule: an explicit mask, else ``var['highly_variable']`` when present."""
    if mask_var is not None and use_highly_variable is not None:
        raise ScatlasInputError("give either mask_var or use_highly_variable, not both")
    if isinstance(mask_var, str):
        if mask_var not in adata.var.columns:
            raise ScatlasInputError(f"mask_var {mask_var!r} is not a column of adata.var")
        mask = np.asarray(adata.var[mask_var], dtype=bool)
    elif mask_var is not None:
        mask = np.asarray(mask_var, dtype=bool)
        if mask.shape != (adata.n_vars,):
            raise ScatlasInputError(f"mask_var must have shape ({adata.n_vars},), got {mask.shape}")
    elif use_highly_variable or (use_highly_variable is None and "highly_variable" in adata.var):
        if "highly_variable" not in adata.var:
            raise ScatlasInputError(
                "use_highly_variable=True but adata.var has no 'highly_variable' column; run "
                "scatlas.pp.highly_variable_genes first"
            )
        mask = np.asarray(adata.var["highly_variable"], dtype=bool)
    else:
        return None
    if not mask.any():
        raise ScatlasInputError("the gene mask selects no genes")
    return mask


def on_device_of(arr, indices: np.ndarray):
    """Integer indices (host) moved to the device of ``arr`` for fancy indexing."""
    return backend.to_device(np.asarray(indices), backend.device_of(arr))


def scaled_pca(X: Any, n_pcs: int = 30, *, seed: int = 0, dtype: Any = None,
                progress: bool | None = None) -> Any:
    """Seurat's ``ScaleData`` + ``RunPCA``, the (n, n_pcs) PCA that Harmony corrects and that
    Seurat's CCA integration ends with: ``ScaleData`` (centre, unit variance,
    clip at 10) of the (n, p) log-expression ``X`` (dense or sparse, numpy or cupy), then
    ``RunPCA`` (:func:`scatlas.kernels.linalg.pca`, ``center=False``). Same device as ``X``;
    float32 unless ``dtype``. ``n_pcs`` is capped at min(n, p) - 1. A sparse ``X`` is never made
    dense: the scaled values are its CSR plus a per-gene shift (``scale_data(implicit=True)``)."""
    n_pcs = check_positive_int(n_pcs, "n_pcs")
    S = scale_data(X, dtype=dtype, implicit=True)  # sparse X stays sparse (CSR + a shift)
    k = min(n_pcs, min(S.shape) - 1)
    if k < 1:
        raise ScatlasInputError(f"a PCA needs at least 2 cells and 2 genes, got {S.shape}")
    return _pca(S, k, center=False, seed=seed, dtype=S.dtype, progress=progress).scores
