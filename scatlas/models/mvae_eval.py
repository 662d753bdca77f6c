"""Evaluation of cross-modal models and the linear baselines the multimodal VAE is held to.

- :func:`foscttm`: fraction of samples closer than the true match (GLUE ``scglue.metrics.foscttm``;
  lower is better, random pairing gives ~0.5): for paired embeddings ``x``, ``y`` of the same
  cells, with Euclidean distances ``d_ij = |x_i - y_j|``, ``foscttm_x = mean_i mean_j
  [d_ij < d_ii]`` and ``foscttm_y = mean_j mean_i [d_ij < d_jj]``, averaged; divided by N
  (GLUE's convention; MIDAS divides by N - 1).
- :func:`per_feature_pearson`: mean over features of the Pearson correlation across cells
  (NeurIPS 2021 ``mean_pearson_per_gene``), constant features skipped.
- :func:`cca_baseline`: linear CCA (scikit-learn) between the RNA principal components and the
  log-normalised protein, fitted on the training cells, FOSCTTM of the held-out cells' canonical
  variates.
- :func:`ridge_baseline`: ridge regression (``RidgeCV``) from RNA principal components to
  ``log1p`` protein counts, fitted on the training cells, predictions for the held-out cells.

Both baselines use RNA log-normalised to 1e4 per cell (``log1p``) and the same features as the
model; the PCA is fitted on the training cells only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..exceptions import ScatlasInputError
from .data import lognorm


def foscttm(x: np.ndarray, y: np.ndarray, *, block: int = 2048) -> float:
    """FOSCTTM of paired (n, d) embeddings (row i of ``x`` and of ``y``: the same cell)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ScatlasInputError(f"need paired rows, got {x.shape} and {y.shape}")
    n = x.shape[0]
    xx, yy = (x**2).sum(1), (y**2).sum(1)
    true = ((x - y) ** 2).sum(1)
    closer_x = np.zeros(n)
    closer_y = np.zeros(n)
    for s in range(0, n, block):
        sl = slice(s, min(s + block, n))
        d = xx[sl, None] + yy[None, :] - 2 * x[sl] @ y.T  # (b, n) squared distances
        closer_x[sl] = (d < true[sl, None]).sum(1)
        closer_y += (d < true[None, :]).sum(0)
    return float(0.5 * (closer_x.mean() / n + closer_y.mean() / n))


def per_feature_pearson(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean Pearson correlation over the columns (features) of two (n, f) arrays."""
    pred = np.asarray(pred, np.float64)
    truth = np.asarray(truth, np.float64)
    pc, tc = pred - pred.mean(0), truth - truth.mean(0)
    den = np.sqrt((pc**2).sum(0) * (tc**2).sum(0))
    ok = den > 0
    return float(np.mean((pc * tc).sum(0)[ok] / den[ok]))


def _pcs(rna: Any, train: np.ndarray, test: np.ndarray, n_pcs: int, seed: int):
    from sklearn.decomposition import PCA

    L = lognorm(rna)
    pca = PCA(n_components=min(n_pcs, len(train) - 1), random_state=seed).fit(L[train])
    return pca.transform(L[train]), pca.transform(L[test])


def cca_baseline(
    rna: Any, protein: np.ndarray, train: np.ndarray, test: np.ndarray, *,
    n_pcs: int = 50, n_components: int = 10, seed: int = 0,
) -> float:
    """FOSCTTM of linear CCA (RNA PCs vs log-normalised protein) on the held-out cells."""
    from sklearn.cross_decomposition import CCA

    r_tr, r_te = _pcs(rna, train, test, n_pcs, seed)
    p = np.asarray(protein, np.float64)
    p = lognorm(p, target_sum=float(np.median(p[train].sum(1))))
    cca = CCA(n_components=n_components, max_iter=2000).fit(r_tr, p[train])
    u, v = cca.transform(r_te, p[test])
    return foscttm(u, v)


def ridge_baseline(
    rna: Any, protein: np.ndarray, train: np.ndarray, test: np.ndarray, *,
    n_pcs: int = 50, seed: int = 0,
) -> np.ndarray:
    """Held-out ``log1p`` protein predicted by ridge regression on RNA PCs (alpha by CV)."""
    from sklearn.linear_model import RidgeCV

    r_tr, r_te = _pcs(rna, train, test, n_pcs, seed)
    y = np.log1p(np.asarray(protein, np.float64))
    model = RidgeCV(alphas=np.logspace(-2, 5, 15)).fit(r_tr, y[train])
    return model.predict(r_te)
