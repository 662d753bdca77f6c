"""Memory at scale (issue 17, item 8): Seurat's gene scaling, the CCA, the PCA of wide data and
fastMNN never form the dense cells x genes matrix of a sparse input, and give what the dense
path gives.

Two kinds of check: a spy on ``toarray`` (every densified block of the full gene width fits the
Gram chunk; narrower ones are column subsets such as the filter's ~200 genes) and tracemalloc
peaks (host NumPy memory follows the same code path as the device's) against the dense size.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

from scatlas.kernels import _operator, neighbors
from scatlas.kernels._operator import ColumnShifted, ShiftedOperator
from scatlas.kernels.anchors import scale_data
from scatlas.kernels.cca import cca
from scatlas.kernels.fastmnn import cosine_normalize, fastmnn, multi_batch_pca
from scatlas.kernels.linalg import pca
from scatlas.kernels.seurat import seurat_integrate

CHUNK = 2**20  # Gram chunk bytes in these tests (default 256 MiB)


def sparse_lognorm(n: int, p: int, *, seed: int = 0, types: int = 4, depth: float = -2.5,
                   shift: float = 0.4, n_batches: int = 2) -> tuple[sp.csr_matrix, np.ndarray]:
    """log1p Poisson counts of ``types`` cell types in ``n_batches`` shifted batches (CSR
    float64, ~5-10 % stored) and the batch labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (types, p))
    batch = np.repeat(np.arange(n_batches), -(-n // n_batches))[:n]
    offsets = rng.normal(0.0, shift, (n_batches, p))
    rate = np.exp(centres[rng.integers(0, types, n)] + offsets[batch] + depth)
    X = sp.csr_matrix(rng.poisson(rate).astype(np.float64))
    X.data = np.log1p(X.data)
    return X, batch


def dense_scaled(X: Any, clip: float = 10.0) -> np.ndarray:
    """ScaleData literally, in float64."""
    D = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    sd = D.std(0, ddof=1)
    S = (D - D.mean(0)) / np.where(sd > 0, sd, 1.0)
    S[:, sd == 0] = 0.0
    return np.minimum(S, clip)


@pytest.fixture
def small_chunks(monkeypatch):
    """Gram chunks of CHUNK bytes, small kNN blocks and entry blocks, so that test-sized data
    span many."""
    monkeypatch.setattr(_operator, "GRAM_CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(_operator, "ENTRY_BLOCK", 2**16)
    monkeypatch.setattr(neighbors, "_CPU_BLOCK_BYTES", 2**22)
    monkeypatch.setattr(neighbors, "_RERANK_BYTES", 2**21)


@pytest.fixture
def densified(monkeypatch):
    """Shapes of every sparse matrix densified (``toarray``) and every ColumnShifted made dense."""
    seen: list[tuple[int, int]] = []
    for cls in (sp.csr_matrix, sp.csc_matrix, sp.coo_matrix):
        orig = cls.toarray

        def spy(self, *args, _orig=orig, **kwargs):
            seen.append(self.shape)
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(cls, "toarray", spy)

    def whole(self):
        raise AssertionError(f"a ColumnShifted {self.shape} was made dense whole")

    monkeypatch.setattr(ColumnShifted, "toarray", whole)
    return seen


def assert_chunked(seen: list[tuple[int, int]], p: int, itemsize: int) -> None:
    """Every densified block of the full width p holds at most one Gram chunk (plus the
    256-row floor); narrower ones are column subsets."""
    rows = max(256, CHUNK // (p * itemsize))
    full = [s for s in seen if s[1] >= p]
    assert all(r <= rows for r, _ in full), f"dense blocks {sorted(set(full))} > {rows} rows"


# ----------------------------------------------------------------------------------------------
# scale_data(implicit=True)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csr", "csc", "duplicates"])
def test_implicit_scaling_equals_dense(fmt):
    X, _ = sparse_lognorm(300, 50, seed=1)
    X = X.tolil()
    for j in range(10):  # one outlier per gene: z ~ sqrt(n) > 10, clipped
        X[j, j] = 40.0
    X[:, 17] = 0.0  # an all-zero gene: scales to 0
    X = X.tocsr()
    X.eliminate_zeros()
    ref = dense_scaled(X)
    assert (ref == 10.0).sum() == 10  # the clip is exercised
    if fmt == "csc":
        X = X.tocsc()
    elif fmt == "duplicates":  # the same entries split in two halves, not summed
        X = sp.csr_matrix((np.repeat(X.data / 2, 2), np.repeat(X.indices, 2), 2 * X.indptr),
                          shape=X.shape)
        assert not X.has_canonical_format
    before = X.copy()
    S = scale_data(X, dtype=np.float64, implicit=True)
    assert isinstance(S, ColumnShifted) and S.shape == X.shape
    np.testing.assert_allclose(S.X.toarray() - S.shift, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.X.toarray() - S.shift,
                               scale_data(X.toarray(), dtype=np.float64), rtol=0, atol=1e-12)
    # the caller's matrix is untouched (canonicalised on a copy)
    assert (X != before).nnz == 0 and X.has_canonical_format == before.has_canonical_format
    # float32: each entry one rounding of the float64 value (|S| <= 10 -> 10 * 2^-24 each way)
    S32 = scale_data(X, implicit=True)
    assert S32.dtype == np.float32
    np.testing.assert_allclose(S32.X.toarray().astype(np.float64) - S32.shift, ref, rtol=0,
                               atol=3 * 10 * 2.0**-24)


def test_implicit_scaling_of_dense_or_negative_data_is_dense():
    X, _ = sparse_lognorm(200, 30, seed=2)
    assert isinstance(scale_data(X.toarray(), implicit=True), np.ndarray)
    Y = X.tolil()
    Y[:, 0] = -50.0  # mean + 10 sd < 0 would clip an unstored zero: the dense path
    Y[0, 0] = 0.0
    Y = Y.tocsr()
    Y.eliminate_zeros()
    out = scale_data(Y, dtype=np.float64, implicit=True)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, dense_scaled(Y), atol=1e-12)


@pytest.mark.parametrize("method", ["gram", "explicit", "randomized"])
def test_cca_and_pca_take_the_implicit_form(method):
    X1, _ = sparse_lognorm(150, 60, seed=3)
    X2, _ = sparse_lognorm(120, 60, seed=4)
    S1, S2 = (scale_data(X, dtype=np.float64, implicit=True) for X in (X1, X2))
    D1, D2 = dense_scaled(X1), dense_scaled(X2)
    Z1, Z2, d = cca(S1, S2, 8, method=method, dtype=np.float64, return_d=True)
    R1, R2, rd = cca(D1, D2, 8, method=method, dtype=np.float64, return_d=True)
    np.testing.assert_allclose(d, rd, rtol=1e-10)
    np.testing.assert_allclose(Z1, R1, atol=1e-8)
    np.testing.assert_allclose(Z2, R2, atol=1e-8)
    for center in (False, True):
        a = pca(S1, 10, center=center, method="gram", dtype=np.float64)
        b = pca(D1, 10, center=center, method="gram", dtype=np.float64)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-9)
        np.testing.assert_allclose(a.explained_variance_ratio, b.explained_variance_ratio,
                                   rtol=1e-10)
        np.testing.assert_allclose(a.mean, b.mean, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Seurat CCA integration and fastMNN on sparse input
# ----------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::scatlas.kernels.anchors.SmallBatchWarning")
@pytest.mark.parametrize("scale", ["joint", "dataset"])
@pytest.mark.parametrize("path", ["v5", "v3"])
def test_seurat_sparse_input_equals_dense(scale, path):
    X, batch = sparse_lognorm(360, 80, seed=5, n_batches=3)
    opts = dict(scale=scale, dims=10, k_filter=40 if scale == "dataset" else None,
                max_features=30, k_weight=40, dtype=np.float64)
    if path == "v5":
        opts["embeddings"] = pca(dense_scaled(X), 12, dtype=np.float64).scores
    a = seurat_integrate(X, batch, **opts)
    b = seurat_integrate(X.toarray(), batch, **opts)
    for key in a.anchors:
        for u, v in zip(a.anchors[key], b.anchors[key], strict=True):
            np.testing.assert_array_equal(u, v) if u.dtype.kind == "i" else \
                np.testing.assert_allclose(u, v, atol=1e-12)
    assert a.merges == b.merges
    np.testing.assert_allclose(a.corrected, b.corrected, atol=1e-9)


@pytest.mark.filterwarnings("ignore::scatlas.kernels.anchors.SmallBatchWarning")
@pytest.mark.parametrize("scale", ["joint", "dataset"])
def test_seurat_v5_never_densifies_cells_by_genes(small_chunks, densified, scale):
    """(3,200 cells per batch: past the CCA's explicit route, which densifies pairs of
    n1 n2 <= 1e7 cells, (n1 + n2) p <= 1e8 entries, by design.)"""
    X, batch = sparse_lognorm(6400, 400, seed=6)
    emb = np.random.default_rng(0).normal(size=(6400, 10)).astype(np.float32)
    seurat_integrate(X, batch, embeddings=emb, scale=scale, dims=8,
                     k_filter=200 if scale == "dataset" else None)
    assert densified, "nothing densified: the spy did not see the Gram chunks"
    assert_chunked(densified, 400, 4)


def test_fastmnn_never_densifies_cells_by_genes(small_chunks, densified):
    X, batch = sparse_lognorm(3000, 400, seed=7)
    res = fastmnn(X, batch, d=10)
    assert res.corrected.shape == (3000, 10)
    assert_chunked(densified, 400, 4)


def test_fastmnn_sparse_equals_dense():
    X, batch = sparse_lognorm(400, 60, seed=8, n_batches=3)
    a = fastmnn(X, batch, k=10, d=8, dtype=np.float64)
    b = fastmnn(X.toarray(), batch, k=10, d=8, dtype=np.float64)
    np.testing.assert_allclose(a.corrected, b.corrected, atol=1e-9)
    for ma, mb in zip(a.merges, b.merges, strict=True):
        np.testing.assert_array_equal(ma.pairs[0], mb.pairs[0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_wide_sparse_pca_is_chunked_and_equals_dense(small_chunks, densified, dtype):
    """n < p: A A^T by row chunks (was: the whole (n, p) matrix dense, in float64)."""
    X, _ = sparse_lognorm(300, 2000, seed=9)
    a = pca(X, 12, method="gram", dtype=dtype)
    assert_chunked(densified, 2000, 8)
    densified.clear()
    b = pca(X.toarray(), 12, method="gram", dtype=dtype)
    tol = 1e-9 if dtype == np.float64 else 2e-4  # float32 entries: ~1e-7 of the largest PC
    scale = float(np.abs(b.scores).max())
    np.testing.assert_allclose(a.scores, b.scores, atol=tol * scale)
    np.testing.assert_allclose(a.singular_values, b.singular_values,
                               rtol=1e-12 if dtype == np.float64 else 1e-5)


# ----------------------------------------------------------------------------------------------
# peaks (tracemalloc) against the dense size
# ----------------------------------------------------------------------------------------------
def peak_of(fn: Any) -> tuple[Any, int]:
    """(result, peak bytes traced above the start) of fn()."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_scaled_cca_and_multibatch_pca_peaks_are_far_below_dense(small_chunks):
    n, p = 40000, 300
    X, batch = sparse_lognorm(n, p, seed=10, depth=-3.5)
    X = X.astype(np.float32)
    dense = n * p * 4  # 48 MB; about 4 % of it stored
    X1, X2 = X[batch == 0], X[batch == 1]
    stored = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes

    def scaled_cca():
        S1, S2 = scale_data(X1, implicit=True), scale_data(X2, implicit=True)
        return cca(S1, S2, 10, method="gram")

    (Z1, _), peak = peak_of(scaled_cca)
    assert Z1.shape == (n // 2, 10)
    # the scaled copies of the stored entries, float64 entry blocks, the (p, p) Grams, their
    # cores and SVD, one chunk and its product, (n, 10) outputs; the dense path held 2 x dense
    bound = 3 * stored + 48 * 2**16 + 10 * p * p * 8 + 2 * CHUNK + 8 * n * 10 * 8
    assert peak < bound, (peak, bound, dense)
    assert peak < dense / 4

    def mbpca():
        parts = [cosine_normalize(X1), cosine_normalize(X2)]
        return multi_batch_pca(parts, 10, method="gram")

    (pcs, _), peak = peak_of(mbpca)
    assert pcs[0].shape == (n // 2, 10)
    bound = 3 * stored + 10 * p * p * 8 + 2 * CHUNK + 8 * n * 10 * 8
    assert peak < bound, (peak, bound, dense)
    assert peak < dense / 3  # the batches' normalised copies and their stack: 3 x stored


def test_gram_peak_is_as_documented():
    """ShiftedOperator.gram: the (p, p) float64 result, ONE dense chunk (the previous one is
    freed before the next is made) and the chunk's (p, p) product in the compute dtype (+ its
    float64 cast): within 10 % + 64 KiB."""
    n, p, rows = 6000, 200, 1000
    X, _ = sparse_lognorm(n, p, seed=11)
    X = X.astype(np.float32)
    op = ShiftedOperator(X, col_shift=np.ones(p, np.float32))
    G, peak = peak_of(lambda: op.gram(chunk_rows=rows))
    expected = p * p * 8 + rows * p * 4 + p * p * 4 + p * p * 8
    assert G.shape == (p, p)
    assert abs(peak - expected) < 0.1 * expected + 2**16, (peak, expected)


def test_exact_search_block_peak_is_as_documented():
    """ExactEngine / blocked_topk: the first block of 1,024 queries x 8,192 rows is merged
    whole, about 27 bytes per score (scores, mask, concatenated keys and int64 ids, the
    partition): the figure its docstring scales to the GPU's 8,192 x 65,536 blocks."""
    from scatlas.search.engines.exact import blocked_topk

    rng = np.random.default_rng(12)
    X = rng.standard_normal((20000, 32)).astype(np.float32)
    Q = rng.standard_normal((1024, 32)).astype(np.float32)
    _, peak = peak_of(lambda: blocked_topk(Q, X, 10, "ip"))
    per_score = peak / (1024 * 8192)
    assert 24 < per_score < 30, per_score


def test_rsvd_randomized_peak_is_as_documented():
    """rsvd's randomized route: about 4 n l + 3 p l values of the compute dtype (the old and
    new orthonormal bases of a power iteration; the (n + p) k outputs come after them): within
    15 %."""
    from scatlas.kernels.linalg import rsvd

    n, p, k, over = 30000, 60, 10, 10
    X = np.random.default_rng(13).standard_normal((n, p)).astype(np.float32)
    ell = k + over
    _, peak = peak_of(lambda: rsvd(X, k, method="randomized", n_oversamples=over))
    doc = (4 * n * ell + 3 * p * ell) * 4
    assert abs(peak - doc) < 0.15 * doc, (peak, doc)
