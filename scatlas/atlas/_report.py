"""The atlas build's report: recall of the index against exact search, disk use, and
``report.json`` / ``report.md`` / ``report.png`` (per-stage seconds, cells/s, peak RSS)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write

_GIB = 2.0**30


def disk_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a file or a folder)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _scores(Q: np.ndarray, X: np.ndarray, metric: str) -> np.ndarray:
    """Larger is nearer: inner products (cosine on unit rows, ip) or -squared L2 distance."""
    S = Q @ X.T
    if metric == "euclidean":
        S = 2 * S - np.einsum("ij,ij->i", X, X)[None, :]
    return S


def exact_neighbours(arr: Any, queries: np.ndarray, k: int, metric: str,
                     step: int = 25_000) -> np.ndarray:
    """Ids (m, k) of the exact k nearest stored rows of ``arr`` (zarr / NumPy, (n, d)) to each
    query (``metric`` as :class:`~scatlas.search.CellIndex`'s), by a blocked brute force over
    ``step`` rows at a time: float32 scores (as faiss's flat index), the top k of each block
    kept and merged (ties to the smaller id)."""
    Q = queries.astype(np.float32)
    if metric == "cosine":
        Q = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-30)
    best_s = np.full((Q.shape[0], 0), -np.inf)
    best_i = np.zeros((Q.shape[0], 0), np.int64)
    for lo in range(0, arr.shape[0], step):
        X = np.asarray(arr[lo:lo + step], dtype=np.float32)
        if metric == "cosine":
            X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30)
        S = _scores(Q, X, metric)
        if S.shape[1] > k:
            part = np.argpartition(-S, k - 1, axis=1)[:, :k]
            S = np.take_along_axis(S, part, 1)
            ids = part + lo
        else:
            ids = np.broadcast_to(np.arange(lo, lo + X.shape[0]), S.shape)
        S = np.concatenate([best_s, S], axis=1)
        ids = np.concatenate([best_i, ids], axis=1)
        order = np.lexsort((ids, -S), axis=1)[:, :k]  # descending score, ties to smaller id
        best_s = np.take_along_axis(S, order, 1)
        best_i = np.take_along_axis(ids, order, 1)
    return best_i


def _query_rows(arr: Any, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = arr.shape[0]
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n_queries, n), replace=False))
    Q = np.asarray(arr.get_orthogonal_selection((rows, slice(None))) if hasattr(
        arr, "get_orthogonal_selection") else arr[rows], dtype=np.float32)
    return rows, Q


def _recall(got: np.ndarray, truth: np.ndarray, rows: np.ndarray, k: int) -> float:
    hits = 0
    for r, g, t in zip(rows, np.asarray(got), truth, strict=True):
        hits += len(set([i for i in g if i != r][:k]) & set([i for i in t if i != r][:k]))
    denom = rows.size * min(k, truth.shape[1] - 1)
    return hits / denom if denom else 1.0


def recall_at_k(index: Any, arr: Any, *, k: int = 10, n_queries: int = 1000, seed: int = 0,
                target: float | None = None) -> dict[str, Any]:
    """recall@k of ``index`` against exact search over the stored embeddings ``arr``, for
    ``n_queries`` stored cells drawn at random; each query's own id is left out of both lists
    (searching k + 1), so a query never counts itself.

    With ``target`` (an IVF index): ``index.nprobe`` is raised (doubling, up to ``nlist``)
    until the recall reaches ``target``, and left at the first value that does (or ``nlist``);
    every value tried is reported in ``tried`` as ``[nprobe, recall]``.
    """
    rows, Q = _query_rows(arr, n_queries, seed)
    kk = min(k + 1, arr.shape[0])
    truth = exact_neighbours(arr, Q, kk, index.metric)
    tried = []
    while True:
        recall = _recall(index.search(Q, kk)[1], truth, rows, k)
        tried.append([index.nprobe, recall])
        if target is None or index.nprobe is None or recall >= target \
                or index.nprobe >= index.nlist:
            break
        index.nprobe = min(index.nlist, 2 * index.nprobe)
    return {"k": k, "n_queries": int(rows.size), "recall": recall, "nprobe": index.nprobe,
            "engine": index.engine, "target": target, "tried": tried}


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Atlas build report", "",
        f"{report['n_cells']:,} cells from {len(report['sources'])} store(s); "
        f"total {report['total_seconds']:.1f} s "
        f"({report['n_cells'] / max(report['total_seconds'], 1e-9):,.0f} cells/s end to end); "
        f"disk {report['disk_bytes'] / _GIB:.3f} GiB.", "",
        "| stage | seconds | cells/s | driver peak RSS (GiB) | max worker peak RSS (GiB) "
        "| output (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, st in report["stages"].items():
        workers = st.get("worker_peak_rss") or {}
        worker = f"{max(workers.values()) / _GIB:.2f}" if workers else "-"
        lines.append(f"| {name} | {st['seconds']:.1f} | {st.get('cells_per_s', 0):,.0f} | "
                     f"{st.get('driver_peak_rss', 0) / _GIB:.2f} | {worker} | "
                     f"{st.get('disk_bytes', 0) / _GIB:.3f} |")
    rec = report.get("recall") or {}
    if rec:
        lines += ["", f"Index recall@{rec['k']} against exact search over the stored embeddings "
                  f"({rec['n_queries']} stored cells as queries, each leaving itself out; "
                  f"engine {rec['engine']}, nprobe {rec['nprobe']}): **{rec['recall']:.4f}**."]
        if rec.get("target") is not None and len(rec.get("tried") or []) > 1:
            lines += ["", f"nprobe was raised to reach recall {rec['target']}: tried "
                      + ", ".join(f"{p}: {r:.4f}" for p, r in rec["tried"]) + "."]
    lines += ["", "Peak RSS is each process's lifetime peak (getrusage) when the stage ended; "
              "the workers' are those of the embed stage's Dask workers.", ""]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["stages"])
    secs = [report["stages"][s]["seconds"] for s in names]
    driver = [report["stages"][s].get("driver_peak_rss", 0) / _GIB for s in names]
    worker = [max((report["stages"][s].get("worker_peak_rss") or {0: 0}).values()) / _GIB
              for s in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.bar(names, secs, color="tab:blue")
    a.set_ylabel("seconds")
    a.set_title(f"{report['n_cells']:,} cells, {report['total_seconds']:.0f} s")
    x = np.arange(len(names))
    b.bar(x - 0.2, driver, 0.4, label="driver")
    b.bar(x + 0.2, worker, 0.4, label="max worker")
    b.set_xticks(x, names)
    b.set_ylabel("peak RSS (GiB)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, state: dict[str, Any], recall: dict[str, Any]) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``report.png`` in ``out`` atomically."""
    stages = state["stages"]
    report = {
        "sources": state["settings"]["sources"], "model": state["settings"]["model"],
        "n_cells": int(stages.get("embed", {}).get("cells", 0)),
        "latent_dim": stages.get("embed", {}).get("latent_dim"),
        "total_seconds": float(sum(st.get("seconds", 0.0) for st in stages.values())),
        "disk_bytes": int(sum(disk_bytes(out / name) for name in
                              ("embeddings.zarr", "metadata.parquet", "index")
                              if (out / name).exists())),
        "stages": {name: {k: v for k, v in st.items() if k != "recall"}
                   for name, st in stages.items()},
        "recall": recall, "cpu_count": os.cpu_count(),
    }
    with atomic_write(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    with atomic_write(out / "report.md") as tmp:
        tmp.write_text(_markdown(report))
    with atomic_write(out / "report.png") as tmp:
        _plot(report, tmp)
    return report
