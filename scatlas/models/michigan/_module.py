"""Flax modules of MichiGAN: the beta-TCVAE's encoder and decoder, the conditional WGAN-GP's
generator and critic.

MichiGAN (Yu & Welch 2021, Genome Biology 22:158) trains a disentangling VAE on single-cell
expression, then a GAN whose generator and critic are both conditioned on the VAE's posterior
means: the generator ``G(z, n)`` replaces the VAE's decoder (realistic samples) while ``z`` keeps
the VAE's disentangled meaning. The generator reads the code concatenated with its noise; the
critic reads it concatenated with the profile and through a projection term (Miyato & Koyama
2018), :class:`Critic`.

All modules take and return float32 arrays; ``B`` cells, ``G`` genes, ``D`` latent dimensions,
``N`` noise dimensions.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

#: posterior log-variances are clipped to this range (as the multimodal VAE's experts)
LOGVAR_MIN, LOGVAR_MAX = -10.0, 10.0


class MLP(nn.Module):
    """``n_layers`` blocks of ``Dense(hidden) -> [LayerNorm] -> activation``.

    ``norm``: LayerNorm after each Dense (the VAE and the generator; the WGAN-GP critic uses
    none, Gulrajani et al. 2017 sec. 4: the penalty is per sample, batch statistics break it).
    ``leaky``: leaky ReLU (slope 0.2, the critic) instead of ReLU.
    """

    hidden: int
    n_layers: int
    norm: bool = True
    leaky: bool = False

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        for _ in range(self.n_layers):
            h = nn.Dense(self.hidden)(h)
            if self.norm:
                h = nn.LayerNorm()(h)
            h = nn.leaky_relu(h, 0.2) if self.leaky else nn.relu(h)
        return h


class Encoder(nn.Module):
    """q(z | x): (B, G) log-normalised expression -> posterior mean and log-variance (B, D)."""

    latent_dim: int
    hidden: int
    n_layers: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = MLP(self.hidden, self.n_layers)(x)
        mu = nn.Dense(self.latent_dim, name="mean")(h)
        logvar = nn.Dense(self.latent_dim, name="logvar")(h)
        return mu, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


class Decoder(nn.Module):
    """p(x | z): (B, D) latent -> Gaussian mean (B, G) and per-gene log sd (G,) of the
    log-normalised expression."""

    n_genes: int
    hidden: int
    n_layers: int

    @nn.compact
    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = MLP(self.hidden, self.n_layers)(z)
        mean = nn.Dense(self.n_genes, name="mean")(h)
        log_sd = self.param("log_sd", nn.initializers.zeros, (self.n_genes,))
        return mean, log_sd


class TCVAE(nn.Module):
    """Encoder and decoder of the beta-TCVAE (Chen et al. 2018)."""

    n_genes: int
    latent_dim: int
    hidden: int
    n_layers: int

    def setup(self) -> None:
        self.encoder = Encoder(self.latent_dim, self.hidden, self.n_layers)
        self.decoder = Decoder(self.n_genes, self.hidden, self.n_layers)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encoder(x)

    def decode(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        mu, logvar = self.encode(x)
        mean, log_sd = self.decode(mu)
        return mu, logvar, mean, log_sd


class Generator(nn.Module):
    """G(z, n): (B, D) condition and (B, N) standard-normal noise -> (B, G) log-normalised
    profiles, ReLU output (expression is never negative; exact zeros are allowed, as dropouts)."""

    n_genes: int
    hidden: int
    n_layers: int

    @nn.compact
    def __call__(self, z: jax.Array, noise: jax.Array) -> jax.Array:
        h = MLP(self.hidden, self.n_layers)(jnp.concatenate([z, noise], axis=1))
        return nn.relu(nn.Dense(self.n_genes, name="out")(h))


class Critic(nn.Module):
    """D(x, z): (B, G) profiles and (B, D) condition -> (B,) Wasserstein critic scores.

    A projection critic (Miyato & Koyama 2018, for a continuous condition): features
    ``h = phi(x, z)`` of the profile concatenated with its condition, then
    ``D = w . h + <V z, h>``. The inner product makes the score depend on how the profile fits
    its code, so the generator cannot ignore the code (with concatenation alone the critic,
    and then the generator, can learn the marginal distribution only).
    """

    hidden: int
    n_layers: int

    @nn.compact
    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        h = MLP(self.hidden, self.n_layers, norm=False, leaky=True)(
            jnp.concatenate([x, z], axis=1))
        projection = jnp.sum(nn.Dense(self.hidden, use_bias=False, name="embed")(z) * h, axis=1)
        return nn.Dense(1, name="out")(h)[:, 0] + projection


class ConditionalGAN(nn.Module):
    """Generator and critic of the conditional WGAN-GP (parameters ``generator``, ``critic``)."""

    n_genes: int
    hidden: int
    n_layers: int
    critic_hidden: int
    critic_layers: int

    def setup(self) -> None:
        self.generator = Generator(self.n_genes, self.hidden, self.n_layers)
        self.critic = Critic(self.critic_hidden, self.critic_layers)

    def generate(self, z: jax.Array, noise: jax.Array) -> jax.Array:
        return self.generator(z, noise)

    def criticise(self, x: jax.Array, z: jax.Array) -> jax.Array:
        return self.critic(x, z)

    def __call__(self, z: jax.Array, noise: jax.Array) -> jax.Array:
        return self.critic(self.generator(z, noise), z)
