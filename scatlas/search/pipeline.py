"""End-to-end annotation of an AnnData: raw counts -> model embedding -> index search -> labels.

:func:`annotate_adata` is the one call behind ``scatlas annotate``: it embeds the cells with a
metric encoder (:func:`scatlas.models.load`; ``model.embed`` aligns genes, log-normalises raw
counts and embeds in chunks), or takes embeddings already in ``obsm``, then votes the labels of
the ``k`` nearest reference cells (:func:`scatlas.search.annotate`, the SCimilarity-style
``get_predictions_knn``) and writes the result to ``obs``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pandas as pd

from .._validate import ScatlasInputError, check_matrix

__all__ = ["annotate_adata", "load_model", "query_embeddings"]

#: obs columns written by :func:`annotate_adata` (prefixed with ``key_added + "_"``)
OBS_FIELDS = ("label", "confidence", "vs_second", "min_dist", "is_ood")


def load_model(model: Any) -> Any:
    """A model object as is, or :func:`scatlas.models.load` of a model folder."""
    if model is None or not isinstance(model, str | os.PathLike):
        return model
    from .. import models

    load = getattr(models, "load", None)
    if load is None:
        raise ScatlasInputError("scatlas.models.load is not available in this version")
    return load(model)


def query_embeddings(adata, model: Any = None, *, obsm_key: str = "X_scatlas",
                     store: bool = True) -> np.ndarray:
    """``(n_obs, d)`` float32 embeddings of ``adata``'s cells.

    With ``model``: ``model.embed(adata)`` (raw counts in ``X``), stored in ``obsm[obsm_key]``
    when ``store``; without: ``adata.obsm[obsm_key]``.
    """
    model = load_model(model)
    if model is not None:
        emb = np.asarray(model.embed(adata), dtype=np.float32)
        if emb.shape[0] != adata.n_obs:
            raise ScatlasInputError(f"model.embed returned {emb.shape[0]} rows for "
                                    f"{adata.n_obs} cells")
        if store:
            adata.obsm[obsm_key] = emb
        return emb
    if obsm_key not in adata.obsm:
        raise ScatlasInputError(
            f"no embeddings: adata.obsm has no {obsm_key!r} (keys: {list(adata.obsm.keys())}); "
            "give a model to embed the raw counts, or the obsm key holding the embeddings"
        )
    emb = np.asarray(adata.obsm[obsm_key], dtype=np.float32)
    check_matrix(emb, f"adata.obsm[{obsm_key!r}]")
    return emb


def annotate_adata(
    adata,
    index: Any,
    model: Any = None,
    *,
    label_key: str,
    k: int = 50,
    weighting: str = "distance",
    ood_distance: float | None = None,
    ood_quantile: float | None = None,
    obsm_key: str = "X_scatlas",
    key_added: str = "scatlas",
) -> pd.DataFrame:
    """Annotate ``adata``'s cells from the labels of their nearest reference cells; in place.

    ``index``: a :class:`~scatlas.search.CellIndex` (or a saved index folder) whose metadata holds
    ``label_key``; ``model``: a metric encoder (or its folder) to embed ``adata``'s raw counts, or
    None to use ``adata.obsm[obsm_key]``. Writes ``obs[f"{key_added}_label"]`` (categorical),
    ``_confidence``, ``_vs_second``, ``_min_dist``, ``_is_ood`` (and ``_hits`` as JSON text when
    the annotation reports vote counts), the embeddings to ``obsm[obsm_key]`` when a model ran,
    and the settings to ``uns[key_added]``, including the out-of-distribution rule actually
    applied: ``ood_distance`` (the threshold; NaN when none), ``ood_source`` (``"given"``,
    ``"calibration"``, ``"index"`` or ``"none"``), ``ood_quantile`` (NaN when given) and
    ``ood_rule`` (a sentence). ``ood_distance`` / ``ood_quantile``: as in
    :func:`~scatlas.search.annotate`. Returns the annotation table (indexed by ``obs_names``).
    """
    from . import CellIndex, annotate

    if isinstance(index, str | os.PathLike):
        index = CellIndex.load(index)
    emb = query_embeddings(adata, model, obsm_key=obsm_key)
    if emb.shape[1] != index.dim:
        raise ScatlasInputError(f"the query embeddings have dimension {emb.shape[1]} but the "
                                f"index holds {index.dim}-dimensional vectors")
    kwargs: dict[str, Any] = {"k": k, "label_key": label_key, "weighting": weighting}
    if ood_distance is not None:
        kwargs["ood_distance"] = ood_distance
    if ood_quantile is not None:
        kwargs["ood_quantile"] = ood_quantile
    result = annotate(index, emb, **kwargs)
    rule = dict(getattr(result, "attrs", {}) or {})
    table = pd.DataFrame(result)
    table.index = adata.obs_names
    for field in OBS_FIELDS:
        if field not in table.columns:
            continue
        values = table[field]
        if field == "label":
            values = pd.Categorical(values.astype(str).where(values.notna(), None))
        adata.obs[f"{key_added}_{field}"] = values
    if "hits" in table.columns:
        adata.obs[f"{key_added}_hits"] = [
            h if isinstance(h, str) else json.dumps(_plain(h)) for h in table["hits"]
        ]
    adata.uns[key_added] = {
        "label_key": label_key,
        "k": int(k),
        "weighting": weighting,
        # the threshold actually applied (h5ad cannot store None: NaN when there is none)
        "ood_distance": _float_or_nan(rule.get("ood_distance", ood_distance)),
        "ood_source": str(rule.get("ood_source", "given" if ood_distance is not None
                                   else "unknown")),
        "ood_quantile": _float_or_nan(rule.get("ood_quantile", ood_quantile)),
        "ood_rule": str(rule.get("ood_rule", "")),
        "obsm_key": obsm_key,
        "index_ntotal": int(index.ntotal),
        "index_metric": str(getattr(index, "metric", "")),
        "index_engine": str(getattr(index, "engine", "")),
    }
    return table


def _float_or_nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
