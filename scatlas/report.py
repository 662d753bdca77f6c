"""Integration reports: scib-family metrics (JSON) and UMAPs and t-SNEs before / after, by batch
and label.

``integration_report`` compares the uncorrected embedding (PCA of the log-normalised
highly-variable genes, computed here from the raw counts in ``.X``) with an integrated
embedding in ``.obsm``. Metrics come from :mod:`scatlas.metrics` (with labels: the full
``summary``; without: iLISI only); UMAPs from umap-learn, on the exact k-NN graph of
:func:`scatlas.kernels.knn`, and beside them t-SNEs from openTSNE (:func:`scatlas.tl.tsne`; left
out, with a warning, when openTSNE is not installed), drawn with matplotlib
(:func:`scatlas.pl.scatter`). Files are written atomically.

The plots follow scanpy's ``pl.embedding`` conventions: the cells are drawn in one random order
(seeded), so no batch is painted over the others because it came last, and legends are sorted
(numbers in numeric order). umap-learn's warnings about what it cannot do with a precomputed
graph (``transform`` of new data, parallelism under a fixed seed, a spectral start on a graph of
several components, which the uncorrected panel of well-separated batches is) concern nothing the
report does and are not shown; the report's steps show a progress bar (``progress``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import ScatlasInputError, check_obs_key
from .pl import draw_order  # noqa: F401 (re-exported: the report's drawing order)

_N_PCS = 30


def _uncorrected_pca(adata, batch_key: str) -> np.ndarray | None:
    """PCA (30) of log-normalised batch-aware HVGs of the raw counts; None without ``.X``.

    The same normalisation and gene selection as :func:`scatlas.tl.integrate` uses.
    """
    from .kernels import pca
    from .pp import log_normalized_hvg

    if adata.X is None:
        return None
    work, genes = log_normalized_hvg(adata, batch_key, n_top_genes=min(2000, adata.n_vars))
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
    with warnings.catch_warnings():  # its import announces an optional TensorFlow it lacks
        warnings.filterwarnings("ignore", message="Tensorflow not installed",
                                category=ImportWarning)
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


def _tsne(X: np.ndarray, seed: int) -> np.ndarray | None:
    """2-D t-SNE (openTSNE, :func:`scatlas.tl.tsne_coordinates`); None, with a warning, when
    openTSNE is not installed (the report then shows UMAPs only)."""
    from .tl import tsne_coordinates

    try:
        return tsne_coordinates(np.nan_to_num(np.asarray(X, dtype=np.float32)), seed=seed)
    except ScatlasInputError as err:
        if "openTSNE" not in str(err):
            raise
        warnings.warn(f"report: no t-SNE panels ({err})", stacklevel=3)
        return None


def umap_figure(panels: dict[str, np.ndarray], colours: dict[str, np.ndarray],
                seed: int = 0, tsne: dict[str, np.ndarray] | None = None) -> Any:
    """The report's figure: one row per embedding in ``panels`` (name -> (n, 2) UMAP
    coordinates), one column per colouring in ``colours`` (name -> (n,) categories), and, with
    ``tsne`` (name -> (n, 2) t-SNE coordinates), as many t-SNE columns beside them. Cells drawn
    in :func:`scatlas.pl.draw_order`, legends sorted. Returns the matplotlib Figure (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .pl import scatter

    views = [("UMAP", panels)] + ([("t-SNE", tsne)] if tsne else [])
    ncols = len(colours) * len(views)
    fig, axes = plt.subplots(len(panels), ncols, squeeze=False,
                             figsize=(5.6 * ncols, 4.5 * len(panels)))
    for v, (axis, coords) in enumerate(views):
        for c, (name, values) in enumerate(colours.items()):
            for row, title in enumerate(panels):
                label = f"{title}: {name}" if axis == "UMAP" else f"{title} ({axis}): {name}"
                scatter(axes[row, v * len(colours) + c], coords[title], values, title=label,
                        axis=axis, seed=seed)
    fig.tight_layout()
    return fig


def _plot(panels: dict[str, np.ndarray], colours: dict[str, np.ndarray], path: Path,
          seed: int = 0, tsne: dict[str, np.ndarray] | None = None) -> None:
    import matplotlib.pyplot as plt

    from .io import atomic_write

    fig = umap_figure(panels, colours, seed, tsne)
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
    ``umap.png`` has one row per embedding and one column per colouring (batch, label) for the
    UMAPs, then the same columns for the t-SNEs, side by side.
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
    n_steps = 1 + (2 if adata.X is not None else 1) * 3 + 1  # pca, metrics, umaps, t-SNEs, plot
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
        panels, tsne = {}, {}
        for name, X in embeddings.items():
            steps.set_postfix_str(f"UMAP ({name})")
            panels[name] = _umap(X, seed)
            steps.update(1)
            steps.set_postfix_str(f"t-SNE ({name})")
            coords = _tsne(X, seed)
            if coords is not None:
                tsne[name] = coords
            steps.update(1)
        steps.set_postfix_str("plot")
        _plot(panels, colours, out / "umap.png", seed, tsne if len(tsne) == len(panels) else None)
        steps.update(1)
    return out
