"""Test doubles of the search service: a fixed linear encoder with the ``scatlas.models`` model
interface and clustered reference embeddings (shared by tests/search and tests/cli)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

DIM = 16


class LinearModel:
    """Fixed linear encoder (random, or given ``W`` and ``center``) with the ``scatlas.models``
    model interface: ``normalise(lognorm(counts) - center) @ W``."""

    def __init__(self, genes, latent_dim: int, seed: int = 0, W=None, center=None) -> None:
        self.genes = pd.Index([str(g) for g in genes])
        self.latent_dim = int(latent_dim)
        rng = np.random.default_rng(seed)
        self.W = (rng.standard_normal((len(self.genes), self.latent_dim)).astype(np.float32)
                  if W is None else np.asarray(W, np.float32))
        self.center = 0.0 if center is None else np.asarray(center)

    def lognorm_of(self, adata_or_counts) -> np.ndarray:
        """``log1p(1e4 x / rowsum)`` of the counts aligned to :attr:`genes` (float64)."""
        if hasattr(adata_or_counts, "var_names"):
            from scatlas.io import align_genes

            X = align_genes(adata_or_counts, self.genes, min_overlap=0.5).X
        else:
            X = adata_or_counts
        X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
        total = X.sum(axis=1, keepdims=True)
        total[total == 0] = 1.0
        return np.log1p(1e4 * X / total)

    def embed(self, adata_or_counts) -> np.ndarray:
        Z = ((self.lognorm_of(adata_or_counts) - self.center) @ self.W).astype(np.float32)
        Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
        return Z


def reference(n: int = 600, d: int = DIM, *, n_types: int = 4, seed: int = 0):
    """Clustered unit embeddings ``(n, d)`` float32 and their metadata."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_types, d)).astype(np.float32)
    labels = rng.integers(0, n_types, size=n)
    X = centres[labels] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    meta = pd.DataFrame({
        "cell_type": pd.Categorical([f"type{t}" for t in labels]),
        "donor": rng.choice(["d1", "d2", "d3"], size=n),
        "n_counts": rng.integers(500, 5000, size=n),
    })
    return X.astype(np.float32), meta
