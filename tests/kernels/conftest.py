"""Fixtures the kernel tests share."""

from __future__ import annotations

import numpy as np
import pytest

from scatlas import metrics
from scatlas.kernels.anchors import scale_data
from scatlas.kernels.linalg import pca


@pytest.fixture(scope="session")
def cellbench_hvg(cellbench):
    """Log-normalised 2000 batch-aware HVGs of CellBench, and the uncorrected PCA's metrics
    (30 PCs of the gene-scaled data)."""
    from scatlas import pp

    ad = cellbench.copy()
    pp.normalize_log1p(ad)
    pp.highly_variable_genes(ad, 2000, batch_key="batch")
    X = ad.X[:, np.flatnonzero(ad.var["highly_variable"].to_numpy())]
    batch = ad.obs["batch"].astype(str).to_numpy()
    labels = ad.obs["cell_line"].astype(str).to_numpy()
    E = pca(scale_data(X), 30).scores
    base = {"ilisi": metrics.ilisi(E, batch),
            "transfer": metrics.knn_label_transfer(E, labels, batch),
            "asw_label": metrics.silhouette_label(E, labels)}
    return X, batch, labels, {k: round(v, 3) for k, v in base.items()}
