"""Multimodal VAE with a product-of-experts posterior (MVAE), in Flax, trained by :mod:`.train`.

Model (Wu & Goodman 2018, MVAE; likelihoods as totalVI / MultiVI / PeakVI): a shared latent
``z ~ N(0, I)`` of ``latent_dim`` dimensions generates every modality ``m`` independently:

- counts (``"nb"``): ``x_mf ~ NB(l_m softmax(f_m(z, s))_f, theta_mf)`` with the observed total
  ``l_m`` as library size (log library as offset) and a per-feature inverse dispersion;
- protein (``"nb_mixture"``, optional): totalVI's background/foreground mixture with a shared
  theta, ``mu_back = l softmax(b(z, s))``, ``mu_fore = mu_back (1 + softplus(a(z, s)))``, mixing
  ``sigmoid(pi(z, s))`` on the background;
- counts on the ``log1p`` scale (``"log1p_normal"``, optional): ``log1p(x_mf) ~ N(f_m(z, s)_f,
  sigma_mf^2)``, a per-feature sd; no library offset (the decoder predicts the values, as a
  regression of ``log1p`` counts does);
- accessibility (``"bernoulli"``): ``x_mf ~ Bernoulli(sigmoid(f_m(z, s)_f + log l_m - c_m))``
  on binarised data, ``c_m`` the mean training log depth (PeakVI's depth factor as an offset);
- the log library itself, standardised, ``~ N(g_m(z, s), sigma_m^2)`` (so that imputation can
  predict a missing modality's depth); ``s`` is the optional one-hot batch covariate (decoders
  only, so the latent is pushed to be batch-free).

Inference: one encoder ("expert") per modality gives ``N(mu_m, exp(logvar_m))``; the posterior
of any subset ``S`` of observed modalities is the product of the experts in ``S`` and the prior
expert (:func:`~.mvae_likelihoods.product_of_experts`); a missing modality's expert is masked
per cell, so any non-empty subset embeds a cell. Encoder input: ``log1p(1e4 x / l)`` (counts) or
the 0/1 data, plus the standardised log library; ``Dense -> LayerNorm -> ReLU -> Dropout`` blocks.

Training: the sub-sampled ELBO (MVAE): per cell the average of the ELBO terms of the joint
posterior, of every single modality's posterior and, beyond two modalities, of
``n_random_subsets`` random subsets per step, each term reconstructing every *observed*
modality of the cell (``cross_reconstruction=True``, a valid ELBO of all observed data with a
restricted posterior; it trains the one-modality posteriors to predict the others, as scMM's
cross-decoding; ``False``: each term reconstructs its own subset, the original MVAE); terms whose
subset has no observed modality are dropped. The KL weight rises linearly from 0 to 1 over
``kl_warmup_steps`` (validation uses weight 1). Added to the negative ELBO, outside the warm-up
(as MultiVI): ``alignment_weight`` x the Jeffreys divergence between the one-modality posteriors
of every pair of modalities a cell has (MultiVI's ``modality_penalty="Jeffreys"``), which pulls
the RNA-only and protein-only latents of a cell together, and ``contrastive_weight`` x a
symmetric InfoNCE loss (CLIP, scCLIP) between the one-modality posterior means of the paired
cells of a batch (:func:`contrastive_penalty`; scale-free, so it cannot be met by collapsing the
posteriors to the prior, which the Jeffreys term can).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._validate import ScatlasInputError, check_positive_int
from .io import SavedModel, write_model
from .mvae_data import (
    Modality,
    batch_codes,
    locate,
    modality_arrays,
    read_modalities,
)
from .mvae_likelihoods import (
    LIKELIHOODS,
    LOGVAR_MAX,
    LOGVAR_MIN,
    kl_standard_normal,
    log_bernoulli,
    log_log1p_normal,
    log_nb,
    log_nb_mixture,
    log_normal,
    product_of_experts,
)

log = logging.getLogger(__name__)

INPUT_SCALE = 1e4  # encoder input: log1p(1e4 * x / total), as scanpy / scVI users normalise
_PER_CELL = ("logits", "fore", "mix", "lib")  # head outputs with a leading cell axis


# --------------------------------------------------------------------------------------- config

@dataclass
class MVAEConfig:
    """Architecture and objective of a :class:`MultimodalVAE`.

    ``modalities``/``likelihoods``/``n_features``: per modality, in order; ``log_lib_mean`` /
    ``log_lib_sd``: per-modality mean and sd of the training log totals (standardise the
    library input and model; the Bernoulli depth offset). ``n_batches``: categories of the batch
    covariate (0: none). Sizes: ``latent_dim`` (totalVI: 20), ``hidden`` units, ``n_layers``
    encoder and ``decoder_layers`` decoder blocks, ``dropout`` (encoders). Objective:
    ``kl_warmup_steps``, ``n_random_subsets`` (per step, beyond two modalities),
    ``cross_reconstruction``, ``library_weight`` (of the log-library term),
    ``alignment_weight`` (of the Jeffreys divergence between one-modality posteriors of paired
    cells, :func:`alignment_penalty`; 0: off; on shallow data a large weight collapses the
    posterior to the prior), ``contrastive_weight`` / ``contrastive_temperature`` (of the
    InfoNCE matching term, :func:`contrastive_penalty`; 0: off); ``library_input`` (the
    standardised log library is an encoder input); ``input_pcs`` (per modality, 0: the expert
    reads the features; ``k > 0``: it reads the ``k`` principal-component scores of its usual
    input, a fixed centred linear map fitted on the training cells and kept in the variables
    collection ``INPUT_PCA``, :func:`fit_expert_pca`; () means 0 for every modality).
    :func:`scatlas.tl.train_mvae` has its own defaults for some of these (``DEFAULT_MODEL``
    there).
    """

    modalities: tuple[str, ...]
    likelihoods: tuple[str, ...]
    n_features: tuple[int, ...]
    log_lib_mean: tuple[float, ...] = ()
    log_lib_sd: tuple[float, ...] = ()
    n_batches: int = 0
    latent_dim: int = 20
    hidden: int = 128
    n_layers: int = 1
    decoder_layers: int = 1
    dropout: float = 0.1
    kl_warmup_steps: int = 0
    n_random_subsets: int = 1
    cross_reconstruction: bool = True
    library_weight: float = 1.0
    library_input: bool = True
    alignment_weight: float = 0.0
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    input_pcs: tuple[int, ...] = ()
    bf16: bool = False

    def __post_init__(self) -> None:
        self.modalities = tuple(str(m) for m in self.modalities)
        self.likelihoods = tuple(str(x) for x in self.likelihoods)
        self.n_features = tuple(int(f) for f in self.n_features)
        M = len(self.modalities)
        if M == 0:
            raise ScatlasInputError("a multimodal VAE needs at least one modality")
        if len(set(self.modalities)) != M:
            raise ScatlasInputError(f"duplicate modality names in {self.modalities}")
        if len(self.likelihoods) != M or len(self.n_features) != M:
            raise ScatlasInputError("modalities, likelihoods and n_features differ in length")
        for lik in self.likelihoods:
            if lik not in LIKELIHOODS:
                raise ScatlasInputError(f"likelihood {lik!r} is not one of {LIKELIHOODS}")
        self.log_lib_mean = tuple(float(v) for v in self.log_lib_mean) or (0.0,) * M
        self.log_lib_sd = tuple(float(v) for v in self.log_lib_sd) or (1.0,) * M
        if len(self.log_lib_mean) != M or len(self.log_lib_sd) != M:
            raise ScatlasInputError("log_lib_mean / log_lib_sd need one value per modality")
        for f in self.n_features:
            check_positive_int(f, "n_features")
        self.input_pcs = tuple(int(k) for k in self.input_pcs) or (0,) * M
        if len(self.input_pcs) != M:
            raise ScatlasInputError("input_pcs needs one value per modality (0: none)")
        for k, f in zip(self.input_pcs, self.n_features, strict=True):
            if not 0 <= k <= f:
                raise ScatlasInputError(f"input_pcs must be in [0, n_features], got {k} of {f}")
        for name in ("latent_dim", "hidden", "n_layers", "decoder_layers"):
            check_positive_int(getattr(self, name), name)
        if self.n_batches < 0:
            raise ScatlasInputError(f"n_batches must be >= 0, got {self.n_batches}")
        if self.kl_warmup_steps < 0 or self.n_random_subsets < 0:
            raise ScatlasInputError("kl_warmup_steps and n_random_subsets must be >= 0")
        if self.alignment_weight < 0 or self.contrastive_weight < 0:
            raise ScatlasInputError("alignment_weight and contrastive_weight must be >= 0")
        if not self.contrastive_temperature > 0:
            raise ScatlasInputError(
                f"contrastive_temperature must be > 0, got {self.contrastive_temperature!r}"
            )
        if not 0 <= self.dropout < 1:
            raise ScatlasInputError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def net(self) -> MVAENet:
        return MVAENet(self)

    @property
    def dtype(self) -> Any:
        return jnp.bfloat16 if self.bf16 else jnp.float32


# ------------------------------------------------------------------------------------- network

class _Blocks(nn.Module):
    """``n`` blocks of ``Dense -> LayerNorm -> ReLU (-> Dropout)``."""

    hidden: int
    n: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array, train: bool) -> jax.Array:
        for _ in range(self.n):
            h = nn.Dense(self.hidden, dtype=self.dtype)(h)
            h = nn.LayerNorm(dtype=self.dtype)(h)
            h = nn.relu(h)
            if self.dropout > 0:
                h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return h


#: the variables collection holding the experts' fixed PCA input layers (``input_pcs``)
INPUT_PCA = "input_pca"


def expert_input(likelihood: str, x: Any, lib: Any) -> Any:
    """An expert's input before the network: the 0/1 data (Bernoulli) or
    ``log1p(INPUT_SCALE x / lib)`` (``lib`` the cells' totals, at least 1); numpy or jax."""
    if likelihood == "bernoulli":
        return x
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.log1p(x * (INPUT_SCALE / lib)[:, None])


#: at most this many (evenly spaced) training cells fit an expert's PCA input layer
PCA_CELLS = 20_000


def fit_expert_pca(mod: Modality, rows: np.ndarray, n_components: int, seed: int = 0,
                   max_cells: int = PCA_CELLS) -> dict[str, np.ndarray]:
    """The fixed PCA input layer of an expert (``MVAEConfig.input_pcs``): sklearn's ``PCA``
    (centred, ``random_state=seed``) of :func:`expert_input` of the modality's observed cells
    among ``rows`` (sorted; every ``ceil(n / max_cells)``-th of them, as the metric encoder's
    input PCA). Returns ``{"mean": (F,), "components": (F, k)}`` float32,
    ``k = min(n_components, n_cells - 1, F)``; an expert reads ``(input - mean) @ components``."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    n_components = check_positive_int(n_components, "input_pcs")
    rows = np.sort(rows[mod.observed[rows]])
    rows = rows[::max(1, -(-rows.size // check_positive_int(max_cells, "max_cells")))]
    X = mod.matrix[rows]
    X = np.asarray(X.toarray() if sp.issparse(X) else X, np.float64)
    k = min(n_components, X.shape[0] - 1, X.shape[1])
    if k < 1:
        raise ScatlasInputError(
            f"input_pcs of modality {mod.name!r} needs at least 2 training cells with it")
    lib = np.maximum(X.sum(axis=1), 1.0)
    pca = PCA(k, random_state=seed).fit(expert_input(mod.likelihood, X, lib))
    return {"mean": pca.mean_.astype(np.float32),
            "components": np.ascontiguousarray(pca.components_.T, dtype=np.float32)}


class Expert(nn.Module):
    """Encoder of one modality: (B, F) data and (B,) library -> Gaussian (mu, logvar) (B, D)."""

    likelihood: str
    hidden: int
    n_layers: int
    latent: int
    dropout: float
    lib_mean: float
    lib_sd: float
    library_input: bool
    dtype: Any
    input_pcs: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, lib: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        safe = jnp.maximum(lib, 1.0)
        h = expert_input(self.likelihood, x, safe)
        if self.input_pcs:  # the fixed PCA input layer (not a parameter: the optimiser skips it)
            F = x.shape[1]
            centre = self.variable(INPUT_PCA, "pca_mean", jnp.zeros, (F,), jnp.float32)
            comp = self.variable(INPUT_PCA, "pca_components", jnp.zeros, (F, self.input_pcs),
                                 jnp.float32)
            h = (h - centre.value) @ comp.value
        if self.library_input:
            std_lib = (jnp.log(safe) - self.lib_mean) / self.lib_sd
            h = jnp.concatenate([h, std_lib[:, None]], axis=1)
        h = h.astype(self.dtype)
        h = _Blocks(self.hidden, self.n_layers, self.dropout, self.dtype)(h, train)
        mu = nn.Dense(self.latent, dtype=self.dtype, name="mean")(h).astype(jnp.float32)
        logvar = nn.Dense(self.latent, dtype=self.dtype, name="logvar")(h).astype(jnp.float32)
        return mu, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


class Head(nn.Module):
    """Decoder of one modality: (N, D) latent and (N, K) covariate -> likelihood parameters.

    Returns a dict of (N, F) float32 arrays: ``logits`` (NB: log of the rate fractions before
    the softmax; Bernoulli: logits before the depth offset; NB mixture: background;
    log1p-normal: the mean of ``log1p x``), ``fore`` and ``mix`` (NB mixture), and ``lib`` (N,)
    the predicted standardised log library; the per-feature ``log_theta`` (F,) (NB, NB
    mixture) or ``log_sd`` (F,) (log1p-normal) and ``lib_log_sd`` () are params.
    """

    likelihood: str
    n_features: int
    hidden: int
    n_layers: int
    dtype: Any

    @nn.compact
    def __call__(self, z: jax.Array, cov: jax.Array | None) -> dict[str, jax.Array]:
        h = z if cov is None else jnp.concatenate([z, cov], axis=1)
        h = _Blocks(self.hidden, self.n_layers, 0.0, self.dtype)(h.astype(self.dtype), False)
        out = {"logits": nn.Dense(self.n_features, dtype=self.dtype, name="rate")(h)}
        if self.likelihood == "nb_mixture":
            out["fore"] = nn.Dense(self.n_features, dtype=self.dtype, name="fore")(h)
            out["mix"] = nn.Dense(self.n_features, dtype=self.dtype, name="mix")(h)
        out["lib"] = nn.Dense(1, dtype=self.dtype, name="library")(h)[:, 0]
        out = {k: v.astype(jnp.float32) for k, v in out.items()}
        if self.likelihood == "log1p_normal":
            out["log_sd"] = self.param("log_sd", nn.initializers.zeros, (self.n_features,))
        elif self.likelihood != "bernoulli":
            out["log_theta"] = self.param("log_theta", nn.initializers.zeros, (self.n_features,))
        out["lib_log_sd"] = self.param("lib_log_sd", nn.initializers.zeros, ())
        return out


class MVAENet(nn.Module):
    """All experts and heads of a :class:`MVAEConfig`."""

    config: MVAEConfig

    def setup(self) -> None:
        c = self.config
        self.experts = [
            Expert(lik, c.hidden, c.n_layers, c.latent_dim, c.dropout, mean, sd, c.library_input,
                   c.dtype, k)
            for lik, mean, sd, k in zip(c.likelihoods, c.log_lib_mean, c.log_lib_sd,
                                        c.input_pcs, strict=True)
        ]
        self.heads = [
            Head(lik, f, c.hidden, c.decoder_layers, c.dtype)
            for lik, f in zip(c.likelihoods, c.n_features, strict=True)
        ]

    def encode(
        self, xs: Sequence[jax.Array], libs: Sequence[jax.Array], train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """Experts' ``(mus, logvars)``, each (M, B, D)."""
        outs = [e(x, lib, train) for e, x, lib in zip(self.experts, xs, libs, strict=True)]
        return jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])

    def decode(self, z: jax.Array, cov: jax.Array | None) -> list[dict[str, jax.Array]]:
        """Every head's likelihood parameters for latent ``z`` (N, D)."""
        return [h(z, cov) for h in self.heads]

    def __call__(self, xs, libs, cov, train: bool = False):
        mus, logvars = self.encode(xs, libs, train)
        return mus, logvars, self.decode(mus[0], cov)


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


# ---------------------------------------------------------------------------------------- model

class MultimodalVAE:
    """A trained multimodal VAE: config, weights, per-modality features and locations.

    Build one with :func:`scatlas.tl.train_mvae`; :meth:`embed` cells from any subset of their
    modalities, :meth:`impute` a modality from others, :meth:`save` /
    :func:`scatlas.models.load`.
    """

    kind = "mvae"

    def __init__(
        self,
        config: MVAEConfig,
        variables: Mapping[str, Any],
        features: Mapping[str, Sequence[str]],
        *,
        locations: Mapping[str, str] | None = None,
        batch_key: str | None = None,
        batch_names: Sequence[str] = (),
        info: dict[str, Any] | None = None,
    ):
        self.config = config
        self.variables = dict(variables)
        self.features = {m: pd.Index([str(f) for f in features[m]]) for m in config.modalities}
        for m, f in zip(config.modalities, config.n_features, strict=True):
            if len(self.features[m]) != f:
                raise ScatlasInputError(
                    f"{len(self.features[m])} features given for modality {m!r} of {f} inputs"
                )
        self.locations = dict(locations or {})
        self.batch_key = batch_key
        self.batch_names = list(batch_names)
        self.info = dict(info or {})
        if (INPUT_PCA in self.variables) != any(config.input_pcs):
            raise ScatlasInputError(
                f"a model with input_pcs={config.input_pcs} needs variables[{INPUT_PCA!r}] "
                "exactly when some modality's input_pcs is > 0")
        self._net = config.net()
        self._device_variables = jax.device_put(self.variables)
        self._encode = jax.jit(self._encode_impl)
        self._decode = jax.jit(self._decode_impl, static_argnums=(2, 5))

    # -- properties ------------------------------------------------------------------------

    @property
    def modalities(self) -> list[str]:
        return list(self.config.modalities)

    @property
    def likelihoods(self) -> dict[str, str]:
        return dict(zip(self.config.modalities, self.config.likelihoods, strict=True))

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def input_kind(self) -> str:
        """``"counts"``: every modality is read as raw counts (or 0/1 for Bernoulli ones)."""
        return "counts"

    @property
    def loss_terms(self) -> dict[str, float | None]:
        """The training log's loss terms and their weights (the KL's rises over the warm-up:
        None), for :func:`~.train.plot_history`."""
        c = self.config
        return {**{f"nll_{m}": 1.0 for m in c.modalities}, "kl": None,
                "align": float(c.alignment_weight), "contrast": float(c.contrastive_weight)}

    @property
    def genes(self) -> pd.Index:
        """The first modality's features (the saved folder's ``genes.txt``)."""
        return self.features[self.config.modalities[0]]

    def __repr__(self) -> str:
        c = self.config
        mods = ", ".join(f"{m}: {f} {lik}" for m, f, lik in
                         zip(c.modalities, c.n_features, c.likelihoods, strict=True))
        return (f"MultimodalVAE({mods} -> {c.latent_dim}-d latent, hidden {c.hidden}, "
                f"{c.n_batches} batches)")

    # -- jitted pieces ----------------------------------------------------------------------

    def _encode_impl(self, variables, xs, masks):
        libs = [jnp.sum(x, axis=1) for x in xs]
        mus, logvars = self._net.apply(variables, xs, libs, False, method=MVAENet.encode)
        return product_of_experts(mus, logvars, masks)

    def _decode_impl(self, variables, z, m, cov, log_lib, log_scale):
        c = self.config
        outs = self._net.apply(variables, z, one_hot(cov, c.n_batches), method=MVAENet.decode)
        out = outs[m]
        if log_lib is None:  # the model's predicted log library
            log_lib = out["lib"] * c.log_lib_sd[m] + c.log_lib_mean[m]
            if not log_scale:  # the mean of its lognormal (log scale: its mean, the median)
                sd = jnp.exp(out["lib_log_sd"]) * c.log_lib_sd[m]
                log_lib = log_lib + 0.5 * sd**2
        if log_scale and c.likelihoods[m] == "log1p_normal":
            return out["logits"]  # the mean of log1p x itself
        mean = expected_value(c.likelihoods[m], out, log_lib, c.log_lib_mean[m])
        return jnp.log1p(mean) if log_scale else mean

    # -- data ------------------------------------------------------------------------------

    def _resolve(self, data: Any, modalities: Any, *, present_only: bool) -> dict[str, Any]:
        """name -> location of the modalities to read (None: all whose location resolves)."""
        if isinstance(modalities, Mapping):
            chosen = dict(modalities)
        elif modalities is None:
            chosen = {m: self.locations.get(m, m) for m in self.config.modalities}
            if present_only:
                chosen = {m: loc for m, loc in chosen.items() if _resolves(data, m, loc)}
                if not chosen:
                    raise ScatlasInputError(
                        f"none of the model's modalities {self.locations} is in the data; pass "
                        "modalities= to say which to read (in Python also where: name -> "
                        "location)",
                        param="modalities")
        else:
            names = [modalities] if isinstance(modalities, str) else list(modalities)
            chosen = {m: self.locations.get(m, m) for m in names}
        unknown = set(chosen) - set(self.config.modalities)
        if unknown:
            raise ScatlasInputError(
                f"modalities {sorted(unknown)} are not in the model ({self.modalities})"
            )
        if not chosen:
            raise ScatlasInputError("no modalities selected")
        return chosen

    def _read(self, data: Any, chosen: Mapping[str, Any], masks: Any, min_overlap: float):
        mods = read_modalities(
            data, chosen, self.likelihoods, features=self.features, masks=masks,
            min_overlap=min_overlap,
        )
        return {mod.name: mod for mod in mods}

    def _posterior(self, mods: Mapping[str, Modality], batch_size: int, progress: bool | None):
        """(n, D) posterior means and log-variances of the PoE of ``mods`` (other experts off)."""
        from .._progress import track

        c = self.config
        n = len(next(iter(mods.values())).observed)
        order = [mods.get(m) for m in c.modalities]
        means, logvars = [], []
        starts = range(0, n, batch_size)
        for start in track(starts, desc="encoding", progress=progress):
            idx = np.arange(start, min(start + batch_size, n))
            size = batch_size if n > batch_size else n
            xs, masks = [], []
            for m, mod in enumerate(order):
                if mod is None:
                    xs.append(np.zeros((size, c.n_features[m]), np.float32))
                    masks.append(np.zeros(size, np.float32))
                    continue
                arr = modality_arrays([mod], idx)
                xs.append(_pad(arr["x0"], size))
                masks.append(_pad(arr["m0"], size))
            mu, lv = self._encode(self._device_variables, xs, jnp.asarray(np.stack(masks)))
            means.append(np.asarray(mu)[: idx.size])
            logvars.append(np.asarray(lv)[: idx.size])
        return np.concatenate(means), np.concatenate(logvars)

    # -- public API --------------------------------------------------------------------------

    def embed(
        self,
        data: Any,
        modalities: Any = None,
        *,
        masks: Mapping[str, Any] | None = None,
        batch_size: int = 4096,
        min_overlap: float = 0.5,
        return_logvar: bool = False,
        progress: bool | None = None,
        layer: str | None = None,
        input: str | None = None,
        use_raw: bool | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Posterior mean (n_cells, latent_dim) float32 of the product of the chosen experts.

        ``modalities``: None (every model modality whose location is in ``data``), names (read
        at the training locations), or ``{name: location}``. Each cell uses the chosen
        modalities it has (missing ones masked); a cell with none of them is an error. Features
        are aligned by name to the model's (zero fill, ``min_overlap`` enforced). ``layer``,
        ``input`` and ``use_raw`` exist for :func:`scatlas.tl.embed`: the model reads raw counts
        (``input_kind``) at its modalities' locations, so only None (or ``input="counts"``) is
        accepted. ``return_logvar``: also the log-variances.
        """
        if input not in (None, "counts"):
            raise ScatlasInputError(
                f"a multimodal VAE reads raw counts (its likelihoods model counts), not "
                f"input={input!r}; give the raw counts at the modalities' locations "
                f"({self.locations or 'X'}), or pass modalities= to say which to read",
                param="input")
        if layer is not None or use_raw:
            raise ScatlasInputError(
                "a multimodal VAE reads its modalities at their locations "
                f"({self.locations or 'X'}); pass modalities= to say which to read instead of "
                "layer= / use_raw=", param="layer")
        batch_size = check_positive_int(batch_size, "batch_size")
        chosen = self._resolve(data, modalities, present_only=True)
        mods = self._read(data, chosen, masks, min_overlap)
        mu, logvar = self._posterior(mods, batch_size, progress)
        mu = mu.astype(np.float32, copy=False)
        return (mu, logvar.astype(np.float32, copy=False)) if return_logvar else mu

    def impute(
        self,
        data: Any,
        source: Any = None,
        target: str | None = None,
        *,
        library: str | float = "predicted",
        batch: str | None = None,
        masks: Mapping[str, Any] | None = None,
        n_samples: int = 0,
        scale: str = "counts",
        seed: int = 0,
        batch_size: int = 4096,
        min_overlap: float = 0.5,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Expected ``target`` values (n_cells, n_target_features) float32 from ``source``.

        The latent is the posterior mean of the ``source`` experts' product (``source`` as
        ``modalities`` in :meth:`embed`; None: every model modality present except the target).
        Values: expected counts for NB / NB-mixture / log1p-normal targets, probabilities for
        Bernoulli. ``library``: ``"predicted"`` (the model's log-library mean for the latent),
        ``"observed"`` (the target's observed totals; every cell must have the target) or a
        number (a fixed total, e.g. 1e4 for normalised values); a log1p-normal target has no
        library (its decoder predicts the values), so only ``"predicted"`` is accepted there.
        ``batch``: the batch category to decode in (default: the cells' ``obs[batch_key]`` when
        present, else the first).
        ``n_samples``: 0 decodes the posterior mean; ``k > 0`` averages the decoded means of
        ``k`` posterior samples (Monte Carlo posterior predictive mean; ``seed`` fixes them).
        ``scale``: ``"counts"`` (the values above) or ``"log1p"``: ``log1p`` of them, the library
        taken at its predicted log-scale mean (the median of its lognormal, not the mean), and
        with ``n_samples=k`` the average over posterior samples taken on that scale,
        ``E_q(z|source)[log1p E[x | z]]``: the estimate of the log-scale values under posterior
        uncertainty in ``z`` (what a log-scale comparison such as the Pearson correlation of
        ``log1p`` counts scores; averaging counts and then taking the log favours the samples
        with the largest values). A log1p-normal target's ``"log1p"`` values are its decoded
        means of ``log1p x`` (the counts scale: ``exp(mean + sd^2 / 2) - 1``).
        """
        c = self.config
        if target not in c.modalities:
            raise ScatlasInputError(f"target must be one of {self.modalities}, got {target!r}")
        m = c.modalities.index(target)
        if source is None:
            chosen = self._resolve(data, None, present_only=True)
            chosen.pop(target, None)
            if not chosen:
                raise ScatlasInputError(f"no source modality other than {target!r} in the data")
        else:
            chosen = self._resolve(data, source, present_only=False)
        batch_size = check_positive_int(batch_size, "batch_size")
        if int(n_samples) < 0:
            raise ScatlasInputError(f"n_samples must be >= 0, got {n_samples!r}")
        if scale not in ("counts", "log1p"):
            raise ScatlasInputError(f"scale must be 'counts' or 'log1p', got {scale!r}")
        if scale == "log1p" and c.likelihoods[m] == "bernoulli":
            raise ScatlasInputError(f"scale='log1p' needs a count target; {target!r} is bernoulli")
        if c.likelihoods[m] == "log1p_normal" and not (isinstance(library, str)
                                                      and library == "predicted"):
            raise ScatlasInputError(
                f"{target!r} has the log1p_normal likelihood, which has no library: only "
                f"library='predicted' applies, got {library!r}", param="library")
        log_scale = scale == "log1p"
        mods = self._read(data, chosen, masks, min_overlap)
        z, z_logvar = self._posterior(mods, batch_size, progress)
        n = z.shape[0]
        cov = self._covariate(data, batch, n)
        if isinstance(library, str):
            if library == "predicted":
                log_lib = None
            elif library == "observed":
                tmod = self._read(data, {target: self.locations.get(target, target)}, masks,
                                  min_overlap)[target]
                if not tmod.observed.all():
                    raise ScatlasInputError(
                        f"library='observed' needs {target!r} in every cell; "
                        f"{int((~tmod.observed).sum())} lack it"
                    )
                log_lib = np.log(np.asarray(tmod.matrix.sum(axis=1)).ravel())
            else:
                raise ScatlasInputError(
                    f"library must be 'predicted', 'observed' or a number, got {library!r}"
                )
        else:
            if not library > 0:
                raise ScatlasInputError(f"library must be > 0, got {library!r}")
            log_lib = np.full(n, np.log(float(library)))
        rng = np.random.default_rng(seed)
        out = []
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            size = batch_size if n > batch_size else n
            ll = None if log_lib is None else jnp.asarray(_pad(log_lib[sl].astype(np.float32),
                                                               size))
            cv = _pad(cov[sl], size)
            if n_samples == 0:
                vals = np.asarray(self._decode(self._device_variables, _pad(z[sl], size), m,
                                               cv, ll, log_scale))
            else:  # Monte Carlo mean over q(z | source) of E[x | z] (or of its log1p)
                sd = np.exp(0.5 * z_logvar[sl])
                vals = 0.0
                for _ in range(int(n_samples)):
                    zs = z[sl] + sd * rng.standard_normal(sd.shape).astype(np.float32)
                    vals = vals + np.asarray(self._decode(self._device_variables,
                                                          _pad(zs, size), m, cv, ll, log_scale))
                vals = vals / int(n_samples)
            out.append(vals[: sl.stop - sl.start])
        return np.concatenate(out).astype(np.float32, copy=False)

    def _covariate(self, data: Any, batch: str | None, n: int) -> np.ndarray:
        if self.config.n_batches == 0:
            return np.zeros(n, np.int32)
        if batch is not None:
            if batch not in self.batch_names:
                raise ScatlasInputError(f"batch {batch!r} is not one of {self.batch_names}")
            return np.full(n, self.batch_names.index(batch), np.int32)
        obs = getattr(data, "obs", None)
        if self.batch_key is not None and obs is not None and self.batch_key in obs:
            return batch_codes(data, self.batch_key, self.batch_names)[0]
        log.warning("no batch given and no obs[%r]: decoding in batch %r",
                    self.batch_key, self.batch_names[0])
        return np.zeros(n, np.int32)

    # -- persistence -------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the model folder (manifest, first modality's features, weights) atomically."""
        extra = {
            "features": {m: list(map(str, f)) for m, f in self.features.items()},
            "locations": {m: loc for m, loc in self.locations.items() if isinstance(loc, str)},
            "batch_key": self.batch_key, "batch_names": self.batch_names, "info": self.info,
        }
        return write_model(directory, kind=self.kind, config=asdict(self.config),
                           variables=self.variables, genes=self.genes, extra=extra)

    @classmethod
    def from_saved(cls, saved: SavedModel) -> MultimodalVAE:
        config = MVAEConfig(**saved["config"])
        extra = saved["extra"]
        return cls(config, saved["variables"], extra["features"],
                   locations=extra.get("locations"), batch_key=extra.get("batch_key"),
                   batch_names=extra.get("batch_names", ()), info=extra.get("info", {}))


def _resolves(data: Any, name: str, location: Any) -> bool:
    try:
        locate(data, name, location)
    except ScatlasInputError:
        return False
    return True


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    a = np.asarray(a)
    if a.shape[0] == size:
        return a
    pad = np.zeros((size - a.shape[0], *a.shape[1:]), a.dtype)
    return np.concatenate([a, pad])


# ----------------------------------------------------------------------------------- benchmark

def benchmark_callables(
    n_genes: int = 2000, n_proteins: int = 50, batch_size: int = 1024, *, seed: int = 0,
    bf16: bool = False, **config_kw: Any,
) -> dict[str, Any]:
    """Timed units for ``bench/mvae.py`` at the default architecture, RNA (NB) + protein (NB).

    ``train_step()`` runs one jitted training step (encoders, PoE of the three ELBO subsets,
    decoders, backward, AdamW) on a fixed device-resident batch of ``batch_size`` cells
    (Poisson counts, ~10 % non-zero RNA) and blocks until done.
    """
    from .train import TrainConfig, Trainer

    rng = np.random.default_rng(seed)
    batch = {
        "x0": rng.poisson(0.15, (batch_size, n_genes)).astype(np.float32),
        "x1": rng.poisson(20.0, (batch_size, n_proteins)).astype(np.float32),
        "m0": np.ones(batch_size, np.float32), "m1": np.ones(batch_size, np.float32),
        "cov": np.zeros(batch_size, np.int32),
    }
    cfg = MVAEConfig(("rna", "protein"), ("nb", "nb"), (n_genes, n_proteins),
                     log_lib_mean=(np.log(0.15 * n_genes), np.log(20.0 * n_proteins)),
                     kl_warmup_steps=1000, bf16=bf16, **config_kw)
    tcfg = TrainConfig(max_steps=100_000, learning_rate=2e-3, seed=seed, data_parallel=False)
    trainer = Trainer(MVAETask(cfg), tcfg)
    holder = {"ts": trainer.init_state(batch)}
    device_batch = trainer.put(batch)

    def train_step() -> None:
        holder["ts"], metrics = trainer.train_step(holder["ts"], device_batch)
        jax.block_until_ready((holder["ts"], metrics))  # the whole update, not just the loss

    return {"train_step": train_step, "config": cfg, "trainer": trainer, "batch": batch}
