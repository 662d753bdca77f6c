"""The multimodal VAE's objective: per-modality log-likelihoods, the sub-sampled ELBO, the
alignment and contrastive penalties, and :class:`MVAETask` for :func:`scatlas.models.train.fit`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..._validate import ScatlasInputError
from ..mvae_likelihoods import (
    kl_standard_normal,
    log_bernoulli,
    log_log1p_normal,
    log_nb,
    log_nb_mixture,
    log_normal,
    product_of_experts,
)
from ._module import _PER_CELL, INPUT_PCA, MVAEConfig, MVAENet

# ----------------------------------------------------------------------------- the objective

def subset_patterns(n_modalities: int) -> np.ndarray:
    """(S, M) float32 fixed subsets of the sub-sampled ELBO: the joint, then each modality
    alone (just the joint for one modality)."""
    M = n_modalities
    rows = [np.ones(M)] + ([np.eye(M)[m] for m in range(M)] if M > 1 else [])
    return np.asarray(rows, np.float32)


def log_likelihood(
    likelihood: str, x: jax.Array, out: Mapping[str, jax.Array], log_lib: jax.Array,
    lib_mean: float,
) -> jax.Array:
    """Per-cell ``log p(x | z)`` (summed over features) given a head's outputs ``out`` and the
    observed log library ``log_lib`` (..., ) of broadcastable leading shape."""
    logits = out["logits"]
    if likelihood == "bernoulli":
        lp = log_bernoulli(x, logits + (log_lib - lib_mean)[..., None])
    elif likelihood == "log1p_normal":
        lp = log_log1p_normal(x, logits, out["log_sd"])
    else:
        log_mu = jax.nn.log_softmax(logits, axis=-1) + log_lib[..., None]
        if likelihood == "nb":
            lp = log_nb(x, log_mu, out["log_theta"])
        else:
            log_fore = log_mu + jnp.log1p(jax.nn.softplus(out["fore"]))
            lp = log_nb_mixture(x, log_mu, log_fore, out["log_theta"], out["mix"])
    return jnp.sum(lp, axis=-1)


def expected_value(
    likelihood: str, out: Mapping[str, jax.Array], log_lib: jax.Array, lib_mean: float
) -> jax.Array:
    """Mean of the likelihood: expected counts (NB, NB mixture, log1p-normal:
    ``exp(mean + sd^2 / 2) - 1``, no library) or probabilities (Bernoulli)."""
    logits = out["logits"]
    if likelihood == "bernoulli":
        return jax.nn.sigmoid(logits + (log_lib - lib_mean)[..., None])
    if likelihood == "log1p_normal":
        return jnp.expm1(logits + 0.5 * jnp.exp(2.0 * out["log_sd"]))
    mu = jax.nn.softmax(logits, axis=-1) * jnp.exp(log_lib)[..., None]
    if likelihood == "nb":
        return mu
    pi = jax.nn.sigmoid(out["mix"])
    return mu * (pi + (1 - pi) * (1 + jax.nn.softplus(out["fore"])))


def one_hot(cov: jax.Array, n_batches: int) -> jax.Array | None:
    return None if n_batches == 0 else jax.nn.one_hot(cov, n_batches, dtype=jnp.float32)


def negative_elbo(
    net: MVAENet,
    variables: Mapping[str, Any],
    batch: Mapping[str, jax.Array],
    eps: jax.Array,
    kl_weight: jax.Array | float,
    subsets: jax.Array,
    *,
    train: bool = False,
    rngs: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sub-sampled negative ELBO of a batch (see the module docstring).

    ``subsets``: (S, M) or (S, B, M) 0/1 subset patterns (intersected with each cell's observed
    modalities); ``eps``: (S, B, D) standard-normal noise of the reparameterisation. Returns the
    loss (mean over cells of the average over a cell's valid terms of ``-recon - lib +
    kl_weight * KL``) and ``aux``: ``terms`` (S, B), ``valid`` (S, B), ``recon`` (S, B, M)
    (log-likelihoods incl. the library term, unweighted), ``kl`` (S, B).
    """
    c = net.config
    M = len(c.modalities)
    xs = [batch[f"x{m}"].astype(jnp.float32) for m in range(M)]
    obs = jnp.stack([batch[f"m{m}"].astype(jnp.float32) for m in range(M)], axis=1)  # (B, M)
    libs = [jnp.sum(x, axis=1) for x in xs]
    log_libs = [jnp.log(jnp.maximum(lib, 1.0)) for lib in libs]
    mus, logvars = net.apply(variables, xs, libs, train, method=MVAENet.encode, rngs=rngs)
    sub = jnp.broadcast_to(subsets, (subsets.shape[0], obs.shape[0], M)) * obs[None]  # (S,B,M)
    valid = (jnp.sum(sub, axis=-1) > 0).astype(jnp.float32)
    mu, logvar = product_of_experts(mus[:, None], logvars[:, None], jnp.moveaxis(sub, -1, 0))
    z = mu + jnp.exp(0.5 * logvar) * eps
    S, B, D = z.shape
    cov = one_hot(batch["cov"], c.n_batches)
    cov = None if cov is None else jnp.tile(cov, (S, 1))
    outs = net.apply(variables, z.reshape(S * B, D), cov, method=MVAENet.decode)
    recon = []
    for m, out in enumerate(outs):
        out = {k: (v.reshape(S, B, *v.shape[1:]) if k in _PER_CELL else v)
               for k, v in out.items()}
        ll = log_likelihood(c.likelihoods[m], xs[m][None], out, log_libs[m][None],
                            c.log_lib_mean[m])
        std_lib = (log_libs[m] - c.log_lib_mean[m]) / c.log_lib_sd[m]
        lib_ll = log_normal(std_lib[None], out["lib"], out["lib_log_sd"])
        recon.append(ll + c.library_weight * lib_ll)
    recon = jnp.stack(recon, axis=-1)  # (S, B, M)
    weights = obs[None] if c.cross_reconstruction else sub
    kl = kl_standard_normal(mu, logvar)  # (S, B)
    terms = -jnp.sum(weights * recon, axis=-1) + kl_weight * kl
    per_cell = jnp.sum(valid * terms, axis=0) / jnp.maximum(jnp.sum(valid, axis=0), 1.0)
    align = alignment_penalty(mus, logvars, obs)
    contrast = (contrastive_penalty(mus, logvars, obs, c.contrastive_temperature)
                if c.contrastive_weight else jnp.zeros_like(align))
    loss = jnp.mean(per_cell + c.alignment_weight * align + c.contrastive_weight * contrast)
    return loss, {"terms": terms, "valid": valid, "recon": recon, "kl": kl, "align": align,
                  "contrast": contrast}


def alignment_penalty(mus: jax.Array, logvars: jax.Array, obs: jax.Array) -> jax.Array:
    """Per cell, the Jeffreys divergence ``KL(q_a || q_b) + KL(q_b || q_a)`` (summed over
    latent dimensions) between the one-modality posteriors ``q_m = expert_m x prior`` of every
    pair of observed modalities (MultiVI's ``modality_penalty="Jeffreys"``); (B,)."""
    M = mus.shape[0]
    one = jnp.eye(M, dtype=jnp.float32)[:, :, None]  # subset {m} for every m: (M, M, 1)
    mu, logvar = product_of_experts(mus[:, None], logvars[:, None], one)  # (M, B, D)
    var = jnp.exp(logvar)
    total = jnp.zeros(obs.shape[0])
    for a in range(M):
        for b in range(a + 1, M):
            d2 = (mu[a] - mu[b]) ** 2
            j = 0.5 * jnp.sum(var[a] / var[b] + var[b] / var[a] - 2.0
                              + d2 * (1.0 / var[a] + 1.0 / var[b]), axis=-1)
            total = total + obs[:, a] * obs[:, b] * j
    return total


def contrastive_penalty(
    mus: jax.Array, logvars: jax.Array, obs: jax.Array, temperature: float
) -> jax.Array:
    """Per cell (B,), the symmetric InfoNCE loss (CLIP; scCLIP) matching the one-modality
    posterior means of every pair of modalities across the cells of the batch that have both.

    For modalities ``a``, ``b`` with means ``u_i``, ``v_j`` (``q_m = expert_m x prior``) and
    squared distances ``d_ij = |u_i - v_j|^2`` among the paired cells ``P``: logits
    ``-d_ij / (temperature * dbar)``, ``dbar`` the mean of ``d`` over ``P x P`` (a constant to
    the gradient), and cell ``i``'s loss ``(lse_j - l_ii + lse_i' - l_ii) / 2`` (both
    directions). Scaling every latent leaves it unchanged, and shrinking the posteriors to the
    prior raises it to ``log |P|``: unlike the Jeffreys penalty it cannot be met by collapse.
    Cells outside ``P`` get 0.
    """
    M = mus.shape[0]
    one = jnp.eye(M, dtype=jnp.float32)[:, :, None]
    mu, _ = product_of_experts(mus[:, None], logvars[:, None], one)  # (M, B, D)
    total = jnp.zeros(obs.shape[0])
    for a in range(M):
        for b in range(a + 1, M):
            pair = obs[:, a] * obs[:, b]
            both = pair[:, None] * pair[None, :]
            d = jnp.sum((mu[a][:, None, :] - mu[b][None, :, :]) ** 2, axis=-1)  # (B, B)
            dbar = jax.lax.stop_gradient(jnp.sum(both * d) / jnp.maximum(jnp.sum(both), 1.0))
            logits = -d / (temperature * jnp.maximum(dbar, 1e-12))
            masked = jnp.where(both > 0, logits, -1e30)
            diag = jnp.diagonal(logits)
            ce = 0.5 * (jax.nn.logsumexp(masked, axis=1) + jax.nn.logsumexp(masked, axis=0)
                        - 2.0 * diag)
            total = total + pair * ce
    return total


@dataclass
class MVAETask:
    """The :class:`~scatlas.models.train.Task` of the multimodal VAE (no BatchNorm state)."""

    config: MVAEConfig
    #: the fixed PCA input layers of ``config.input_pcs``, by modality index
    #: (:func:`fit_expert_pca`); needed for every modality with ``input_pcs > 0``
    projections: Mapping[int, Mapping[str, np.ndarray]] | None = None
    patterns: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.net = self.config.net()
        self.patterns = subset_patterns(len(self.config.modalities))
        proj = dict(self.projections or {})
        for m, k in enumerate(self.config.input_pcs):
            if bool(k) != (m in proj):
                raise ScatlasInputError("input_pcs and the PCA projections go together")
            if k and np.shape(proj[m]["components"]) != (self.config.n_features[m], k):
                raise ScatlasInputError(
                    f"projection of modality {m} has shape {np.shape(proj[m]['components'])}, "
                    f"expected {(self.config.n_features[m], k)}")
        self.projections = proj

    def init(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        variables = jax.jit(self._init)(rng, {k: v for k, v in batch.items() if k != "index"})
        if self.projections:  # the fitted PCA input layers replace their zero placeholders
            variables = dict(variables)
            variables[INPUT_PCA] = {
                f"experts_{m}": {"pca_mean": jnp.asarray(p["mean"], jnp.float32),
                                 "pca_components": jnp.asarray(p["components"], jnp.float32)}
                for m, p in self.projections.items()}
        return variables

    def _init(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        M = len(self.config.modalities)
        xs = [batch[f"x{m}"] for m in range(M)]
        libs = [jnp.sum(x, axis=1) for x in xs]
        cov = one_hot(batch["cov"], self.config.n_batches)
        return self.net.init({"params": rng, "dropout": rng}, xs, libs, cov, False)

    def kl_weight(self, step: jax.Array) -> jax.Array:
        n = self.config.kl_warmup_steps
        if n <= 0:
            return jnp.float32(1.0)
        return jnp.minimum(1.0, (step.astype(jnp.float32) + 1.0) / n)

    def loss(self, params, state, batch, rng, step, train):
        c = self.config
        M = len(c.modalities)
        noise_rng, subset_rng, drop_rng = jax.random.split(rng, 3)
        B = batch["m0"].shape[0]
        subsets = jnp.broadcast_to(jnp.asarray(self.patterns)[:, None], (len(self.patterns), B, M))
        if M > 2 and c.n_random_subsets > 0:
            rand = jax.random.bernoulli(subset_rng, 0.5, (c.n_random_subsets, B, M))
            subsets = jnp.concatenate([subsets, rand.astype(jnp.float32)])
        eps = jax.random.normal(noise_rng, (subsets.shape[0], B, c.latent_dim))
        kl_weight = self.kl_weight(step) if train else jnp.float32(1.0)
        loss, aux = negative_elbo(
            self.net, {"params": params, **state}, batch, eps, kl_weight, subsets, train=train,
            rngs={"dropout": drop_rng} if train else None,
        )
        obs = jnp.stack([batch[f"m{m}"] for m in range(M)], axis=1)
        metrics = {"kl": jnp.mean(aux["kl"][0]), "kl_weight": kl_weight,
                   "align": jnp.mean(aux["align"]), "contrast": jnp.mean(aux["contrast"])}
        for m, name in enumerate(c.modalities):
            n_obs = jnp.maximum(jnp.sum(obs[:, m]), 1.0)
            metrics[f"nll_{name}"] = -jnp.sum(aux["recon"][0, :, m] * obs[:, m]) / n_obs
        return loss, (metrics, state)

