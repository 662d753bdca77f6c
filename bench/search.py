"""Benchmark ``search``: the cell index (``scatlas.search.CellIndex``) vs raw faiss, exact search
and hnswlib at SCimilarity's settings, side by side in one run.

    OMP_NUM_THREADS=2 python -m bench.search --sizes 1e6 [--sizes 1e6,1e7] [--hnsw-size 1e5]

Self-contained (the ``bench`` harness times whole calls; this needs per-query latency
percentiles): writes ``bench/results/search_<device>.json`` (merged by size) and ``.md``.

Workload: :func:`scatlas.search.synthetic.iter_clustered` (300 anisotropic Gaussian clusters,
128-d, L2-normalised, float32), ``N + n_queries`` rows written chunk by chunk to a ``.npy``
memmap under ``bench/.cache/`` (1e7 x 128 = 5.1 GB, never two copies in memory); the last
``n_queries`` rows are held-out queries from the same distribution. Metric: cosine.

Per size, measured (the 1-minute load average is recorded beside each timing; the machine is
shared):

- ``exact``: ground truth top-10 of the recall queries, blockwise over the memmap with
  :func:`scatlas.search.engines.exact.blocked_topk` (cached); its wall time gives exact search's
  batch QPS; a few single queries give its latency.
- ``scatlas.CellIndex`` (``engine="auto"``: faiss-ivf on the CPU; default nlist / nprobe):
  build time (train + add from the memmap, chunked), RSS growth and index bytes, recall@10 vs
  exact, single-query p50 / p99 latency of ``idx.search(q[None], 10)`` (Python overhead
  included), batch QPS of ``idx.search(Q, 10)``; plus a recall / latency sweep over nprobe.
- ``faiss.IndexIVFFlat`` raw (same nlist, training-sample size and nprobe), to show our overhead:
  built separately up to ``--raw-build-max`` cells, else its search is timed on our own faiss
  index object (build not re-measured).
- ``scatlas native-ivf`` (the NumPy twin of the CuPy engine) up to ``--native-max`` cells.
- Roofline (issue 19 item 4), per CellIndex batch search: bytes read and flops of the call
  (the native IVF counts its own, :meth:`NativeIVF.scan_counts`; faiss and exact from a model of
  the engine, marked "estimated"), achieved GB/s and GFLOP/s beside this machine's measured
  peaks (a STREAM-like copy and an sgemm, :func:`bench.ivf_scan.machine_peaks`), and an H100
  PROJECTION from the same counts (3.35 TB/s, 67 TFLOPS FP32), labelled as such.
- ``hnswlib`` with SCimilarity's settings (cosine, M=80, ef_construction=1000, ef=100, k=50,
  recall@10 from the first 10 of the 50), in a peer venv ``bench/.peers/hnswlib``
  (``python -m bench.search --install-hnswlib``). Its build at M=80/efC=1000 takes about an
  hour per million cells on 2 cores, so it is measured on the first ``--hnsw-size`` cells only
  (recall against exact search on that same subset); the table names that size. No figure at
  larger sizes is extrapolated.

At 5e7 cells on a GPU, in one device call (bench/gpu/run.sh's ``search`` step)::

    python -m bench.search --device gpu --gen device --no-save --sizes 5e7 \
        --hnsw-size 0 --raw-build-max 0 --native-max 0 --gt-queries 1000

- ``--gen device``: the embeddings are drawn where the index lives, chunk by chunk
  (:func:`iter_clustered_xp`: CuPy on the GPU, its NumPy twin on the CPU; the same mixture as
  :func:`scatlas.search.synthetic.iter_clustered`, a different draw from it), straight into one
  (n, 128) array there (5e7 x 128 float32 = 25.6 GB): nothing is generated on the host or
  written to disk. The exact ground truth of the first ``--gt-queries`` queries and the exact
  search's timings are blocked GEMMs (:func:`~scatlas.search.engines.exact.blocked_topk`) on the
  same device: no CPU exact scan. Raw faiss, the NumPy twin and hnswlib need host data and are
  left out. Device memory: the data, the index built from them (another 26 GB at 5e7: vectors
  and ids) and a few GB of blocks (k-means assignment: 2^29 scores and their negated copy),
  labels and the training sample: about 57 GB at 5e7. Every method's figures are written as
  they are measured (``"partial": true`` until the size is done), so a run cut off by a timeout
  still leaves the data, exact and build figures. bench/gpu/README.md has the time estimate.
- ``--no-save``: nothing under ``bench/.cache/`` (no dataset memmap, no cached ground truth, no
  index saved: ``save_s`` and ``index_bytes`` are left out). With ``--gen host`` the data are
  then generated in memory.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from scatlas import backend
from scatlas.search import CellIndex, default_nlist, default_nprobe, default_train_size
from scatlas.search.engines.exact import blocked_topk
from scatlas.search.synthetic import _mixture, iter_clustered

from .environment import REPO_ROOT
from .io import atomic_write_text
from .runner import log

CACHE = REPO_ROOT / "bench" / ".cache"
RESULTS = REPO_ROOT / "bench" / "results"
HNSW_VENV = REPO_ROOT / "bench" / ".peers" / "hnswlib"
D = 128
K = 10
SEED = 0
N_CLUSTERS = 300


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def dataset(n: int, n_queries: int, *, save: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(memmap (n, 128) base, (n_queries, 128) queries); generated once into the cache
    (``save=False``: in memory, nothing written)."""
    if not save:
        X = np.empty((n + n_queries, D), dtype=np.float32)
        pos = 0
        for chunk in iter_clustered(n + n_queries, D, n_clusters=N_CLUSTERS, seed=SEED,
                                    chunk_size=200_000):
            X[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        return X[:n], np.ascontiguousarray(X[n:])
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"search_clustered_n{n}_q{n_queries}_d{D}_c{N_CLUSTERS}_s{SEED}.npy"
    if not path.exists():
        log(f"generating {n + n_queries:,} x {D} embeddings -> {path}")
        tmp = path.with_suffix(".tmp.npy")
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n + n_queries, D))
        pos = 0
        for chunk in iter_clustered(n + n_queries, D, n_clusters=N_CLUSTERS, seed=SEED,
                                    chunk_size=200_000):
            mm[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        mm.flush()
        del mm
        os.replace(tmp, path)
    mm = np.load(path, mmap_mode="r")
    return mm[:n], np.ascontiguousarray(mm[n:])


GEN_CHUNK = 1_000_000  # rows per generated chunk (--gen device)


def chunk_seed(seed: int, i: int) -> int:
    """The integer seed of chunk i's stream (CuPy's ``default_rng`` takes an int)."""
    return int(np.random.SeedSequence([seed, 2, i]).generate_state(1, dtype=np.uint64)[0] >> 1)


def iter_clustered_xp(n: int, d: int = D, *, xp: Any = np, n_clusters: int = N_CLUSTERS,
                      spread: float = 0.5, seed: int = SEED,
                      chunk_size: int = GEN_CHUNK) -> Any:
    """Yield (m, d) float32 unit rows on ``xp``'s device (CuPy, or NumPy: the CPU twin).

    The mixture of :func:`scatlas.search.synthetic.iter_clustered` (centres, anisotropic bases
    and Dirichlet weights drawn on the host from ``seed``, then moved), cells drawn on the device
    from ``xp.random.default_rng(chunk_seed(seed, i))`` per chunk: a uniform per cell mapped
    through the cumulative weights (its cluster), a standard normal (d,) ``z``, and
    ``normalise(centre + z @ basis)``, one GEMM per cluster over the chunk's cells sorted by
    cluster. A given (seed, chunk_size) always gives the same rows on one array module; CuPy's
    generator (XORWOW) draws other numbers than NumPy's (PCG64), so the GPU's rows are another
    sample of the same distribution, not the twin's rows. Device memory: the (n_clusters, d, d)
    bases (20 MB at 300 x 128) and about 5 (m, d) float32 arrays per chunk (2.6 GB at 1e6 x 128).
    """
    centres, bases, probs = _mixture(n_clusters, d, spread, seed)
    C, B = xp.asarray(centres), xp.asarray(bases)
    cum = np.cumsum(probs)
    cum[-1] = 1.0  # a uniform draw below 1 always finds its cluster
    cum = xp.asarray(cum)
    for i, start in enumerate(range(0, n, chunk_size)):
        m = min(chunk_size, n - start)
        rng = xp.random.default_rng(chunk_seed(seed, i))
        lab = xp.searchsorted(cum, rng.random(m), side="right")
        z = rng.standard_normal((m, d), dtype=np.float32)
        order = xp.argsort(lab, kind="stable")
        counts = np.asarray(backend.to_host(xp.bincount(lab, minlength=n_clusters)))
        ends = np.cumsum(counts)
        zs = z[order]
        del z
        for c in np.flatnonzero(counts):
            lo, hi = int(ends[c] - counts[c]), int(ends[c])
            zs[lo:hi] = zs[lo:hi] @ B[c]
        X = C[lab]
        X[order] += zs
        del zs, order, lab
        X /= xp.sqrt((X * X).sum(axis=1, keepdims=True))
        yield X


def device_dataset(n: int, n_queries: int, device: str) -> tuple[Any, np.ndarray]:
    """(n, 128) base rows on ``device`` (CuPy array on the GPU) and the (n_queries, 128) held-out
    queries on the host: the first n rows of one :func:`iter_clustered_xp` stream of
    ``n + n_queries`` rows and its last ``n_queries``."""
    xp = backend.device_module(device)
    X = xp.empty((n, D), dtype=np.float32)
    Q = np.empty((n_queries, D), dtype=np.float32)
    pos = 0
    for chunk in iter_clustered_xp(n + n_queries, D, xp=xp):
        m = chunk.shape[0]
        lo, hi = pos, pos + m
        if lo < n:
            X[lo:min(hi, n)] = chunk[: min(hi, n) - lo]
        if hi > n:
            Q[max(lo, n) - n: hi - n] = backend.to_host(chunk[max(lo, n) - lo:])
        pos = hi
    backend.synchronize(X)
    return X, Q


def ground_truth(X: Any, Q: np.ndarray, tag: str, *,
                 save: bool = True) -> tuple[np.ndarray, float]:
    """Exact top-K ids of Q in X (cached unless ``save=False``) and the seconds it took when
    computed now. X on the GPU: the blocked GEMMs run there (Q moved), ids come back."""
    path = CACHE / f"search_gt_{tag}_k{K}.npy"
    if save and path.exists():
        return np.load(path), float("nan")
    Qd = backend.to_device(Q, backend.device_of(X)) if backend.is_gpu_array(X) else Q
    t0 = time.perf_counter()
    _, ids = blocked_topk(Qd, X, K, "ip")
    ids = np.asarray(backend.to_host(ids))
    el = time.perf_counter() - t0
    if save:
        np.save(path, ids)
    return ids, el


def recall_at(I: np.ndarray, gt: np.ndarray, k: int = K) -> float:
    hits = [len(set(a[:k]) & set(b[:k])) for a, b in zip(I, gt, strict=True)]
    return float(np.sum(hits) / (k * len(gt)))


def latency(fn, Q: np.ndarray, n: int) -> dict[str, float]:
    """p50 / p99 / mean single-query latency in ms over n queries (after 5 warm-up calls)."""
    for i in range(min(5, len(Q))):
        fn(Q[i : i + 1])
    times = []
    for i in range(n):
        q = Q[i % len(Q) : i % len(Q) + 1]
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    t = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
            "mean_ms": float(t.mean()), "n_single": n, "load_1m": load1()}


def batch_qps(fn, Q: np.ndarray) -> dict[str, float]:
    t0 = time.perf_counter()
    out = fn(Q)
    el = time.perf_counter() - t0
    return {"batch_s": el, "qps": len(Q) / el, "batch_queries": len(Q), "load_1m": load1()}, out


# ----------------------------------------------------------------------------------------------
# roofline (issue 19 item 4)
# ----------------------------------------------------------------------------------------------
def work_counts(idx: CellIndex, m: int) -> dict[str, Any]:
    """Bytes and flops of the last ``m``-query search on ``idx``: the engine's own count
    (``scan_counts``: the native IVF counts every batch) when it keeps one, else a model of the
    engine (``source: "estimated"``): faiss IVF reads each probed list once PER QUERY (uniform
    list sizes assumed) and does 2 d flops per candidate plus the coarse GEMM; exact reads the
    base once per 1,024-query block and does 2 m n d flops."""
    counts = idx.engine_object.scan_counts()
    if counts:
        flops = counts["coarse_flops"] + counts["scan_flops"] + counts["exact_flops"]
        compulsory = counts["list_bytes"] + counts["other_bytes"]
        touched = compulsory + counts["gather_bytes"] + counts["score_bytes"]
        return {"source": "counted", "flops": flops, "bytes": compulsory,
                "bytes_touched": touched}
    n, d = idx.ntotal, idx.dim
    per_cell = idx.bytes_per_cell()
    if idx.nlist:
        cand = m * idx.nprobe * n / idx.nlist
        flops = 2.0 * d * (m * idx.nlist + cand)
        nbytes = cand * per_cell + idx.nlist * d * 4 + 2 * m * d * 4
    else:
        flops = 2.0 * m * n * d
        nbytes = -(-m // 1024) * n * per_cell + 2 * m * d * 4
    return {"source": "estimated", "flops": flops, "bytes": nbytes, "bytes_touched": nbytes}


def roofline_row(counts: dict[str, Any], seconds: float,
                 peaks: dict[str, float] | None) -> dict[str, Any]:
    """Achieved GB/s and GFLOP/s of one call, beside the machine's measured peaks, and the
    H100 PROJECTION from the same counts (max of bytes / 3.35 TB/s and flops / 67 TFLOPS
    FP32; touched bytes; not a measurement)."""
    from .ivf_scan import H100_BW, H100_FP32

    row = {**counts, "seconds": seconds, "gflops_s": counts["flops"] / seconds / 1e9,
           "gbs": counts["bytes"] / seconds / 1e9,
           "gbs_touched": counts["bytes_touched"] / seconds / 1e9,
           "h100_projection_ms": 1e3 * max(counts["bytes_touched"] / H100_BW,
                                           counts["flops"] / H100_FP32)}
    if peaks:
        row["pct_sgemm_peak"] = 100 * row["gflops_s"] / peaks["sgemm_gflops"]
        row["pct_copy_peak"] = 100 * row["gbs_touched"] / peaks["copy_gbs"]
    return row


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
def run_ours(X, Q, gt, args, engine=None, label="scatlas.CellIndex",
             device: str | None = None, checkpoint=None) -> dict[str, Any]:
    """Build, batch search and recall, single-query latency, nprobe sweep;
    ``checkpoint(res)`` is called once the build and the batch search are measured."""
    engine = engine or args.engine
    gc.collect()
    r0 = rss_mb()
    t0 = time.perf_counter()
    idx = CellIndex.build(X, engine=engine, chunk_size=200_000,
                          device=device or args.device)
    build = time.perf_counter() - t0
    res: dict[str, Any] = {"method": label, "engine": idx.engine, "device": device or args.device,
                           "nlist": idx.nlist,
                           "nprobe": idx.nprobe, "build_s": build, "build_load_1m": load1(),
                           "rss_growth_mb": rss_mb() - r0}
    if args.save:
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            t0 = time.perf_counter()
            idx.save(Path(tmp) / "ix")
            res["save_s"] = time.perf_counter() - t0
            res["index_bytes"] = dir_bytes(Path(tmp) / "ix")
    bq, (Dq, I) = batch_qps(lambda q: idx.search(q, K), Q)
    res.update(bq)
    res["roofline"] = roofline_row(work_counts(idx, len(Q)), bq["batch_s"],
                                   getattr(args, "peaks", None))
    res["recall@10"] = recall_at(I[: len(gt)], gt)
    res["recall_queries"] = len(gt)
    if checkpoint is not None:
        checkpoint(res)
    twin = idx.engine == "native-ivf" and idx.device == "cpu"  # the slow NumPy twin
    n_single = min(args.single, 50) if twin else args.single
    res.update(latency(lambda q: idx.search(q, K), Q, n_single))
    if idx.nlist and not twin:
        sweep = []
        for npb in args.sweep:
            if npb > idx.nlist:
                continue
            t0 = time.perf_counter()
            _, Ii = idx.search(Q, K, nprobe=npb)
            el = time.perf_counter() - t0
            lat = latency(lambda q, npb=npb: idx.search(q, K, nprobe=npb), Q, 100)
            sweep.append({"nprobe": npb, "recall@10": recall_at(Ii[: len(gt)], gt),
                          "qps": len(Q) / el,
                          "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"]})
        res["nprobe_sweep"] = sweep
    return res, idx


def run_raw_faiss(X, Q, gt, ours_idx, args) -> dict[str, Any]:
    import faiss

    n = X.shape[0]
    nlist = default_nlist(n)
    nprobe = default_nprobe(nlist)
    res: dict[str, Any] = {"method": "faiss.IndexIVFFlat (raw)", "nlist": nlist, "nprobe": nprobe}
    if n <= args.raw_build_max:
        gc.collect()
        r0 = rss_mb()
        t0 = time.perf_counter()
        quant = faiss.IndexFlatIP(D)
        index = faiss.IndexIVFFlat(quant, D, nlist, faiss.METRIC_INNER_PRODUCT)
        ts = default_train_size(n, nlist)
        rows = np.sort(np.random.default_rng(SEED).choice(n, ts, replace=False))
        index.train(np.ascontiguousarray(X[rows]))
        for s in range(0, n, 200_000):
            index.add(np.ascontiguousarray(X[s : s + 200_000]))
        res["build_s"] = time.perf_counter() - t0
        res["build_load_1m"] = load1()
        res["rss_growth_mb"] = rss_mb() - r0
    else:
        index = ours_idx.engine_object.index  # the same faiss object our index wraps
        res["note"] = "search timed on the faiss index built by CellIndex (build not re-measured)"
    index.nprobe = nprobe
    bq, (_, I) = batch_qps(lambda q: index.search(q, K), Q)
    res.update(bq)
    res["recall@10"] = recall_at(I[: len(gt)], gt)
    res.update(latency(lambda q: index.search(q, K), Q, args.single))
    return res


def run_exact(X, Q, gt_seconds, gt_queries, args) -> dict[str, Any]:
    """Exact search: batch timing from the ground truth's run (``gt_queries`` queries), single
    queries timed on X's device (a GPU array: the query moved there, ids back)."""
    on_gpu = backend.is_gpu_array(X)
    res: dict[str, Any] = {"method": "exact (blocked GEMM" + (", GPU)" if on_gpu else ")"),
                           "recall@10": 1.0}
    if np.isfinite(gt_seconds):
        res.update({"batch_s": gt_seconds, "qps": gt_queries / gt_seconds,
                    "batch_queries": gt_queries, "load_1m": load1()})
    n_single = args.exact_single
    from scatlas.search.engines.exact import _one_blas_thread

    def one(q):
        if on_gpu:
            _, ids = blocked_topk(backend.to_device(q, "gpu"), X, K, "ip")
            return backend.to_host(ids)
        with _one_blas_thread(q):
            return blocked_topk(q, X, K, "ip")

    res.update(latency(one, Q, n_single))
    return res


HNSW_SCRIPT = r"""
import json, sys, time, numpy as np, hnswlib
path, n, nq, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
mm = np.load(path, mmap_mode="r")
X = np.ascontiguousarray(mm[:n]); Q = np.ascontiguousarray(mm[-nq:])
idx = hnswlib.Index(space="cosine", dim=X.shape[1])
t0 = time.perf_counter()
idx.init_index(max_elements=n, ef_construction=1000, M=80)
idx.set_ef(1000)
idx.add_items(X, np.arange(n))
build = time.perf_counter() - t0
idx.set_ef(100)
t0 = time.perf_counter(); I, _ = idx.knn_query(Q, k=50); batch = time.perf_counter() - t0
for i in range(5): idx.knn_query(Q[i:i+1], k=50)
lat = []
for i in range(min(nq, 500)):
    t0 = time.perf_counter(); idx.knn_query(Q[i:i+1], k=50); lat.append(time.perf_counter() - t0)
np.save(out + ".ids.npy", I[:, :10].astype(np.int64))
json.dump({"build_s": build, "batch_s": batch, "lat_ms": [x * 1e3 for x in lat],
           "threads": idx.num_threads}, open(out, "w"))
"""


def run_hnswlib(n_total: int, path: Path, n_queries: int, Q, X, args) -> dict[str, Any]:
    py = HNSW_VENV / "bin" / "python"
    n = min(args.hnsw_size, n_total)
    res: dict[str, Any] = {"method": "hnswlib (SCimilarity: M=80, efC=1000, ef=100, k=50)",
                           "measured_at_cells": n}
    if not py.exists():
        res["skipped"] = (f"peer venv missing ({HNSW_VENV}); "
                          "python -m bench.search --install-hnswlib")
        return res
    sub = X[:n]
    gt, _ = ground_truth(sub, Q, f"n{n}_of{n_total}_q{len(Q)}", save=args.save)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        out = Path(tmp) / "hnsw.json"
        log(f"hnswlib build on {n:,} cells (M=80, efC=1000) ...")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([str(py), "-c", HNSW_SCRIPT, str(path), str(n),
                                   str(n_queries), str(out)], capture_output=True, text=True,
                                  timeout=args.hnsw_timeout)
        except subprocess.TimeoutExpired:
            res["skipped"] = f"build did not finish within {args.hnsw_timeout:.0f} s"
            return res
        res["wall_s"] = time.perf_counter() - t0
        if proc.returncode != 0:
            res["skipped"] = f"hnswlib failed: {proc.stderr[-500:]}"
            return res
        r = json.loads(out.read_text())
        I = np.load(str(out) + ".ids.npy")
    lat = np.array(r["lat_ms"])
    res.update({"build_s": r["build_s"], "build_load_1m": load1(), "batch_s": r["batch_s"],
                "qps": n_queries / r["batch_s"], "batch_queries": n_queries,
                "recall@10": recall_at(I, gt), "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99)), "n_single": int(lat.size),
                "threads": r["threads"], "load_1m": load1()})
    # ours at the same subset size, for a like-for-like row
    ours, _ = run_ours(sub, Q, gt, argparse.Namespace(**{**vars(args), "sweep": []}),
                       label=f"scatlas.CellIndex @ {n:,}")
    res["ours_same_size"] = ours
    return res


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def bench_size(n: int, args, checkpoint=None) -> dict[str, Any]:
    """Every method at size n; ``checkpoint(partial record)`` after each step, so that a run
    cut off by a timeout still leaves what it measured."""
    out: dict[str, Any] = {"n": n, "d": D, "queries": args.queries, "k": K, "gen": args.gen,
                           "methods": []}

    def mark(res: dict[str, Any] | None = None) -> None:
        if res is not None and not any(m is res for m in out["methods"]):
            out["methods"].append(res)
        if checkpoint is not None:
            checkpoint(out)

    t0 = time.perf_counter()
    if args.gen == "device":
        log(f"== N = {n:,}: generating {n + args.queries:,} x {D} on the {args.device}")
        X, Q = device_dataset(n, args.queries, args.device)
    else:
        X, Q = dataset(n, args.queries, save=args.save)
    out["data_s"] = time.perf_counter() - t0
    mark()
    host_data = not backend.is_gpu_array(X)
    path = CACHE / f"search_clustered_n{n}_q{args.queries}_d{D}_c{N_CLUSTERS}_s{SEED}.npy"
    n_gt = min(args.gt_queries or len(Q), len(Q))
    log(f"== N = {n:,}: exact ground truth for {n_gt} queries")
    tag = f"n{n}_q{args.queries}" + ("" if n_gt == len(Q) else f"_gt{n_gt}")
    gt, gt_s = ground_truth(X, Q[:n_gt], tag, save=args.save and args.gen == "host")
    out["recall_queries"] = n_gt
    log("exact")
    mark(run_exact(X, Q, gt_s, n_gt, args))
    log(f"scatlas.CellIndex ({args.engine})")
    ours, idx = run_ours(X, Q, gt, args, checkpoint=mark)
    mark(ours)
    if not host_data:  # raw faiss, the NumPy twin and hnswlib read host data
        del idx
        log("raw faiss, native-ivf (NumPy twin), hnswlib: skipped (data on the device)")
        return out
    if n <= args.raw_build_max or idx.engine.startswith("faiss"):
        log("raw faiss")
        out["methods"].append(run_raw_faiss(X, Q, gt, idx, args))
    else:  # nothing to reuse: ours is not a faiss index, and a CPU build is past the cap
        log(f"raw faiss skipped ({idx.engine} engine, n > --raw-build-max)")
    del idx
    gc.collect()
    if n <= args.native_max:
        log("native-ivf (NumPy twin)")
        nat, nidx = run_ours(X, Q, gt, args, engine="native-ivf",
                             label="scatlas.CellIndex native-ivf (NumPy)", device="cpu")
        out["methods"].append(nat)
        del nidx
        gc.collect()
    if args.hnsw_size > 0 and path.exists():
        out["methods"].append(run_hnswlib(n, path, args.queries, Q, X, args))
    elif args.hnsw_size > 0:
        log("hnswlib skipped: it reads the cached dataset file (not written: --no-save)")
    return out


def environment() -> dict[str, Any]:
    import platform

    env: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import faiss
    except ImportError:  # not needed with --gen device on a GPU (the native IVF)
        env["faiss"] = None
    else:
        env.update({"faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads()})
    if backend.gpu_available():
        env["gpu"] = gpu_name()
    env.update({"cpus": os.cpu_count(), "machine": platform.machine(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    return env


def gpu_name() -> str | None:
    """The GPU's name and memory, as CuPy reports them (None when it cannot)."""
    try:
        cp = backend.device_module("gpu")
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return f"{name}, {props['totalGlobalMem'] / 2**30:.0f} GiB"
    except Exception:  # noqa: BLE001 - a description only
        return None


def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, spec) if isinstance(v, int | float) else str(v)


def to_markdown(results: dict[str, Any]) -> str:
    device = "GPU" if results.get("device") == "gpu" else "CPU"
    lines = [f"# search ({device})", "",
             "Cell index vs raw faiss, exact search and hnswlib (SCimilarity's settings). "
             "128-d clustered unit embeddings, cosine, k=10, "
             f"`{results['command']}`. Environment: {json.dumps(results['environment'])}.", "",
             "Targets: 1e6 recall@10 >= 0.95, p50 <= 0.5 ms, build < 1 min; 1e7 recall@10 >= "
             "0.95, p50 < 5 ms, build < 10 min; 5e7 (GPU, issue 7) a batch of 1,000 queries "
             "in < 0.1 s at recall@10 >= 0.95. Latency = one `search(q[None], 10)` call "
             "(our Python overhead included); load = 1-minute load average (2 shared cores).",
             ""]
    for key in sorted(results["sizes"], key=int):
        r = results["sizes"][key]
        lines += [f"## N = {int(key):,}", ""]
        if r.get("gen") == "device":
            lines += [f"Data generated on the device in {fmt(r.get('data_s'))} s; recall@10 "
                      f"over the first {r.get('recall_queries')} queries (exact ground truth "
                      "by blocked GEMM on the device)." + (" **Partial: the run was cut off "
                                                          "here.**" if r.get("partial") else ""),
                      ""]
        lines += ["| method | cells | build s | RSS growth MB | index MB | recall@10 | p50 ms | "
                  "p99 ms | batch QPS | nlist | nprobe | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = []
        for m in r["methods"]:
            rows.append(m)
            if "ours_same_size" in m:
                rows.append(m["ours_same_size"])
        for m in rows:
            if m.get("skipped"):
                lines.append(f"| {m['method']} | skipped: {m['skipped']} |||||||||||")
                continue
            cells = m.get("measured_at_cells", int(key))
            if "@" in m["method"]:
                cells = int(m["method"].split("@")[1].replace(",", ""))
            idxb = m.get("index_bytes")
            lines.append(
                f"| {m['method']} | {cells:,} | {fmt(m.get('build_s'))} | "
                f"{fmt(m.get('rss_growth_mb'), '.0f')} | "
                f"{fmt(idxb / 2**20 if idxb else None, '.0f')} | {fmt(m.get('recall@10'), '.4f')}"
                f" | {fmt(m.get('p50_ms'))} | {fmt(m.get('p99_ms'))} | {fmt(m.get('qps'), '.0f')}"
                f" | {fmt(m.get('nlist'))} | {fmt(m.get('nprobe'))} | "
                f"{fmt(m.get('load_1m'))} |")
        for m in r["methods"]:
            if m.get("note"):
                lines.append(f"\n{m['method']}: {m['note']}.")
            if m.get("nprobe_sweep"):
                lines += ["", f"nprobe sweep ({m['method']}, nlist {m['nlist']}):", "",
                          "| nprobe | recall@10 | batch QPS | p50 ms | p99 ms |",
                          "|---|---|---|---|---|"]
                lines += [f"| {s['nprobe']} | {s['recall@10']:.4f} | {s['qps']:.0f} | "
                          f"{s['p50_ms']:.3g} | {s['p99_ms']:.3g} |" for s in m["nprobe_sweep"]]
        roof = [m for m in r["methods"] if m.get("roofline")]
        pk = results.get("peaks")
        if roof:
            lines += ["", "Roofline of the batch search (bytes read and flops per call; "
                      "`counted`: the engine's own count, `estimated`: a model of the engine)"
                      + (f". Peaks measured here: copy {pk['copy_gbs']:.1f} GB/s, sgemm "
                         f"{pk['sgemm_gflops']:.0f} GFLOP/s ({pk['threads']} threads)"
                         if pk else "") + ". The H100 column is a PROJECTION from the same "
                      "counts (max of touched bytes / 3.35 TB/s and flops / 67 TFLOPS FP32), "
                      "not a measurement.", "",
                      "| method | counts | GFLOP | GB | GFLOP/s | % sgemm | GB/s (touched) | "
                      "% copy | H100 projection ms |", "|---|---|---|---|---|---|---|---|---|"]
            for m in roof:
                rf = m["roofline"]
                lines.append(
                    f"| {m['method']} | {rf['source']} | {rf['flops'] / 1e9:.2f} | "
                    f"{rf['bytes'] / 1e9:.3f} | {rf['gflops_s']:.1f} | "
                    f"{fmt(rf.get('pct_sgemm_peak'), '.0f')} | {rf['gbs_touched']:.1f} | "
                    f"{fmt(rf.get('pct_copy_peak'), '.0f')} | {rf['h100_projection_ms']:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def install_hnswlib() -> int:
    subprocess.run([sys.executable, "-m", "venv", str(HNSW_VENV)], check=True)
    py = str(HNSW_VENV / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "numpy", "hnswlib==0.8.0"], check=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1e6")
    p.add_argument("--queries", type=int, default=1000, help="recall / batch queries")
    p.add_argument("--single", type=int, default=1000, help="single-query latency samples")
    p.add_argument("--exact-single", type=int, default=5)
    p.add_argument("--sweep", default="8,16,32,64,128")
    p.add_argument("--raw-build-max", type=float, default=1e6)
    p.add_argument("--native-max", type=float, default=1e6)
    p.add_argument("--hnsw-size", type=float, default=1e5, help="0 skips hnswlib")
    p.add_argument("--hnsw-timeout", type=float, default=3600)
    p.add_argument("--device", default="auto", choices=("cpu", "gpu", "auto"),
                   help="where our index is built and searched (gpu: the native CuPy IVF, or "
                   "faiss-gpu when installed); results go to search_<device>.json")
    p.add_argument("--engine", default="auto",
                   help="our index's engine (auto: exact below 1e5 cells, then faiss-ivf on "
                   "the CPU, native-ivf on the GPU without faiss-gpu)")
    p.add_argument("--gen", default="host", choices=("host", "device"),
                   help="where the embeddings are generated: host (cached memmap under "
                   "bench/.cache/, unless --no-save) or device (on --device, chunk by chunk; "
                   "the ground truth and exact timings by blocked GEMM there; 5e7 in one call)")
    p.add_argument("--no-save", dest="save", action="store_false",
                   help="write nothing under bench/.cache/: no dataset, ground truth or index "
                   "save (save_s / index_bytes left out)")
    p.add_argument("--gt-queries", type=int, default=0,
                   help="queries with an exact ground truth (recall@10 over them); 0: all")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--install-hnswlib", action="store_true")
    args = p.parse_args(argv)
    if args.install_hnswlib:
        return install_hnswlib()
    args.sweep = [int(s) for s in args.sweep.split(",") if s]
    args.hnsw_size = int(args.hnsw_size)
    sizes = sorted({int(float(s)) for s in args.sizes.split(",")})
    from scatlas.backend import resolve_device

    args.device = resolve_device(args.device)
    out = Path(args.out)
    path = out / f"search_{args.device}.json"
    results = json.loads(path.read_text()) if path.exists() else {"sizes": {}}
    results["environment"] = environment()
    results["device"] = args.device
    if args.device == "cpu":  # the roofline's peaks (a STREAM-like copy, an sgemm)
        from .ivf_scan import machine_peaks

        results["peaks"] = args.peaks = machine_peaks()
    results["command"] = "OMP_NUM_THREADS=" + str(os.environ.get("OMP_NUM_THREADS")) + \
        " python -m bench.search " + " ".join(argv if argv is not None else sys.argv[1:])
    def checkpoint(n: int, partial: dict[str, Any]) -> None:
        results["sizes"][str(n)] = {**partial, "partial": True,
                                    "environment": results["environment"],
                                    "command": results["command"]}
        atomic_write_text(path, json.dumps(results, indent=2))

    for n in sizes:
        r = bench_size(n, args, functools.partial(checkpoint, n))
        r["environment"] = results["environment"]
        r["command"] = results["command"]
        results["sizes"][str(n)] = r
        atomic_write_text(path, json.dumps(results, indent=2))
        atomic_write_text(out / f"search_{args.device}.md", to_markdown(results))
        log(to_markdown({**results, "sizes": {str(n): r}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
