"""``scatlas.atlas.build``: raw counts on disk -> embeddings, metadata, a search index, a report.

Stages, each written atomically (a temporary sibling, then a rename) and recorded in
``DIR/atlas_state.json`` when finished, so that a crash leaves no half-written output and a
rerun resumes after the last finished stage:

1. ``embed`` -> ``DIR/embeddings.zarr``: the stores are read lazily as Dask arrays
   (:func:`scatlas.io.read_dask`), their genes aligned to the model's
   (:func:`scatlas.io.gene_positions`: reorder, zero-fill, ``min_overlap`` enforced),
   normalised by scanpy's Dask support (``normalize_total(target_sum=1e4)`` + ``log1p``, over
   the model's genes as :meth:`MetricEncoder.embed` does for counts) and embedded block by
   block on the Dask workers (each loads the model folder once). One streaming pass; at most
   ``2 x workers + 2`` blocks are in flight, and the driver writes each finished block into
   the zarr array (``(n_cells, latent_dim)`` float32, chunks of ``chunk_rows`` rows).
2. ``metadata`` -> ``DIR/metadata.parquet``: the stores' ``obs`` (cell names in the ``cell``
   column; a ``source`` column when there are several stores).
3. ``index`` -> ``DIR/index``: :meth:`scatlas.search.CellIndex.build` over the stored
   embeddings streamed in chunks (the CellIndex format; ``scatlas serve --index DIR/index``);
   its recall@10 against exact search over the stored embeddings is measured on a sample of
   cells, and an IVF index's ``nprobe`` raised until it reaches ``recall_target``.
4. ``report`` -> ``DIR/report.json``, ``DIR/report.md``, ``DIR/report.png``: per-stage seconds,
   cells/s, peak RSS of the driver and of each worker, disk use, and that recall.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import _progress
from .._validate import ScatlasInputError, check_positive_int
from ..io import align_matrix, atomic_write, gene_positions, read_dask, remove_path
from . import _dask
from ._report import disk_bytes, recall_at_k, write_report

__all__ = ["STAGES", "build"]

STAGES = ("embed", "metadata", "index", "report")
STATE = "atlas_state.json"
STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# inputs and state
# ----------------------------------------------------------------------------------------------
def _is_store(path: Path) -> bool:
    return path.suffix == ".h5ad" and path.is_file() or path.is_dir() and any(
        (path / name).is_file() for name in (".zgroup", "zarr.json"))


def resolve_sources(source: Any) -> list[Path]:
    """The stores of ``source``: a zarr store or ``.h5ad``, a folder of them (``*.zarr``,
    ``*.h5ad``, in name order), or a list of stores."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no such store or folder: {str(path)!r}")
        if _is_store(path):
            return [path.resolve()]
        found = sorted(p for p in path.iterdir() if _is_store(p))
        if not found:
            raise ScatlasInputError(f"{str(path)!r} is neither a zarr / .h5ad store nor a folder "
                                    "of them", param="source")
        return [p.resolve() for p in found]
    if isinstance(source, Sequence) and source:
        return [p for s in source for p in resolve_sources(s)]
    raise ScatlasInputError(f"source must be a path or a list of paths, got {source!r}",
                            param="source")


def _read_state(out: Path) -> dict[str, Any]:
    path = out / STATE
    if not path.is_file():
        return {"version": STATE_VERSION, "settings": None, "stages": {}}
    return json.loads(path.read_text())


def _write_state(out: Path, state: dict[str, Any]) -> None:
    with atomic_write(out / STATE) as tmp:
        tmp.write_text(json.dumps(state, indent=1, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _clean_temporaries(out: Path) -> None:
    """Remove what an interrupted stage left (hidden ``.*.tmp*`` siblings of atomic_write)."""
    for tmp in out.glob(".*.tmp*"):
        remove_path(tmp)


def _done(out: Path, state: dict[str, Any], stage: str) -> bool:
    outputs = {"embed": ["embeddings.zarr"], "metadata": ["metadata.parquet"],
               "index": ["index"], "report": ["report.json", "report.md"]}[stage]
    return stage in state["stages"] and all((out / name).exists() for name in outputs)


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
def _lognorm_blocks(path: Path, genes: pd.Index, chunk_rows: int, min_overlap: float) -> Any:
    """The store's counts as a lazy Dask array aligned to ``genes`` and log-normalised."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    lazy = read_dask(path, chunk_rows=chunk_rows, obs=False)
    positions, _ = gene_positions(lazy.var_names, genes, min_overlap=min_overlap)
    X = lazy.X
    meta = sp.csr_matrix((0, len(genes)), dtype=np.float32) if sp.issparse(X._meta) else \
        np.empty((0, len(genes)), np.float32)
    X = X.map_blocks(align_matrix, positions, chunks=(X.chunks[0], (len(genes),)),
                     dtype=np.float32, meta=meta)
    aligned = ad.AnnData(X=X.astype(np.float32))
    sc.pp.normalize_total(aligned, target_sum=1e4)
    sc.pp.log1p(aligned)
    return aligned.X


def _stage_embed(out: Path, sources: list[Path], model: Any, model_ref: Any, client: Any,
                 chunk_rows: int, batch_size: int, min_overlap: float,
                 progress: bool | None) -> dict[str, Any]:
    import zarr
    from dask import delayed
    from distributed import as_completed

    blocks: list[tuple[int, int, Any]] = []
    n = 0
    task = delayed(_dask.embed_block, pure=True)
    for path in sources:
        X = _lognorm_blocks(path, model.genes, chunk_rows, min_overlap)
        for rows, block in zip(X.chunks[0], X.to_delayed().ravel(), strict=True):
            blocks.append((n, n + rows, task(block, model_ref, batch_size)))
            n += rows
    d = None
    window = 2 * max(1, len(client.scheduler_info().get("workers", {}))) + 2
    with atomic_write(out / "embeddings.zarr") as tmp:
        arr = None
        pending = {}
        queue = iter(blocks)
        done_cells = 0
        with _progress.bar(desc="embed", total=n, progress=progress, unit="cells") as bar:
            ac = as_completed()

            def submit() -> None:
                nxt = next(queue, None)
                if nxt is not None:
                    fut = client.compute(nxt[2])
                    pending[fut.key] = nxt[:2]
                    ac.add(fut)

            for _ in range(window):
                submit()
            for fut in ac:
                lo, hi = pending.pop(fut.key)
                z = fut.result()
                fut.release()
                if arr is None:
                    d = z.shape[1]
                    arr = zarr.open_array(str(tmp), mode="w", shape=(n, d), dtype="float32",
                                          chunks=(min(chunk_rows, n), d))
                arr[lo:hi] = z
                done_cells += hi - lo
                bar.update(hi - lo)
                submit()
        if arr is None or done_cells != n:
            raise RuntimeError(f"embedded {done_cells} of {n} cells")
        workers = _dask.worker_peak_rss(client)
        arr.attrs.update({"n_cells": n, "latent_dim": d, "sources": [str(s) for s in sources],
                          "model": str(model_ref) if isinstance(model_ref, str | Path) else
                          repr(model_ref)})
    return {"cells": n, "latent_dim": d, "n_blocks": len(blocks), "worker_peak_rss": workers}


def _read_obs(path: Path) -> pd.DataFrame:
    """``obs`` of a zarr store or an ``.h5ad``, without reading ``X``."""
    from anndata.io import read_elem

    if path.is_dir():
        import zarr

        return read_elem(zarr.open_group(str(path), mode="r")["obs"])
    import h5py

    with h5py.File(path, "r") as f:
        return read_elem(f["obs"])


def _stage_metadata(out: Path, sources: list[Path]) -> dict[str, Any]:
    frames = []
    for path in sources:
        obs = _read_obs(path)
        obs.index.name = "cell"
        if len(sources) > 1:
            obs["source"] = path.name
        frames.append(obs.reset_index())
    meta = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    with atomic_write(out / "metadata.parquet") as tmp:
        meta.to_parquet(tmp, index=False)
    return {"cells": len(meta), "columns": list(meta.columns)}


def _embedding_chunks(arr: Any, step: int) -> Iterator[np.ndarray]:
    for lo in range(0, arr.shape[0], step):
        yield np.asarray(arr[lo:lo + step], dtype=np.float32)


def _stage_index(out: Path, index_options: dict[str, Any], chunk_rows: int, n_queries: int,
                 recall_target: float | None, progress: bool | None) -> dict[str, Any]:
    """Build the index over the stored embeddings, measure its recall@10 against exact search
    (raising ``nprobe`` of an IVF index, unless given, until ``recall_target``), save it."""
    import zarr

    from ..search import CellIndex

    arr = zarr.open_array(str(out / "embeddings.zarr"), mode="r")
    meta = pd.read_parquet(out / "metadata.parquet")
    if len(meta) != arr.shape[0]:
        raise ScatlasInputError(f"metadata.parquet has {len(meta)} rows for {arr.shape[0]} "
                                "embeddings; rebuild with restart=True")
    step = max(chunk_rows, 50_000)
    metas = (meta.iloc[lo:lo + step] for lo in range(0, len(meta), step))
    index = CellIndex.build(_embedding_chunks(arr, step), metas, chunk_size=step,
                            progress=progress, **index_options)
    t0 = time.perf_counter()
    target = recall_target if index_options.get("nprobe") is None else None
    recall = recall_at_k(index, arr, k=10, n_queries=n_queries, seed=index_options["seed"],
                         target=target)
    recall["seconds"] = time.perf_counter() - t0
    index.save(out / "index")
    return {"cells": len(index), "engine": index.engine, "nlist": index.nlist,
            "nprobe": index.nprobe, "metric": index.metric, "recall": recall}


def _stage_report(out: Path, state: dict[str, Any]) -> dict[str, Any]:
    write_report(out, state, state["stages"]["index"]["recall"])
    return {"cells": int(state["stages"]["embed"]["cells"])}


# ----------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------
def _model_ref(model: Any, out: Path) -> tuple[Any, Any]:
    """(the loaded model, what the workers load it from: its folder, or the object)."""
    from ..search.pipeline import load_model

    if isinstance(model, str | Path):
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"no such model folder: {str(path)!r}")
        return load_model(str(path)), str(path.resolve())
    if not hasattr(model, "embed") or not hasattr(model, "genes"):
        raise ScatlasInputError("model must be a model folder or a trained encoder (with "
                                "embed() and genes)", param="model")
    return model, model


def build(source: Any, model: Any, out: str | Path, *, client: Any = None,
          scheduler: str | None = None, n_workers: int | None = None, chunk_rows: int = 20_000,
          batch_size: int = 4096, min_overlap: float = 0.5, metric: str = "cosine",
          engine: str = "auto", nlist: int | None = None, nprobe: int | None = None,
          n_queries: int = 1000, recall_target: float | None = 0.95, seed: int = 0,
          restart: bool = False,
          progress: bool | None = None) -> dict[str, Any]:
    """Build a searchable atlas from raw counts on disk in ``out`` (see the module docstring).

    Parameters
    ----------
    source
        A zarr store or ``.h5ad`` of raw counts (cells x genes, CSR or dense; ``var_names`` are
        gene names), a folder of them, or a list of them.
    model
        A trained encoder's folder (:func:`scatlas.models.load`; each Dask worker loads it) or
        the encoder itself (it must pickle to the workers).
    out
        The atlas folder (created; its parent must exist).
    client, scheduler, n_workers
        The Dask cluster of the ``embed`` stage: ``client`` (a ``distributed.Client``), else
        one connected to the ``scheduler`` address, else a new local cluster of ``n_workers``
        single-threaded processes (default: the usable cores, at most 4), closed at the end.
    chunk_rows, batch_size
        Cells per Dask block (and per zarr chunk of the embeddings), and per model batch.
    min_overlap
        Smallest fraction of the model's genes that a store must have.
    metric, engine, nlist, nprobe
        Of the index (:meth:`scatlas.search.CellIndex.build`).
    n_queries, recall_target, seed
        Stored cells searched for the recall@10 against exact search (reported). An IVF
        index's ``nprobe`` (unless given) is doubled until that recall reaches
        ``recall_target`` (None: measured only) and saved with the index.
    restart
        Discard finished stages of an earlier build in ``out`` and start over.

    Returns the report (also ``out/report.json``): per-stage seconds, cells/s, peak RSS of the
    driver and workers (bytes), disk use (bytes), recall@10. A rerun after a crash resumes with
    the first unfinished stage; it must use the same sources, model and settings (else
    :class:`~scatlas.exceptions.ScatlasInputError`: pass ``restart=True`` or another ``out``).
    """
    out = Path(out)
    chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
    batch_size = check_positive_int(batch_size, "batch_size")
    sources = resolve_sources(source)
    if out.exists() and not out.is_dir():
        raise ScatlasInputError(f"out {str(out)!r} is a file, not a folder", param="out")
    out.mkdir(exist_ok=True)
    _clean_temporaries(out)
    settings = {"sources": [str(s) for s in sources],
                "model": str(Path(model).resolve()) if isinstance(model, str | Path) else
                repr(model), "chunk_rows": chunk_rows, "min_overlap": min_overlap,
                "metric": metric, "engine": engine, "nlist": nlist, "nprobe": nprobe,
                "seed": seed}
    state = _read_state(out)
    if restart:
        state = {"version": STATE_VERSION, "settings": None, "stages": {}}
    if state["settings"] not in (None, settings):
        raise ScatlasInputError(
            f"{str(out)!r} holds an atlas built with other settings ({state['settings']}); "
            "pass restart=True (--restart) or choose another out", param="out")
    state["settings"] = settings
    index_options = {"metric": metric, "engine": engine, "nlist": nlist, "nprobe": nprobe,
                     "seed": seed}
    for stage in STAGES:
        if _done(out, state, stage):
            continue
        t0 = time.perf_counter()
        if stage == "embed":
            loaded, ref = _model_ref(model, out)
            with _dask.cluster(client, scheduler, n_workers) as cl:
                record = _stage_embed(out, sources, loaded, ref, cl, chunk_rows, batch_size,
                                      min_overlap, progress)
        elif stage == "metadata":
            record = _stage_metadata(out, sources)
        elif stage == "index":
            record = _stage_index(out, index_options, chunk_rows, n_queries, recall_target,
                                  progress)
        else:
            state["stages"]["report"] = {"seconds": 0.0}  # listed in its own report
            record = _stage_report(out, state)
        seconds = time.perf_counter() - t0
        output = {"embed": "embeddings.zarr", "metadata": "metadata.parquet",
                  "index": "index", "report": "report.json"}[stage]
        record.update(seconds=seconds, cells_per_s=record.get("cells", 0) / max(seconds, 1e-9),
                      driver_peak_rss=_dask.peak_rss(), disk_bytes=disk_bytes(out / output),
                      finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        state["stages"][stage] = record
        if stage == "report":
            write_report(out, state, state["stages"]["index"]["recall"])
        _write_state(out, state)
    return json.loads((out / "report.json").read_text())
