"""Integration reports: scib-family metrics (JSON) and UMAPs before / after, by batch and label.

``integration_report`` compares the uncorrected embedding (PCA of the log-normalised
highly-variable genes, computed here from the raw counts in ``.X``) with an integrated
embedding in ``.obsm``. Metrics come from :mod:`scatlas.metrics` (with labels: the full
``summary``; without: iLISI only); UMAPs from umap-learn, drawn with
matplotlib, on the exact k-NN graph of :func:`scatlas.kernels.knn`. Files are written
atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import ScatlasInputError, check_obs_key

_N_PCS = 30


def _uncorrected_pca(adata, batch_key: str) -> np.ndarray | None:
    """PCA (30) of log-normalised batch-aware HVGs of the raw counts; None without ``.X``.

    The same normalisation and gene selection as :func:`scatlas.tl.integrate` uses.
    """
    from .kernels import pca
    from .tl._integrate import _log_hvg

    if adata.X is None:
        return None
    work, genes = _log_hvg(adata, batch_key, None, min(2000, adata.n_vars), None, "seurat", None)
    return np.asarray(pca(work.X, min(_N_PCS, work.n_obs - 1, genes.size)).scores)


def _metrics(X: np.ndarray, batch: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    from . import metrics

    ok = np.isfinite(X).all(axis=1)
    X, batch = X[ok], batch[ok]
    if labels is not None:
        return metrics.summary(X, labels[ok], batch)
    return {"ilisi": metrics.ilisi(X, batch)}


def _umap(X: np.ndarray, seed: int) -> np.ndarray:
    """2-D UMAP (umap-learn, scanpy's dependency) on our exact 15-nearest-neighbour graph."""
    import umap

    from .kernels import knn

    X = np.nan_to_num(np.asarray(X, dtype=np.float32))
    dist, idx = knn(X, X, min(15, X.shape[0]))
    model = umap.UMAP(n_neighbors=idx.shape[1], random_state=seed,
                      precomputed_knn=(idx, dist.astype(np.float32), None))
    return model.fit_transform(X)


def _plot(panels: dict[str, np.ndarray], colours: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write

    fig, axes = plt.subplots(len(panels), len(colours), squeeze=False,
                             figsize=(5 * len(colours), 4.5 * len(panels)))
    for row, (title, xy) in enumerate(panels.items()):
        for col, (name, values) in enumerate(colours.items()):
            ax = axes[row, col]
            cats = list(dict.fromkeys(values))
            for c in cats:
                sel = values == c
                ax.scatter(xy[sel, 0], xy[sel, 1], s=3, label=str(c), alpha=0.7)
            ax.set_title(f"{title}: {name}")
            ax.set_xticks([])
            ax.set_yticks([])
            if len(cats) <= 12:
                ax.legend(markerscale=3, fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def integration_report(
    adata_or_path: Any,
    out_dir: str | Path,
    *,
    batch_key: str = "batch",
    label_key: str | None = None,
    key: str = "X_integrated",
    seed: int = 0,
) -> Path:
    """Write ``metrics.json`` and ``umap.png`` for the embedding ``.obsm[key]`` into ``out_dir``.

    For an iNMF result the quantile-normalised ``.obsm[key + "_norm"]`` is used when present.
    ``metrics.json`` holds ``{"uncorrected": {...}, "integrated": {...}, "key": ..., ...}``;
    ``umap.png`` has one row per embedding and one column per colouring (batch, label).
    Returns ``out_dir``.
    """
    from . import io

    adata = io.read_h5ad(adata_or_path) if isinstance(adata_or_path, str | Path) else adata_or_path
    check_obs_key(adata, batch_key, "batch_key")
    if label_key is not None:
        check_obs_key(adata, label_key, "label_key")
    used = f"{key}_norm" if f"{key}_norm" in adata.obsm else key
    if used not in adata.obsm:
        raise ScatlasInputError(f"no embedding {key!r} in .obsm (available: {list(adata.obsm)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    batch = adata.obs[batch_key].astype(str).to_numpy()
    labels = adata.obs[label_key].astype(str).to_numpy() if label_key else None
    embeddings = {"integrated": np.asarray(adata.obsm[used], dtype=np.float64)}
    before = _uncorrected_pca(adata, batch_key)
    if before is not None:
        embeddings = {"uncorrected": before, **embeddings}
    record = {"key": used, "batch_key": batch_key, "label_key": label_key,
              "n_cells": int(adata.n_obs)}
    record.update({name: _metrics(X, batch, labels) for name, X in embeddings.items()})
    with io.atomic_write(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=float))
    colours = {batch_key: batch, **({label_key: labels} if labels is not None else {})}
    _plot({name: _umap(X, seed) for name, X in embeddings.items()}, colours, out / "umap.png")
    return out
