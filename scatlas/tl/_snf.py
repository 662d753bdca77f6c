"""``tl.snf``: similarity network fusion of several views of the same cells, then clusters.

Views come from an AnnData (``obsm_keys``: ``.obsm`` entries, or ``"X"``) or a MuData (one view
per modality: each modality's ``.X``, or the ``.obsm`` entry named per modality). Computation:
:func:`scatlas.kernels.snf` and :func:`scatlas.kernels.spectral_clusters` (Wang et al. 2014;
snfpy 0.2.2 semantics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .. import backend
from .._validate import ScatlasInputError
from ..kernels.snf import MAX_DENSE_BYTES
from ..kernels.snf import snf as _snf_kernel
from ..kernels.spectral import spectral_clusters


def _is_mudata(data: Any) -> bool:
    return hasattr(data, "mod") and isinstance(getattr(data, "mod", None), Mapping)


def _matrix(value: Any) -> Any:
    """An ``.obsm`` value as a matrix (a DataFrame's values as float64)."""
    if isinstance(value, pd.DataFrame):
        return value.to_numpy(dtype=np.float64)
    return value


def _from_anndata(adata: Any, key: str, where: str) -> Any:
    if key == "X":
        if adata.X is None:
            raise ScatlasInputError(f"{where}.X is empty (None)", param="obsm_keys")
        return adata.X
    if key not in adata.obsm:
        raise ScatlasInputError(
            f"obsm_keys: {key!r} is not in {where}.obsm (available: {list(adata.obsm)})",
            param="obsm_keys")
    return _matrix(adata.obsm[key])


def _views(data: Any, obsm_keys: Any) -> tuple[list[Any], list[str]]:
    """The views and their names."""
    if _is_mudata(data):
        mods = list(data.mod)
        if obsm_keys is None:
            keys = {m: "X" for m in mods}
        elif isinstance(obsm_keys, Mapping):
            unknown = [m for m in obsm_keys if m not in data.mod]
            if unknown:
                raise ScatlasInputError(
                    f"obsm_keys names modalities {unknown} the MuData lacks (modalities: "
                    f"{mods})", param="obsm_keys")
            keys = dict(obsm_keys)
        else:
            raise ScatlasInputError(
                "obsm_keys for a MuData: None (each modality's .X) or a dict {modality: 'X' or "
                f"an .obsm key}}, got {type(obsm_keys).__name__}", param="obsm_keys")
        for m in keys:
            mod = data.mod[m]
            if mod.n_obs != data.n_obs or not np.array_equal(
                    np.asarray(mod.obs_names), np.asarray(data.obs_names)):
                raise ScatlasInputError(
                    f"modality {m!r} holds {mod.n_obs} cells, not the MuData's {data.n_obs} in "
                    "its order; keep the shared cells first (mudata.pp.intersect_obs)",
                    param="data")
        return ([_from_anndata(data.mod[m], k, f"mod[{m!r}]") for m, k in keys.items()],
                [f"{m}:{k}" for m, k in keys.items()])
    if not hasattr(data, "obsm"):
        raise ScatlasInputError(f"data must be an AnnData or a MuData, got {type(data).__name__}",
                                param="data")
    if isinstance(obsm_keys, str) or not isinstance(obsm_keys, Sequence):
        raise ScatlasInputError(
            "obsm_keys must list at least two views of an AnnData (.obsm keys or 'X'), got "
            f"{obsm_keys!r}", param="obsm_keys")
    keys = list(obsm_keys)
    return [_from_anndata(data, k, "adata") for k in keys], keys


def snf(
    data: Any,
    obsm_keys: Sequence[str] | Mapping[str, str] | None = None,
    *,
    K: int = 20,
    mu: float = 0.5,
    t: int = 20,
    metric: str = "sqeuclidean",
    alpha: float = 1.0,
    n_clusters: int | None = None,
    n_range: Sequence[int] = range(2, 11),
    key_added: str = "snf",
    sparse: bool | None = None,
    n_support: int | None = None,
    max_dense_bytes: int = MAX_DENSE_BYTES,
    dtype: Any = None,
    device: str | None = None,
    seed: int = 0,
    copy: bool = False,
):
    """Similarity network fusion of the views of ``data``, and spectral clusters of the result.

    Parameters
    ----------
    data
        AnnData, or MuData with the same cells in every modality used.
    obsm_keys
        AnnData: a list of at least two ``.obsm`` keys (or ``"X"``), each an (n_obs, p) matrix
        (a DataFrame, e.g. protein counts, is taken as float64). MuData: ``None`` (every
        modality's ``.X``) or ``{modality: "X" or .obsm key}``.
    K, mu, t, metric, alpha, sparse, n_support, max_dense_bytes, dtype, device
        As in :func:`scatlas.kernels.snf` (snfpy's defaults; dense n x n only within
        ``max_dense_bytes``, 2 GiB by default, else the sparse kNN-support route).
    n_clusters, n_range, seed
        As in :func:`scatlas.kernels.spectral_clusters`: the count (``None``: the eigengap
        estimate within ``n_range``) and the seed of k-means.
    key_added
        Where results go: ``.obsp[key_added + "_connectivities"]`` the fused (n_obs, n_obs)
        network (dense array or CSR, the views' array kind), ``.obs[key_added + "_cluster"]``
        categorical clusters ("0", "1", ...), ``.uns[key_added]`` the parameters, the route,
        the views, the cluster count and the eigengap's two best counts and eigenvalues.
    copy
        Work on a copy and return it.

    Returns
    -------
    The copy with ``copy=True``, else None.
    """
    data = data.copy() if copy else data
    views, names = _views(data, obsm_keys)
    fused = _snf_kernel(views, K, mu, t, metric, alpha=alpha, sparse=sparse,
                        n_support=n_support, max_dense_bytes=max_dense_bytes, dtype=dtype,
                        device=device)
    clusters = spectral_clusters(fused, n_clusters, n_range=n_range, seed=seed)
    labels = np.asarray(backend.to_host(clusters.labels)).astype(str)
    data.obsp[f"{key_added}_connectivities"] = fused
    data.obs[f"{key_added}_cluster"] = pd.Categorical(
        labels, categories=[str(c) for c in range(clusters.n_clusters)])
    data.uns[key_added] = {
        "params": {"K": K, "mu": mu, "t": t, "metric": metric, "alpha": alpha, "seed": seed,
                   "n_range": [int(c) for c in n_range]},
        "views": names,
        "route": "sparse" if backend.issparse(fused) else "dense",
        "n_clusters": clusters.n_clusters,
        "eigengap_best": list(clusters.eigengap_best),
        "eigenvalues": clusters.eigenvalues,
    }
    return data if copy else None
