"""Modalities of a multimodal VAE: where they live, validation, missing cells, mini-batches.

A modality is declared by a *location* in the data:

- AnnData: ``"X"``, ``"layers/NAME"``, ``"obsm/NAME"`` (an array or a DataFrame whose columns
  name the features);
- MuData (``mudata`` installed): ``"MOD"`` (``mdata.mod[MOD].X``), ``"MOD/X"``,
  ``"MOD/layers/NAME"``, ``"MOD/obsm/NAME"``; rows are matched to ``mdata.obs_names``, and cells
  absent from a modality's AnnData count as missing that modality (mosaic data);
- an array, scipy.sparse matrix or DataFrame of shape (n_cells, n_features) given directly.

A cell *misses* a modality when its row is all-NaN or sums to zero (MultiVI's convention for
zero-filled unpaired cells), or when a user mask says so. Missing rows are zero-filled; the model
masks them out of the product of experts and of the likelihood.

:class:`MultiModalBatches` is the training stream: :class:`~scatlas.models.data.CellBatches`'
deterministic, indexable, prefetched batches, with ``take`` returning every modality. Batch
entries: ``x0, x1, ...`` float32 (B, F_m) counts (0/1 for Bernoulli modalities), ``m0, m1, ...``
float32 (B,) observed masks, ``cov`` int32 (B,) batch-covariate codes (0 without one), ``index``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import backend
from .._validate import ScatlasInputError, check_positive_int
from .data import CellBatches, digest, lognorm
from .inputs import check_integer_counts
from .mvae_likelihoods import LIKELIHOODS

#: default likelihood by modality name (case-insensitive)
DEFAULT_LIKELIHOODS: dict[str, str] = {
    **dict.fromkeys(("rna", "gex", "gene", "genes", "expression", "mrna"), "nb"),
    **dict.fromkeys(("protein", "proteins", "adt", "prot", "cite"), "nb"),
    **dict.fromkeys(("atac", "peaks", "chromatin", "accessibility", "dna"), "bernoulli"),
}
COUNT_LIKELIHOODS = ("nb", "nb_mixture", "log1p_normal")


@dataclass
class Modality:
    """One modality's data for ``n_cells`` cells.

    ``matrix``: (n_cells, n_features) float32 CSR or dense, missing rows zero-filled (0/1 for a
    Bernoulli modality); ``observed``: bool (n_cells,); ``features``: feature names.
    """

    name: str
    location: str
    likelihood: str
    matrix: Any
    observed: np.ndarray
    features: pd.Index

    @property
    def n_features(self) -> int:
        return int(self.matrix.shape[1])


# ---------------------------------------------------------------------------------- likelihoods

def resolve_likelihoods(
    names: Sequence[str], likelihoods: Mapping[str, str] | None
) -> dict[str, str]:
    """A likelihood for every modality: given ones, else the default for its name."""
    likelihoods = dict(likelihoods or {})
    unknown = set(likelihoods) - set(names)
    if unknown:
        raise ScatlasInputError(
            f"likelihoods given for unknown modalities {sorted(unknown)}; modalities: {list(names)}"
        )
    out = {}
    for name in names:
        lik = likelihoods.get(name, DEFAULT_LIKELIHOODS.get(name.lower()))
        if lik is None:
            raise ScatlasInputError(
                f"no default likelihood for modality {name!r}; pass likelihoods= giving it one "
                f"of {LIKELIHOODS}", param="likelihoods"
            )
        if lik not in LIKELIHOODS:
            raise ScatlasInputError(
                f"likelihood {lik!r} of modality {name!r} is not one of {LIKELIHOODS}"
            )
        out[name] = lik
    return out


# ------------------------------------------------------------------------------------ locations

def _is_mudata(data: Any) -> bool:
    return hasattr(data, "mod") and hasattr(data, "obs_names") and isinstance(data.mod, Mapping)


def _n_cells(data: Any) -> int:
    if hasattr(data, "n_obs"):
        return int(data.n_obs)
    raise ScatlasInputError(f"expected an AnnData or MuData, got {type(data).__name__}")


def _from_anndata(adata: Any, parts: list[str], location: str) -> tuple[Any, pd.Index | None]:
    if parts == ["X"]:
        if adata.X is None:
            raise ScatlasInputError(f"location {location!r}: X is empty")
        return adata.X, pd.Index(adata.var_names.astype(str))
    if len(parts) == 2 and parts[0] == "layers":
        if parts[1] not in adata.layers:
            raise ScatlasInputError(
                f"location {location!r}: no layer {parts[1]!r} (layers: {list(adata.layers)})"
            )
        return adata.layers[parts[1]], pd.Index(adata.var_names.astype(str))
    if len(parts) == 2 and parts[0] == "obsm":
        if parts[1] not in adata.obsm:
            raise ScatlasInputError(
                f"location {location!r}: no obsm key {parts[1]!r} (obsm: {list(adata.obsm)})"
            )
        value = adata.obsm[parts[1]]
        if isinstance(value, pd.DataFrame):
            return value, pd.Index(value.columns.astype(str))
        return value, None
    raise ScatlasInputError(
        f"location {location!r} is not 'X', 'layers/NAME' or 'obsm/NAME'"
    )


def locate(data: Any, name: str, location: Any) -> tuple[Any, pd.Index | None, np.ndarray | None]:
    """``(matrix, feature names or None, row map or None)`` of one modality's location.

    The row map (int64, -1: absent) takes the located matrix's rows to the cells of ``data``
    (MuData modalities whose cells differ from the MuData's); None: rows are the cells.
    """
    if not isinstance(location, str):
        value = location
        names = pd.Index(value.columns.astype(str)) if isinstance(value, pd.DataFrame) else None
        return value, names, None
    parts = location.strip("/").split("/")
    if _is_mudata(data):
        mod = parts[0]
        if mod not in data.mod:
            raise ScatlasInputError(
                f"location {location!r} of modality {name!r}: no modality {mod!r} in the MuData "
                f"(mod: {list(data.mod)})"
            )
        sub = data.mod[mod]
        matrix, names = _from_anndata(sub, parts[1:] or ["X"], location)
        rows = pd.Index(sub.obs_names).get_indexer(pd.Index(data.obs_names))
        if np.array_equal(rows, np.arange(sub.n_obs)) and sub.n_obs == data.n_obs:
            rows = None
        return matrix, names, rows
    return (*_from_anndata(data, parts, location), None)


def _dense_or_csr(X: Any, location: str) -> Any:
    if isinstance(X, pd.DataFrame):
        try:
            X = X.to_numpy(dtype=np.float32, na_value=np.nan)
        except (TypeError, ValueError) as err:
            raise ScatlasInputError(f"{location}: not numeric ({err})") from None
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32)
    if hasattr(X, "to_memory"):  # backed sparse dataset
        return sp.csr_matrix(X.to_memory(), dtype=np.float32)
    try:
        X = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ScatlasInputError(f"{location}: not a numeric matrix ({err})") from None
    if X.ndim != 2:
        raise ScatlasInputError(
            f"{location}: expected a 2-D cells x features matrix, got shape {X.shape}"
        )
    return X


def _missing_rows(X: Any, location: str) -> np.ndarray:
    """Rows to treat as missing (all-NaN or all-zero); raises on partial NaN / infinities."""
    if sp.issparse(X):
        bad = ~np.isfinite(X.data)
        if bad.any():
            raise ScatlasInputError(
                f"{location} has {int(bad.sum())} NaN/inf value(s) in a sparse matrix; mark a "
                "missing modality with an all-zero row (or a mask) instead"
            )
        return np.asarray(X.sum(axis=1)).ravel() == 0
    if np.isinf(X).any():
        raise ScatlasInputError(f"{location} has infinite values")
    nan = np.isnan(X)
    all_nan = nan.all(axis=1) if X.shape[1] else np.zeros(X.shape[0], bool)
    partial = nan.any(axis=1) & ~all_nan
    if partial.any():
        raise ScatlasInputError(
            f"{location} has {int(partial.sum())} cell(s) with some NaN values (e.g. row "
            f"{int(np.flatnonzero(partial)[0])}); a missing modality must be a whole NaN or "
            "all-zero row"
        )
    if all_nan.any():
        X[all_nan] = 0
    return all_nan | (X.sum(axis=1) == 0)


def _check_values(X: Any, location: str, likelihood: str) -> None:
    values = X.data if sp.issparse(X) else X.ravel()
    if values.size and values.min() < 0:
        raise ScatlasInputError(
            f"{location} has negative values (min {values.min():g}): scaled or z-scored data? "
            f"The {likelihood!r} likelihood needs the raw, non-negative counts: point the "
            "modality at them", param="modalities"
        )
    if likelihood in COUNT_LIKELIHOODS:
        check_integer_counts(values, location, f"the {likelihood!r} likelihood models raw "
                             "counts, not normalised values")


def read_modality(
    data: Any,
    name: str,
    location: Any,
    likelihood: str,
    *,
    features: Sequence[str] | None = None,
    mask: Any = None,
    min_overlap: float = 0.5,
) -> Modality:
    """Read, validate and (with ``features``, a trained model's) align one modality.

    ``mask``: optional bool (n_cells,) array or ``obs`` column; False marks the modality missing.
    """
    from ..io import align_matrix, gene_positions

    n = _n_cells(data)
    where = location if isinstance(location, str) else f"modality {name!r}"
    X, names, rows = locate(data, name, location)
    X = backend.to_host(X)  # a GPU AnnData's modality: read on the host, JAX places batches
    n_rows = X.shape[0] if hasattr(X, "shape") else len(X)
    if rows is None and n_rows != n:
        raise ScatlasInputError(
            f"modality {name!r} ({where}) has {n_rows} cells but the data have {n}; every "
            "modality needs one row per cell (use NaN / zero rows for missing cells)"
        )
    X = _dense_or_csr(X, where)
    if X.shape[1] == 0:
        raise ScatlasInputError(f"modality {name!r} ({where}) has no features")
    missing = _missing_rows(X, where)
    _check_values(X, where, likelihood)
    if rows is not None:
        present = rows >= 0
        safe = np.where(present, rows, 0)
        X = _zero_rows(X[safe], ~present)
        missing = np.where(present, missing[safe], True)
    if features is not None:
        features = pd.Index([str(f) for f in features])
        if names is None:
            if X.shape[1] != len(features):
                raise ScatlasInputError(
                    f"modality {name!r} ({where}) has {X.shape[1]} unnamed features; the model "
                    f"was trained on {len(features)}"
                )
        elif not names.equals(features):
            positions, _ = gene_positions(names, features, min_overlap=min_overlap)
            X = align_matrix(X, positions)
            if sp.issparse(X):
                X = sp.csr_matrix(X, dtype=np.float32)
            missing = missing | (np.asarray(X.sum(axis=1)).ravel() == 0)
        names = features
    elif names is None:
        names = pd.Index([f"{name}{i}" for i in range(X.shape[1])])
    if likelihood == "bernoulli":
        X = (X > 0).astype(np.float32)
        X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    observed = ~missing
    if mask is not None:
        observed &= _mask(data, mask, n, name)
        X = _zero_rows(X, ~observed)
    return Modality(name, where, likelihood, X, observed, names)


def _mask(data: Any, mask: Any, n: int, name: str) -> np.ndarray:
    if isinstance(mask, str):
        if mask not in data.obs:
            raise ScatlasInputError(f"mask of modality {name!r}: no obs column {mask!r}")
        mask = data.obs[mask].to_numpy()
    mask = np.asarray(mask)
    if mask.shape != (n,):
        raise ScatlasInputError(f"mask of modality {name!r} has shape {mask.shape}, need ({n},)")
    return mask.astype(bool)


def _zero_rows(X: Any, rows: np.ndarray) -> Any:
    if not rows.any():
        return X
    if sp.issparse(X):
        return sp.csr_matrix(sp.diags((~rows).astype(np.float32)) @ X)
    X = np.array(X, dtype=np.float32)
    X[rows] = 0
    return X


def read_modalities(
    data: Any,
    modalities: Mapping[str, Any],
    likelihoods: Mapping[str, str],
    *,
    features: Mapping[str, Sequence[str]] | None = None,
    masks: Mapping[str, Any] | None = None,
    min_overlap: float = 0.5,
) -> list[Modality]:
    """Read every modality (:func:`read_modality`); refuse cells with none of them observed."""
    if not modalities:
        raise ScatlasInputError("no modalities given")
    masks = dict(masks or {})
    unknown = set(masks) - set(modalities)
    if unknown:
        raise ScatlasInputError(f"masks for unknown modalities {sorted(unknown)}")
    mods = [
        read_modality(data, name, loc, likelihoods[name],
                      features=None if features is None else features[name],
                      mask=masks.get(name), min_overlap=min_overlap)
        for name, loc in modalities.items()
    ]
    observed = np.stack([m.observed for m in mods])
    none = ~observed.any(axis=0)
    if none.any():
        names = getattr(data, "obs_names", None)
        first = np.flatnonzero(none)[:5]
        examples = list(np.asarray(names)[first]) if names is not None else first.tolist()
        which = ", ".join(m.name for m in mods)
        raise ScatlasInputError(
            f"{int(none.sum())} cell(s) have every modality missing ({which}), e.g. {examples}; "
            "drop them (a cell needs at least one observed modality)"
        )
    return mods


# --------------------------------------------------------------------------- feature selection

def highly_variable(X: Any, rows: np.ndarray, n_top: int, n_bins: int = 20) -> np.ndarray:
    """Indices (sorted) of the ``n_top`` most variable features of count matrix ``X`` on ``rows``.

    scanpy's ``flavor="seurat"`` (Satija et al. 2015): per feature the mean and the dispersion
    (variance / mean) of counts normalised to 1e4 per cell, log dispersion z-scored within
    ``n_bins`` bins of log mean; the top ``n_top`` z-scores win (zero-mean features never).
    """
    n_top = check_positive_int(n_top, "n_top_genes")
    if n_top >= X.shape[1]:
        return np.arange(X.shape[1])
    Y = lognorm(X[rows]) if not sp.issparse(X) else None
    if Y is None:
        Y = X[rows].astype(np.float32)
        totals = np.asarray(Y.sum(axis=1)).ravel()
        Y = sp.diags(np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)) @ Y
        mean = np.asarray(Y.mean(axis=0)).ravel().astype(np.float64)
        sq = np.asarray(Y.multiply(Y).mean(axis=0)).ravel().astype(np.float64)
    else:
        Y = np.expm1(Y, dtype=np.float64)
        mean, sq = Y.mean(axis=0), (Y**2).mean(axis=0)
    m = len(rows)
    var = np.maximum(sq - mean**2, 0) * m / max(m - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.log(var / mean)
        logmean = np.log1p(mean)
    disp[~np.isfinite(disp)] = np.nan
    bins = pd.cut(logmean, bins=n_bins)
    frame = pd.DataFrame({"disp": disp, "bin": bins})
    stats = frame.groupby("bin", observed=False)["disp"].agg(["mean", "std"])
    mu = stats["mean"].reindex(bins).to_numpy()
    sd = stats["std"].reindex(bins).to_numpy()
    z = (disp - mu) / sd
    single = ~np.isfinite(sd)  # a bin of one feature: scanpy sets its z-score to 1
    z[single & np.isfinite(disp)] = 1.0
    z[(mean <= 0) | ~np.isfinite(z)] = -np.inf
    return np.sort(np.argsort(-z, kind="stable")[:n_top])


# ------------------------------------------------------------------------------------ batches

def batch_codes(
    data: Any, key: str | None, categories: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """int32 codes of ``obs[key]`` (against ``categories`` when given) and the category names."""
    n = _n_cells(data)
    if key is None:
        return np.zeros(n, np.int32), []
    if key not in data.obs:
        raise ScatlasInputError(f"batch_key {key!r} is not an obs column (obs: {list(data.obs)})")
    values = data.obs[key]
    if values.isna().any():
        raise ScatlasInputError(f"batch_key {key!r} has {int(values.isna().sum())} missing values")
    values = values.astype(str)
    if categories is None:
        cat = pd.Categorical(values)
        return cat.codes.astype(np.int32), [str(c) for c in cat.categories]
    codes = pd.Index(list(categories)).get_indexer(values)
    if (codes < 0).any():
        unseen = sorted(set(values[codes < 0]))[:5]
        raise ScatlasInputError(
            f"batch(es) {unseen} of {key!r} were not seen in training (known: {list(categories)})"
        )
    return codes.astype(np.int32), list(categories)


def modality_arrays(mods: Sequence[Modality], index: np.ndarray) -> dict[str, np.ndarray]:
    """``x{i}`` (dense float32) and ``m{i}`` (float32 0/1) entries of the cells ``index``."""
    index = np.asarray(index, dtype=np.int64)
    order = np.argsort(index, kind="stable")
    out: dict[str, np.ndarray] = {}
    for i, mod in enumerate(mods):
        block = mod.matrix[index[order]]
        x = np.empty((index.size, mod.n_features), dtype=np.float32)
        x[order] = block.toarray() if sp.issparse(block) else block
        out[f"x{i}"] = x
        out[f"m{i}"] = mod.observed[index].astype(np.float32)
    return out


class MultiModalBatches(CellBatches):
    """:class:`~scatlas.models.data.CellBatches` over several modalities of the same cells.

    Uniform sampling (no label balancing) of ``rows``; batch ``t`` is a pure function of
    ``(seed, t)``; ``iterate`` / ``sequential`` come from the parent class.
    """

    def __init__(
        self,
        mods: Sequence[Modality],
        covariate: np.ndarray | None = None,
        *,
        batch_size: int = 256,
        rows: np.ndarray | None = None,
        seed: int = 0,
    ):
        super().__init__(mods[0].matrix, batch_size=batch_size, balance=None, transform="none",
                         rows=rows, seed=seed)
        self.mods = list(mods)
        n = self.source.n_obs
        self.covariate = (np.zeros(n, np.int32) if covariate is None
                          else np.asarray(covariate, dtype=np.int32))

    def settings(self) -> dict[str, Any]:
        """The parent's, plus each modality's name, likelihood and width, which cells it
        observes, and the covariate (digests)."""
        observed = [np.asarray(m.observed, bool) for m in self.mods]
        return {**super().settings(),
                "cells_observed_covariate": digest(self.covariate, *observed),
                "modalities": tuple(f"{m.name}:{m.likelihood}:{m.n_features}" for m in self.mods)}

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        index = np.asarray(index, dtype=np.int64)
        return {**modality_arrays(self.mods, index), "cov": self.covariate[index],
                "index": index}
