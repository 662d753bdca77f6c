"""CoVEL's objective as a :class:`scatlas.models.train.Task`, its loss terms and its batches.

Loss terms (GLUE, Cao & Gao 2022, ``SCGLUETrainer.compute_losses``; CoVEL, Tang et al. AAAI
2024; InfoNCE, van den Oord et al. 2018), every one a pure function below, with metric keys:

- ``x_nll_<m>``: ``-mean_{cells, features} log p(x | u, v_m)`` with ``u ~ q(u | x)``,
  ``v ~ q(v)`` (NB or Bernoulli, :func:`nb_log_prob` / :func:`bernoulli_log_prob`);
- ``x_kl_<m>``: ``KL(q(u | x) || N(0, I))`` summed over dimensions, mean over cells, divided by
  ``F_m`` (GLUE's per-feature scale); data ELBO ``lam_data sum_m (x_nll_m + lam_kl x_kl_m)``;
- graph view: ``g_nll`` (:func:`graph_nll`: Bernoulli of ``sigmoid(sign v_s . v_t)`` with the
  edge weight as target on positive edges, 0 on ``neg_samples`` random negatives per positive;
  positives and negatives averaged separately, then together) and ``g_kl`` (:func:`kl_normal`
  summed over dimensions, mean over vertices, divided by ``V``); added as
  ``lam_graph M (g_nll + lam_kl g_kl)``;
- align view: ``dsc``, the cross-entropy of the modality discriminator on the posterior means of
  every modality's cells; added as ``lam_align dsc`` through a gradient-reversal layer
  (:func:`reverse_gradient`): the discriminator descends ``dsc`` while the encoders ascend it,
  GLUE's ``gen_loss = vae_loss - lam_align dsc`` and ``dsc_loss`` in one step (simultaneous
  gradient play, as DANN);
- contrastive view: ``pair`` (paired data only): symmetric InfoNCE (:func:`info_nce`) between the
  L2-normalised posterior means of two modalities of the same cells, averaged over modality
  pairs, weight ``lam_pair``; ``aug``: InfoNCE between two feature-masked copies of each cell
  (each feature dropped with probability ``mask_rate``), averaged over modalities, weight
  ``lam_aug``.

Switching a view off removes exactly its terms from the loss and the metrics (the fine-grained
view has no term: it is part of the encoders); the graph view off also replaces the graph
convolution by self-loops (free feature vectors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax.scipy.special import gammaln

from ..data import Prefetcher, digest, identity
from ._module import CoVELConfig, CoVELNet, decoder_logits

Batch = dict[str, Any]


# ------------------------------------------------------------------------------- pure terms

def nb_log_prob(x: jax.Array, mu: jax.Array, log_theta: jax.Array) -> jax.Array:
    """Elementwise ``log NB(x; mean mu, inverse dispersion theta = exp(log_theta))``."""
    theta = jnp.exp(log_theta)
    eps = 1e-8
    return (gammaln(x + theta) - gammaln(theta) - gammaln(x + 1)
            + theta * (jnp.log(theta + eps) - jnp.log(theta + mu + eps))
            + x * (jnp.log(mu + eps) - jnp.log(theta + mu + eps)))


def bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
    """Elementwise ``log Bernoulli(x > 0; sigmoid(logits))``."""
    y = (x > 0).astype(logits.dtype)
    return y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits)


def kl_normal(loc: jax.Array, std: jax.Array) -> jax.Array:
    """``KL(N(loc, std^2) || N(0, 1))`` summed over the last axis."""
    return 0.5 * jnp.sum(loc**2 + std**2 - 1.0 - 2.0 * jnp.log(std), axis=-1)


def data_nll(x: jax.Array, u: jax.Array, v: jax.Array, dec: dict[str, jax.Array],
             likelihood: str) -> jax.Array:
    """``-mean log p(x | u, v)`` over cells and features (GLUE's inner-product decoders)."""
    logits = decoder_logits(u, v, dec["scale"], dec["bias"])
    if likelihood == "bernoulli":
        return -jnp.mean(bernoulli_log_prob(x, logits))
    lib = x.sum(-1, keepdims=True)
    mu = jax.nn.softmax(logits, axis=-1) * lib
    return -jnp.mean(nb_log_prob(x, mu, dec["log_theta"]))


def graph_nll(v: jax.Array, src: jax.Array, tgt: jax.Array, weight: jax.Array, sign: jax.Array,
              neg_tgt: jax.Array) -> jax.Array:
    """GLUE's graph reconstruction NLL.

    ``src``, ``tgt``, ``weight``, ``sign``: the positive edges (E,); ``neg_tgt``: (E, K) random
    targets of the negatives (source and sign those of the positive). Positives:
    ``-[w log s + (1 - w) log(1 - s)]``, ``s = sigmoid(sign v_src . v_tgt)``; negatives:
    ``-log(1 - s)``; ``(mean over positives + mean over negatives) / 2``.
    """
    lp = sign * jnp.sum(v[src] * v[tgt], -1)
    pos = -(weight * jax.nn.log_sigmoid(lp) + (1 - weight) * jax.nn.log_sigmoid(-lp))
    ln = sign[:, None] * jnp.einsum("ed,ekd->ek", v[src], v[neg_tgt])
    neg = -jax.nn.log_sigmoid(-ln)
    return 0.5 * (pos.mean() + neg.mean())


def info_nce(a: jax.Array, b: jax.Array, temperature: float) -> jax.Array:
    """Symmetric InfoNCE (CLIP) of paired rows: ``a``, ``b`` (B, D) are L2-normalised,
    ``logits = a b^T / temperature``; mean of the row-wise and column-wise cross-entropies with
    the diagonal as the positives."""
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    logits = a @ b.T / temperature
    diag = jnp.diagonal(logits)
    row = jax.nn.logsumexp(logits, axis=1) - diag
    col = jax.nn.logsumexp(logits, axis=0) - diag
    return 0.5 * (row.mean() + col.mean())


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer ``labels`` (N,) under ``logits`` (N, C)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


@jax.custom_vjp
def reverse_gradient(x: jax.Array) -> jax.Array:
    """Identity forward, negated gradient backward (gradient reversal, Ganin & Lempitsky 2015)."""
    return x


reverse_gradient.defvjp(lambda x: (x, None), lambda _, g: (-g,))


# ----------------------------------------------------------------------------------- the task

class CoVELTask:
    """:class:`~scatlas.models.train.Task` of CoVEL (module docstring). ``graph``: the resolved
    graph arrays ``src``, ``tgt``, ``weight``, ``sign``, ``norm`` (numpy, fixed during
    training)."""

    def __init__(self, config: CoVELConfig, graph: dict[str, np.ndarray]):
        self.config = config
        self.net = CoVELNet(config)
        self.graph = {k: jnp.asarray(v) for k, v in graph.items()}
        n = sum(config.n_features)
        loops = jnp.arange(n, dtype=jnp.int32)
        self._loops = (loops, loops, jnp.ones(n, jnp.float32), jnp.ones(n, jnp.float32))

    def conv_edges(self) -> tuple[jax.Array, ...]:
        """(src, tgt, norm, sign) of the convolution: the graph, or self-loops (graph off)."""
        g = self.graph
        return (g["src"], g["tgt"], g["norm"], g["sign"]) if self.config.graph_view else self._loops

    def init(self, rng: jax.Array, batch: Batch) -> dict[str, Any]:
        xs = [batch[f"x_{m}"] for m in self.config.modalities]
        return self.net.init({"params": rng, "dropout": rng}, xs, self.conv_edges(), False)

    def _apply(self, params: Any, method: Callable, *args: Any, rng: jax.Array | None = None
               ) -> Any:
        rngs = {"dropout": rng} if rng is not None else {}
        return self.net.apply({"params": params}, *args, method=method, rngs=rngs)

    def terms(self, params: Any, batch: Batch, rng: jax.Array, train: bool
              ) -> dict[str, jax.Array]:
        """Every enabled loss term (unweighted), keyed as in the module docstring."""
        c = self.config
        def key(i: int) -> jax.Array:  # one stream per draw, whatever views are on
            return jax.random.fold_in(rng, i)

        drop = key(0) if train else None
        out: dict[str, jax.Array] = {}
        vloc, vstd = self._apply(params, CoVELNet.features, *self.conv_edges())
        v = vloc + vstd * jax.random.normal(key(1), vloc.shape)
        offsets = np.cumsum((0, *c.n_features))
        locs = []
        for k, (m, lik) in enumerate(zip(c.modalities, c.likelihoods, strict=True)):
            x = batch[f"x_{m}"]
            loc, std = self._apply(params, CoVELNet.encode, k, x, train, rng=drop)
            u = loc + std * jax.random.normal(key(10 + k), loc.shape)
            dec = self._apply(params, CoVELNet.decoder, k)
            out[f"x_nll_{m}"] = data_nll(x, u, v[offsets[k]:offsets[k + 1]], dec, lik)
            out[f"x_kl_{m}"] = kl_normal(loc, std).mean() / c.n_features[k]
            locs.append(loc)
        if c.graph_view:
            g = self.graph
            src, tgt, w, sgn = g["src"], g["tgt"], g["weight"], g["sign"]
            if src.shape[0] > c.max_edges:
                pick = jax.random.choice(key(2), src.shape[0], (c.max_edges,), replace=False)
                src, tgt, w, sgn = src[pick], tgt[pick], w[pick], sgn[pick]
            neg = jax.random.randint(key(3), (src.shape[0], c.neg_samples), 0, vloc.shape[0])
            out["g_nll"] = graph_nll(v, src, tgt, w, sgn, neg)
            out["g_kl"] = kl_normal(vloc, vstd).mean() / vloc.shape[0]
        if c.align:
            u_all = reverse_gradient(jnp.concatenate(locs))
            labels = jnp.concatenate([jnp.full(loc.shape[0], k, jnp.int32)
                                      for k, loc in enumerate(locs)])
            logits = self._apply(params, CoVELNet.discriminate, u_all, train, rng=drop)
            out["dsc"] = cross_entropy(logits, labels)
        if c.contrastive:
            if c.paired:
                pairs = [info_nce(locs[i], locs[j], c.temperature)
                         for i in range(len(locs)) for j in range(i + 1, len(locs))]
                out["pair"] = sum(pairs) / len(pairs)
            aug = []
            for k, m in enumerate(c.modalities):
                x = batch[f"x_{m}"]
                k1, k2, k3 = jax.random.split(key(20 + k), 3)
                keep1 = jax.random.bernoulli(k1, 1 - c.mask_rate, x.shape)
                keep2 = jax.random.bernoulli(k2, 1 - c.mask_rate, x.shape)
                a, _ = self._apply(params, CoVELNet.encode, k, x * keep1, train,
                                   rng=k3 if train else None)
                b, _ = self._apply(params, CoVELNet.encode, k, x * keep2, train,
                                   rng=jax.random.fold_in(k3, 1) if train else None)
                aug.append(info_nce(a, b, c.temperature))
            out["aug"] = sum(aug) / len(aug)
        return out

    def weights(self) -> dict[str, float]:
        """The weight of every term key in the total loss (enabled views only)."""
        c = self.config
        w = {}
        for m in c.modalities:
            w[f"x_nll_{m}"] = c.lam_data
            w[f"x_kl_{m}"] = c.lam_data * c.lam_kl
        if c.graph_view:
            M = len(c.modalities)
            w["g_nll"], w["g_kl"] = c.lam_graph * M, c.lam_graph * M * c.lam_kl
        if c.align:
            w["dsc"] = c.lam_align
        if c.contrastive:
            if c.paired:
                w["pair"] = c.lam_pair
            w["aug"] = c.lam_aug
        return w

    def loss(self, params: Any, state: Any, batch: Batch, rng: jax.Array, step: jax.Array,
             train: bool) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
        terms = self.terms(params, batch, rng, train)
        w = self.weights()
        total = sum(w[k] * v for k, v in terms.items())
        return total, (terms, state)


# ------------------------------------------------------------------------------------ batches

def _rows(M: Any, idx: np.ndarray) -> np.ndarray:
    block = M[idx]
    return (block.toarray() if sp.issparse(block) else np.asarray(block)).astype(np.float32)


class CoVELBatches:
    """Mini-batches of every modality: ``{"x_<m>": (B, F_m) float32}``.

    Unpaired: batch ``t`` draws ``B`` cells of each modality independently (a fresh permutation
    of its cells per pass, seeded by ``(seed, modality, pass)``); paired: the same rows in every
    modality. A pure function of ``(seed, t)``, so a resumed run sees the same batches.
    """

    def __init__(self, names: Sequence[str], mats: Sequence[Any], batch_size: int, *,
                 seed: int = 0, paired: bool = False):
        self.names, self.mats = list(names), list(mats)
        self.batch_size, self.seed, self.paired = int(batch_size), int(seed), bool(paired)
        self.n = [m.shape[0] for m in self.mats]

    def _draw(self, k: int, t: int) -> np.ndarray:
        n, B = self.n[k], self.batch_size
        per = max(n // B, 1)
        epoch, pos = divmod(t, per)
        perm = np.random.default_rng([self.seed, k, epoch]).permutation(n)
        if n < B:
            perm = np.resize(perm, B)
        return perm[pos * B:(pos + 1) * B]

    def indices(self, t: int) -> list[np.ndarray]:
        if self.paired:
            idx = self._draw(0, t)
            return [idx] * len(self.mats)
        return [self._draw(k, t) for k in range(len(self.mats))]

    def take(self, idx: Sequence[np.ndarray]) -> Batch:
        return {f"x_{m}": _rows(M, i) for m, M, i in zip(self.names, self.mats, idx, strict=True)}

    def batch(self, t: int) -> Batch:
        return self.take(self.indices(t))

    def settings(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "seed": self.seed, "paired": self.paired,
                "modalities": tuple(f"{m}:{M.shape[0]}x{M.shape[1]}"
                                    for m, M in zip(self.names, self.mats, strict=True)),
                "cells": digest(*[np.asarray(M.sum(1)).ravel() for M in self.mats])}

    def iterate(self, start: int = 0, *, prefetch: int = 2,
                put: Callable[[Batch], Any] | None = None,
                part: tuple[int, int] | None = None) -> Iterator[Any]:
        put = put or identity
        if part is None:
            return Prefetcher(lambda t: put(self.batch(t)), start, prefetch)
        i, n = part
        m = self.batch_size // n
        return Prefetcher(lambda t: put(self.take([x[i * m:(i + 1) * m]
                                                    for x in self.indices(t)])), start, prefetch)
