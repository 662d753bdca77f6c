"""Online iNMF over streamed datasets (rliger's scenario 1, ``runOnlineINMF``): the datasets'
sources (AnnData in memory or backed, h5ad paths), their gene statistics, and
:func:`online_inmf`. Split from :mod:`scatlas.tl._inmf` (issue 18), whose docstring describes
the three scenarios, the keys written and the sources (rliger 2.x, RcppPlanc / libplanc)."""

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
    validate_params,
)
from .._progress import bar
from .._validate import ScatlasInputError, check_matrix, check_positive_int
from ..kernels import liger_prep as _prep
from ..kernels import online_nmf as _online
from ._common import get_matrix
from ._inmf import (
    _STATS_CHUNK,
    _batch_groups,
    _check_k_sizes,
    _Fit,
    _gene_positions,
    _host,
    _keys,
    _params,
    _quantile_opts,
    _write,
)

#: the streaming rules :func:`online_inmf` and :mod:`._inmf_reference`'s functions share
_STREAM_RULES = {"seed": SEED, "chunk_size": POSITIVE_INT}


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
        import scipy.sparse as sp

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
    import anndata as ad

    from .. import io as _io

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
            import h5py

            meta = _io.read_h5ad(item, backed="r")
            obs, var = meta.obs.copy(), meta.var.copy()
            meta.file.close()
            f = stack.enter_context(h5py.File(item, "r"))
            store: Any = _H5Rows(f)
            label = label or Path(item).stem
        elif isinstance(item, ad.AnnData):
            obs, var = item.obs, item.var
            if item.isbacked:
                import h5py

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
    import anndata as ad

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
    import anndata as ad

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
