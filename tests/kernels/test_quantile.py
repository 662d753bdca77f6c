"""LIGER quantile normalisation (scatlas.kernels.quantile)."""

from __future__ import annotations

import numpy as np
import pytest

from scatlas._validate import ScatlasInputError
from scatlas.kernels.quantile import max_factor, quantile_norm


def _clustered_h(n: int, k: int = 4, seed: int = 0) -> np.ndarray:
    """Loadings with one dominant factor per cell (clear clusters), non-negative."""
    rng = np.random.default_rng(seed)
    H = 0.1 * rng.random((n, k))
    H[np.arange(n), np.arange(n) % k] += rng.gamma(2.0, 1.0, n)
    return H


def test_max_factor_scales_factors_and_flags_empty_cells():
    H = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 1.0], [0.0, 0.0]])
    # RMS: f0 = sqrt(14/3) = 2.16, f1 = sqrt(201/3) = 8.19 -> scaled rows
    np.testing.assert_array_equal(max_factor(H), [1, 1, 0, -1])
    np.testing.assert_array_equal(max_factor(H, use_dims=[0]), [0, 0, 0, -1])
    Hc = np.array([[1.0, 1.0], [3.0, 1.5], [2.0, 2.0]])
    np.testing.assert_array_equal(max_factor(Hc, center=True), [-1, 0, 1])


def test_identical_dataset_is_left_unchanged():
    H = _clustered_h(300)
    perm = np.random.default_rng(1).permutation(300)
    res = quantile_norm([H, H[perm]])
    assert res.reference == 0
    np.testing.assert_allclose(res.H_norm[1], H[perm], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(res.H_norm[0], H)
    np.testing.assert_array_equal(res.clusters[1], res.clusters[0][perm])


def test_scaled_dataset_is_mapped_back_onto_the_reference():
    """Dataset 1 = 3 x the reference (cells permuted): same clusters (the assignment is
    scale-free), quantiles 3x apart, so the piecewise-linear warp is x -> x / 3 exactly."""
    H = _clustered_h(400, seed=2)
    perm = np.random.default_rng(3).permutation(400)
    res = quantile_norm([H, 3.0 * H[perm]], reference=0)
    np.testing.assert_allclose(res.H_norm[1], H[perm], rtol=1e-10, atol=1e-12)


def test_distribution_matching_within_clusters():
    ref = _clustered_h(600, seed=5)
    other = _clustered_h(500, seed=6) ** 2 * 1.7  # different, monotone-distorted loadings
    res = quantile_norm([ref, other])
    assert res.reference == 0
    for c in range(4):
        a = ref[res.clusters[0] == c, c]
        b = res.H_norm[1][res.clusters[1] == c, c]
        qs = np.linspace(0.1, 0.9, 9)
        before = other[res.clusters[1] == c, c]
        tol = 0.03 * np.ptp(a)
        np.testing.assert_allclose(np.quantile(b, qs), np.quantile(a, qs), atol=tol)
        assert np.abs(np.quantile(before, qs) - np.quantile(a, qs)).max() > 10 * tol


def test_knn_vote_relabels_an_isolated_cell():
    rng = np.random.default_rng(7)
    H = np.vstack([
        np.array([1.0, 0.95]) + 0.01 * rng.random((100, 2)),  # cluster 0
        np.array([0.2, 1.0]) + 0.01 * rng.random((100, 2)),  # cluster 1
    ])
    H[0] = [0.7, 0.96]  # closest to cluster 0, but factor 1 wins after RMS scaling
    raw = max_factor(H)
    assert raw[0] == 1 and (raw[1:100] == 0).all() and (raw[100:] == 1).all()
    res = quantile_norm([H, H.copy()], min_cells=1000)  # no warping, only the assignment
    assert res.clusters[0][0] == 0
    np.testing.assert_array_equal(res.clusters[0][1:], raw[1:])
    np.testing.assert_array_equal(quantile_norm([H, H], refine_knn=False).clusters[0], raw)


def test_small_clusters_are_not_warped_and_reference_is_largest():
    H0 = _clustered_h(100, seed=8)
    H1 = _clustered_h(300, seed=9)
    res = quantile_norm([H0, H1], min_cells=500)
    assert res.reference == 1
    np.testing.assert_array_equal(res.H_norm[0], H0)
    np.testing.assert_array_equal(res.H_norm[1], H1)


def test_seed_reproducible_with_subsampling():
    H0, H1 = _clustered_h(3000, seed=10), _clustered_h(2500, seed=11) * 2.0
    a = quantile_norm([H0, H1], max_sample=100, seed=4)
    b = quantile_norm([H0, H1], max_sample=100, seed=4)
    c = quantile_norm([H0, H1], max_sample=100, seed=5)
    np.testing.assert_array_equal(a.H_norm[1], b.H_norm[1])
    assert not np.array_equal(a.H_norm[1], c.H_norm[1])


def test_validation():
    H = _clustered_h(50)
    with pytest.raises(ScatlasInputError, match="negative"):
        quantile_norm([H, -H])
    with pytest.raises(ScatlasInputError, match="same number of factors"):
        quantile_norm([H, H[:, :3]])
    with pytest.raises(ScatlasInputError, match="reference"):
        quantile_norm([H, H], reference=2)
    with pytest.raises(ScatlasInputError, match="empty"):
        quantile_norm([])
    with pytest.raises(ScatlasInputError, match="use_dims"):
        quantile_norm([H, H], use_dims=[7])


@pytest.mark.gpu
def test_gpu_matches_cpu():
    cp = pytest.importorskip("cupy")
    H0, H1 = _clustered_h(500, seed=12), _clustered_h(400, seed=13) ** 1.5
    cpu = quantile_norm([H0, H1], max_sample=200)
    gpu = quantile_norm([cp.asarray(H0), cp.asarray(H1)], max_sample=200)
    for a, b in zip(gpu.clusters, cpu.clusters, strict=True):
        np.testing.assert_array_equal(a.get(), b)
    np.testing.assert_allclose(gpu.H_norm[1].get(), cpu.H_norm[1], rtol=1e-10, atol=1e-12)
