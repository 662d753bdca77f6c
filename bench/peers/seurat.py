"""Seurat 4.3 CCA integration as a peer, run through ``Rscript`` (Debian's ``r-cran-seurat``).

:func:`seurat_cca_integrate` hands raw counts to ``bench/peers/seurat_integrate.R`` as Matrix
Market + text files in a temporary folder and runs Seurat's standard v4 workflow at its
defaults: per batch ``NormalizeData`` + ``FindVariableFeatures(vst, nfeatures)``,
``SelectIntegrationFeatures``, ``FindIntegrationAnchors(dims = 1:dims)`` (Annoy, or exact
``RANN`` neighbours with ``exact_nn=True``), ``IntegrateData``, ``ScaleData``,
``RunPCA(npcs = dims)``. Datasets are passed in sorted batch order (as
:func:`scatlas.kernels.anchors.split_batches` orders them). BLAS / OpenMP threads are set to
``threads`` through the environment. ``seconds`` is the R-side time of that workflow (no I/O,
no R start-up).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

SCRIPT = Path(__file__).with_name("seurat_integrate.R")


def seurat_available() -> bool:
    """Whether ``Rscript`` exists and can load Seurat."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        return False
    try:
        res = subprocess.run([rscript, "-e", "suppressPackageStartupMessages(library(Seurat))"],
                             capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def seurat_cca_integrate(adata_counts: Any, batch_key: str = "batch", *, dims: int = 30,
                         nfeatures: int = 2000, threads: int = 1, exact_nn: bool = False,
                         timeout: float = 3600) -> dict[str, Any]:
    """Seurat 4.3 ``FindIntegrationAnchors`` + ``IntegrateData`` + PCA of an AnnData of counts.

    Parameters
    ----------
    adata_counts
        AnnData with raw counts in ``.X`` (cells x genes) and ``obs[batch_key]``.
    dims, nfeatures
        ``dims = 1:dims`` for anchors / integration and ``npcs``; features per batch and
        integration features.
    threads
        ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` of the R process.
    exact_nn
        ``nn.method = "rann"`` (exact kd-tree) instead of Annoy.

    Returns
    -------
    dict with ``embedding`` ((n, dims) float64, input cell order), ``anchors`` (DataFrame
    ``cell1``, ``cell2`` input cell positions, ``score``, ``dataset1``, ``dataset2`` batch
    names; both directions, as Seurat lists them), ``features`` (gene names), ``seconds``
    (R-side workflow time) and ``wall_seconds`` (including I/O and R start-up).
    """
    rscript = shutil.which("Rscript")
    if rscript is None:
        raise RuntimeError("Rscript not found: install r-cran-seurat (apt-get install "
                           "r-cran-seurat)")
    X = adata_counts.X
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    genes = [str(g).replace("_", "-") for g in adata_counts.var_names]  # Seurat's renaming
    batch = adata_counts.obs[batch_key].astype(str).to_numpy()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seurat_") as tmp:
        d = Path(tmp)
        counts = X.T.tocoo()
        counts.data = np.rint(counts.data)  # counts as integers for Matrix Market
        scipy.io.mmwrite(d / "counts.mtx", counts.astype(np.int64), field="integer")
        (d / "genes.txt").write_text("\n".join(genes) + "\n")
        (d / "cells.txt").write_text("\n".join(f"c{i}" for i in range(X.shape[0])) + "\n")
        (d / "batch.txt").write_text("\n".join(batch) + "\n")
        res = subprocess.run([rscript, str(SCRIPT), str(d), str(int(dims)), str(int(nfeatures)),
                              "1" if exact_nn else "0"], capture_output=True, text=True,
                             env=env, timeout=timeout, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"Seurat failed (exit {res.returncode}): {res.stderr[-2000:]}")
        emb = np.loadtxt(d / "embedding.csv", delimiter=",", ndmin=2)
        anchors = pd.read_csv(d / "anchors.csv")
        anchors["dataset1"] = anchors["dataset1"].astype(str)
        anchors["dataset2"] = anchors["dataset2"].astype(str)
        features = (d / "features.txt").read_text().split()
        seconds = float((d / "seconds.txt").read_text())
    back = {g: str(v) for g, v in zip(genes, adata_counts.var_names, strict=True)}
    return {"embedding": emb, "anchors": anchors, "features": [back.get(f, f) for f in features],
            "seconds": seconds, "wall_seconds": time.perf_counter() - t0}
