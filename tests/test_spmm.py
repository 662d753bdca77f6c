"""Sparse x dense first-layer products against numpy's dense products."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scatlas.kernels import spmm


@pytest.mark.parametrize("shape", [(1, 7, 3), (53, 400, 65), (300, 1000, 128)])
@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_products_equal_dense(shape, kind):
    n, G, H = shape
    rng = np.random.default_rng(n)
    X = sp.random(n, G, density=0.08, format="csr", dtype=np.float32, random_state=rng)
    X[0, 0] = 3.0  # a fixed non-zero so that even the 1-row case has one
    Xin = {"csr": X, "csc": X.tocsc(), "dense": X.toarray()}[kind]
    W = rng.normal(size=(G, H)).astype(np.float32)
    dense = X.toarray().astype(np.float64)
    np.testing.assert_allclose(spmm.sparse_matmul(Xin, W), dense @ W, rtol=1e-4, atol=1e-4)
    Xd = X.toarray()
    np.testing.assert_allclose(spmm.dense_skip_matmul(Xd, W), dense @ W, rtol=1e-4, atol=1e-4)


def test_empty_rows_and_columns():
    X = sp.csr_matrix((4, 6), dtype=np.float32)
    W = np.ones((6, 5), np.float32)
    assert np.array_equal(spmm.sparse_matmul(X, W), np.zeros((4, 5), np.float32))
    assert np.array_equal(spmm.dense_skip_matmul(X.toarray(), W), np.zeros((4, 5), np.float32))
