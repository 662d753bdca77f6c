"""CoVEL's networks in Flax: cell encoders (MLP and the fine-grained transformer view), the graph
VAE over the feature graph, inner-product data decoders and the modality discriminator.

Sources: CoVEL (Tang et al., AAAI 2024, "comprehensive view": graph-linked, fine-grained and
contrastive cell embeddings; code shapsider/scintegration), GLUE (Cao & Gao, Nat Biotechnol
2022; ``scglue.models.sc``: ``DataEncoder``, ``GraphEncoder``, ``GraphConv``, ``NBDataDecoder``,
``Discriminator``), scGPT's value binning (Cui et al., Nat Methods 2024).

Shapes: ``B`` cells, ``F_m`` features of modality ``m``, ``V = sum_m F_m`` graph vertices,
``E`` graph edges, ``D`` = ``latent_dim``; float32 unless ``bf16``.

- :class:`CellEncoder` (one per modality): input ``log1p(1e4 x / l)`` (counts) or the 0/1 data
  (Bernoulli), ``depth`` blocks ``Dense(hidden) -> LayerNorm -> LeakyReLU(0.2) -> Dropout``
  (GLUE's ``DataEncoder``), plus, with the fine-grained view, :class:`TokenTransformer`'s pooled
  output added to the last hidden layer; heads ``loc`` and ``std = softplus(.) + 1e-7``.
- :class:`TokenTransformer` (the fine-grained view): a cell's top ``n_tokens`` features by value
  (``jax.lax.top_k``; zeros are padding), each token a learned feature embedding plus the
  embedding of its value bin (the token's rank among the cell's non-zero tokens cut into
  ``n_bins`` equal bins, scGPT-style per-cell binning), ``t_layers`` pre-LayerNorm transformer
  blocks (``heads`` heads, MLP ``4 w``), masked mean pooling, ``Dense(hidden)``.
  FLOPs per cell (multiply-adds x 2, width ``w = token_dim``, ``N = n_tokens``):
  ``t_layers (24 N w^2 + 4 N^2 w) + 2 w hidden`` plus the top-k over ``F_m`` values; at the
  defaults (N 64, w 32, 1 layer, hidden 256) about 2.1e6, against ``2 F_m hidden`` = 1.0e6 for the
  MLP's first layer on 2,000 genes.
- :class:`GraphEncoder` (the graph VAE): free vertex representations ``(V, D)``, one graph
  convolution ``h_t = sum_{e: s->t} sign_e norm_e r_s`` with GLUE's "keepvar" norms (the
  caller's edges; the graph-off model passes self-loops only), heads ``loc = Dense(h)``,
  ``std = softplus(Dense(h)) + 1e-7``.
- decoders (GLUE ``NBDataDecoder`` / Bernoulli): per modality ``scale``, ``bias``,
  ``log_theta`` (F_m,); ``logit = softplus(scale) * (u v_m^T) + bias``; NB mean
  ``l softmax(logit)`` with inverse dispersion ``exp(log_theta)``; Bernoulli ``sigmoid(logit)``.
- :class:`Discriminator`: ``depth`` blocks of ``Dense(hidden) -> LeakyReLU(0.2) -> Dropout``
  then modality logits (GLUE's ``Discriminator``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ...exceptions import ScatlasInputError

INPUT_SCALE = 1e4
EPS = 1e-7
LIKELIHOODS = ("nb", "bernoulli")
VIEWS = ("graph_view", "fine_grained", "contrastive", "align")


@dataclass
class CoVELConfig:
    """Architecture, views and loss weights of a :class:`~scatlas.models.CoVEL`.

    ``modalities``/``likelihoods`` ("nb" or "bernoulli")/``n_features``/``log_lib_mean`` (mean
    training log total, the library of imputed counts): per modality, in order. Sizes:
    ``latent_dim`` (GLUE 50), ``hidden`` (256), ``depth`` (2), ``dropout`` (0.2). Views, each
    switchable: ``graph_view`` (graph convolution + graph ELBO; off: free feature vectors),
    ``fine_grained`` (the transformer view; its sizes ``n_tokens``, ``n_bins``, ``token_dim``,
    ``heads``, ``t_layers``), ``contrastive`` (InfoNCE of paired cells, ``lam_pair``, and of two
    feature-masked views of a cell, ``lam_aug``, ``mask_rate``; ``temperature``), ``align``
    (the adversarial modality discriminator, ``lam_align``). GLUE's weights: ``lam_data`` 1,
    ``lam_kl`` 1, ``lam_graph`` 0.02, ``lam_align`` 0.05; ``neg_samples`` negative edges per
    positive edge; ``max_edges`` positive edges per step (a random subset beyond it).
    ``paired``: rows of a batch are the same cells in every modality.
    """

    modalities: tuple[str, ...]
    likelihoods: tuple[str, ...]
    n_features: tuple[int, ...]
    log_lib_mean: tuple[float, ...] = ()
    latent_dim: int = 50
    hidden: int = 256
    depth: int = 2
    dropout: float = 0.2
    graph_view: bool = True
    fine_grained: bool = False
    contrastive: bool = True
    align: bool = True
    paired: bool = False
    n_tokens: int = 64
    n_bins: int = 16
    token_dim: int = 32
    heads: int = 4
    t_layers: int = 1
    lam_data: float = 1.0
    lam_kl: float = 1.0
    lam_graph: float = 0.02
    lam_align: float = 0.05
    lam_pair: float = 1.0
    lam_aug: float = 0.1
    temperature: float = 0.1
    mask_rate: float = 0.2
    neg_samples: int = 10
    max_edges: int = 50_000
    bf16: bool = False

    def __post_init__(self) -> None:
        self.modalities = tuple(str(m) for m in self.modalities)
        self.likelihoods = tuple(str(x) for x in self.likelihoods)
        self.n_features = tuple(int(f) for f in self.n_features)
        M = len(self.modalities)
        if M < 2 or len(set(self.modalities)) != M:
            raise ScatlasInputError(f"need two or more distinct modalities, got {self.modalities}")
        if len(self.likelihoods) != M or len(self.n_features) != M:
            raise ScatlasInputError("modalities, likelihoods and n_features differ in length")
        for lik in self.likelihoods:
            if lik not in LIKELIHOODS:
                raise ScatlasInputError(f"likelihood {lik!r} is not one of {LIKELIHOODS}")
        self.log_lib_mean = tuple(float(v) for v in self.log_lib_mean) or (0.0,) * M
        for name in ("latent_dim", "hidden", "depth", "n_tokens", "n_bins", "token_dim", "heads",
                     "t_layers", "neg_samples", "max_edges"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ScatlasInputError(f"{name} must be an integer >= 1, got {v!r}", param=name)
        if self.token_dim % self.heads:
            raise ScatlasInputError(f"token_dim={self.token_dim} must divide by heads={self.heads}")
        if not 0 <= self.dropout < 1 or not 0 <= self.mask_rate < 1:
            raise ScatlasInputError("dropout and mask_rate must be in [0, 1)")
        for name in ("lam_data", "lam_kl", "lam_graph", "lam_align", "lam_pair", "lam_aug"):
            if not getattr(self, name) >= 0:
                raise ScatlasInputError(f"{name} must be >= 0", param=name)
        if not self.temperature > 0:
            raise ScatlasInputError(f"temperature must be > 0, got {self.temperature!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dtype(self) -> Any:
        return jnp.bfloat16 if self.bf16 else jnp.float32


def encoder_input(x: jax.Array, likelihood: str) -> jax.Array:
    """``log1p(1e4 x / total)`` for counts (GLUE's ``TOTAL_COUNT``), ``x > 0`` for Bernoulli."""
    if likelihood == "bernoulli":
        return (x > 0).astype(jnp.float32)
    total = jnp.maximum(x.sum(-1, keepdims=True), 1.0)
    return jnp.log1p(INPUT_SCALE * x / total)


class TokenTransformer(nn.Module):
    """The fine-grained view: a transformer over a cell's top-N features (module docstring)."""

    n_features: int
    n_tokens: int
    n_bins: int
    width: int
    heads: int
    layers: int
    hidden: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xn: jax.Array, train: bool) -> jax.Array:
        n = min(self.n_tokens, self.n_features)
        # ties (0/1 data) broken by a fixed tiny per-feature offset, not by feature order
        jitter = 1e-4 * ((jnp.arange(self.n_features) * 7919 % 1009) / 1009.0)
        vals, idx = jax.lax.top_k(xn + jitter * (xn > 0), n)  # (B, N), descending
        mask = vals > 0
        count = jnp.maximum(mask.sum(-1, keepdims=True), 1)
        rank = jnp.arange(n)[None, :]
        bins = jnp.where(mask, 1 + jnp.minimum(rank * self.n_bins // count, self.n_bins - 1), 0)
        tok = (nn.Embed(self.n_features, self.width, dtype=self.dtype, name="feature")(idx)
               + nn.Embed(self.n_bins + 1, self.width, dtype=self.dtype, name="bin")(bins))
        attn_mask = nn.make_attention_mask(mask, mask)
        for i in range(self.layers):
            h = nn.LayerNorm(dtype=self.dtype, name=f"ln_a{i}")(tok)
            h = nn.MultiHeadDotProductAttention(
                num_heads=self.heads, dtype=self.dtype, dropout_rate=self.dropout,
                deterministic=not train, name=f"attn{i}")(h, h, mask=attn_mask)
            tok = tok + h
            h = nn.LayerNorm(dtype=self.dtype, name=f"ln_f{i}")(tok)
            h = nn.Dense(4 * self.width, dtype=self.dtype, name=f"ff_in{i}")(h)
            h = nn.Dense(self.width, dtype=self.dtype, name=f"ff_out{i}")(nn.gelu(h))
            tok = tok + nn.Dropout(self.dropout, deterministic=not train)(h)
        m = mask[..., None].astype(tok.dtype)
        pooled = (tok * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return nn.Dense(self.hidden, dtype=self.dtype, name="out")(pooled)


class CellEncoder(nn.Module):
    """q(u | x) of one modality: ``(loc, std)``, each (B, D) (module docstring)."""

    cfg: CoVELConfig
    n_features: int
    likelihood: str

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        c = self.cfg
        xn = encoder_input(x, self.likelihood)
        h = xn.astype(c.dtype)
        for i in range(c.depth):
            h = nn.Dense(c.hidden, dtype=c.dtype, name=f"dense{i}")(h)
            if i == c.depth - 1 and c.fine_grained:
                h = h + TokenTransformer(self.n_features, c.n_tokens, c.n_bins, c.token_dim,
                                         c.heads, c.t_layers, c.hidden, c.dropout, c.dtype,
                                         name="tokens")(xn, train)
            h = nn.LayerNorm(dtype=c.dtype, name=f"norm{i}")(h)
            h = nn.leaky_relu(h, 0.2)
            h = nn.Dropout(c.dropout, deterministic=not train)(h)
        loc = nn.Dense(c.latent_dim, name="loc")(h).astype(jnp.float32)
        std = nn.softplus(nn.Dense(c.latent_dim, name="std")(h).astype(jnp.float32)) + EPS
        return loc, std


def graph_conv(r: jax.Array, src: jax.Array, tgt: jax.Array, norm: jax.Array,
               sign: jax.Array) -> jax.Array:
    """``out_t = sum_{e: src_e = s, tgt_e = t} sign_e norm_e r_s``: (V, D) from (V, D)."""
    msg = (sign * norm)[:, None] * r[src]
    return jax.ops.segment_sum(msg, tgt, num_segments=r.shape[0])


class GraphEncoder(nn.Module):
    """q(v | graph): ``(loc, std)``, each (V, D), over the given edges (module docstring)."""

    n_vertices: int
    latent_dim: int

    @nn.compact
    def __call__(self, src: jax.Array, tgt: jax.Array, norm: jax.Array, sign: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
        r = self.param("vrepr", nn.initializers.normal(0.1), (self.n_vertices, self.latent_dim))
        h = graph_conv(r, src, tgt, norm, sign)
        loc = nn.Dense(self.latent_dim, name="loc")(h)
        std = nn.softplus(nn.Dense(self.latent_dim, name="std")(h)) + EPS
        return loc, std


class Discriminator(nn.Module):
    """Modality logits (B, M) from latents (B, D) (GLUE's ``Discriminator``)."""

    n_out: int
    hidden: int
    depth: int
    dropout: float

    @nn.compact
    def __call__(self, u: jax.Array, train: bool) -> jax.Array:
        h = u
        for i in range(self.depth):
            h = nn.leaky_relu(nn.Dense(self.hidden, name=f"dense{i}")(h), 0.2)
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(self.n_out, name="out")(h)


def decoder_logits(u: jax.Array, v: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """GLUE's inner-product decoder: ``softplus(scale) * (u v^T) + bias``, (B, F)."""
    return jax.nn.softplus(scale) * (u @ v.T) + bias


class CoVELNet(nn.Module):
    """Every network of the model (submodule per modality); see the module docstring."""

    cfg: CoVELConfig

    def setup(self) -> None:
        c = self.cfg
        self.encoders = [CellEncoder(c, f, lik, name=f"enc_{m}")
                         for m, f, lik in zip(c.modalities, c.n_features, c.likelihoods,
                                              strict=True)]
        self.graph_enc = GraphEncoder(sum(c.n_features), c.latent_dim, name="graph")
        self.disc = Discriminator(len(c.modalities), c.hidden, c.depth, c.dropout, name="disc")
        self.dec = [{k: self.param(f"dec_{m}_{k}", nn.initializers.zeros, (f,))
                     for k in ("scale", "bias", "log_theta")}
                    for m, f in zip(c.modalities, c.n_features, strict=True)]

    def encode(self, k: int, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        return self.encoders[k](x, train)

    def features(self, src: jax.Array, tgt: jax.Array, norm: jax.Array, sign: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
        return self.graph_enc(src, tgt, norm, sign)

    def decoder(self, k: int) -> dict[str, jax.Array]:
        return self.dec[k]

    def discriminate(self, u: jax.Array, train: bool) -> jax.Array:
        return self.disc(u, train)

    def __call__(self, xs: list[jax.Array], graph: tuple[jax.Array, ...], train: bool = False
                 ) -> Any:
        """Touch every submodule (for ``init``): encoders, graph, discriminator, decoders."""
        outs = [self.encode(k, x, train) for k, x in enumerate(xs)]
        v = self.features(*graph)
        d = self.discriminate(outs[0][0], train)
        return outs, v, d, [self.decoder(k) for k in range(len(xs))]
