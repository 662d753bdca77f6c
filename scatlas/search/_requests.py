"""The HTTP service's request checks: status-coded errors, content type and body, numbers,
matrices, metadata filters and expression payloads (dense or sparse), each refused with a 4xx
message that names the field. Split from :mod:`scatlas.search.service` (issue 18)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from starlette.requests import Request

MAX_GENES = 200_000
#: the fraction of the model's genes a request must name (``model.embed``'s default
#: ``min_overlap``)
MIN_GENE_OVERLAP = 0.5
#: what the expression values must be, per model input kind (``model.input_kind``)
INPUT_KINDS = {
    "counts": "raw counts (non-negative integers)",
    "lognorm": "log-normalised values (log1p of normalised counts: finite, never negative)",
}


class _HTTPError(Exception):
    """A request error with its status code (turned into ``{"error": message}``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> _HTTPError:
    return _HTTPError(400, message)


# ------------------------------------------------------------------------------------------------
# Request parsing and validation
# ------------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (JSON numbers must be finite)")


def _check_content_type(request: Request) -> None:
    """415 unless the body is declared JSON: ``application/json`` (any parameters, e.g. a
    charset) or ``application/*+json``; a request without the header is read as JSON."""
    declared = request.headers.get("content-type", "").strip()
    if not declared:
        return
    media = declared.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/")
                                       and media.endswith("+json")):
        return
    raise _HTTPError(415, f"Content-Type {declared!r} is not supported: send the body as a JSON "
                          "object with the header 'Content-Type: application/json' (curl: "
                          "-H 'content-type: application/json')")


async def _stream_body(request: Request, limit: int) -> bytes:
    """The request body, read chunk by chunk; 413 as soon as it passes ``limit`` bytes (a
    ``Content-Length`` can be absent or wrong)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _HTTPError(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object; 415 for a non-JSON ``Content-Type``, 413 above
    ``limit`` bytes, 400 when malformed."""
    _check_content_type(request)
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise _bad(f"invalid Content-Length header {length!r}") from None
        if declared > limit:
            raise _HTTPError(413, f"request body of {declared} bytes exceeds the limit of "
                                  f"{limit} bytes")
    body = await _stream_body(request, limit)
    if not body:
        raise _bad("empty request body; send a JSON object")
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise _bad("malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise _bad(f"malformed JSON: {err}") from None
    if not isinstance(obj, dict):
        raise _bad(f"the request body must be a JSON object, got {type(obj).__name__}")
    return obj


def _get_int(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise _bad(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise _bad(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _get_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise _bad(f"{name} must be true or false, got {value!r}")
    return value


def parse_matrix(value: Any, name: str, *, n_cols: int | None, max_rows: int,
                 nonnegative: bool = False, kind: str = "counts") -> np.ndarray:
    """A JSON list of rows -> ``(m, n_cols)`` float32, finite; a flat list is one row.

    Raises ``_HTTPError`` (400) for a missing / empty / ragged / non-numeric / non-finite matrix,
    the wrong width or more than ``max_rows`` rows; with ``nonnegative``, for negative values
    (the message says what input ``kind``, ``"counts"`` or ``"lognorm"``, to send instead).
    """
    if value is None:
        raise _bad(f"{name!r} is missing")
    if not isinstance(value, list):
        raise _bad(f"{name!r} must be a list of rows (a 2-D list), got {type(value).__name__}")
    if not value:
        raise _bad(f"{name!r} is empty; send at least one row")
    if not isinstance(value[0], list):
        value = [value]
    if len(value) > max_rows:
        raise _bad(f"{name!r} has {len(value)} rows; at most {max_rows} per request")
    try:
        arr = np.array(value)
    except (ValueError, TypeError) as err:
        raise _bad(f"{name!r} is not a rectangular numeric matrix ({err})") from None
    if arr.dtype.kind not in "iuf":
        raise _bad(f"{name!r} must contain only numbers; {_first_non_number(value)}")
    if arr.ndim != 2:
        raise _bad(f"{name!r} must be 2-D (rows x columns), got shape {list(arr.shape)}")
    if arr.shape[1] == 0:
        raise _bad(f"{name!r} has empty rows")
    if n_cols is not None and arr.shape[1] != n_cols:
        raise _bad(f"{name!r} rows have {arr.shape[1]} values; the index expects {n_cols}")
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise _bad(f"{name!r} has {bad} non-finite value(s) (too large for float32?)")
    if nonnegative and (out < 0).any():
        raise _bad(f"{name!r} has {int((out < 0).sum())} negative value(s) (min "
                   f"{float(out.min()):.4g}): scaled or z-scored data? The model reads "
                   f"{INPUT_KINDS.get(kind, kind)}: send those")
    return out


def _first_non_number(rows: list) -> str:
    """Where the first entry of a JSON matrix that is not a number is, in JSON's terms
    (``null``, ``true``, a string, a nested list): ``row 3, column 7 is null``."""
    json_names = {type(None): "null", bool: "a boolean (true/false)", str: "a string",
                  list: "a nested list", dict: "an object"}
    for i, row in enumerate(rows):
        for j, v in enumerate(row if isinstance(row, list) else [row]):
            if isinstance(v, bool) or not isinstance(v, int | float):
                what = json_names.get(type(v), type(v).__name__)
                shown = "" if v is None or isinstance(v, list | dict) else f" {json.dumps(v)}"
                return f"row {i}, column {j} is {what}{shown}"
    return "an entry is not a number"


_SCALAR = (str, int, float, bool)


def _check_filter_values(column: str, values: Any) -> None:
    items = values if isinstance(values, list) else [values]
    if not items:
        raise _bad(f"filter values for {column!r} are an empty list")
    for v in items:
        if v is not None and not isinstance(v, _SCALAR):
            raise _bad(f"filter values for {column!r} must be strings, numbers or booleans, "
                       f"got {v!r}")


def parse_filter(value: Any, columns: Sequence[str]) -> tuple[dict[str, Any] | None, str]:
    """Validate a ``{column: value(s)}`` filter (with optional ``"exclude"``); returns it and a
    canonical string (the batching key)."""
    if value is None or value == {}:
        return None, ""
    if not isinstance(value, dict):
        raise _bad("filter must be an object {column: value or [values]}, optionally with "
                   "\"exclude\": {column: [values]} (query strings are not accepted over HTTP)")
    known = set(map(str, columns))

    def check_columns(spec: dict[str, Any], where: str) -> None:
        for column, values in spec.items():
            if column not in known:
                shown = sorted(known)[:20]
                raise _bad(f"unknown filter column {column!r}{where} (metadata columns: {shown})")
            _check_filter_values(column, values)

    keep = {c: v for c, v in value.items() if c != "exclude"}
    check_columns(keep, "")
    if "exclude" in value:
        exclude = value["exclude"]
        if not isinstance(exclude, dict) or not exclude:
            raise _bad("filter 'exclude' must be a non-empty object {column: [values]}")
        check_columns(exclude, " in 'exclude'")
    return value, json.dumps(value, sort_keys=True, separators=(",", ":"))


def parse_expression(body: dict[str, Any], *, max_rows: int, kind: str = "counts"):
    """``genes`` + ``counts`` (dense) or ``sparse`` (COO or CSR) -> an AnnData (cells x genes).

    ``kind``: the model's input kind (``"counts"`` or ``"lognorm"``), named in the message for
    negative values."""
    import anndata as ad
    import scipy.sparse as sp

    genes = body.get("genes")
    if not isinstance(genes, list) or not genes:
        raise _bad("'genes' must be a non-empty list of gene names")
    if len(genes) > MAX_GENES:
        raise _bad(f"'genes' has {len(genes)} names; at most {MAX_GENES}")
    if not all(isinstance(g, str) for g in genes):
        raise _bad("'genes' must contain only strings")
    if len(set(genes)) != len(genes):
        raise _bad("'genes' has duplicated names")
    g = len(genes)
    if "counts" in body and "sparse" in body:
        raise _bad("send either 'counts' (dense) or 'sparse', not both")
    if "counts" in body:
        X = sp.csr_matrix(parse_matrix(body["counts"], "counts", n_cols=g, max_rows=max_rows,
                                       nonnegative=True, kind=kind))
    elif "sparse" in body:
        X = _parse_sparse(body["sparse"], g, max_rows, kind)
    else:
        raise _bad("expression input needs 'counts' (cells x genes) or 'sparse' "
                   "({shape, row, col, data} or {shape, indptr, indices, data})")
    adata = ad.AnnData(X=X)
    adata.var_names = pd.Index(genes)
    adata.obs_names = [str(i) for i in range(X.shape[0])]
    return adata


def _int_vector(spec: dict[str, Any], name: str, length: int | None = None) -> np.ndarray:
    value = spec.get(name)
    if not isinstance(value, list):
        raise _bad(f"sparse {name!r} must be a list of integers")
    try:
        arr = np.array(value)
    except (ValueError, TypeError):
        raise _bad(f"sparse {name!r} must be a flat list of integers") from None
    if arr.size and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
        raise _bad(f"sparse {name!r} must be a flat list of integers")
    if length is not None and arr.size != length:
        raise _bad(f"sparse {name!r} has {arr.size} entries, expected {length}")
    return arr.astype(np.int64)


def _parse_sparse(spec: Any, n_genes: int, max_rows: int, kind: str = "counts"):
    import scipy.sparse as sp

    if not isinstance(spec, dict):
        raise _bad("'sparse' must be an object {shape, row, col, data} or "
                   "{shape, indptr, indices, data}")
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise _bad("sparse 'shape' must be [n_cells, n_genes]")
    n, g = shape
    if g != n_genes:
        raise _bad(f"sparse shape has {g} genes but 'genes' has {n_genes} names")
    if not 1 <= n <= max_rows:
        raise _bad(f"sparse shape has {n} cells; need 1 to {max_rows} per request")
    data = spec.get("data")
    if not isinstance(data, list):
        raise _bad("sparse 'data' must be a list of numbers")
    values = (parse_matrix([data], "sparse data", n_cols=None, max_rows=1, nonnegative=True,
                           kind=kind)[0] if data else np.zeros(0, np.float32))
    nnz = values.size
    if "indptr" in spec:
        indptr = _int_vector(spec, "indptr", n + 1)
        indices = _int_vector(spec, "indices", nnz)
        if indptr[0] != 0 or indptr[-1] != nnz or (np.diff(indptr) < 0).any():
            raise _bad("sparse 'indptr' must start at 0, be non-decreasing and end at len(data)")
        if nnz and (indices.min() < 0 or indices.max() >= g):
            raise _bad(f"sparse 'indices' must be in [0, {g})")
        return sp.csr_matrix((values, indices, indptr), shape=(n, g))
    row = _int_vector(spec, "row", nnz)
    col = _int_vector(spec, "col", nnz)
    if nnz and (row.min() < 0 or row.max() >= n):
        raise _bad(f"sparse 'row' must be in [0, {n})")
    if nnz and (col.min() < 0 or col.max() >= g):
        raise _bad(f"sparse 'col' must be in [0, {g})")
    return sp.coo_matrix((values, (row, col)), shape=(n, g)).tocsr()
