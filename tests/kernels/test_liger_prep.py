"""LIGER preprocessing (scatlas.kernels.liger_prep) against hand computations of the formulas."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import norm

from scatlas._validate import ScatlasInputError
from scatlas.kernels.liger_prep import (
    GeneMoments,
    excess_variance,
    gene_rms,
    liger_preprocess,
    liger_transform,
    normalize_rows,
    row_totals,
    scale_not_center,
    select_genes,
)


def _counts(n=200, m=30, seed=0, over=(0, 1, 2)):
    """Poisson counts with varying depth; genes ``over`` are strongly over-dispersed."""
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.5, 2.0, n)
    mu = rng.uniform(0.5, 5.0, m)
    lam = depth[:, None] * mu[None, :]
    for g in over:  # on in a third of the cells only: variance far above Poisson
        lam[:, g] *= np.where(rng.random(n) < 0.3, 8.0, 0.05)
    return rng.poisson(lam).astype(np.float64)


def test_normalize_rows_dense_and_sparse():
    X = _counts()
    X[5] = 0  # a cell without counts stays a zero row
    ref = np.divide(X, X.sum(1, keepdims=True), out=np.zeros_like(X),
                    where=X.sum(1, keepdims=True) > 0)
    dense = normalize_rows(X, dtype=np.float64)
    np.testing.assert_allclose(dense, ref, rtol=1e-12)
    out = normalize_rows(sp.csr_matrix(X))
    assert sp.issparse(out) and out.format == "csr" and out.dtype == np.float32
    np.testing.assert_allclose(out.toarray(), ref, rtol=1e-6)
    np.testing.assert_allclose(row_totals(sp.csr_matrix(X)), X.sum(1))
    with pytest.raises(ScatlasInputError, match="negative"):
        normalize_rows(-X)


def test_scale_not_center_is_rms_with_n_minus_1():
    X = normalize_rows(_counts(), dtype=np.float64)
    X[:, 7] = 0  # zero-variance gene -> 0 (rliger sets the NaN of 0/0 to 0)
    rms = np.sqrt((X**2).sum(0) / (X.shape[0] - 1))
    np.testing.assert_allclose(gene_rms(X), rms, rtol=1e-12)
    ref = np.divide(X, rms, out=np.zeros_like(X), where=rms > 0)
    np.testing.assert_allclose(scale_not_center(X, dtype=np.float64), ref, rtol=1e-12)
    S = scale_not_center(sp.csr_matrix(X), dtype=np.float64)
    assert sp.issparse(S) and not (S.data == 0).any()
    np.testing.assert_allclose(S.toarray(), ref, rtol=1e-12)
    # scaled genes have unit RMS; no centring: values stay non-negative
    scaled = scale_not_center(X, dtype=np.float64)
    assert scaled.min() >= 0
    np.testing.assert_allclose(gene_rms(scaled)[rms > 0], 1.0, rtol=1e-12)
    # given divisors are used as they are
    np.testing.assert_allclose(scale_not_center(X, rms=2 * rms, dtype=np.float64), ref / 2)
    with pytest.raises(ScatlasInputError, match="rms"):
        scale_not_center(X, rms=rms[:3])


def test_moments_accumulate_over_chunks_and_skip_empty_cells():
    X = _counts(n=150)
    X[[3, 40]] = 0
    whole = GeneMoments.from_counts(sp.csr_matrix(X))
    chunked = GeneMoments(X.shape[1])
    for a in range(0, 150, 37):
        chunked.update(sp.csr_matrix(X[a:a + 37]))
    keep = X.sum(1) > 0
    N = X[keep] / X[keep].sum(1, keepdims=True)
    for m in (whole, chunked):
        assert m.n_cells == 148
        np.testing.assert_allclose(m.mean, N.mean(0), rtol=1e-12)
        np.testing.assert_allclose(m.var, N.var(0, ddof=1), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(m.rms, np.sqrt((N**2).sum(0) / 147), rtol=1e-12)
        assert m.nolan == pytest.approx(np.mean(1 / X[keep].sum(1)), rel=1e-12)
        np.testing.assert_array_equal(m.n_expressing, (X > 0).sum(0))
    dense = GeneMoments.from_counts(X)
    np.testing.assert_allclose(dense.sum_sq, whole.sum_sq, rtol=1e-12)
    sub = whole.subset([2, 5])
    assert sub.n_genes == 2 and sub.mean[1] == whole.mean[5]


def test_excess_variance_formula():
    X = _counts(n=300, m=20, seed=1)
    X[:, 9] = 0  # not expressed: not counted in the Bonferroni divisor, never selected
    m = GeneMoments.from_counts(X)
    score, above = excess_variance(m, alpha=0.99)
    N = X / X.sum(1, keepdims=True)
    mu, var = N.mean(0), N.var(0, ddof=1)
    nolan = np.mean(1 / X.sum(1))
    upper = mu + norm.ppf(1 - 0.99 / 19 / 2) * np.sqrt(mu * nolan / 300)
    ok = mu > 0
    np.testing.assert_allclose(score[ok], np.log10(var[ok]) - np.log10(mu[ok] * nolan),
                               rtol=1e-9)
    np.testing.assert_array_equal(above[ok], (var / nolan > upper)[ok])
    assert not above[9]
    score2, _ = excess_variance(m, alpha=0.99, n_tests=1000)  # stricter mean test only
    np.testing.assert_allclose(score2[ok], score[ok])


def test_select_genes_finds_overdispersed_genes():
    X = _counts(n=400, m=40, seed=2, over=(0, 1, 2))
    genes = select_genes([X])
    assert {0, 1, 2} <= set(genes.tolist())
    # Poisson genes have score ~ 0 < thresh: few false positives
    assert len(genes) <= 6
    # the same as an explicit per-dataset test
    score, above = excess_variance(GeneMoments.from_counts(X))
    np.testing.assert_array_equal(genes, np.flatnonzero(above & (score > 0.1)))


def test_select_genes_combine_n_genes_shared_and_errors():
    A = _counts(n=300, m=30, seed=3, over=(0, 1))
    B = _counts(n=250, m=30, seed=4, over=(1, 2, 3))
    union = select_genes([A, sp.csr_matrix(B)])
    inter = select_genes([A, B], combine="intersection")
    assert {0, 1, 2, 3} <= set(union.tolist()) and 1 in inter
    assert set(inter.tolist()) <= set(union.tolist()) and 0 not in inter
    # nGenes: the top-scoring passing genes per dataset, then the union
    top1 = select_genes([A, B], n_genes=1)
    sa, _ = excess_variance(GeneMoments.from_counts(A))
    sb, _ = excess_variance(GeneMoments.from_counts(B))
    assert set(top1.tolist()) == {int(np.argmax(sa)), int(np.argmax(sb))}
    # a gene without counts in one dataset is not shared (rliger drops it from that dataset)
    B0 = B.copy()
    B0[:, 2] = 0
    assert 2 not in select_genes([A, B0])
    assert 2 not in select_genes([A, B0], shared_only=False)  # B0 no longer selects it
    A2 = A.copy()
    A2[:, 1] = 0
    assert 1 not in select_genes([A2, B]) and 1 in select_genes([A2, B], shared_only=False)
    # moments instead of matrices give the same answer
    np.testing.assert_array_equal(
        select_genes([GeneMoments.from_counts(A), GeneMoments.from_counts(B)]), union)
    # per-dataset thresholds: an unreachable threshold for B keeps only A's genes
    only_a = select_genes([A, B], thresh=[0.1, 99.0])
    np.testing.assert_array_equal(only_a, select_genes([A]))
    with pytest.raises(ScatlasInputError, match="no gene selected"):
        select_genes([A, B], thresh=99.0)
    with pytest.raises(ScatlasInputError, match="same genes"):
        select_genes([A, B[:, :10]])
    with pytest.raises(ScatlasInputError, match="list"):
        select_genes(A)
    with pytest.raises(ScatlasInputError, match="combine"):
        select_genes([A, B], combine="both")


def test_liger_transform_chunks_equal_whole_dataset():
    X = sp.csr_matrix(_counts(n=240, m=25, seed=5))
    genes = np.array([0, 3, 4, 10, 24])
    m = GeneMoments.from_counts(X)
    whole = scale_not_center(normalize_rows(X, dtype=np.float64)[:, genes], dtype=np.float64)
    chunks = sp.vstack([
        liger_transform(X[a:a + 50], genes, m.rms[genes], dtype=np.float64)
        for a in range(0, 240, 50)
    ])
    assert sp.issparse(chunks)
    np.testing.assert_allclose(chunks.toarray(), whole.toarray(), rtol=1e-12)
    # totals use every gene of the chunk, not only the selected ones
    dense = liger_transform(X.toarray(), genes, m.rms[genes], dtype=np.float64)
    np.testing.assert_allclose(dense, whole.toarray(), rtol=1e-12)


def test_liger_preprocess_pipeline():
    A = _counts(n=200, m=30, seed=6, over=(0, 5))
    B = _counts(n=180, m=30, seed=7, over=(5, 6))
    scaled, genes = liger_preprocess([sp.csr_matrix(A), sp.csr_matrix(B)])
    np.testing.assert_array_equal(genes, select_genes([A, B]))
    for S, X in zip(scaled, (A, B), strict=True):
        ref = scale_not_center(normalize_rows(X, dtype=np.float64)[:, genes], dtype=np.float64)
        assert sp.issparse(S) and S.dtype == np.float32
        np.testing.assert_allclose(S.toarray(), ref, rtol=1e-6)
    given, g2 = liger_preprocess([A, B], genes=np.arange(30) < 4, dtype=np.float64)
    np.testing.assert_array_equal(g2, [0, 1, 2, 3])
    assert given[0].shape == (200, 4)


@pytest.mark.gpu
def test_gpu_matches_cpu():
    cp = pytest.importorskip("cupy")
    import cupyx.scipy.sparse as csp

    X = sp.csr_matrix(_counts(n=120, m=20, seed=8))
    G = csp.csr_matrix(X)
    np.testing.assert_allclose(normalize_rows(G).get().toarray(),
                               normalize_rows(X).toarray(), rtol=1e-6)
    mg, mc = GeneMoments.from_counts(G), GeneMoments.from_counts(X)
    np.testing.assert_allclose(mg.sum_sq, mc.sum_sq, rtol=1e-10)
    genes = np.array([1, 2, 7])
    out = liger_transform(G, genes, mc.rms[genes])
    assert isinstance(out, csp.csr_matrix)
    np.testing.assert_allclose(out.get().toarray(),
                               liger_transform(X, genes, mc.rms[genes]).toarray(), rtol=1e-6)
    assert isinstance(gene_rms(cp.asarray(X.toarray())), cp.ndarray)
