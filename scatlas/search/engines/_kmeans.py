"""Lloyd k-means for the coarse quantiser, one code path for NumPy and CuPy.

As faiss ``Clustering`` (Johnson et al. 2019; ``faiss/Clustering.cpp``): initial centroids are
``k`` distinct training points drawn at random (seeded), ``niter`` Lloyd iterations, each
assigning every point to its best centroid by blocked GEMM (largest inner product for ``kind
"ip"``, smallest squared distance for ``"l2"``) and moving each centroid to its points' mean
(one sparse one-hot (k, n) x (n, d) product); ``spherical`` renormalises centroids to unit length
(for cosine). An empty cluster takes over half of the largest one: both get the largest
centroid perturbed by +-1/1024 in alternating signs per dimension (faiss' ``split_clusters``,
with its EPS).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ... import backend
from ...exceptions import ScatlasInputError

_EPS = 1.0 / 1024.0
_ASSIGN_SCORES = 64 * 2**20  # scores per assignment block on the CPU (x8 on the GPU)


def assign(X: Any, C: Any, kind: str, *, Cnorm: Any = None) -> tuple[Any, Any]:
    """Best centroid of every row: (labels (n,) int64, keys (n,) float32; -ip or ||x-c||^2
    minus ||x||^2 for l2). Blocked over rows."""
    xp = backend.array_module(C)
    n, k = X.shape[0], C.shape[0]
    step = max(1, (_ASSIGN_SCORES * (8 if xp is not np else 1)) // max(k, 1))
    labels = xp.empty(n, dtype=np.int64)
    keys = xp.empty(n, dtype=np.float32)
    if kind == "l2" and Cnorm is None:
        Cnorm = (C * C).sum(axis=1)
    for s in range(0, n, step):
        S = xp.asarray(X[s : s + step], dtype=np.float32) @ C.T
        S = (Cnorm[None, :] - 2.0 * S) if kind == "l2" else -S
        lab = S.argmin(axis=1)
        labels[s : s + step] = lab
        keys[s : s + step] = xp.take_along_axis(S, lab[:, None], axis=1)[:, 0]
    return labels, keys


def kmeans(X: Any, k: int, *, kind: str = "l2", niter: int = 10, seed: int = 0,
           spherical: bool = False) -> Any:
    """(k, d) float32 centroids of the rows of ``X`` (NumPy or CuPy, same kind returned)."""
    xp = backend.array_module(X)
    spm = backend.sparse_module(X)
    X = xp.asarray(X, dtype=np.float32)
    n, d = X.shape
    if k > n:
        raise ScatlasInputError(f"k-means: {k} centroids from {n} points")
    rng = np.random.default_rng(seed)
    C = X[xp.asarray(np.sort(rng.choice(n, size=k, replace=False)))].copy()
    ones = xp.ones(n, dtype=np.float32)
    cols = xp.arange(n)
    for _ in range(niter):
        labels, _ = assign(X, C, kind)
        onehot = spm.coo_matrix((ones, (labels, cols)), shape=(k, n)).tocsr()
        sums = xp.asarray(onehot @ X)
        counts = backend.to_host(xp.bincount(labels, minlength=k)).astype(np.int64)
        nz = xp.asarray(counts > 0)
        C = xp.where(nz[:, None], sums / xp.asarray(np.maximum(counts, 1),
                                                     dtype=np.float32)[:, None], C)
        C = _split_empty(C, counts, rng)
        if spherical:
            nrm = xp.sqrt((C * C).sum(axis=1, keepdims=True))
            C = C / xp.where(nrm > 0, nrm, 1.0)
    return xp.ascontiguousarray(C, dtype=np.float32)


def _split_empty(C: Any, counts: np.ndarray, rng: np.random.Generator) -> Any:
    """Give every empty cluster half of a large one (chosen with probability ~ its size)."""
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return C
    xp = backend.array_module(C)
    sign = xp.asarray(np.where(np.arange(C.shape[1]) % 2 == 0, 1.0, -1.0), dtype=C.dtype)
    counts = counts.astype(np.float64).copy()
    for j in empty:
        big = int(rng.choice(counts.size, p=counts / counts.sum()))
        C[j] = C[big] * (1 + _EPS * sign)
        C[big] = C[big] * (1 - _EPS * sign)
        counts[j] = counts[big] / 2
        counts[big] -= counts[j]
    return C
