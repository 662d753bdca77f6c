"""Accuracy measures shared by the benchmarks (host NumPy, float64)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .environment import get_backend


def host64(x: Any) -> np.ndarray:
    """Any array (NumPy, CuPy, NumPy matrix) as a float64 NumPy array."""
    return np.asarray(get_backend().to_host(x), dtype=np.float64)


def max_rel_err(values: Any, reference: Any) -> float:
    """``max_i |v_i - r_i| / |r_i|`` over the reference's length."""
    v, r = host64(values).ravel(), host64(reference).ravel()
    n = min(v.size, r.size)
    return float(np.max(np.abs(v[:n] - r[:n]) / np.maximum(np.abs(r[:n]), 1e-300)))


def _orthonormal(A: np.ndarray) -> np.ndarray:
    Q, _ = np.linalg.qr(A)
    return Q


def principal_cosines(A: Any, B: Any) -> np.ndarray:
    """Cosines of the principal angles between the column spans of ``A`` and ``B``."""
    QA, QB = _orthonormal(host64(A)), _orthonormal(host64(B))
    return np.clip(np.linalg.svd(QA.T @ QB, compute_uv=False), 0.0, 1.0)


def subspace_min_cos(A: Any, B: Any) -> float:
    """Smallest principal-angle cosine between two column spans (1 = same subspace)."""
    return float(np.min(principal_cosines(A, B)))


def column_cosines(A: Any, B: Any) -> np.ndarray:
    """Cosine between corresponding columns of ``A`` and ``B`` (signed)."""
    a, b = host64(A), host64(B)
    num = np.sum(a * b, axis=0)
    den = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    return num / np.maximum(den, 1e-300)


def row_cosines(A: Any, B: Any) -> np.ndarray:
    """Cosine between corresponding rows of ``A`` and ``B`` (signed)."""
    return column_cosines(host64(A).T, host64(B).T)
