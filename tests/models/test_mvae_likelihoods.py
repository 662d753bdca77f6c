"""Likelihoods, KL and the product of experts of the multimodal VAE against scipy / numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import expit, logsumexp

from scatlas.models.mvae_likelihoods import (
    kl_standard_normal,
    log_bernoulli,
    log_log1p_normal,
    log_nb,
    log_nb_mixture,
    log_normal,
    product_of_experts,
)


def _nb_scipy(x, mu, theta):
    return stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))


@pytest.fixture
def nb_inputs():
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, size=(6, 9)).astype(np.float64)
    x[0, :3] = [0, 250, 1]
    mu = rng.gamma(2.0, 2.0, size=(6, 9)) + 1e-3
    theta = rng.gamma(2.0, 1.0, size=9) + 0.05
    return x, mu, theta


def test_log_nb_matches_scipy(nb_inputs):
    x, mu, theta = nb_inputs
    ours = np.asarray(log_nb(jnp.asarray(x, jnp.float32), jnp.log(jnp.asarray(mu, jnp.float32)),
                             jnp.log(jnp.asarray(theta, jnp.float32))))
    np.testing.assert_allclose(ours, _nb_scipy(x, mu, theta), rtol=2e-4, atol=2e-3)


def test_log_nb_mixture_matches_scipy(nb_inputs):
    x, mu, theta = nb_inputs
    mu2 = mu * 4.5
    logits = np.random.default_rng(1).normal(size=x.shape)
    ref = logsumexp(
        [np.log(expit(logits)) + _nb_scipy(x, mu, theta),
         np.log(expit(-logits)) + _nb_scipy(x, mu2, theta)], axis=0)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    ours = np.asarray(log_nb_mixture(f32(x), jnp.log(f32(mu)), jnp.log(f32(mu2)),
                                     jnp.log(f32(theta)), f32(logits)))
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-3)


def test_log_bernoulli_and_normal_match_scipy():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2, size=(5, 7)).astype(np.float64)
    logits = rng.normal(scale=4, size=(5, 7))
    ours = np.asarray(log_bernoulli(jnp.asarray(x, jnp.float32), jnp.asarray(logits, jnp.float32)))
    np.testing.assert_allclose(ours, stats.bernoulli.logpmf(x, expit(logits)), rtol=1e-5,
                               atol=1e-5)
    y, m, log_sd = rng.normal(size=7), rng.normal(size=7), rng.normal(scale=0.5, size=7)
    ours = np.asarray(log_normal(jnp.asarray(y), jnp.asarray(m), jnp.asarray(log_sd)))
    np.testing.assert_allclose(ours, stats.norm.logpdf(y, m, np.exp(log_sd)), rtol=1e-5)


def test_log1p_normal_is_shifted_lognormal_density():
    """``log1p(x) ~ N(m, sd)`` is ``x + 1 ~ LogNormal``: scipy's lognorm density at ``x + 1``;
    its mass over x >= 0 is ``P(log1p x >= 0) = Phi(m / sd)``."""
    rng = np.random.default_rng(5)
    x = np.concatenate([[0.0, 1.0, 250.0], rng.poisson(8.0, size=9).astype(np.float64)])
    m, log_sd = rng.normal(1.5, 1.0, size=x.size), rng.normal(scale=0.4, size=x.size)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    ours = np.asarray(log_log1p_normal(f32(x), f32(m), f32(log_sd)))
    ref = stats.lognorm.logpdf(x + 1, s=np.exp(log_sd), scale=np.exp(m))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    grid = np.linspace(0, 400, 400_001)
    dens = np.exp(np.asarray(log_log1p_normal(jnp.asarray(grid), 1.2, jnp.log(0.6))))
    np.testing.assert_allclose(np.trapezoid(dens, grid), stats.norm.cdf(1.2 / 0.6), atol=1e-4)


def test_kl_standard_normal_matches_gaussian_kl():
    rng = np.random.default_rng(3)
    mu, logvar = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    sd = np.exp(0.5 * logvar)
    # KL(N(mu, sd^2) || N(0, 1)) = log(1 / sd) + (sd^2 + mu^2) / 2 - 1/2, summed over dims
    ref = np.sum(-np.log(sd) + (sd**2 + mu**2) / 2 - 0.5, axis=1)
    ours = np.asarray(kl_standard_normal(jnp.asarray(mu), jnp.asarray(logvar)))
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_poe_equals_normalised_product_of_densities():
    """1-D experts: the product of the densities (and the N(0, 1) prior) on a fine grid,
    normalised numerically, has the closed-form mean and variance."""
    mus = np.array([1.5, -0.7, 3.0])
    logvars = np.log(np.array([0.5, 2.0, 0.1]))
    grid = np.linspace(-10, 10, 400_001)
    dens = stats.norm.pdf(grid, 0, 1)
    for m, lv in zip(mus, logvars, strict=True):
        dens = dens * stats.norm.pdf(grid, m, np.exp(0.5 * lv))
    dens /= np.trapezoid(dens, grid)
    mean = np.trapezoid(grid * dens, grid)
    var = np.trapezoid((grid - mean) ** 2 * dens, grid)
    mu, logvar = product_of_experts(jnp.asarray(mus)[:, None, None],
                                    jnp.asarray(logvars)[:, None, None], jnp.ones((3, 1)))
    np.testing.assert_allclose(float(mu[0, 0]), mean, rtol=1e-4)
    np.testing.assert_allclose(float(np.exp(logvar[0, 0])), var, rtol=1e-4)


def test_poe_closed_form_multivariate():
    rng = np.random.default_rng(4)
    M, B, D = 3, 5, 4
    mus, logvars = rng.normal(size=(M, B, D)), rng.normal(size=(M, B, D))
    mu, logvar = product_of_experts(jnp.asarray(mus), jnp.asarray(logvars), jnp.ones((M, B)))
    for b in range(B):  # Gaussian product with precision matrices (diagonal here)
        lam = np.eye(D) + sum(np.diag(np.exp(-logvars[m, b])) for m in range(M))
        cov = np.linalg.inv(lam)
        mean = cov @ sum(np.diag(np.exp(-logvars[m, b])) @ mus[m, b] for m in range(M))
        np.testing.assert_allclose(np.asarray(mu[b]), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.exp(np.asarray(logvar[b])), np.diag(cov), rtol=1e-5)


def test_masking_gives_remaining_experts_and_prior():
    rng = np.random.default_rng(5)
    M, B, D = 3, 6, 4
    mus, logvars = rng.normal(size=(M, B, D)), rng.normal(size=(M, B, D))
    masks = np.array([[1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 1, 0], [0, 1, 1, 1, 1, 0]], np.float32)
    bad = mus.copy()
    bad[masks == 0] = np.nan  # a masked expert's values never leak in
    mu, logvar = product_of_experts(jnp.asarray(bad), jnp.asarray(logvars), jnp.asarray(masks))
    for b in range(B):
        keep = masks[:, b] > 0
        sub_mu, sub_lv = product_of_experts(jnp.asarray(mus[keep, b][:, None]),
                                            jnp.asarray(logvars[keep, b][:, None]),
                                            jnp.ones((int(keep.sum()), 1)))
        np.testing.assert_allclose(np.asarray(mu[b]), np.asarray(sub_mu[0]), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(logvar[b]), np.asarray(sub_lv[0]), rtol=1e-6)
    # cell 5 has every expert masked: the prior N(0, I)
    np.testing.assert_array_equal(np.asarray(mu[5]), 0)
    np.testing.assert_array_equal(np.asarray(logvar[5]), 0)
