"""HTTP search service over a :class:`~scatlas.search.CellIndex` (Starlette app, served by uvicorn).

``create_app(index, model=None, ...)`` returns an ASGI app with JSON endpoints:

* ``POST /search``: ``{"embeddings": [[...], ...], "k": 10, "nprobe": null, "filter": {...},
  "include_metadata": true, "metadata_columns": null}`` -> ``{"k", "distances", "ids",
  "metadata"}``. ``distances`` / ``ids`` are ``(m, k)`` lists exactly as ``index.search(queries,
  k, nprobe=..., filter=...)`` returns them; padding (fewer than ``k`` hits, e.g. under a filter)
  has id ``-1`` and distance ``null``; ``metadata[i][j]`` is the metadata row of ``ids[i][j]``.
* ``POST /search/expression``: ``{"genes": [...], "counts": [[...]]}`` (cells x genes: raw
  counts, or log-normalised values for a model trained on them; ``GET /health``'s
  ``model_input`` says which) or ``{"genes": [...], "sparse": {"shape": [n, g], "row": [...],
  "col": [...], "data": [...]}}`` (COO triplets; ``indptr`` / ``indices`` / ``data`` CSR is
  accepted too), plus the ``/search`` options; the cells are embedded with the loaded model
  (``model.embed``), then searched. ``"return_embeddings": true`` adds the embeddings. 404
  when there is no model.
* ``POST /annotate``: ``{"embeddings": ...}`` or the expression fields, ``"label_key"``,
  ``"k": 50``, ``"weighting"``, ``"ood_distance"`` -> ``{"label_key", "k", "predictions":
  [{"label", "confidence", "vs_second", "min_dist", "is_ood", "hits"}, ...]}``
  (:func:`scatlas.search.annotate`).
* ``GET /health``: ``{"status": "ok", "ntotal", "dim", "metric", "engine", "nprobe",
  "model_loaded", "model_input", ...}``.
* ``GET /metrics``: request and error counts per endpoint, latency quantiles (last 10,000
  requests per endpoint), batch-size histograms, queue depth; ``?format=prometheus`` gives the
  Prometheus text format.

Micro-batching (:mod:`scatlas.search._batcher`): concurrent ``/search`` and
``/search/expression`` requests with the same ``(k, nprobe, filter)`` are answered by one
``index.search`` call in a worker thread. ``/annotate`` calls :func:`~scatlas.search.annotate`
on the same worker thread without batching (its requests are usually many cells at once).
Embedding runs on a second worker thread, so it overlaps with searches.

Input kind: expression values are read as the loaded model was trained (``model.input_kind``:
raw counts, or log-normalised values for a model trained with ``input="lognorm"``); a request's
optional ``"input"`` field must agree with it (it cannot be chosen per request). Values of
another kind (negative: scaled or z-scored data; non-integer for a counts model; raw counts for a
lognorm model) get a 400 saying what was found and what to send.

Validation: every bad request gets a 4xx JSON ``{"error": "..."}`` naming the problem: a
``Content-Type`` other than JSON (415; ``application/json``, with or without a charset, and
``application/*+json`` are accepted, and a request without the header is read as JSON), malformed
JSON (NaN / Infinity literals are rejected), a body over ``max_body_bytes`` (413), a missing,
empty, ragged, non-numeric or non-finite matrix, the wrong dimension, more than
``max_queries_per_request`` rows, ``k`` outside ``[1, max_k]``, more than ``max_hits`` queries x
k, an unknown filter or label column.
Filters are ``{column: value or [values]}`` (keep) with ``{"exclude": {column: [values]}}``
(drop); pandas query strings are not accepted over HTTP. Unexpected errors give 500 and are
logged; the service keeps running.

Shutdown: the app's lifespan drains the batcher (every request already submitted is answered);
uvicorn stops accepting connections on SIGTERM / SIGINT and waits for running requests first.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import functools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .._validate import ScatlasInputError
from ._batcher import BatcherClosedError, MicroBatcher
from ._metrics import Metrics
from ._requests import (
    INPUT_KINDS,
    MIN_GENE_OVERLAP,
    _bad,
    _get_bool,
    _get_int,
    _HTTPError,
    _read_json,
    parse_expression,
    parse_filter,
    parse_matrix,
)

__all__ = ["ServiceConfig", "create_app"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 2**20
class ServiceConfig:
    """Limits of one service instance (see :func:`create_app`)."""

    def __init__(
        self,
        *,
        max_batch: int = 256,
        max_wait_ms: float = 2.0,
        max_queries_per_request: int = 4096,
        max_k: int = 1000,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_hits: int = 1_000_000,
        default_k: int = 10,
        default_label_key: str | None = None,
    ) -> None:
        for name, value in (("max_batch", max_batch),
                            ("max_queries_per_request", max_queries_per_request),
                            ("max_k", max_k), ("max_body_bytes", max_body_bytes),
                            ("max_hits", max_hits),
                            ("default_k", default_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ScatlasInputError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(max_wait_ms, int | float) and max_wait_ms >= 0):
            raise ScatlasInputError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        self.max_batch = max_batch
        self.max_wait_ms = float(max_wait_ms)
        self.max_queries_per_request = max_queries_per_request
        self.max_k = max_k
        self.max_body_bytes = max_body_bytes
        self.max_hits = max_hits
        self.default_k = min(default_k, max_k)
        self.default_label_key = default_label_key

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


# ------------------------------------------------------------------------------------------------
# Response building
# ------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON types: NaN / inf / NA -> null, numpy scalars -> Python, timestamps -> ISO."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, _dt.datetime | _dt.date | pd.Timestamp):
        return value.isoformat()
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def _distances_json(values: np.ndarray, ids: np.ndarray) -> list[list[Any]]:
    """float32 ``(m, k)`` -> nested lists (exact float32 values); padding (id -1) and
    non-finite values -> null."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values) & (ids >= 0)
    if ok.all():
        return values.tolist()
    return [[v if good else None for v, good in zip(row, okrow, strict=True)]
            for row, okrow in zip(values.tolist(), ok.tolist(), strict=True)]


class MetadataTable:
    """The index metadata as JSON-ready Python values, column by column, for fast row lookups.

    Built once at startup: every column becomes an object array of plain JSON values (NaN / NA
    -> None, categories -> their values, numpy scalars -> Python, timestamps -> ISO text), so a
    response's metadata rows are only fancy indexing and dict building.
    """

    def __init__(self, metadata: pd.DataFrame | None) -> None:
        self.columns: list[str] = []
        self.values: dict[str, np.ndarray] = {}
        self.positions: pd.Index | None = None
        if metadata is None or metadata.shape[1] == 0:
            return
        self.columns = [str(c) for c in metadata.columns]
        index = metadata.index
        # ids that are row positions (the usual case) need no hash lookup per request
        is_range = ((isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1)
                    or (index.dtype.kind in "iu" and index.is_monotonic_increasing
                        and (len(index) == 0 or (index[0] == 0 and index[-1] == len(index) - 1))
                        and index.is_unique))
        self.positions = None if is_range else index
        for name, col in zip(self.columns, metadata.columns, strict=True):
            self.values[name] = _column_values(metadata[col])

    def rows(self, ids: np.ndarray, columns: Sequence[str] | None) -> list[list[Any]]:
        """Metadata dict of every hit in ``ids`` (``(m, k)``; -1 and unknown ids -> None)."""
        flat = ids.ravel()
        if self.positions is None:
            n = len(next(iter(self.values.values())))
            pos = np.where((flat >= 0) & (flat < n), flat, -1)
        else:
            pos = self.positions.get_indexer(flat)
            pos[flat < 0] = -1
        valid = pos >= 0
        cols = self.columns if columns is None else list(columns)
        taken = [self.values[c][pos[valid]].tolist() for c in cols]
        records = [dict(zip(cols, vals, strict=True)) for vals in zip(*taken, strict=True)]
        out: list[Any] = [None] * flat.size
        for i, rec in zip(np.flatnonzero(valid).tolist(), records, strict=True):
            out[i] = rec
        k = ids.shape[1]
        return [out[i * k:(i + 1) * k] for i in range(ids.shape[0])]


def _column_values(col: pd.Series) -> np.ndarray:
    """One metadata column as an object array of JSON values."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = np.array([_jsonable(c) for c in col.cat.categories] + [None], dtype=object)
        codes = col.cat.codes.to_numpy()
        return cats[np.where(codes < 0, len(cats) - 1, codes)]
    arr = col.to_numpy()
    if arr.dtype.kind in "biu":
        out = np.empty(len(arr), dtype=object)
        out[:] = arr.tolist()
        return out
    if arr.dtype.kind == "f":
        out = np.empty(len(arr), dtype=object)
        out[:] = arr.tolist()
        out[~np.isfinite(arr)] = None
        return out
    items = list(col) if arr.dtype.kind in "Mm" else arr.tolist()  # Timestamps, not ints
    out = np.empty(len(arr), dtype=object)
    out[:] = [_jsonable(v) for v in items]
    return out


# ------------------------------------------------------------------------------------------------
# The service
# ------------------------------------------------------------------------------------------------


class SearchService:
    """Index, optional model, micro-batcher and metrics behind the HTTP endpoints."""

    def __init__(self, index: Any, model: Any, config: ServiceConfig) -> None:
        self.index = index
        self.model = model
        self.config = config
        self.dim = int(index.dim)
        self.ntotal = int(index.ntotal)
        self.table = MetadataTable(getattr(index, "metadata", None))
        self.columns: list[str] = self.table.columns
        if model is not None:
            latent = int(getattr(model, "latent_dim", self.dim))
            if latent != self.dim:
                raise ScatlasInputError(
                    f"the model embeds into {latent} dimensions but the index holds "
                    f"{self.dim}-dimensional vectors; build the index from this model's embeddings"
                )
        self.batcher = MicroBatcher(self._search, max_batch=config.max_batch,
                                    max_wait_ms=config.max_wait_ms)
        self._embed_executor: ThreadPoolExecutor | None = None
        self.metrics = Metrics()
        self.started = time.time()

    # -- lifecycle ----------------------------------------------------------------------------

    async def startup(self) -> None:
        await self.batcher.start()
        log.info("scatlas search service: %d vectors of dimension %d (%s), model: %s",
                 self.ntotal, self.dim, getattr(self.index, "engine", "?"),
                 "yes" if self.model is not None else "no")

    async def shutdown(self) -> None:
        """Answer every pending search, then release the worker threads."""
        await self.batcher.close()
        self.batcher.shutdown_executor()
        executor, self._embed_executor = self._embed_executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        log.info("scatlas search service stopped after %d requests",
                 sum(self.metrics.requests.values()))

    # -- index and model calls ---------------------------------------------------------------

    def _search(self, queries: np.ndarray, *, k: int, nprobe: int | None,
                filter: Any) -> tuple[np.ndarray, np.ndarray]:  # noqa: A002 - the index's name
        kwargs: dict[str, Any] = {}
        if nprobe is not None:
            kwargs["nprobe"] = nprobe
        if filter is not None:
            kwargs["filter"] = filter
        return self.index.search(queries, k=k, **kwargs)

    @property
    def input_kind(self) -> str:
        """The loaded model's input kind (``"counts"`` for models that do not record one)."""
        return str(getattr(self.model, "input_kind", "counts"))

    def expression_from(self, body: dict[str, Any]):
        """The request's expression data as an AnnData, read as the model's input kind; its
        optional ``"input"`` field must name that kind (it cannot be chosen per request)."""
        kind = self.input_kind
        if "input" in body and body["input"] != kind:
            raise _bad(f"'input': {body['input']!r} cannot be chosen per request: this "
                       f"service's model was trained on {INPUT_KINDS.get(kind, kind)} and reads "
                       f"the 'counts' / 'sparse' values as such; send those (and 'input': "
                       f"{kind!r} or no 'input')")
        return parse_expression(body, max_rows=self.config.max_queries_per_request, kind=kind)

    def _check_genes(self, adata) -> None:
        """400 unless the request names at least :data:`MIN_GENE_OVERLAP` of the model's genes
        (``model.embed`` would refuse it in its own terms)."""
        genes = getattr(self.model, "genes", None)
        if genes is None or not len(genes):
            return
        n = len(genes)
        found = int(pd.Index(genes).isin(adata.var_names).sum())
        if found < MIN_GENE_OVERLAP * n:
            raise _bad(f"'genes' names {found} of the model's {n} genes ({found / n:.1%}); at "
                       f"least {MIN_GENE_OVERLAP:.0%} are needed: send the cells' values for "
                       f"the model's genes, named as the model names them (e.g. "
                       f"{list(map(str, genes[:3]))})")

    async def embed(self, adata) -> np.ndarray:
        if self.model is None:
            raise _HTTPError(404, "no model is loaded: start the service with a model "
                                  "(scatlas serve --model DIR) to send expression data")
        from ..models.inputs import InputKindError

        self._check_genes(adata)
        if self._embed_executor is None:
            self._embed_executor = ThreadPoolExecutor(max_workers=1,
                                                      thread_name_prefix="scatlas-embed")
        loop = asyncio.get_running_loop()
        try:
            emb = await loop.run_in_executor(self._embed_executor, self.model.embed, adata)
        except InputKindError as err:  # its advice names Python arguments: say it for HTTP
            kind = err.kind
            raise _bad(f"the expression values ('counts' / 'sparse' data) hold {err.found}"
                       f"{err.looks}; this service's model reads "
                       f"{INPUT_KINDS.get(kind, kind)}: send those") from None
        emb = np.asarray(emb, dtype=np.float32)
        if emb.shape != (adata.n_obs, self.dim):
            raise RuntimeError(f"model.embed returned shape {emb.shape}, expected "
                               f"{(adata.n_obs, self.dim)}")
        return emb

    # -- request pieces ------------------------------------------------------------------------

    def queries_from(self, body: dict[str, Any]) -> np.ndarray:
        return parse_matrix(body.get("embeddings"), "embeddings", n_cols=self.dim,
                            max_rows=self.config.max_queries_per_request)

    def search_options(self, body: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        k = _get_int(body, "k", cfg.default_k, 1, cfg.max_k)
        nprobe = _get_int(body, "nprobe", None, 1, 1 << 20)
        filt, filter_key = parse_filter(body.get("filter"), self.columns)
        include = _get_bool(body, "include_metadata", True)
        columns = body.get("metadata_columns")
        if columns is not None:
            if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
                raise _bad("metadata_columns must be a list of column names")
            unknown = [c for c in columns if c not in self.columns]
            if unknown:
                raise _bad(f"unknown metadata column(s) {unknown} (available: "
                           f"{self.columns[:20]})")
        return {"k": k, "nprobe": nprobe, "filter": filt, "filter_key": filter_key,
                "include_metadata": include, "metadata_columns": columns}

    def check_hits(self, m: int, k: int) -> None:
        """Refuse answers larger than ``max_hits`` (queries x k) before any work is done."""
        if m * k > self.config.max_hits:
            raise _bad(f"{m} queries x k={k} = {m * k} hits exceeds the limit of "
                       f"{self.config.max_hits} per request; send fewer queries or a smaller k")

    async def search(self, queries: np.ndarray, opts: dict[str, Any]) -> dict[str, Any]:
        k, nprobe, filt = opts["k"], opts["nprobe"], opts["filter"]
        self.check_hits(queries.shape[0], k)
        distances, ids = await self.batcher.submit(
            queries, key=(k, nprobe, opts["filter_key"]), k=k, nprobe=nprobe, filter=filt)
        ids = np.asarray(ids, dtype=np.int64)
        out: dict[str, Any] = {"k": k, "distances": _distances_json(distances, ids),
                               "ids": ids.tolist()}
        if opts["include_metadata"] and self.columns:
            out["metadata"] = self.table.rows(ids, opts["metadata_columns"])
        return out

    async def annotate(self, queries: np.ndarray, body: dict[str, Any]) -> dict[str, Any]:
        from . import annotate as annotate_fn

        label_key = body.get("label_key", self.config.default_label_key)
        if not isinstance(label_key, str) or not label_key:
            raise _bad("label_key (the metadata column holding the labels) is required")
        if label_key not in self.columns:
            raise _bad(f"unknown label_key {label_key!r} (metadata columns: {self.columns[:20]})")
        k = _get_int(body, "k", 50, 1, self.config.max_k)
        self.check_hits(queries.shape[0], k)
        kwargs: dict[str, Any] = {"k": k, "label_key": label_key}
        if "weighting" in body:
            weighting = body["weighting"]
            if not isinstance(weighting, str):
                raise _bad(f"weighting must be a string, got {weighting!r}")
            kwargs["weighting"] = weighting
        ood = body.get("ood_distance")
        if ood is not None:  # any finite number: "ip" distances (-q.x) are negative
            if isinstance(ood, bool) or not isinstance(ood, int | float) or not np.isfinite(ood):
                raise _bad(f"ood_distance must be a finite number, got {ood!r}")
            kwargs["ood_distance"] = float(ood)
        result = await self.batcher.run(annotate_fn, self.index, queries, **kwargs)
        rule = {key: _jsonable(getattr(result, "attrs", {}).get(key))
                for key in ("ood_distance", "ood_source", "ood_quantile", "ood_rule")}
        table = pd.DataFrame(result)
        predictions = [{str(c): _jsonable(v) for c, v in rec.items()}
                       for rec in table.to_dict("records")]
        return {"label_key": label_key, "k": k, "ood": rule, "predictions": predictions}

    def health(self) -> dict[str, Any]:
        idx = self.index
        model = self.model
        return {
            "status": "shutting down" if self.batcher.closing else "ok",
            "ntotal": self.ntotal,
            "dim": self.dim,
            "metric": getattr(idx, "metric", None),
            "engine": getattr(idx, "engine", None),
            "nprobe": _jsonable(getattr(idx, "nprobe", None)),
            "metadata_columns": self.columns,
            "model_loaded": model is not None,
            "model_genes": None if model is None else len(model.genes),
            "model_latent_dim": None if model is None else int(model.latent_dim),
            "model_input": None if model is None else self.input_kind,
            "uptime_s": round(time.time() - self.started, 3),
            "limits": self.config.as_dict(),
        }


Handler = Callable[[Request, SearchService], Awaitable[Response | dict[str, Any]]]


def _endpoint(name: str, service: SearchService, handler: Handler) -> Callable[[Request], Any]:
    """Wrap a handler: JSON errors, metrics, never an unhandled exception."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        t0 = time.perf_counter()
        status = 500
        try:
            result = await handler(request, service)
            response = result if isinstance(result, Response) else JSONResponse(result)
            status = response.status_code
            return response
        except _HTTPError as err:
            status = err.status
            return JSONResponse({"error": err.message}, status_code=status)
        except ScatlasInputError as err:
            status = 400
            return JSONResponse({"error": str(err)}, status_code=status)
        except BatcherClosedError as err:
            status = 503
            return JSONResponse({"error": str(err)}, status_code=status)
        except Exception as err:  # noqa: BLE001 - the service must survive anything
            log.exception("%s failed", name)
            status = 500
            return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"},
                                status_code=status)
        finally:
            service.metrics.record(name, status, time.perf_counter() - t0)

    return wrapped


async def _health(request: Request, service: SearchService) -> dict[str, Any]:
    return service.health()


async def _metrics(request: Request, service: SearchService) -> Response | dict[str, Any]:
    fmt = request.query_params.get("format", "json")
    if fmt == "prometheus":
        return PlainTextResponse(service.metrics.prometheus(service.batcher),
                                 media_type="text/plain; version=0.0.4")
    if fmt != "json":
        raise _bad(f"format must be json or prometheus, got {fmt!r}")
    return service.metrics.snapshot(service.batcher)


async def _search(request: Request, service: SearchService) -> dict[str, Any]:
    body = await _read_json(request, service.config.max_body_bytes)
    queries = service.queries_from(body)
    opts = service.search_options(body)
    return await service.search(queries, opts)


async def _search_expression(request: Request, service: SearchService) -> dict[str, Any]:
    if service.model is None:
        raise _HTTPError(404, "no model is loaded: start the service with a model "
                              "(scatlas serve --model DIR) to send expression data")
    body = await _read_json(request, service.config.max_body_bytes)
    adata = service.expression_from(body)
    opts = service.search_options(body)
    return_embeddings = _get_bool(body, "return_embeddings", False)
    service.check_hits(adata.n_obs, opts["k"])
    queries = await service.embed(adata)
    out = await service.search(queries, opts)
    if return_embeddings:
        out["embeddings"] = queries.astype(np.float64).tolist()
    return out


async def _annotate(request: Request, service: SearchService) -> dict[str, Any]:
    body = await _read_json(request, service.config.max_body_bytes)
    if "embeddings" in body:
        if "genes" in body:
            raise _bad("send either 'embeddings' or expression ('genes' + counts), not both")
        queries = service.queries_from(body)
    elif "genes" in body:
        if service.model is None:
            raise _HTTPError(404, "no model is loaded: send 'embeddings', or start the service "
                                  "with a model (scatlas serve --model DIR)")
        adata = service.expression_from(body)
        queries = await service.embed(adata)
    else:
        raise _bad("send 'embeddings' or expression data ('genes' + 'counts' or 'sparse')")
    return await service.annotate(queries, body)


async def _http_exception(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or str(exc)
    return JSONResponse({"error": f"{detail} ({request.method} {request.url.path})"},
                        status_code=status)


def _resolve_index(index: Any, device: str | None) -> Any:
    if isinstance(index, str | os.PathLike):
        from . import CellIndex

        return CellIndex.load(index, device=device)
    for attr in ("search", "dim", "ntotal"):
        if not hasattr(index, attr):
            raise ScatlasInputError(f"index must be a CellIndex (or a saved index folder), got "
                                    f"{type(index).__name__} without .{attr}")
    return index


def _resolve_model(model: Any) -> Any:
    if model is None:
        return None
    if isinstance(model, str | os.PathLike):
        from .. import models

        return models.load(model)
    for attr in ("embed", "genes", "latent_dim"):
        if not hasattr(model, attr):
            raise ScatlasInputError(f"model must have .embed, .genes and .latent_dim; "
                                    f"{type(model).__name__} lacks .{attr}")
    return model


def create_app(
    index: Any,
    model: Any = None,
    *,
    max_batch: int = 256,
    max_wait_ms: float = 2.0,
    max_queries_per_request: int = 4096,
    max_k: int = 1000,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_hits: int = 1_000_000,
    default_k: int = 10,
    label_key: str | None = None,
    device: str | None = None,
    atlas_map: Any = None,
) -> Starlette:
    """The search service as an ASGI app (Starlette; serve with uvicorn).

    ``index``: a :class:`~scatlas.search.CellIndex` or a folder saved by ``CellIndex.save``
    (loaded with ``device``). ``model``: ``None`` (embeddings only), a loaded model
    (``.embed(adata) -> (n, latent_dim)``, ``.genes``, ``.latent_dim``) or a model folder
    (:func:`scatlas.models.load`). ``max_batch``: queries per batched index call;
    ``max_wait_ms``: longest wait for a batch to fill (0: batch only what queued during the
    previous call); ``max_queries_per_request``, ``max_k``, ``max_body_bytes``, ``max_hits``
    (queries x k per request): request limits;
    ``label_key``: default ``label_key`` of ``/annotate``. ``atlas_map``: the index's 2-D map
    for the web page (:mod:`scatlas.search.atlas_map`): an ``AtlasMap``, an index folder holding
    one, or None (read from ``index`` when that is a folder). ``app.state.service`` holds the
    :class:`SearchService` (its ``metrics``, ``batcher``). The web page's routes (``GET /`` and
    the few it adds) are :mod:`scatlas.search.webpage`'s.
    """
    config = ServiceConfig(max_batch=max_batch, max_wait_ms=max_wait_ms,
                           max_queries_per_request=max_queries_per_request, max_k=max_k,
                           max_body_bytes=max_body_bytes, max_hits=max_hits,
                           default_k=default_k,
                           default_label_key=label_key)
    service = SearchService(_resolve_index(index, device), _resolve_model(model), config)
    if atlas_map is None and isinstance(index, str | os.PathLike):
        atlas_map = index
    if isinstance(atlas_map, str | os.PathLike):
        from .atlas_map import load_map

        atlas_map = load_map(atlas_map)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await service.startup()
        try:
            yield
        finally:
            await service.shutdown()

    routes = [
        Route("/health", _endpoint("health", service, _health), methods=["GET"]),
        Route("/metrics", _endpoint("metrics", service, _metrics), methods=["GET"]),
        Route("/search", _endpoint("search", service, _search), methods=["POST"]),
        Route("/search/expression", _endpoint("search_expression", service, _search_expression),
              methods=["POST"]),
        Route("/annotate", _endpoint("annotate", service, _annotate), methods=["POST"]),
    ]
    from .webpage import page_routes

    routes += page_routes(service, atlas_map)
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_exception})
    app.state.service = service
    return app
