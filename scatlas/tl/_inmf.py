"""LIGER's integrative NMF on AnnData: batch iNMF and online iNMF (three scenarios).

Tools (raw counts in; LIGER's preprocessing, factorisation and quantile alignment done here):

* :func:`inmf`: one in-memory AnnData whose batches (``.obs[batch_key]``) are the datasets
  (rliger ``normalize -> selectGenes -> scaleNotCenter -> runINMF -> quantileNorm``).
* :func:`online_inmf`: online iNMF, scenario 1 (rliger ``runOnlineINMF``): several AnnData
  objects or ``.h5ad`` paths, read chunk by chunk from disk (memory independent of the number
  of cells), or one in-memory AnnData split by batch.
* :func:`online_inmf_add`: scenario 2, new datasets refine the shared metagenes of an online
  result without revisiting its cells.
* :func:`project_inmf`: scenario 3, new datasets projected onto the shared metagenes of a
  result (``V = 0``).

All write the same keys (names for ``key_added="X_inmf"``; another ``key_added="X_foo"`` gives
``X_foo``, ``X_foo_norm``, ``foo_clusters``, ``foo_dataset``, ``foo_W``, ``foo``):

* ``.obsm["X_inmf"]`` (n_obs, k): cell loadings ``H`` (NaN rows for cells left out: no count in
  the genes used);
* ``.obsm["X_inmf_norm"]`` (n_obs, k): quantile-normalised loadings, the integrated embedding
  (when ``quantile``);
* ``.obs["inmf_clusters"]``: joint clusters of the quantile normalisation (the factor of largest
  scaled loading, refined by a kNN vote; categorical of factor indices);
* ``.obs["inmf_dataset"]``: which dataset (batch) each cell was factorised in;
* ``.varm["inmf_W"]`` (n_vars, k): shared metagenes, zero rows for genes not used;
* ``.uns["inmf"]``: ``datasets`` (names), ``n_cells`` (per dataset), ``genes`` / ``gene_index``
  (genes used), ``V`` (n_datasets, n_genes_used, k), ``objective`` (per iteration for batch
  iNMF; the final value for online iNMF), online iNMF's sufficient statistics ``A``
  (n_datasets, k, k) and ``B`` (n_datasets, n_genes_used, k) (needed by scenario 2), and
  ``params``.

Sources: rliger 2.x (``R/preprocess.R``, ``R/integration.R``, ``R/quantileNorm.R``), RcppPlanc /
libplanc (``bppinmf``, ``onlineINMF``, ``projectNewData``); the kernels are
:mod:`scatlas.kernels.nmf`, :mod:`scatlas.kernels.online_nmf`, :mod:`scatlas.kernels.quantile`
and :mod:`scatlas.kernels.liger_prep`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .. import backend
from .._params import (
    NONNEGATIVE,
    POSITIVE_INT,
    SEED,
    Each,
    Options,
    validate_params,
)
from .._validate import ScatlasInputError, check_matrix, check_positive_int, check_rank
from ..kernels import liger_prep as _prep
from ..kernels import nmf as _nmf
from ..kernels import quantile as _quantile
from ._common import get_matrix

__all__ = ["inmf"]

#: cells read at a time by the statistics pass over streamed datasets
_STATS_CHUNK = 20_000


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Keys:
    """Where results go, derived from ``key_added``."""

    obsm: str
    norm: str
    clusters: str
    dataset: str
    varm: str
    uns: str


def _keys(key_added: str) -> _Keys:
    if not isinstance(key_added, str) or not key_added:
        raise ScatlasInputError(f"key_added must be a non-empty string, got {key_added!r}")
    base = key_added[2:] if key_added.startswith("X_") and len(key_added) > 2 else key_added
    return _Keys(obsm=key_added, norm=f"{key_added}_norm", clusters=f"{base}_clusters",
                 dataset=f"{base}_dataset", varm=f"{base}_W", uns=base)


# --------------------------------------------------------------------------------------------
# batches and genes
# --------------------------------------------------------------------------------------------


def _batch_groups(obs: pd.DataFrame, batch_key: str, where: str = "adata") -> list[
        tuple[str, np.ndarray]]:
    """``(batch name, sorted row indices)`` per batch, in category (else sorted) order."""
    if batch_key not in obs.columns:
        cols = list(obs.columns)
        raise ScatlasInputError(
            f"batch_key {batch_key!r} is not a column of {where}.obs (available: {cols[:20]})"
        )
    col = obs[batch_key]
    n_missing = int(col.isna().sum())
    if n_missing:
        raise ScatlasInputError(
            f"{where}.obs[{batch_key!r}] has {n_missing} missing value(s); every cell needs a "
            "batch"
        )
    if isinstance(col.dtype, pd.CategoricalDtype):
        names = [str(c) for c in col.cat.categories]
        codes = col.cat.codes.to_numpy()
    else:
        values = col.astype(str).to_numpy()
        names = sorted(set(values))
        codes = pd.Index(names).get_indexer(values)
    groups = []
    for i, name in enumerate(names):
        rows = np.flatnonzero(codes == i)
        if rows.size == 0:
            raise ScatlasInputError(
                f"batch {name!r} of {where}.obs[{batch_key!r}] has no cells; drop unused "
                f"categories first (obs[{batch_key!r}].cat.remove_unused_categories())"
            )
        groups.append((name, rows))
    return groups


def _gene_positions(var_names: pd.Index, genes: Any, var: pd.DataFrame | None = None) -> (
        np.ndarray):
    """Integer positions in ``var_names`` of ``genes``: names, a bool mask or a .var column."""
    if isinstance(genes, str):
        if var is None or genes not in var.columns:
            raise ScatlasInputError(f"genes={genes!r} is not a column of .var")
        genes = np.asarray(var[genes], dtype=bool)
    arr = np.asarray(genes)
    if arr.dtype == bool:
        if arr.shape != (len(var_names),):
            raise ScatlasInputError(
                f"a boolean genes mask must have shape ({len(var_names)},), got {arr.shape}"
            )
        pos = np.flatnonzero(arr)
    else:
        names = pd.Index(arr.astype(str))
        pos = var_names.get_indexer(names)
        missing = names[pos < 0]
        if len(missing):
            raise ScatlasInputError(
                f"{len(missing)} of the given genes are not in var_names, e.g. "
                f"{list(missing[:5])}"
            )
    if pos.size == 0:
        raise ScatlasInputError("genes selects no gene")
    return pos.astype(np.int64)


def _check_k_sizes(k: Any, n_cells: Sequence[int], names: Sequence[str], n_genes: int) -> int:
    k = check_positive_int(k, "k")
    return check_rank(k, list(zip(names, n_cells, strict=True)), n_genes, cells="usable cells")


def _quantile_opts(quantile: bool | Mapping[str, Any], seed: int) -> dict[str, Any] | None:
    if quantile is False or quantile is None:
        return None
    opts: dict[str, Any] = {"seed": seed}
    if isinstance(quantile, Mapping):
        opts.update(quantile)
    elif quantile is not True:
        raise ScatlasInputError(f"quantile must be True, False or a dict of options, got "
                                f"{quantile!r}")
    if "reference" in opts:
        raise ScatlasInputError("give the quantile reference with reference=, not in quantile")
    return opts


def _reference_index(reference: Any, names: Sequence[str]) -> int | None:
    if reference is None:
        return None
    ref = str(reference)
    if ref not in names:
        raise ScatlasInputError(f"reference {ref!r} is not a dataset; datasets: {list(names)}")
    return list(names).index(ref)


# --------------------------------------------------------------------------------------------
# writing results
# --------------------------------------------------------------------------------------------


@dataclass
class _Fit:
    """What every tool writes: per-dataset H and cell rows, shared W, per-dataset V."""

    names: list[str]
    rows: list[np.ndarray]  # rows of the output AnnData, per dataset
    H: list[Any]  # (len(rows_i), k) per dataset
    W: Any  # (n_genes_used, k)
    V: list[Any]  # (n_genes_used, k) per dataset (zeros for projected datasets)
    gene_index: np.ndarray  # positions of the genes used in the output var
    uns: dict[str, Any]


def _host(a: Any) -> np.ndarray:
    return np.asarray(backend.to_host(a))


def _write(adata: Any, keys: _Keys, fit: _Fit, qopts: dict[str, Any] | None,
           reference: Any) -> None:
    """Store H, the quantile-normalised embedding, clusters, W, V and metadata in ``adata``."""
    xp = backend.array_module(fit.H[0])
    k = int(fit.W.shape[1])
    H = xp.full((adata.n_obs, k), np.nan, dtype=fit.H[0].dtype)
    datasets = np.full(adata.n_obs, "", dtype=object)
    for name, rows, Hi in zip(fit.names, fit.rows, fit.H, strict=True):
        H[xp.asarray(rows)] = Hi
        datasets[rows] = name
    adata.obsm[keys.obsm] = H
    adata.obsm.pop(keys.norm, None)  # never leave an earlier run's embedding behind
    if keys.clusters in adata.obs:
        del adata.obs[keys.clusters]
    if qopts is not None:
        _write_quantile(adata, keys, fit, qopts, reference)
    adata.obs[keys.dataset] = pd.Categorical(
        np.where(datasets == "", None, datasets), categories=list(fit.names)
    )
    W = xp.zeros((adata.n_vars, k), dtype=fit.W.dtype)
    W[xp.asarray(fit.gene_index)] = fit.W
    adata.varm[keys.varm] = W
    fit.uns.update(
        datasets=np.asarray(fit.names, dtype=object),
        n_cells=np.asarray([len(r) for r in fit.rows], dtype=np.int64),
        genes=np.asarray(adata.var_names[fit.gene_index], dtype=object),
        gene_index=fit.gene_index,
        V=np.stack([_host(v) for v in fit.V]),
    )
    adata.uns[keys.uns] = fit.uns


def _write_quantile(adata: Any, keys: _Keys, fit: _Fit, qopts: dict[str, Any],
                    reference: Any) -> None:
    """Quantile-normalise the datasets' loadings; write the embedding and the clusters."""
    t0 = time.perf_counter()
    xp = backend.array_module(fit.H[0])
    k = int(fit.W.shape[1])
    ref = _reference_index(reference, fit.names)
    # loadings kept from an earlier fit may hold NaN rows (cells left out there)
    finite = [_host(xp.isfinite(Hi).all(axis=1)) for Hi in fit.H]
    q = _quantile.quantile_norm(
        [Hi[xp.asarray(f)] for Hi, f in zip(fit.H, finite, strict=True)], reference=ref,
        **qopts,
    )
    Hn = xp.full((adata.n_obs, k), np.nan, dtype=fit.H[0].dtype)
    labels = np.full(adata.n_obs, -1, dtype=np.int64)
    for rows, f, Hq, lab in zip(fit.rows, finite, q.H_norm, q.clusters, strict=True):
        Hn[xp.asarray(rows[f])] = Hq
        labels[rows[f]] = _host(lab)
    adata.obsm[keys.norm] = Hn
    adata.obs[keys.clusters] = pd.Categorical(labels, categories=list(range(k)))
    fit.uns["reference"] = fit.names[q.reference]
    fit.uns.setdefault("timings", {})["quantile_norm_s"] = time.perf_counter() - t0


def _params(**kw: Any) -> dict[str, Any]:
    """Parameters for ``.uns`` (None dropped: h5ad cannot store it)."""
    return {k: v for k, v in kw.items() if v is not None}


# --------------------------------------------------------------------------------------------
# batch iNMF
# --------------------------------------------------------------------------------------------


@validate_params(k=POSITIVE_INT, lam=Each(NONNEGATIVE), seed=SEED, n_iter=POSITIVE_INT,
                 solver=Options(("bpp", "hals")), n_restarts=POSITIVE_INT)
def inmf(
    adata: Any,
    batch_key: str = "batch",
    k: int = 20,
    lam: float = 5.0,
    *,
    layer: str | None = None,
    seed: int = 1,
    n_iter: int = 30,
    solver: str = "bpp",
    n_restarts: int = 1,
    preprocess: bool = True,
    genes: Any = None,
    thresh: float = 0.1,
    alpha: float = 0.99,
    n_genes: int | None = None,
    quantile: bool | Mapping[str, Any] = True,
    reference: str | None = None,
    key_added: str = "X_inmf",
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
    copy: bool = False,
    **kwargs: Any,
) -> Any:
    """Integrative NMF (LIGER) of the batches of an AnnData of raw counts.

    Parameters
    ----------
    adata
        AnnData, cells x genes, raw counts in ``.X`` (or ``layers[layer]``): NumPy / SciPy
        sparse, or CuPy / cupyx on the GPU. With ``preprocess=False`` any non-negative matrix
        (e.g. already LIGER-scaled).
    batch_key
        ``.obs`` column naming each cell's dataset (>= 1 cell per batch; category order kept).
    k
        Number of factors (rliger default 20); must be smaller than the usable cells of every
        batch and than the genes used.
    lam
        Penalty on the dataset-specific metagenes (rliger default 5).
    layer
        Use ``adata.layers[layer]`` instead of ``.X``.
    seed, n_iter, solver, n_restarts
        :func:`scatlas.kernels.inmf` options (defaults: rliger's seed 1, 30 iterations, BPP).
    preprocess
        Run LIGER's preprocessing per batch: divide cells by their total count, select genes
        (unless ``genes``), scale genes by their root mean square in the batch (no centring).
    genes
        Genes to use instead of the selection: names, a bool mask over ``var_names`` or the name
        of a bool ``.var`` column. Default: :func:`scatlas.kernels.liger_prep.select_genes`
        with ``thresh``, ``alpha``, ``n_genes`` (all genes when ``preprocess=False``).
    thresh, alpha, n_genes
        rliger ``selectGenes`` options (``var.thresh=0.1``, ``alpha.thresh=0.99``, ``nGenes``).
    quantile
        Quantile-normalise the loadings (rliger ``quantileNorm``) into ``obsm[key + "_norm"]``
        and ``obs[..._clusters]``; a dict passes options to
        :func:`scatlas.kernels.quantile_norm` (``quantiles``, ``min_cells``, ``n_neighbors``...).
    reference
        Batch whose loadings the others are aligned to (default: the largest).
    key_added
        ``.obsm`` key of the loadings; the other keys derive from it (module docstring).
    dtype
        float32 (default) or float64 working precision.
    device
        ``"cpu"`` / ``"gpu"``: where to factorise (results come back as the input's kind).
    progress
        Progress bar over iterations.
    copy
        Return a modified copy instead of writing into ``adata``.
    **kwargs
        More :func:`scatlas.kernels.inmf` options (``tol``, ``hals_sweeps``, ``init``).

    Returns
    -------
    None (or the copy with ``copy=True``); writes the keys listed in the module docstring.
    Cells without any count in the genes used are left out (NaN rows, no cluster), as rliger
    removes empty cells; genes without any count in every batch are not used.

    Examples
    --------
    >>> import scatlas
    >>> adata = scatlas.datasets.synthetic(3000, 500, n_batches=2, seed=0)
    >>> scatlas.tl.inmf(adata, "batch", k=10)
    >>> adata.obsm["X_inmf_norm"].shape
    (3000, 10)
    """
    adata = adata.copy() if copy else adata
    keys = _keys(key_added)
    qopts = _quantile_opts(quantile, seed)
    X = get_matrix(adata, layer)
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    _check_counts(X, where, preprocess)
    groups = _batch_groups(adata.obs, batch_key)
    names = [g for g, _ in groups]
    gene_pos = None if genes is None else _gene_positions(adata.var_names, genes, adata.var)
    Xs, rows, gene_pos = _prepare_batches(
        X, [r for _, r in groups], names, gene_pos, preprocess=preprocess, thresh=thresh,
        alpha=alpha, n_genes=n_genes, dtype=dtype,
    )
    k = _check_k_sizes(k, [r.size for r in rows], names, gene_pos.size)
    res = _nmf.inmf(Xs, k=k, lam=lam, n_iter=n_iter, solver=solver, n_restarts=n_restarts,
                    seed=seed, dtype=dtype, progress=progress, device=device, **kwargs)
    uns = {
        "method": "inmf",
        "objective": np.asarray(res.objective),
        "restart_objectives": np.asarray(res.restart_objectives, dtype=np.float64),
        "params": _params(batch_key=batch_key, k=k, lam=_lam_value(res.lam), layer=layer,
                          seed=res.seed, n_iter=res.n_iter, solver=solver, n_restarts=n_restarts,
                          preprocess=preprocess, thresh=thresh, alpha=alpha, n_genes=n_genes,
                          quantile=qopts is not None, converged=res.converged,
                          n_cells_left_out=int(adata.n_obs - sum(r.size for r in rows))),
    }
    fit = _Fit(names=names, rows=rows, H=res.H, W=res.W, V=res.V, gene_index=gene_pos, uns=uns)
    _write(adata, keys, fit, qopts, reference)
    return adata if copy else None


def _lam_value(lams: Sequence[float]) -> float | np.ndarray:
    """One penalty as a float, per-dataset penalties as an array."""
    return float(lams[0]) if len(set(lams)) == 1 else np.asarray(lams, dtype=np.float64)


def _check_counts(X: Any, where: str, preprocess: bool) -> None:
    try:
        check_matrix(X, where, nonnegative=True)
    except ScatlasInputError as err:
        hint = ("iNMF needs raw counts (preprocess=True)" if preprocess else
                "iNMF needs a non-negative matrix")
        raise ScatlasInputError(f"{err}; {hint}, e.g. adata.layers['counts']") from None


def _prepare_batches(
    X: Any, groups: list[np.ndarray], names: list[str], gene_pos: np.ndarray | None, *,
    preprocess: bool, thresh: float, alpha: float, n_genes: int | None, dtype: Any,
) -> tuple[list[Any], list[np.ndarray], np.ndarray]:
    """Per-batch matrices for the kernel, the cells kept per batch, the genes used."""
    xp = backend.array_module(X)
    if backend.issparse(X) and X.format != "csr":
        X = X.tocsr()
    parts = [X[xp.asarray(r)] for r in groups]
    if preprocess:
        parts, groups = _drop_empty_cells(parts, groups, names)
        moments = [_prep.GeneMoments.from_counts(P) for P in parts]
        if gene_pos is None:
            gene_pos = _prep.select_genes(moments, thresh=thresh, alpha=alpha, n_genes=n_genes)
        Xs = [_prep.liger_transform(P, gene_pos, m.rms[gene_pos], dtype=dtype)
              for P, m in zip(parts, moments, strict=True)]
    else:
        gene_pos = np.arange(X.shape[1]) if gene_pos is None else gene_pos
        Xs = [P[:, xp.asarray(gene_pos)] for P in parts]
    Xs, gene_pos = _drop_zero_genes(Xs, np.asarray(gene_pos, dtype=np.int64))
    Xs, groups = _drop_empty_cells(Xs, groups, names)
    return Xs, groups, gene_pos


def _drop_empty_cells(parts: list[Any], groups: list[np.ndarray], names: list[str]) -> tuple[
        list[Any], list[np.ndarray]]:
    """Remove cells (rows) without any count; a batch left without cells is an error."""
    out_parts, out_groups = [], []
    for P, rows, name in zip(parts, groups, names, strict=True):
        keep = _host(_prep.row_totals(P) > 0)
        if not keep.any():
            raise ScatlasInputError(
                f"batch {name!r} has no cell with counts in the genes used; remove it"
            )
        if not keep.all():
            P, rows = P[backend.array_module(P).asarray(np.flatnonzero(keep))], rows[keep]
        out_parts.append(P)
        out_groups.append(rows)
    return out_parts, out_groups


def _drop_zero_genes(Xs: list[Any], gene_pos: np.ndarray) -> tuple[list[Any], np.ndarray]:
    """Remove genes without any value in every batch (the factorisation cannot use them)."""
    used = np.zeros(gene_pos.size, dtype=bool)
    for Y in Xs:
        used |= _host(_prep.row_totals(Y.T) > 0)
    if not used.any():
        raise ScatlasInputError("none of the genes used has a count in these cells")
    if used.all():
        return Xs, gene_pos
    cols = np.flatnonzero(used)
    return [Y[:, backend.array_module(Y).asarray(cols)] for Y in Xs], gene_pos[cols]
