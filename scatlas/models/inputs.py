"""Inputs of a trained model: what it was trained on, align genes, validate, normalise, stream.

Every model embeds new data the same way: columns aligned to the model's gene list (missing genes
zero-filled, extra genes dropped, a minimum overlap enforced), raw counts log-normalised per cell
(``log1p(1e4 * x / total)``, the normalisation the model was trained on), rows streamed in
chunks so a backed ``.h5ad`` never loads whole.

A model records the input it was trained on (:class:`InputSpec`: raw counts or log-normalised
values, and where they were: a layer, or ``adata.raw``) and reads new data the same way by
default. Values are checked against that kind (:func:`check_input_values`): raw counts are
non-negative integers; log-normalised values (``log1p`` of normalised counts) are non-negative
and finite, so scaled or z-scored data (negative values) are refused with a message saying what
was found and what to pass instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import backend
from .._validate import ScatlasInputError, check_matrix, check_positive_int
from ..io import align_matrix, gene_positions, iter_chunks
from .data import densify, lognorm

INPUTS = ("counts", "lognorm")
#: what each input kind is, in messages
DESCRIBE = {"counts": "raw counts (non-negative integers)",
            "lognorm": "log-normalised values (log1p of normalised counts: finite, never "
                       "negative)"}
#: integer-valued input above this is taken for raw counts where log-normalised values are
#: expected (log1p(1e4) = 9.2; log1p(1e6) = 13.8, counts per million)
LOGNORM_MAX = 20.0
#: stored values examined by the integer checks (the first ones of a block)
SAMPLE_VALUES = 1_000_000


@dataclass(frozen=True)
class InputSpec:
    """What a model was trained on: ``kind`` (``"counts"``: raw counts, log-normalised by the
    model; ``"lognorm"``: already log-normalised), ``layer`` (the ``adata.layers`` key, None:
    ``X``) and ``use_raw`` (``adata.raw``'s ``X`` and genes). Saved with the model
    (``manifest.json``, ``extra["input"]``); a model folder without it (written before it was
    recorded) reads as raw counts in ``X``."""

    kind: str = "counts"
    layer: str | None = None
    use_raw: bool = False

    def __post_init__(self) -> None:
        if self.kind not in INPUTS:
            raise ScatlasInputError(f"input must be one of {INPUTS}, got {self.kind!r}",
                                    param="input")
        if self.layer is not None and self.use_raw:
            raise ScatlasInputError("pass layer= or use_raw=True, not both (adata.raw has no "
                                    "layers)", param="layer")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> InputSpec:
        """The spec of a saved model (None or missing fields: the defaults, raw counts in X)."""
        d = dict(d or {})
        return cls(kind=d.get("kind", "counts"), layer=d.get("layer"),
                   use_raw=bool(d.get("use_raw", False)))


class InputKindError(ScatlasInputError):
    """Values that are not of the expected input kind (``kind``): ``found`` says what was seen
    (e.g. ``"12 negative value(s) (min -2.03)"``), ``where`` where (``"X"``, ...); ``str()`` adds
    what to pass instead, in Python's terms (front ends write their own advice from the fields)."""

    def __init__(self, kind: str, where: str, found: str, advice: str, *, looks: str = "") -> None:
        self.kind, self.where, self.found, self.looks = kind, where, found, looks
        self._fields = (kind, where, found, advice, looks)
        super().__init__(f"{where} holds {found}{looks}, where {DESCRIBE[kind]} are expected "
                         f"(input={kind!r}). {advice}", param="input")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (its arguments are not the message)
        kind, where, found, advice, looks = self._fields
        return (_input_kind_error, (kind, where, found, advice, looks))


def _input_kind_error(kind: str, where: str, found: str, advice: str,
                      looks: str) -> InputKindError:
    return InputKindError(kind, where, found, advice, looks=looks)


def _where(layer: str | None, use_raw: bool) -> str:
    return "adata.raw.X" if use_raw else "X" if layer is None else f"layers[{layer!r}]"


def check_input_values(X: Any, kind: str, where: str = "X") -> None:
    """Raise unless ``X`` (dense or sparse) holds values of input ``kind``.

    Both kinds: finite (:func:`scatlas._validate.check_matrix`) and non-negative (negative
    values mean scaled or z-scored data: :class:`InputKindError`). ``"counts"``: integers.
    ``"lognorm"``: not integer-valued above :data:`LOGNORM_MAX` (raw counts). The integer checks
    look at the first :data:`SAMPLE_VALUES` stored values.
    """
    check_matrix(X, where, min_rows=0, min_cols=0)
    values = X.data if sp.issparse(X) else np.asarray(X).ravel()
    if not values.size:
        return
    other = "lognorm" if kind == "counts" else "counts"
    if values.min() < 0:
        n = int(np.count_nonzero(values < 0))
        raise InputKindError(
            kind, where, f"{n} negative value(s) (min {float(values.min()):.4g})",
            "Point layer= (or use_raw=True for adata.raw) at raw counts (input='counts') or at "
            "log-normalised values (input='lognorm'); scaled or z-scored data cannot be used",
            looks=": scaled or z-scored data, not raw counts or log-normalised values")
    sample = values[:SAMPLE_VALUES]
    if kind == "counts":
        frac = np.mod(sample, 1)
        if np.any(frac != 0):
            v = float(sample[np.flatnonzero(frac)[0]])
            raise InputKindError(
                kind, where, f"non-integer values (e.g. {v:.4g})",
                f"If these are log-normalised values, pass input={other!r}; else point layer= "
                "(or use_raw=True for adata.raw) at the raw counts",
                looks=", not raw counts")
    elif float(sample.max()) > LOGNORM_MAX and not np.any(np.mod(sample, 1)):
        raise InputKindError(
            kind, where, f"integer values up to {float(sample.max()):.4g}",
            f"If these are raw counts, pass input={other!r}; else point layer= (or "
            "use_raw=True for adata.raw) at the log-normalised values",
            looks=": raw counts, not log-normalised values")


def resolve_input(
    data: Any,
    spec: InputSpec,
    *,
    layer: str | None = None,
    input: str | None = None,
    use_raw: bool | None = None,
) -> tuple[Any, str | None, str, str]:
    """Where and how to read ``data`` for a model trained on ``spec``:
    ``(data or its adata.raw as an AnnData, layer, kind, where)``.

    Defaults follow ``spec``: ``input=None`` is the recorded kind (another kind is honoured with
    a warning: the embedding matches training only if the normalisation does); ``use_raw=None``
    reads ``adata.raw`` when the model was trained on it and ``data`` has one; ``layer=None``
    reads the recorded layer when ``data`` has it, else ``X`` (``layer="X"``: ``X`` always).
    A matrix ``data`` is read as it is (no layer, no raw).
    """
    kind = spec.kind if input is None else input
    if kind not in INPUTS:
        raise ScatlasInputError(f"input must be one of {INPUTS}, got {kind!r}", param="input")
    if kind != spec.kind:
        warnings.warn(
            f"this model was trained on {DESCRIBE[spec.kind]}; reading the input as "
            f"{DESCRIBE[kind]}, as asked. The embedding matches the training cells' only if "
            "both are log1p of counts per 1e4 over the same genes", UserWarning, stacklevel=3)
    if not isinstance(data, ad.AnnData):
        if layer not in (None, "X") or use_raw:
            raise ScatlasInputError("layer= and use_raw= need an AnnData; a matrix is read as "
                                    "it is", param="layer")
        return data, None, kind, "X"
    if use_raw and layer not in (None, "X"):
        raise ScatlasInputError("pass layer= or use_raw=True, not both (adata.raw has no "
                                "layers)", param="use_raw")
    raw = use_raw if use_raw is not None else (
        spec.use_raw and layer is None and data.raw is not None)
    if raw:
        if data.raw is None:
            raise ScatlasInputError("use_raw=True but adata.raw is empty; read X or a layer "
                                    "instead (use_raw=False, layer=)", param="use_raw")
        return data.raw.to_adata(), None, kind, _where(None, True)
    if layer == "X":
        layer = None
    elif layer is None and spec.layer is not None and spec.layer in data.layers:
        layer = spec.layer
    return data, layer, kind, _where(layer, False)


def matrix_of(adata: ad.AnnData, layer: str | None) -> Any:
    """``adata.X`` or ``adata.layers[layer]``, with a clear error for a missing layer."""
    if layer is None:
        if adata.X is None:
            raise ScatlasInputError("adata.X is empty; pass layer= to use a layer",
                                    param="layer")
        return adata.X
    if layer not in adata.layers:
        raise ScatlasInputError(
            f"layer {layer!r} not in adata.layers (available: {list(adata.layers)})",
            param="layer")
    return adata.layers[layer]


def check_integer_counts(
    X: Any,
    name: str = "X",
    advice: str = "pass input='lognorm' if it is already log-normalised (log1p of counts per 1e4)",
) -> None:
    """Raise unless ``X`` holds integer values (raw counts); checks the first 1e6 stored values.

    The message names ``name`` and ends with ``advice`` (what the caller can do instead).
    """
    values = X.data if sp.issparse(X) else np.asarray(X).ravel()
    sample = values[: 1_000_000]
    if sample.size and not np.all(np.mod(sample, 1) == 0):
        raise ScatlasInputError(
            f"{name} does not hold integer counts (it does not look like raw counts); {advice}"
        )


def model_chunks(
    data: Any,
    genes: pd.Index,
    *,
    layer: str | None = None,
    input: str = "counts",
    chunk_size: int = 10_000,
    min_overlap: float = 0.5,
    dense: bool = True,
    where: str | None = None,
) -> Iterator[Any]:
    """Float32 chunks (rows, len(genes)) ready for the model, in row order: dense, or CSR for
    sparse input when ``dense=False``.

    ``data``: an AnnData (in memory or backed; genes matched on ``var_names``) or a matrix whose
    columns are already the model's genes. ``input``: ``"counts"`` (raw counts: validated and
    log-normalised) or ``"lognorm"`` (already ``log1p`` of counts per 1e4: validated, used as
    they are); :func:`check_input_values` on every chunk. ``where``: the data's name in errors
    (default ``X`` or ``layers[layer]``).
    """
    if input not in INPUTS:
        raise ScatlasInputError(f"input must be one of {INPUTS}, got {input!r}", param="input")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    where = where or _where(layer, False)
    if isinstance(data, ad.AnnData):
        matrix_of(data, layer)
        positions, _ = gene_positions(data.var_names, genes, min_overlap=min_overlap)
        # a GPU AnnData (cupy / cupyx): each chunk comes to the host; JAX places the batches
        blocks = (align_matrix(backend.to_host(X), positions)
                  for _, _, X in iter_chunks(data, chunk_size, layer))
    else:
        X = check_matrix(data, "X", finite=False)  # values: per chunk below
        if X.shape[1] != len(genes):
            raise ScatlasInputError(
                f"X has {X.shape[1]} columns but the model has {len(genes)} genes; pass an "
                "AnnData (genes are then aligned by name) or align the columns first"
            )
        if sp.issparse(X):
            X = sp.csr_matrix(X)
        blocks = (X[i : i + chunk_size] for i in range(0, X.shape[0], chunk_size))
    n_cells = data.n_obs if isinstance(data, ad.AnnData) else X.shape[0]
    start = 0
    for block in blocks:
        block = backend.to_host(block)
        stop = start + block.shape[0]
        # several chunks: the message names the chunk's cells (its counts are the chunk's)
        check_input_values(block, input, where if n_cells <= chunk_size
                           else f"{where} (cells {start}-{stop - 1})")
        start = stop
        if input == "counts":
            yield lognorm(block, dense=dense)
        else:
            yield densify(block, dense=dense)
