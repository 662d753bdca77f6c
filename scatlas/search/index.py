"""``CellIndex``: a k-NN index over cell embeddings with stable ids, metadata and filters.

Engines (``engine=``; see :mod:`scatlas.search.engines`):

- ``"exact"``: blocked brute force (GEMM + exact re-ranking), the ground truth; the default
  below 50,000 cells (IVF's lists would be tiny there and brute force is fast enough).
- ``"faiss-ivf"``: faiss ``IndexIVFFlat`` on the CPU (the default on the CPU above 50k cells).
- ``"faiss-ivfpq"``: faiss ``IndexIVFPQ`` (``d/4`` bytes per vector, 8-bit codes), for when the
  full float32 vectors do not fit in memory; lower recall at equal ``nprobe``.
- ``"native-ivf"``: our IVF-Flat on CuPy (GPU) or NumPy (its CPU twin): k-means coarse quantiser,
  inverted lists as one contiguous list-sorted array plus offsets, batched probing; the GPU
  default when faiss has no GPU support.
- ``"faiss-gpu"``: faiss ``GpuIndexIVFFlat`` (needs a faiss build with GPU support); sharded
  over all GPUs (``IndexShards``) when there are several. The GPU default when available.

Sharding (``n_shards=`` of :meth:`CellIndex.build` and :meth:`CellIndex.load`): the native IVF
is split over several devices by :class:`~scatlas.search.engines.ivf_sharded.ShardedNativeIVF`
(one shard per GPU, shared centroids, per-shard top-k merged on (key, id): results equal the
unsharded engine's). ``None`` means one shard per visible GPU when the engine is ``native-ivf``
on the GPU and there are several, else 1; an int forces that many shards (on the CPU they are
NumPy shards, the twin the tests use); with ``engine="auto"`` it makes the IVF choice
``native-ivf`` (the exact engine, below 50,000 cells, stays unsharded). An explicit other engine
rejects an int above 1 (faiss-gpu shards over all GPUs by itself). A sharded index is saved in
the unsharded layout, so it loads on any number of devices.

Defaults (overridable; see ``docs/search.md``):

- ``nlist = 4 * sqrt(N)`` (the faiss guideline "IVF K, K = 4..16 sqrt(N)"), capped so that each
  list has ~39 training points on average;
- ``train_size = min(N, max(50 * nlist, 20_000), 1_000_000)`` training vectors (faiss warns below
  39 and subsamples above 256 per centroid);
- ``nprobe``: :func:`default_nprobe`, measured for recall@10 >= 0.95 on clustered embeddings.

Metrics and reported distances (same conventions as :func:`scatlas.kernels.knn`): ``"cosine"``
(vectors are L2-normalised and searched by inner product; distance ``1 - cos``), ``"ip"``
(``-q.x``), ``"euclidean"`` (true L2 distance). Results are sorted ascending with ties broken by
the smaller id; missing hits are padded with ``(+inf, -1)``.

Size (about 750 lines): one class, :class:`CellIndex`, whose build / add / search / save paths
share the id map, the metadata and the tombstones; the engines, persistence, query batching and
annotation live in their own modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import _progress, backend
from .._validate import ScatlasInputError, check_positive_int
from . import engines as _engines
from ._source import Source, _check_chunk, _check_finite
from .engines import faiss_gpu_available

__all__ = ["CellIndex", "default_nlist", "default_nprobe", "default_train_size"]

METRICS = ("cosine", "ip", "euclidean")
EXACT_BELOW = 50_000
_OOD_SAMPLE = 1000
_OOD_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


def default_nlist(n: int) -> int:
    """``round(4 sqrt(n))``, at least 1 and at most ``n / 39`` (faiss' minimum training points
    per centroid)."""
    return int(max(1, min(round(4.0 * math.sqrt(max(n, 1))), n // 39)))


def default_train_size(n: int, nlist: int) -> int:
    """Training vectors for the coarse quantiser: ``min(n, max(50 nlist, 20000), 1e6)``."""
    return int(min(n, max(50 * nlist, 20_000), 1_000_000))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: ``max(8, ceil(nlist / 128))``, at most ``nlist``.

    Measured on :func:`scatlas.search.synthetic.clustered_embeddings` (300 anisotropic clusters,
    128-d, unit rows, held-out queries) with ``nlist = 4 sqrt(N)``: recall@10 vs exact 0.986 at
    nprobe 8 for 1e5 cells (nlist 1,265); at 1e6 cells (nlist 4,000) 0.975 / 0.998 / 1.000 at
    nprobe 16 / 32 / 64 (bench/results/search_cpu.md), so nlist / 128 (32 there) keeps a margin
    over 0.95 at half the latency of nlist / 64. tests/search/test_search_index.py checks >= 0.95 at
    3e4 cells. Tune it on your own data against exact search on a sample of queries.
    """
    return int(min(nlist, max(8, math.ceil(nlist / 128))))


def _metric_kind(metric: str) -> str:
    if metric not in METRICS:
        raise ScatlasInputError(f"metric must be one of {METRICS}, got {metric!r}")
    return "l2" if metric == "euclidean" else "ip"


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def choose_engine(engine: str, n: int, device: str, nlist: int | None = None) -> str:
    """Resolve ``engine="auto"`` (see the module docstring) and check an explicit choice."""
    if engine != "auto":
        spec = _engines.REGISTRY.get(engine)
        if spec is None:
            raise ScatlasInputError(f"engine must be 'auto' or one of "
                                    f"{tuple(_engines.REGISTRY)}, got {engine!r}",
                                    param="engine")
        if spec.needs_faiss and not _faiss_available():
            raise ScatlasInputError(f"engine={engine!r} needs faiss (pip install faiss-cpu)")
        if engine == "faiss-gpu" and not faiss_gpu_available():
            raise ScatlasInputError("engine='faiss-gpu' needs a faiss build with GPU support "
                                    "and a visible GPU; use engine='native-ivf' on the GPU")
        return engine
    if n < EXACT_BELOW or (nlist is not None and nlist < 16):
        return "exact"
    if device == "gpu":
        return "faiss-gpu" if faiss_gpu_available() else "native-ivf"
    return "faiss-ivf" if _faiss_available() else "native-ivf"


def resolve_shards(n_shards: int | None, engine: str, device: str) -> int:
    """Shards for ``engine`` on ``device``: see "Sharding" in the module docstring."""
    if n_shards is None:
        if engine == "native-ivf" and device == "gpu":
            from .engines.ivf_sharded import gpu_count

            return max(gpu_count(), 1)
        return 1
    n_shards = check_positive_int(n_shards, "n_shards")
    if n_shards > 1 and _engines.REGISTRY[engine].sharded is None:
        raise ScatlasInputError(f"n_shards={n_shards} applies to engine='native-ivf' only, "
                                f"not {engine!r} (faiss-gpu shards over all GPUs by itself)")
    return n_shards


class CellIndex:
    """A searchable collection of cell embeddings; build with :meth:`build`, or :meth:`load`.

    Cell ids are the row numbers at build time and continue for :meth:`add`; removed ids are
    never reused. :attr:`metadata` holds one row per live cell, indexed by id.
    """

    def __init__(self, engine: Any, *, metric: str, device: str, next_id: int = 0,
                 alive: np.ndarray | None = None, metadata: pd.DataFrame | None = None,
                 nprobe: int | None = None, stats: Mapping[str, Any] | None = None):
        self._engine = engine
        self._metric = metric
        self._kind = _metric_kind(metric)
        self._device = device
        self._next_id = int(next_id)
        self._alive = np.zeros(self._next_id, bool) if alive is None else alive
        self._meta = metadata if metadata is not None else _empty_meta(self._next_id)
        self._nprobe = nprobe if nprobe is not None else (
            default_nprobe(engine.nlist) if engine.nlist else None)
        self.stats: dict[str, Any] = dict(stats or {})

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, embeddings: Any, metadata: Any = None, *, metric: str = "cosine",
              engine: str = "auto", nlist: int | None = None, nprobe: int | None = None,
              train_size: int | None = None, chunk_size: int = 100_000,
              device: str | None = None, seed: int = 0, progress: bool | None = None,
              obsm_key: str = "X_scatlas", n_shards: int | None = None,
              list_dtype: str | None = None, rerank: int | None = None) -> CellIndex:
        """Build an index over ``embeddings``.

        Parameters
        ----------
        embeddings
            (n, d) float array (NumPy, a NumPy memmap, CuPy), an AnnData (``.obsm[obsm_key]``,
            metadata defaults to ``.obs``), or an iterable of (n_i, d) chunks (read once; then
            ``metadata`` is an iterable of DataFrames or None).
        metadata
            DataFrame with one row per cell (its index is discarded: ids are row numbers).
        metric, engine, nlist, nprobe, train_size
            See the module docstring; ``None`` means the documented default.
        chunk_size
            Rows per add step (bounds the temporary memory of normalisation and assignment).
        device
            ``"cpu"``, ``"gpu"``, ``"auto"``/None (GPU when present, or when the data are CuPy).
        seed
            Seed of the training sample and of k-means.
        progress
            Progress bar over the added rows (see :mod:`scatlas._progress`).
        n_shards
            Shards of the native IVF (None: one per GPU when there are several; see the module
            docstring, "Sharding").
        list_dtype, rerank
            Storage of the native IVF's lists (``engine="native-ivf"`` only; None: float32):
            ``"float32"``, ``"float16"`` (half the bytes) or ``"int8"`` (scalar-quantised codes,
            a quarter, with ``rerank`` x k shortlisted candidates per query re-ranked on exact
            float16 rows kept in host memory; ``rerank=0``: no re-ranking, scores of the decoded
            codes). See :mod:`scatlas.search.engines.ivf_native` and docs/search.md.
        """
        kind = _metric_kind(metric)
        chunk_size = check_positive_int(chunk_size, "chunk_size")
        src = Source(embeddings, metadata, chunk_size=chunk_size, obsm_key=obsm_key)
        if device is None and src.X is not None and backend.is_gpu_array(src.X):
            device = "gpu"
        dev = backend.resolve_device(device)
        if nlist is not None:
            nlist = check_positive_int(nlist, "nlist")
        # the size decides the engine and the defaults; a stream is read until known or large
        if src.n is None:
            src.sample(max(EXACT_BELOW, train_size or 0), seed)
            n_known = src.buffered
            if not src.exhausted:
                n_known = max(n_known, src.buffered)
        else:
            n_known = src.n
        name = choose_engine(engine, n_known, dev, nlist)
        if engine == "auto" and n_shards is not None and n_shards != 1 and name != "exact":
            name = "native-ivf"  # asking for shards picks the shardable IVF
        if engine == "auto" and (list_dtype is not None or rerank is not None):
            name = "native-ivf"  # asking for a list storage picks the IVF that has it
        shards = 1 if name == "exact" and engine == "auto" else resolve_shards(n_shards, name,
                                                                                dev)
        nlist_used = None
        if _engines.REGISTRY[name].ivf:
            nlist_used = nlist or default_nlist(n_known)
            if nlist_used > n_known:
                raise ScatlasInputError(f"nlist={nlist_used} exceeds the number of cells "
                                        f"({n_known})", param="nlist")
        options = {key: v for key, v in (("list_dtype", list_dtype), ("rerank", rerank))
                   if v is not None}
        if options and name != "native-ivf":
            raise ScatlasInputError(f"{' and '.join(options)} apply to engine='native-ivf' only "
                                    f"(the engine here is {name!r}); pass engine='native-ivf'",
                                    param=next(iter(options)))
        eng = _engines.create_engine(name, src.d, kind, nlist_used, device=dev, seed=seed,
                                     n_shards=shards, **options)
        if src.n is not None:
            eng.reserve(src.n)
        self = cls(eng, metric=metric, device=dev, nprobe=None)
        if nprobe is not None:
            self.nprobe = nprobe
        ts = train_size or default_train_size(n_known, nlist_used or 1)
        ts = check_positive_int(ts, "train_size")
        sample = self._prepare(src.sample(ts if nlist_used else min(ts, _OOD_SAMPLE), seed),
                               "embeddings", row0=None)  # rows checked when added
        if nlist_used:
            if sample.shape[0] < nlist_used:
                raise ScatlasInputError(f"train_size={sample.shape[0]} is below nlist="
                                        f"{nlist_used}; need at least one point per list")
            eng.train(sample)
        self._add_source(src, progress, desc=f"build {name}")
        eng.finish()
        pick = np.random.default_rng(seed).permutation(sample.shape[0])[:_OOD_SAMPLE]
        ood_rows = sample[backend.array_module(sample).asarray(pick)]
        self._update_ood_stats(ood_rows)
        return self

    def _prepare(self, X: Any, name: str, *, row0: int | None = 0) -> Any:
        """float32, finite, unit rows for cosine; on the engine device.

        For the cosine metric a row of zeros (or one whose float32 norm underflows to 0) has no
        direction: it is refused with a :class:`ScatlasInputError` naming its row numbers
        (counted from ``row0``; ``row0=None`` skips the check, for samples whose rows are
        checked again when they are added).
        """
        _check_finite(X, name)
        X = backend.to_device(X, self._device) if self._device == "gpu" else backend.to_host(X)
        xp = backend.array_module(X)
        X = xp.ascontiguousarray(X, dtype=np.float32)
        if self._metric == "cosine":
            norms = xp.sqrt((X * X).sum(axis=1, keepdims=True))
            if row0 is not None:
                _refuse_zero_rows(backend.to_host(norms[:, 0]), name, row0)
            X = X / xp.where(norms > 0, norms, 1.0).astype(np.float32)
        return X

    def _add_source(self, src: Source, progress: bool | None, desc: str) -> np.ndarray:
        start = self._next_id
        metas: list[pd.DataFrame | None] = []
        counts: list[int] = []
        eng = self._engine
        with _progress.bar(desc=desc, total=src.n, progress=progress, unit="cell") as pb:
            def prepared(record: bool):
                nid = start
                for X, meta in src.chunks():
                    Xp = self._prepare(X, "embeddings", row0=nid - start)
                    m = Xp.shape[0]
                    if record:
                        metas.append(meta)
                        counts.append(m)
                        pb.update(m)
                    yield Xp, np.arange(nid, nid + m, dtype=np.int64)
                    nid += m

            eng.bulk_add(prepared, reiterable=src.reiterable)
        n_new = sum(counts)
        self._next_id = start + n_new
        self._alive = np.concatenate([self._alive, np.ones(n_new, bool)])
        self._meta = _append_meta(self._meta, metas, counts, start)
        return np.arange(start, start + n_new, dtype=np.int64)

    def _update_ood_stats(self, sample: Any) -> None:
        """1-NN distances (self excluded) of a sample of indexed cells, as quantiles."""
        if sample.shape[0] < 2 or self.ntotal < 2:
            return
        D, _ = self._search_prepared(sample, 2, None, None)
        nn1 = backend.to_host(D[:, 1])
        nn1 = nn1[np.isfinite(nn1)]
        if nn1.size:
            self.stats["nn1_quantiles"] = {str(q): float(np.quantile(nn1, q))
                                           for q in _OOD_QUANTILES}
            self.stats["nn1_sample"] = int(nn1.size)

    # ------------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return int(self._engine.d)

    @property
    def ntotal(self) -> int:
        """Number of live (not removed) cells."""
        return int(self._alive.sum())

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def engine(self) -> str:
        """The engine's name (one of :data:`scatlas.search.engines.ENGINES`)."""
        return self._engine.name

    @property
    def nlist(self) -> int | None:
        """Inverted lists (None for the exact engine)."""
        return self._engine.nlist

    @property
    def nprobe(self) -> int | None:
        """Lists probed per query by default (None for the exact engine)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self._engine.nlist is None:
            self._nprobe = None
            return
        self._nprobe = check_positive_int(value, "nprobe", upper=self._engine.nlist,
                                          what="nlist")

    @property
    def device(self) -> str:
        return self._device

    @property
    def n_shards(self) -> int:
        """Devices (or NumPy shards) the index is split over; 1 when unsharded."""
        return int(getattr(self._engine, "n_shards", 1))

    @property
    def engine_object(self) -> _engines.Engine:
        """The engine behind the index (an :class:`~scatlas.search.engines.Engine`)."""
        return self._engine

    @property
    def alive(self) -> np.ndarray:
        """(next_id,) bool, True for live ids (removed cells are False); a read-only view."""
        view = self._alive.view()
        view.flags.writeable = False
        return view

    @property
    def all_metadata(self) -> pd.DataFrame:
        """The metadata of every id ever given (removed cells included), indexed by id; see
        :attr:`metadata` for the live cells only."""
        return self._meta

    def bytes_per_cell(self) -> float:
        """Index memory per stored cell in bytes (the engine's; metadata not included)."""
        return float(self._engine.bytes_per_cell())

    @property
    def next_id(self) -> int:
        """The id the next added cell will get."""
        return self._next_id

    @property
    def metadata(self) -> pd.DataFrame:
        """One row per live cell, indexed by id."""
        if self._alive.all():
            return self._meta
        return self._meta[self._alive[self._meta.index.to_numpy()]]

    def ood_distance(self, quantile: float = 0.99) -> float | None:
        """A high quantile of the index's own 1-NN distances (measured on a sample at build,
        each cell's own copy excluded); None when not measured. See :meth:`ood_threshold` for
        the rule :func:`~scatlas.search.annotate` uses, and why held-out cells calibrate it
        better."""
        qs = self.stats.get("nn1_quantiles") or {}
        return qs.get(str(quantile))

    def calibrate_ood(self, embeddings: Any, *, labels: Any = None, label_key: str | None = None,
                      filter: Any = None, nprobe: int | None = None) -> dict[str, Any]:
        """Calibrate the out-of-distribution threshold on held-out cells of known types.

        ``embeddings``: (n, d) embeddings of reference-like cells that are **not** in the index
        and were not used to fit the embedding (e.g. a held-out batch of the atlas, embedded
        by the same model). Their distances to their nearest indexed cell (``min_dist`` of
        :func:`~scatlas.search.annotate`) are what an in-distribution query's look like, so a
        high quantile of them is a threshold with a known false-flag rate: by the split-conformal
        argument (Vovk et al. 2005; Angelopoulos & Bates 2021), a new cell exchangeable with
        these is flagged with probability at most ``1 - q`` at the ``ceil((n + 1) q) / n``
        empirical quantile stored for level ``q``. The index's own 1-NN distances
        (:meth:`ood_distance`) lack that property: the embedding was fitted on the indexed
        cells, so their distances to each other are biased (docs/search.md, "Out-of-distribution
        flag").

        ``labels`` with ``label_key``: (n,) labels of the held-out cells; cells whose label is
        not among the index's ``label_key`` values are dropped (an unseen type would inflate
        the threshold). ``filter`` / ``nprobe``: as in :meth:`search` (use the filter the
        annotation will use). Stores and returns ``stats["ood_calibration"]``: ``n_cells``,
        ``quantiles`` (level -> threshold, for 0.5, 0.9, 0.95, 0.99, 0.999; levels above
        ``n / (n + 1)`` get the largest distance and are listed in
        ``levels_at_largest_distance``: 0.99 needs at least 99 cells), and a description;
        saved with the index.
        """
        X = self._check_queries(embeddings)
        n_in = int(X.shape[0])
        if labels is not None or label_key is not None:
            if labels is None or label_key is None:
                raise ScatlasInputError("give labels and label_key together (labels of the "
                                        "held-out cells, and the index column they match)")
            if label_key not in self._meta.columns:
                raise ScatlasInputError(f"label_key {label_key!r} is not a metadata column "
                                        f"(columns {list(self._meta.columns)})")
            lab = np.asarray(backend.to_host(labels) if not isinstance(labels, pd.Series)
                             else labels.to_numpy(), dtype=object).ravel()
            if lab.shape[0] != n_in:
                raise ScatlasInputError(f"labels has {lab.shape[0]} entries but embeddings "
                                        f"has {n_in} rows")
            known = {str(v) for v in self.metadata[label_key].dropna().unique()}
            keep = np.array([not pd.isna(v) and str(v) in known for v in lab])
            if not keep.any():
                raise ScatlasInputError(f"none of the held-out cells' labels occur in the "
                                        f"index's {label_key!r} column")
            X = X[keep] if not backend.is_gpu_array(X) else X[backend.to_device(keep, "gpu")]
        D, _ = self.search(X, 1, filter=filter, nprobe=nprobe)
        d = np.asarray(backend.to_host(D[:, 0]), dtype=np.float64)
        d = np.sort(d[np.isfinite(d)])
        n = int(d.size)
        if n < 2:
            raise ScatlasInputError(f"calibrate_ood needs at least 2 held-out cells with a "
                                    f"neighbour in the index, got {n}")
        quantiles = {str(q): float(d[min(n, math.ceil((n + 1) * q)) - 1])
                     for q in _OOD_QUANTILES}
        capped = [q for q in _OOD_QUANTILES if math.ceil((n + 1) * q) > n]
        record = {"n_cells": n, "n_given": n_in, "label_key": label_key,
                  "quantiles": quantiles, "index_ntotal": self.ntotal,
                  # levels whose conformal rank exceeds n: the largest distance, no guarantee
                  "levels_at_largest_distance": [str(q) for q in capped],
                  "rule": "conformal: the ceil((n+1) q)-th smallest min_dist of n held-out "
                          "cells (capped at the largest)"}
        self.stats["ood_calibration"] = record
        return record

    def ood_threshold(self, quantile: float | None = None) -> tuple[float | None, str, str]:
        """The ``min_dist`` threshold :func:`~scatlas.search.annotate` applies by default.

        Returns ``(threshold or None, source, description)``; ``source`` is ``"calibration"``
        (held-out cells, :meth:`calibrate_ood`; level ``quantile``, default 0.99) when the index
        was calibrated, else ``"index"`` (the index's own 1-NN distances, :meth:`ood_distance`;
        default 0.99), or ``"none"`` when neither was measured (fewer than 2 cells).
        """
        q = 0.99 if quantile is None else float(quantile)
        if str(q) not in {str(v) for v in _OOD_QUANTILES}:
            raise ScatlasInputError(f"ood_quantile must be one of {list(_OOD_QUANTILES)} (the "
                                    f"levels stored at build / calibration), got {quantile!r}")
        cal = self.stats.get("ood_calibration")
        if cal:
            thr = cal["quantiles"][str(q)]
            note = (" (too few for this level: their largest distance)"
                    if str(q) in cal.get("levels_at_largest_distance", []) else "")
            return (float(thr), "calibration",
                    f"min_dist > {thr:.6g}: the {q} quantile of the min_dist of "
                    f"{cal['n_cells']} held-out calibration cells{note}")
        thr = self.ood_distance(q)
        if thr is None:
            return None, "none", "no out-of-distribution statistics (fewer than 2 cells)"
        n = self.stats.get("nn1_sample", "?")
        return (float(thr), "index",
                f"min_dist > {thr:.6g}: the {q} quantile of the 1-NN distances of {n} indexed "
                f"cells (self excluded; uncalibrated, see calibrate_ood)")

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        extra = f", nlist={self.nlist}, nprobe={self.nprobe}" if self.nlist else ""
        return (f"CellIndex(engine={self.engine!r}, metric={self.metric!r}, dim={self.dim}, "
                f"ntotal={self.ntotal}{extra}, device={self.device!r})")

    # ------------------------------------------------------------------------------------------
    # queries
    # ------------------------------------------------------------------------------------------
    def _check_queries(self, queries: Any) -> Any:
        if queries is None:
            raise ScatlasInputError("queries is None; expected an (m, d) array")
        if not hasattr(queries, "shape"):
            try:
                queries = np.asarray(queries, dtype=np.float32)
            except (TypeError, ValueError) as err:
                raise ScatlasInputError(f"queries must be numeric: {err}") from err
        if len(queries.shape) == 1:
            raise ScatlasInputError(
                f"queries must be 2-D (m, {self.dim}), got a 1-D array of shape "
                f"{tuple(queries.shape)}; use queries[None] for one query")
        queries = _check_chunk(queries, "queries", self.dim)
        if queries.shape[0] < 1:
            raise ScatlasInputError("queries has no rows")
        return queries

    def _nprobe_for(self, nprobe: int | None) -> int | None:
        if self._engine.nlist is None:
            return None
        if nprobe is None:
            return self._nprobe
        return check_positive_int(nprobe, "nprobe", upper=self._engine.nlist, what="nlist")

    def _to_distance(self, keys: Any) -> Any:
        xp = backend.array_module(keys)
        if self._metric == "cosine":
            D = xp.add(keys, np.float32(1.0), dtype=np.float32)
            xp.clip(D, 0.0, 2.0, out=D)
            D[~xp.isfinite(keys)] = xp.inf
            return D
        if self._metric == "euclidean":
            return xp.sqrt(xp.maximum(keys, 0.0)).astype(np.float32)
        return keys.astype(np.float32)

    def _to_key(self, radius: float) -> float:
        if self._metric == "cosine":
            return float(radius) - 1.0
        if self._metric == "euclidean":
            return float(radius) ** 2 if radius >= 0 else -1.0
        return float(radius)

    def _search_prepared(self, Q: Any, k: int, nprobe: int | None, allowed: Any,
                         batch_size: int | None = None) -> tuple[Any, Any]:
        m = Q.shape[0]
        step = batch_size or m
        nprobe = self._nprobe_for(nprobe)
        parts = [self._engine.search(Q[s : s + step], k, nprobe, allowed)
                 for s in range(0, m, step)]
        xp = backend.array_module(parts[0][0])
        keys = parts[0][0] if len(parts) == 1 else xp.concatenate([p[0] for p in parts])
        ids = parts[0][1] if len(parts) == 1 else xp.concatenate([p[1] for p in parts])
        return self._to_distance(keys), ids

    def search(self, queries: Any, k: int = 10, *, nprobe: int | None = None,
               filter: Any = None, batch_size: int | None = None) -> tuple[Any, Any]:
        """The k nearest cells of every query row.

        Returns ``(distances, ids)``, float32 and int64 arrays of shape (m, k), sorted ascending
        (ties by smaller id), padded with (+inf, -1); CuPy arrays when ``queries`` is CuPy.
        ``filter``: None, a boolean mask over ids (length :attr:`next_id`), an integer array of
        allowed ids, a pandas query string on :attr:`metadata`, or a dict ``{column: value or
        list}`` of values to keep, with ``{"exclude": {column: values}}`` to drop.
        """
        queries = self._check_queries(queries)
        if type(k) is not int or k < 1:  # a plain positive int passes without the full check
            k = check_positive_int(k, "k")
        if batch_size is not None:
            batch_size = check_positive_int(batch_size, "batch_size")
        caller_gpu = backend.is_gpu_array(queries)
        Q = self._prepare(queries, "queries")
        allowed = self.filter_mask(filter)
        D, ids = self._search_prepared(Q, k, nprobe, allowed, batch_size)
        return _to_caller(D, caller_gpu), _to_caller(ids, caller_gpu)

    def range_search(self, queries: Any, radius: float, *, nprobe: int | None = None,
                     filter: Any = None) -> list[tuple[Any, Any]]:
        """All cells within ``radius`` (distance <= radius, same units as :meth:`search`) of each
        query: a list of ``(distances, ids)`` per query, sorted ascending (IVF engines search
        the ``nprobe`` nearest lists only)."""
        queries = self._check_queries(queries)
        if not np.isfinite(radius):
            raise ScatlasInputError(f"radius must be finite, got {radius}")
        caller_gpu = backend.is_gpu_array(queries)
        Q = self._prepare(queries, "queries")
        allowed = self.filter_mask(filter)
        res = self._engine.range_search(Q, self._to_key(radius), self._nprobe_for(nprobe),
                                        allowed)
        return [(_to_caller(self._to_distance(kk), caller_gpu), _to_caller(ii, caller_gpu))
                for kk, ii in res]

    def filter_mask(self, filter: Any) -> np.ndarray | None:
        """The boolean mask over ids (length :attr:`next_id`) that ``filter`` allows (live cells
        only), or None for no filter. See :meth:`search` for the accepted forms."""
        if filter is None:
            return None
        n = self._next_id
        if isinstance(filter, str):
            try:
                kept = self.metadata.query(filter).index.to_numpy()
            except Exception as err:
                raise ScatlasInputError(f"filter query {filter!r} failed on the metadata "
                                        f"(columns {list(self._meta.columns)}): {err}") from err
            mask = np.zeros(n, bool)
            mask[kept.astype(np.int64)] = True
        elif isinstance(filter, Mapping):
            mask = self._dict_mask(filter)
        else:
            arr = backend.to_host(filter)
            arr = np.asarray(arr)
            if arr.dtype == bool:
                if arr.shape != (n,):
                    raise ScatlasInputError(f"a boolean filter must have one entry per id "
                                            f"(length {n}), got shape {arr.shape}")
                mask = arr.copy()
            elif arr.dtype.kind in "iu":
                mask = np.zeros(n, bool)
                ok = (arr >= 0) & (arr < n)
                mask[arr[ok]] = True
            else:
                raise ScatlasInputError(
                    "filter must be None, a boolean mask over ids, an array of ids, a pandas "
                    f"query string or a dict of column values; got {type(filter).__name__}")
        return mask & self._alive

    def _dict_mask(self, spec: Mapping[str, Any]) -> np.ndarray:
        meta = self._meta
        keep = np.ones(len(meta), bool)

        def column(col: str) -> pd.Series:
            if col not in meta.columns:
                raise ScatlasInputError(f"filter column {col!r} is not in the metadata "
                                        f"(columns {list(meta.columns)})")
            return meta[col]

        def values(v: Any) -> list[Any]:
            return list(v) if isinstance(v, list | tuple | set | np.ndarray | pd.Index) else [v]

        for col, v in spec.items():
            if col == "exclude":
                if not isinstance(v, Mapping):
                    raise ScatlasInputError("filter['exclude'] must be a dict {column: values}")
                for ecol, ev in v.items():
                    keep &= ~column(ecol).isin(values(ev)).to_numpy()
            else:
                keep &= column(col).isin(values(v)).to_numpy()
        mask = np.zeros(self._next_id, bool)
        mask[meta.index.to_numpy()[keep]] = True
        return mask

    # ------------------------------------------------------------------------------------------
    # updates
    # ------------------------------------------------------------------------------------------
    def add(self, embeddings: Any, metadata: Any = None, *, progress: bool | None = None,
            obsm_key: str = "X_scatlas") -> np.ndarray:
        """Add cells; returns their new ids (int64, consecutive from :attr:`next_id`)."""
        src = Source(embeddings, metadata, chunk_size=100_000, obsm_key=obsm_key, d=self.dim)
        return self._add_source(src, progress, desc="add")

    def remove(self, ids: Any) -> int:
        """Remove cells by id; returns how many live cells were removed (unknown or already
        removed ids are ignored). Removed ids are never returned again nor reused."""
        arr = np.unique(np.asarray(backend.to_host(ids), dtype=np.int64).ravel())
        arr = arr[(arr >= 0) & (arr < self._next_id)]
        arr = arr[self._alive[arr]]
        if arr.size == 0:
            return 0
        self._engine.remove(arr)
        self._alive[arr] = False
        return int(arr.size)

    # ------------------------------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the index to ``directory`` atomically (see :mod:`scatlas.search.persist`)."""
        from .persist import save_index

        return save_index(self, directory)

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None, *,
             verify: bool = True, n_shards: int | None = None) -> CellIndex:
        """Load an index saved by :meth:`save` (checksums verified unless ``verify=False``);
        onto the GPU when ``device`` resolves to it (native IVF, faiss GPU, exact). A native IVF
        is re-sharded over ``n_shards`` devices (None: every GPU when there are several; see
        the module docstring, "Sharding"), whatever the shard count it was saved from."""
        from .persist import load_index

        dev = backend.resolve_device(device)
        saved = _saved_engine(directory)
        shards = resolve_shards(n_shards, saved, dev) if saved is not None else 1
        if shards <= 1:
            return load_index(directory, device=device, verify=verify)
        idx = load_index(directory, device="cpu", verify=verify)  # host first, then shard
        idx._engine = _engines.shard_engine(idx._engine, shards, dev)
        idx._device = dev
        return idx


def _saved_engine(directory: str | Path) -> str | None:
    """The engine named by a saved index's manifest (None when unreadable: loading reports it)."""
    from .persist import _backup_of, read_manifest

    folder = Path(directory)
    if not folder.exists():
        folder = _backup_of(folder) or folder
    try:
        return read_manifest(folder)["engine"]
    except (ScatlasInputError, OSError):
        return None


def _refuse_zero_rows(norms: np.ndarray, name: str, row0: int) -> None:
    """Raise naming the rows of zero norm (cosine: a zero vector has no direction)."""
    zero = np.flatnonzero(~(norms > 0))
    if zero.size:
        rows = ", ".join(str(int(r) + row0) for r in zero[:10])
        more = f" and {zero.size - 10} more" if zero.size > 10 else ""
        raise ScatlasInputError(
            f"{name} row(s) {rows}{more} are all zeros (norm 0): a zero vector has no direction, "
            f"so it has no cosine distance to any cell; drop those rows, or use "
            f"metric='euclidean' for an index where zero vectors are meaningful")


def _empty_meta(n: int) -> pd.DataFrame:
    return pd.DataFrame(index=pd.RangeIndex(n, name="id"))


def _append_meta(old: pd.DataFrame, metas: list[pd.DataFrame | None], counts: list[int],
                 start: int) -> pd.DataFrame:
    frames = []
    pos = start
    for meta, m in zip(metas, counts, strict=True):
        idx = pd.RangeIndex(pos, pos + m, name="id")
        frames.append(_empty_meta(0).reindex(idx) if meta is None else
                      meta.reset_index(drop=True).set_axis(idx, axis=0))
        pos += m
    if not frames:
        return old
    parts = [old, *frames] if len(old) or len(old.columns) else frames
    out = pd.concat(parts, axis=0)
    out.index = pd.Index(out.index.to_numpy(np.int64), name="id")
    return out


def _to_caller(x: Any, gpu: bool) -> Any:
    return backend.to_device(x, "gpu") if gpu else backend.to_host(x)

