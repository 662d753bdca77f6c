"""Planted non-negative iNMF models shared by the NMF and online-NMF tests."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def planted_inmf(
    n_cells=(120, 90, 150), m=60, k=4, noise=0.0, v_scale=0.3, seed=0
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Non-negative iNMF model: X_i = H_i (W + V_i)^T (+ noise), sparse-ish factors."""
    rng = np.random.default_rng(seed)
    W = rng.gamma(0.4, 1.0, (m, k)) * (rng.random((m, k)) < 0.6)
    W[np.arange(m), rng.integers(0, k, m)] += 0.5  # every gene used
    Xs, Vs, Hs = [], [], []
    for n in n_cells:
        V = v_scale * rng.gamma(0.4, 1.0, (m, k)) * (rng.random((m, k)) < 0.3)
        H = rng.gamma(1.0, 1.0, (n, k)) * (rng.random((n, k)) < 0.5)
        H[np.arange(n), rng.integers(0, k, n)] += 1.0  # no empty cell
        X = H @ (W + V).T
        if noise:
            X = np.abs(X + noise * rng.normal(size=X.shape) * X.std())
        Xs.append(X)
        Vs.append(V)
        Hs.append(H)
    return Xs, W, Vs, Hs


def matched_cosines(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Cosine similarity of the columns of A and B after Hungarian matching."""
    An = A / np.maximum(np.linalg.norm(A, axis=0), 1e-300)
    Bn = B / np.maximum(np.linalg.norm(B, axis=0), 1e-300)
    S = An.T @ Bn
    r, c = linear_sum_assignment(-S)
    return S[r, c]
