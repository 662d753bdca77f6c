"""MichiGAN's objectives as :class:`~scatlas.models.train.Task` s of the shared training loop.

Stage 1, the beta-TCVAE (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs",
NeurIPS; reference code rtqichen/beta-tcvae ``vae_quant.py``). The KL term of the ELBO,
averaged over the data, splits into the index-code mutual information, the total correlation of
the aggregate posterior and the dimension-wise KL::

    E_x KL(q(z|x) || p(z)) = I_q(x; z) + KL(q(z) || prod_d q(z_d)) + sum_d KL(q(z_d) || p(z_d))
    loss = -log p(x|z) + alpha * MI + beta * TC + gamma * DWKL      (alpha = gamma = 1)

with ``z ~ q(z|x_i)`` one reparameterised sample per cell and the aggregate densities from the
mini-batch by minibatch-weighted sampling (MWS, Chen et al. sec. 3.1, eq. S7), for a batch of
``M`` cells out of ``N``::

    log q(z_i)       ~ logsumexp_j log q(z_i | x_j)              - log(N M)
    log prod q(z_id) ~ sum_d [logsumexp_j log q(z_id | x_j)       - log(N M)]

(:func:`tc_terms`). ``beta = 1`` is the plain VAE's ELBO (with a one-sample KL estimate).
The likelihood is a Gaussian on log-normalised expression with a per-gene sd.

Stage 2, the conditional WGAN-GP (Gulrajani et al. 2017, "Improved Training of Wasserstein
GANs", Algorithm 1), conditioned on the frozen VAE's posterior means ``z`` (MichiGAN, Yu & Welch
2021). With ``x~ = G(z, n)``, ``n ~ N(0, I)``, and ``x^ = e x + (1 - e) x~``, ``e ~ U[0, 1]``::

    critic loss    = mean D(x~, z) - mean D(x, z) + lambda mean (||grad_x^ D(x^, z)||_2 - 1)^2
    generator loss = -mean D(G(z, n), z)

(:func:`gradient_penalty`). Both are trained in one jitted step of the shared loop: the critic
loss's gradient reaches only the critic (``x~`` is a stopped gradient) and the generator loss's
only the generator (the critic's parameters are stopped), and :meth:`GANTask.optimizer` gives
each network its own Adam (``optax.multi_transform``). The critic is updated every step, the
generator every ``n_critic``-th step (Gulrajani et al.: ``n_critic = 5``): its loss is masked to
the other steps and its optimiser (``optax.MultiSteps``, summing) applies the one non-zero
gradient every ``n_critic`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..._validate import check_positive_int
from ...exceptions import ScatlasInputError
from ..data import CellBatches, digest
from ..train import TrainConfig, make_schedule
from ._module import TCVAE, ConditionalGAN

LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class MichiGANConfig:
    """Architecture and objectives of a :class:`~scatlas.models.michigan.MichiGAN`.

    VAE: ``n_genes`` inputs, ``latent_dim`` (D), ``hidden`` units in ``n_layers`` encoder and
    decoder blocks, ``beta`` (weight of the total correlation; 1: a plain VAE; 2 by default:
    on log-normalised expression, whose Gaussian likelihood can absorb variance into its
    per-gene sd, ``beta >= 3`` left two active latent dimensions on the synthetic perturbation
    data of ``bench/michigan.py``, and latent arithmetic failed), ``alpha`` (of the
    index-code mutual information) and ``gamma`` (of the dimension-wise KL), ``n_train`` (the
    dataset size ``N`` of the MWS estimate). GAN: ``noise_dim``, ``gen_hidden`` /
    ``gen_layers``, ``critic_hidden`` / ``critic_layers``, ``gp_weight`` (lambda, 10),
    ``n_critic`` (critic steps per generator step, 5), Adam ``adam_b1`` / ``adam_b2``
    (Gulrajani et al.: 0.5 / 0.9 on their toy data).
    """

    n_genes: int
    latent_dim: int = 10
    hidden: int = 256
    n_layers: int = 2
    beta: float = 2.0
    alpha: float = 1.0
    gamma: float = 1.0
    n_train: int = 1
    noise_dim: int = 10
    gen_hidden: int = 256
    gen_layers: int = 2
    critic_hidden: int = 256
    critic_layers: int = 2
    gp_weight: float = 10.0
    n_critic: int = 5
    adam_b1: float = 0.5
    adam_b2: float = 0.9

    def __post_init__(self) -> None:
        for name in ("n_genes", "latent_dim", "hidden", "n_layers", "n_train", "noise_dim",
                     "gen_hidden", "gen_layers", "critic_hidden", "critic_layers", "n_critic"):
            setattr(self, name, check_positive_int(getattr(self, name), name))
        for name in ("beta", "alpha", "gamma", "gp_weight"):
            value = float(getattr(self, name))
            if not (value >= 0 and math.isfinite(value)):
                raise ScatlasInputError(f"{name} must be >= 0, got {value!r}", param=name)
            setattr(self, name, value)
        for name in ("adam_b1", "adam_b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ScatlasInputError(f"{name} must be in [0, 1), got {getattr(self, name)!r}",
                                        param=name)

    def vae(self) -> TCVAE:
        return TCVAE(self.n_genes, self.latent_dim, self.hidden, self.n_layers)

    def gan(self) -> ConditionalGAN:
        return ConditionalGAN(self.n_genes, self.gen_hidden, self.gen_layers,
                              self.critic_hidden, self.critic_layers)


# ------------------------------------------------------------------------------ the estimators

def log_normal_density(x: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """Elementwise ``log N(x; mu, exp(logvar))`` (broadcasting)."""
    return -0.5 * (LOG_2PI + logvar + (x - mu) ** 2 * jnp.exp(-logvar))


def tc_terms(z: jax.Array, mu: jax.Array, logvar: jax.Array,
             dataset_size: int) -> dict[str, jax.Array]:
    """Per-cell log densities of the beta-TCVAE decomposition, each (B,) float32.

    ``z``, ``mu``, ``logvar``: (B, D) samples ``z_i ~ q(z|x_i)`` and the posteriors' parameters.
    Returns ``log_qz_x`` (``log q(z_i|x_i)``), ``log_qz`` and ``log_prod_qz`` (minibatch-weighted
    sampling estimates of ``log q(z_i)`` and ``sum_d log q(z_id)``, Chen et al. 2018 eq. S7,
    ``dataset_size`` = N) and ``log_pz`` (standard-normal prior).
    """
    B = z.shape[0]
    pair = log_normal_density(z[:, None, :], mu[None, :, :], logvar[None, :, :])  # (B, B, D)
    log_nm = math.log(float(dataset_size) * B)
    return {
        "log_qz_x": jnp.sum(log_normal_density(z, mu, logvar), axis=1),
        "log_qz": jax.nn.logsumexp(jnp.sum(pair, axis=2), axis=1) - log_nm,
        "log_prod_qz": jnp.sum(jax.nn.logsumexp(pair, axis=1) - log_nm, axis=1),
        "log_pz": jnp.sum(log_normal_density(z, 0.0, jnp.zeros_like(z)), axis=1),
    }


def total_correlation(z: jax.Array, mu: jax.Array, logvar: jax.Array,
                      dataset_size: int) -> jax.Array:
    """The MWS estimate of the total correlation ``KL(q(z) || prod_d q(z_d))`` of a batch
    (scalar): the mean of ``log q(z_i) - sum_d log q(z_id)`` (:func:`tc_terms`)."""
    t = tc_terms(z, mu, logvar, dataset_size)
    return jnp.mean(t["log_qz"] - t["log_prod_qz"])


def gradient_penalty(critic: Any, real: jax.Array, fake: jax.Array, eps: jax.Array) -> jax.Array:
    """WGAN-GP's penalty ``mean_i (||grad D(x^_i)||_2 - 1)^2`` (Gulrajani et al. 2017, eq. 3).

    ``critic``: (B, G) -> (B,) scores, each cell's score depending only on its own row (no
    batch statistics), so the gradient of their sum is every cell's own gradient. ``real``,
    ``fake``: (B, G); ``eps``: (B,) in [0, 1]; ``x^ = eps x + (1 - eps) x~``.
    """
    e = eps[:, None]
    x_hat = e * real + (1.0 - e) * fake
    grads = jax.grad(lambda h: jnp.sum(critic(h)))(x_hat)
    norms = jnp.sqrt(jnp.sum(grads**2, axis=1) + 1e-12)
    return jnp.mean((norms - 1.0) ** 2)


# ----------------------------------------------------------------------------------- the tasks

@dataclass
class VAETask:
    """The beta-TCVAE as a :class:`~scatlas.models.train.Task` (batches: ``x`` (B, G) float32
    log-normalised expression)."""

    config: MichiGANConfig

    def __post_init__(self) -> None:
        self.net = self.config.vae()

    def init(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        return self.net.init(rng, jnp.asarray(batch["x"], jnp.float32))

    def loss(self, params, state, batch, rng, step, train):
        c = self.config
        x = batch["x"].astype(jnp.float32)
        mu, logvar = self.net.apply({"params": params}, x, method=TCVAE.encode)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mu.shape)
        mean, log_sd = self.net.apply({"params": params}, z, method=TCVAE.decode)
        nll = -jnp.sum(log_normal_density(x, mean, 2.0 * log_sd), axis=1)
        t = tc_terms(z, mu, logvar, c.n_train)
        mi = t["log_qz_x"] - t["log_qz"]
        tc = t["log_qz"] - t["log_prod_qz"]
        dwkl = t["log_prod_qz"] - t["log_pz"]
        loss = jnp.mean(nll + c.alpha * mi + c.beta * tc + c.gamma * dwkl)
        kl = 0.5 * jnp.sum(jnp.exp(logvar) + mu**2 - 1.0 - logvar, axis=1)
        metrics = {"nll": jnp.mean(nll), "mi": jnp.mean(mi), "tc": jnp.mean(tc),
                   "dwkl": jnp.mean(dwkl), "kl_analytic": jnp.mean(kl)}
        return loss, (metrics, state)


@dataclass
class GANTask:
    """The conditional WGAN-GP as a :class:`~scatlas.models.train.Task` (batches: ``x`` (B, G)
    log-normalised expression and ``z`` (B, D) the frozen VAE's posterior means,
    :class:`ConditionedBatches`), with its own two-network optimiser (:meth:`optimizer`)."""

    config: MichiGANConfig

    def __post_init__(self) -> None:
        self.net = self.config.gan()

    def init(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        z = jnp.asarray(batch["z"], jnp.float32)
        noise = jnp.zeros((z.shape[0], self.config.noise_dim), jnp.float32)
        variables = self.net.init(rng, z, noise)
        return jax.tree_util.tree_map(jnp.asarray, variables)

    def optimizer(self, cfg: TrainConfig) -> optax.GradientTransformation:
        """Adam (``adam_b1``, ``adam_b2``; no weight decay, as WGAN-GP) for each network on the
        loop's learning-rate schedule (:func:`~scatlas.models.train.make_schedule`) after the
        loop's optional clipping; the generator's applies the summed gradients of every
        ``n_critic`` steps (its loss is zero on the others)."""
        c = self.config

        def adam() -> optax.GradientTransformation:
            parts = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
            return optax.chain(*parts, optax.adam(make_schedule(cfg), b1=c.adam_b1, b2=c.adam_b2))

        generator = optax.MultiSteps(adam(), every_k_schedule=c.n_critic, use_grad_mean=False)
        return optax.multi_transform(
            {"critic": adam(), "generator": generator},
            lambda params: {k: jax.tree_util.tree_map(lambda _, k=k: k, v)
                            for k, v in params.items()})

    def loss(self, params, state, batch, rng, step, train):
        c = self.config
        x = batch["x"].astype(jnp.float32)
        z = batch["z"].astype(jnp.float32)
        noise_rng, eps_rng = jax.random.split(rng)
        noise = jax.random.normal(noise_rng, (x.shape[0], c.noise_dim))
        eps = jax.random.uniform(eps_rng, (x.shape[0],))

        def critic(p: Any, h: jax.Array) -> jax.Array:
            return self.net.apply({"params": p}, h, z, method=ConditionalGAN.criticise)

        fake = self.net.apply({"params": params}, z, noise, method=ConditionalGAN.generate)
        d_real = critic(params, x)
        d_fake = critic(params, jax.lax.stop_gradient(fake))
        gp = gradient_penalty(lambda h: critic(params, h), x, jax.lax.stop_gradient(fake), eps)
        wasserstein = jnp.mean(d_real) - jnp.mean(d_fake)
        critic_loss = -wasserstein + c.gp_weight * gp
        generator_loss = -jnp.mean(critic(jax.lax.stop_gradient(params), fake))
        if train:
            on = (step % c.n_critic == c.n_critic - 1).astype(jnp.float32)
        else:
            on = jnp.float32(1.0)
        metrics = {"critic": critic_loss, "generator": generator_loss, "gp": gp,
                   "wasserstein": wasserstein}
        return critic_loss + on * generator_loss, (metrics, state)


class ConditionedBatches(CellBatches):
    """:class:`~scatlas.models.data.CellBatches` whose batches also carry ``z`` (B, D) float32,
    the rows of ``latent`` (n_cells, D) of the batch's cells (the GAN's conditions)."""

    def __init__(self, X: Any, latent: np.ndarray, **kwargs: Any):
        super().__init__(X, **kwargs)
        self.latent = np.ascontiguousarray(latent, dtype=np.float32)
        if self.latent.shape[0] != self.source.n_obs:
            raise ScatlasInputError(
                f"latent has {self.latent.shape[0]} rows for {self.source.n_obs} cells")

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        batch = super().take(index)
        batch["z"] = self.latent[np.asarray(index, dtype=np.int64)]
        return batch

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "latent": digest(self.latent)}
