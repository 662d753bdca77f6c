"""Plots (matplotlib): 2-D embeddings of cells, coloured by ``.obs`` columns.

:func:`embedding` follows scanpy's ``pl.embedding``: ``basis="tsne"`` reads ``.obsm["X_tsne"]``
(``"umap"``, ``"pca"`` ... likewise; a full ``.obsm`` key works too), categorical colours from
tab10 / tab20, the cells drawn in one seeded random order (so no category is painted over the
others because it came last) and legends sorted with numbers in numeric order. Numeric
columns are drawn with a colour bar. The report of ``scatlas integrate --report``
(:mod:`scatlas.report`) draws its panels with the same :func:`scatter` helper.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._validate import ScatlasInputError, check_obs_key

__all__ = ["draw_order", "embedding", "scatter"]


def natural_key(text: str) -> list[Any]:
    """Sort key putting ``"batch2"`` before ``"batch10"`` (digit runs compared as numbers)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", text) if part]


def draw_order(n: int, seed: int = 0) -> np.ndarray:
    """The order cells are drawn in: one seeded random permutation of ``range(n)``, so that no
    category covers the others because it was drawn last (scanpy shuffles the same way)."""
    return np.random.default_rng(seed).permutation(n)


def palette(n: int) -> list[Any]:
    """``n`` distinct colours: tab10 / tab20 as scanpy, then evenly spaced hues."""
    import matplotlib

    if n <= 10:
        return list(matplotlib.colormaps["tab10"].colors[:n])
    if n <= 20:
        return list(matplotlib.colormaps["tab20"].colors[:n])
    return [matplotlib.colormaps["hsv"](i / n) for i in range(n)]


def scatter(ax: Any, xy: np.ndarray, values: np.ndarray | None, *, title: str = "",
            axis: str = "", seed: int = 0, size: float = 4.0) -> None:
    """Draw cells ``xy`` (n, 2) on ``ax`` coloured by ``values`` (n,) (categories, or numbers
    with a colour bar; None: grey), in :func:`draw_order`, legend sorted (up to 30 entries);
    axis labels ``axis + "1"`` / ``axis + "2"``."""
    from matplotlib.lines import Line2D

    xy = np.asarray(xy, dtype=np.float64)
    order = draw_order(xy.shape[0], seed)
    kw = dict(s=size, alpha=0.8, linewidths=0, rasterized=True)
    if values is None:
        ax.scatter(xy[order, 0], xy[order, 1], c="0.5", **kw)
    elif np.asarray(values).dtype.kind in "fiu" and np.unique(values).size > 30:
        art = ax.scatter(xy[order, 0], xy[order, 1], c=np.asarray(values)[order],
                         cmap="viridis", **kw)
        ax.figure.colorbar(art, ax=ax, fraction=0.046, pad=0.02)
    else:
        text = np.asarray([str(v) for v in values])
        cats = sorted(set(text.tolist()), key=natural_key)
        code = {c: i for i, c in enumerate(cats)}
        colours = np.asarray(palette(len(cats)), dtype=float)
        rgba = colours[[code[v] for v in text]]
        ax.scatter(xy[order, 0], xy[order, 1], c=rgba[order], **kw)
        if len(cats) <= 30:
            handles = [Line2D([], [], marker="o", linestyle="", color=colours[i],
                              markersize=5, label=c) for i, c in enumerate(cats)]
            ax.legend(handles=handles, fontsize=7, loc="center left",
                      bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if axis:
        ax.set_xlabel(f"{axis}1")
        ax.set_ylabel(f"{axis}2")


_AXIS_NAMES = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PC", "draw_graph_fa": "FA"}


def _basis_key(adata: Any, basis: str) -> str:
    for key in (f"X_{basis}", basis):
        if key in adata.obsm:
            return key
    raise ScatlasInputError(
        f"basis {basis!r}: neither .obsm['X_{basis}'] nor .obsm[{basis!r}] exists (available: "
        f"{list(adata.obsm)}); compute it first (e.g. scatlas.tl.tsne)", param="basis")


def embedding(
    adata: Any,
    basis: str,
    *,
    color: str | Sequence[str] | None = None,
    components: tuple[int, int] = (0, 1),
    seed: int = 0,
    size: float = 4.0,
    ncols: int = 3,
    title: str | None = None,
) -> Any:
    """Scatter plot of the cells in a 2-D embedding, one panel per colouring.

    Parameters
    ----------
    adata
        AnnData with the embedding in ``.obsm`` (host or device arrays; moved to the host).
    basis
        ``"tsne"``, ``"umap"``, ``"pca"`` ... (``.obsm["X_" + basis]``) or an ``.obsm`` key.
    color
        ``.obs`` column(s) to colour by; None: one grey panel.
    components
        The two columns of the embedding drawn (0-based).
    seed
        Seed of the drawing order.
    size, ncols, title
        Marker size, panels per row, and a title for single-panel figures (default: the basis
        and the column).

    Returns
    -------
    The matplotlib ``Figure`` (drawn with whatever backend is active; nothing is shown or
    saved).
    """
    import matplotlib.pyplot as plt

    from . import backend

    key = _basis_key(adata, basis)
    coords = np.asarray(backend.to_host(adata.obsm[key]))
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ScatlasInputError(f".obsm[{key!r}] must be (n_obs, >= 2), got {coords.shape}",
                                param="basis")
    a, b = components
    if not (0 <= a < coords.shape[1] and 0 <= b < coords.shape[1]) or a == b:
        raise ScatlasInputError(
            f"components={components} must be two different columns of .obsm[{key!r}] "
            f"({coords.shape[1]} columns)", param="components")
    colours = [None] if color is None else [color] if isinstance(color, str) else list(color)
    for c in colours:
        if c is not None:
            check_obs_key(adata, c, "color")
    ncols = max(1, min(ncols, len(colours)))
    nrows = -(-len(colours) // ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(5.6 * ncols, 4.5 * nrows))
    name = _AXIS_NAMES.get(key.removeprefix("X_"), key.removeprefix("X_"))
    for ax, c in zip(axes.ravel(), colours, strict=False):
        values = None if c is None else adata.obs[c].to_numpy()
        label = title if title is not None and len(colours) == 1 else (
            f"{name}: {c}" if c else name)
        scatter(ax, coords[:, [a, b]], values, title=label, axis=name, seed=seed, size=size)
    for ax in axes.ravel()[len(colours):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
