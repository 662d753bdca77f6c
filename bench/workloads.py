"""Benchmark data: log-normalised synthetic counts, cached on disk, and chunked exact Grams.

Generating 1e6 cells takes minutes, so every matrix built here is cached as an uncompressed
``.npz`` under ``bench/.cache/`` (or ``$SCATLAS_BENCH_CACHE``). The cache key includes a hash of
``scatlas/datasets.py`` and :data:`NORMALIZE_VERSION`, so a changed generator never serves stale
data (old files are simply left behind; delete the folder to reclaim space).

Normalisation is done here, not with ``scatlas.pp``: library size to 1e4 then ``log1p`` (Seurat's
LogNormalize / scanpy's ``normalize_total`` + ``log1p``) on the CSR data array, float32 result.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .environment import REPO_ROOT
from .io import atomic_write_with
from .runner import log

CACHE_ENV = "SCATLAS_BENCH_CACHE"
NORMALIZE_VERSION = "lognorm1e4-v1"
TARGET_SUM = 1e4
#: dense float64 row chunks for exact Gram matrices stay below this many bytes
CHUNK_BYTES = 256 * 2**20


def cache_dir() -> Path:
    """Where cached workloads live (``$SCATLAS_BENCH_CACHE`` or ``bench/.cache``)."""
    return Path(os.environ.get(CACHE_ENV) or Path(__file__).resolve().parent / ".cache")


def generator_fingerprint() -> str:
    """Short hash of the synthetic generator's source and of this module's normalisation."""
    source = REPO_ROOT / "scatlas" / "datasets.py"
    digest = hashlib.sha1(NORMALIZE_VERSION.encode())
    if source.is_file():
        digest.update(source.read_bytes())
    return digest.hexdigest()[:10]


def log_normalize(X: sp.spmatrix, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """``log1p(x / rowsum * target_sum)`` per cell on CSR data; float32 CSR (new matrix)."""
    X = sp.csr_matrix(X)
    totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    data = X.data.astype(np.float64) * np.repeat(scale, np.diff(X.indptr))
    out = sp.csr_matrix((np.log1p(data).astype(np.float32), X.indices.copy(), X.indptr.copy()),
                        shape=X.shape)
    out.sort_indices()
    return out


def cached_matrix(key: str, build: Callable[[], sp.spmatrix]) -> tuple[sp.csr_matrix, bool]:
    """Load ``<cache>/<key>.npz`` or build, save and return it; also says whether it was cached."""
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        return sp.csr_matrix(sp.load_npz(path)), True
    X = sp.csr_matrix(build())
    atomic_write_with(path, lambda fh: sp.save_npz(fh, X, compressed=False))
    return X, False


def cached_arrays(key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load ``<cache>/<key>.npz`` (named arrays) or build and save them."""
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    arrays = build()
    atomic_write_with(path, lambda fh: np.savez(fh, **arrays))
    return arrays


def synthetic_lognorm(n_cells: int, n_genes: int = 2000, seed: int = 0) -> tuple[sp.csr_matrix,
                                                                                   dict[str, Any]]:
    """Log-normalised ``scatlas.datasets.synthetic(n_cells, n_genes, seed=seed)`` (cached)."""
    key = f"synthetic_n{n_cells}_g{n_genes}_s{seed}_{generator_fingerprint()}"

    def build() -> sp.csr_matrix:
        from scatlas import datasets

        log(f"[workload] generating synthetic({n_cells:,}, {n_genes}, seed={seed}) ...")
        return log_normalize(datasets.synthetic(n_cells, n_genes, seed=seed).X)

    start = time.perf_counter()
    X, cached = cached_matrix(key, build)
    return X, {"cache_key": key, "cached": cached, "load_s": round(time.perf_counter() - start, 3)}


def synthetic_batch_pair(n_cells: int, n_genes: int = 2000, seed: int = 0) -> tuple[
        sp.csr_matrix, sp.csr_matrix, dict[str, Any]]:
    """Two batches of one synthetic atlas (``n_batches=2``), ``n_cells`` each, log-normalised.

    The atlas is generated large enough for both batches to have ``n_cells`` cells; the first
    ``n_cells`` of each batch are kept.
    """
    key = f"pair_n{n_cells}_g{n_genes}_s{seed}_{generator_fingerprint()}"

    def build() -> sp.csr_matrix:
        from scatlas import datasets

        probs = datasets.synthetic(1, n_genes, n_batches=2, seed=seed).uns["synthetic"][
            "batch_probs"]
        total = int(np.ceil(n_cells / float(np.min(probs)) * 1.1)) + 500
        while True:
            log(f"[workload] generating synthetic({total:,}, {n_genes}, n_batches=2) ...")
            adata = datasets.synthetic(total, n_genes, n_batches=2, seed=seed)
            codes = np.asarray(adata.obs["batch"].cat.codes)
            rows = [np.flatnonzero(codes == b)[:n_cells] for b in (0, 1)]
            if min(len(r) for r in rows) == n_cells:
                return log_normalize(adata.X[np.concatenate(rows)])
            total *= 2

    start = time.perf_counter()
    X, cached = cached_matrix(key, build)
    info = {"cache_key": key, "cached": cached, "load_s": round(time.perf_counter() - start, 3)}
    return X[:n_cells], X[n_cells:], info


def chunk_rows(n_cols: int, itemsize: int = 8, budget: int = CHUNK_BYTES) -> int:
    """Rows per dense chunk so that a chunk stays within ``budget`` bytes."""
    return max(1, budget // max(1, n_cols * itemsize))


def dense_row_chunks(X: Any, dtype: Any = np.float64) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, dense rows)`` over a sparse or dense matrix, in ``dtype``."""
    step = chunk_rows(X.shape[1], np.dtype(dtype).itemsize)
    for start in range(0, X.shape[0], step):
        block = X[start:start + step]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        yield start, block.astype(dtype, copy=False)


def gram64(X: Any) -> tuple[np.ndarray, np.ndarray]:
    """``X^T X`` and the column sums, accumulated in float64 over dense row chunks."""
    p = X.shape[1]
    G = np.zeros((p, p))
    sums = np.zeros(p)
    for _, block in dense_row_chunks(X):
        G += block.T @ block
        sums += block.sum(axis=0)
    return G, sums


def top_eigh(G: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues (descending, clipped at 0) and the top ``keep`` eigenvectors of ``G``."""
    w, V = np.linalg.eigh(G)
    order = np.argsort(w)[::-1]
    return np.clip(w[order], 0.0, None), V[:, order[:keep]]
