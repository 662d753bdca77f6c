"""Benchmark ``integrate``: batch integration, ours (Seurat CCA, fastMNN) vs harmonypy, Scanorama.

Workloads (``--param data=...``):

* ``synthetic`` (default): ``scatlas.datasets.synthetic(n, 2000, n_batches=3, seed)`` raw
  counts (8 cell types, multiplicative and additive batch effects), log-normalised (1e4,
  log1p; :func:`bench.workloads.log_normalize`), all 2,000 genes.
* ``cellbench``: the CellBench lung cell lines (1,021 cells, 5 batches, 3-5 cell lines; needs
  ``../shared/data``; the size is ignored), log-normalised, 2,000 batch-aware HVGs
  (``scatlas.pp``).

Methods (group ``integrate``), each returning a cell embedding:

* ``scatlas.mnn`` - :func:`scatlas.kernels.fastmnn.fastmnn` (k 20, d 50), the corrected PCs;
* ``scatlas.cca`` - :func:`scatlas.kernels.seurat.seurat_integrate` (Seurat v3 defaults),
  then ``ScaleData`` + 30 PCs of the corrected expression (Seurat's downstream workflow);
* ``uncorrected`` - 30 PCs of the gene-scaled data (the input of harmonypy, and the
  "before" row of the metrics);
* ``scatlas.harmony`` - :func:`scatlas.tl._harmony.run_harmony` (what
  ``tl.integrate(method="harmony")`` runs) on those 30 PCs, in this process;
* ``harmonypy`` - ``harmonypy.run_harmony`` on those 30 PCs (harmonypy >= 2.0, a C++ build
  that needs only NumPy; 0.2.x needed PyTorch; defaults theta 2, sigma 0.1,
  nclust min(N/30, 100));
* ``scanorama`` - ``scanorama.integrate`` on the log-normalised matrices per batch (defaults:
  dimred 100, knn 20, sigma 15, approx Annoy).

mnnpy (the issue's third peer, "where it installs") is not among them. Its last release is
0.1.9.5 (2019):
- its shipped C file does not compile on Python 3.11, because it includes ``longintrepr.h``;
- re-cythonized from its ``.pyx`` it builds, but importing it fails: its numba kernels call
  ``np.sum(..., axis=...)``, which numba 0.68 rejects in nopython mode.

This was tried on 2026-11-21 in ``bench/.peers/integrate``. batchelor's fastMNN algorithm is
covered by ``scatlas.mnn``, which is tested against a step-by-step reference.

The peers run in their own virtual environment, ``bench/.peers/integrate`` (harmonypy >= 2.0
and scanorama; created by :func:`install_peers` / ``python -m bench.integrate --install``, or
point ``$SCATLAS_PEER_PYTHON_INTEGRATE`` at an interpreter that has them), one subprocess per
call: the harness time includes the interpreter start and imports (a few seconds), the
``solver s`` column is the time of the library call alone, measured inside that process. A
method whose package is missing is recorded as skipped with the reason.

Accuracy columns (scatlas.metrics, exact kNN, on a fixed random subsample of at most
``metric_cells`` cells): ``ilisi`` (batch mixing, scaled to [0, 1]), ``label transfer``
(cross-batch 15-NN majority vote of the cell type), ``ASW label`` (silhouette of the cell
types, rescaled to [0, 1]); higher is better for all three.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from . import workloads
from .environment import REPO_ROOT, get_backend
from .runner import log
from .spec import Benchmark, Method, Metric, Workload

DEFAULT_PARAMS: dict[str, Any] = {
    "data": "synthetic",  # or "cellbench"
    "n_genes": 2000,
    "n_batches": 3,
    "seed": 0,
    "n_pcs": 30,
    "metric_cells": 20_000,
    "cca_max_size": 200_000,
    "peer_timeout_s": 3600,
}

PEERS_DIR = Path(__file__).resolve().parent / ".peers"
PEER_ENV = "SCATLAS_PEER_PYTHON_INTEGRATE"
PEER_PACKAGES = ("harmonypy>=2.0", "scanorama")
CELLBENCH = REPO_ROOT.parent / "shared" / "data" / "cellbench_lung_celllines_5batch.h5ad"

METRICS = {
    "ilisi": Metric("iLISI", ".3f", higher_is_better=True),
    "label_transfer": Metric("label transfer", ".3f", higher_is_better=True),
    "asw_label": Metric("ASW label", ".3f", higher_is_better=True),
    "solver_s": Metric("solver s", ".3g"),
}

# The peer side: reads an .npz, runs one method, writes the embedding, prints a JSON line.
PEER_SCRIPT = r"""
import json, sys, time
import numpy as np
import scipy.sparse as sp
method, inp, out = sys.argv[1:4]
z = np.load(inp, allow_pickle=False)
batch = z["batch"].astype(str)
if method == "harmonypy":
    import pandas as pd, harmonypy
    t = time.perf_counter()
    ho = harmonypy.run_harmony(z["pcs"], pd.DataFrame({"batch": batch}), "batch",
                               random_state=0)
    E = np.asarray(ho.Z_corr)
    E = E.T if E.shape[0] != batch.size else E  # (d, n) in older releases
    version = getattr(harmonypy, "__version__", "?")
elif method == "scanorama":
    import scanorama
    X = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
    names = list(dict.fromkeys(batch))
    rows = [np.flatnonzero(batch == b) for b in names]
    genes = [list(z["genes"].astype(str))] * len(rows)
    t = time.perf_counter()
    emb, _ = scanorama.integrate([X[r] for r in rows], genes, verbose=0, seed=0)
    elapsed = time.perf_counter() - t
    E = np.empty((X.shape[0], emb[0].shape[1]))
    for r, e in zip(rows, emb):
        E[r] = e
    version = getattr(scanorama, "__version__", "?")
else:
    raise SystemExit(f"unknown method {method}")
elapsed = time.perf_counter() - t if method == "harmonypy" else elapsed
np.save(out, E.astype(np.float32))
print(json.dumps({"solver_s": elapsed, "version": str(version)}))
"""


# --- data ----------------------------------------------------------------------------------


def _synthetic(size: int, params: Mapping[str, Any]) -> tuple[sp.csr_matrix, dict[str, Any]]:
    n_genes, n_batches, seed = params["n_genes"], params["n_batches"], params["seed"]
    key = f"integrate_n{size}_g{n_genes}_b{n_batches}_s{seed}_{workloads.generator_fingerprint()}"

    def build() -> dict[str, np.ndarray]:
        from scatlas import datasets

        log(f"[workload] synthetic({size:,}, {n_genes}, n_batches={n_batches}) ...")
        adata = datasets.synthetic(size, n_genes, n_batches=n_batches, seed=seed)
        X = workloads.log_normalize(adata.X)
        return {"data": X.data, "indices": X.indices, "indptr": X.indptr,
                "shape": np.asarray(X.shape), "batch": adata.obs["batch"].astype(str).to_numpy(),
                "label": adata.obs["cell_type"].astype(str).to_numpy()}

    arrays = workloads.cached_arrays(key, build)
    X = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]),
                      shape=tuple(arrays["shape"]))
    return X, {"batch": arrays["batch"], "label": arrays["label"], "cache_key": key,
               "genes": np.array([f"g{j}" for j in range(X.shape[1])])}


def _cellbench() -> tuple[sp.csr_matrix, dict[str, Any]]:
    import anndata as ad

    from scatlas import pp

    if not CELLBENCH.is_file():
        raise FileNotFoundError(f"CellBench data not found at {CELLBENCH}")
    adata = ad.read_h5ad(CELLBENCH)
    pp.normalize_log1p(adata)
    pp.highly_variable_genes(adata, 2000, batch_key="batch")
    hvg = np.flatnonzero(adata.var["highly_variable"].to_numpy())
    X = sp.csr_matrix(adata.X[:, hvg], dtype=np.float32)
    return X, {"batch": adata.obs["batch"].astype(str).to_numpy(),
               "label": adata.obs["cell_line"].astype(str).to_numpy(),
               "genes": adata.var_names[hvg].to_numpy().astype(str)}


def build(size: int, device: str, params: Mapping[str, Any]) -> Workload:
    """Log-normalised matrix (host and device), labels, the uncorrected PCs, metric cells."""
    from scatlas.kernels import pca
    from scatlas.kernels.anchors import scale_data

    if params["data"] == "cellbench":
        X, meta = _cellbench()
    elif params["data"] == "synthetic":
        X, meta = _synthetic(size, params)
    else:
        raise ValueError(f"data must be 'synthetic' or 'cellbench', got {params['data']!r}")
    start = time.perf_counter()
    pcs = np.asarray(pca(scale_data(X), params["n_pcs"]).scores)
    pca_s = time.perf_counter() - start
    n = X.shape[0]
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(n, min(n, int(params["metric_cells"])), replace=False))
    be = get_backend()
    names, counts = np.unique(meta["batch"], return_counts=True)
    info = {"shape": list(X.shape), "nnz": int(X.nnz), "uncorrected_pca_s": round(pca_s, 3),
            "batches": {str(b): int(c) for b, c in zip(names, counts, strict=True)},
            "n_labels": int(np.unique(meta["label"]).size), "metric_cells": int(cells.size),
            "summary": (f"{params['data']}: {n:,} cells x {X.shape[1]} genes, {names.size} "
                        f"batches, {np.unique(meta['label']).size} labels; metrics on "
                        f"{cells.size:,} cells")}
    tmp = tempfile.TemporaryDirectory(prefix="scatlas-integrate-bench-")
    w = Workload(host=X, data=be.to_device(X, device), info=info,
                 extra={**meta, "pcs": pcs, "cells": cells, "params": dict(params),
                        "tmp": tmp, "device": device})
    weakref.finalize(w, tmp.cleanup)
    return w


# --- methods -------------------------------------------------------------------------------


def _timed(fn):
    def call(w: Workload) -> dict[str, Any]:
        start = time.perf_counter()
        E = fn(w)
        get_backend().synchronize()
        return {"embedding": E, "solver_s": time.perf_counter() - start}
    return call


def _mnn(w: Workload) -> Any:
    from scatlas.kernels.fastmnn import fastmnn

    return fastmnn(w.data, w.extra["batch"], progress=False).corrected


def _cca(w: Workload) -> Any:
    from scatlas.kernels import pca
    from scatlas.kernels.anchors import SmallBatchWarning, scale_data
    from scatlas.kernels.seurat import seurat_integrate

    with warnings.catch_warnings():  # small batches: Seurat skips the filter, with a warning
        warnings.filterwarnings("ignore", category=SmallBatchWarning)
        res = seurat_integrate(w.data, w.extra["batch"], progress=False)
    return pca(scale_data(res.corrected), w.extra["params"]["n_pcs"], center=False).scores


def _harmony(w: Workload) -> Any:
    from scatlas.tl._harmony import run_harmony

    return run_harmony(w.extra["pcs"], w.extra["batch"])[0]


def peer_python() -> Path | None:
    """``$SCATLAS_PEER_PYTHON_INTEGRATE``, else ``bench/.peers/integrate/bin/python``."""
    env = os.environ.get(PEER_ENV, "").strip()
    path = Path(env) if env else PEERS_DIR / "integrate" / "bin" / "python"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _peer_has(python: Path, module: str) -> bool:
    probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True,
                           timeout=300)
    return probe.returncode == 0


def _peer_input(w: Workload, method: str) -> Path:
    path = Path(w.extra["tmp"].name) / f"{method}_in.npz"
    if not path.is_file():
        X = w.host
        arrays: dict[str, Any] = {"batch": w.extra["batch"].astype(str)}
        if method == "harmonypy":
            arrays["pcs"] = w.extra["pcs"].astype(np.float64)
        else:
            arrays.update(data=X.data, indices=X.indices, indptr=X.indptr,
                          shape=np.asarray(X.shape), genes=w.extra["genes"].astype(str))
        np.savez(path, **arrays)
    return path


def _peer(method: str):
    def call(w: Workload) -> dict[str, Any]:
        python = peer_python()
        out = Path(w.extra["tmp"].name) / f"{method}_out.npy"
        proc = subprocess.run(
            [str(python), "-W", "ignore", "-c", PEER_SCRIPT, method, str(_peer_input(w, method)),
             str(out)], capture_output=True, text=True,
            timeout=w.extra["params"]["peer_timeout_s"])
        if proc.returncode != 0:
            raise RuntimeError(f"{method} failed: {proc.stderr.strip()[-2000:]}")
        reply = json.loads(proc.stdout.strip().splitlines()[-1])
        return {"embedding": np.load(out), "solver_s": reply["solver_s"],
                "version": reply["version"]}
    return call


def _peer_method(method: str, description: str) -> Method:
    python = peer_python()
    module = "harmonypy" if method == "harmonypy" else "scanorama"
    if python is None:
        where = os.environ.get(PEER_ENV) or PEERS_DIR / "integrate" / "bin" / "python"
        reason = (f"peer python not found at {where} (python -m bench.integrate --install, or "
                  f"set {PEER_ENV})")
    elif not _peer_has(python, module):
        reason = f"{module} does not import in {python}"
    else:
        return Method(method, _peer(method), "baseline", "integrate", description)
    return Method(method, _peer(method), "baseline", "integrate", description, max_size=0,
                  skip_reason=reason)


def methods(params: Mapping[str, Any]) -> list[Method]:
    """fastMNN, Seurat CCA, harmony, the uncorrected PCA, harmonypy and Scanorama."""
    return [
        Method("scatlas.mnn", _timed(_mnn), "ours", "integrate",
               "kernels.fastmnn(k=20, d=50): corrected PCs", on_device=True),
        Method("scatlas.cca", _timed(_cca), "ours", "integrate",
               "kernels.seurat_integrate (Seurat v3 defaults) + 30 PCs of the corrected data",
               on_device=True, max_size=params["cca_max_size"],
               skip_reason="Seurat CCA above cca_max_size (--param cca_max_size)"),
        Method("uncorrected", lambda w: {"embedding": w.extra["pcs"], "solver_s": 0.0},
               "baseline", "integrate", "30 PCs of the gene-scaled data (no integration)"),
        Method("scatlas.harmony", _timed(_harmony), "ours", "integrate",
               "tl._harmony.run_harmony (harmonypy / rapids-singlecell) on the 30 PCs"),
        _peer_method("harmonypy", "harmonypy >= 2.0 run_harmony on the 30 PCs, own venv"),
        _peer_method("scanorama", "scanorama.integrate (dimred 100), own venv"),
    ]


def accuracy(w: Workload, method: Method, output: Any) -> dict[str, float]:
    """iLISI, cross-batch label transfer and label ASW on the metric cells."""
    from scatlas import metrics

    cells = w.extra["cells"]
    E = np.asarray(get_backend().to_host(output["embedding"]), dtype=np.float32)[cells]
    batch, label = w.extra["batch"][cells], w.extra["label"][cells]
    return {"ilisi": metrics.ilisi(E, batch),
            "label_transfer": metrics.knn_label_transfer(E, label, batch),
            "asw_label": metrics.silhouette_label(E, label),
            "solver_s": float(output["solver_s"])}


def install_peers(python: str = "python3") -> Path:
    """Create ``bench/.peers/integrate`` with harmonypy >= 2.0 and scanorama (from PyPI)."""
    venv = PEERS_DIR / "integrate"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *PEER_PACKAGES], check=True)
    return venv


BENCHMARK = Benchmark(
    name="integrate",
    description=("Batch integration: scatlas fastMNN and Seurat CCA vs harmonypy and Scanorama "
                 "(own venv), synthetic counts (3 batches x 2,000 genes) or CellBench; time "
                 "and iLISI / cross-batch label transfer / label ASW of each embedding."),
    build=build,
    methods=methods,
    accuracy=accuracy,
    metrics=METRICS,
    default_sizes=(5_000, 20_000),
    default_params=DEFAULT_PARAMS,
    size_label="cells",
)


if __name__ == "__main__":  # pragma: no cover
    if "--install" in sys.argv:
        print(f"peer venv: {install_peers()}")
    else:
        print(f"run with: {sys.executable} -m bench run integrate --sizes 5e3 "
              f"[--param data=cellbench]; peers: {peer_python()}", file=sys.stderr)
