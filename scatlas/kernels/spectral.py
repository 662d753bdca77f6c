"""Spectral clustering of an affinity network with the eigengap estimate of the cluster count
(as snfpy's ``get_n_clusters`` and ``spectral_clustering``; von Luxburg 2007, Ng, Jordan & Weiss
2002): the clustering step of :func:`scatlas.kernels.snf`. Split from :mod:`.snf` (issue 18)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import backend
from .._validate import ScatlasInputError, check_positive_int
from .snf import _EPS


@dataclass
class SpectralClusters:
    """Result of :func:`spectral_clusters`.

    ``labels``: (n,) int64 cluster of each cell, 0..n_clusters-1 (caller's array kind);
    ``n_clusters``: the number used; ``eigengap_best``: the two best counts of the eigengap
    estimate within ``n_range`` (snfpy's ``get_n_clusters``), best first; ``eigenvalues``: the
    smallest eigenvalues of the normalised Laplacian, ascending (host float64).
    """

    labels: Any
    n_clusters: int
    eigengap_best: tuple[int, ...]
    eigenvalues: np.ndarray


def _normalised_adjacency(F: Any) -> Any:
    """``D^-1/2 G D^-1/2`` with ``G = (F + F^T) / 2`` and a zero diagonal, on the host
    (float64, dense or CSR: the eigen-solve runs there; the n x c result is small)."""
    import scipy.sparse as sp

    F = backend.to_host(F)
    if sp.issparse(F):
        G = ((F + F.T) * 0.5).tocsr().astype(np.float64)
        G.setdiag(0)
        G.eliminate_zeros()
        deg = np.asarray(G.sum(axis=1)).ravel()
    else:
        G = (np.asarray(F, dtype=np.float64) + np.asarray(F, dtype=np.float64).T) * 0.5
        np.fill_diagonal(G, 0)
        deg = G.sum(axis=1)
    deg[np.isclose(deg, 0)] += _EPS
    d = 1 / np.sqrt(deg)
    if sp.issparse(G):
        return sp.diags(d) @ G @ sp.diags(d)
    G *= d[:, None]
    G *= d[None, :]
    return G


def _top_eigenpairs(A: Any, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenpairs of the symmetric host matrix ``A``, descending."""
    import scipy.linalg
    import scipy.sparse.linalg as spla

    n = A.shape[0]
    if n <= 2000 and not hasattr(A, "tocsr"):
        with backend.serial_blas():
            vals, vecs = scipy.linalg.eigh(A, subset_by_index=[n - k, n - 1], driver="evr")
    else:
        v0 = np.random.default_rng(seed).uniform(0.5, 1.5, n)
        vals, vecs = spla.eigsh(A, k=k, which="LA", v0=v0, tol=1e-10)
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order]


def estimate_n_clusters(eigenvalues: np.ndarray, n_range: Sequence[int]) -> tuple[int, ...]:
    """snfpy's eigengap rule on ascending Laplacian eigenvalues ``l``: the counts c of
    ``n_range`` ranked by ``|l_c - l_{c-1}| (1 - l_{c-1}) / (1 - l_c)``, best two first."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    gap = np.abs(np.diff(lam)) * (1 - lam[:-1]) / (1 - lam[1:])
    cand = np.asarray([c for c in n_range if c > 1], dtype=np.int64)
    order = np.argsort(gap[cand - 1], kind="stable")[::-1]
    return tuple(int(c) for c in cand[order[:2]])


def spectral_clusters(
    F: Any,
    n_clusters: int | None = None,
    *,
    n_range: Sequence[int] = range(2, 11),
    seed: int = 0,
) -> SpectralClusters:
    """Spectral clustering of a fused network, the count from the eigengap when not given.

    Parameters
    ----------
    F
        (n, n) affinity (dense or sparse, any device), e.g. :func:`snf`'s result.
    n_clusters
        Clusters to find; ``None``: the eigengap estimate's best count within ``n_range``.
    n_range
        Candidate counts for the estimate (snfpy's default is ``range(2, 6)``; ours reaches 10).
    seed
        Seed of the eigen-solver's start vector and of k-means.

    Returns
    -------
    :class:`SpectralClusters`. Algorithm: snfpy ``get_n_clusters`` for the estimate; Ng, Jordan
    & Weiss (2001) for the clustering (top eigenvectors of the normalised adjacency, rows
    normalised, k-means with 10 starts, scikit-learn). The eigen-solve runs on the host (dense
    ``eigh`` up to n = 2,000, else ARPACK ``eigsh``).
    """
    n = F.shape[0]
    n_range = [int(c) for c in n_range]
    if not n_range or min(n_range) < 2 or max(n_range) >= n:
        raise ScatlasInputError(
            f"n_range must hold counts between 2 and n - 1 = {n - 1}, got {n_range}",
            param="n_range")
    if n_clusters is not None:
        n_clusters = check_positive_int(n_clusters, "n_clusters", upper=n - 1,
                                        what="the number of cells - 1")
    A = _normalised_adjacency(F)
    k = min(n - 1, max(max(n_range), n_clusters or 0) + 1)
    vals, vecs = _top_eigenpairs(A, k, seed)
    lam = 1 - vals
    best = estimate_n_clusters(lam, n_range)
    c = n_clusters or best[0]
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    emb = vecs[:, :c]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norms > 0, norms, 1)
    with threadpool_limits(limits=1):  # n x c is small: threads only wait on a busy machine
        labels = KMeans(n_clusters=c, n_init=10, random_state=seed).fit_predict(emb)
    xp = backend.array_module(F)
    return SpectralClusters(labels=xp.asarray(labels.astype(np.int64)), n_clusters=int(c),
                            eigengap_best=best, eigenvalues=lam)
