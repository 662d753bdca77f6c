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

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
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
from .._progress import bar
from .._validate import ScatlasInputError, check_matrix, check_positive_int, check_rank
from ..kernels import liger_prep as _prep
from ..kernels import nmf as _nmf
from ..kernels import online_nmf as _online
from ..kernels import quantile as _quantile
from ._common import get_matrix

__all__ = ["inmf", "online_inmf", "online_inmf_add", "project_inmf"]

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


#: the streaming rules :func:`online_inmf`, :func:`online_inmf_add` and :func:`project_inmf`
#: share
_STREAM_RULES = {"seed": SEED, "chunk_size": POSITIVE_INT}


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


# --------------------------------------------------------------------------------------------
# streamed datasets (online iNMF)
# --------------------------------------------------------------------------------------------


class _H5Rows:
    """Row slices of an .h5ad's ``X`` (CSR group or dense dataset) read straight from disk."""

    def __init__(self, f: Any) -> None:
        elem = f["X"]
        self.dense = not hasattr(elem, "keys")
        if self.dense:
            self.ds = elem
            self.shape = tuple(int(s) for s in elem.shape)
            return
        enc = elem.attrs.get("encoding-type", "")
        if isinstance(enc, bytes):
            enc = enc.decode()
        if enc != "csr_matrix":
            raise ScatlasInputError(
                f"{f.filename}: X is {enc or 'an unknown encoding'}; streaming needs CSR or dense"
            )
        self.indptr, self.data, self.indices = elem["indptr"], elem["data"], elem["indices"]
        self.shape = tuple(int(s) for s in elem.attrs["shape"])

    def __getitem__(self, key: slice) -> Any:
        import scipy.sparse as sp  # noqa: PLC0415

        a, b, _ = key.indices(self.shape[0])
        if self.dense:
            return np.asarray(self.ds[a:b])
        ptr = self.indptr[a : b + 1].astype(np.int64)
        lo, hi = int(ptr[0]), int(ptr[-1])
        return sp.csr_matrix((self.data[lo:hi], self.indices[lo:hi], ptr - lo),
                             shape=(b - a, self.shape[1]))


@dataclass
class _Source:
    """One input: its cells (obs), genes (var) and a row-sliceable raw-count store."""

    label: str
    obs: pd.DataFrame
    var: pd.DataFrame
    store: Any


@dataclass
class _Dataset:
    """One dataset: rows of a source (sorted; None = all) and its moments."""

    name: str
    source: _Source
    rows: np.ndarray | None
    moments: _prep.GeneMoments | None = None

    @property
    def n(self) -> int:
        return self.source.obs.shape[0] if self.rows is None else int(self.rows.size)


class _LigerView:
    """A dataset as the online kernel sees it: ``[a:b]`` gives LIGER-scaled rows a..b."""

    def __init__(self, ds: _Dataset, cols: np.ndarray, rms: np.ndarray, dtype: Any) -> None:
        self.ds, self.cols, self.rms, self.dtype = ds, cols, rms, dtype
        self.shape = (ds.n, int(cols.size))

    def __getitem__(self, key: slice) -> Any:
        a, b, _ = key.indices(self.shape[0])
        return _prep.liger_transform(_read_rows(self.ds, a, b), self.cols, self.rms,
                                     dtype=self.dtype)


def _read_rows(ds: _Dataset, a: int, b: int) -> Any:
    """Raw counts of the dataset's cells a..b (reading the covering range of its source)."""
    store = ds.source.store
    if ds.rows is None:
        return store[a:b]
    r = ds.rows[a:b]
    lo, hi = int(r[0]), int(r[-1]) + 1
    block = store[lo:hi]
    if hi - lo == r.size:
        return block
    return block[backend.array_module(block).asarray(r - lo)]


def _open_sources(data: Any, names: Sequence[str] | None, stack: ExitStack) -> list[_Source]:
    """AnnData objects (in memory or backed) and .h5ad paths, as sources."""
    import anndata as ad  # noqa: PLC0415

    from .. import io as _io  # noqa: PLC0415

    if isinstance(data, ad.AnnData | str | os.PathLike):
        data = [data]
    if not isinstance(data, Sequence) or len(data) == 0:
        raise ScatlasInputError("data must be an AnnData, an .h5ad path or a list of them")
    if names is not None and len(names) != len(data):
        raise ScatlasInputError(f"names has {len(names)} entries for {len(data)} inputs")
    out = []
    for i, item in enumerate(data):
        label = names[i] if names is not None else None
        if isinstance(item, str | os.PathLike):
            import h5py  # noqa: PLC0415

            meta = _io.read_h5ad(item, backed="r")
            obs, var = meta.obs.copy(), meta.var.copy()
            meta.file.close()
            f = stack.enter_context(h5py.File(item, "r"))
            store: Any = _H5Rows(f)
            label = label or Path(item).stem
        elif isinstance(item, ad.AnnData):
            obs, var = item.obs, item.var
            if item.isbacked:
                import h5py  # noqa: PLC0415

                f = stack.enter_context(h5py.File(item.filename, "r"))
                store = _H5Rows(f)
            else:
                store = get_matrix(item, None)
                if backend.issparse(store) and store.format != "csr":
                    store = store.tocsr()
            label = label or f"dataset{i}"
        else:
            raise ScatlasInputError(
                f"data[{i}] must be an AnnData or a path to an .h5ad, got {type(item).__name__}"
            )
        if store.shape != (obs.shape[0], var.shape[0]):
            raise ScatlasInputError(f"data[{i}]: X has shape {store.shape}, obs x var "
                                    f"{(obs.shape[0], var.shape[0])}")
        out.append(_Source(label=str(label), obs=obs, var=var, store=store))
    return out


def _split(sources: list[_Source], batch_key: str | None) -> list[_Dataset]:
    """Datasets: each source whole, or each batch of each source."""
    datasets = []
    for src in sources:
        if batch_key is None:
            datasets.append(_Dataset(src.label, src, None))
            continue
        for name, rows in _batch_groups(src.obs, batch_key, where=src.label):
            full = len(sources) > 1
            datasets.append(_Dataset(f"{src.label}:{name}" if full else name, src, rows))
    seen = [d.name for d in datasets]
    if len(set(seen)) != len(seen):
        raise ScatlasInputError(f"dataset names are not unique: {seen}; pass names=")
    return datasets


def _shared_genes(sources: list[_Source]) -> pd.Index:
    genes = pd.Index(sources[0].var.index.astype(str))
    for src in sources[1:]:
        genes = genes[genes.isin(src.var.index.astype(str))]
    if genes.empty:
        raise ScatlasInputError("the inputs share no gene (var_names)")
    return genes


def _iter_source_chunks(src: _Source, size: int) -> Iterator[tuple[int, int, Any]]:
    n = src.obs.shape[0]
    for a in range(0, n, size):
        b = min(n, a + size)
        yield a, b, src.store[a:b]


def _compute_moments(datasets: list[_Dataset], progress: bool | None) -> None:
    """One pass over each source: per-dataset gene moments of its cells (all source genes)."""
    by_source: dict[int, list[_Dataset]] = {}
    for d in datasets:
        by_source.setdefault(id(d.source), []).append(d)
    total = sum(d.source.obs.shape[0] for d in {id(d.source): d for d in datasets}.values())
    with bar(desc="iNMF gene statistics", total=total, progress=progress, unit="cells") as pb:
        for group in by_source.values():
            src = group[0].source
            for d in group:
                d.moments = _prep.GeneMoments(src.var.shape[0])
            for a, b, chunk in _iter_source_chunks(src, _STATS_CHUNK):
                check_matrix(chunk, f"{src.label} rows {a}:{b}", nonnegative=True)
                for d in group:
                    if d.rows is None:
                        d.moments.update(chunk)
                        continue
                    lo, hi = np.searchsorted(d.rows, [a, b])
                    if hi > lo:
                        d.moments.update(chunk[d.rows[lo:hi] - a])
                pb.update(b - a)
    for d in datasets:
        if d.moments.n_cells < 2:
            raise ScatlasInputError(
                f"dataset {d.name!r} has {d.moments.n_cells} cell(s) with counts; need >= 2"
            )


def _views(datasets: list[_Dataset], genes: pd.Index, dtype: Any) -> list[_LigerView]:
    views = []
    for d in datasets:
        cols = pd.Index(d.source.var.index.astype(str)).get_indexer(genes)
        if (cols < 0).any():
            missing = list(genes[cols < 0][:5])
            raise ScatlasInputError(f"dataset {d.name!r} lacks {int((cols < 0).sum())} of the "
                                    f"genes used, e.g. {missing}")
        views.append(_LigerView(d, cols.astype(np.int64), d.moments.rms[cols], dtype))
    return views


def _result_adata(datasets: list[_Dataset], genes_all: pd.Index, var: pd.DataFrame) -> tuple[
        Any, list[np.ndarray]]:
    """A new AnnData (no X) of every input's cells in input order, and each dataset's rows."""
    import anndata as ad  # noqa: PLC0415

    frames, offsets, labels, start = [], {}, [], 0
    for d in datasets:
        src = d.source
        if id(src) not in offsets:  # a source split by batch keeps its own cell order
            offsets[id(src)] = start
            frames.append(src.obs)
            labels.append(np.repeat(src.label, src.obs.shape[0]))
            start += src.obs.shape[0]
    rows = [offsets[id(d.source)] + (np.arange(d.n) if d.rows is None else d.rows)
            for d in datasets]
    obs = pd.concat(frames, axis=0, join="outer")
    if obs.index.has_duplicates:
        obs.index = pd.Index(obs.index.astype(str) + "-" + np.concatenate(labels))
    obs.index = obs.index.astype(str)
    var = var.loc[var.index.astype(str).isin(genes_all)].copy()
    var.index = var.index.astype(str)
    return ad.AnnData(obs=obs, var=var.loc[genes_all]), rows


def _stream_inputs(
    data: Any, batch_key: str | None, names: Sequence[str] | None, stack: ExitStack,
    progress: bool | None,
) -> tuple[list[_Dataset], pd.Index, pd.DataFrame, bool]:
    """Open the inputs, split them into datasets, compute their moments."""
    import anndata as ad  # noqa: PLC0415

    in_place = isinstance(data, ad.AnnData) and not data.isbacked
    sources = _open_sources(data, names, stack)
    datasets = _split(sources, batch_key)
    genes_all = _shared_genes(sources)
    _compute_moments(datasets, progress)
    return datasets, genes_all, sources[0].var, in_place


def _select_streamed(
    datasets: list[_Dataset], genes_all: pd.Index, genes: Any, thresh: float, alpha: float,
    n_genes: int | None,
) -> pd.Index:
    """The genes used (names), selected by rliger's rule on the shared genes."""
    if genes is not None:
        pos = _gene_positions(genes_all, genes)
        return genes_all[pos]
    shared = []
    for d in datasets:
        cols = pd.Index(d.source.var.index.astype(str)).get_indexer(genes_all)
        shared.append(d.moments.subset(cols))
    pos = _prep.select_genes(shared, thresh=thresh, alpha=alpha, n_genes=n_genes)
    return genes_all[pos]


@validate_params(k=POSITIVE_INT, lam=NONNEGATIVE, max_epochs=POSITIVE_INT,
                 minibatch_size=POSITIVE_INT, **_STREAM_RULES)
def online_inmf(
    data: Any,
    batch_key: str | None = None,
    k: int = 20,
    lam: float = 5.0,
    *,
    names: Sequence[str] | None = None,
    seed: int = 1,
    max_epochs: int = 5,
    minibatch_size: int = 5000,
    chunk_size: int = 1000,
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
) -> Any:
    """Online iNMF (Gao et al. 2021, scenario 1) of raw counts streamed from memory or disk.

    Parameters
    ----------
    data
        The datasets: a list of AnnData objects (in memory or ``backed="r"``) and / or paths to
        ``.h5ad`` files (CSR or dense ``X``; read chunk by chunk, never whole), or one in-memory
        AnnData split by ``batch_key`` (then written in place, as :func:`inmf`).
    batch_key
        Optional ``.obs`` column splitting each input into datasets (one dataset per batch);
        without it every input is one dataset.
    k, lam
        Factors (20) and penalty (5), rliger's defaults.
    names
        Names of the inputs (default: file stems, or ``dataset0``, ...); with several inputs and
        ``batch_key``, datasets are named ``"input:batch"``.
    seed, max_epochs, minibatch_size, chunk_size
        :func:`scatlas.kernels.online_inmf` options (rliger: seed 1, 5 epochs, 5000 cells per
        mini-batch over all datasets, shuffled in contiguous chunks of 1000 cells).
    genes, thresh, alpha, n_genes
        As :func:`inmf`; the selection uses gene statistics from one streamed pass per input,
        among the genes every input has.
    quantile, reference, key_added, dtype, device, progress
        As :func:`inmf` (``reference`` is a dataset name).
    copy
        With an in-memory AnnData: return a copy instead of writing in place.

    Returns
    -------
    AnnData
        For a list of inputs: a new AnnData (no ``X``) holding every input's cells in input
        order (``obs`` concatenated; names made unique with ``-<input name>`` when they clash),
        the genes
        shared by the inputs as ``var``, and the keys of the module docstring, including the
        sufficient statistics ``uns[...]["A"]``, ``["B"]`` for :func:`online_inmf_add`. For one
        in-memory AnnData: None (or the copy).

    Notes
    -----
    Memory: one statistics pass reads ``20,000`` cells at a time; the factorisation reads one
    mini-batch at a time and keeps ``A_i`` (k x k) and ``B_i`` (genes x k) per dataset; the final
    ``H`` (cells x k) and the embedding are the only outputs that grow with the cells. Cells
    without counts in the genes used get all-zero loadings (no cluster).

    Examples
    --------
    >>> import scatlas
    >>> a = scatlas.datasets.synthetic(4000, 400, n_batches=2, seed=0)
    >>> scatlas.tl.online_inmf(a, "batch", k=8, minibatch_size=1000)
    >>> a.obsm["X_inmf"].shape
    (4000, 8)

    Streaming two files (scenario 1), a new AnnData comes back::

        res = scatlas.tl.online_inmf(["a.h5ad", "b.h5ad"], k=20)
        res.write_h5ad("integrated.h5ad")
    """
    keys = _keys(key_added)
    qopts = _quantile_opts(quantile, seed)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        datasets, genes_all, var, in_place = _stream_inputs(data, batch_key, names, stack,
                                                            progress)
        used = _select_streamed(datasets, genes_all, genes, thresh, alpha, n_genes)
        _check_k_sizes(k, [d.n for d in datasets], [d.name for d in datasets], len(used))
        _check_minibatch(minibatch_size, datasets)
        views = _views(datasets, used, dtype)
        t1 = time.perf_counter()
        res = _online.online_inmf(views, k=k, lam=lam, max_epochs=max_epochs,
                                  minibatch_size=minibatch_size, chunk_size=chunk_size,
                                  seed=seed, dtype=dtype, progress=progress, device=device)
        target, rows = _target(data, datasets, genes_all, var, in_place, copy)
    timings = {"statistics_s": t1 - t0, "factorization_s": time.perf_counter() - t1}
    uns = _online_uns("online_inmf", res, _params(
        batch_key=batch_key, k=k, lam=float(lam), seed=seed, max_epochs=max_epochs,
        minibatch_size=minibatch_size, chunk_size=chunk_size, thresh=thresh, alpha=alpha,
        n_genes=n_genes, quantile=qopts is not None))
    uns["timings"] = timings
    gene_index = pd.Index(target.var_names).get_indexer(used).astype(np.int64)
    fit = _Fit(names=[d.name for d in datasets], rows=rows, H=list(res.H), W=res.W,
               V=list(res.V), gene_index=gene_index, uns=uns)
    _write(target, keys, fit, qopts, reference)
    if in_place and not copy:
        return None
    return target


def _check_minibatch(minibatch_size: Any, datasets: list[_Dataset]) -> None:
    """Each dataset's share of a mini-batch must fit in it (rliger's check), with names."""
    size = check_positive_int(minibatch_size, "minibatch_size")
    _online.minibatch_sizes(size, [(d.name, d.n) for d in datasets])


def _target(data: Any, datasets: list[_Dataset], genes_all: pd.Index, var: pd.DataFrame,
            in_place: bool, copy: bool) -> tuple[Any, list[np.ndarray]]:
    """The AnnData results go to, and each dataset's rows in it."""
    if in_place:
        target = data.copy() if copy else data
        return target, [np.arange(d.n) if d.rows is None else d.rows for d in datasets]
    return _result_adata(datasets, genes_all, var)


def _online_uns(method: str, res: Any, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": method,
        "objective": float(res.objective),
        "A": np.stack([_host(a) for a in res.A]),
        "B": np.stack([_host(b) for b in res.B]),
        "minibatch_sizes": np.asarray(res.minibatch_sizes, dtype=np.int64),
        "params": {**params, "n_iter": int(res.n_iter), "epochs": int(res.epochs)},
    }


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
    import anndata as ad  # noqa: PLC0415

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
    import anndata as ad  # noqa: PLC0415

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
