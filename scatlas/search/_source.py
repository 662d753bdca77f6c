"""Embedding sources for :meth:`CellIndex.build` / ``add``: arrays, AnnData, streams of chunks.

A :class:`Source` yields ``(chunk (n_i, d) array, metadata DataFrame or None)`` pairs of at most
``chunk_size`` rows and can draw a training sample. Arrays (NumPy, NumPy memmaps, CuPy) and
AnnData (``.obsm[obsm_key]``) are re-iterable and sampled by row index (a memmap is read only in
chunks and at the sampled rows). A plain iterable of chunks is read once; its training sample is
drawn from the leading chunks (shuffle them if their order is not random), which are kept and
added after training.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd

from .. import backend
from .._validate import ScatlasInputError


def _check_chunk(X: Any, name: str, d: int | None) -> Any:
    if backend.issparse(X):
        raise ScatlasInputError(f"{name} must be a dense (n, d) array, got a sparse matrix")
    if not hasattr(X, "shape"):
        X = np.asarray(X)
    if len(X.shape) != 2:
        raise ScatlasInputError(f"{name} must be 2-D (cells x dims), got shape {tuple(X.shape)}")
    if np.dtype(X.dtype).kind not in "biuf":
        raise ScatlasInputError(f"{name} must be numeric, got dtype {X.dtype}")
    if d is not None and X.shape[1] != d:
        raise ScatlasInputError(f"{name} has {X.shape[1]} columns; the index has dimension {d}")
    return X


def _check_finite(X: Any, name: str) -> None:
    xp = backend.array_module(X)
    if np.dtype(X.dtype).kind == "f":
        bad = int(xp.count_nonzero(~xp.isfinite(X)))
        if bad:
            raise ScatlasInputError(f"{name} contains {bad} NaN or infinite value(s)")


def _as_frame(meta: Any, n: int, name: str) -> pd.DataFrame | None:
    if meta is None:
        return None
    if not isinstance(meta, pd.DataFrame):
        try:
            meta = pd.DataFrame(meta)
        except Exception as err:
            raise ScatlasInputError(f"{name} must be a pandas DataFrame, got "
                                    f"{type(meta).__name__}") from err
    if len(meta) != n:
        raise ScatlasInputError(f"{name} has {len(meta)} rows but the embeddings have {n}")
    return meta


class Source:
    """Chunks of embeddings with their metadata; see the module docstring."""

    def __init__(self, embeddings: Any, metadata: Any = None, *, chunk_size: int = 100_000,
                 obsm_key: str = "X_scatlas", d: int | None = None, name: str = "embeddings"):
        self.chunk_size = int(chunk_size)
        self.name = name
        self._stream: Iterator | None = None
        self._head: list[tuple[Any, pd.DataFrame | None]] = []
        if hasattr(embeddings, "obsm") and hasattr(embeddings, "obs"):  # AnnData
            if obsm_key not in embeddings.obsm:
                raise ScatlasInputError(
                    f"AnnData has no .obsm[{obsm_key!r}] (available: {list(embeddings.obsm)}); "
                    "pass obsm_key= or the embedding array itself")
            X = embeddings.obsm[obsm_key]
            if metadata is None:
                metadata = embeddings.obs
            embeddings = X
        if hasattr(embeddings, "shape") or isinstance(embeddings, list | tuple) and (
                embeddings and np.ndim(embeddings[0]) == 1):
            self.X = _check_chunk(embeddings, name, d)
            self.n: int | None = int(self.X.shape[0])
            self.d = int(self.X.shape[1])
            self.meta = _as_frame(metadata, self.n, "metadata")
            self.reiterable = True
        elif isinstance(embeddings, Iterable):
            self.X = None
            self.n = None
            metas = iter(metadata) if metadata is not None else None
            self._stream = self._pairs(iter(embeddings), metas, d)
            first = next(self._stream, None)
            if first is None:
                raise ScatlasInputError(f"{name} is an empty iterable of chunks")
            self._head.append(first)
            self.d = int(first[0].shape[1])
            self.reiterable = False
        else:
            raise ScatlasInputError(
                f"{name} must be an (n, d) array, an AnnData or an iterable of (n_i, d) chunks, "
                f"got {type(embeddings).__name__}")
        if self.d < 1:
            raise ScatlasInputError(f"{name} has no columns")

    def _pairs(self, chunks: Iterator, metas: Iterator | None, d: int | None):
        for i, X in enumerate(chunks):
            X = _check_chunk(X, f"{self.name} chunk {i}", d)
            d = X.shape[1]
            meta = None
            if metas is not None:
                meta = _as_frame(next(metas, None), X.shape[0], f"metadata chunk {i}")
            yield X, meta

    def sample(self, size: int, seed: int) -> Any:
        """Up to ``size`` rows drawn without replacement (sorted row order), float32."""
        if self.X is not None:
            n = self.n
            if size >= n:
                return self.X
            rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
            xp = backend.array_module(self.X)
            return self.X[xp.asarray(rows)] if xp is not np else np.asarray(self.X[rows])
        # stream: read leading chunks until the sample is full (or the stream ends)
        have = sum(c.shape[0] for c, _ in self._head)
        while have < size:
            nxt = next(self._stream, None)
            if nxt is None:
                break
            self._head.append(nxt)
            have += nxt[0].shape[0]
        xp = backend.array_module(self._head[0][0])
        pool = xp.concatenate([xp.asarray(c) for c, _ in self._head])
        if pool.shape[0] <= size:
            return pool
        rows = np.sort(np.random.default_rng(seed).choice(pool.shape[0], size, replace=False))
        return pool[xp.asarray(rows) if xp is not np else rows]

    @property
    def buffered(self) -> int:
        """Rows known so far (all of them for arrays)."""
        if self.n is not None:
            return self.n
        return sum(c.shape[0] for c, _ in self._head)

    @property
    def exhausted(self) -> bool:
        """True when every row is known (arrays; a stream read to its end)."""
        if self.n is not None:
            return True
        nxt = next(self._stream, None)
        if nxt is None:
            return True
        self._head.append(nxt)
        return False

    def chunks(self) -> Iterator[tuple[Any, pd.DataFrame | None]]:
        """Yield (chunk, metadata) pairs; arrays in ``chunk_size`` row slices."""
        if self.X is not None:
            for s in range(0, self.n, self.chunk_size):
                e = min(self.n, s + self.chunk_size)
                meta = None if self.meta is None else self.meta.iloc[s:e]
                yield self.X[s:e], meta
            return
        while self._head:
            yield self._head.pop(0)
        yield from self._stream
