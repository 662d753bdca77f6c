"""Benchmark: the native IVF's list-major scan (its NumPy twin) vs faiss ``IndexIVFFlat``, with a
roofline of the scan (issue 19, items 1 and 4).

    python -m bench.ivf_scan [--sizes 3e5,1e6] [--queries 2000] [--repeats 7]

Data: :func:`scatlas.search.synthetic.iter_clustered` (128-d unit rows, 300 anisotropic
clusters, seed 0), the first ``n`` rows indexed and the next ``--queries`` rows as queries (the
same files as ``bench.search``, cached in ``bench/.cache``); recall@10 against exact search
(blocked GEMM, cached).

Methods, all at ``nlist = default_nlist(n)``, ``nprobe = default_nprobe(nlist)``, cosine (inner
product on unit rows), k = 10, one call with the whole query batch:

- ``native-ivf`` : :class:`scatlas.search.engines.ivf_native.NativeIVF` on the CPU (NumPy);
- ``native-ivf fp16`` : the same with ``list_dtype="float16"`` (lists at half the bytes);
- ``faiss IndexIVFFlat`` : faiss-cpu with THE SAME coarse centroids (an ``IndexFlatIP``
  quantiser holding our k-means centroids), so both probe the same lists and see the same
  candidates; its OpenMP threads at their default (the machine's cores);
- ``native-ivf int8`` : ``list_dtype="int8"`` (per-dimension scale/offset fitted on the first
  ``SQ_TRAIN`` rows), a shortlist of 4 k per query re-ranked on float16 refine rows;
- ``faiss IVFSQ8`` : ``IndexIVFScalarQuantizer`` with ``QT_8bit`` (per-dimension min/max,
  fitted on the same rows; not on residuals, as ours), same centroids, no re-ranking;
- ``faiss IVFSQ8+RefineFlat`` : the same wrapped in ``IndexRefineFlat`` (``k_factor`` 4,
  float32 copies), the re-ranking twin of ours (``--no-int8`` skips these three).

Both engines are timed in the same process, interleaved (ours, fp16, faiss, ours, ...) for
``--repeats`` rounds after one warm-up each; reported: median seconds per batch, queries/s, the
ratio ours/faiss of the medians and the median of the per-round ratios, recall@10, and the share
of ids equal to faiss's. Single-query latency: ``--single`` one-row calls, interleaved the same
way.

Roofline (item 4): :meth:`NativeIVF.scan_counts` gives the bytes and flops of the measured
call; achieved GB/s and GFLOP/s are those over the median time, next to the machine's measured
peaks (a STREAM-like copy of 256 MB arrays on 1 and on all threads; an sgemm of 4096 x 128 by
128 x 32768 on one BLAS thread and at the default). The H100 lines are a PROJECTION from counts
(3.35 TB/s HBM3, 67 TFLOPS FP32; fp16 lists halve the list bytes and int8 lists quarter them,
both with FP32 arithmetic; the int8 line leaves out the re-ranking's host reads), the
max of bytes / bandwidth and flops / peak for the scan as implemented (list rows gathered and
re-read by the GEMM, the score buffer written once and read twice), for 1e7 cells in
10,000-query batches and 5e7 cells in 1,000-query batches (the issue's targets) and the sizes
measured here; no GPU was used, none of those lines is a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from scatlas import backend
from scatlas.search import default_nlist, default_nprobe, default_train_size
from scatlas.search.engines import ivf_native
from scatlas.search.engines.exact import blocked_topk
from scatlas.search.engines.ivf_native import NativeIVF

from .environment import REPO_ROOT, capture
from .io import atomic_write_text
from .runner import log

CACHE = REPO_ROOT / "bench" / ".cache"
RESULTS = REPO_ROOT / "bench" / "results"
D, K, SEED, N_CLUSTERS = 128, 10, 0, 300
H100_BW, H100_FP32 = 3.35e12, 67e12  # bytes/s, flop/s (vendor figures; projection only)
SQ_TRAIN = 100_000  # rows the int8 quantisers (ours, faiss IVFSQ8) are fitted on
_KEEP: list[Any] = []  # faiss objects referenced only from C++ (kept alive for the run)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def dataset(n: int, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 128) base (memmap) and (n_queries, 128) queries: bench.search's cached rows (same
    D, seed and clusters)."""
    from .search import dataset as search_dataset

    return search_dataset(n, n_queries)


def ground_truth(X: np.ndarray, Q: np.ndarray, n: int) -> np.ndarray:
    path = CACHE / f"search_gt_n{n}_q{len(Q)}_k{K}.npy"
    if path.exists():
        return np.load(path)
    log(f"exact ground truth, {len(Q)} queries")
    _, ids = blocked_topk(Q, X, K, "ip")
    ids = backend.to_host(ids)
    np.save(path, ids)
    return ids


def centroids(X: np.ndarray, n: int, nlist: int) -> np.ndarray:
    """Our k-means centroids (as CellIndex trains them), cached per size."""
    path = CACHE / f"ivf_scan_centroids_n{n}_nlist{nlist}_s{SEED}.npy"
    if path.exists():
        return np.load(path)
    ts = default_train_size(n, nlist)
    rows = np.sort(np.random.default_rng(SEED).choice(n, ts, replace=False))
    log(f"k-means: {nlist} centroids from {ts:,} rows")
    eng = NativeIVF(D, "ip", nlist, seed=SEED)
    eng.train(np.ascontiguousarray(X[rows]))
    C = backend.to_host(eng.centroids)
    np.save(path, C)
    return C


def recall_at(I: np.ndarray, gt: np.ndarray) -> float:
    hits = sum(len(set(a[:K].tolist()) & set(b[:K].tolist())) for a, b in zip(I, gt,
                                                                              strict=True))
    return hits / (K * len(gt))


# ----------------------------------------------------------------------------------------------
# machine peaks
# ----------------------------------------------------------------------------------------------
def stream_copy(threads: int, mb: int = 256, repeats: int = 5) -> float:
    """Best GB/s of ``np.copyto`` of ``mb`` MB (read + write counted), split over threads."""
    n = mb * 2**20 // 4
    a = np.ones(n, dtype=np.float32)
    b = np.empty_like(a)
    parts = np.linspace(0, n, threads + 1).astype(int)

    def one(i: int) -> None:
        np.copyto(b[parts[i] : parts[i + 1]], a[parts[i] : parts[i + 1]])

    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        ts = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def gemm_peak(serial: bool, repeats: int = 5) -> float:
    """Best GFLOP/s of a (4096, 128) x (128, 32768) float32 GEMM."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4096, D), dtype=np.float32)
    B = rng.standard_normal((32768, D), dtype=np.float32)
    best = math.inf
    ctx = backend.serial_blas() if serial else _null()
    with ctx:
        for _ in range(repeats):
            t0 = time.perf_counter()
            A @ B.T
            best = min(best, time.perf_counter() - t0)
    return 2 * A.shape[0] * B.shape[0] * D / best / 1e9


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def machine_peaks() -> dict[str, float]:
    cores = backend.cpu_threads()
    return {"copy_gbs_1thread": stream_copy(1), f"copy_gbs_{cores}threads": stream_copy(cores),
            "copy_gbs": max(stream_copy(1), stream_copy(cores)),
            "sgemm_gflops_1thread": gemm_peak(True), "sgemm_gflops": gemm_peak(False),
            "threads": cores}


# ----------------------------------------------------------------------------------------------
# roofline
# ----------------------------------------------------------------------------------------------
def roofline(counts: dict[str, float], seconds: float) -> dict[str, float]:
    """Achieved rates of one measured call from its counts."""
    flops = counts["coarse_flops"] + counts["scan_flops"] + counts["exact_flops"]
    compulsory = counts["list_bytes"] + counts["other_bytes"]
    touched = compulsory + counts["gather_bytes"] + counts["score_bytes"]
    return {"flops": flops, "bytes_compulsory": compulsory, "bytes_touched": touched,
            "gflops": flops / seconds / 1e9, "gbs_compulsory": compulsory / seconds / 1e9,
            "gbs_touched": touched / seconds / 1e9,
            "useful_score_share": counts["real_scores"] / max(counts["scores"], 1.0)}


def model_counts(n: int, batch: int, item: int, pad: float, row_pad: float,
                 skew: float) -> dict[str, float]:
    """Counts of one ``batch``-query search at ``n`` cells on the GPU path (its score budget
    splits the batch; each sub-batch reads every list it probes once), from the measured
    padding (``pad``: scores per real score; ``row_pad``: rows read per real row) and skew
    (real scores per pair x mean list: queries probe the larger lists more often)."""
    nlist = default_nlist(n)
    nprobe = default_nprobe(nlist)
    mean_list = n / nlist
    per_batch = max(1, int(ivf_native._SCORES_GPU // (mean_list * nprobe * ivf_native._PAD)))
    out = {"nlist": nlist, "nprobe": nprobe, "sub_batches": math.ceil(batch / per_batch)}
    bytes_, flops = 0.0, 0.0
    left = batch
    while left > 0:
        b = min(left, per_batch)
        left -= b
        frac = 1 - (1 - nprobe / nlist) ** b  # share of lists probed (uniform probes)
        rows = frac * n * row_pad
        real = b * nprobe * mean_list * skew
        scores = real * pad
        # lists read, the gathered fp32 copy written and read by the GEMM, the score passes
        bytes_ += rows * D * item + 2 * rows * D * 4 + scores * ivf_native._SCORE_BYTES
        bytes_ += nlist * D * 4 + 2 * b * D * 4
        flops += 2 * D * (b * nlist + scores)
    out.update({"bytes": bytes_, "flops": flops,
                "list_bytes_floor": min(batch * nprobe, nlist) / nlist * n * D * item})
    return out


def h100(counts: dict[str, float]) -> dict[str, float]:
    t_bw, t_fl = counts["bytes"] / H100_BW, counts["flops"] / H100_FP32
    return {"t_bytes_ms": 1e3 * t_bw, "t_flops_ms": 1e3 * t_fl,
            "t_ms": 1e3 * max(t_bw, t_fl),
            "t_floor_ms": 1e3 * counts["list_bytes_floor"] / H100_BW}


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
def build_ours(X: np.ndarray, C: np.ndarray, nlist: int, list_dtype: str) -> NativeIVF:
    eng = NativeIVF(D, "ip", nlist, list_dtype=list_dtype, seed=SEED)
    eng.set_centroids(C)
    eng.spherical = True
    if list_dtype == "int8":  # the quantiser from the same training sample as faiss's
        eng.fit_quantizer(np.ascontiguousarray(X[:SQ_TRAIN]))
    n = X.shape[0]
    eng.bulk_add(lambda record: ((np.ascontiguousarray(X[s : s + 200_000]),
                                  np.arange(s, min(n, s + 200_000)))
                                 for s in range(0, n, 200_000)))
    return eng


def build_faiss(X: np.ndarray, C: np.ndarray, nlist: int, nprobe: int):
    import faiss

    quant = faiss.IndexFlatIP(D)
    quant.add(C)
    index = faiss.IndexIVFFlat(quant, D, nlist, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    for s in range(0, X.shape[0], 200_000):
        index.add(np.ascontiguousarray(X[s : s + 200_000]))
    index.nprobe = nprobe
    return index


def build_faiss_sq(X: np.ndarray, C: np.ndarray, nlist: int, nprobe: int, refine: int):
    """faiss ``IndexIVFScalarQuantizer`` (``QT_8bit``: per-dimension min/max, as ours; not on
    residuals, as ours) over the same centroids; ``refine > 0`` wraps it in
    ``IndexRefineFlat`` (float32 copies, ``k_factor = refine``: ours re-ranks rerank x k)."""
    import faiss

    quant = faiss.IndexFlatIP(D)
    quant.add(C)
    index = faiss.IndexIVFScalarQuantizer(quant, D, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT, False)
    index.train(np.ascontiguousarray(X[:SQ_TRAIN]))  # the coarse quantiser is kept (trained)
    index.nprobe = nprobe
    top = index
    if refine:
        top = faiss.IndexRefineFlat(index)
        top.k_factor = float(refine)
    for s in range(0, X.shape[0], 200_000):
        top.add(np.ascontiguousarray(X[s : s + 200_000]))
    _KEEP.append((quant, index))  # the SWIG objects must outlive the wrapper
    return top


def bench_size(n: int, args) -> dict[str, Any]:
    import faiss

    X, Q = dataset(n, args.queries)
    gt = ground_truth(X, Q, n)
    nlist = default_nlist(n)
    nprobe = default_nprobe(nlist)
    C = centroids(X, n, nlist)
    log(f"== N = {n:,}: nlist {nlist}, nprobe {nprobe}; building")
    t0 = time.perf_counter()
    ours = build_ours(X, C, nlist, "float32")
    t_ours = time.perf_counter() - t0
    half = build_ours(X, C, nlist, "float16") if args.fp16 else None
    t0 = time.perf_counter()
    fidx = build_faiss(X, C, nlist, nprobe)
    t_faiss = time.perf_counter() - t0
    methods: dict[str, Any] = {"native-ivf": lambda q: ours.search(q, K, nprobe)}
    if half is not None:
        methods["native-ivf fp16"] = lambda q: half.search(q, K, nprobe)
    methods["faiss IndexIVFFlat"] = lambda q: fidx.search(q, K)
    engines = {"native-ivf": ours, "native-ivf fp16": half}
    if args.int8:
        i8 = build_ours(X, C, nlist, "int8")
        engines["native-ivf int8"] = i8
        sq = build_faiss_sq(X, C, nlist, nprobe, 0)
        sqr = build_faiss_sq(X, C, nlist, nprobe, i8.rerank)
        methods["native-ivf int8"] = lambda q: i8.search(q, K, nprobe)
        methods["faiss IVFSQ8"] = lambda q: sq.search(q, K)
        methods["faiss IVFSQ8+RefineFlat"] = lambda q: sqr.search(q, K)
    times: dict[str, list[float]] = {m: [] for m in methods}
    ids: dict[str, np.ndarray] = {}
    counts: dict[str, dict[str, float]] = {}
    for fn in methods.values():  # warm-up
        fn(Q)
    for r in range(args.repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            _, I = fn(Q)
            times[name].append(time.perf_counter() - t0)
            if r == 0:
                ids[name] = backend.to_host(I)
                if name.startswith("native"):
                    counts[name] = engines[name].scan_counts()
        log(f"  round {r + 1}: " + ", ".join(f"{m} {len(Q) / times[m][-1]:.0f} q/s"
                                            for m in methods))
    single: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(args.single):
        q = Q[i % len(Q) : i % len(Q) + 1]
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn(q)
            single[name].append(time.perf_counter() - t0)
    f = "faiss IndexIVFFlat"
    rows = []
    for name in methods:
        t = float(np.median(times[name]))
        row = {"method": name, "batch_s_median": t, "qps": len(Q) / t,
               "batch_s_all": times[name], "recall@10": recall_at(ids[name], gt),
               "same_ids_as_faiss": float(np.mean(ids[name] == ids[f])),
               "single_p50_ms": 1e3 * float(np.median(single[name])) if args.single else None,
               "single_p99_ms": (1e3 * float(np.percentile(single[name], 99))
                                 if args.single else None)}
        if name in engines:
            row["bytes_per_cell"] = engines[name].bytes_per_cell()
        if name.startswith("faiss IVFSQ8"):
            ref = "native-ivf int8"
            row["ratio_ours_int8_vs_this"] = t / float(np.median(times[ref]))
        elif name != f:
            row["ratio_vs_faiss"] = float(np.median(times[f])) / t
            row["ratio_vs_faiss_paired_median"] = float(np.median(
                np.array(times[f]) / np.array(times[name])))
            row["counts"] = counts[name]
            row["roofline"] = roofline(counts[name], t)
        else:
            c = counts["native-ivf"]  # the same candidates (same centroids, same nprobe)
            fl = 2 * D * (len(Q) * nlist + c["real_scores"])
            row["roofline"] = {"flops": fl, "gflops": fl / t / 1e9,
                               "note": "flops of a pair-by-pair scan of the same candidates"}
        rows.append(row)
    return {"n": n, "d": D, "k": K, "queries": len(Q), "nlist": nlist, "nprobe": nprobe,
            "build_s": {"native-ivf": t_ours, "faiss IndexIVFFlat (add only)": t_faiss},
            "faiss_threads": faiss.omp_get_max_threads(), "methods": rows}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def projections(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """H100 projections from the counts' model, with padding and skew measured here."""
    meas = [m for s in sizes for m in s["methods"] if m["method"] == "native-ivf"]
    c = meas[-1]["counts"] if meas else None
    pad = c["scores"] / c["real_scores"] if c else 1.25
    row_pad = c["rows_read"] / c["rows_real"] if c else 1.06
    skew = (c["real_scores"] / (c["pairs"] * sizes[-1]["n"] / sizes[-1]["nlist"])
            if c else 1.0)
    out = []
    for n, batch in [(s["n"], s["queries"]) for s in sizes] + [(10**7, 10_000), (5 * 10**7,
                                                                               1_000)]:
        for item, label in ((4, "fp32 lists"), (2, "fp16 lists"), (1, "int8 lists")):
            mc = model_counts(n, batch, item, pad, row_pad, skew)
            pr = h100(mc)
            out.append({"n": n, "batch": batch, "lists": label, **mc, **pr,
                        "qps": batch / (pr["t_ms"] / 1e3), "pad": pad, "row_pad": row_pad,
                        "skew": skew})
    return out


def markdown(rec: dict[str, Any]) -> str:
    env = rec["environment"]
    pk = rec["peaks"]
    lines = [
        "# IVF list-major scan (CPU): native IVF (NumPy twin) vs faiss IndexIVFFlat / IVFSQ8",
        "",
        f"`{rec['command']}`. {env.get('cpu_model')}, {env.get('cpu_cores_available')} cores "
        f"(shared with other work: load average {rec['load_1m_start']} at the start, "
        f"{rec['load_1m_end']} at the end); numpy {env['versions'].get('numpy')}, faiss "
        f"{rec['faiss_version']}; {rec['date']}.",
        "",
        "Same clustered 128-d unit rows as bench.search, cosine, k = 10, one call per "
        f"{rec['sizes'][0]['queries']:,}-query batch; both engines with the SAME k-means "
        "centroids (so the same probed lists and candidates); timings interleaved "
        f"({rec['repeats']} rounds after a warm-up), medians.",
        "",
        "| N | nlist | nprobe | method | batch s (median) | queries/s | vs faiss (medians) | "
        "vs faiss (paired) | recall@10 | ids = faiss | single p50 ms | bytes/cell |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rec["sizes"]:
        for m in s["methods"]:
            r = m.get("ratio_vs_faiss")
            rp = m.get("ratio_vs_faiss_paired_median")
            bpc = m.get("bytes_per_cell")
            p50 = m.get("single_p50_ms")
            lines.append(
                f"| {s['n']:,} | {s['nlist']} | {s['nprobe']} | {m['method']} | "
                f"{m['batch_s_median']:.3f} | {m['qps']:,.0f} | "
                f"{'-' if r is None else f'{r:.2f}x'} | {'-' if rp is None else f'{rp:.2f}x'} "
                f"| {m['recall@10']:.4f} | {m['same_ids_as_faiss']:.4f} | "
                f"{'-' if p50 is None else f'{p50:.2f}'} | {'-' if bpc is None else f'{bpc:.0f}'} "
                "|")
    for s in rec["sizes"]:
        for m in s["methods"]:
            if "ratio_ours_int8_vs_this" in m:
                lines.append(f"\nN = {s['n']:,}: native-ivf int8 is "
                             f"{m['ratio_ours_int8_vs_this']:.2f}x the queries/s of "
                             f"{m['method']} (medians).")
    lines += [
        "",
        "## Roofline (measured on this machine)",
        "",
        f"Peaks measured here: copy {pk['copy_gbs_1thread']:.1f} GB/s on 1 thread, "
        f"{pk['copy_gbs']:.1f} GB/s best; sgemm {pk['sgemm_gflops_1thread']:.0f} GFLOP/s on "
        f"1 BLAS thread, {pk['sgemm_gflops']:.0f} GFLOP/s at the default threads "
        f"({pk['threads']} cores).",
        "",
        "| N | method | GFLOP | GFLOP/s | % sgemm peak | GB compulsory | GB/s compulsory | "
        "GB touched | GB/s touched | % copy peak | useful scores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rec["sizes"]:
        for m in s["methods"]:
            rf = m.get("roofline")
            if rf is None:  # faiss IVFSQ8 rows: no counts
                continue
            if "bytes_touched" in rf:
                lines.append(
                    f"| {s['n']:,} | {m['method']} | {rf['flops'] / 1e9:.2f} | "
                    f"{rf['gflops']:.1f} | {100 * rf['gflops'] / pk['sgemm_gflops']:.0f}% | "
                    f"{rf['bytes_compulsory'] / 1e9:.3f} | {rf['gbs_compulsory']:.1f} | "
                    f"{rf['bytes_touched'] / 1e9:.3f} | {rf['gbs_touched']:.1f} | "
                    f"{100 * rf['gbs_touched'] / pk['copy_gbs']:.0f}% | "
                    f"{rf['useful_score_share']:.2f} |")
            else:
                lines.append(f"| {s['n']:,} | {m['method']} | {rf['flops'] / 1e9:.2f} | "
                             f"{rf['gflops']:.1f} | "
                             f"{100 * rf['gflops'] / pk['sgemm_gflops']:.0f}% | - | - | - | - "
                             "| - | - |")
    lines += [
        "",
        "Compulsory bytes: every probed list read once per batch, plus centroids, queries and "
        "the re-scored candidates. Touched: plus the float32 copy of the gathered rows "
        "(written, read by the GEMM) and every pass over the score buffer, unfused "
        f"({ivf_native._SCORE_BYTES} bytes a score); on the CPU these steps are cache-sized, so "
        "touched bytes are not all DRAM "
        "traffic. faiss row: the flops a pair-by-pair scan of the same candidates does (its "
        "bytes are not counted).",
        "",
        "## H100: a PROJECTION from the counts, not a measurement (no GPU was used)",
        "",
        "max(bytes / 3.35 TB/s, flops / 67 TFLOPS FP32) for the scan as implemented on the "
        "GPU path (sub-batches of at most `_SCORES_GPU` = 2^30 scores, what an 80 GB card "
        "gives; lists gathered into a float32 copy and re-read by the GEMM; "
        f"{ivf_native._SCORE_BYTES} bytes of unfused passes a score); floor: the probed lists "
        "read once at 3.35 TB/s. Padding and skew as measured at the largest size here. Real "
        "kernels (gathers, batched small GEMMs, partitions) will not reach these rates: read "
        "them as lower bounds on the time.",
        "",
        "| N | batch | lists | nlist | nprobe | sub-batches | GB | GFLOP | t bytes ms | "
        "t flops ms | projected ms | floor ms | projected queries/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in rec["h100_projection"]:
        lines.append(
            f"| {p['n']:,} | {p['batch']:,} | {p['lists']} | {p['nlist']} | {p['nprobe']} | "
            f"{p['sub_batches']} | {p['bytes'] / 1e9:.1f} | {p['flops'] / 1e9:.0f} | "
            f"{p['t_bytes_ms']:.2f} | {p['t_flops_ms']:.2f} | {p['t_ms']:.2f} | "
            f"{p['t_floor_ms']:.2f} | {p['qps']:,.0f} |")
    return "\n".join(lines) + "\n"


def _faiss_version() -> str | None:
    try:
        import faiss
    except ImportError:
        return None
    return getattr(faiss, "__version__", None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.ivf_scan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="3e5,1e6")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--single", type=int, default=100, help="single-query calls per method")
    p.add_argument("--no-fp16", dest="fp16", action="store_false")
    p.add_argument("--no-int8", dest="int8", action="store_false",
                   help="skip native-ivf int8 and faiss IVFSQ8 (+RefineFlat)")
    p.add_argument("--out", default=str(RESULTS / "ivf_scan_cpu.json"))
    args = p.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    rec: dict[str, Any] = {
        "command": "python -m bench.ivf_scan " + " ".join(argv if argv is not None else
                                                           sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "repeats": args.repeats,
        "load_1m_start": round(os.getloadavg()[0], 2), "environment": capture("cpu"),
        "faiss_version": _faiss_version(),
    }
    log("machine peaks")
    rec["peaks"] = machine_peaks()
    rec["sizes"] = []
    out = Path(args.out)
    for n in sizes:
        rec["sizes"].append(bench_size(n, args))
        rec["load_1m_end"] = round(os.getloadavg()[0], 2)
        rec["h100_projection"] = projections(rec["sizes"])
        atomic_write_text(out, json.dumps(rec, indent=1, default=float))
        atomic_write_text(out.with_suffix(".md"), markdown(rec))
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return rec


if __name__ == "__main__":
    main()
