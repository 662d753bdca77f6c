"""Benchmark ``online_inmf``: online iNMF streamed from a backed .h5ad; wall time and peak RSS.

Workload: ``scatlas.datasets.write_synthetic_h5ad(path, n, 2000, n_batches=3, seed=0)``, a CSR
``.h5ad`` cached under ``bench/.cache/`` (written chunk by chunk with bounded memory; ~1.6 GB at
1e6 cells). Nothing of it is loaded by the parent process.

Method ``scatlas.tl.online_inmf`` (scenario 1): LIGER's whole pipeline on the file's three batches
as datasets (gene statistics in one streamed pass, rliger's ``selectGenes`` defaults or
``--param n_top=N`` genes per batch, per-batch scaling applied to each chunk as it is read,
k = 20, lambda = 5, 5 epochs of 5,000-cell mini-batches, final H by exact BPP chunk by chunk,
then quantile normalisation). It runs in a fresh Python process (``python -m bench.online_inmf
worker ...``) so that its peak resident memory is its own: the worker reports
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` and the maximum of a thread sampling
``/proc/self/statm`` every 50 ms. The harness time includes that process's start and imports
(about 2 s); ``fit s`` is the time inside ``online_inmf``, split into the gene-statistics pass,
the factorisation (mini-batches and the final H) and the quantile normalisation (whose exact
within-dataset kNN grows quadratically with the cells of a dataset).

Accuracy on 20,000 random cells of the result: cross-batch kNN (k = 15, cosine) label transfer of
the synthetic cell type on the quantile-normalised embedding (mean over batches) and batch
mixing (fraction of each cell's 15 nearest neighbours from another batch; 1 - 1/batches is
perfect mixing for equal batches).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import workloads
from .environment import REPO_ROOT
from .runner import log
from .spec import Benchmark, Method, Metric, Workload

DEFAULT_PARAMS: dict[str, Any] = {
    "k": 20,
    "lam": 5.0,
    "n_genes": 2000,
    "n_batches": 3,
    "seed": 0,
    "max_epochs": 5,
    "minibatch_size": 5000,
    "n_top": 0,  # rliger nGenes per batch; 0 = selectGenes defaults (all passing genes)
    "sample": 20_000,  # cells scored for label transfer and mixing
}

METRICS = {
    "peak_rss_gib": Metric("peak RSS GiB", ".2f"),
    "fit_s": Metric("fit s", ".1f"),
    "stats_s": Metric("gene stats s", ".1f"),
    "factorization_s": Metric("online iNMF s", ".1f"),
    "quantile_s": Metric("quantile norm s", ".1f"),
    "n_genes_used": Metric("genes", "d"),
    "n_iter": Metric("mini-batches", "d"),
    "label_transfer": Metric("label transfer", ".3f", higher_is_better=True),
    "batch_mixing": Metric("batch mixing", ".3f", higher_is_better=True),
}

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def h5ad_path(size: int, params: Mapping[str, Any]) -> Path:
    """The cached synthetic atlas file for ``size`` cells (written when missing)."""
    key = (f"online_n{size}_g{params['n_genes']}_b{params['n_batches']}_s{params['seed']}_"
           f"{workloads.generator_fingerprint()}")
    path = workloads.cache_dir() / f"{key}.h5ad"
    if not path.is_file():
        from scatlas import datasets

        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"[workload] writing synthetic({size:,}, {params['n_genes']}) to {path} ...")
        datasets.write_synthetic_h5ad(path, size, params["n_genes"],
                                      n_batches=params["n_batches"], seed=params["seed"])
    return path


def build(size: int, device: str, params: Mapping[str, Any]) -> Workload:
    """Only the path of the on-disk atlas (the worker process streams it)."""
    start = time.perf_counter()
    path = h5ad_path(size, params)
    info = {"path": str(path), "file_gib": round(path.stat().st_size / 2**30, 3),
            "write_s": round(time.perf_counter() - start, 3),
            "summary": (f"{size:,} cells × {params['n_genes']} genes, {params['n_batches']} "
                        f"batches, CSR .h5ad on disk ({path.stat().st_size / 2**30:.2f} GiB)")}
    return Workload(host=path, data=path, info=info,
                    extra={"params": dict(params), "device": device})


def _worker_call(w: Workload) -> dict[str, Any]:
    p = w.extra["params"]
    with tempfile.TemporaryDirectory(prefix="scatlas-online-bench-") as tmp:
        out = Path(tmp) / "result"
        cmd = [sys.executable, "-m", "bench.online_inmf", "worker", str(w.host), str(out),
               "--k", str(p["k"]), "--lam", str(p["lam"]), "--max-epochs", str(p["max_epochs"]),
               "--minibatch-size", str(p["minibatch_size"]), "--n-top", str(p["n_top"]),
               "--sample", str(p["sample"]), "--device", w.extra["device"]]
        done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"worker failed ({done.returncode}): {done.stderr[-2000:]}")
        report = json.loads((out.with_suffix(".json")).read_text())
        with np.load(out.with_suffix(".npz"), allow_pickle=False) as z:
            report["sample"] = {name: z[name] for name in z.files}
    return report


def methods(params: Mapping[str, Any]) -> list[Method]:
    """The one method: ``scatlas.tl.online_inmf`` on the file, in a fresh process."""
    return [Method("scatlas.online_inmf", _worker_call, "ours", "online",
                   "tl.online_inmf([file], batch_key='batch') in its own process, streamed",
                   on_device=True)]


def _knn_scores(H: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> tuple[float, float]:
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    Hn = H / np.maximum(np.linalg.norm(H, axis=1, keepdims=True), 1e-12)
    accs = []
    for b in np.unique(batches):
        q = batches == b
        clf = KNeighborsClassifier(n_neighbors=15).fit(Hn[~q], labels[~q])
        accs.append(float((clf.predict(Hn[q]) == labels[q]).mean()))
    ind = NearestNeighbors(n_neighbors=16).fit(H).kneighbors(H, return_distance=False)
    mixing = float((batches[ind[:, 1:]] != batches[:, None]).mean())
    return float(np.mean(accs)), mixing


def accuracy(w: Workload, method: Method, output: Any) -> dict[str, Any]:
    """Memory, fit time and embedding quality on a sample of cells."""
    s = output["sample"]
    ok = np.isfinite(s["H_norm"]).all(axis=1)
    transfer, mixing = _knn_scores(s["H_norm"][ok], s["cell_type"][ok], s["batch"][ok])
    t = output.get("timings", {})
    return {"peak_rss_gib": output["peak_rss_gib"], "fit_s": output["fit_s"],
            "stats_s": t.get("statistics_s"), "factorization_s": t.get("factorization_s"),
            "quantile_s": t.get("quantile_norm_s"),
            "n_genes_used": output["n_genes_used"], "n_iter": output["n_iter"],
            "label_transfer": transfer, "batch_mixing": mixing}


BENCHMARK = Benchmark(
    name="online_inmf",
    description=("Online iNMF (tl.online_inmf, k=20, λ=5, 5 epochs, 5,000-cell mini-batches) "
                 "streamed from a backed synthetic .h5ad (3 batches × 2,000 genes), in its own "
                 "process: wall time and peak RSS."),
    build=build,
    methods=methods,
    accuracy=accuracy,
    metrics=METRICS,
    default_sizes=(100_000, 1_000_000),
    default_params=DEFAULT_PARAMS,
    size_label="cells",
)


# --- the worker process --------------------------------------------------------------------


class RssSampler:
    """Maximum resident set size of this process, sampled from /proc/self/statm."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm", encoding="ascii") as fh:
                return int(fh.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _worker(args: argparse.Namespace) -> int:
    from scatlas import tl

    fn = tl.online_inmf
    with RssSampler() as rss:
        start = time.perf_counter()
        res = fn([args.path], "batch", k=args.k, lam=args.lam, max_epochs=args.max_epochs,
                 minibatch_size=args.minibatch_size, n_genes=args.n_top or None,
                 device=args.device, progress=False)
        fit_s = time.perf_counter() - start
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    u = res.uns["inmf"]
    report = {
        "fit_s": fit_s, "peak_rss_gib": max(maxrss, rss.peak) / 2**30,
        "ru_maxrss_gib": maxrss / 2**30, "sampled_peak_gib": rss.peak / 2**30,
        "n_genes_used": int(len(u["genes"])), "n_iter": int(u["params"]["n_iter"]),
        "epochs": int(u["params"]["epochs"]), "objective": float(u["objective"]),
        "n_cells": int(res.n_obs),
        "timings": {k: float(v) for k, v in u.get("timings", {}).items()},
    }
    rng = np.random.default_rng(0)
    take = np.sort(rng.choice(res.n_obs, size=min(args.sample, res.n_obs), replace=False))
    np.savez(Path(args.out).with_suffix(".npz"),
             H_norm=np.asarray(res.obsm["X_inmf_norm"][take]),
             cell_type=res.obs["cell_type"].astype(str).to_numpy()[take].astype("U"),
             batch=res.obs["batch"].astype(str).to_numpy()[take].astype("U"))
    Path(args.out).with_suffix(".json").write_text(json.dumps(report))
    print(json.dumps(report), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.online_inmf worker PATH OUT [...]``: one measured fit."""
    parser = argparse.ArgumentParser(prog="python -m bench.online_inmf")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="fit one file and report time and peak RSS")
    w.add_argument("path")
    w.add_argument("out", help="output stem (.json report, .npz sample)")
    w.add_argument("--k", type=int, default=20)
    w.add_argument("--lam", type=float, default=5.0)
    w.add_argument("--max-epochs", type=int, default=5)
    w.add_argument("--minibatch-size", type=int, default=5000)
    w.add_argument("--n-top", type=int, default=0)
    w.add_argument("--sample", type=int, default=20_000)
    w.add_argument("--device", default="cpu")
    return _worker(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
