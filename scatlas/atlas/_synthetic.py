"""A synthetic atlas written to an AnnData zarr store chunk by chunk, generated on Dask.

The cells are those of :func:`scatlas.datasets.synthetic` with the same parameters (the
generator draws every 512-cell block from its own seed, so the worker that generates a chunk
does not matter). Dask workers generate chunks of ``chunk_size`` cells in parallel; the driver
appends them in order to ``X`` (CSR, anndata's on-disk encoding, through
``anndata.io.sparse_dataset(...).append``), with at most ``2 x workers + 2`` chunks in flight,
so memory stays bounded by a few chunks whatever ``n_cells``, plus ``obs`` (built at the end:
two int8 codes and one name per cell, about 70 bytes per cell). The store appears atomically.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .. import _progress
from .._validate import check_positive_int
from ..io import atomic_write
from . import _dask


def synthetic_chunk(model: Any, start: int, stop: int) -> tuple[sp.csr_matrix, np.ndarray,
                                                                  np.ndarray]:
    """Cells ``[start, stop)`` of the atlas of ``model``: (CSR float32 counts, type codes,
    batch codes)."""
    from .. import backend
    from ..datasets import BLOCK_SIZE, generate_block, slice_block, stack_blocks

    b0, b1 = start // BLOCK_SIZE, (stop - 1) // BLOCK_SIZE + 1
    with backend.serial_blas():
        blocks = [generate_block(model, b) for b in range(b0, b1)]
    block = slice_block(stack_blocks(blocks), start - b0 * BLOCK_SIZE, stop - b0 * BLOCK_SIZE)
    return sp.csr_matrix(block.X), block.types.astype(np.int16), block.batches.astype(np.int16)


def write_synthetic_zarr(path: str | os.PathLike, n_cells: int = 1_000_000, n_genes: int = 2_000,
                         *, chunk_size: int = 50_000, client: Any = None,
                         scheduler: str | None = None, n_workers: int | None = None,
                         progress: bool | None = None, **params: Any) -> dict[str, Any]:
    """Write ``synthetic(n_cells, n_genes, **params)`` to the zarr store ``path``.

    ``X``: CSR float32 counts (int32 indices), ``obs`` with ``cell_type`` / ``batch``
    categoricals and ``cell...`` names, ``var`` ``gene...`` names, ``uns['synthetic']``.
    Readable lazily by :func:`scatlas.io.read_dask` / :func:`scatlas.io.read_zarr`
    (``backed=True``). ``client`` / ``scheduler`` / ``n_workers`` as in
    :func:`scatlas.atlas.build` (default: a local cluster). Protein / ATAC modalities are not
    written. Returns ``{"path", "n_cells", "seconds", "cells_per_s", "driver_peak_rss",
    "worker_peak_rss", "disk_bytes"}``.
    """
    import pandas as pd
    import zarr
    from anndata.io import sparse_dataset, write_elem

    from ..datasets import Block, build_model, make_spec, numbered_names, obs_frame, uns_record
    from ._report import disk_bytes

    n_cells = check_positive_int(n_cells, "n_cells")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    params.pop("protein", None)
    params.pop("atac", None)
    model = build_model(make_spec(n_genes, params))
    path = Path(path)
    t0 = time.perf_counter()
    starts = list(range(0, n_cells, chunk_size))
    types, batches = [], []
    with _dask.cluster(client, scheduler, n_workers) as cl, atomic_write(path) as tmp, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's zarr v2 notice
        root = zarr.open_group(str(tmp), mode="w")
        remote = cl.scatter(model, broadcast=True)
        window = 2 * max(1, len(cl.scheduler_info().get("workers", {}))) + 2
        futures = []
        nxt = 0
        X = None
        with _progress.bar(desc="synthetic zarr", total=n_cells, progress=progress,
                           unit="cells") as bar:
            while nxt < len(starts) or futures:
                while nxt < len(starts) and len(futures) < window:
                    s = starts[nxt]
                    futures.append(cl.submit(synthetic_chunk, remote, s,
                                             min(n_cells, s + chunk_size), pure=False))
                    nxt += 1
                fut = futures.pop(0)
                counts, t, b = fut.result()
                fut.release()
                if X is None:
                    write_elem(root, "X", counts)
                    X = sparse_dataset(root["X"])
                else:
                    X.append(counts)
                types.append(t)
                batches.append(b)
                bar.update(counts.shape[0])
        codes = Block(None, np.concatenate(types), np.concatenate(batches), None, None)
        obs = obs_frame(model, codes, 0, n_cells)
        write_elem(root, "obs", obs)
        write_elem(root, "var", pd.DataFrame(index=pd.Index(numbered_names("gene", n_genes))))
        uns = uns_record(model, n_cells)
        write_elem(root, "uns", {"synthetic": uns})
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(root, key, {})
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        worker_rss = _dask.worker_peak_rss(cl)
    seconds = time.perf_counter() - t0
    return {"path": str(path), "n_cells": n_cells, "n_genes": n_genes, "seconds": seconds,
            "cells_per_s": n_cells / seconds, "driver_peak_rss": _dask.peak_rss(),
            "worker_peak_rss": worker_rss, "disk_bytes": disk_bytes(path)}
