"""Mini-batch streaming for training: sources, balanced sampling, densifying, prefetching.

A :class:`CellBatches` turns a cells x genes matrix (in memory, a backed ``.h5ad``, a zarr store,
or the synthetic generator) into an endless, **indexable** stream of mini-batches: batch ``t`` is
a pure function of ``(seed, t)``. That is what makes checkpoint-and-resume exact (a resumed run
asks for batch ``t`` and gets the batch the uninterrupted run saw) and lets a background thread
prepare batches ahead of the training step (:meth:`CellBatches.iterate`).

Sampling follows SCimilarity's ``scSampler`` (Heimberg et al. 2025; ``scimilarity`` 0.4,
``tiledb_data_models.py``): cells are drawn with replacement across batches and without repeats
within a batch, with weight ``1 / log1p(label_count / 1e4) * 1 / log1p(study_count / 1e6)``,
clipped at twice the 99.9th percentile. ``balance="label"`` keeps only the label factor,
``balance=None`` samples uniformly.

Each batch is a dict of numpy arrays: ``x`` float32 (B, n_genes) (log-normalised when
``transform="lognorm"``: counts scaled to 1e4 per cell, then ``log1p``, as SCimilarity and
scanpy's ``normalize_total`` + ``log1p``), ``label`` int32 (B,) codes (-1: none), ``study``
int32 (B,) codes (-1: none), ``index`` int64 (B,) source rows.

Size (about 780 lines): the sources, the sampler, the batch assembly and the prefetcher are the
one streaming path every trainer uses; the batch-size helpers at the end are shared by the
``tl.train_*`` functions.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._validate import ScatlasInputError, check_matrix, check_positive_int

Batch = dict[str, np.ndarray]
Transform = Callable[[Any], np.ndarray]


# --------------------------------------------------------------------------------------- sources

class MatrixSource:
    """Rows of an in-memory or on-disk matrix: ``rows(sorted_idx)`` returns CSR or dense.

    ``matrix`` may be a numpy array, a scipy sparse matrix, an anndata backed sparse dataset
    (``anndata.io.sparse_dataset`` over an h5py or zarr group) or an h5py / zarr dense array.
    ``columns``: keep only these genes (int indices) of every block read.
    """

    def __init__(self, matrix: Any, columns: np.ndarray | None = None):
        if sp.issparse(matrix) and not isinstance(matrix, sp.csr_matrix | sp.csr_array):
            matrix = sp.csr_matrix(matrix)
        if len(getattr(matrix, "shape", ())) != 2:
            raise ScatlasInputError(f"expected a 2-D cells x genes matrix, got {type(matrix)}")
        self.matrix = matrix
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self.n_obs, self.n_vars = (int(s) for s in matrix.shape)
        if self.columns is not None:
            self.n_vars = int(self.columns.size)

    def rows(self, idx: np.ndarray) -> Any:
        """Rows ``idx`` (sorted, unique) in that order (the kept ``columns`` only)."""
        block = self.matrix[idx]
        return block if self.columns is None else block[:, self.columns]

    @property
    def shape(self) -> tuple[int, int]:
        """(n_obs, n_vars): with :meth:`rows` and :meth:`blocks`, a ``scatlas.io.RowSource``."""
        return self.n_obs, self.n_vars

    def blocks(self, chunk_rows: int) -> Iterator[tuple[int, int, Any]]:
        """``(start, stop, rows)`` in row order, ``chunk_rows`` at a time."""
        for lo in range(0, self.n_obs, chunk_rows):
            hi = min(self.n_obs, lo + chunk_rows)
            yield lo, hi, self.rows(np.arange(lo, hi))


class SyntheticSource:
    """An endless synthetic atlas (:func:`scatlas.datasets.synthetic`'s model), by 512-cell blocks.

    Cell ``i`` is row ``i % 512`` of deterministic block ``i // 512``; ``n_obs`` is nominal
    (``n_blocks * 512``) so that label and study vectors can be read up front.
    """

    def __init__(self, n_genes: int, n_blocks: int = 64, **params: Any):
        from .. import datasets

        self._datasets = datasets
        self.spec = datasets.make_spec(n_genes, params)
        self.model = datasets.build_model(self.spec)
        self.n_blocks = check_positive_int(n_blocks, "n_blocks")
        self.n_obs = self.n_blocks * datasets.BLOCK_SIZE
        self.n_vars = n_genes
        self._cache: dict[int, Any] = {}
        labels, studies = [], []
        for b in range(self.n_blocks):
            blk = self._block(b)
            labels.append(blk.types)
            studies.append(blk.batches)
        self.labels = np.concatenate(labels)
        self.studies = np.concatenate(studies)

    def _block(self, b: int) -> Any:
        if b not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[b] = self._datasets.generate_block(self.model, b)
        return self._cache[b]

    def rows(self, idx: np.ndarray) -> sp.csr_matrix:
        B = self._datasets.BLOCK_SIZE
        parts = [self._block(int(b)).X[idx[idx // B == b] % B] for b in np.unique(idx // B)]
        return sp.vstack(parts, format="csr")


def as_source(X: Any) -> MatrixSource | SyntheticSource:
    """Wrap a matrix (or pass a source through); a Dask array, a list of chunks or another
    ``scatlas.io.RowSource`` is read through ``scatlas.io.ArrayRows`` / its own ``rows``."""
    if isinstance(X, MatrixSource | SyntheticSource):
        return X
    from ..io import ArrayRows, RowSource

    if isinstance(X, list | tuple) or hasattr(X, "dask") or (
            isinstance(X, RowSource) and not hasattr(X, "__getitem__")):
        X = ArrayRows(X) if not isinstance(X, RowSource) else _Indexed(X)
    return MatrixSource(X)


class _Indexed:
    """A RowSource without indexing, indexable (``src[idx]``, ``src[lo:hi]``) by its rows."""

    def __init__(self, source: Any):
        self.source, self.shape = source, tuple(source.shape)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            key = np.arange(*key.indices(self.shape[0]))
        return self.source.rows(np.asarray(key, dtype=np.int64))


# --------------------------------------------------------------------------------- transforms

def lognorm(X: Any, target_sum: float = 1e4, *, dense: bool = True) -> Any:
    """``log1p(counts / total * target_sum)`` per row, float32 (B, n_genes).

    Densified unless ``dense=False`` and ``X`` is sparse (then CSR). Rows with zero total stay
    zero (SCimilarity's ``scCollator`` guard).
    """
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32)
        totals = np.asarray(X.sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        counts = np.diff(X.indptr)
        values = np.log1p(X.data * np.repeat(scale.astype(np.float32), counts))
        if not dense:
            return sp.csr_matrix((values, X.indices, X.indptr), shape=X.shape)
        out = np.zeros(X.shape, dtype=np.float32)  # scattered directly: no CSR copy
        out[np.repeat(np.arange(X.shape[0]), counts), X.indices] = values
        return out
    X = np.asarray(X, dtype=np.float32)
    totals = X.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(X * scale)


def densify(X: Any, *, dense: bool = True) -> Any:
    """Rows as float32 (no normalisation: the input is already transformed); dense unless
    ``dense=False`` and ``X`` is sparse (then CSR)."""
    if sp.issparse(X):
        return X.toarray().astype(np.float32, copy=False) if dense else sp.csr_matrix(
            X, dtype=np.float32)
    return np.asarray(X).astype(np.float32, copy=False)


_TRANSFORMS: dict[str, Transform] = {"lognorm": lognorm, "none": densify}


def csr_capacity(nnz: int) -> int:
    """Stored entries a CSR batch is padded to: the smallest ``2^k * m / 8`` (m in 8..15) that
    holds ``nnz``, at least 1,024. Batches of similar density share a capacity, so a jitted step
    sees few shapes (at most 12.5 % padding)."""
    nnz = max(int(nnz), 1024)
    k = max(nnz.bit_length() - 4, 0)
    return -(-nnz // (1 << k)) << k


def csr_arrays(X: Any, capacity: int | None = None) -> dict[str, np.ndarray]:
    """A CSR batch as fixed-size arrays: ``x_indptr`` int32 (B + 1), ``x_indices`` int32 (cap)
    and ``x_data`` float32 (cap), padded with zeros to ``capacity`` (default
    :func:`csr_capacity`) — the input of :mod:`scatlas.models.sparse_ops`."""
    X = sp.csr_matrix(X, dtype=np.float32)
    cap = csr_capacity(X.nnz) if capacity is None else int(capacity)
    if cap < X.nnz:
        raise ScatlasInputError(f"capacity {cap} is below the {X.nnz} stored entries")
    if X.nnz >= 2**31:
        raise ScatlasInputError(f"{X.nnz} stored entries do not fit int32 indices")
    indices = np.zeros(cap, np.int32)
    data = np.zeros(cap, np.float32)
    indices[: X.nnz] = X.indices
    data[: X.nnz] = X.data
    return {"x_indptr": X.indptr.astype(np.int32), "x_indices": indices, "x_data": data}


def resolve_transform(transform: str | Transform | None) -> Transform:
    """``"lognorm"`` (raw counts in), ``"none"`` / None (already normalised), or a callable."""
    if transform is None:
        return densify
    if callable(transform):
        return transform
    if transform not in _TRANSFORMS:
        raise ScatlasInputError(
            f"transform must be one of {sorted(_TRANSFORMS)} or a callable, got {transform!r}"
        )
    return _TRANSFORMS[transform]


# ----------------------------------------------------------------------------------- sampling

def encode(values: Any, n: int, name: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes (int32, -1 for missing) and the category names of a per-cell vector."""
    if values is None:
        return np.full(n, -1, dtype=np.int32), []
    values = pd.Series(np.asarray(values))
    if len(values) != n:
        raise ScatlasInputError(f"{name} has {len(values)} entries for {n} cells")
    cat = pd.Categorical(values)
    return cat.codes.astype(np.int32), [str(c) for c in cat.categories]


def sampling_weights(
    labels: np.ndarray, studies: np.ndarray, balance: str | None
) -> np.ndarray | None:
    """Per-cell sampling weights (SCimilarity ``scSampler``), normalised to sum 1; None: uniform.

    ``balance``: ``"label_study"`` (label and study factors), ``"label"``, ``"study"`` or None.
    """
    if balance is None:
        return None
    if balance not in ("label_study", "label", "study"):
        raise ScatlasInputError(
            f"balance must be 'label_study', 'label', 'study' or None, got {balance!r}",
            param="balance")
    w = np.ones(len(labels))
    if balance in ("label_study", "label") and (labels >= 0).any():
        w *= _factor(labels, 1e4)
    if balance in ("label_study", "study") and (studies >= 0).any():
        w *= _factor(studies, 1e6)
    w = np.minimum(w, 2 * np.quantile(w, 0.999))
    return w / w.sum()


def _factor(codes: np.ndarray, scale: float) -> np.ndarray:
    counts = np.bincount(np.where(codes >= 0, codes, 0))
    per_cell = np.where(codes >= 0, counts[np.maximum(codes, 0)], len(codes)).astype(float)
    return 1.0 / np.log1p(per_cell / scale)


def draw_without_repeats(
    rng: np.random.Generator, n: int, size: int, cdf: np.ndarray | None
) -> np.ndarray:
    """``size`` distinct rows of ``range(n)``, drawn with probabilities ``diff(cdf)``.

    Inverse-CDF draws with replacement, then redraws of repeated rows until all are distinct:
    O(size log n) per batch, so sampling stays cheap for atlases of 1e7+ cells. When the redraws
    stall (``size`` close to the number of cells the weights favour: a small dataset, a few rare
    labels weighted up), the rest of the batch is drawn by weighted sampling without replacement
    over the rows not yet drawn (Efraimidis & Spirakis 2006: the ``k`` largest
    ``log(u) / w``), which always succeeds for ``size <= n``.
    """
    if cdf is None:
        return rng.choice(n, size=size, replace=False)
    out = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
    out = np.minimum(out, n - 1)
    best, stalled = size, 0
    for _ in range(1000):
        _, first = np.unique(out, return_index=True)
        dup = np.setdiff1d(np.arange(size), first)
        if dup.size == 0:
            return out
        best, stalled = (dup.size, 0) if dup.size < best else (best, stalled + 1)
        if stalled >= _STALL_ROUNDS:
            break
        new = np.searchsorted(cdf, rng.random(dup.size) * cdf[-1], side="right")
        out[dup] = np.minimum(new, n - 1)
    _, first = np.unique(out, return_index=True)
    dup = np.setdiff1d(np.arange(size), first)
    keep = out[first]  # distinct rows drawn so far; the rest without replacement
    w = np.diff(cdf, prepend=0.0)
    free = np.ones(n, bool)
    free[keep] = False
    cand = np.flatnonzero(free)
    with np.errstate(divide="ignore"):
        key = np.log(rng.random(cand.size)) / np.maximum(w[cand], np.finfo(float).tiny)
    need = size - keep.size
    rest = cand[np.argpartition(-key, need - 1)[:need]] if need < cand.size else cand
    out[dup] = rng.permutation(rest)
    return out


#: redraws of repeated rows without fewer repeats before :func:`draw_without_repeats` draws the
#: rest without replacement
_STALL_ROUNDS = 50


# -------------------------------------------------------------------------------- the stream

def digest(*arrays: Any) -> str:
    """A hex SHA-1 of the arrays' bytes (in order): how a checkpoint records which cells, labels
    or weights a run used (:meth:`CellBatches.settings`, ``train.run_settings``)."""
    import hashlib

    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def check_rows(block: Any, rows: np.ndarray, *, counts: bool) -> None:
    """Raise :class:`ScatlasInputError` if a block of rows (dense or sparse, read from source
    ``rows``) holds NaN or infinite values, or negative values when ``counts``
    (:func:`scatlas._validate.check_matrix`'s checks, with the offending source rows named)."""
    try:
        check_matrix(block, "the input", min_rows=0, min_cols=0, nonnegative=counts)
    except ScatlasInputError as err:
        values = block.data if sp.issparse(block) else np.asarray(block)
        finite = bool(np.isfinite(values).all())
        bad = _negative if finite else _not_finite  # the check that failed
        what = str(err)
        if finite:  # negative values: raw counts and log-normalised values never are
            what = (f"the input contains {int(np.count_nonzero(values < 0))} negative "
                    "value(s): scaled or z-scored data? Raw counts and log-normalised values "
                    "(log1p of normalised counts) are never negative; point layer= (or "
                    "use_raw=True) at one of them")
        raise ScatlasInputError(
            f"{what} (in the rows read for this batch; source rows "
            f"{_first_rows(block, rows, bad)})", param="input"
        ) from None


def _not_finite(values: np.ndarray) -> np.ndarray:
    return ~np.isfinite(values)


def _negative(values: np.ndarray) -> np.ndarray:
    return values < 0


def _first_rows(block: Any, rows: np.ndarray, bad: Callable[[np.ndarray], np.ndarray]) -> list:
    """Up to five source rows of ``block`` with an entry where ``bad(values)`` holds."""
    if sp.issparse(block):
        block = sp.csr_matrix(block)
        hit = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))[bad(block.data)]
    else:
        hit = np.nonzero(bad(np.asarray(block)).any(axis=1))[0]
    return [int(r) for r in rows[np.unique(hit)[:5]]]


class CellBatches:
    """Deterministic, indexable mini-batches of cells (see the module docstring).

    Parameters
    ----------
    X
        (n_cells, n_genes) numpy / scipy.sparse / backed sparse dataset / h5py or zarr array, or
        a :class:`MatrixSource` / :class:`SyntheticSource`.
    labels, studies
        Per-cell labels and study (batch) ids (any hashable values) or None.
    batch_size
        Cells per batch (SCimilarity: 1000). At most the number of cells in ``rows``.
    balance
        See :func:`sampling_weights`.
    transform
        ``"lognorm"`` for raw counts, ``"none"`` for data already normalised, or a callable on a
        row block returning dense float32.
    sparse
        Batches carry the expression as CSR arrays (``x_indptr``, ``x_indices``, ``x_data``,
        :func:`csr_arrays`) instead of a dense ``x``: the input of the sparse training step
        (:mod:`scatlas.models.sparse_ops`).
    rows
        Restrict sampling to these cells (a training split), int array.
    seed
        Batch ``t`` uses ``numpy.random.default_rng([seed, t])``.
    check_input
        Check each block of rows as it is read: NaN or infinite values, and negative values
        when ``nonnegative``, raise :class:`ScatlasInputError`. Callers
        that validated an in-memory matrix up front (``scatlas.tl.train_metric``) pass False;
        backed and lazily read matrices are only ever checked here.
    nonnegative
        Refuse negative values (None: when ``transform="lognorm"``, raw counts;
        ``scatlas.tl.train_metric`` passes True for log-normalised input too).
    """

    def __init__(
        self,
        X: Any,
        *,
        labels: Any = None,
        studies: Any = None,
        batch_size: int = 1000,
        balance: str | None = "label_study",
        transform: str | Transform | None = "lognorm",
        rows: np.ndarray | None = None,
        seed: int = 0,
        sparse: bool = False,
        check_input: bool = True,
        nonnegative: bool | None = None,
    ):
        self.source = as_source(X)
        self.check_input = bool(check_input)
        n = self.source.n_obs
        self.labels, self.label_names = encode(labels, n, "labels")
        self.studies, self.study_names = encode(studies, n, "studies")
        self.rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows.size == 0:
            raise ScatlasInputError("no cells to sample from (empty rows)")
        self.batch_size = check_positive_int(
            batch_size, "batch_size", upper=int(self.rows.size), what="the number of cells"
        )
        self.transform = resolve_transform(transform)
        self.nonnegative = (self.transform is lognorm if nonnegative is None
                            else bool(nonnegative))
        self.sparse = bool(sparse)
        self.seed = int(seed)
        self.balance = balance
        w = sampling_weights(self.labels[self.rows], self.studies[self.rows], balance)
        self._cdf = None if w is None else np.cumsum(w)

    @property
    def n_vars(self) -> int:
        return self.source.n_vars

    def indices(self, t: int) -> np.ndarray:
        """Source rows of batch ``t`` (int64, in sampling order)."""
        rng = np.random.default_rng([self.seed, int(t)])
        pick = draw_without_repeats(rng, self.rows.size, self.batch_size, self._cdf)
        return self.rows[pick]

    def batch(self, t: int) -> Batch:
        """Batch ``t``: ``x`` (B, n_genes) float32, ``label``, ``study`` int32, ``index`` int64."""
        return self.take(self.indices(t))

    def take(self, index: np.ndarray) -> Batch:
        """The batch of the given source rows (in that order)."""
        index = np.asarray(index, dtype=np.int64)
        order = np.argsort(index, kind="stable")
        block = self.source.rows(index[order])
        if self.check_input:
            check_rows(block, index[order], counts=self.nonnegative)
        meta = {"label": self.labels[index], "study": self.studies[index], "index": index}
        if self.sparse:
            if self.transform in _TRANSFORMS.values():
                rows = self.transform(block, dense=False)
            else:
                rows = self.transform(block)
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.size)
            return {**csr_arrays(sp.csr_matrix(rows, dtype=np.float32)[inverse]), **meta}
        x = np.empty((index.size, self.n_vars), dtype=np.float32)
        x[order] = self.transform(block)
        return {"x": x, **meta}

    def density(self, n_rows: int = 256) -> float:
        """Fraction of non-zero entries in (up to) ``n_rows`` evenly spaced sampled cells."""
        pick = np.unique(np.linspace(0, self.rows.size - 1, min(n_rows, self.rows.size))
                         .astype(np.int64))
        block = self.source.rows(np.sort(self.rows[pick]))
        nnz = block.nnz if sp.issparse(block) else np.count_nonzero(block)
        return float(nnz) / max(1, pick.size * self.n_vars)

    def settings(self) -> dict[str, Any]:
        """What shapes the stream (recorded with a checkpoint, so that a run resumes only on the
        same batches): sampling, transform, seed, batch size and a digest of the sampled rows,
        their labels, studies and weights."""
        weights = () if self._cdf is None else (np.asarray(self._cdf, np.float64),)
        transform = next((k for k, f in _TRANSFORMS.items() if f is self.transform),
                         getattr(self.transform, "__qualname__", repr(self.transform)))
        return {"batch_size": self.batch_size, "seed": self.seed, "balance": self.balance,
                "transform": transform,
                "sparse": self.sparse, "n_obs": self.source.n_obs, "n_vars": self.n_vars,
                "cells": digest(self.rows, self.labels, self.studies, *weights)}

    def iterate(
        self,
        start: int = 0,
        *,
        prefetch: int = 2,
        put: Callable[[Batch], Any] | None = None,
        part: tuple[int, int] | None = None,
    ) -> Iterator[Any]:
        """Batches ``start, start+1, ...`` prepared by a background thread.

        ``put`` (e.g. a device transfer) runs in the thread too, so the training step never waits
        on Python work it could overlap with. ``prefetch`` batches are kept ready. ``part=(i, n)``
        yields only the ``i``-th of ``n`` equal slices of each batch (process ``i`` of a
        multi-host job); ``batch_size`` must be divisible by ``n``.
        """
        put = put or identity
        if part is None:
            return Prefetcher(lambda t: put(self.batch(t)), start, prefetch)
        i, n = part
        if self.batch_size % n:
            raise ScatlasInputError(f"batch_size={self.batch_size} does not split over {n} parts")
        m = self.batch_size // n
        return Prefetcher(lambda t: put(self.take(self.indices(t)[i * m : (i + 1) * m])),
                           start, prefetch)

    def sequential(self, rows: Sequence[int] | np.ndarray, batch_size: int) -> Iterator[Batch]:
        """Fixed batches over ``rows`` in order (validation / embedding; last batch smaller)."""
        rows = np.asarray(rows, dtype=np.int64)
        for i in range(0, rows.size, batch_size):
            yield self.take(rows[i : i + batch_size])


class _CsrStore:
    """Row ranges of an on-disk CSR matrix (anndata sparse dataset over zarr or h5py):
    ``indptr`` held in memory (8 bytes per cell), ``data`` / ``indices`` sliced per range, the
    ranges of one read fetched by 4 threads (zarr decompresses them concurrently)."""

    def __init__(self, X: Any):
        group = X.group
        self.shape = tuple(int(s) for s in X.shape)
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self.data, self.indices = group["data"], group["indices"]
        self._threads: Any = None

    def _span(self, span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.indptr[span[0]]), int(self.indptr[span[1]])
        return self.data[a:b], self.indices[a:b]

    def read(self, spans: list[tuple[int, int]]) -> sp.csr_matrix:
        if self._threads is None:
            from concurrent.futures import ThreadPoolExecutor

            self._threads = ThreadPoolExecutor(max_workers=4)
        parts = list(self._threads.map(self._span, spans))
        counts = np.concatenate([np.diff(self.indptr[lo:hi + 1]) for lo, hi in spans])
        indptr = np.concatenate([[0], np.cumsum(counts)])
        return sp.csr_matrix((np.concatenate([d for d, _ in parts]),
                              np.concatenate([i for _, i in parts]), indptr),
                             shape=(counts.size, self.shape[1]))


def _read_spans(source: MatrixSource, spans: list[tuple[int, int]], csr: Any = None) -> Any:
    """Rows of the row ranges ``spans`` (sorted, disjoint) as one CSR / dense block, each range
    read contiguously (through ``csr``, a :class:`_CsrStore`, for an on-disk CSR matrix)."""
    if csr is not None:
        block = csr.read(spans)
    else:
        parts = [source.matrix[lo:hi] for lo, hi in spans]
        block = sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.vstack(parts)
    return block if source.columns is None else block[:, source.columns]


class StoreBatches(CellBatches):
    """Shuffled mini-batches read from a store in large contiguous slabs (block shuffling, as
    annbatch's ``Loader`` and scDataset do): the cells are cut into blocks of ``block_rows``
    consecutive rows; epoch ``e`` permutes the blocks (``default_rng([seed, e])``), takes them
    ``fetch_blocks`` at a time as a pool read block by block (each a contiguous slice: one pass
    over a few compressed chunks), permutes the pool's cells (``default_rng([seed, e, p])``)
    and deals them out in consecutive batches. Every cell (of ``rows``) is seen once per epoch;
    batch ``t`` is still a pure function of ``(seed, t)`` (resumable: a batch recomputes its
    pools), the next pool is read in a background thread while this one's batches are made,
    and the batches are row slices of the permuted pool (no per-batch gather).

    ``X``: as :class:`CellBatches` (a backed sparse dataset of a zarr / h5ad store, a zarr or
    h5py dense array, an in-memory matrix). ``balance`` must be None (uniform sampling); other
    parameters as :class:`CellBatches`. Memory: three pools of ``block_rows x fetch_blocks``
    cells (default 512 x 32 = 16,384, annbatch's ``chunk_size`` and ``preload_nchunks``).
    """

    def __init__(self, X: Any, *, block_rows: int = 512, fetch_blocks: int = 32,
                 **kwargs: Any):
        if kwargs.pop("balance", None) is not None:
            raise ScatlasInputError("StoreBatches samples uniformly; balance must be None",
                                    param="balance")
        super().__init__(X, balance=None, **kwargs)
        if not isinstance(self.source, MatrixSource):
            raise ScatlasInputError("StoreBatches reads a matrix or a store, not a generator",
                                    param="X")
        self.block_rows = check_positive_int(block_rows, "block_rows")
        self.fetch_blocks = check_positive_int(fetch_blocks, "fetch_blocks")
        self._allowed = np.zeros(self.source.n_obs, dtype=bool)
        self._allowed[self.rows] = True
        self._n_blocks = -(-self.source.n_obs // self.block_rows)
        self._per_epoch = max(1, self.rows.size // self.batch_size)
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray, list] | None = None
        self._pools: dict[tuple[int, int], Any] = {}
        self._reader: Any = None
        self._lock = threading.Lock()
        X = self.source.matrix
        self._csr = _CsrStore(X) if getattr(X, "format", None) == "csr" and hasattr(
            X, "group") else None

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, list]:
        """(cell order of epoch e, start of each pool in it, each pool's row ranges)."""
        with self._lock:
            if self._epoch_cache is None or self._epoch_cache[0] != e:
                R, n = self.block_rows, self.source.n_obs
                perm = np.random.default_rng([self.seed, e]).permutation(self._n_blocks)
                order, offsets, spans, at = [], [], [], 0
                for p, lo in enumerate(range(0, self._n_blocks, self.fetch_blocks)):
                    span = [(int(b) * R, min(n, (int(b) + 1) * R))
                            for b in np.sort(perm[lo:lo + self.fetch_blocks])]
                    cells = np.concatenate([np.arange(a, b) for a, b in span])
                    cells = cells[self._allowed[cells]]
                    order.append(cells[np.random.default_rng([self.seed, e, p])
                                       .permutation(cells.size)])
                    offsets.append(at)
                    spans.append(span)
                    at += cells.size
                offsets.append(at)
                self._epoch_cache = (e, np.concatenate(order), np.asarray(offsets), spans)
            return self._epoch_cache[1:]

    def _read_pool(self, e: int, p: int) -> Any:
        """Pool p of epoch e, its cells in their shuffled order."""
        order, offsets, spans = self._epoch(e)
        cells = order[offsets[p]:offsets[p + 1]]
        rows = np.concatenate([np.arange(a, b) for a, b in spans[p]])
        block = _read_spans(self.source, spans[p], self._csr)[np.searchsorted(rows, cells)]
        if self.check_input:
            check_rows(block, cells, counts=self.nonnegative)
        # lognorm is per cell: done once per pool here, in the reader thread, as CSR
        return lognorm(block, dense=False) if self.transform is lognorm else block

    def _pool(self, e: int, p: int, *, ahead: bool = False) -> Any:
        key = (e, p)
        if key not in self._pools:
            if ahead:
                if self._reader is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._reader = ThreadPoolExecutor(max_workers=1)
                self._pools[key] = self._reader.submit(self._read_pool, e, p)
            else:
                self._pools[key] = self._read_pool(e, p)
            while len(self._pools) > 3:
                self._pools.pop(next(iter(self._pools)))
        pool = self._pools[key]
        if not ahead and hasattr(pool, "result"):
            pool = self._pools[key] = pool.result()
        return pool

    def indices(self, t: int) -> np.ndarray:
        e, j = divmod(int(t), self._per_epoch)
        return self._epoch(e)[0][j * self.batch_size:(j + 1) * self.batch_size]

    def batch(self, t: int) -> Batch:
        e, j = divmod(int(t), self._per_epoch)
        order, offsets, _ = self._epoch(e)
        lo, hi = j * self.batch_size, (j + 1) * self.batch_size
        first = int(np.searchsorted(offsets, lo, side="right")) - 1
        last = int(np.searchsorted(offsets, hi - 1, side="right")) - 1
        parts = [self._pool(e, p)[max(lo, offsets[p]) - offsets[p]:min(hi, offsets[p + 1])
                                  - offsets[p]] for p in range(first, last + 1)]
        if last + 1 < len(offsets) - 1:  # read the next pool while this one's batches are made
            self._pool(e, last + 1, ahead=True)
        block = parts[0] if len(parts) == 1 else (
            sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.vstack(parts))
        index = order[lo:hi]
        meta = {"label": self.labels[index], "study": self.studies[index], "index": index}
        transform = densify if self.transform is lognorm else self.transform  # done per pool
        if self.sparse:
            rows = (transform(block, dense=False) if transform in _TRANSFORMS.values()
                    else transform(block))
            return {**csr_arrays(sp.csr_matrix(rows, dtype=np.float32)), **meta}
        return {"x": np.asarray(transform(block), dtype=np.float32), **meta}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "loader": "store", "block_rows": self.block_rows,
                "fetch_blocks": self.fetch_blocks}


def identity(x: Any) -> Any:
    """``x`` unchanged: the default ``put`` of the batch streams (no device transfer)."""
    return x


class Prefetcher:
    """Iterator over ``make(t)`` for t = start, start+1, ... computed ahead in a daemon thread."""

    def __init__(self, make: Callable[[int], Any], start: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, start), daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[int], Any], t: int) -> None:
        while not self._stop.is_set():
            try:
                item = (True, make(t))
            except BaseException as err:  # surfaced in the consumer
                item = (False, err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return
            t += 1

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        ok, value = self._queue.get()
        if not ok:
            self.close()
            raise value
        return value

    def close(self) -> None:
        """Stop the worker and wait for it: a thread still transferring to the device while the
        interpreter shuts down can abort the process."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    def __del__(self) -> None:
        self._stop.set()


# ------------------------------------------------------------------------- batch sizes, devices
# shared by tl.train_metric, tl.train_mvae and the later models (moved from tl/_models, issue 18)

#: the batch :func:`default_batch_size` gives from 2,000 training cells on (SCimilarity's); half
#: the training cells below that (a batch of all the cells would be the same set at every step)
DEFAULT_BATCH_SIZE = 1000

#: validation batches at most (SCimilarity: ``limit_val_batches=10``)
MAX_VALIDATION_BATCHES = 10


def n_devices(data_parallel: bool) -> int:
    """The JAX devices a data-parallel step spreads over: all of them, or 1."""
    import jax

    return jax.device_count() if data_parallel else 1


def default_batch_size(n_train: int) -> int:
    """``min(1000, max(2, n_train // 2))``: the batch used when none is given (300 training
    cells -> 150, 818 -> 409, 2,000 and more -> 1,000)."""
    return int(min(DEFAULT_BATCH_SIZE, max(2, n_train // 2)))


def training_batch_size(batch_size: int | None, n_train: int,
                        data_parallel: bool) -> tuple[int, int]:
    """The step's batch size (None: :func:`default_batch_size`), capped at the training cells
    and a multiple of the devices used; returns ``(batch_size, n_devices)``."""
    import logging

    n_dev = n_devices(data_parallel)
    if batch_size is None:
        batch_size = default_batch_size(n_train)
        batch_size = max(n_dev, batch_size // n_dev * n_dev)
    batch_size = check_positive_int(batch_size, "batch_size")
    if batch_size > n_train:
        batch_size = max(n_dev, n_train // n_dev * n_dev)
        logging.getLogger(__name__).warning(
            "batch size capped at %d (the number of training cells)", batch_size)
    return batch_size, n_dev


def validation_batches(batches: CellBatches, val_rows: np.ndarray, batch_size: int,
                       n_dev: int) -> list[Batch] | None:
    """Fixed validation batches over ``val_rows`` (each split evenly over the devices; the few
    cells that do not fill a last batch are left out, and at most
    :data:`MAX_VALIDATION_BATCHES` batches are kept); None without enough cells."""
    if val_rows.size < n_dev:
        return None
    vb = max(n_dev, min(batch_size, val_rows.size) // n_dev * n_dev)
    usable = val_rows[: min(val_rows.size // vb, MAX_VALIDATION_BATCHES) * vb]
    return list(batches.sequential(usable, vb))
