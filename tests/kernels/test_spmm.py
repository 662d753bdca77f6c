"""Sparse x dense first-layer products against numpy's dense products."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scatlas.kernels import spmm


@pytest.fixture(params=["row-major", "row-blocks"])
def path(request, monkeypatch):
    """Both kernels of X @ W: W read per cell (small W) or through row blocks (large W)."""
    monkeypatch.setattr(spmm, "ROW_MAJOR_MAX_BYTES", 2**40 if request.param == "row-major" else 0)
    return request.param


@pytest.mark.parametrize("shape", [(1, 7, 3), (53, 400, 65), (300, 1000, 128)])
@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_products_equal_dense(shape, kind, path):
    n, G, H = shape
    rng = np.random.default_rng(n)
    X = sp.random(n, G, density=0.08, format="csr", dtype=np.float32, random_state=rng)
    X[0, 0] = 3.0  # a fixed non-zero so that even the 1-row case has one
    Xin = {"csr": X, "csc": X.tocsc(), "dense": X.toarray()}[kind]
    W = rng.normal(size=(G, H)).astype(np.float32)
    dense = X.toarray().astype(np.float64)
    np.testing.assert_allclose(spmm.sparse_matmul(Xin, W), dense @ W, rtol=1e-4, atol=1e-4)


def test_empty_rows_and_columns(path):
    X = sp.csr_matrix((4, 6), dtype=np.float32)
    W = np.ones((6, 5), np.float32)
    assert np.array_equal(spmm.sparse_matmul(X, W), np.zeros((4, 5), np.float32))
    assert np.array_equal(spmm.sparse_matmul(X.toarray(), W), np.zeros((4, 5), np.float32))


@pytest.mark.parametrize("rows_per_block", [1, 7, 256])
def test_row_blocks_and_unsorted_duplicate_entries(rows_per_block, path):
    """Block edges, unsorted column indices and duplicate (i, j) entries (summed, as scipy)."""
    rng = np.random.default_rng(1)
    n, G, H = 40, 30, 17
    rows = rng.integers(0, n, 300)
    cols = rng.integers(0, G, 300)
    vals = rng.normal(size=300).astype(np.float32)
    X = sp.csr_matrix((vals, (rows, cols)), shape=(n, G))  # coo -> csr sums duplicates
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=n))]
    raw = sp.csr_matrix((vals, cols, indptr), shape=(n, G))  # unsorted, repeated columns
    W = rng.normal(size=(G, H)).astype(np.float32)
    for M in (X, raw):
        ref = M.toarray().astype(np.float64) @ W
        got = spmm.sparse_matmul(M, W, rows_per_block=rows_per_block)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    dense = X.toarray()
    np.testing.assert_allclose(spmm.sparse_matmul(dense, W, rows_per_block=rows_per_block),
                               dense.astype(np.float64) @ W, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["csr", "dense"])
def test_row_ranges_equal_the_whole_product(kind, path):
    """matmul_rows(start, stop) into a given buffer equals those rows of the whole product."""
    rng = np.random.default_rng(4)
    X = sp.random(97, 300, density=0.1, format="csr", dtype=np.float32, random_state=rng)
    W = rng.normal(size=(300, 33)).astype(np.float32)
    A = spmm.csr_arrays(X if kind == "csr" else X.toarray())
    assert A.indptr.dtype == np.int64 and A.shape == (97, 300)
    whole = X.toarray().astype(np.float64) @ W
    buf = np.full((40, 33), np.nan, np.float32)
    for start, stop in ((0, 40), (40, 80), (80, 97), (13, 14), (5, 5)):
        got = spmm.matmul_rows(A, W, start, stop, out=buf[: stop - start])
        assert got.base is buf or got is buf or stop == start
        np.testing.assert_allclose(got, whole[start:stop], rtol=1e-4, atol=1e-4)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="cannot multiply"):
        spmm.sparse_matmul(sp.csr_matrix((3, 4), dtype=np.float32), np.ones((5, 2), np.float32))


@pytest.mark.parametrize("shape", [(1, 7, 3), (53, 400, 65), (300, 1000, 128)])
def test_transposed_product_equals_dense(shape):
    """X.T @ D over the non-zeros (gene-major, four rows a pass) against numpy, including
    columns with 1-7 entries (the unrolled pass and its remainder) and explicit zeros."""
    n, G, K = shape
    rng = np.random.default_rng(G)
    X = sp.random(n, G, density=0.08, format="csr", dtype=np.float32, random_state=rng)
    X.data[::5] = 0  # explicit zeros, as dropout leaves them
    D = rng.normal(size=(n, K)).astype(np.float32)
    ref = X.toarray().astype(np.float64).T @ D
    np.testing.assert_allclose(spmm.sparse_t_matmul(X, D), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(spmm.sparse_t_matmul(X.tocsc(), D), ref, rtol=1e-4, atol=1e-4)


def test_transposed_product_refuses_bad_input():
    with pytest.raises(ValueError, match="cannot multiply the transpose"):
        spmm.sparse_t_matmul(sp.csr_matrix((3, 4), dtype=np.float32), np.ones((5, 2), np.float32))
    with pytest.raises(TypeError, match="scipy sparse"):
        spmm.sparse_t_matmul(np.ones((3, 4), np.float32), np.ones((3, 2), np.float32))
