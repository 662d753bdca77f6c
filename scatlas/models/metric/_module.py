"""The metric encoder's Flax network and its settings (:class:`MetricConfig`).

Architecture (SCimilarity ``nn_models.Encoder``/``Decoder``; Heimberg et al., Nature 2025):
encoder blocks ``Dropout -> Dense -> BatchNorm -> PReLU`` (input dropout 0.4 before the first
block, dropout 0.5 before the others; hidden 3 x 1024), then ``Dense(latent=128)`` and L2
normalisation; the decoder mirrors the hidden sizes (no dropout before its first block) and ends
in ``Dense(n_genes)`` regressing the log-normalised input.

Loss: ``w * metric + (1 - w) * MSE(reconstruction, input)`` with ``w = 0.001`` for the triplet
loss (margin 0.05, semi-hard in-batch mining on the device, :mod:`scatlas.models.metric_losses`) or
``w = 0.05`` for the supervised InfoNCE alternative, plus SCimilarity's L1 penalty on the first
encoder layer, ``l1 * lr(step) * sum |W1|`` with ``l1 = 1e-4``.

Deviations from SCimilarity: mining runs inside the jitted step (SCimilarity: numpy between
steps) with one uniform draw per pair; positives fall back to same-study pairs for an anchor
that has no cross-study positive in the batch; no dummy triplet when none is mined (loss 0);
PReLU slope initialised at 0.25 as torch's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..._validate import ScatlasInputError, check_positive_int
from .. import metric_losses

OBJECTIVES = ("triplet", "infonce")
#: negatives of an anchor: cells of any other (unrelated) label, or only those of its own study
NEGATIVES = ("all", "same_study")
PRECISIONS = ("float32", "bfloat16")
_DEFAULT_WEIGHT = {"triplet": 0.001, "infonce": 0.05}

#: the variables collection holding a model's fixed PCA input layer (``MetricConfig.input_pcs``)
INPUT_PCA = "input_pca"


# ------------------------------------------------------------------------------------- network

def _dense(features: int, dtype: Any) -> nn.Dense:
    """``nn.Dense`` computing in ``dtype``; bfloat16 products accumulate into float32 outputs
    (XLA's CPU dot with a bfloat16 result is slower than with a float32 one, measured 123 vs
    262 GFLOPS on a 10,000 x 1024 x 1024 product, AMD EPYC Zen 4 with AVX512-BF16)."""
    if dtype == jnp.float32:
        return nn.Dense(features, dtype=dtype)
    return nn.Dense(features, dtype=dtype,
                    dot_general=functools.partial(jax.lax.dot_general,
                                                  preferred_element_type=jnp.float32))


class _Block(nn.Module):
    features: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, dense_done: bool = False) -> jax.Array:
        if not dense_done:  # dense_done: x is already this block's Dense output (sparse path)
            if self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = _dense(self.features, self.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=jnp.float32)(x)
        return nn.PReLU(negative_slope_init=0.25)(x)


class Encoder(nn.Module):
    """(B, n_genes) -> (B, latent) unit-length embeddings."""

    hidden: Sequence[int]
    latent: int
    dropout: float
    input_dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, first_done: bool = False) -> jax.Array:
        for i, h in enumerate(self.hidden):
            block = _Block(h, self.input_dropout if i == 0 else self.dropout, self.dtype)
            x = block(x, train, dense_done=first_done and i == 0)
        z = _dense(self.latent, self.dtype)(x).astype(jnp.float32)
        return z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)


class GeneOutput(nn.Module):
    """The decoder's output layer ``y = x @ kernel.T + bias`` with ``kernel`` (n_genes, in),
    gene-major (rows are genes; a removed expanded-square loss read it so). XLA's dense products
    are as fast with it as with Dense's (in, n_genes), and checkpoints hold this layout."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)
        kernel = self.param("kernel", init, (self.features, x.shape[-1]), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return y + bias


class Decoder(nn.Module):
    """(B, latent) -> (B, n_genes) reconstruction of the log-normalised input."""

    hidden: Sequence[int]
    n_genes: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool) -> jax.Array:
        for i, h in enumerate(self.hidden):
            z = _Block(h, 0.0 if i == 0 else self.dropout, self.dtype)(z, train)
        return GeneOutput(self.n_genes, self.dtype, name="Output")(z)


class MetricNet(nn.Module):
    """Encoder + mirror decoder; ``__call__`` returns ``(embedding, reconstruction)``."""

    n_genes: int
    hidden: Sequence[int] = (1024, 1024, 1024)
    latent: int = 128
    dropout: float = 0.5
    input_dropout: float = 0.4
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.encoder = Encoder(self.hidden, self.latent, self.dropout, self.input_dropout,
                               self.dtype)
        self.decoder = Decoder(tuple(reversed(self.hidden)), self.n_genes, self.dropout,
                               self.dtype)

    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        z = self.encoder(x, train)
        return z, self.decoder(z, train)

    def encode(self, x: jax.Array) -> jax.Array:
        return self.encoder(x, False)

    def after_first(self, h: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        """``(embedding, reconstruction)`` from the first Dense layer's output
        ``h = x @ W1 + b1``, which the sparse step computes itself
        (:mod:`scatlas.models.sparse_ops`)."""
        z = self.encoder(h, train, first_done=True)
        return z, self.decoder(z, train)

    def encode_after_first(self, h: jax.Array) -> jax.Array:
        """Inference from the first Dense layer's output ``h = x @ W1 + b1`` (B, hidden[0])."""
        return self.encoder(h, False, first_done=True)


# --------------------------------------------------------------------------------------- config

@dataclass
class MetricConfig:
    """Architecture and loss settings (SCimilarity's defaults).

    ``input_pcs``: None (SCimilarity's: the network reads the log-normalised genes) or the
    number of principal components of the training cells whose scores the network reads
    instead (a fixed, centred linear first layer, :func:`fit_input_pca`; the decoder then
    reconstructs the scores).
    """

    n_genes: int
    hidden: tuple[int, ...] = (1024, 1024, 1024)
    latent_dim: int = 128
    dropout: float = 0.5
    input_dropout: float = 0.4
    objective: str = "triplet"
    margin: float = 0.05
    metric_weight: float | None = None
    mining: str = "semihard"
    across_studies: bool = True
    negatives: str = "all"
    temperature: float = 0.1
    l1: float = 1e-4
    bf16: bool = False
    input_pcs: int | None = None

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        check_positive_int(self.n_genes, "n_genes")
        check_positive_int(self.latent_dim, "latent_dim")
        for h in self.hidden:
            check_positive_int(h, "hidden layer size")
        if self.objective not in OBJECTIVES:
            raise ScatlasInputError(
                f"objective must be one of {OBJECTIVES}, got {self.objective!r}",
                param="objective")
        if self.mining not in metric_losses.STRATEGIES:
            raise ScatlasInputError(
                f"mining must be one of {metric_losses.STRATEGIES}, got {self.mining!r}",
                param="mining")
        if self.negatives not in NEGATIVES:
            raise ScatlasInputError(
                f"negatives must be one of {NEGATIVES}, got {self.negatives!r}",
                param="negatives")
        if self.input_pcs is not None:
            check_positive_int(self.input_pcs, "input_pcs")
        if not self.margin >= 0:  # also refuses NaN
            raise ScatlasInputError(f"margin must be >= 0, got {self.margin!r}", param="margin")
        for name in ("dropout", "input_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ScatlasInputError(f"{name} must be in [0, 1), got {getattr(self, name)!r}",
                                        param=name)
        if self.metric_weight is None:
            self.metric_weight = _DEFAULT_WEIGHT[self.objective]
        if not 0 <= self.metric_weight <= 1:
            raise ScatlasInputError(
                f"metric_weight must be in [0, 1], got {self.metric_weight!r}",
                param="metric_weight")

    @property
    def n_inputs(self) -> int:
        """The network's input (and reconstruction) width: ``input_pcs`` or ``n_genes``."""
        return self.n_genes if self.input_pcs is None else self.input_pcs

    def net(self) -> MetricNet:
        return MetricNet(self.n_inputs, self.hidden, self.latent_dim, self.dropout,
                         self.input_dropout, jnp.bfloat16 if self.bf16 else jnp.float32)

