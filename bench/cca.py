"""Benchmark ``cca``: Seurat-style CCA (k = 20) without vs with the dense n1 x n2 matrix.

Workload: one ``scatlas.datasets.synthetic(..., n_batches=2)`` atlas split into its two batches,
``n`` cells each x 2,000 shared genes, log-normalised (1e4, log1p), CSR float32.

Methods:
    ``scatlas.cca`` (``kernels.cca(X1, X2, k=20)`` at its defaults) and
    ``scatlas.cca[randomized]`` (``method='randomized'``);
    ``explicit.svds`` / ``explicit.randomized_svd``: Seurat's ``RunCCA`` written out (per-cell
    standardisation, dense float64 ``M = X1s X2s^T`` of n1 x n2, truncated SVD of M by ARPACK
    (``scipy.sparse.linalg.svds``, tol 1e-5 like irlba's default) or
    ``sklearn.utils.extmath.randomized_svd``, the sign rule, then ``L2Dim``). Skipped when M
    would exceed ``explicit_max_gib``.

Accuracy against an exact float64 reference computed without M (the Gram route of the
reference notes, section 1.3): column-wise |cosine| between each method's canonical vectors and
the reference's (rows of [Z1; Z2], after Seurat's sign rule and L2 row normalisation, as the
methods return them), the smallest principal-angle cosine between the k-dimensional spans, and
the mean per-cell cosine (the sign-sensitive agreement downstream anchor finding sees). The
explicit methods compute the same maths by another route, so their scores show the reference
and the explicit implementation agree; ours vs explicit is then read off the same columns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import workloads
from .accuracy import column_cosines, row_cosines, subspace_min_cos
from .environment import get_backend
from .spec import Benchmark, Method, Metric, Workload

DEFAULT_PARAMS: dict[str, Any] = {
    "k": 20,
    "n_genes": 2000,
    "seed": 0,
    "explicit_max_gib": 8.0,  # the dense float64 n1 x n2 matrix
    "top_signal": 10,  # column agreement also reported over the leading canonical vectors
}

#: ARPACK tolerance of the explicit baseline: irlba's default in Seurat's RunCCA (reference 3)
SVDS_TOL = 1e-5

METRICS = {
    "col_abs_cos_min_top10": Metric("min abs cos, cols 1-10", ".4f", higher_is_better=True),
    "col_abs_cos_min": Metric("min abs cos, all cols", ".4f", higher_is_better=True),
    "col_abs_cos_mean": Metric("mean abs cos, cols", ".4f", higher_is_better=True),
    "subspace_min_cos": Metric("min cos subspace", ".4f", higher_is_better=True),
    "row_cos_mean": Metric("mean cell cos", ".4f", higher_is_better=True),
}


# --- the explicit (Seurat) implementation ------------------------------------------------------

def standardize_rows(X: Any) -> np.ndarray:
    """Dense float64 copy of X with each cell z-scored across genes (sd with n - 1)."""
    A = X.toarray() if hasattr(X, "toarray") else np.array(X)
    A = A.astype(np.float64, copy=False)
    A -= A.mean(axis=1, keepdims=True)
    sd = A.std(axis=1, ddof=1, keepdims=True)
    A /= np.where(sd > 0, sd, 1.0)
    return A


def seurat_finish(Z1: np.ndarray, Z2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seurat's sign rule (first cell of dataset 1 non-negative) then L2 rows (``L2Dim``)."""
    signs = np.where(Z1[0] < 0, -1.0, 1.0)
    Z1, Z2 = Z1 * signs, Z2 * signs

    def l2(Z: np.ndarray) -> np.ndarray:
        return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-30)

    return l2(Z1), l2(Z2)


def explicit_cca(X1: Any, X2: Any, k: int, solver: str = "svds") -> tuple[np.ndarray, np.ndarray]:
    """Seurat's ``RunCCA`` with the dense cross-product ``M = X1s X2s^T`` (n1 x n2, float64)."""
    M = standardize_rows(X1) @ standardize_rows(X2).T
    if solver == "svds":
        from scipy.sparse.linalg import svds

        U, D, Vt = svds(M, k=k, tol=SVDS_TOL, random_state=0)
        order = np.argsort(D)[::-1]
        U, Vt = U[:, order], Vt[order]
    elif solver == "randomized_svd":
        from sklearn.utils.extmath import randomized_svd

        U, _, Vt = randomized_svd(M, k, random_state=0)
    else:
        raise ValueError(f"solver must be 'svds' or 'randomized_svd', got {solver!r}")
    return seurat_finish(U, Vt.T)


# --- the exact reference without M -------------------------------------------------------------

def _standardized_gram(X: Any) -> np.ndarray:
    G = np.zeros((X.shape[1], X.shape[1]))
    for _, block in workloads.dense_row_chunks(X):
        A = standardize_rows(block)
        G += A.T @ A
    return G


def _whitened_factor(X: Any, rel_tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """``W`` and ``S`` with ``X_s = U S W^T`` (X_s the standardised X), tiny S dropped.

    Thin SVD of the dense standardised matrix when it has fewer rows than columns, else eigh of
    its p x p Gram matrix accumulated over row chunks.
    """
    n, p = X.shape
    if n <= p:
        _, S, Wt = np.linalg.svd(standardize_rows(X), full_matrices=False)
        W, w = Wt.T, S**2
    else:
        w, W = np.linalg.eigh(_standardized_gram(X))
    w = np.clip(w, 0.0, None)
    keep = w > rel_tol * w.max()
    return W[:, keep], np.sqrt(w[keep])


def _left_vectors(X: Any, W: np.ndarray, S: np.ndarray, P: np.ndarray) -> np.ndarray:
    """``X_s W S^-1 P`` computed over row chunks."""
    B = W @ (P / S[:, None])
    out = np.empty((X.shape[0], P.shape[1]))
    for start, block in workloads.dense_row_chunks(X):
        out[start:start + block.shape[0]] = standardize_rows(block) @ B
    return out


def reference_cca(X1: Any, X2: Any, k: int) -> dict[str, np.ndarray]:
    """Exact float64 CCA via the p x p Gram matrices: Z1, Z2 (Seurat-finished) and D."""
    W1, S1 = _whitened_factor(X1)
    W2, S2 = _whitened_factor(X2)
    P, D, Qt = np.linalg.svd((S1[:, None] * (W1.T @ W2)) * S2[None, :])
    Z1 = _left_vectors(X1, W1, S1, P[:, :k])
    Z2 = _left_vectors(X2, W2, S2, Qt[:k].T)
    Z1, Z2 = seurat_finish(Z1, Z2)
    return {"Z1": Z1, "Z2": Z2, "D": D[: k + 1]}


# --- benchmark pieces --------------------------------------------------------------------------

def build(size: int, device: str, params: Mapping[str, Any]) -> Workload:
    """Two batches of ``size`` cells each, the device copies and the exact reference."""
    X1, X2, info = workloads.synthetic_batch_pair(size, params["n_genes"], params["seed"])
    k = params["k"]
    start = time.perf_counter()
    ref = reference_cca(X1, X2, k)
    info["reference_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    backend = get_backend()
    data = (backend.to_device(X1, device), backend.to_device(X2, device))
    backend.synchronize()
    info["to_device_s"] = round(time.perf_counter() - start, 3)
    D = ref["D"]
    gap = float(D[k - 1] / D[k]) if len(D) > k else None
    info.update(
        shapes=[list(X1.shape), list(X2.shape)], nnz=[int(X1.nnz), int(X2.nnz)],
        d_top=[float(d) for d in D[:k]], gap_k=gap,
        explicit_gib=explicit_gib(size),
        summary=(f"2 × {size:,}×{X1.shape[1]} CSR float32; D{k}/D{k + 1} = {gap:.3f}, "
                 f"D1/D{k} = {D[0] / D[k - 1]:.2f}; dense M = {explicit_gib(size):.2f} GiB"),
    )
    return Workload(host=(X1, X2), data=data, info=info,
                    extra={**ref, "top_signal": params["top_signal"]})


def explicit_gib(n: int) -> float:
    """GiB of the dense float64 n x n cross-product."""
    return n * n * 8 / 2**30


def _ours(k: int, **kw: Any):
    def call(w: Workload):
        from scatlas import kernels

        return kernels.cca(w.data[0], w.data[1], k=k, **kw)
    return call


def _explicit(k: int, solver: str):
    def call(w: Workload):
        return explicit_cca(w.host[0], w.host[1], k, solver)
    return call


def methods(params: Mapping[str, Any]) -> list[Method]:
    """Ours (defaults, randomized route) and the explicit Seurat-style implementations."""
    k, gib = params["k"], float(params["explicit_max_gib"])
    limit = int(math.isqrt(int(gib * 2**30 / 8)))
    why = (f"dense float64 n1 x n2 cross-product would exceed {gib:g} GiB "
           "(raise --param explicit_max_gib)")
    return [
        Method("scatlas.cca", _ours(k), "ours", "cca", f"kernels.cca(X1, X2, k={k})",
               on_device=True),
        Method("scatlas.cca[randomized]", _ours(k, method="randomized"), "ours", "cca",
               "kernels.cca(..., method='randomized')", on_device=True),
        Method("explicit.svds", _explicit(k, "svds"), "baseline", "cca",
               "standardise, dense M = X1s X2s^T (float64), scipy svds (ARPACK), Seurat signs, "
               "L2Dim", max_size=limit, skip_reason=why),
        Method("explicit.randomized_svd", _explicit(k, "randomized_svd"), "baseline", "cca",
               "standardise, dense M, sklearn randomized_svd (defaults), Seurat signs, L2Dim",
               max_size=limit, skip_reason=why),
    ]


def accuracy(w: Workload, method: Method, output: Any) -> dict[str, float]:
    """Agreement of (Z1, Z2) with the exact reference (see the module docstring)."""
    backend = get_backend()
    Z = np.vstack([backend.to_host(output[0]), backend.to_host(output[1])]).astype(np.float64)
    R = np.vstack([w.extra["Z1"], w.extra["Z2"]])
    cols = np.abs(column_cosines(Z, R))
    top = min(int(w.extra["top_signal"]), cols.size)
    return {
        f"col_abs_cos_min_top{top}": float(cols[:top].min()),
        "col_abs_cos_min": float(cols.min()),
        "col_abs_cos_mean": float(cols.mean()),
        "subspace_min_cos": subspace_min_cos(Z, R),
        "row_cos_mean": float(row_cosines(Z, R).mean()),
    }


BENCHMARK = Benchmark(
    name="cca",
    description=("Seurat-style CCA, k=20, between two batches of n cells x 2,000 genes "
                 "(log-normalised synthetic counts). Ours never forms the n1 x n2 matrix; the "
                 "explicit baselines do (Seurat's RunCCA). Accuracy vs an exact float64 "
                 "reference."),
    build=build,
    methods=methods,
    accuracy=accuracy,
    metrics=METRICS,
    default_sizes=(1_000, 5_000, 20_000),
    default_params=DEFAULT_PARAMS,
    size_label="cells per dataset",
)
