"""The multimodal VAE's settings (:class:`MVAEConfig`) and Flax network (:class:`MVAENet`):
experts, product of experts, per-modality heads; the experts' fixed PCA input layers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..._validate import ScatlasInputError, check_positive_int
from ..mvae_data import (
    Modality,
)
from ..mvae_likelihoods import (
    LIKELIHOODS,
    LOGVAR_MAX,
    LOGVAR_MIN,
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

