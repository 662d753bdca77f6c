"""Online iNMF's scenarios 2 and 3 (rliger ``runOnlineINMF(newDatasets=...)`` and
``projection=TRUE``): :func:`online_inmf_add` and :func:`project_inmf` on a fitted reference.
Split from :mod:`scatlas.tl._inmf` (issue 18), whose docstring describes the scenarios, the keys
written and the sources."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .._params import (
    POSITIVE_INT,
    validate_params,
)
from .._validate import ScatlasInputError, check_positive_int
from ..kernels import online_nmf as _online
from ..kernels import quantile as _quantile
from ._inmf import (
    _check_k_sizes,
    _Fit,
    _host,
    _Keys,
    _keys,
    _params,
    _quantile_opts,
    _reference_index,
    _write,
)
from ._inmf_online import (
    _STREAM_RULES,
    _check_minibatch,
    _Dataset,
    _online_uns,
    _stream_inputs,
    _target,
    _views,
)

# --------------------------------------------------------------------------------------------
# scenarios 2 and 3
# --------------------------------------------------------------------------------------------


@dataclass
class _Reference:
    """A previous result read back from an AnnData: W, V, A, B on its genes, its H."""

    genes: pd.Index
    W: np.ndarray
    V: list[np.ndarray]
    A: list[np.ndarray] | None
    B: list[np.ndarray] | None
    names: list[str]
    H: list[np.ndarray]
    obs: list[pd.DataFrame]
    lam: float
    var: pd.DataFrame


def _read_reference(ref: Any, keys: _Keys) -> _Reference:
    import anndata as ad

    if not isinstance(ref, ad.AnnData):
        raise ScatlasInputError(f"reference must be an AnnData with an iNMF result, got "
                                f"{type(ref).__name__}")
    if keys.uns not in ref.uns or keys.varm not in ref.varm or keys.obsm not in ref.obsm:
        raise ScatlasInputError(
            f"the reference has no iNMF result under key_added={keys.obsm!r} (needs "
            f".uns[{keys.uns!r}], .varm[{keys.varm!r}], .obsm[{keys.obsm!r}])"
        )
    u = ref.uns[keys.uns]
    idx = np.asarray(u["gene_index"], dtype=np.int64)
    names = [str(n) for n in u["datasets"]]
    labels = ref.obs[keys.dataset].astype(str).to_numpy()
    H_all = _host(ref.obsm[keys.obsm])
    rows = [np.flatnonzero(labels == n) for n in names]
    has_ab = "A" in u and "B" in u
    return _Reference(
        genes=pd.Index(np.asarray(u["genes"]).astype(str)),
        W=_host(ref.varm[keys.varm])[idx].astype(np.float64),
        V=[np.asarray(v, dtype=np.float64) for v in u["V"]],
        A=[np.asarray(a, dtype=np.float64) for a in u["A"]] if has_ab else None,
        B=[np.asarray(b, dtype=np.float64) for b in u["B"]] if has_ab else None,
        names=names, H=[H_all[r] for r in rows], obs=[ref.obs.iloc[r] for r in rows],
        lam=float(u["params"].get("lam", 5.0)), var=ref.var,
    )


@validate_params(max_epochs=POSITIVE_INT, minibatch_size=POSITIVE_INT, **_STREAM_RULES)
def online_inmf_add(
    reference: Any,
    data: Any,
    batch_key: str | None = None,
    *,
    names: Sequence[str] | None = None,
    reference_data: Any = None,
    reference_batch_key: str | None = None,
    seed: int = 1,
    max_epochs: int = 5,
    minibatch_size: int = 5000,
    chunk_size: int = 1000,
    quantile: bool | Mapping[str, Any] = True,
    quantile_reference: str | None = None,
    key_added: str = "X_inmf",
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
) -> Any:
    """Online iNMF scenario 2: new datasets refine a previous online result's metagenes.

    Parameters
    ----------
    reference
        An AnnData written by :func:`online_inmf` (or by this function): its ``W``, ``V_i`` and
        sufficient statistics ``A_i``, ``B_i`` (frozen; they still pull ``W``) and its genes.
    data, batch_key, names
        The new datasets, as :func:`online_inmf`; they must have the reference's genes. A new
        dataset named like a reference dataset gets a ``-2`` suffix.
    reference_data, reference_batch_key
        Optional: the reference's datasets again (same specification as when fitted), to
        recompute their loadings with the refined ``W`` (read once, chunk by chunk); without
        them the reference's loadings are kept as they were.
    seed, max_epochs, minibatch_size, chunk_size, dtype, device, progress
        As :func:`online_inmf`; ``k`` and ``lam`` are the reference's.
    quantile, quantile_reference
        Quantile normalisation over all datasets, old and new; ``quantile_reference`` names the
        dataset to align to (default: the largest).
    key_added
        Key of the reference's result; the output uses the same keys.

    Returns
    -------
    AnnData
        A new AnnData (no ``X``): the reference's cells, then the new datasets' cells, with the
        keys of the module docstring over all of them.

    Examples
    --------
    ::

        ref = scatlas.tl.online_inmf(["a.h5ad", "b.h5ad"])
        both = scatlas.tl.online_inmf_add(ref, ["c.h5ad"])
    """
    keys = _keys(key_added)
    ref = _read_reference(reference, keys)
    if ref.A is None:
        raise ScatlasInputError(
            "the reference has no online iNMF statistics (uns A, B): scenario 2 needs a result "
            "of online_inmf; use project_inmf for a batch iNMF result"
        )
    qopts = _quantile_opts(quantile, seed)
    k = int(ref.W.shape[1])
    ref_res = _online.OnlineINMFResult(
        W=ref.W, V=ref.V, H=[None] * len(ref.V), A=ref.A, B=ref.B, objective=float("nan"),
        n_iter=0, epochs=0, minibatch_sizes=[], seed=seed, lam=ref.lam,
    )
    with ExitStack() as stack:
        datasets, _, _, _ = _stream_inputs(data, batch_key, names, stack, progress)
        _rename_clashes(datasets, ref.names)
        _check_k_sizes(k, [d.n for d in datasets], [d.name for d in datasets], len(ref.genes))
        _check_minibatch(minibatch_size, datasets)
        views = _views(datasets, ref.genes, dtype)
        old_views = None
        if reference_data is not None:
            old, _, _, _ = _stream_inputs(reference_data, reference_batch_key, None, stack,
                                          progress)
            if [d.n for d in old] != [h.shape[0] for h in ref.H]:
                raise ScatlasInputError(
                    f"reference_data has datasets of {[d.n for d in old]} cells, the reference "
                    f"{[h.shape[0] for h in ref.H]}"
                )
            old_views = _views(old, ref.genes, dtype)
        res = _online.online_inmf(views, lam=ref.lam, reference=ref_res,
                                  reference_Xs=old_views, max_epochs=max_epochs,
                                  minibatch_size=minibatch_size, chunk_size=chunk_size,
                                  seed=seed, dtype=dtype, progress=progress, device=device)
        target, rows = _combined_adata(ref, datasets)
    H = [ref.H[i].astype(res.W.dtype) if h is None else h for i, h in enumerate(res.H)]
    uns = _online_uns("online_inmf_add", res, _params(
        batch_key=batch_key, k=k, lam=ref.lam, seed=seed, max_epochs=max_epochs,
        minibatch_size=minibatch_size, chunk_size=chunk_size, quantile=qopts is not None,
        old_loadings_recomputed=reference_data is not None))
    fit = _Fit(names=[*ref.names, *(d.name for d in datasets)], rows=rows, H=H, W=res.W,
               V=list(res.V), gene_index=np.arange(len(ref.genes)), uns=uns)
    _write(target, keys, fit, qopts, quantile_reference)
    return target


def _rename_clashes(datasets: list[_Dataset], taken: Sequence[str]) -> None:
    """Give new datasets whose name a reference dataset has a ``-2`` (``-3``...) suffix."""
    used = set(taken)
    for d in datasets:
        name, j = d.name, 2
        while name in used:
            name, j = f"{d.name}-{j}", j + 1
        d.name = name
        used.add(name)


def _combined_adata(ref: _Reference, datasets: list[_Dataset]) -> tuple[Any, list[np.ndarray]]:
    """A new AnnData of the reference's cells then the new datasets' cells (genes: ref's)."""
    import anndata as ad

    frames = [*ref.obs, *(d.source.obs if d.rows is None else d.source.obs.iloc[d.rows]
                          for d in datasets)]
    sizes = [f.shape[0] for f in frames]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    rows = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    obs = pd.concat(frames, axis=0, join="outer")
    all_names = [*ref.names, *(d.name for d in datasets)]
    if obs.index.has_duplicates:
        obs.index = pd.Index(obs.index.astype(str) + "-" + np.repeat(all_names, sizes))
    obs.index = obs.index.astype(str)
    var = ref.var.loc[ref.var.index.astype(str).isin(ref.genes)].copy()
    var.index = var.index.astype(str)
    return ad.AnnData(obs=obs, var=var.loc[ref.genes]), rows


@validate_params(**_STREAM_RULES)
def project_inmf(
    reference: Any,
    data: Any,
    batch_key: str | None = None,
    *,
    names: Sequence[str] | None = None,
    chunk_size: int = 16384,
    quantile: bool | Mapping[str, Any] = True,
    quantile_reference: str | None = None,
    seed: int = 1,
    key_added: str = "X_inmf",
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
    copy: bool = False,
) -> Any:
    """Online iNMF scenario 3: project new datasets onto a result's shared metagenes.

    Each new dataset is preprocessed as LIGER does (normalised per cell, the reference's genes,
    scaled by its own gene root mean squares) and its loadings solved exactly,
    ``H = argmin_{H >= 0} ||X - H W^T||`` (RcppPlanc ``projectNewData``: ``V = 0``), chunk by
    chunk.

    Parameters
    ----------
    reference
        An AnnData with an iNMF result (:func:`inmf`, :func:`online_inmf`...): its ``W``, genes,
        and loadings (for the quantile alignment).
    data, batch_key, names
        The new datasets, as :func:`online_inmf` (an in-memory AnnData is written in place).
    chunk_size
        Cells solved at a time.
    quantile, quantile_reference
        Align the new loadings to a dataset of the reference (default its largest) by quantile
        normalisation; the reference's own embedding is not changed.
    seed, key_added, dtype, device, progress, copy
        As :func:`online_inmf`.

    Returns
    -------
    AnnData or None
        As :func:`online_inmf`, for the new cells only (``V`` stored as zeros).

    Examples
    --------
    ::

        ref = scatlas.io.read_h5ad("integrated.h5ad")
        new = scatlas.tl.project_inmf(ref, ["query.h5ad"])
    """
    keys = _keys(key_added)
    ref = _read_reference(reference, keys)
    qopts = _quantile_opts(quantile, seed)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    with ExitStack() as stack:
        datasets, genes_all, var, in_place = _stream_inputs(data, batch_key, names, stack,
                                                            progress)
        views = _views(datasets, ref.genes, dtype)
        H = _online.project_inmf(views, ref.W, chunk_size=chunk_size, dtype=dtype, device=device)
        target, rows = _target(data, datasets, genes_all, var, in_place, copy)
    uns = {"method": "project_inmf", "reference_datasets": np.asarray(ref.names, dtype=object),
           "params": _params(batch_key=batch_key, k=int(ref.W.shape[1]), seed=seed,
                             quantile=qopts is not None)}
    gene_index = pd.Index(target.var_names).get_indexer(ref.genes).astype(np.int64)
    if (gene_index < 0).any():  # pragma: no cover - _views checked the genes
        raise ScatlasInputError("the new data lack some of the reference's genes")
    W = ref.W.astype(H[0].dtype)
    fit = _Fit(names=[d.name for d in datasets], rows=rows, H=list(H), W=W,
               V=[np.zeros_like(W) for _ in H], gene_index=gene_index, uns=uns)
    _write(target, keys, fit, None, None)
    if qopts is not None:
        _align_to_reference(target, keys, fit, ref, qopts, quantile_reference)
    if in_place and not copy:
        return None
    return target


def _align_to_reference(target: Any, keys: _Keys, fit: _Fit, ref: _Reference,
                        qopts: dict[str, Any], quantile_reference: str | None) -> None:
    """Quantile-normalise the projected loadings onto one reference dataset's loadings."""
    if quantile_reference is None:
        r = int(np.argmax([h.shape[0] for h in ref.H]))
    else:
        r = _reference_index(quantile_reference, ref.names)
    H_ref = ref.H[r].astype(fit.H[0].dtype)
    ok = ~np.isnan(H_ref).any(axis=1)
    q = _quantile.quantile_norm([H_ref[ok], *fit.H], reference=0, **qopts)
    k = fit.W.shape[1]
    Hn = np.full((target.n_obs, k), np.nan, dtype=fit.H[0].dtype)
    labels = np.full(target.n_obs, -1, dtype=np.int64)
    for rows, Hq, lab in zip(fit.rows, q.H_norm[1:], q.clusters[1:], strict=True):
        Hn[rows] = _host(Hq)
        labels[rows] = _host(lab)
    target.obsm[keys.norm] = Hn
    target.obs[keys.clusters] = pd.Categorical(labels, categories=list(range(k)))
    target.uns[keys.uns]["reference"] = ref.names[r]
