"""Harmony (Korsunsky et al. 2019, Nat. Methods 16:1289) for ``tl.integrate(method="harmony")``.

Harmony is used, not rewritten: on the CPU ``harmonypy.run_harmony`` (harmonypy >= 2.0, a C++
build that needs only NumPy; install with ``pip install 'scatlas[harmony]'``), on the GPU
``rapids_singlecell.pp.harmony_integrate`` (the ``gpu`` extras). Both run at their own defaults
(theta 2, sigma 0.1, nclust min(N / 30, 100), up to 10 Harmony rounds;
../shared/reference/cca_mnn_rsvd.md section 4); keyword arguments are passed through.

Its input is the Seurat / scanpy workflow that Harmony is run after
(``NormalizeData`` -> features -> ``ScaleData`` -> ``RunPCA`` -> ``RunHarmony``): the
log-normalised copy and batch-aware HVGs of ``tl.integrate``
(:func:`scatlas.pp.log_normalized_hvg`), each gene centred and scaled to unit variance and
clipped at 10 (:func:`scatlas.kernels.anchors.scale_data`,
Seurat's ``ScaleData``), then the top ``n_pcs`` principal components
(:func:`scatlas.kernels.linalg.pca`, no further centring, as ``_run_cca`` does for Seurat's
``RunPCA``). ``n_pcs`` is ``tl.integrate``'s (default 30, the dims Seurat's integration
tutorials carry downstream). On the four real multi-batch sets of ``bench/quality/data.py``
(cellbench, baron_donor, baron_species, mesc; 2000 HVGs, seed 0) 30 and 50 PCs gave iLISI
0.492 / 0.490, 0.247 / 0.289, 0.074 / 0.144, 0.009 / 0.020 and cross-batch 15-NN label
transfer 1.000 / 1.000, 0.857 / 0.835, 0.820 / 0.692, 0.630 / 0.645: 50 mixes a little more,
30 keeps the labels better on Baron; neither dominates, so the shared default stays.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import numpy as np

from .. import backend
from .._validate import ScatlasInputError, check_matrix
from ._common import scaled_pca

INSTALL_HINT = "pip install 'scatlas[harmony]'  (or: pip install 'harmonypy>=2.0')"


def _harmonypy() -> Any:
    if importlib.util.find_spec("harmonypy") is None:
        raise ScatlasInputError(f"method='harmony' on the CPU needs harmonypy: {INSTALL_HINT}")
    import harmonypy

    major = int(str(getattr(harmonypy, "__version__", "0")).split(".")[0] or 0)
    if major < 2:
        raise ScatlasInputError(
            f"method='harmony' needs harmonypy >= 2.0 (found {harmonypy.__version__}): "
            f"{INSTALL_HINT}")
    return harmonypy


def _batch_codes(batch: Any, n: int) -> np.ndarray:
    b = np.asarray(backend.to_host(batch) if hasattr(batch, "device") else batch)
    if b.ndim != 1 or b.shape[0] != n:
        raise ScatlasInputError(f"batch must be 1-D with one label per cell ({n}), got shape "
                                f"{b.shape}")
    b = b.astype(str)
    if np.unique(b).size < 2:
        raise ScatlasInputError("harmony needs at least 2 batches")
    return b


def run_harmony(Z: Any, batch: Any, *, seed: int = 0, **kwargs: Any) -> tuple[Any, dict]:
    """Harmony on an (n, d) embedding ``Z`` with one batch label per cell.

    numpy ``Z`` goes to ``harmonypy.run_harmony`` (float64, ``random_state=seed``,
    ``verbose=False``; passed as d x n so that harmonypy's orientation guess cannot flip it
    when n == d); cupy ``Z`` to ``rapids_singlecell.pp.harmony_integrate``. ``kwargs`` go to
    the library (theta, sigma, nclust, max_iter_harmony ...). Returns the corrected (n, d)
    embedding (numpy float64 on the CPU, cupy on the GPU) and a dict of what ran
    (``backend``, ``version``, and on the CPU the ``objective`` per Harmony round).
    """
    Z = check_matrix(Z, "Z", allow_sparse=False, min_rows=2)
    b = _batch_codes(batch, Z.shape[0])
    if backend.is_gpu_array(Z):
        return _run_rapids(Z, b, seed, kwargs)
    hp = _harmonypy()
    import pandas as pd

    opts = {"verbose": False, "random_state": seed, **kwargs}
    Zt = np.ascontiguousarray(np.asarray(Z, dtype=np.float64).T)
    ho = hp.run_harmony(Zt, pd.DataFrame({"batch": b}), "batch", **opts)
    out = np.asarray(ho.Z_corr, dtype=np.float64)
    if out.shape != Z.shape:  # harmonypy < 2 returned d x n
        out = out.T
    objective = np.asarray(getattr(ho, "objective_harmony", []), dtype=np.float64)
    return out, {"backend": "harmonypy", "version": str(hp.__version__),
                 "objective": objective}


def _run_rapids(Z: Any, b: np.ndarray, seed: int, kwargs: dict) -> tuple[Any, dict]:
    if importlib.util.find_spec("rapids_singlecell") is None:
        raise ScatlasInputError(
            "method='harmony' on GPU data needs rapids-singlecell (pip install "
            "'scatlas[gpu]'), or move the data to the host (device='cpu') for harmonypy")
    import anndata as ad
    import pandas as pd

    rsc = importlib.import_module("rapids_singlecell")
    work = ad.AnnData(obs=pd.DataFrame({"batch": pd.Categorical(b)},
                                       index=[str(i) for i in range(b.size)]))
    work.obsm["X_pca"] = Z
    rsc.pp.harmony_integrate(work, "batch", basis="X_pca", adjusted_basis="X_harmony",
                             **kwargs)
    return work.obsm["X_harmony"], {"backend": "rapids_singlecell",
                                    "version": str(getattr(rsc, "__version__", "?"))}


def run_integrate_harmony(adata: Any, key: str, X: Any, batch: np.ndarray, n_pcs: int,
                          seed: int, common: dict[str, Any],
                          kwargs: dict[str, Any]) -> dict[str, Any]:
    """``tl.integrate``'s harmony branch: PCA of the scaled HVGs, Harmony, ``.obsm[key]``
    (n_obs, n_pcs). Returns the ``.uns`` entries (``batches``, ``backend``, ``version``,
    ``n_pcs``, ``objective`` on the CPU, ``params``)."""
    if not backend.is_gpu_array(X):
        _harmonypy()  # fail before the PCA when harmonypy is missing
    Z = scaled_pca(X, n_pcs, seed=seed, dtype=common.get("dtype"),
                    progress=common.get("progress"))
    corrected, info = run_harmony(Z, batch, seed=seed, **kwargs)
    adata.obsm[key] = corrected.astype(Z.dtype)
    params = {k: (v if isinstance(v, int | float | str | bool) else repr(v))
              for k, v in kwargs.items()}
    return {"batches": sorted({str(x) for x in batch}), "n_pcs": int(Z.shape[1]),
            **info, "params": params}
