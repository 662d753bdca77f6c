"""``tl.tsne``: 2-D t-SNE of an embedding, by openTSNE on the CPU and cuML on the GPU.

Used, not rewritten:

- CPU: openTSNE (Policar, Strazar & Zupan 2024, J Stat Softw 109:3; FFT-accelerated
  interpolation, Linderman et al. 2019), the ``tsne`` extra (``pip install 'scatlas[tsne]'``):
  ``openTSNE.TSNE(perplexity=30, initialization="pca", random_state=seed)``, its defaults
  otherwise (exaggeration phase of 250 iterations, 500 more).
- GPU (CuPy input): cuML's ``TSNE`` (the engine of rapids-singlecell's ``tl.tsne``, installed
  with the ``gpu`` extra), Barnes-Hut/FFT on the device; the result stays on the device. Where
  cuML is missing the data go to the host, openTSNE runs there, and a warning says so.

The perplexity is capped at ``(n - 1) / 3`` (openTSNE's and cuML's limit) for small inputs.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .. import backend
from .._validate import ScatlasInputError, check_matrix


def _opentsne(X: np.ndarray, perplexity: float, seed: int, n_jobs: int) -> np.ndarray:
    try:
        from openTSNE import TSNE
    except ImportError:
        raise ScatlasInputError(
            "t-SNE on the CPU needs openTSNE: pip install 'scatlas[tsne]' (or openTSNE)"
        ) from None
    model = TSNE(n_components=2, perplexity=perplexity, initialization="pca",
                 random_state=seed, n_jobs=n_jobs, verbose=False)
    return np.asarray(model.fit(np.ascontiguousarray(X, dtype=np.float64)), dtype=np.float32)


def _cuml(X: Any, perplexity: float, seed: int) -> Any | None:
    """cuML's t-SNE of device data; None when cuML is not importable."""
    try:
        from cuml.manifold import TSNE
    except ImportError:
        return None
    xp = backend.array_module(X)
    out = TSNE(n_components=2, perplexity=perplexity, random_state=seed).fit_transform(X)
    return xp.asarray(out, dtype=np.float32)


def tsne_coordinates(X: Any, *, perplexity: float = 30.0, seed: int = 0,
                     n_jobs: int = 1) -> Any:
    """2-D t-SNE coordinates of the rows of ``X``.

    Parameters
    ----------
    X
        (n, p) dense or sparse matrix, n >= 4, finite; numpy / scipy on the CPU (openTSNE),
        cupy / cupyx on the GPU (cuML).
    perplexity
        Effective neighbours (> 0), capped at ``(n - 1) / 3``.
    seed
        Random state of the engine (openTSNE: exact reproducibility for a given ``n_jobs``).
    n_jobs
        openTSNE's threads.

    Returns
    -------
    (n, 2) float32, the caller's array kind.
    """
    check_matrix(X, "X", min_rows=4)
    if isinstance(perplexity, bool) or not isinstance(perplexity, int | float) or not (
            0 < perplexity < np.inf):
        raise ScatlasInputError(f"perplexity must be a positive number, got {perplexity!r}",
                                param="perplexity")
    perp = float(min(perplexity, (X.shape[0] - 1) / 3))
    if backend.is_gpu_array(X):
        dense = X.toarray() if backend.issparse(X) else X
        out = _cuml(dense, perp, seed)
        if out is not None:
            return out
        warnings.warn("t-SNE: cuML is not installed (pip install 'scatlas[gpu]'); running "
                      "openTSNE on the host", stacklevel=2)
        host = backend.to_host(dense)
        return backend.to_device(_opentsne(np.asarray(host), perp, seed, n_jobs), "gpu")
    dense = X.toarray() if backend.issparse(X) else np.asarray(X)
    return _opentsne(dense, perp, seed, n_jobs)


def tsne(
    adata: Any,
    use_rep: str = "X_pca",
    *,
    perplexity: float = 30.0,
    seed: int = 0,
    n_jobs: int = 1,
    key_added: str = "X_tsne",
    copy: bool = False,
):
    """t-SNE of ``adata.obsm[use_rep]`` (or ``"X"``) into ``adata.obsm[key_added]`` (n_obs, 2),
    as scanpy's ``tl.tsne``; parameters as :func:`tsne_coordinates`, whose engine (openTSNE /
    cuML) follows the array's device. Draw it with ``scatlas.pl.embedding(adata, "tsne")``.
    Returns the copy with ``copy=True``, else None."""
    adata = adata.copy() if copy else adata
    if use_rep == "X":
        X = adata.X
    elif use_rep in adata.obsm:
        X = adata.obsm[use_rep]
    else:
        raise ScatlasInputError(
            f"use_rep {use_rep!r} is not in adata.obsm (available: {list(adata.obsm)}); run "
            "scatlas.tl.pca first or pass use_rep='X'", param="use_rep")
    adata.obsm[key_added] = tsne_coordinates(np.asarray(X) if hasattr(X, "columns") else X,
                                             perplexity=perplexity, seed=seed, n_jobs=n_jobs)
    adata.uns["tsne"] = {"params": {"use_rep": use_rep, "perplexity": perplexity, "seed": seed}}
    return adata if copy else None
