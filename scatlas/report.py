"""Integration reports: scib-family metrics (JSON) and UMAPs before / after, by batch and label.

``integration_report`` compares the uncorrected embedding (PCA of the log-normalised
highly-variable genes, computed here from the raw counts in ``.X``) with an integrated
embedding in ``.obsm``. Metrics come from :mod:`scatlas.metrics` (with labels: the full
``summary``; without: iLISI only); UMAPs from umap-learn, drawn with
matplotlib, on the exact k-NN graph of :func:`scatlas.kernels.knn`. Files are written
atomically.

The plots follow scanpy's ``pl.embedding`` conventions: the cells are drawn in one random order
(seeded), so no batch is painted over the others because it came last, and legends are sorted
(numbers in numeric order). umap-learn's warnings about what it cannot do with a precomputed
graph (``transform`` of new data, parallelism under a fixed seed, a spectral start on a graph of
several components, which the uncorrected panel of well-separated batches is) concern nothing the
report does and are not shown; the report's steps show a progress bar (``progress``).
"""

from __future__ import annotations

import json
import re
import warnings
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
    with warnings.catch_warnings():
        # "precomputed_knn[2] is not an NNDescent object: transform ... unavailable" and
        # "n_jobs value 1 overridden to 1 by setting random_state": about uses we do not make
        warnings.filterwarnings("ignore", message=r"precomputed_knn", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"n_jobs value", category=UserWarning)
        # disconnected graphs (batches left apart) are what a "before" panel shows: umap-learn
        # then places the components by spectral layout per component, which is fine here
        warnings.filterwarnings("ignore", message=r"Graph is not fully connected",
                                category=UserWarning)
        model = umap.UMAP(n_neighbors=idx.shape[1], random_state=seed,
                          precomputed_knn=(idx, dist.astype(np.float32), None))
        return model.fit_transform(X)


def _natural_key(text: str) -> list[Any]:
    """Sort key putting ``"batch2"`` before ``"batch10"`` (digit runs compared as numbers)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", text) if part]


def draw_order(n: int, seed: int = 0) -> np.ndarray:
    """The order cells are drawn in: one seeded random permutation of ``range(n)``, so that no
    category covers the others because it was drawn last (scanpy shuffles the same way)."""
    return np.random.default_rng(seed).permutation(n)


def _palette(n: int) -> list[Any]:
    """``n`` distinct colours: tab10 / tab20 as scanpy, then evenly spaced hues."""
    import matplotlib

    if n <= 10:
        return list(matplotlib.colormaps["tab10"].colors[:n])
    if n <= 20:
        return list(matplotlib.colormaps["tab20"].colors[:n])
    return [matplotlib.colormaps["hsv"](i / n) for i in range(n)]


def umap_figure(panels: dict[str, np.ndarray], colours: dict[str, np.ndarray],
                seed: int = 0) -> Any:
    """The report's figure: one row per embedding in ``panels`` (name -> (n, 2) coordinates),
    one column per colouring in ``colours`` (name -> (n,) categories); cells drawn in
    :func:`draw_order`, legends sorted. Returns the matplotlib Figure (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(len(panels), len(colours), squeeze=False,
                             figsize=(5.6 * len(colours), 4.5 * len(panels)))
    for col, (name, values) in enumerate(colours.items()):
        cats = sorted({str(v) for v in values}, key=_natural_key)
        code = {c: i for i, c in enumerate(cats)}
        palette = np.asarray(_palette(len(cats)), dtype=float)
        rgba = palette[[code[str(v)] for v in values]]
        order = draw_order(len(values), seed)
        for row, (title, xy) in enumerate(panels.items()):
            ax = axes[row, col]
            ax.scatter(xy[order, 0], xy[order, 1], s=4, c=rgba[order], alpha=0.8,
                       linewidths=0, rasterized=True)
            ax.set_title(f"{title}: {name}")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("UMAP1")
            ax.set_ylabel("UMAP2")
            if len(cats) <= 30:
                handles = [Line2D([], [], marker="o", linestyle="", color=palette[i],
                                  markersize=5, label=c) for i, c in enumerate(cats)]
                ax.legend(handles=handles, fontsize=7, loc="center left",
                          bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def _plot(panels: dict[str, np.ndarray], colours: dict[str, np.ndarray], path: Path,
          seed: int = 0) -> None:
    import matplotlib.pyplot as plt

    from .io import atomic_write

    fig = umap_figure(panels, colours, seed)
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
    progress: bool | None = None,
) -> Path:
    """Write ``metrics.json`` and ``umap.png`` for the embedding ``.obsm[key]`` into ``out_dir``.

    For an iNMF result the quantile-normalised ``.obsm[key + "_norm"]`` is used when present.
    ``metrics.json`` holds ``{"uncorrected": {...}, "integrated": {...}, "key": ..., ...}``;
    ``umap.png`` has one row per embedding and one column per colouring (batch, label).
    ``progress``: a bar over the report's steps (default: when stderr is a terminal).
    Returns ``out_dir``.
    """
    from . import io
    from ._progress import bar

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
    n_steps = 1 + (2 if adata.X is not None else 1) * 2 + 1  # pca, metrics, umaps, plot
    with bar(desc="report", total=n_steps, progress=progress, unit="step") as steps:
        steps.set_postfix_str("uncorrected PCA")
        before = _uncorrected_pca(adata, batch_key)
        steps.update(1)
        if before is not None:
            embeddings = {"uncorrected": before, **embeddings}
        record = {"key": used, "batch_key": batch_key, "label_key": label_key,
                  "n_cells": int(adata.n_obs)}
        for name, X in embeddings.items():
            steps.set_postfix_str(f"metrics ({name})")
            record[name] = _metrics(X, batch, labels)
            steps.update(1)
        with io.atomic_write(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=float))
        colours = {batch_key: batch, **({label_key: labels} if labels is not None else {})}
        panels = {}
        for name, X in embeddings.items():
            steps.set_postfix_str(f"UMAP ({name})")
            panels[name] = _umap(X, seed)
            steps.update(1)
        steps.set_postfix_str("plot")
        _plot(panels, colours, out / "umap.png", seed)
        steps.update(1)
    return out
