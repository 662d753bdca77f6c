"""Queries on a :class:`~scatlas.search.CellIndex`: label transfer, centroid search, aggregation.

- :func:`annotate`: k-NN vote per query cell as SCimilarity's ``CellAnnotation
  .get_predictions_knn`` (Heimberg et al. 2024; ../shared/reference/scimilarity.md 4): weights
  ``1 / max(distance, 1e-6)`` (``weighting="distance"``) or 1 (``"uniform"``); the winner, its
  weighted vote share (``confidence``), ``vs_second`` = best / (best + second) (SCimilarity's
  ``vs2nd``), the nearest distance ``min_dist``, an out-of-distribution flag ``min_dist >
  ood_distance`` (default: :meth:`CellIndex.ood_threshold`, the 0.99 quantile of held-out
  calibration cells' ``min_dist`` after :meth:`CellIndex.calibrate_ood`, else of the index's own
  1-NN distances; docs/search.md explains and measures the difference) and the per-label hit
  counts.
- :func:`search_centroid`: search with the mean of a group of embeddings (renormalised for
  cosine), as SCimilarity's ``search_centroid_nearest`` does with an embedded pseudobulk.
- :func:`aggregate_hits`: hit counts per metadata group (study, tissue, disease ...), with the
  fraction of hits and of the group's cells in the index (``compile_sample_metadata``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .. import backend
from .._validate import ScatlasInputError, check_positive_int
from .index import _refuse_zero_rows

__all__ = ["aggregate_hits", "annotate", "search_centroid"]

_MIN_DIST = 1e-6
_VOTE_ROWS = 4096


def _label_codes(idx: Any, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Per id: the label code (-1 for missing labels / removed cells) and the label names."""
    meta = idx.all_metadata
    if label_key not in meta.columns:
        raise ScatlasInputError(f"label_key {label_key!r} is not a metadata column "
                                f"(columns {list(meta.columns)})")
    cat = pd.Categorical(meta[label_key])
    codes = np.full(idx.next_id, -1, dtype=np.int64)
    codes[meta.index.to_numpy()] = cat.codes
    codes[~idx.alive] = -1
    return codes, np.asarray(cat.categories, dtype=object)


def annotate(idx: Any, queries: Any, k: int = 50, *, label_key: str,
             weighting: str = "distance", ood_distance: float | None = None,
             ood_quantile: float | None = None, filter: Any = None,
             nprobe: int | None = None) -> pd.DataFrame:
    """Label each query cell by a (distance-weighted) vote of its k nearest indexed cells.

    Parameters
    ----------
    idx
        A :class:`~scatlas.search.CellIndex` whose metadata holds ``label_key``.
    queries
        (m, d) float embeddings (NumPy or CuPy), in the index's embedding space.
    k, label_key, weighting, filter, nprobe
        Neighbours voting, the metadata column of labels, ``"distance"`` or ``"uniform"``
        weights, and the search's filter / nprobe (:meth:`CellIndex.search`).
    ood_distance
        Flag a query when its ``min_dist`` exceeds this. None (default): the index's rule,
        :meth:`CellIndex.ood_threshold` at level ``ood_quantile`` (default 0.99): a quantile of
        held-out calibration cells' ``min_dist`` when the index was calibrated
        (:meth:`CellIndex.calibrate_ood`), else of the index's own 1-NN distances.

    Returns
    -------
    pandas.DataFrame
        One row per query: ``label`` (object, None when no neighbour has a label),
        ``confidence`` (float64, weighted vote share of the winner), ``vs_second``,
        ``min_dist`` (float64, distance to the nearest hit), ``is_ood`` (bool) and ``hits``
        (dict label -> neighbour count). Ties between labels go to the label whose best
        neighbour is nearest. ``.attrs`` records the flag's rule: ``ood_distance`` (the
        threshold applied, None when none), ``ood_source`` (``"given"``, ``"calibration"``,
        ``"index"`` or ``"none"``), ``ood_quantile`` and ``ood_rule`` (a sentence).
    """
    if weighting not in ("distance", "uniform"):
        raise ScatlasInputError(f"weighting must be 'distance' or 'uniform', got {weighting!r}")
    k = check_positive_int(k, "k")
    if ood_distance is not None:
        ood_distance = float(ood_distance)
        if not np.isfinite(ood_distance):  # negative is fine: "ip" distances are -q.x
            raise ScatlasInputError(f"ood_distance must be a finite number, got {ood_distance!r}")
        if ood_quantile is not None:
            raise ScatlasInputError("give ood_distance or ood_quantile, not both (ood_distance is "
                                    "the threshold itself)")
        source, rule = "given", f"min_dist > {ood_distance:.6g} (given)"
    else:
        ood_distance, source, rule = idx.ood_threshold(ood_quantile)
    codes, names = _label_codes(idx, label_key)
    D, ids = idx.search(queries, k, filter=filter, nprobe=nprobe)
    D, ids = backend.to_host(D), backend.to_host(ids)
    m, L = D.shape[0], len(names)
    lab = np.where(ids >= 0, codes[np.maximum(ids, 0)], -1)
    valid = lab >= 0
    if weighting == "distance":
        w = 1.0 / np.maximum(D, _MIN_DIST)
    else:
        w = np.ones_like(D)
    w = np.where(valid, w, 0.0)
    out_label = np.empty(m, dtype=object)
    conf = np.full(m, np.nan)
    vs2 = np.full(m, np.nan)
    hits: list[dict[str, int]] = []
    for s in range(0, m, _VOTE_ROWS):
        e = min(m, s + _VOTE_ROWS)
        rows = np.repeat(np.arange(e - s), k)
        votes = np.zeros((e - s, max(L, 1)))
        counts = np.zeros((e - s, max(L, 1)), dtype=np.int64)
        first = np.full((e - s, max(L, 1)), k, dtype=np.int64)  # rank of each label's best hit
        lb, vb = lab[s:e].ravel(), valid[s:e].ravel()
        rr, ll = rows[vb], lb[vb]
        np.add.at(votes, (rr, ll), w[s:e].ravel()[vb])
        np.add.at(counts, (rr, ll), 1)
        ranks = np.tile(np.arange(k), e - s)[vb]
        np.minimum.at(first, (rr, ll), ranks)
        # winner: largest vote, then the nearest best hit
        order = np.lexsort((first, -votes), axis=1)
        best, second = order[:, 0], order[:, 1] if L > 1 else None
        r = np.arange(e - s)
        vb_best = votes[r, best]
        total = votes.sum(axis=1)
        has = total > 0
        out_label[s:e] = np.where(has, names[best] if L else None, None)
        conf[s:e] = np.where(has, vb_best / np.where(has, total, 1), np.nan)
        v2 = votes[r, second] if second is not None else np.zeros(e - s)
        vs2[s:e] = np.where(has, vb_best / np.where(has, vb_best + v2, 1), np.nan)
        for i in range(e - s):
            nz = np.flatnonzero(counts[i])
            hits.append({str(names[j]): int(counts[i, j]) for j in nz})
    min_dist = D[:, 0].astype(np.float64)
    is_ood = (min_dist > ood_distance) if ood_distance is not None else np.zeros(m, bool)
    out = pd.DataFrame({"label": out_label, "confidence": conf, "vs_second": vs2,
                        "min_dist": min_dist, "is_ood": is_ood, "hits": hits})
    out.attrs.update({"ood_distance": ood_distance, "ood_source": source,
                      "ood_quantile": (None if source == "given" else
                                       0.99 if ood_quantile is None else float(ood_quantile)),
                      "ood_rule": rule})
    return out


def search_centroid(idx: Any, embeddings: Any, k: int = 100, *, filter: Any = None,
                    nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search with the centroid of ``embeddings`` (n, d): their mean, renormalised to unit
    length for the cosine metric.

    Returns ``(centroid (d,) float32, distances (k,) float32, ids (k,) int64)``.
    """
    X = idx._check_queries(embeddings)
    X = np.asarray(backend.to_host(X), dtype=np.float64)
    if not np.isfinite(X).all():
        raise ScatlasInputError("embeddings contain NaN or infinite values")
    if idx.metric == "cosine":  # mean direction of the unit rows
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        _refuse_zero_rows(norms[:, 0], "embeddings", 0)
        X = X / norms
    c = X.mean(axis=0)
    if idx.metric == "cosine":
        nrm = np.linalg.norm(c)
        c = c / nrm if nrm > 0 else c
    c = c.astype(np.float32)
    D, ids = idx.search(c[None], k, filter=filter, nprobe=nprobe)
    return c, D[0], ids[0]


def aggregate_hits(idx: Any, ids: Any, by: Sequence[str] | str = ("study",)) -> pd.DataFrame:
    """Count hits per metadata group.

    ``ids``: any array of ids (-1 padding ignored; duplicates count once per occurrence).
    Returns one row per group with ``n_hits``, ``fraction_of_hits`` (of all hits),
    ``n_cells`` (live cells of that group in the index) and ``fraction_of_group``
    (n_hits / n_cells), sorted by ``n_hits`` descending.
    """
    by = [by] if isinstance(by, str) else list(by)
    if not by:
        raise ScatlasInputError("by must name at least one metadata column")
    meta = idx.metadata
    missing = [c for c in by if c not in meta.columns]
    if missing:
        raise ScatlasInputError(f"by columns {missing} are not in the metadata "
                                f"(columns {list(meta.columns)})")
    arr = np.asarray(backend.to_host(ids), dtype=np.int64).ravel()
    arr = arr[arr >= 0]
    live = meta.index.to_numpy()
    arr = arr[np.isin(arr, live)]
    hits = meta.loc[arr, by]
    counts = hits.groupby(by, observed=True, dropna=False).size().rename("n_hits")
    sizes = meta.groupby(by, observed=True, dropna=False).size().rename("n_cells")
    out = pd.concat([counts, sizes], axis=1, join="inner").reset_index()
    out["fraction_of_hits"] = out["n_hits"] / max(int(arr.size), 1)
    out["fraction_of_group"] = out["n_hits"] / out["n_cells"]
    out = out.sort_values(["n_hits", *by], ascending=[False] + [True] * len(by), kind="stable")
    return out[[*by, "n_hits", "fraction_of_hits", "n_cells",
                "fraction_of_group"]].reset_index(drop=True)
