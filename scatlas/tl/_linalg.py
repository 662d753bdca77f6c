"""``tl.pca`` and ``tl.cca``: the linear-algebra kernels on AnnData."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend
from .._params import NONNEGATIVE_INT, POSITIVE_INT, SEED, Options, validate_params
from .._validate import ScatlasInputError, check_obs_key
from ..kernels import cca as _cca_kernel
from ..kernels import pca as _pca_kernel
from ._common import get_matrix, on_device_of, var_mask


@validate_params(n_comps=POSITIVE_INT, seed=SEED,
                 n_iter=(NONNEGATIVE_INT, Options(("auto",))),
                 method=Options(("auto", "randomized", "gram")))
def pca(
    adata,
    n_comps: int = 50,
    *,
    layer: str | None = None,
    zero_center: bool = True,
    mask_var: Any = None,
    use_highly_variable: bool | None = None,
    key_added: str | None = None,
    seed: int = 0,
    method: str = "auto",
    n_iter: int | str = "auto",
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
    copy: bool = False,
):
    """PCA of an AnnData, written where scanpy writes it.

    Writes ``.obsm['X_pca']`` (n_obs x n_comps), ``.varm['PCs']`` (n_vars x n_comps; zero rows
    for genes outside the mask) and ``.uns['pca']`` with ``variance``, ``variance_ratio`` and
    ``params``. With ``key_added`` the three keys are ``key_added`` instead, as in scanpy >= 1.10.
    Genes: ``mask_var`` (bool array or ``.var`` column), else ``.var['highly_variable']`` when
    present, else all. Computation: :func:`scatlas.kernels.pca` (sparse input implicitly centred).
    """
    adata = adata.copy() if copy else adata
    X = get_matrix(adata, layer)
    mask = var_mask(adata, mask_var, use_highly_variable)
    if mask is not None:
        X = X[:, on_device_of(X, np.flatnonzero(mask))]
    res = _pca_kernel(X, n_comps, center=zero_center, seed=seed, method=method, n_iter=n_iter,
                      dtype=dtype, device=device, progress=progress)
    xp = backend.array_module(res.components)
    loadings = res.components.T
    if mask is not None:
        full = xp.zeros((adata.n_vars, loadings.shape[1]), dtype=loadings.dtype)
        full[on_device_of(loadings, np.flatnonzero(mask))] = loadings
        loadings = full
    obsm_key = key_added or "X_pca"
    varm_key = key_added or "PCs"
    uns_key = key_added or "pca"
    adata.obsm[obsm_key] = res.scores
    adata.varm[varm_key] = loadings
    adata.uns[uns_key] = {
        "params": {
            "zero_center": zero_center,
            "use_highly_variable": mask is not None and mask_var is None,
            "mask_var": mask_var if isinstance(mask_var, str) else None,
            "layer": layer,
            "method": res.method,
            "seed": seed,
        },
        "variance": backend.to_host(res.explained_variance),
        "variance_ratio": backend.to_host(res.explained_variance_ratio),
    }
    return adata if copy else None


@validate_params(k=POSITIVE_INT, seed=SEED)
def cca(
    adata,
    batch_key: str = "batch",
    *,
    groups: tuple[str, str] | None = None,
    k: int = 20,
    layer: str | None = None,
    mask_var: Any = None,
    use_highly_variable: bool | None = None,
    l2_norm: bool = True,
    key_added: str = "X_cca",
    method: str = "auto",
    seed: int = 42,
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
    copy: bool = False,
):
    """Seurat-style CCA between two batches of one AnnData.

    Cells of ``groups[0]`` and ``groups[1]`` (values of ``.obs[batch_key]``; default: its two
    categories, an error when there are more) are embedded jointly by
    :func:`scatlas.kernels.cca`. Writes ``.obsm[key_added]`` (n_obs x k; NaN for cells in
    neither group) and ``.uns[key_added]`` with the canonical singular values and parameters.
    Input is expected log-normalised (and gene-scaled per batch as Seurat's ``ScaleData`` does).
    """
    adata = adata.copy() if copy else adata
    check_obs_key(adata, batch_key, "batch_key")
    labels = adata.obs[batch_key].astype(str).to_numpy()
    present = list(dict.fromkeys(labels))
    if groups is None:
        if len(present) != 2:
            raise ScatlasInputError(
                f"obs[{batch_key!r}] has {len(present)} groups {present[:10]}; CCA pairs two "
                "datasets: name them with groups= (two of the groups)", param="groups"
            )
        groups = (present[0], present[1])
    g1, g2 = (str(g) for g in groups)
    if g1 == g2:
        raise ScatlasInputError("groups must name two different batches")
    idx = []
    for g in (g1, g2):
        sel = np.flatnonzero(labels == g)
        if sel.size == 0:
            raise ScatlasInputError(f"batch {g!r} has no cells in obs[{batch_key!r}]")
        idx.append(sel)
    X = get_matrix(adata, layer)
    mask = var_mask(adata, mask_var, use_highly_variable)
    cols = np.flatnonzero(mask) if mask is not None else None

    def take(rows):
        sub = X[on_device_of(X, rows)]
        return sub if cols is None else sub[:, on_device_of(sub, cols)]

    Z1, Z2, D = _cca_kernel(take(idx[0]), take(idx[1]), k, l2_norm=l2_norm, method=method,
                            seed=seed, dtype=dtype, device=device, progress=progress,
                            return_d=True)
    xp = backend.array_module(Z1)
    out = xp.full((adata.n_obs, Z1.shape[1]), np.nan, dtype=Z1.dtype)
    out[on_device_of(out, idx[0])] = Z1
    out[on_device_of(out, idx[1])] = Z2
    adata.obsm[key_added] = out
    adata.uns[key_added] = {
        "params": {"batch_key": batch_key, "groups": [g1, g2], "k": k, "l2_norm": l2_norm,
                   "layer": layer, "method": method, "seed": seed},
        "singular_values": backend.to_host(D),
    }
    return adata if copy else None
