"""Dask PCA of a 2e5 x 2,000 zarr store on a 2-worker LocalCluster vs an exact float64 PCA and
the in-memory ``tl.pca`` (issue 20, "Done when" item 1).

    python -m bench.atlas_pca [--n-cells 200000] [--n-genes 2000] [--k 50]

Writes ``bench/results/atlas_pca_cpu.json``: wall seconds of each route, the largest relative
variance error and the smallest leading-subspace cosine against the float64 reference (a
two-pass chunked eigh: column means, then the centred Gram summed over float64 row chunks).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def exact_pca(X, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(variances (k,), components (p, k)) in float64 from the CSR ``X``."""
    n, p = X.shape
    mean = np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
    G = np.zeros((p, p))
    for lo in range(0, n, 8192):
        C = X[lo:lo + 8192].toarray().astype(np.float64) - mean
        G += C.T @ C
    w, V = np.linalg.eigh(G)
    return w[::-1][:k] / (n - 1), V[:, ::-1][:, :k]


def cosines(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    return np.abs(np.sum(A * B, 0)) / (np.linalg.norm(A, axis=0) * np.linalg.norm(B, axis=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cells", type=int, default=200_000)
    ap.add_argument("--n-genes", type=int, default=2000)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--chunk-rows", type=int, default=20_000)
    ap.add_argument("--out", default=str(RESULTS / "atlas_pca_cpu.json"))
    args = ap.parse_args()

    import anndata as ad
    import distributed

    import scatlas
    from scatlas import io as sio

    adata = scatlas.datasets.synthetic(args.n_cells, args.n_genes, progress=False)
    X = adata.X
    tmp = Path(tempfile.mkdtemp(prefix="atlas_pca_"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ad.AnnData(X).write_zarr(tmp / "counts.zarr")
    out: dict = {"n_cells": args.n_cells, "n_genes": args.n_genes, "k": args.k,
                 "density": X.nnz / np.prod(X.shape), "chunk_rows": args.chunk_rows}
    t = time.perf_counter()
    w, V = exact_pca(X, args.k)
    out["exact_float64_s"] = time.perf_counter() - t

    t = time.perf_counter()
    mem = ad.AnnData(X)
    scatlas.tl.pca(mem, args.k)
    out["in_memory_tl_pca_s"] = time.perf_counter() - t

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        lazy = sio.read_dask(tmp / "counts.zarr", chunk_rows=args.chunk_rows)
        t = time.perf_counter()
        scatlas.tl.pca(lazy, args.k)
        scores = lazy.obsm["X_pca"].compute()
        out["dask_tl_pca_s"] = time.perf_counter() - t
        out["dask_workers"] = 2
    var = lazy.uns["pca"]["variance"].astype(np.float64)
    out["dask_vs_exact_max_rel_variance_error"] = float(np.max(np.abs(var / w - 1)))
    out["dask_vs_exact_min_cosine"] = float(cosines(lazy.varm["PCs"], V).min())
    mvar = mem.uns["pca"]["variance"].astype(np.float64)
    out["in_memory_vs_exact_max_rel_variance_error"] = float(np.max(np.abs(mvar / w - 1)))
    out["dask_vs_in_memory_max_rel_variance_error"] = float(np.max(np.abs(var / mvar - 1)))
    out["dask_vs_in_memory_min_cosine"] = float(cosines(lazy.varm["PCs"], mem.varm["PCs"]).min())
    out["dask_vs_in_memory_max_score_diff_rel"] = float(
        np.abs(scores - mem.obsm["X_pca"]).max() / np.abs(mem.obsm["X_pca"]).max())
    out["passed"] = (out["dask_vs_exact_max_rel_variance_error"] <= 1e-5
                     and out["dask_vs_exact_min_cosine"] >= 0.9999)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
