"""Likelihoods, KL divergence and the product-of-experts posterior of the multimodal VAE.

Pure :mod:`jax.numpy` functions (jittable, broadcasting, float32), each checked in
``tests/models/test_mvae_likelihoods.py`` against scipy / numpy closed forms.

- :func:`log_nb`: negative binomial with mean ``mu`` and inverse dispersion ``theta``
  (scvi-tools ``log_nb_positive``; parameterised by ``log mu`` and ``log theta`` for stability).
- :func:`log_nb_mixture`: two-component NB mixture with a shared ``theta`` (totalVI's protein
  background / foreground model, scvi-tools ``log_mixture_nb``).
- :func:`log_bernoulli`: Bernoulli on 0/1 data from logits (PeakVI / MultiVI accessibility).
- :func:`log_normal`: Gaussian log density (the log-library model).
- :func:`log_log1p_normal`: ``log1p(x) ~ N(mean, sd^2)`` as a density of ``x`` (``x + 1``
  log-normal): the ``"log1p_normal"`` likelihood, a Gaussian on the ``log1p`` scale.
- :func:`kl_standard_normal`: ``KL(N(mu, exp(logvar)) || N(0, I))`` summed over the last axis.
- :func:`product_of_experts`: the precision-weighted Gaussian product of the masked experts and
  the ``N(0, I)`` prior expert (Wu & Goodman 2018, MVAE; MIDAS ``poe``; Cobolt).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

LIKELIHOODS = ("nb", "nb_mixture", "bernoulli", "log1p_normal")
#: bounds of encoder log-variances (scMM clamps at +-12)
LOGVAR_MIN, LOGVAR_MAX = -12.0, 12.0


def log_nb(x: jax.Array, log_mu: jax.Array, log_theta: jax.Array) -> jax.Array:
    """Elementwise ``log NB(x; mean=exp(log_mu), inverse dispersion=exp(log_theta))``.

    ``NB(x) = Gamma(x + theta) / (Gamma(theta) x!) * (theta / (theta + mu))^theta
    * (mu / (theta + mu))^x``; ``x`` need not be integer-valued (the gamma-function form).
    """
    theta = jnp.exp(log_theta)
    log_theta_mu = jnp.logaddexp(log_theta, log_mu)
    return (
        theta * (log_theta - log_theta_mu)
        + x * (log_mu - log_theta_mu)
        + gammaln(x + theta) - gammaln(theta) - gammaln(x + 1.0)
    )


def log_nb_mixture(
    x: jax.Array, log_mu1: jax.Array, log_mu2: jax.Array, log_theta: jax.Array,
    mix_logits: jax.Array,
) -> jax.Array:
    """``log[pi NB(x; mu1, theta) + (1 - pi) NB(x; mu2, theta)]`` with ``pi = sigmoid(logits)``.

    Component 1 is totalVI's background, component 2 the foreground (``mu2 = alpha mu1``,
    ``alpha >= 1`` is the decoder's business, not this function's).
    """
    a = jax.nn.log_sigmoid(mix_logits) + log_nb(x, log_mu1, log_theta)
    b = jax.nn.log_sigmoid(-mix_logits) + log_nb(x, log_mu2, log_theta)
    return jnp.logaddexp(a, b)


def log_bernoulli(x: jax.Array, logits: jax.Array) -> jax.Array:
    """``x log sigmoid(l) + (1 - x) log sigmoid(-l)`` (binary cross-entropy, negated)."""
    return x * jax.nn.log_sigmoid(logits) + (1.0 - x) * jax.nn.log_sigmoid(-logits)


def log_normal(x: jax.Array, mean: jax.Array, log_sd: jax.Array) -> jax.Array:
    """Elementwise Gaussian log density ``log N(x; mean, exp(log_sd)^2)``."""
    return -0.5 * ((x - mean) * jnp.exp(-log_sd)) ** 2 - log_sd - 0.5 * math.log(2 * math.pi)


def log_log1p_normal(x: jax.Array, mean: jax.Array, log_sd: jax.Array) -> jax.Array:
    """Elementwise ``log p(x)`` where ``log1p(x) ~ N(mean, exp(log_sd)^2)``: the density of the
    shifted log-normal ``x + 1 ~ LogNormal(mean, sd)``, ``log N(log1p x; mean, sd) - log1p x``
    (the Jacobian does not depend on the parameters)."""
    y = jnp.log1p(x)
    return log_normal(y, mean, log_sd) - y


def kl_standard_normal(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """``KL(N(mu, diag exp(logvar)) || N(0, I)) = 0.5 sum(mu^2 + var - 1 - logvar)``, last axis."""
    return 0.5 * jnp.sum(mu**2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1)


def product_of_experts(
    mus: jax.Array, logvars: jax.Array, masks: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Gaussian product of masked experts and the standard-normal prior expert.

    ``mus``, ``logvars``: (M, ..., D) expert means and log-variances; ``masks``: (M, ...) 0/1
    (1: the expert takes part). With precisions ``T_m = mask_m exp(-logvar_m)`` and the prior's
    ``T_0 = 1``: ``var = 1 / (1 + sum_m T_m)``, ``mu = var * sum_m T_m mu_m``. A masked expert
    contributes nothing (whatever its values); with every expert masked the result
    is the prior ``N(0, I)``. Returns ``(mu, logvar)`` of shape (..., D).
    """
    on = masks[..., None] > 0
    prec = jnp.where(on, jnp.exp(-logvars), 0.0)
    total = 1.0 + jnp.sum(prec, axis=0)
    mu = jnp.sum(jnp.where(on, prec * mus, 0.0), axis=0) / total
    return mu, -jnp.log(total)
