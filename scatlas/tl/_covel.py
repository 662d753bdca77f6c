"""Train CoVEL on modalities measured in different (or the same) cells: ``train_covel``."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._validate import check_counts, check_positive_int, config_overrides
from ..exceptions import ScatlasInputError
from ._training import OWN_TRAIN_ARGS, merged_model_settings

log = logging.getLogger(__name__)

#: modality names read as 0/1 accessibility (Bernoulli); every other one is counts (NB)
BERNOULLI_NAMES = ("atac", "peaks", "chromatin", "accessibility", "dna")
DEFAULT_N_TOP_GENES = 2000


def _modalities(data: Any) -> tuple[dict[str, Any], bool]:
    """``({name: AnnData}, from_mudata)``."""
    from anndata import AnnData

    if hasattr(data, "mod") and not isinstance(data, AnnData):
        return dict(data.mod), True
    if not isinstance(data, Mapping):
        raise ScatlasInputError(
            f"expected {{name: AnnData}} or a MuData, got {type(data).__name__}", param="data")
    mods = dict(data)
    for name, a in mods.items():
        if not isinstance(a, AnnData):
            raise ScatlasInputError(f"modality {name!r} is a {type(a).__name__}, not an AnnData",
                                    param="data")
    return mods, False


def _counts(adata: Any, name: str) -> Any:
    X = adata.X
    if X is None:
        raise ScatlasInputError(f"modality {name!r} has no X (counts)", param="data")
    X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, np.float32)
    if X.shape[0] < 2 or X.shape[1] < 1:
        raise ScatlasInputError(f"modality {name!r} has shape {X.shape}; need cells and features",
                                param="data")
    check_counts(X, f"modality {name!r}")
    return X


def _pair(mods: dict[str, Any], mats: dict[str, Any]) -> None:
    """Reorder every modality's rows to the first's cell names; raise if the names differ."""
    names = list(mods)
    ref = pd.Index(mods[names[0]].obs_names.astype(str))
    if not ref.is_unique:
        raise ScatlasInputError(f"modality {names[0]!r} has duplicate cell names; paired data "
                                "needs unique obs_names", param="paired")
    for m in names[1:]:
        other = pd.Index(mods[m].obs_names.astype(str))
        missing = ref.difference(other)
        extra = other.difference(ref)
        if len(missing) or len(extra) or len(other) != len(ref):
            raise ScatlasInputError(
                f"paired=True but the cell names of {m!r} do not match those of {names[0]!r}: "
                f"{len(missing)} of {names[0]!r}'s cells are missing from {m!r} (e.g. "
                f"{list(missing[:3])}) and {len(extra)} are extra (e.g. {list(extra[:3])}); pass "
                "the same cells in every modality, or paired=False", param="paired")
        mats[m] = mats[m][other.get_indexer(ref)]


def _select(X: Any, keep_linked: np.ndarray, n_top: int | None) -> np.ndarray:
    """Column mask: the ``n_top`` most variable features plus every graph-linked one."""
    from ..models.mvae_data import highly_variable

    if n_top is None or X.shape[1] <= n_top:
        return np.ones(X.shape[1], bool)
    mask = np.zeros(X.shape[1], bool)
    mask[highly_variable(X, np.arange(X.shape[0]), n_top)] = True
    return mask | keep_linked


def _devices(data_parallel: bool) -> int:
    """Devices the data-parallel step splits each batch over (1 without data parallelism)."""
    import jax

    return jax.device_count() if data_parallel else 1


def train_covel(
    data: Mapping[str, Any] | Any,
    graph: Any,
    *,
    paired: bool = False,
    seed: int = 0,
    likelihoods: Mapping[str, str] | None = None,
    n_top_genes: int | None = DEFAULT_N_TOP_GENES,
    batch_size: int = 128,
    max_steps: int | None = None,
    learning_rate: float = 2e-3,
    weight_decay: float = 0.0,
    checkpoint_dir: str | Path | None = None,
    log_path: str | Path | None = None,
    progress: bool | None = None,
    data_parallel: bool = True,
    train: Any = None,
    model: Any = None,
    **model_kw: Any,
):
    """Train CoVEL (Tang et al., AAAI 2024) on two or more modalities.

    Parameters
    ----------
    data
        ``{"rna": adata_rna, "protein": adata_prot, ...}``: one AnnData of raw counts (``X``)
        per modality, features in ``var_names``; or a MuData (its ``.mod``).
    graph
        A :class:`scatlas.graphs.FeatureGraph` or a DataFrame of links (``source``, ``target``,
        optional ``weight``, ``sign``, ``source_type``, ``target_type``) between the features.
    paired
        True: the modalities hold the same cells (matched by ``obs_names``, or a MuData); adds
        the paired InfoNCE term. False (default): different cells, pairing unknown.
    seed
        Parameters, dropout, noise and batches derive from it.
    likelihoods
        ``{name: "nb" | "bernoulli"}``; default by name (atac/peaks/chromatin: Bernoulli, on
        ``x > 0``; otherwise NB on counts).
    n_top_genes
        Count modalities wider than this keep their most variable features (scanpy's
        ``seurat`` flavour) plus every feature the graph links to another modality; None: all.
    batch_size, max_steps
        Cells per modality per step (default 128, capped at the smallest modality) and steps
        (default about 200 passes over the largest modality, 500..20,000).
    learning_rate, weight_decay
        AdamW with a cosine schedule (GLUE: 2e-3).
    train
        Further :class:`~scatlas.models.train.TrainConfig` settings (a ``TrainConfig`` or a
        mapping: ``schedule``, ``warmup_steps``, ``clip_norm``, ``checkpoint_every``, ...), as
        :func:`scatlas.tl.train_metric`'s; a setting this function takes itself is refused.
    model, **model_kw
        :class:`scatlas.models.covel.CoVELConfig` fields (a config, a mapping or keywords; not
        the same field twice): views ``graph_view``, ``fine_grained``,
        ``contrastive``, ``align`` (True; ``fine_grained`` False: it costs about 4x the CPU time
        of a step), sizes and loss weights.

    Returns
    -------
    :class:`scatlas.models.CoVEL` (``info``, ``history``); embed with
    ``model.embed(adata, modality=...)`` (``obsm["X_covel"]``), impute with
    ``model.impute(adata, source=..., target=...)``.

    Raises
    ------
    ScatlasInputError
        Fewer than two modalities; negative or non-finite counts; ``paired=True`` with cell
        names that do not match; a graph that names no feature of a modality, or a modality with
        no feature linked to another one.
    """
    from ..graphs import as_graph
    from ..models.covel import CoVEL, CoVELConfig
    from ..models.data import n_devices
    from ..models.train import TrainConfig

    mods, from_mudata = _modalities(data)
    if len(mods) < 2:
        raise ScatlasInputError(f"need at least two modalities, got {list(mods)}", param="data")
    g = as_graph(graph)
    mats = {m: _counts(a, m) for m, a in mods.items()}
    if paired:
        _pair(mods, mats)
    liks = {m: (likelihoods or {}).get(m) or
            ("bernoulli" if m.lower() in BERNOULLI_NAMES else "nb") for m in mods}
    feats = {m: pd.Index(a.var_names.astype(str)) for m, a in mods.items()}
    for m, f in feats.items():
        if not f.is_unique:
            raise ScatlasInputError(f"modality {m!r} has duplicate feature names; make them "
                                    "unique (var_names_make_unique)", param="data")
    full = g.resolve(feats)
    linked = {}
    for m in mods:
        a, b = full.offsets[m]
        is_cross = np.zeros(full.n_vertices, bool)
        own = (full.src >= a) & (full.src < b)
        other = (full.tgt < a) | (full.tgt >= b)
        is_cross[full.src[own & other]] = True
        linked[m] = is_cross[a:b]
    if n_top_genes is not None:
        n_top_genes = check_positive_int(n_top_genes, "n_top_genes")
    for m in mods:
        if liks[m] == "nb":
            keep = _select(mats[m], linked[m], n_top_genes)
            mats[m], feats[m] = mats[m][:, keep], feats[m][keep]
    res = g.resolve(feats, warn_unknown=False)
    graph_arrays = {"src": res.src, "tgt": res.tgt, "weight": res.weight, "sign": res.sign,
                    "norm": res.keepvar_norm()}
    n_min = min(M.shape[0] for M in mats.values())
    n_max = max(M.shape[0] for M in mats.values())
    batch_size = min(check_positive_int(batch_size, "batch_size"), n_min)
    n_dev = n_devices(data_parallel)
    batch_size = max(n_dev, batch_size - batch_size % n_dev)
    if max_steps is None:
        max_steps = int(min(20_000, max(500, math.ceil(200 * n_max / batch_size))))
    max_steps = check_positive_int(max_steps, "max_steps")
    lib = [float(np.log(np.maximum(np.asarray(M.sum(1)).ravel(), 1.0)).mean())
           for M in mats.values()]
    model_kw = merged_model_settings(CoVELConfig, model, model_kw)
    train_kw = config_overrides(TrainConfig, train, "train", own_args=OWN_TRAIN_ARGS)
    config = CoVELConfig(modalities=tuple(mods), likelihoods=tuple(liks[m] for m in mods),
                         n_features=tuple(len(feats[m]) for m in mods), log_lib_mean=tuple(lib),
                         paired=bool(paired), **model_kw)
    tcfg = TrainConfig(
        max_steps=max_steps, learning_rate=learning_rate, weight_decay=weight_decay, seed=seed,
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        log_path=None if log_path is None else str(log_path), progress=progress,
        data_parallel=data_parallel, **train_kw,
    )
    info = {"n_cells": {m: int(M.shape[0]) for m, M in mats.items()},
            "n_features": {m: len(f) for m, f in feats.items()},
            "linked": res.n_links, "n_edges": int(res.src.size), "paired": bool(paired),
            "mudata": from_mudata, "n_top_genes": n_top_genes}
    return CoVEL.fit(config, feats, list(mats.values()), graph_arrays, tcfg,
                     batch_size=batch_size, seed=seed, info=info)
