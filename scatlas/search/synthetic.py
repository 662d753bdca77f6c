"""Clustered, L2-normalised test embeddings that look like cell-encoder output (tests, benchmarks).

:func:`clustered_embeddings` draws a mixture of anisotropic Gaussian clusters in ``d``
dimensions and normalises every row to unit length, the shape of SCimilarity-style 128-d cell
embeddings (cells of one type form a tight, elongated cloud on the sphere; types differ in size).

Generator (all from one seeded ``numpy.random.Generator``, so a given ``(seed, n_clusters, d,
spread)`` always yields the same clusters whatever ``n`` or the chunking):

1. ``n_clusters`` centres, uniform on the unit sphere;
2. per cluster a random orthonormal-ish basis scaled anisotropically: ``A_c = G_c * s_c`` with
   ``G_c`` (d, d) standard normal / sqrt(d) and per-axis scales ``s_c`` log-uniform over one
   decade, rescaled so that ``||s_c|| = spread`` (the expected noise norm; a few directions carry
   most of the cluster's spread);
3. cluster sizes from a Dirichlet(1) draw (some large, some rare types), so cells come from
   cluster ``c`` with probability ``p_c``;
4. cell = normalise(centre_c + z @ A_c), ``z`` standard normal (d,).

Rows are produced chunk by chunk (:func:`iter_clustered`), each chunk from its own seeded
stream, so ``n`` = 10 million can be written straight into a memory-mapped file.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["clustered_embeddings", "iter_clustered"]


def _mixture(n_clusters: int, d: int, spread: float, seed: int):
    rng = np.random.default_rng([seed, 0])
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = rng.standard_normal((n_clusters, d, d)).astype(np.float32) / np.sqrt(d)
    scales = 10.0 ** rng.uniform(-1.0, 0.0, size=(n_clusters, 1, d))
    scales *= spread / np.sqrt((scales**2).sum(axis=2, keepdims=True))
    bases *= scales.astype(np.float32)
    probs = rng.dirichlet(np.ones(n_clusters))
    return centres, bases, probs


def iter_clustered(n: int, d: int = 128, *, n_clusters: int = 300, spread: float = 0.5,
                   seed: int = 0, chunk_size: int = 100_000,
                   labels: bool = False) -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Yield ``(chunk, d)`` float32 unit rows (and their cluster labels with ``labels=True``)."""
    centres, bases, probs = _mixture(n_clusters, d, spread, seed)
    for i, start in enumerate(range(0, n, chunk_size)):
        m = min(chunk_size, n - start)
        rng = np.random.default_rng([seed, 1, i])
        lab = rng.choice(n_clusters, size=m, p=probs)
        z = rng.standard_normal((m, d)).astype(np.float32)
        X = centres[lab].copy()
        order = np.argsort(lab, kind="stable")
        sorted_lab = lab[order]
        bounds = np.flatnonzero(np.diff(sorted_lab)) + 1
        for rows in np.split(order, bounds):
            if rows.size:
                c = lab[rows[0]]
                X[rows] += z[rows] @ bases[c]
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        yield (X, lab) if labels else X


def clustered_embeddings(n: int, d: int = 128, *, n_clusters: int = 300, spread: float = 0.5,
                         seed: int = 0, labels: bool = False):
    """(n, d) float32 unit rows from the mixture above (plus (n,) int labels with ``labels``)."""
    parts = list(iter_clustered(n, d, n_clusters=n_clusters, spread=spread, seed=seed,
                                labels=True))
    X = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, d), np.float32)
    if labels:
        lab = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
        return X, lab
    return X
