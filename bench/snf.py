"""Similarity network fusion: cluster quality on real data, and speed / memory against snfpy.

``quality``: clusters of the fused network vs the single views' own networks (spectral
clustering, the true number of groups, and the eigengap's estimate), by ARI:

- CellBench (1,021 cells, 5 lung cell lines over 5 batches, label ``cell_line``, SNP-derived):
  view 1 = PCA (30) of the log-normalised 2,000 most variable genes; view 2 = gene-module
  scores: the genes ranked 2,001-4,000 by variability, grouped into 50 modules by k-means on
  their scaled expression, a cell's score the module's mean scaled expression.
- CITE-seq (500 PBMC, ECCITE-seq): view 1 = RNA PCA (30) as above; view 2 = the 49 ADTs,
  CLR-transformed. Groups defined by protein gating on canonical markers (each marker split at
  the midpoint of a 1-D 2-means; CD4 T = CD3+CD4+CD8-, CD8 T = CD3+CD8+CD4-, B = CD3-CD19+,
  monocyte = CD3-CD19-CD14+, NK = CD3-CD19-CD14-CD56+; other cells are left out of the ARI).

``speed``: the same synthetic views (n cells in 8 Gaussian groups; 30 and 20 features) through
``scatlas.kernels.snf`` and through snfpy 0.2.2 (``make_affinity`` + ``snf``) in its own venv
(bench/.peers/snfpy: snfpy needs scikit-learn < 1.6), each in a fresh process for its peak
resident memory. snfpy's dense GEMMs make a t=20 run at 1e4 cells take over an hour on this
machine and 5e4 cells need > 18 GiB per n x n matrix, so snfpy runs ``t=0`` and ``t=1`` and its
t=20 time is extrapolated (affinity + setup + 20 x the measured iteration; at sizes it cannot
hold, iteration x (n / n_measured)^3), labelled as such. scatlas runs t=1 (side by side with
snfpy, measured) and t=20, on its default route and, where it fits, its dense route.

Run: ``python -m bench.snf quality`` and ``python -m bench.snf speed --sizes 1e4,5e4``; writes
``bench/results/snf_quality_cpu.json`` / ``snf_speed_cpu.json``. Exits non-zero when a method
failed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "data"
SNFPY_PYTHON = ROOT / "bench" / ".peers" / "snfpy" / "bin" / "python"
N_GROUPS = 8


# ----------------------------------------------------------------------------------------------
# quality
# ----------------------------------------------------------------------------------------------
def _rna_views(adata: Any, n_modules: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(PCA of the top 2,000 variable genes, module scores of the genes ranked 2,001-4,000)."""
    import scanpy as sc
    from sklearn.cluster import KMeans

    from scatlas.kernels import pca

    a = adata.copy()
    a.X = a.X.astype(np.float32)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    disp = sc.pp.highly_variable_genes(a, n_top_genes=4000, inplace=False)
    order = np.argsort(-disp["dispersions_norm"].fillna(-np.inf).to_numpy(), kind="stable")
    X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    top = X[:, order[:2000]]
    top = (top - top.mean(0)) / np.maximum(top.std(0), 1e-8)
    rna = np.asarray(pca(top.astype(np.float64), 30, seed=seed).scores)
    nxt = X[:, order[2000:4000]]
    nxt = (nxt - nxt.mean(0)) / np.maximum(nxt.std(0), 1e-8)
    modules = KMeans(n_modules, n_init=4, random_state=seed).fit_predict(nxt.T)
    scores = np.stack([nxt[:, modules == k].mean(1) for k in range(n_modules)], axis=1)
    return rna, scores


def _clr(counts: np.ndarray) -> np.ndarray:
    logc = np.log1p(counts)
    return logc - logc.mean(axis=1, keepdims=True)


def _gate(prot: Any) -> np.ndarray:
    """Protein-defined groups (see the module docstring); "" where no gate applies."""
    from sklearn.cluster import KMeans

    clr = _clr(prot.to_numpy(dtype=np.float64))
    names = list(prot.columns)
    pos = {}
    for marker in ("CD3", "CD4", "CD8", "CD19", "CD14", "CD56"):
        x = clr[:, names.index(marker)][:, None]
        centres = np.sort(KMeans(2, n_init=4, random_state=0).fit(x).cluster_centers_.ravel())
        pos[marker] = x.ravel() > centres.mean()
    g = np.full(clr.shape[0], "", dtype=object)
    t = pos["CD3"]
    g[t & pos["CD4"] & ~pos["CD8"]] = "CD4 T"
    g[t & pos["CD8"] & ~pos["CD4"]] = "CD8 T"
    g[~t & pos["CD19"]] = "B"
    g[~t & ~pos["CD19"] & pos["CD14"]] = "monocyte"
    g[~t & ~pos["CD19"] & ~pos["CD14"] & pos["CD56"]] = "NK"
    return g.astype(str)


def _score(views: dict[str, np.ndarray], labels: np.ndarray, keep: np.ndarray,
           seed: int) -> dict[str, Any]:
    from sklearn.metrics import adjusted_rand_score

    from scatlas.kernels import affinity, snf, spectral_clusters

    n_true = int(np.unique(labels[keep]).size)
    nets = {name: affinity(X) for name, X in views.items()}
    t0 = time.perf_counter()
    nets["snf"] = snf(list(views.values()))
    snf_s = time.perf_counter() - t0
    out: dict[str, Any] = {"n_groups": n_true, "n_cells_scored": int(keep.sum()),
                           "snf_seconds": snf_s, "methods": {}}
    for name, W in nets.items():
        fixed = spectral_clusters(W, n_true, seed=seed)
        est = spectral_clusters(W, seed=seed)
        out["methods"][name] = {
            "ari_true_k": float(adjusted_rand_score(labels[keep], np.asarray(fixed.labels)[keep])),
            "eigengap_k": est.n_clusters,
            "ari_eigengap_k": float(adjusted_rand_score(labels[keep],
                                                        np.asarray(est.labels)[keep])),
        }
    return out


def quality(seed: int) -> dict[str, Any]:
    import anndata as ad

    record: dict[str, Any] = {}
    cb = ad.read_h5ad(DATA / "cellbench_lung_celllines_5batch.h5ad")
    rna, modules = _rna_views(cb, seed=seed)
    labels = cb.obs["cell_line"].astype(str).to_numpy()
    record["cellbench"] = _score({"rna_pca": rna, "gene_modules": modules}, labels,
                                 np.ones(labels.size, bool), seed)
    cite = ad.read_h5ad(DATA / "citefuse_eccite_cite_seq_500.h5ad")
    rna, _ = _rna_views(cite, seed=seed)
    prot = cite.obsm["protein_counts"]
    groups = _gate(prot)
    record["cite_seq"] = _score({"rna_pca": rna, "protein_clr": _clr(prot.to_numpy(float))},
                                groups, groups != "", seed)
    record["cite_seq"]["group_sizes"] = {g: int((groups == g).sum()) for g in np.unique(groups)
                                         if g}
    return record


# ----------------------------------------------------------------------------------------------
# speed
# ----------------------------------------------------------------------------------------------
def synthetic_views(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, N_GROUPS, n)
    x1 = rng.normal(size=(n, 30)) + 0.6 * rng.normal(size=(N_GROUPS, 30))[groups]
    x2 = rng.normal(size=(n, 20)) + 0.6 * rng.normal(size=(N_GROUPS, 20))[groups]
    return x1, x2, groups


def _scatlas_worker(args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.metrics import adjusted_rand_score

    from scatlas.kernels import snf, spectral_clusters

    x1, x2, groups = synthetic_views(args.n, args.seed)
    kwargs: dict[str, Any] = {"t": args.t}
    if args.route == "dense":
        kwargs.update(sparse=False)
    start, cpu = time.perf_counter(), time.process_time()
    F = snf([x1, x2], **kwargs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    out = {"seconds": seconds, "cpu_seconds": cpu,
           "route": "sparse" if hasattr(F, "nnz") else "dense",
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if args.t > 1:
        labels = np.asarray(spectral_clusters(F, N_GROUPS, seed=0).labels)
        out["ari_planted"] = float(adjusted_rand_score(groups, labels))
    return out


_SNFPY_CODE = """
import json, resource, sys, time
import numpy as np, snf
x1, x2 = np.load(sys.argv[1]), np.load(sys.argv[2])
t = int(sys.argv[3])
clock = [(time.perf_counter(), time.process_time())]
aff = snf.make_affinity(x1, x2, K=20, mu=0.5)
clock.append((time.perf_counter(), time.process_time()))
snf.snf(*aff, K=20, t=0)
clock.append((time.perf_counter(), time.process_time()))
snf.snf(*aff, K=20, t=t)
clock.append((time.perf_counter(), time.process_time()))
out = {}
for c, key in ((0, ""), (1, "cpu_")):
    a, b, d, e = (x[c] for x in clock)
    out.update({key + "affinity_s": b - a, key + "setup_s": d - b,
                key + "iteration_s": (e - d - (d - b)) / t})
print(json.dumps({**out,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def _snfpy(n: int, seed: int, t: int) -> dict[str, Any]:
    x1, x2, _ = synthetic_views(n, seed)
    with tempfile.TemporaryDirectory() as tmp:
        p1, p2 = Path(tmp) / "x1.npy", Path(tmp) / "x2.npy"
        np.save(p1, x1)
        np.save(p2, x2)
        proc = subprocess.run([str(SNFPY_PYTHON), "-c", _SNFPY_CODE, str(p1), str(p2), str(t)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"snfpy failed at n={n}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _scatlas(n: int, seed: int, t: int, route: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.snf", "worker", "--n", str(n), "--seed", str(seed),
           "--t", str(t), "--route", route]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"scatlas snf failed at n={n} ({route}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed(sizes: list[int], seed: int, repeats: int, dense_max: int,
          snfpy_max: int, dense_t20: bool, repeats_large: int) -> dict[str, Any]:
    from scatlas.kernels.snf import MAX_DENSE_BYTES

    out: dict[str, Any] = {"t": 20, "K": 20, "mu": 0.5, "repeats": repeats,
                           "repeats_above_1e4": repeats_large,
                           "max_dense_bytes": MAX_DENSE_BYTES, "sizes": {}}
    measured: dict[str, Any] | None = None
    for n in sizes:
        row: dict[str, Any] = {}
        reps = repeats if n <= 10_000 else repeats_large
        runs = [_scatlas(n, seed, 20, "auto") for _ in range(reps)]
        row["scatlas_default_t20"] = {
            "route": runs[0]["route"], "seconds_median": statistics.median(
                r["seconds"] for r in runs), "seconds": [r["seconds"] for r in runs],
            "cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in runs),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
            "ari_planted": runs[0].get("ari_planted")}
        if n <= dense_max:
            row["scatlas_dense_t1"] = _scatlas(n, seed, 1, "dense")
            if dense_t20:
                row["scatlas_dense_t20"] = _scatlas(n, seed, 20, "dense")
        if n <= snfpy_max:
            peer = _snfpy(n, seed, 1)
            measured = {"n": n, **peer}
            _measured_peer(row, peer)
        elif measured is not None:
            _extrapolate(row, measured, n)
        if "snfpy" in row:
            _ratio(row)
        out["sizes"][str(n)] = row
        print(json.dumps({n: row}, default=float), flush=True)
    return out


def _extrapolate(row: dict[str, Any], measured: dict[str, Any], n: int) -> None:
    """snfpy's t=20 time at ``n`` from its phases measured at ``measured["n"]``: affinity and
    setup O(n^2), the GEMM iteration O(n^3)."""
    scale = n / measured["n"]
    row["snfpy"] = {
        "not_run": f"needs {n * n * 8 / 2**30:.1f} GiB per n x n float64 matrix (snfpy holds "
                   "at least 6)", "extrapolated": True, "from_n": measured["n"],
        **{f"extrapolated_t20_{key}s": (measured[f"{key}affinity_s"]
                                        + measured[f"{key}setup_s"]) * scale**2
           + 20 * measured[f"{key}iteration_s"] * scale**3 for key in ("", "cpu_")}}


def _ratio(row: dict[str, Any]) -> None:
    default = row["scatlas_default_t20"]
    row["ratio_t20_vs_extrapolated_snfpy"] = {
        "wall": row["snfpy"]["extrapolated_t20_s"] / default["seconds_median"],
        "cpu": row["snfpy"]["extrapolated_t20_cpu_s"] / default["cpu_seconds_median"]}


def merge(tags: list[str]) -> Path:
    """Build ``snf_speed_cpu.json`` from runs made in separate processes (they can run at the
    same time): ``snf_speed_<tag>_cpu.json`` for each tag (scatlas rows, ``--snfpy-max 0``)
    and ``snf_speed_peer_cpu.json`` (``peer``: snfpy's measured phases). snfpy's t=20 time is
    measured-phase based at its own size and extrapolated at the others."""
    peer = json.loads((RESULTS / "snf_speed_peer_cpu.json").read_text())
    measured = {"n": peer["n"], **peer["snfpy"]}
    out: dict[str, Any] = {"environment": peer["environment"], "sizes": {}}
    for tag in tags:
        part = json.loads((RESULTS / f"snf_speed_{tag}_cpu.json").read_text())
        for key in ("t", "K", "mu", "repeats", "repeats_above_1e4", "max_dense_bytes"):
            out[key] = part[key]
        for n, row in part["sizes"].items():
            if int(n) == measured["n"]:
                _measured_peer(row, measured)
            else:
                _extrapolate(row, measured, int(n))
            _ratio(row)
            row["environment"] = part["environment"]
            out["sizes"][n] = row
    path = RESULTS / "snf_speed_cpu.json"
    path.write_text(json.dumps(out, indent=2, default=float))
    return path


def _measured_peer(row: dict[str, Any], peer: dict[str, Any]) -> None:
    row["snfpy"] = {**peer, "extrapolated": True}
    for key in ("", "cpu_"):
        row["snfpy"][f"measured_t1_{key}s"] = (
            peer[f"{key}affinity_s"] + peer[f"{key}setup_s"] + peer[f"{key}iteration_s"])
        row["snfpy"][f"extrapolated_t20_{key}s"] = (
            peer[f"{key}affinity_s"] + peer[f"{key}setup_s"] + 20 * peer[f"{key}iteration_s"])
    if "scatlas_dense_t1" in row:
        row["ratio_t1_measured_dense"] = {
            "wall": row["snfpy"]["measured_t1_s"] / row["scatlas_dense_t1"]["seconds"],
            "cpu": row["snfpy"]["measured_t1_cpu_s"] / row["scatlas_dense_t1"]["cpu_seconds"]}


def _write(name: str, record: dict[str, Any]) -> Path:
    from bench.environment import capture

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_cpu.json"
    record = {"environment": capture("cpu"), **record}
    path.write_text(json.dumps(record, indent=2, default=float))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.snf", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("speed")
    s.add_argument("--sizes", default="1e4,5e4")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--repeats-large", type=int, default=1,
                   help="repeats of the default route above 1e4 cells")
    s.add_argument("--dense-max", type=float, default=1e4,
                   help="largest n also run on the dense route (forced past the budget)")
    s.add_argument("--dense-t20", action="store_true",
                   help="also time the dense route at t=20 (slow: O(t n^2 K))")
    s.add_argument("--snfpy-max", type=float, default=1e4,
                   help="largest n snfpy is run at (dense n x n float64 matrices)")
    s.add_argument("--tag", default="",
                   help="write snf_speed_<tag>_cpu.json (combine them with merge --tags)")
    mg = sub.add_parser("merge")
    mg.add_argument("--tags", required=True, help="comma-separated tags of speed runs")
    pe = sub.add_parser("peer", help="snfpy alone at one size (snf_speed_peer_cpu.json)")
    pe.add_argument("--n", type=float, default=1e4)
    pe.add_argument("--seed", type=int, default=0)
    w = sub.add_parser("worker")
    w.add_argument("--n", type=int, required=True)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--t", type=int, default=20)
    w.add_argument("--route", choices=("auto", "dense"), default="auto")
    args = p.parse_args(argv)
    try:
        if args.cmd == "worker":
            print(json.dumps(_scatlas_worker(args)))
            return 0
        if args.cmd == "merge":
            print(merge(args.tags.split(",")))
            return 0
        if args.cmd == "peer":
            n = int(args.n)
            print(_write("snf_speed_peer", {"n": n, "snfpy": _snfpy(n, args.seed, 1)}))
            return 0
        if args.cmd == "quality":
            if not DATA.is_dir():
                print(f"no data folder {DATA}", file=sys.stderr)
                return 2
            record = quality(args.seed)
            print(json.dumps(record, indent=2, default=float))
            print(_write("snf_quality", record))
            return 0
        if not SNFPY_PYTHON.exists():
            print(f"snfpy venv missing ({SNFPY_PYTHON}); see docs/snf.md", file=sys.stderr)
            return 2
        sizes = [int(float(x)) for x in args.sizes.split(",")]
        record = speed(sizes, args.seed, args.repeats, int(args.dense_max),
                       int(args.snfpy_max), args.dense_t20,
                       args.repeats_large)
        print(_write(f"snf_speed_{args.tag}" if args.tag else "snf_speed", record))
        return 0
    except Exception as err:  # a failed method fails the benchmark
        print(f"bench.snf {args.cmd} failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
