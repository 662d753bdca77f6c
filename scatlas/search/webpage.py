"""The web page of ``scatlas serve``: its static files and the few endpoints only it needs.

The page (``scatlas/search/web/``: ``index.html``, ``app.css``, ``app.js``; no build step, nothing
fetched from elsewhere) queries the JSON API itself (``/health``, ``/search``,
``/search/expression``, ``/annotate``), so its requests pass the same validation and get the same
4xx answers as any client's. It adds:

* ``GET /``: the page; ``GET /static/<name>``: its CSS and JavaScript.
* ``GET /cells/<id>``: an indexed cell's stored embedding (the vector ``CellIndex.build`` was
  given, from the index's map folder, :mod:`scatlas.search.atlas_map`), its metadata and its map
  position: the page then searches that vector through ``/search``, so the neighbours shown are
  ``index.search(vector)``'s. 400 for an id that is not an integer, 404 for an unknown or removed
  id or an index without a stored map.
* ``GET /map``: whether a map is stored, its method, picture size and legend (``?color=COLUMN``);
  ``GET /map.png?color=COLUMN``: the map drawn once per colouring (cached), cells coloured by a
  metadata column.
* ``POST /map/points``: ``{"ids": [...] or [[...]]}`` -> ``{"xy": [[x, y] or null, ...]}``, the
  picture positions of hits (same nesting).
* ``POST /query/h5ad?k=50&label_key=cell_type``: the body is a ``.h5ad`` file (raw counts, or
  whatever the model reads; ``Content-Type: application/x-hdf5`` or
  ``application/octet-stream``), at most ``--max-body-mb`` (413) and ``--max-queries`` cells; its
  cells are embedded with the model (the same gene-overlap and input-kind checks as
  ``/search/expression``) and answered with ``{"n_cells", "genes_matched", "model_genes",
  "search": <as /search>, "annotation": <as /annotate> (when a label column is known)}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from ._requests import INPUT_KINDS, MIN_GENE_OVERLAP, _bad, _HTTPError, _read_json, _stream_body
from .service import _endpoint

if TYPE_CHECKING:
    from .atlas_map import AtlasMap
    from .service import SearchService

__all__ = ["page_routes"]

STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml",
                ".txt": "text/plain; charset=utf-8"}
UPLOAD_TYPES = ("application/x-hdf5", "application/octet-stream", "application/x-h5ad")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: columns the page aggregates hits by, when the index has them (first found is the default)
GROUP_COLUMNS = ("study", "dataset", "tissue", "disease", "donor", "batch")
#: columns tried as the annotation label, when the server has no ``--label-key``
LABEL_COLUMNS = ("cell_type", "celltype", "cell_type_label", "label", "annotation")
NO_MAP = ("this index has no stored map: build it with 'scatlas index build ... --map tsne', or "
          "add one with 'scatlas index map INDEX EMBEDDINGS --method tsne'")


class PageState:
    """What the page endpoints share: the service, the stored map and the cached files."""

    def __init__(self, service: SearchService, atlas_map: AtlasMap | None) -> None:
        self.service = service
        self.map = atlas_map
        folder = resources.files("scatlas.search").joinpath("web")
        self.static: dict[str, tuple[bytes, str]] = {}
        for entry in folder.iterdir():
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            if entry.is_file() and suffix in STATIC_TYPES:
                self.static[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
        # the page links its CSS and JavaScript by content hash, so browsers may keep them
        html, media = self.static["index.html"]
        for name in ("app.css", "app.js"):
            digest = hashlib.sha256(self.static[name][0]).hexdigest()[:12]
            html = html.replace(f"/static/{name}\"".encode(),
                                f"/static/{name}?v={digest}\"".encode())
        self.static["index.html"] = (html, media)

    def label_column(self) -> str | None:
        """The annotation's default label column: ``--label-key``, else a usual name."""
        cfg = self.service.config.default_label_key
        if cfg:
            return cfg
        return next((c for c in LABEL_COLUMNS if c in self.service.columns), None)

    def color_column(self, request: Request) -> str | None:
        name = request.query_params.get("color")
        if name is None or name == "":
            return self.label_column()
        if name not in self.service.columns:
            raise _bad(f"unknown color column {name!r} (metadata columns: "
                       f"{self.service.columns[:20]})")
        return name

    def picture(self, column: str | None) -> tuple[bytes, list[dict[str, Any]]]:
        if self.map is None:
            raise _HTTPError(404, NO_MAP)
        cached = self.map.cached_picture(column)
        if cached is not None:
            return cached
        index = self.service.index
        labels = None
        if column is not None:
            labels = pd.Series(np.asarray(self.service.table.values[column], dtype=object),
                               name=column)
        alive = getattr(index, "_alive", None)
        return self.map.render_png(labels, alive=alive)


# ------------------------------------------------------------------------------------------------
# handlers
# ------------------------------------------------------------------------------------------------


def _page(state: PageState):
    async def page(request: Request, service: SearchService) -> Response:
        body, _ = state.static["index.html"]
        return HTMLResponse(body, headers={"cache-control": "no-cache"})
    return page


def _static(state: PageState):
    async def static(request: Request, service: SearchService) -> Response:
        name = request.path_params["name"]
        if name not in state.static:
            raise _HTTPError(404, f"no static file {name!r}")
        body, media = state.static[name]
        # a versioned link (?v=<hash>, as the page uses) never changes: cache it for a day
        cache = "public, max-age=86400" if "v" in request.query_params else "no-cache"
        return Response(body, media_type=media, headers={"cache-control": cache})
    return static


def _cell(state: PageState):
    async def cell(request: Request, service: SearchService) -> dict[str, Any]:
        text = request.path_params["cell"]
        if not re.fullmatch(r"-?\d{1,18}", text):
            raise _bad(f"a cell id is an integer (a row of the index), got {text!r}")
        cid = int(text)
        alive = getattr(service.index, "_alive", None)
        next_id = int(getattr(service.index, "next_id", service.ntotal))
        if not 0 <= cid < next_id:
            raise _HTTPError(404, f"no cell with id {cid}: ids run from 0 to {next_id - 1}")
        if alive is not None and cid < alive.size and not alive[cid]:
            raise _HTTPError(404, f"cell {cid} was removed from the index")
        if state.map is None:
            raise _HTTPError(404, f"cannot query by cell id: {NO_MAP}")
        vector = state.map.vector(cid)
        if vector is None:
            raise _HTTPError(404, f"cell {cid} was added after the map was made; make the map "
                                  "again (scatlas index map) to query it by id")
        ids = np.array([[cid]], dtype=np.int64)
        metadata = service.table.rows(ids, None)[0][0] if service.columns else None
        return {"id": cid, "embedding": vector.astype(np.float64).tolist(),
                "metadata": metadata, "xy": state.map.pixels(ids)[0]}
    return cell


async def _picture(state: PageState, column: str | None) -> tuple[bytes, list[dict[str, Any]]]:
    """The map picture for ``column``: from the cache, or drawn once in a worker thread."""
    cached = state.map.cached_picture(column) if state.map is not None else None
    if cached is not None:
        return cached
    return await asyncio.get_running_loop().run_in_executor(None, state.picture, column)


def _map_info(state: PageState):
    async def map_info(request: Request, service: SearchService) -> dict[str, Any]:
        from .atlas_map import HEIGHT, WIDTH

        column = state.color_column(request)
        groups = [c for c in GROUP_COLUMNS if c in service.columns]
        base = {"label_column": state.label_column(), "group_columns": groups,
                "color": column}
        if state.map is None:
            return {"available": False, "message": NO_MAP, **base}
        _, legend = await _picture(state, column)
        return {"available": True, "method": state.map.method, "n": state.map.n,
                "width": WIDTH, "height": HEIGHT, "legend": legend, **base}
    return map_info


def _map_png(state: PageState):
    async def map_png(request: Request, service: SearchService) -> Response:
        column = state.color_column(request)
        png, _ = await _picture(state, column)
        return Response(png, media_type="image/png",
                        headers={"cache-control": "public, max-age=3600"})
    return map_png


def _map_points(state: PageState):
    async def map_points(request: Request, service: SearchService) -> dict[str, Any]:
        body = await _read_json(request, service.config.max_body_bytes)
        ids = body.get("ids")
        if not isinstance(ids, list) or not ids:
            raise _bad("'ids' must be a non-empty list of cell ids (or a list of such lists)")
        nested = isinstance(ids[0], list)
        rows = ids if nested else [ids]
        if any(not isinstance(r, list) for r in rows) or len({len(r) for r in rows}) != 1:
            raise _bad("'ids' rows must all be lists of the same length")
        flat = [v for r in rows for v in r]
        if len(flat) > service.config.max_hits:
            raise _bad(f"'ids' has {len(flat)} ids; at most {service.config.max_hits}")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in flat):
            raise _bad("'ids' must contain only integers")
        if state.map is None:
            raise _HTTPError(404, NO_MAP)
        xy = state.map.pixels(np.array(flat, dtype=np.int64))
        width = len(rows[0])
        out = [xy[i * width:(i + 1) * width] for i in range(len(rows))]
        return {"xy": out if nested else out[0]}
    return map_points


async def _read_upload(request: Request, limit: int) -> bytes:
    """The raw body of an upload: 415 for a type that is not a file, 413 over ``limit``."""
    declared = request.headers.get("content-type", "").strip()
    media = declared.split(";", 1)[0].strip().lower()
    if media and media not in UPLOAD_TYPES:
        raise _HTTPError(415, f"Content-Type {declared!r} is not supported: send the .h5ad file "
                              "itself as the body with 'Content-Type: application/x-hdf5'")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _HTTPError(413, f"the file has {int(length)} bytes; the limit is {limit} bytes "
                              f"({limit / 2**20:.0f} MiB, scatlas serve --max-body-mb)")
    body = await _stream_body(request, limit)
    if not body:
        raise _bad("the upload is empty: choose a .h5ad file")
    return body


def read_h5ad_bytes(data: bytes, max_cells: int):
    """An uploaded ``.h5ad`` as an AnnData (400 with a readable message when it is not one)."""
    import anndata as ad

    if not data.startswith(HDF5_MAGIC):
        raise _bad("the file is not an .h5ad (AnnData HDF5) file: it does not start with the "
                   "HDF5 signature. Save your cells with adata.write_h5ad('cells.h5ad')")
    try:
        adata = ad.read_h5ad(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - any reader failure is the file's fault
        raise _bad(f"could not read the file as .h5ad: {type(err).__name__}: {err}") from None
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise _bad(f"the .h5ad holds {adata.n_obs} cells x {adata.n_vars} genes; it needs at "
                   "least one of each")
    if adata.n_obs > max_cells:
        raise _bad(f"the .h5ad holds {adata.n_obs} cells; at most {max_cells} per request "
                   "(scatlas serve --max-queries)")
    if adata.X is None:
        raise _bad("the .h5ad has no X matrix (expression values)")
    if not adata.var_names.is_unique:
        raise _bad("the .h5ad's gene names (var_names) are not unique; call "
                   "adata.var_names_make_unique() first")
    return adata


def _check_values(adata, kind: str) -> None:
    """Negative or non-finite expression values: the same 400 as ``/search/expression``."""
    import scipy.sparse as sp

    X = adata.X
    values = X.data if sp.issparse(X) else np.asarray(X)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise _bad(f"the .h5ad's X has {bad} non-finite value(s)")
    if values.size and values.min() < 0:
        raise _bad(f"the .h5ad's X has {int((values < 0).sum())} negative value(s) (min "
                   f"{float(values.min()):.4g}): scaled or z-scored data? The model reads "
                   f"{INPUT_KINDS.get(kind, kind)}: send those")


def _query_h5ad(state: PageState):
    async def query_h5ad(request: Request, service: SearchService) -> dict[str, Any]:
        if service.model is None:
            raise _HTTPError(404, "no model is loaded: start the service with a model "
                                  "(scatlas serve --model DIR) to upload expression data")
        params = dict(request.query_params)
        opts = service.search_options({"k": _int_param(params, "k") if "k" in params else 50})
        label_key = params.get("label_key") or state.label_column()
        data = await _read_upload(request, service.config.max_body_bytes)
        loop = asyncio.get_running_loop()
        adata = await loop.run_in_executor(None, read_h5ad_bytes, data,
                                           service.config.max_queries_per_request)
        _check_values(adata, service.input_kind)
        service.check_hits(adata.n_obs, opts["k"])
        genes = getattr(service.model, "genes", [])
        matched = int(pd.Index(genes).isin(adata.var_names).sum())
        if len(genes) and matched < MIN_GENE_OVERLAP * len(genes):
            raise _bad(f"the file's {adata.n_vars} genes (var_names) include {matched} of the "
                       f"model's {len(genes)} ({matched / len(genes):.1%}); at least "
                       f"{MIN_GENE_OVERLAP:.0%} are needed. Name the genes as the model does "
                       f"(e.g. {list(map(str, genes[:3]))}; the file has "
                       f"{list(map(str, adata.var_names[:3]))})")
        queries = await service.embed(adata)
        out: dict[str, Any] = {"n_cells": int(adata.n_obs),
                               "cell_names": [str(c) for c in adata.obs_names],
                               "genes_matched": matched, "model_genes": len(genes),
                               "search": await service.search(queries, opts)}
        if label_key is not None:
            out["annotation"] = await service.annotate(queries, {"label_key": label_key,
                                                                 "k": opts["k"]})
        return out
    return query_h5ad


def _int_param(params: dict[str, str], name: str) -> Any:
    """A query-string number as JSON would give it (so ``_get_int`` says the same things)."""
    text = params.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def page_routes(service: SearchService, atlas_map: AtlasMap | None) -> list[Route]:
    """The page's routes (see the module docstring), wrapped as the JSON endpoints are."""
    state = PageState(service, atlas_map)
    return [
        Route("/", _endpoint("page", service, _page(state)), methods=["GET"]),
        Route("/static/{name}", _endpoint("static", service, _static(state)), methods=["GET"]),
        Route("/cells/{cell}", _endpoint("cell", service, _cell(state)), methods=["GET"]),
        Route("/map", _endpoint("map", service, _map_info(state)), methods=["GET"]),
        Route("/map.png", _endpoint("map_png", service, _map_png(state)), methods=["GET"]),
        Route("/map/points", _endpoint("map_points", service, _map_points(state)),
              methods=["POST"]),
        Route("/query/h5ad", _endpoint("query_h5ad", service, _query_h5ad(state)),
              methods=["POST"]),
    ]
