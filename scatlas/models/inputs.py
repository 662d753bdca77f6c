"""Inputs of a trained model: align genes, validate, normalise, stream in chunks.

Every model embeds new data the same way: columns aligned to the model's gene list (missing genes
zero-filled, extra genes dropped, a minimum overlap enforced), raw counts log-normalised per cell
(``log1p(1e4 * x / total)``, the normalisation the model was trained on), rows streamed in
chunks so a backed ``.h5ad`` never loads whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._validate import ScatlasInputError, check_matrix, check_positive_int
from ..io import align_matrix, gene_positions, iter_chunks
from .data import densify, lognorm

INPUTS = ("counts", "lognorm")


def matrix_of(adata: ad.AnnData, layer: str | None) -> Any:
    """``adata.X`` or ``adata.layers[layer]``, with a clear error for a missing layer."""
    if layer is None:
        if adata.X is None:
            raise ScatlasInputError("adata.X is empty; pass layer= to use a layer")
        return adata.X
    if layer not in adata.layers:
        raise ScatlasInputError(
            f"layer {layer!r} not in adata.layers (available: {list(adata.layers)})"
        )
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
) -> Iterator[Any]:
    """Float32 chunks (rows, len(genes)) ready for the model, in row order: dense, or CSR for
    sparse input when ``dense=False``.

    ``data``: an AnnData (in memory or backed; genes matched on ``var_names``) or a matrix whose
    columns are already the model's genes. ``input``: ``"counts"`` (raw counts: validated and
    log-normalised) or ``"lognorm"`` (already ``log1p`` of counts per 1e4).
    """
    if input not in INPUTS:
        raise ScatlasInputError(f"input must be one of {INPUTS}, got {input!r}")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    if isinstance(data, ad.AnnData):
        matrix_of(data, layer)
        positions, _ = gene_positions(data.var_names, genes, min_overlap=min_overlap)
        blocks = (align_matrix(X, positions) for _, _, X in iter_chunks(data, chunk_size, layer))
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
    for block in blocks:
        check_matrix(block, "X", nonnegative=input == "counts", min_rows=0)
        if input == "counts":
            check_integer_counts(block)
            yield lognorm(block, dense=dense)
        else:
            yield densify(block, dense=dense)
