"""``scatlas index`` / ``search`` / ``annotate`` / ``serve``: cell search from the command line.

Usage::

    scatlas index build REF.h5ad --out ref_index/ --obsm-key X_scatlas --metric cosine
    scatlas index build emb.npy --out ref_index/ --metadata cells.parquet --engine faiss-ivf
    scatlas index info ref_index/
    scatlas index calibrate ref_index/ HELD_OUT.h5ad --model model/ --label-key cell_type
    scatlas search --index ref_index/ QUERY.h5ad --k 10 --out hits.parquet
    scatlas search --index ref_index/ --model model/ RAW.h5ad --k 10 --out hits.csv
    scatlas annotate --index ref_index/ --model model/ RAW.h5ad --label-key cell_type \\
        --out annotated.h5ad
    scatlas serve --index ref_index/ --model model/ --host 127.0.0.1 --port 8000

``index build`` takes the embeddings from ``obsm[--obsm-key]`` of an ``.h5ad`` (metadata: its
``obs``) or from an ``.npy`` (metadata: ``--metadata`` CSV / parquet, optional). ``search``
writes one row per (query, rank): ``query``, ``rank``, ``id``, ``distance`` and the hit's
metadata columns (CSV or parquet by the ``--out`` suffix; CSV on stdout without ``--out``).
``index calibrate`` sets the out-of-distribution threshold from held-out reference cells
(:meth:`~scatlas.search.CellIndex.calibrate_ood`). ``annotate`` embeds raw counts with
``--model`` (or reads ``obsm[--obsm-key]``) and writes
``obs['scatlas_label' | '_confidence' | '_vs_second' | '_min_dist' | '_is_ood']``; with
``--truth-key`` it scores the labels against the query's true ones (accuracy, ECE) and with
``--report DIR`` writes the reliability table and diagram
(:mod:`scatlas.search.calibration`).
``serve`` runs the HTTP service (:mod:`scatlas.search.service`) under uvicorn until SIGTERM /
SIGINT, then drains in-flight requests and exits 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._validate import ScatlasInputError


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _read_table(path: str):
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {path!r}")
    if p.suffix == ".parquet":
        return pd.read_parquet(p)
    if p.suffix in (".csv", ".gz"):
        return pd.read_csv(p, index_col=0)
    if p.suffix == ".tsv":
        return pd.read_csv(p, sep="\t", index_col=0)
    raise ScatlasInputError(f"--metadata must be .csv, .tsv or .parquet, got {path!r}")


def _load_npy(path: Path) -> np.ndarray:
    try:
        X = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ScatlasInputError(f"could not read {str(path)!r} as a .npy array: {err}") from err
    if X.ndim != 2:
        raise ScatlasInputError(f"{str(path)!r} must hold a 2-D (cells x dims) array, got shape "
                                f"{X.shape}")
    return np.ascontiguousarray(X, dtype=np.float32)


def _embeddings(path: str, obsm_key: str, model: Any = None):
    """``(embeddings float32 (n, d), obs DataFrame or None, AnnData or None)`` from a file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {path!r}")
    if p.suffix == ".npy":
        if model is not None:
            raise ScatlasInputError("--model needs an .h5ad of raw counts, not an .npy")
        return _load_npy(p), None, None
    if p.suffix != ".h5ad":
        raise ScatlasInputError(f"expected an .h5ad or .npy file, got {path!r}")
    from .. import io
    from ..search.pipeline import query_embeddings

    adata = io.read_h5ad(p)
    emb = query_embeddings(adata, model, obsm_key=obsm_key, store=False)
    return np.ascontiguousarray(emb, dtype=np.float32), adata.obs, adata


def _parse_filter(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text  # a pandas query string


def _write_table(table, out: str | None) -> None:
    from ..io import atomic_write

    if out is None:
        table.to_csv(sys.stdout, index=False)
        return
    path = Path(out)
    if path.suffix not in (".csv", ".parquet", ".tsv"):
        raise ScatlasInputError(f"--out must end in .csv, .tsv or .parquet, got {out!r}")
    with atomic_write(path) as tmp:
        if path.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False, sep="\t" if path.suffix == ".tsv" else ",")


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def cmd_index_build(args: argparse.Namespace) -> int:
    from ..search import CellIndex

    t0 = time.perf_counter()
    emb, obs, _ = _embeddings(args.input, args.obsm_key)
    metadata = obs
    if args.metadata:
        metadata = _read_table(args.metadata)
        if len(metadata) != emb.shape[0]:
            raise ScatlasInputError(f"--metadata has {len(metadata)} rows but there are "
                                    f"{emb.shape[0]} embeddings")
    kwargs: dict[str, Any] = {"metric": args.metric, "engine": args.engine}
    if args.nlist is not None:
        kwargs["nlist"] = args.nlist
    for name in ("nprobe", "device", "list_dtype", "rerank"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    index = CellIndex.build(emb, metadata, **kwargs)
    index.save(args.out)
    _log(f"index build: {index.ntotal} vectors of dimension {index.dim} ({index.engine}, "
         f"{index.metric}) -> {args.out} in {time.perf_counter() - t0:.2f} s")
    if args.map != "none":
        _make_map(args.out, emb, args.map, index.metric, args.map_seed)
    else:
        _log("index build: no 2-D map stored (the web page of scatlas serve draws one and "
             "queries by cell id with it): add --map tsne, or run scatlas index map later")
    return 0


def _make_map(index_dir: str, emb: Any, method: str, metric: str, seed: int) -> None:
    """Compute the 2-D map of ``emb`` and store it (with the embeddings) in the index folder."""
    from ..search.atlas_map import compute_map, save_map

    t0 = time.perf_counter()
    emb = np.asarray(emb, dtype=np.float32)
    coords = compute_map(emb, method, metric=metric, seed=seed)
    path = save_map(index_dir, emb, coords, method=method, seed=seed)
    _log(f"index map: {method} of {emb.shape[0]} cells -> {path} in "
         f"{time.perf_counter() - t0:.2f} s")


def cmd_index_map(args: argparse.Namespace) -> int:
    from ..search import CellIndex

    index = CellIndex.load(args.index, device="cpu")
    emb, _, _ = _embeddings(args.embeddings, args.obsm_key)
    if emb.shape != (index.next_id, index.dim):
        raise ScatlasInputError(f"the embeddings have shape {list(emb.shape)} but the index "
                                f"holds ids 0..{index.next_id - 1} of dimension {index.dim}: "
                                "give the embeddings the index was built from, in id order")
    _make_map(args.index, emb, args.method, index.metric, args.seed)
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from ..search import CellIndex

    index = CellIndex.load(args.index)
    meta = index.metadata
    info = {"ntotal": int(index.ntotal), "dim": int(index.dim), "metric": index.metric,
            "engine": index.engine, "nprobe": getattr(index, "nprobe", None),
            "metadata_columns": [] if meta is None else [str(c) for c in meta.columns]}
    threshold, source, rule = index.ood_threshold()
    info["ood"] = {"threshold": threshold, "source": source, "rule": rule}
    print(json.dumps(info, indent=2, default=str))
    return 0


def _index_and_cells(args: argparse.Namespace, path: str, what: str) -> tuple[Any, Any, Any]:
    """The index (``--index``, ``--device``) and the embeddings of the cells in ``path``
    (``--obsm-key``, or embedded with ``--model``) and their obs; their dimensions must agree."""
    from ..search import CellIndex
    from ..search.pipeline import load_model

    index = CellIndex.load(args.index, device=args.device)
    emb, obs, _ = _embeddings(path, args.obsm_key, load_model(args.model))
    if emb.shape[1] != index.dim:
        raise ScatlasInputError(f"{what} have dimension {emb.shape[1]} but the index holds "
                                f"{index.dim}-dimensional vectors")
    return index, emb, obs


def cmd_index_calibrate(args: argparse.Namespace) -> int:

    t0 = time.perf_counter()
    index, emb, obs = _index_and_cells(args, args.cells, "the calibration cells")
    labels = None
    if args.label_key is not None:
        if obs is None or args.label_key not in obs.columns:
            raise ScatlasInputError(f"--label-key {args.label_key!r} is not an obs column of "
                                    f"{args.cells!r}")
        if args.label_key not in index.metadata.columns:
            raise ScatlasInputError(f"--label-key {args.label_key!r} is not a metadata column "
                                    f"of the index ({list(index.metadata.columns)[:20]})")
        labels = obs[args.label_key]
    record = index.calibrate_ood(emb, labels=labels, label_key=args.label_key)
    index.save(args.index)
    q = record["quantiles"]
    _log(f"index calibrate: {record['n_cells']} held-out cells (of {record['n_given']}); "
         f"min_dist thresholds q0.95 {q['0.95']:.4g}, q0.99 {q['0.99']:.4g} -> {args.index} "
         f"in {time.perf_counter() - t0:.2f} s")
    if "0.99" in record["levels_at_largest_distance"]:
        _log(f"index calibrate: warning: {record['n_cells']} cells are too few for the 0.99 "
             "level (at least 99 needed): it is their largest distance; calibrate with more "
             "cells or annotate with --ood-quantile 0.95 / 0.9")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import pandas as pd


    t0 = time.perf_counter()
    index, emb, obs = _index_and_cells(args, args.query, "the queries")
    kwargs: dict[str, Any] = {"k": args.k}
    if args.nprobe is not None:
        kwargs["nprobe"] = args.nprobe
    filt = _parse_filter(args.filter)
    if filt is not None:
        kwargs["filter"] = filt
    distances, ids = index.search(emb, **kwargs)
    m, k = ids.shape
    names = (np.asarray(obs.index, dtype=object) if obs is not None
             else np.arange(m).astype(str).astype(object))
    table = pd.DataFrame({
        "query": np.repeat(names, k),
        "rank": np.tile(np.arange(k), m),
        "id": ids.ravel(),
        "distance": distances.ravel(),
    })
    table = table[table["id"] >= 0].reset_index(drop=True)
    meta = index.metadata
    if args.metadata and meta is not None and meta.shape[1]:
        cols = meta.columns if not args.columns else pd.Index(args.columns)
        missing = [c for c in cols if c not in meta.columns]
        if missing:
            raise ScatlasInputError(f"--columns {missing} are not index metadata columns "
                                    f"({list(meta.columns)[:20]})")
        hits = meta.loc[table["id"].to_numpy(), cols].reset_index(drop=True)
        hits.columns = [c if c not in table.columns else f"hit_{c}" for c in hits.columns]
        table = pd.concat([table, hits], axis=1)
    _write_table(table, args.out)
    _log(f"search: {m} queries, k={k} in {time.perf_counter() - t0:.2f} s"
         + (f" -> {args.out}" if args.out else ""))
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from .. import io
    from ..search import CellIndex
    from ..search.pipeline import annotate_adata, load_model

    t0 = time.perf_counter()
    if args.report is not None and args.truth_key is None:
        raise ScatlasInputError("--report needs --truth-key (the obs column of the query cells' "
                                "true labels, to score the annotation against)")
    if args.n_bins < 1:
        raise ScatlasInputError(f"--n-bins must be >= 1, got {args.n_bins}")
    index = CellIndex.load(args.index, device=args.device)
    adata = io.read_h5ad(args.input)
    if args.truth_key is not None and args.truth_key not in adata.obs.columns:
        raise ScatlasInputError(f"--truth-key {args.truth_key!r} is not an obs column of "
                                f"{args.input!r} (columns: {list(adata.obs.columns)[:20]})")
    # errors name the Python parameters; scatlas.cli.main rewrites them as the flags
    table = annotate_adata(adata, index, load_model(args.model), label_key=args.label_key,
                           k=args.k, weighting=args.weighting,
                           ood_distance=args.ood_distance, ood_quantile=args.ood_quantile,
                           obsm_key=args.obsm_key, key_added=args.key_added)
    if args.out:
        io.write_h5ad(adata, args.out)
    else:
        cols = [f"{args.key_added}_{f}" for f in ("label", "confidence", "min_dist",
                                                  "ood_score", "is_ood")
                if f"{args.key_added}_{f}" in adata.obs.columns]
        adata.obs[cols].to_csv(sys.stdout)
    n_ood = int(np.asarray(table["is_ood"]).sum()) if "is_ood" in table.columns else 0
    rule = adata.uns.get(args.key_added, {}).get("ood_rule", "")
    _log(f"annotate: {adata.n_obs} cells, {table['label'].nunique()} labels, {n_ood} flagged "
         f"out-of-distribution ({rule}), in {time.perf_counter() - t0:.2f} s"
         + (f" -> {args.out}" if args.out else ""))
    if args.truth_key is not None:
        _score_annotation(args, adata, index, table)
    return 0


def _score_annotation(args: argparse.Namespace, adata: Any, index: Any, table: Any) -> None:
    """Accuracy / ECE against ``obs[--truth-key]`` on stderr; ``--report DIR`` files."""
    from ..search.calibration import calibration, write_report

    truth = adata.obs[args.truth_key].to_numpy()
    known = (index.metadata[args.label_key].dropna().unique()
             if args.label_key in index.metadata.columns else None)
    cal = calibration(table["label"].to_numpy(), table["confidence"].to_numpy(), truth,
                      n_bins=args.n_bins, is_ood=table["is_ood"].to_numpy(),
                      known_labels=known)
    # query cells with an exact copy in the index score themselves: not a held-out measure
    exact = int((np.asarray(table["min_dist"], dtype=np.float64) <= 1e-6).sum())
    cal.extra["n_exact_copies_in_index"] = exact
    ood = cal.ood or {}
    _log(f"annotate: against obs[{args.truth_key!r}]: accuracy {cal.accuracy:.4f} on "
         f"{cal.n_scored} cells, ECE {cal.ece:.4f} ({cal.n_bins} bins), mean confidence "
         f"{cal.mean_confidence:.4f}; flagged {ood.get('fraction_flagged', 0.0):.1%}, accuracy "
         f"flagged {ood.get('accuracy_flagged', float('nan')):.3f} / unflagged "
         f"{ood.get('accuracy_unflagged', float('nan')):.3f}")
    novel = cal.unseen_truth or {}
    if novel.get("n_truth_not_in_reference"):
        _log(f"annotate: {novel['n_truth_not_in_reference']} cells have a true label the index "
             f"lacks ({', '.join(novel['labels_not_in_reference'][:5])}); accuracy on the "
             f"others {novel['accuracy_on_reference_labels']:.4f}; flagged "
             f"{novel['fraction_flagged_not_in_reference']:.1%} of the former, "
             f"{novel['fraction_flagged_reference_labels']:.1%} of the latter")
    if exact > 0.5 * max(cal.n_scored, 1):
        _log(f"annotate: warning: {exact} of {adata.n_obs} query cells have an exact copy in the "
             "index (distance 0): they vote for their own label, so this accuracy is not a "
             "held-out measure; annotate cells that were not indexed")
    if args.report is not None:
        settings = {"index": str(args.index), "input": str(args.input),
                    "label_key": args.label_key, "truth_key": args.truth_key, "k": args.k,
                    "weighting": args.weighting,
                    **{k: v for k, v in adata.uns.get(args.key_added, {}).items()
                       if k.startswith("ood_")}}
        write_report(cal, args.report, settings=settings,
                     title=f"{Path(str(args.input)).name}: {args.label_key} vs {args.truth_key}")
        _log(f"annotate: report -> {args.report} (calibration.json, reliability.csv, "
             "reliability.png)")


def _set_index_threads(n: int) -> None:
    """faiss's OpenMP threads (idle OpenMP threads spin, which starves the event loop on few
    cores; BLAS-based engines follow ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS``)."""
    if n < 1:
        raise ScatlasInputError(f"--index-threads must be >= 1, got {n}")
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(n)


class _Stop(Exception):
    """Raised by our signal handlers once uvicorn has shut down gracefully."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..search.service import create_app

    t0 = time.perf_counter()
    if args.index_threads is not None:
        _set_index_threads(args.index_threads)
    app = create_app(args.index, args.model, max_batch=args.max_batch,
                     max_wait_ms=args.max_wait_ms, max_queries_per_request=args.max_queries,
                     max_k=args.max_k, max_body_bytes=int(args.max_body_mb * 2**20),
                     label_key=args.label_key, device=args.device)
    service = app.state.service
    _log(f"serve: loaded {service.ntotal} vectors (dim {service.dim}) in "
         f"{time.perf_counter() - t0:.2f} s; listening on http://{args.host}:{args.port} "
         f"(web page: http://{args.host}:{args.port}/)")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, lifespan="on",
                            timeout_graceful_shutdown=args.graceful_timeout)
    server = uvicorn.Server(config)
    # uvicorn catches SIGINT/SIGTERM, shuts down gracefully, then re-raises the signal with the
    # previous handlers restored: ours turn that into a clean exit instead of a kill / traceback.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except _Stop:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise ScatlasInputError(f"could not start the server on {args.host}:{args.port} "
                                "(port in use?)")
    _log("serve: stopped")
    return 0


# --------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], default=None,
                   help="where the index runs (default: $SCATLAS_DEVICE, else auto)")


def register(subparsers, *, common, io_args) -> None:  # noqa: ARG001 - shared signature
    """Add ``index``, ``search``, ``annotate`` and ``serve``."""
    p = subparsers.add_parser("index", help="build or inspect a cell search index")
    sub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    b = sub.add_parser("build", help="build an index from embeddings (.h5ad obsm or .npy)")
    b.add_argument("input", help=".h5ad (embeddings in obsm, metadata in obs) or .npy")
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--obsm-key", default="X_scatlas", help="obsm key (default X_scatlas)")
    b.add_argument("--metadata", default=None,
                   help="metadata table for an .npy (.csv / .tsv / .parquet, one row per vector)")
    b.add_argument("--metric", choices=["cosine", "euclidean", "ip"], default="cosine")
    b.add_argument("--engine", default="auto",
                   help="auto, exact, faiss-ivf, faiss-ivfpq, native-ivf, faiss-gpu")
    b.add_argument("--nlist", type=int, default=None, help="IVF lists (default: from n)")
    b.add_argument("--nprobe", type=int, default=None, help="default lists probed per query")
    b.add_argument("--list-dtype", choices=["float32", "float16", "int8"], default=None,
                   help="native IVF list storage (default float32; float16 half the bytes, int8 "
                   "a quarter with exact re-ranking; implies --engine native-ivf under auto)")
    b.add_argument("--rerank", type=int, default=None, metavar="R",
                   help="int8 lists: re-rank R x k shortlisted candidates per query on float16 "
                   "rows (default 4; 0: the decoded codes' scores)")
    b.add_argument("--map", choices=["tsne", "umap", "pca", "none"], default="none",
                   help="also store a 2-D map of the cells (and their embeddings) for the web "
                        "page of scatlas serve (default none; tsne needs scatlas[tsne])")
    b.add_argument("--map-seed", type=int, default=0, help="seed of the map (default 0)")
    _device(b)
    b.set_defaults(func=cmd_index_build, command="index build")

    mp = sub.add_parser("map", help="store a 2-D map of an index's cells for the web page")
    mp.add_argument("index", help="index folder (its map/ subfolder is written atomically)")
    mp.add_argument("embeddings", help="the embeddings the index was built from, in id order "
                                       "(.h5ad obsm or .npy)")
    mp.add_argument("--method", choices=["tsne", "umap", "pca"], default="tsne",
                    help="tsne (default; needs scatlas[tsne]), umap (needs umap-learn) or pca")
    mp.add_argument("--obsm-key", default="X_scatlas", help="obsm key (default X_scatlas)")
    mp.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    mp.set_defaults(func=cmd_index_map, command="index map")

    c = sub.add_parser("calibrate",
                       help="set the out-of-distribution threshold from held-out cells")
    c.add_argument("index", help="index folder (rewritten atomically)")
    c.add_argument("cells", help="held-out reference cells, not indexed and not used to train "
                                 "the model: .h5ad (obsm embeddings, or raw counts with --model) "
                                 "or .npy")
    c.add_argument("--model", default=None, help="model folder: embed the raw counts first")
    c.add_argument("--obsm-key", default="X_scatlas", help="obsm key (default X_scatlas)")
    c.add_argument("--label-key", default=None,
                   help="obs column of the cells' labels (also an index metadata column): "
                        "cells of labels the index lacks are left out")
    _device(c)
    c.set_defaults(func=cmd_index_calibrate, command="index calibrate")

    i = sub.add_parser("info", help="describe a saved index (JSON)")
    i.add_argument("index", help="index folder")
    i.set_defaults(func=cmd_index_info, command="index info")

    s = subparsers.add_parser("search", help="k nearest reference cells of each query cell")
    s.add_argument("query", help="queries: .h5ad (obsm embeddings, or raw counts with --model) "
                                 "or .npy")
    s.add_argument("--index", required=True, help="index folder")
    s.add_argument("--model", default=None, help="model folder: embed the raw counts first")
    s.add_argument("--obsm-key", default="X_scatlas", help="obsm key (default X_scatlas)")
    s.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    s.add_argument("--nprobe", type=int, default=None, help="IVF lists probed")
    s.add_argument("--filter", default=None,
                   help='metadata filter: JSON {"column": [values], "exclude": {...}} or a '
                        "pandas query string")
    s.add_argument("--metadata", action=argparse.BooleanOptionalAction, default=True,
                   help="add the hits' metadata columns (default yes)")
    s.add_argument("--columns", nargs="+", default=None, help="only these metadata columns")
    s.add_argument("--out", default=None, help="results .csv / .tsv / .parquet (default stdout)")
    _device(s)
    s.set_defaults(func=cmd_search)

    a = subparsers.add_parser("annotate", help="label cells from their nearest reference cells")
    a.add_argument("input", help=".h5ad (raw counts with --model, else obsm embeddings)")
    a.add_argument("--index", required=True, help="index folder (metadata holds the labels)")
    a.add_argument("--model", default=None, help="model folder (embed raw counts)")
    a.add_argument("--label-key", required=True, help="metadata column with the labels")
    a.add_argument("--k", type=int, default=50, help="neighbours voting (default 50)")
    a.add_argument("--weighting", default="distance", help="vote weighting (default distance)")
    a.add_argument("--ood-distance", type=float, default=None,
                   help="flag a cell out-of-distribution when its min_dist exceeds this "
                        "(default: the index's own rule, see --ood-quantile)")
    a.add_argument("--ood-quantile", type=float, default=None,
                   help="quantile of the index's own OOD scores used as the threshold "
                        "(default: see docs/search.md)")
    a.add_argument("--truth-key", default=None,
                   help="obs column of the query cells' true labels: log accuracy and ECE "
                        "(score held-out cells, not indexed ones)")
    a.add_argument("--report", default=None, metavar="DIR",
                   help="with --truth-key: write DIR/calibration.json (accuracy, reliability "
                        "table, ECE, OOD summary), reliability.csv and reliability.png")
    a.add_argument("--n-bins", type=int, default=10,
                   help="confidence bins of the reliability table (default 10)")
    a.add_argument("--obsm-key", default="X_scatlas", help="obsm key (default X_scatlas)")
    a.add_argument("--key-added", default="scatlas", help="obs column prefix (default scatlas)")
    a.add_argument("--out", default=None, help="output .h5ad (default: obs table on stdout)")
    _device(a)
    a.set_defaults(func=cmd_annotate)

    v = subparsers.add_parser("serve", help="HTTP search service (JSON; uvicorn)")
    v.add_argument("--index", required=True, help="index folder")
    v.add_argument("--model", default=None, help="model folder (enables expression queries)")
    v.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    v.add_argument("--max-batch", type=int, default=256,
                   help="queries per batched index call (default 256)")
    v.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="longest wait for a batch to fill, ms (default 2)")
    v.add_argument("--max-queries", type=int, default=4096,
                   help="queries per request (default 4096)")
    v.add_argument("--max-k", type=int, default=1000, help="largest k (default 1000)")
    v.add_argument("--max-body-mb", type=float, default=64, help="request size limit (MiB)")
    v.add_argument("--label-key", default=None, help="default label_key of /annotate")
    v.add_argument("--index-threads", type=int, default=None,
                   help="faiss OpenMP threads for searches (default: faiss's own, all cores); "
                        "1 often serves small batches best on few shared cores")
    v.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    v.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="log every request (default no)")
    v.add_argument("--graceful-timeout", type=float, default=30,
                   help="seconds to wait for running requests on shutdown (default 30)")
    _device(v)
    v.set_defaults(func=cmd_serve)
