"""Reading, chunked iteration, gene alignment and atomic writing of AnnData ``.h5ad`` files.

* :func:`read_h5ad`: ``anndata.read_h5ad`` with clear errors for a missing file or a file that is
  not an h5ad.
* :func:`read_zarr`: an AnnData zarr store (a folder), in memory or with ``X`` and the layers
  left on disk and read lazily (rows on demand, e.g. by the model trainers' mini-batch loader).
* :func:`iter_chunks`: row blocks of ``X`` (or a layer) from an in-memory AnnData, a backed one
  (``backed="r"``) or a path, reading only the requested rows from disk (CSR on disk: the slice
  of ``indptr``, then the matching slice of ``data`` / ``indices``).
* :func:`align_genes`: reorder / subset / zero-fill columns to a target gene list.
* :func:`atomic_write` / :func:`write_h5ad`: write to a temporary file beside the target, then
  ``os.replace`` it into place, so a reader never sees a half-written file and an interrupted
  write leaves any previous file untouched.

Size (about 740 lines): reading, row sources, chunked iteration, gene alignment and atomic
writing are the I/O boundary every layer shares.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import backend
from ._validate import ScatlasInputError, check_positive_int

__all__ = ["ArrayRows", "RowSource", "align_genes", "as_row_source", "atomic_write",
           "iter_chunks", "read_dask", "read_h5ad", "read_zarr", "write_h5ad"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _damaged_h5_message(path: Path, err: BaseException) -> str:
    """What went wrong with an HDF5 file h5py cannot open, naming the file: a truncated file
    says how much of it is there (an interrupted copy or download is the usual cause)."""
    text = str(err)
    found = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", text)
    if found:
        have, want = (int(v) for v in found.groups())
        return (f"{str(path)!r} is truncated: {have:,} of its {want:,} bytes are there (an "
                "interrupted copy or download?); copy or write the file again")
    return f"{str(path)!r} is a damaged HDF5 file that cannot be opened ({text})"


def _check_h5ad_path(path: PathLike) -> Path:
    """Raise clear errors for a missing path, a folder, or a file that is not an h5ad."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such h5ad file: {str(path)!r}")
    if path.is_dir():
        raise ScatlasInputError(f"{str(path)!r} is a folder, not an .h5ad file; read an AnnData "
                                "zarr store with scatlas.io.read_zarr")
    if not h5py.is_hdf5(path):
        raise ScatlasInputError(f"{str(path)!r} is not an .h5ad file (not HDF5 at all)")
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in ("obs", "var") if key not in f]
    except OSError as err:  # HDF5 signature present, but the file cannot be opened
        raise ScatlasInputError(_damaged_h5_message(path, err)) from err
    if missing:
        raise ScatlasInputError(
            f"{str(path)!r} is an HDF5 file but not an AnnData .h5ad (no {missing} group)"
        )
    return path


def read_h5ad(path: PathLike, backed: bool | str = False) -> ad.AnnData:
    """Read an ``.h5ad`` file into an AnnData.

    ``backed=False`` loads everything into memory; ``backed=True`` (or ``"r"``) opens it
    read-only with ``X`` left on disk (read rows with :func:`iter_chunks`); ``"r+"`` opens it
    for update. Raises ``FileNotFoundError`` for a missing file and
    :class:`~scatlas._validate.ScatlasInputError` for a path that is not an h5ad.
    """
    path = _check_h5ad_path(path)
    if backed is True:
        mode: str | None = "r"
    elif backed is False or backed is None:
        mode = None
    elif backed in ("r", "r+"):
        mode = backed
    else:
        raise ScatlasInputError(f"backed must be False, True, 'r' or 'r+', got {backed!r}")
    try:
        return ad.read_h5ad(path, backed=mode)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ScatlasInputError(f"could not read {str(path)!r} as an .h5ad file: {err}") from err


def _open_zarr_anndata(path: PathLike) -> tuple[Path, Any]:
    """Open an AnnData zarr store read-only; clear errors for a missing path, a file, a folder that
    is not a zarr store, or a zarr store that is not an AnnData. Returns ``(path, root group)``."""
    import zarr  # an anndata dependency

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such zarr store: {str(path)!r}")
    if not path.is_dir():
        raise ScatlasInputError(
            f"{str(path)!r} is a file, not a zarr store (a folder); read .h5ad files with "
            "scatlas.io.read_h5ad"
        )
    if not any((path / name).is_file() for name in (".zgroup", "zarr.json")):
        raise ScatlasInputError(
            f"{str(path)!r} is a folder but not a zarr store (no .zgroup or zarr.json in it)"
        )
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as err:  # zarr raises various errors for damaged metadata
        raise ScatlasInputError(f"could not open {str(path)!r} as a zarr group: {err}") from err
    missing = [key for key in ("obs", "var") if key not in root]
    if missing:
        raise ScatlasInputError(
            f"{str(path)!r} is a zarr store but not an AnnData (no {missing} group)"
        )
    return path, root


def read_zarr(path: PathLike, backed: bool | str = False) -> ad.AnnData:
    """Read an AnnData zarr store (a folder written by ``AnnData.write_zarr``).

    ``backed=False`` loads everything into memory (``anndata.read_zarr``). ``backed=True`` (or
    ``"r"``) reads ``obs``, ``var``, ``obsm``, ``obsp``, ``varm``, ``varp`` and ``uns`` into
    memory and leaves ``X`` and every layer on disk, read lazily: a CSR / CSC matrix becomes an
    ``anndata`` sparse dataset (``anndata.io.sparse_dataset``: ``X[start:stop]`` reads only those
    rows of a CSR matrix and returns a ``scipy.sparse`` matrix; CSC reads whole columns, slow),
    a dense matrix stays a read-only ``zarr.Array`` (``X[start:stop]`` -> ``numpy.ndarray``),
    shapes ``(n_obs, n_vars)`` and dtypes as stored. Unlike ``read_h5ad(backed="r")`` the result
    is not ``isbacked``; it is meant to be streamed from (``scatlas.tl.train_metric`` reads its
    mini-batches row block by row block; :func:`iter_chunks` works too). ``raw`` is not read
    in this mode, and slicing the AnnData (``adata[rows]``) or ``adata.copy()`` loads the
    selected data into memory.

    Raises ``FileNotFoundError`` for a missing path and
    :class:`~scatlas._validate.ScatlasInputError` for a file, a folder that is not a zarr store,
    a zarr store without AnnData's ``obs`` / ``var`` groups, or an ``X`` / layer of an encoding
    that cannot be read lazily.
    """
    if backed not in (False, None, True, "r"):
        raise ScatlasInputError(
            f"backed must be False, True or 'r' for a zarr store, got {backed!r} (zarr stores "
            "are opened read-only)"
        )
    path, root = _open_zarr_anndata(path)
    if not backed:
        try:
            return ad.read_zarr(str(path))
        except (OSError, KeyError, TypeError, ValueError) as err:
            raise ScatlasInputError(
                f"could not read {str(path)!r} as an AnnData zarr store: {err}"
            ) from err
    from anndata.io import read_elem

    try:
        in_memory = {key: read_elem(root[key])
                     for key in ("obs", "var", "obsm", "obsp", "varm", "varp", "uns")
                     if key in root}
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ScatlasInputError(
            f"could not read {str(path)!r} as an AnnData zarr store: {err}"
        ) from err
    X = _lazy_zarr_matrix(root["X"], path, "X") if "X" in root else None
    layers = {}
    if "layers" in root:
        layers = {name: _lazy_zarr_matrix(root["layers"][name], path, f"layers/{name}")
                  for name in root["layers"].keys()}
    return ad.AnnData(X=X, layers=layers, **in_memory)


def _lazy_zarr_matrix(elem: Any, path: Path, key: str) -> Any:
    """A zarr element of an AnnData store as a lazily read matrix (sparse dataset or zarr array)."""
    import zarr

    encoding = elem.attrs.get("encoding-type", "array")
    if isinstance(elem, zarr.Array):
        if elem.ndim != 2:
            raise ScatlasInputError(f"{str(path)!r}:{key} is not a matrix (shape {elem.shape})")
        return elem
    if encoding in ("csr_matrix", "csc_matrix"):
        from anndata.io import sparse_dataset

        if encoding == "csc_matrix":
            log.warning("%s:%s is CSC; reading rows reads whole columns (slow)", path, key)
        return sparse_dataset(elem)
    raise ScatlasInputError(
        f"{str(path)!r}:{key} has encoding {encoding!r}, which cannot be read lazily; read the "
        "store in memory (backed=False)"
    )


def read_dask(path: PathLike, *, chunk_rows: int = 10_000, layer: str | None = None,
              obs: bool = True) -> ad.AnnData:
    """An AnnData whose ``X`` is a lazy ``dask.array.Array`` over a zarr store or an ``.h5ad``.

    ``X`` (or ``layers[layer]``, returned as ``X``) is read by
    ``anndata.experimental.read_elem_lazy`` in row blocks of ``chunk_rows`` cells (one block of
    columns): ``scipy.sparse`` CSR chunks for CSR data, NumPy chunks for dense, dtype as stored;
    nothing is read until computed, and the graph pickles to ``distributed`` workers (each
    opens the file itself). ``obs`` (skipped with ``obs=False``: an empty frame of the right
    length) and ``var`` are read into memory. This is the input of the Dask routes
    (:func:`scatlas.kernels.pca`, :func:`scatlas.atlas.build`).
    """
    from anndata.experimental import read_elem_lazy
    from anndata.io import read_elem

    chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
    path = Path(path)
    if path.is_dir():
        _, root = _open_zarr_anndata(path)
    else:
        root = h5py.File(_check_h5ad_path(path), "r")
    key = "X" if layer is None else f"layers/{layer}"
    if key not in root:
        raise ScatlasInputError(f"{str(path)!r} has no {key}", param="layer")
    X = read_elem_lazy(root[key], chunks=(chunk_rows, -1))
    var = read_elem(root["var"])
    obs_df = read_elem(root["obs"]) if obs else pd.DataFrame(index=pd.RangeIndex(X.shape[0])
                                                             .astype(str))
    return ad.AnnData(X=X, obs=obs_df, var=var)


# --------------------------------------------------------------------------------------------
# RowSource: the one out-of-core abstraction
# --------------------------------------------------------------------------------------------


@runtime_checkable
class RowSource(Protocol):
    """Cells x genes rows, read by index or in blocks: what streaming consumers take.

    ``shape``: ``(n_cells, n_genes)``. ``rows(idx)``: the rows ``idx`` (int64, sorted, unique)
    in that order, as a host block (``scipy.sparse`` CSR or ``numpy``). ``blocks(chunk_rows)``:
    ``(start, stop, X[start:stop])`` in row order. :func:`as_row_source` makes one of any
    matrix, store or list of chunks; ``scatlas.models.data.MatrixSource`` is one too.
    """

    @property
    def shape(self) -> tuple[int, int]: ...

    def rows(self, idx: np.ndarray) -> Any: ...

    def blocks(self, chunk_rows: int) -> Iterator[tuple[int, int, Any]]: ...


def _compute(block: Any) -> Any:
    block = block.compute() if hasattr(block, "compute") else block
    return block if sp.issparse(block) else np.asarray(block)


class ArrayRows:
    """:class:`RowSource` over an (n, p) matrix: NumPy, ``scipy.sparse``, an anndata backed
    sparse dataset (h5ad or zarr), an h5py / zarr array, a ``dask.array.Array`` (rows are
    computed on the active scheduler), or a list of such chunks stacked by rows. Indexing
    (``src[idx]``, ``src[lo:hi]``) reads rows too, so it stands in for the matrix."""

    def __init__(self, X: Any):
        if isinstance(X, list | tuple):
            if not X:
                raise ScatlasInputError("an empty list of chunks has no rows", param="X")
            self._chunks = [ArrayRows(c) for c in X]
            widths = {c.shape[1] for c in self._chunks}
            if len(widths) != 1:
                raise ScatlasInputError(f"chunks have different numbers of columns {widths}",
                                        param="X")
            self._starts = np.cumsum([0] + [c.shape[0] for c in self._chunks])
            self._shape = (int(self._starts[-1]), widths.pop())
            self.X = None
            return
        if len(getattr(X, "shape", ())) != 2:
            raise ScatlasInputError(f"expected a 2-D cells x genes matrix, got {type(X)}",
                                    param="X")
        if sp.issparse(X) and X.format != "csr":
            X = sp.csr_matrix(X)
        self.X, self._chunks = X, None
        self._shape = (int(X.shape[0]), int(X.shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def rows(self, idx: np.ndarray) -> Any:
        idx = np.asarray(idx, dtype=np.int64)
        if self._chunks is None:
            return _compute(self.X[idx])
        which = np.searchsorted(self._starts, idx, side="right") - 1
        parts = [self._chunks[c].rows(idx[which == c] - self._starts[c])
                 for c in np.unique(which)]
        return sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.vstack(parts)

    def blocks(self, chunk_rows: int) -> Iterator[tuple[int, int, Any]]:
        chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
        for start in range(0, self._shape[0], chunk_rows):
            stop = min(start + chunk_rows, self._shape[0])
            yield start, stop, self[start:stop]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            lo, hi, step = key.indices(self._shape[0])
            if self._chunks is None and step == 1:
                return _compute(self.X[lo:hi])
            return self.rows(np.arange(lo, hi, step))
        return self.rows(key)


def as_row_source(X: Any) -> RowSource:
    """A :class:`RowSource` of ``X``: one as it is; a path to a zarr store or ``.h5ad`` (its
    ``X``, read lazily: a backed sparse dataset / on-disk array); else :class:`ArrayRows`."""
    if isinstance(X, RowSource):
        return X
    if isinstance(X, str | os.PathLike):
        path = Path(X)
        backed = read_zarr(path, backed=True) if path.is_dir() else read_h5ad(path,
                                                                              backed="r")
        return ArrayRows(backed.X)
    return ArrayRows(X)


# --------------------------------------------------------------------------------------------
# Chunked iteration
# --------------------------------------------------------------------------------------------


def iter_chunks(
    adata_or_path: ad.AnnData | PathLike,
    chunk_size: int = 10_000,
    layer: str | None = None,
) -> Iterator[tuple[int, int, Any]]:
    """Iterate over row blocks: yields ``(start, stop, X[start:stop])``.

    ``X_chunk`` has shape ``(stop - start, n_vars)`` and the stored dtype and kind: a
    ``scipy.sparse.csr_matrix`` for CSR (or CSC) data, a ``numpy.ndarray`` for dense data (a
    view for in-memory dense ``X``: copy before modifying), a CuPy array for GPU-resident data.

    Sources:

    * a path to an ``.h5ad``: only the rows of each chunk are read (CSR: ``indptr[start:stop+1]``
      then that slice of ``data`` / ``indices``); the file is open while the iterator lives;
    * a backed AnnData (``read_h5ad(path, backed="r")``): rows are read from its file; a layer,
      which anndata loads into memory in backed mode, is sliced in memory;
    * an in-memory AnnData: slices of ``X`` (or ``layers[layer]``); a CSC / COO matrix is
      converted to CSR once (a full copy) because row slicing of CSC is slow.

    CSC data on disk are read through anndata's sparse dataset (whole columns per chunk: slow for
    large files; a warning is logged).
    """
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    if isinstance(adata_or_path, str | os.PathLike):
        return _iter_path(_check_h5ad_path(adata_or_path), chunk_size, layer)
    if not isinstance(adata_or_path, ad.AnnData):
        raise ScatlasInputError(
            f"iter_chunks needs an AnnData or a path to an .h5ad, got {type(adata_or_path)}"
        )
    adata = adata_or_path
    if adata.isbacked and not adata.is_view and layer is None:
        return _iter_rows(adata.X, adata.n_obs, chunk_size)
    return _iter_rows(_in_memory_matrix(adata, layer), adata.n_obs, chunk_size)


def _in_memory_matrix(adata: ad.AnnData, layer: str | None) -> Any:
    if layer is not None:
        if layer not in adata.layers:
            raise ScatlasInputError(
                f"layer {layer!r} not found (available: {list(adata.layers.keys())})"
            )
        X = adata.layers[layer]
    else:
        X = adata.X
    if X is None:
        raise ScatlasInputError("adata.X is None; pass layer= to iterate over a layer")
    if sp.issparse(X) and X.format != "csr":
        X = sp.csr_matrix(X)  # row slicing of CSC / COO is slow or unsupported
    return X


def _iter_rows(X: Any, n_obs: int, chunk_size: int) -> Iterator[tuple[int, int, Any]]:
    for start in range(0, n_obs, chunk_size):
        stop = min(start + chunk_size, n_obs)
        yield start, stop, X[start:stop]


def _iter_path(path: Path, chunk_size: int, layer: str | None) -> Iterator[tuple[int, int, Any]]:
    key = "X" if layer is None else f"layers/{layer}"
    with h5py.File(path, "r") as f:
        if key not in f:
            layers = list(f["layers"].keys()) if "layers" in f else []
            what = "X" if layer is None else f"layer {layer!r}"
            raise ScatlasInputError(f"{str(path)!r} has no {what} (layers: {layers})")
        elem = f[key]
        encoding = elem.attrs.get("encoding-type", "array")
        if isinstance(elem, h5py.Dataset):
            yield from _iter_rows(elem, elem.shape[0], chunk_size)
        elif encoding == "csr_matrix":
            yield from _iter_csr_group(elem, chunk_size)
        elif encoding == "csc_matrix":
            from anndata.io import sparse_dataset

            log.warning("%s:%s is CSC; reading rows reads whole columns (slow)", path, key)
            ds = sparse_dataset(elem)
            for start, stop, chunk in _iter_rows(ds, ds.shape[0], chunk_size):
                yield start, stop, sp.csr_matrix(chunk)
        else:
            raise ScatlasInputError(f"{str(path)!r}:{key} has unsupported encoding {encoding!r}")


def _iter_csr_group(group: h5py.Group, chunk_size: int) -> Iterator[tuple[int, int, Any]]:
    n_obs, n_vars = (int(s) for s in group.attrs["shape"])
    indptr_ds, data_ds, indices_ds = group["indptr"], group["data"], group["indices"]
    for start in range(0, n_obs, chunk_size):
        stop = min(start + chunk_size, n_obs)
        indptr = indptr_ds[start : stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        indptr -= lo
        data, indices = data_ds[lo:hi], indices_ds[lo:hi]
        if hi < np.iinfo(np.int32).max:
            indptr = indptr.astype(np.int32)
            indices = indices.astype(np.int32, copy=False)
        chunk = sp.csr_matrix((data, indices, indptr), shape=(stop - start, n_vars), copy=False)
        yield start, stop, chunk


# --------------------------------------------------------------------------------------------
# Gene alignment
# --------------------------------------------------------------------------------------------


def _duplicates(names: pd.Index) -> list[str]:
    return names[names.duplicated()].unique().astype(str).tolist()


def _target_index(genes: Sequence[str] | pd.Index) -> pd.Index:
    if isinstance(genes, str):
        raise ScatlasInputError("genes must be a list of gene names, not a single string")
    target = pd.Index(np.asarray(list(genes), dtype=object).astype(str))
    if len(target) == 0:
        raise ScatlasInputError("genes is empty; give the target gene list")
    dup = _duplicates(target)
    if dup:
        raise ScatlasInputError(
            f"the target gene list has {len(dup)} duplicated name(s), e.g. {dup[:5]}; gene "
            "names must be unique"
        )
    return target


def align_genes(
    adata: ad.AnnData,
    genes: Sequence[str] | pd.Index,
    *,
    min_overlap: float = 0.5,
    fill: float = 0,
) -> ad.AnnData:
    """A new AnnData whose columns are exactly ``genes``, in that order.

    Column ``j`` of the result holds ``adata``'s column for ``genes[j]`` (exact, case-sensitive
    match on ``var_names``); genes absent from ``adata`` are filled with ``fill`` (0: no stored
    entries, so sparse stays sparse); genes of ``adata`` not in ``genes`` are dropped. ``X`` and
    every layer are aligned the same way, keeping their kind (CSR/CSC -> CSR, dense -> dense,
    CPU or GPU) and dtype; ``var`` is reindexed (missing genes get NaN); ``obs``, ``obsm``,
    ``obsp``, ``uns`` and ``raw`` are kept; ``varm`` / ``varp`` are dropped.

    The overlap is logged and stored in ``.uns["scatlas_alignment"]``: ``n_target``,
    ``n_found`` (target genes present), ``fraction`` (``n_found / n_target``), ``n_source``,
    ``n_dropped`` (source genes not in the target) and ``missing_examples``.

    Raises :class:`~scatlas._validate.ScatlasInputError` when no gene overlaps, when the overlap
    fraction is below ``min_overlap``, or when ``adata.var_names`` or ``genes`` has duplicates.
    A backed AnnData is loaded into memory first.
    """
    target = _target_index(genes)
    if not 0 <= min_overlap <= 1:
        raise ScatlasInputError(f"min_overlap must be in [0, 1], got {min_overlap!r}")
    source = adata.var_names
    dup = _duplicates(source)
    if dup:
        raise ScatlasInputError(
            f"adata.var_names has {len(dup)} duplicated gene name(s), e.g. {dup[:5]}; make them "
            "unique first (adata.var_names_make_unique()) or aggregate the duplicates"
        )
    positions = source.get_indexer(target)  # (n_target,) source column or -1
    info = _overlap_info(source, target, positions)
    _check_overlap(info, min_overlap, source, target)
    log.info(
        "align_genes: %d of %d target genes found (%.1f%%); %d source genes dropped",
        info["n_found"], info["n_target"], 100 * info["fraction"], info["n_dropped"],
    )
    if adata.isbacked:
        adata = adata.to_memory()
    X = None if adata.X is None else _align_matrix(adata.X, positions, fill)
    layers = {k: _align_matrix(v, positions, fill) for k, v in adata.layers.items()}
    out = ad.AnnData(
        X=X,
        obs=adata.obs.copy(),
        var=adata.var.reindex(target),
        obsm={k: v.copy() for k, v in adata.obsm.items()},
        obsp={k: v.copy() for k, v in adata.obsp.items()},
        uns=dict(adata.uns),
        layers=layers,
    )
    if adata.raw is not None:
        out.raw = adata.raw.to_adata()
    out.uns["scatlas_alignment"] = info
    return out


def gene_positions(
    source: Sequence[str] | pd.Index,
    genes: Sequence[str] | pd.Index,
    *,
    min_overlap: float = 0.5,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Column of ``source`` for every gene of ``genes`` (-1: absent), with the overlap checks of
    :func:`align_genes`; returns ``(positions int64 (len(genes),), info)``.

    Use with :func:`align_matrix` to align row chunks of a large (backed) matrix one at a time.
    """
    target = _target_index(genes)
    source = pd.Index(source)
    if not 0 <= min_overlap <= 1:
        raise ScatlasInputError(f"min_overlap must be in [0, 1], got {min_overlap!r}")
    dup = _duplicates(source)
    if dup:
        raise ScatlasInputError(
            f"the input has {len(dup)} duplicated gene name(s), e.g. {dup[:5]}; make them "
            "unique first (adata.var_names_make_unique()) or aggregate the duplicates"
        )
    positions = np.asarray(source.get_indexer(target), dtype=np.int64)
    info = _overlap_info(source, target, positions)
    _check_overlap(info, min_overlap, source, target)
    return positions, info


def align_matrix(X: Any, positions: np.ndarray, fill: float = 0) -> Any:
    """Columns ``positions`` of ``X`` (from :func:`gene_positions`; -1: a column of ``fill``),
    keeping the matrix kind (CSR -> CSR, dense -> dense, CPU or GPU)."""
    return _align_matrix(X, np.asarray(positions), fill)


def _overlap_info(source: pd.Index, target: pd.Index, positions: np.ndarray) -> dict[str, Any]:
    found = positions >= 0
    n_found = int(found.sum())
    return {
        "n_target": len(target),
        "n_found": n_found,
        "fraction": n_found / len(target),
        "n_source": len(source),
        "n_dropped": len(source) - n_found,
        "missing_examples": np.asarray(target[~found][:10], dtype=object),
    }


def _check_overlap(
    info: dict[str, Any], min_overlap: float, source: pd.Index, target: pd.Index
) -> None:
    n_found, n_target = info["n_found"], info["n_target"]
    if n_found == 0:
        raise ScatlasInputError(
            f"no overlapping genes: 0 of {n_target} target genes are in adata.var_names "
            f"({len(source)} genes). Target genes look like {list(target[:3])}, adata's like "
            f"{list(source[:3].astype(str))} (gene symbols vs IDs? species? case?)"
        )
    if info["fraction"] < min_overlap:
        raise ScatlasInputError(
            f"only {n_found} of {n_target} target genes ({info['fraction']:.1%}) are in "
            f"adata.var_names, below min_overlap={min_overlap:.1%}; lower min_overlap to accept "
            "this alignment"
        )


def _align_matrix(X: Any, positions: np.ndarray, fill: float) -> Any:
    """Columns ``positions`` of ``X`` (-1: a column of ``fill``). Works on CPU and GPU data."""
    n_obs, n_target = X.shape[0], positions.shape[0]
    if not backend.issparse(X):
        xp = backend.array_module(X)
        X = xp.asarray(X)
        found = np.flatnonzero(positions >= 0)
        dtype = np.result_type(X.dtype, np.asarray(fill).dtype) if fill != 0 else X.dtype
        out = xp.full((n_obs, n_target), fill, dtype=dtype)
        out[:, xp.asarray(found)] = X[:, xp.asarray(positions[found])]
        return out
    out = _align_csr(X.tocsr() if X.format != "csr" else X, positions)
    if fill != 0:
        out = out + _fill_columns(out, positions < 0, fill)
    return out


def _align_csr(X: Any, positions: np.ndarray) -> Any:
    """Remap CSR column indices to target positions, dropping columns not in the target."""
    xp, sparse = backend.array_module(X), backend.sparse_module(X)
    mapping = np.full(X.shape[1], -1, dtype=np.int64)
    found = np.flatnonzero(positions >= 0)
    mapping[positions[found]] = found
    new_cols = xp.asarray(mapping)[X.indices]
    keep = new_cols >= 0
    kept_before = xp.concatenate([xp.zeros(1, dtype=np.int64), xp.cumsum(keep, dtype=np.int64)])
    indptr = kept_before[X.indptr]
    index_dtype = np.int32 if positions.shape[0] < np.iinfo(np.int32).max else np.int64
    if int(indptr[-1]) < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    out = sparse.csr_matrix(
        (X.data[keep], new_cols[keep].astype(index_dtype), indptr),
        shape=(X.shape[0], positions.shape[0]),
    )
    out.sort_indices()
    return out


def _fill_columns(like: Any, missing: np.ndarray, fill: float) -> Any:
    """A CSR matrix holding ``fill`` in every row of the ``missing`` columns."""
    xp, sparse = backend.array_module(like), backend.sparse_module(like)
    n_obs, cols = like.shape[0], np.flatnonzero(missing)
    dtype = np.result_type(like.dtype, np.asarray(fill).dtype)
    data = xp.full(n_obs * cols.size, fill, dtype=dtype)
    indices = xp.asarray(np.tile(cols, n_obs).astype(np.int32))
    indptr = xp.asarray(np.arange(n_obs + 1, dtype=np.int64) * cols.size)
    return sparse.csr_matrix((data, indices, indptr), shape=like.shape)


# --------------------------------------------------------------------------------------------
# Atomic writing
# --------------------------------------------------------------------------------------------


@contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` atomically.

    The temporary path (``.<name>.<random>.tmp<suffix>`` in the same folder, so ``os.replace``
    is atomic and the suffix is kept for writers that check it) does not exist yet: the writer
    creates it as a file or a folder. A folder replacing an existing folder is swapped in by two
    renames (old folder aside, new one in, old one deleted), so ``path`` is at every moment
    either the complete old folder or the complete new one. If the ``with`` body raises
    (including ``KeyboardInterrupt``), the temporary file or folder is removed and ``path`` is
    left as it was. The folder of ``path`` must exist.

    Example::

        with atomic_write("index.npz") as tmp:
            np.savez(tmp, vectors=v)
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} does not exist (writing {str(path)!r})")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=folder)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()  # the writer creates it, with the usual permissions
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic_write: nothing was written to {str(tmp)!r}")
        if tmp.is_dir() and path.is_dir():
            swap_folder(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def swap_folder(new: str | Path, path: str | Path) -> None:
    """Move the finished folder ``new`` onto ``path`` (same parent folder).

    An existing ``path`` is first renamed to a hidden backup beside it (``.<name>.old-*``, listed
    by :func:`folder_backups`), then ``new`` is renamed in and the backup deleted: ``path`` is
    at every moment the complete old folder or the complete new one, and a crash between the two
    renames leaves the old folder as a backup a reader can recover.
    """
    new, path = Path(new), Path(path)
    if not path.exists():
        os.replace(new, path)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    backup.rmdir()
    os.replace(path, backup)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(backup, path)
        raise
    remove_path(backup)


def folder_backups(path: str | Path) -> list[Path]:
    """Backups of ``path`` left by an interrupted :func:`swap_folder`, newest first."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime,
                  reverse=True)


def remove_path(tmp: Path) -> None:
    """Remove a file or a folder (a temporary left by an interrupted write), best effort: a
    failure is logged, not raised."""
    try:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
    except OSError:  # pragma: no cover - best effort cleanup
        log.warning("could not remove temporary file %s", tmp)


def write_h5ad(adata: ad.AnnData, path: PathLike, *, compression: str | None = None) -> Path:
    """Write ``adata`` to ``path`` atomically (see :func:`atomic_write`); return the path.

    ``compression`` is passed to ``AnnData.write_h5ad`` (``"gzip"``, ``"lzf"`` or None). GPU
    matrices are not written: move them to the host first (``backend.anndata_to_host``).
    """
    if not isinstance(adata, ad.AnnData):
        raise ScatlasInputError(f"write_h5ad needs an AnnData, got {type(adata)}")
    on_gpu = [k for k, m in [("X", adata.X), *adata.layers.items()] if backend.is_gpu_array(m)]
    if on_gpu:
        raise ScatlasInputError(
            f"{on_gpu} are on the GPU; move them to the host first "
            "(scatlas.backend.anndata_to_host(adata))"
        )
    path = Path(path)
    with atomic_write(path) as tmp:
        adata.write_h5ad(tmp, compression=compression)
    return path
