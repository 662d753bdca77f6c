"""The atlas's 2-D map, computed once and stored with a saved index (the web page draws it).

``scatlas index build ... --map tsne`` (or ``scatlas index map INDEX EMB --method tsne`` for an
index built earlier) writes a ``map/`` folder inside the index folder:

- ``coords.npy``: ``(n, 2)`` float32, the 2-D position of cell id ``i`` in row ``i`` (NaN for
  an id without one);
- ``vectors.npy``: ``(n, d)`` float32, the embeddings the index was built from, by id, so that
  the page can search "the cell with id ``i``" with exactly the vector the index holds (engines
  keep vectors in their own layouts, IVF-PQ only lossily; this copy is read memory-mapped);
- ``map.json``: ``format``, ``method``, ``n``, ``dim``, ``seed``, the scatlas version and each
  file's size and sha256.

The folder is written atomically (a temporary folder swapped in), and
:func:`~scatlas.search.persist.save_index` carries it over when it rewrites the index folder
with unchanged index data (``index calibrate``); a different index saved there drops it.
Cells added to the index after the map was made have no position and cannot be queried by id
until the map is made again.

Methods: ``tsne`` (openTSNE, the ``tsne`` extra; cosine distances for cosine indexes),
``umap`` (umap-learn, when installed) and ``pca`` (the first two principal components, no
extra dependency, quick but a poor picture of clusters). :meth:`AtlasMap.render_png` rasterises
the map once per colouring into a PNG (a minimal encoder: zlib and the PNG chunk layout; no
imaging library) and :meth:`AtlasMap.pixels` gives cells' positions in that picture.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..exceptions import ScatlasInputError

__all__ = ["MAP_DIR", "METHODS", "AtlasMap", "carry_map", "compute_map", "load_map", "save_map"]

MAP_DIR = "map"
FORMAT = "scatlas-atlas-map"
FORMAT_VERSION = 1
METHODS = ("tsne", "umap", "pca")
#: picture size of :meth:`AtlasMap.render_png` (pixels) and its margin
WIDTH, HEIGHT, MARGIN = 560, 420, 12
#: categories drawn in their own colour; the rest are grey ("other")
MAX_COLOURS = 12
#: colour-blind-safe palette (Okabe-Ito, then Tol's muted), each with contrast on white
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#332288",
           "#882255", "#117733", "#999933", "#AA4499", "#44AA99")
OTHER = "#BBBBBB"


# ------------------------------------------------------------------------------------------------
# computing
# ------------------------------------------------------------------------------------------------


def compute_map(embeddings: Any, method: str = "tsne", *, metric: str = "cosine",
                seed: int = 0) -> np.ndarray:
    """2-D coordinates ``(n, 2)`` float32 of ``embeddings`` ``(n, d)`` by ``method``.

    ``metric``: the index's metric (``cosine`` rows are L2-normalised first, so every method
    sees the geometry the index searches). Raises :class:`~scatlas.exceptions.ScatlasInputError`
    for an unknown method, fewer than 3 cells, or a method whose package is not installed.
    """
    if method not in METHODS:
        raise ScatlasInputError(f"map method must be one of {list(METHODS)}, got {method!r}",
                                param="method")
    X = np.asarray(embeddings, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] < 3:
        raise ScatlasInputError(f"a map needs at least 3 cells as an (n, d) matrix, got shape "
                                f"{list(X.shape)}", param="embeddings")
    if not np.isfinite(X).all():
        raise ScatlasInputError("the embeddings hold NaN or infinite values", param="embeddings")
    if metric == "cosine":
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    if method == "pca":
        centred = X - X.mean(axis=0)
        _, _, vt = np.linalg.svd(centred[:: max(1, X.shape[0] // 50_000)], full_matrices=False)
        Y = centred @ vt[:2].T
        if Y.shape[1] < 2:
            Y = np.column_stack([Y, np.zeros(X.shape[0], np.float32)])
    elif method == "tsne":
        try:
            from openTSNE import TSNE
        except ImportError:  # pragma: no cover - depends on the environment
            raise ScatlasInputError("map method 'tsne' needs openTSNE: pip install "
                                    "'scatlas[tsne]' (or use --map pca)", param="method") from None
        perplexity = float(min(30.0, max(2.0, (X.shape[0] - 1) / 3.5)))
        Y = np.asarray(TSNE(perplexity=perplexity, metric="euclidean", random_state=seed,
                            n_jobs=1, verbose=False).fit(X))
    else:
        try:
            import umap
        except ImportError:  # pragma: no cover - depends on the environment
            raise ScatlasInputError("map method 'umap' needs umap-learn: pip install umap-learn "
                                    "(or use --map tsne / pca)", param="method") from None
        Y = umap.UMAP(n_components=2, random_state=seed,
                      n_neighbors=min(15, X.shape[0] - 1)).fit_transform(X)
    return np.ascontiguousarray(Y, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# storing
# ------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    from .persist import sha256_file

    return sha256_file(path)


def save_map(index_dir: str | Path, embeddings: Any, coords: Any, *, method: str,
             seed: int = 0) -> Path:
    """Write ``index_dir/map/`` (see the module docstring) atomically; returns its path.

    ``embeddings`` ``(n, d)`` and ``coords`` ``(n, 2)`` are by cell id (row ``i`` is id ``i``),
    as given to :meth:`CellIndex.build <scatlas.search.CellIndex.build>`."""
    from ..io import swap_folder
    from .persist import _new_folder

    folder = Path(index_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"index folder {str(folder)!r} does not exist")
    X = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    Y = np.ascontiguousarray(np.asarray(coords, dtype=np.float32))
    if X.ndim != 2 or Y.shape != (X.shape[0], 2):
        raise ScatlasInputError(f"coords must be (n, 2) for {X.shape[0]} embeddings, got "
                                f"{list(Y.shape)}", param="coords")
    tmp = _new_folder(folder, MAP_DIR)
    try:
        np.save(tmp / "coords.npy", Y)
        np.save(tmp / "vectors.npy", X)
        files = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                 for name in ("coords.npy", "vectors.npy")}
        from .. import __version__

        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": method,
                "n": int(X.shape[0]), "dim": int(X.shape[1]), "seed": int(seed),
                "scatlas_version": __version__, "files": files}
        with open(tmp / "map.json", "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        swap_folder(tmp, folder / MAP_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / MAP_DIR


def carry_map(old_index_dir: Path, new_index_dir: Path, new_files: dict[str, Any]) -> None:
    """Copy ``old/map/`` into ``new/`` when the index data are unchanged; called by
    :func:`~scatlas.search.persist.save_index` when it rewrites an index folder.

    ``new_files``: the new manifest's ``files`` (name -> ``{"sha256", "bytes"}``). The map is
    carried only if every engine file has the sha256 the old manifest lists (the metadata and
    the live-cell mask may differ: the map is by id), so a different index saved over the
    folder drops it. Files are hard-linked where possible (they are never modified in place).
    """
    src, dst = Path(old_index_dir) / MAP_DIR, Path(new_index_dir) / MAP_DIR
    if not src.is_dir() or dst.exists():
        return
    try:
        old_files = json.loads((Path(old_index_dir) / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    kept = ("metadata.parquet", "alive.npy")
    engine_files = {k: v.get("sha256") for k, v in new_files.items() if k not in kept}
    if engine_files != {k: v.get("sha256") for k, v in old_files.items() if k not in kept}:
        return

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def load_map(index_dir: str | Path, *, verify: bool = False) -> AtlasMap | None:
    """The map stored in ``index_dir/map/``, or None when there is none.

    File sizes are always checked against ``map.json``; sha256 too with ``verify``. The
    embeddings are memory-mapped (read on demand)."""
    folder = Path(index_dir) / MAP_DIR
    if not (folder / "map.json").is_file():
        return None
    try:
        meta = json.loads((folder / "map.json").read_text())
    except (OSError, ValueError) as err:
        raise ScatlasInputError(f"{str(folder / 'map.json')!r} is unreadable: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ScatlasInputError(f"{str(folder / 'map.json')!r} is not a {FORMAT} file")
    for name, facts in meta.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != facts["bytes"]:
            raise ScatlasInputError(f"{str(path)!r} is missing or has the wrong size; make the "
                                    "map again (scatlas index map)")
        if verify and _sha256(path) != facts["sha256"]:
            raise ScatlasInputError(f"{str(path)!r} does not match its sha256 in map.json")
    coords = np.load(folder / "coords.npy")
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    if coords.shape != (meta["n"], 2) or vectors.shape != (meta["n"], meta["dim"]):
        raise ScatlasInputError(f"{str(folder)!r}: array shapes disagree with map.json")
    return AtlasMap(coords, vectors, method=str(meta["method"]))


# ------------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------------


def _png(rgb: np.ndarray) -> bytes:
    """``(h, w, 3)`` uint8 -> PNG bytes (8-bit RGB, filter 0 on every row)."""
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


class AtlasMap:
    """A stored 2-D map: positions and embeddings by cell id, and its picture."""

    def __init__(self, coords: np.ndarray, vectors: np.ndarray | None, *, method: str) -> None:
        self.coords = np.asarray(coords, dtype=np.float32)
        self.vectors = vectors
        self.method = method
        ok = np.isfinite(self.coords).all(axis=1)
        lo = self.coords[ok].min(axis=0) if ok.any() else np.zeros(2, np.float32)
        hi = self.coords[ok].max(axis=0) if ok.any() else np.ones(2, np.float32)
        span = np.maximum(hi - lo, 1e-6)
        # one scale for both axes keeps the map's shape
        scale = min((WIDTH - 2 * MARGIN) / span[0], (HEIGHT - 2 * MARGIN) / span[1])
        offset = np.array([WIDTH, HEIGHT]) / 2 - (lo + hi) / 2 * scale
        px = self.coords * scale + offset
        px[:, 1] = HEIGHT - px[:, 1]  # y grows upwards on the map, downwards in a picture
        self._px = px
        self._ok = ok
        self._pictures: dict[str, tuple[bytes, list[dict[str, Any]]]] = {}

    @property
    def n(self) -> int:
        return int(self.coords.shape[0])

    def vector(self, cell: int) -> np.ndarray | None:
        """The stored embedding of cell id ``cell`` (None beyond the map)."""
        if self.vectors is None or not 0 <= cell < self.vectors.shape[0]:
            return None
        return np.asarray(self.vectors[cell], dtype=np.float32)

    def pixels(self, ids: np.ndarray) -> list[list[float] | None]:
        """Picture positions ``[x, y]`` (pixels, 0.1 precision) of ``ids``; None for -1, ids
        beyond the map and cells without a position."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        good = (ids >= 0) & (ids < self.n)
        good[good] = self._ok[ids[good]]
        out: list[list[float] | None] = [None] * ids.size
        xy = np.round(self._px[ids[good]], 1).tolist()
        for i, p in zip(np.flatnonzero(good).tolist(), xy, strict=True):
            out[i] = p
        return out

    def cached_picture(self, column: str | None) -> tuple[bytes, list[dict[str, Any]]] | None:
        """The picture :meth:`render_png` made for the colouring ``column``, if any."""
        return self._pictures.get("" if column is None else str(column))

    def render_png(self, labels: pd.Series | None = None,
                   alive: np.ndarray | None = None) -> tuple[bytes, list[dict[str, Any]]]:
        """The map as a PNG (``WIDTH`` x ``HEIGHT``), cells coloured by ``labels`` (a metadata
        column by id; its ``MAX_COLOURS`` most common values get colours, the rest grey) and
        the legend ``[{"value", "colour", "cells"}]``. ``alive``: mask of live ids."""
        key = "" if labels is None else str(labels.name)
        if key in self._pictures:
            return self._pictures[key]
        n = self.n
        show = self._ok.copy()
        if alive is not None:
            m = min(n, alive.size)
            show[:m] &= alive[:m]
            show[m:] = False
        colour_of = np.full(n, -1, dtype=np.int64)
        legend: list[dict[str, Any]] = []
        if labels is not None:
            values = pd.Series(np.asarray(labels)[:n]).astype("string").fillna("(missing)")
            if len(values) < n:
                values = pd.concat([values, pd.Series(["(missing)"] * (n - len(values)))])
            counts = values[show[: len(values)]].value_counts()
            top = list(counts.index[:MAX_COLOURS])
            code = pd.Categorical(values.to_numpy(), categories=top).codes
            colour_of[: len(code)] = code
            legend = [{"value": str(v), "colour": PALETTE[i], "cells": int(counts[v])}
                      for i, v in enumerate(top)]
            rest = int(counts.iloc[MAX_COLOURS:].sum())
            if rest:
                legend.append({"value": "other", "colour": OTHER, "cells": rest})
        colours = np.array([_rgb(c) for c in (*PALETTE, OTHER)], dtype=np.uint8)
        img = np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)
        ids = np.flatnonzero(show)
        ids = ids[np.random.default_rng(0).permutation(ids.size)]  # no colour drawn last on top
        pix = np.round(self._px[ids]).astype(np.int64)
        col = colours[np.where(colour_of[ids] >= 0, colour_of[ids], len(PALETTE))]
        radius = 2 if ids.size <= 5_000 else (1 if ids.size <= 100_000 else 0)
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                if dx * dx + dy * dy > radius * radius + 1:
                    continue
                x, y = pix[:, 0] + dx, pix[:, 1] + dy
                inside = (x >= 0) & (x < WIDTH) & (y >= 0) & (y < HEIGHT)
                img[y[inside], x[inside]] = col[inside]
        picture = (_png(img), legend)
        self._pictures[key] = picture
        return picture
