"""Metric-learning cell encoder (SCimilarity-style) in Flax, trained by :mod:`.train`.

Architecture (SCimilarity ``nn_models.Encoder``/``Decoder``; Heimberg et al., Nature 2025):
encoder blocks ``Dropout -> Dense -> BatchNorm -> PReLU`` (input dropout 0.4 before the first
block, dropout 0.5 before the others; hidden 3 x 1024), then ``Dense(latent=128)`` and L2
normalisation; the decoder mirrors the hidden sizes (no dropout before its first block) and ends
in ``Dense(n_genes)`` regressing the log-normalised input.

Loss: ``w * metric + (1 - w) * MSE(reconstruction, input)`` with ``w = 0.001`` for the triplet
loss (margin 0.05, semi-hard in-batch mining on the device, :mod:`.metric_losses`) or
``w = 0.05`` for the supervised InfoNCE alternative, plus SCimilarity's L1 penalty on the first
encoder layer, ``l1 * lr(step) * sum |W1|`` with ``l1 = 1e-4``.

Deviations from SCimilarity: mining runs inside the jitted step (SCimilarity: numpy between
steps) with one uniform draw per pair; positives fall back to same-study pairs for an anchor
that has no cross-study positive in the batch; no dummy triplet when none is mined (loss 0);
PReLU slope initialised at 0.25 as torch's.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._validate import ScatlasInputError, check_positive_int
from . import metric_losses
from .inputs import InputSpec, model_chunks, resolve_input
from .io import SavedModel, write_model
from .train import TrainConfig, make_schedule

log = logging.getLogger(__name__)

OBJECTIVES = ("triplet", "infonce")
#: negatives of an anchor: cells of any other (unrelated) label, or only those of its own study
NEGATIVES = ("all", "same_study")
PRECISIONS = ("float32", "bfloat16")
_DEFAULT_WEIGHT = {"triplet": 0.001, "infonce": 0.05}


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
        ``h = x @ W1 + b1``, which the sparse step computes itself (:mod:`.sparse_ops`)."""
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


# ------------------------------------------------------------------------------ label hierarchy

def read_hierarchy(path: str | Path) -> dict[str, list[str]]:
    """A child -> parents map from a file: JSON ``{child: parent or [parents]}`` or a two-column
    CSV/TSV (``child, parent``; header optional), e.g. cell-ontology is_a edges exported once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label hierarchy file {str(path)!r} does not exist")
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or not raw:
            raise ScatlasInputError(
                f"label hierarchy {str(path)!r}: expected a non-empty JSON object "
                "{child: parent or [parents]}"
            )
        return {str(k): [v] if isinstance(v, str) else [str(x) for x in v] for k, v in raw.items()}
    delim = "\t" if path.suffix in (".tsv", ".tab") else ","
    parents: dict[str, list[str]] = {}
    with open(path, newline="") as fh:
        for row in csv.reader(fh, delimiter=delim):
            if len(row) < 2 or row[0].strip().lower() in ("child", "#child"):
                continue
            parents.setdefault(row[0].strip(), []).append(row[1].strip())
    if not parents:
        raise ScatlasInputError(
            f"label hierarchy {str(path)!r} has no (child, parent) rows"
        )
    return parents


def related_labels(
    names: Sequence[str], parents: Mapping[str, str | Iterable[str]] | None
) -> np.ndarray:
    """(L, L) bool: label i equals, is an ancestor of, or a descendant of label j.

    Raises :class:`ScatlasInputError` when ``parents`` is given but names none of the labels
    (as a child or a parent): a hierarchy of ontology IDs applied to label names, say, would
    otherwise be silently ignored.
    """
    L = len(names)
    rel = np.eye(L, dtype=bool)
    if not parents:
        return rel
    norm = {c: [p] if isinstance(p, str) else list(p) for c, p in parents.items()}
    terms = set(norm) | {p for ps in norm.values() for p in ps}
    if not terms & set(names):
        raise ScatlasInputError(
            f"the label hierarchy ({len(terms)} terms, e.g. {sorted(terms)[:3]}) names none of "
            f"the {L} labels (e.g. {list(names)[:3]}); it must use the labels' own names"
        )
    pos = {n: i for i, n in enumerate(names)}
    for i, name in enumerate(names):
        seen, stack = set(), list(norm.get(name, []))
        while stack:
            p = stack.pop()
            if p in seen:
                continue
            seen.add(p)
            stack.extend(norm.get(p, []))
            if p in pos:
                rel[i, pos[p]] = rel[pos[p], i] = True
    return rel


# ----------------------------------------------------------------------------------------- task

@dataclass
class MetricTask:
    """The :class:`~scatlas.models.train.Task` of the metric encoder."""

    config: MetricConfig
    train_config: TrainConfig
    related: np.ndarray = field(default_factory=lambda: np.eye(1, dtype=bool))
    #: (L,) bool: labels with a single training cell (negatives only; counted in the log as
    #: ``n_negative_only``, the mined triplets whose negative has such a label). None: none.
    negative_only: np.ndarray | None = None
    #: the fixed PCA input layer of ``config.input_pcs``: ``{"mean": (n_genes,),
    #: "components": (n_genes, input_pcs)}`` float32 (:func:`fit_input_pca`); None: the network
    #: reads the genes
    projection: Mapping[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.net = self.config.net()
        if (self.projection is None) != (self.config.input_pcs is None):
            raise ScatlasInputError("input_pcs and the PCA projection go together")
        if self.projection is not None:
            self._proj_mean = jnp.asarray(self.projection["mean"], jnp.float32)
            self._proj_components = jnp.asarray(self.projection["components"], jnp.float32)
        self._related = jnp.asarray(self.related, dtype=bool)
        self._negative_only = (None if self.negative_only is None or not np.any(self.negative_only)
                               else jnp.asarray(self.negative_only, dtype=bool))
        self._lr = make_schedule(self.train_config)

    def init(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        x = jnp.zeros((1, self.config.n_inputs), jnp.float32)
        return self.net.init({"params": rng, "dropout": rng}, x, train=False)

    def _apply(self, variables, x, train, rng, **kw):
        """``net.apply`` in train mode (dropout, batch statistics updated) or eval mode;
        returns ``(outputs, new_state)``."""
        if train:
            return self.net.apply(variables, x, train=True, rngs={"dropout": rng},
                                  mutable=["batch_stats"], **kw)
        out = self.net.apply(variables, x, train=False, **kw)
        return out, {k: v for k, v in variables.items() if k != "params"}

    def _embed_and_mse(self, params, state, batch, rng, train):
        """``(z, reconstruction MSE, new_state)`` of a dense batch (``x``) or a CSR batch
        (``x_indptr``, ``x_indices``, ``x_data``: :mod:`.sparse_ops`, CPU)."""
        variables = {"params": params, **state}
        if "x_indptr" not in batch:
            x = batch["x"].astype(jnp.float32)
            if self.projection is not None:  # the fixed PCA input layer: (x - mean) @ components
                x = (x - self._proj_mean) @ self._proj_components
            (z, recon), new_state = self._apply(variables, x, train, rng)
            return z, jnp.mean((recon - x) ** 2), new_state
        from ..kernels import xla_ffi
        from . import sparse_ops

        X = sparse_ops.CSR(batch["x_indptr"], batch["x_indices"], batch["x_data"])
        input_rng, rng = jax.random.split(rng)
        Xd = sparse_ops.dropout(X, self.config.input_dropout, input_rng) if train else X
        first = params["encoder"]["_Block_0"]["Dense_0"]
        h = sparse_ops.csr_matmul(Xd, first["kernel"]) + first["bias"]
        (z, recon), new_state = self._apply(variables, h, train, rng,
                                            method=MetricNet.after_first)
        target = xla_ffi.csr_to_dense(X.indptr, X.indices, X.data, self.config.n_genes)
        return z, jnp.mean((recon - target) ** 2), new_state

    def loss(self, params, state, batch, rng, step, train):
        cfg = self.config
        drop_rng, mine_rng = jax.random.split(rng)
        z, mse, new_state = self._embed_and_mse(params, state, batch, drop_rng, train)
        if cfg.objective == "triplet":
            metric, extra = metric_losses.mined_triplet_loss(
                z, batch["label"], batch["study"], self._related, mine_rng, margin=cfg.margin,
                strategy=cfg.mining, across_studies=cfg.across_studies,
                negative_only=self._negative_only,
                same_study_negatives=cfg.negatives == "same_study",
            )
        else:
            metric = metric_losses.supcon_loss(
                z, batch["label"], self._related, cfg.temperature,
                batch["study"] if cfg.negatives == "same_study" else None)
            extra = {}
        w = cfg.metric_weight
        w1 = params["encoder"]["_Block_0"]["Dense_0"]["kernel"]
        # the L1 penalty follows the learning rate: left out of the validation loss, which
        # would otherwise fall with the schedule and bias early stopping toward later steps
        l1 = cfg.l1 * self._lr(step) * jnp.sum(jnp.abs(w1)) if train else jnp.zeros(())
        loss = w * metric + (1 - w) * mse + l1
        return loss, ({cfg.objective: metric, "mse": mse, "l1": l1, **extra}, new_state)


#: the variables collection holding a model's fixed PCA input layer (``MetricConfig.input_pcs``)
INPUT_PCA = "input_pca"


def fit_input_pca(X: Any, n_components: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed PCA input layer of ``MetricConfig.input_pcs``, fitted on the training cells.

    ``X``: (n_cells, n_genes) log-normalised training cells (dense or CSR). Returns
    ``{"mean": (n_genes,), "components": (n_genes, k)}`` float32 with
    ``k = min(n_components, n_cells - 1, n_genes)``: sklearn's ``PCA`` (centred, its ``"auto"``
    solver, ``random_state=seed``); a cell's input is ``(x - mean) @ components``, its scores.
    """
    from sklearn.decomposition import PCA

    n_components = check_positive_int(n_components, "input_pcs")
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    k = min(n_components, X.shape[0] - 1, X.shape[1])
    if k < 1:
        raise ScatlasInputError(f"input_pcs needs at least 2 training cells, got {X.shape[0]}")
    pca = PCA(k, random_state=seed).fit(X.astype(np.float64))
    return {"mean": pca.mean_.astype(np.float32),
            "components": np.ascontiguousarray(pca.components_.T, dtype=np.float32)}


# ---------------------------------------------------------------------------------------- model

class MetricEncoder:
    """A trained metric-learning encoder: its config, weights, gene list and labels.

    Build one with :func:`scatlas.tl.train_metric`; ``embed`` new cells; ``save`` /
    :func:`scatlas.models.load`.
    """

    kind = "metric"

    def __init__(
        self,
        config: MetricConfig,
        variables: Mapping[str, Any],
        genes: Sequence[str],
        *,
        label_names: Sequence[str] = (),
        info: dict[str, Any] | None = None,
        input_spec: InputSpec | None = None,
    ):
        self.config = config
        #: what the model was trained on (kind, layer, adata.raw); embed reads new data so
        self.input_spec = input_spec if input_spec is not None else InputSpec()
        self.variables = dict(variables)
        self.genes = pd.Index([str(g) for g in genes])
        if len(self.genes) != config.n_genes:
            raise ScatlasInputError(
                f"{len(self.genes)} genes given for a model of {config.n_genes} inputs"
            )
        self.label_names = list(label_names)
        self.info = dict(info or {})
        proj = self.variables.get(INPUT_PCA)
        if (proj is None) != (config.input_pcs is None):
            raise ScatlasInputError(
                f"a model with input_pcs={config.input_pcs} needs variables[{INPUT_PCA!r}] "
                "(and only such a model has them)")
        self._projection = None if proj is None else (
            np.asarray(proj["mean"], np.float32), np.asarray(proj["components"], np.float32))
        self._device_variables = jax.device_put(
            {k: v for k, v in self.variables.items() if k != INPUT_PCA})
        self._compiled: dict[str, tuple[Any, Any]] = {}
        self._encode, self._encode_after_first = self._encoders(self._default_precision)

    @property
    def _default_precision(self) -> str:
        return "bfloat16" if self.config.bf16 else "float32"

    def _encoders(self, precision: str) -> tuple[Any, Any]:
        """Jitted ``(encode(x), encode_after_first(h))`` computing the dense layers in
        ``precision`` (parameters stay float32; bfloat16 layers accumulate as XLA's dot does)."""
        if precision not in self._compiled:
            net = replace(self.config, bf16=precision == "bfloat16").net()
            self._compiled[precision] = (
                jax.jit(lambda v, x: net.apply(v, x, method=MetricNet.encode)),
                jax.jit(lambda v, h: net.apply(v, h, method=MetricNet.encode_after_first)),
            )
        return self._compiled[precision]

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def input_kind(self) -> str:
        """``"counts"`` or ``"lognorm"``: the input the model was trained on."""
        return self.input_spec.kind

    @property
    def loss_terms(self) -> dict[str, float]:
        """The training loss's terms as the log names them, with their weights
        (``w * metric + (1 - w) * mse + l1``): for :func:`~.train.plot_history`."""
        w = float(self.config.metric_weight)
        return {self.config.objective: w, "mse": 1.0 - w, "l1": 1.0}

    def __repr__(self) -> str:
        c = self.config
        kind = "" if self.input_kind == "counts" else f", input={self.input_kind!r}"
        return (f"MetricEncoder({c.n_genes} genes -> {list(c.hidden)} -> {c.latent_dim}, "
                f"objective={c.objective!r}, {len(self.label_names)} labels{kind})")

    def embed(
        self,
        data: Any,
        *,
        layer: str | None = None,
        input: str | None = None,
        use_raw: bool | None = None,
        batch_size: int = 10_000,
        min_overlap: float = 0.5,
        precision: str | None = None,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Embed cells: (n_cells, latent_dim) float32, unit-length rows.

        ``data``: an AnnData (genes aligned to the model's by name, missing ones zero-filled,
        refused below ``min_overlap``) or a matrix whose columns are the model's genes.
        The data are read as the model was trained (``self.input_spec``): ``input`` (None: the
        recorded kind, ``"counts"`` or ``"lognorm"``; another kind is honoured with a warning),
        ``layer`` (None: the recorded layer where ``data`` has it, else ``X``; ``"X"``: ``X``)
        and ``use_raw`` (None: ``adata.raw`` when the model was trained on it and ``data`` has
        one), :func:`~.inputs.resolve_input`; the values are checked against the kind (scaled
        or z-scored data, with negative values, are refused). Chunks of ``batch_size`` cells
        are embedded on the default JAX device. On the CPU,
        sparse input stays sparse for the first layer (``x @ W1`` over the non-zeros only,
        :mod:`scatlas.kernels.spmm`); the rest of the network runs jitted, on blocks of at most
        :data:`CPU_BLOCK_ROWS` cells (the product's cache-friendly size).

        ``precision``: ``"float32"`` or ``"bfloat16"`` for the dense layers (default: the
        precision the model was trained in). On a CPU with AVX512-BF16 XLA's bfloat16 products
        ran 1.7-1.8x faster than float32 ones (whole embedding at 2,000 genes: 1.46x); on the CPU
        the sparse first layer stays float32. Agreement with float32 is measured in
        ``bench/results/metric_cpu.md`` (smallest cosine, shared 15 nearest neighbours).
        """
        from .._progress import track
        from ..kernels import spmm

        batch_size = check_positive_int(batch_size, "batch_size")
        precision = self._default_precision if precision is None else precision
        if precision not in PRECISIONS:
            raise ScatlasInputError(f"precision must be one of {PRECISIONS}, got {precision!r}",
                                    param="precision")
        encode_full, encode_after_first = self._encoders(precision)
        sparse_first = _sparse_first_layer() and self._projection is None
        out, buffer = [], None
        data, layer, kind, where = resolve_input(data, self.input_spec, layer=layer,
                                                 input=input, use_raw=use_raw)
        chunks = model_chunks(data, self.genes, layer=layer, input=kind, where=where,
                              chunk_size=batch_size, min_overlap=min_overlap,
                              dense=not sparse_first)
        for x in track(chunks, desc="embedding", progress=progress):
            if self._projection is not None:  # the fixed PCA input layer
                mean, components = self._projection
                x = ((x.toarray() if sp.issparse(x) else np.asarray(x, np.float32)) - mean
                     ) @ components
            n = x.shape[0]
            # on the CPU backend the first layer runs on the host over the non-zeros only,
            # block by block into one buffer, each block then going through the jitted rest
            first = (spmm.csr_arrays(x) if sparse_first and (sp.issparse(x) or _mostly_zero(x))
                     else None)
            # blocks of a lone chunk are sized from its cells (no padding beyond a few rows);
            # later chunks keep the first chunk's block shape (one compiled shape)
            rows = _block_rows(batch_size if out else n)
            for start in range(0, n, rows):
                m = min(n, start + rows) - start
                pad = rows - m if m < rows and (out or start) else 0  # one shape for the tail
                if first is not None:
                    buffer = self._first_layer(first, start, start + m, buffer, pad)
                    block, encode = buffer[: m + pad], encode_after_first
                else:
                    block, encode = x[start: start + m], encode_full
                    if pad:
                        block = np.concatenate([block, np.zeros((pad, x.shape[1]), np.float32)])
                out.append(np.asarray(encode(self._device_variables, block))[:m])
        if not out:
            return np.zeros((0, self.latent_dim), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def _first_layer(self, X: Any, start: int, stop: int, buffer: np.ndarray | None,
                     pad: int) -> np.ndarray:
        """``X[start:stop] @ W1 + b1`` for :class:`~scatlas.kernels.spmm.CSRArrays` X, over its
        non-zeros, into the first rows of ``buffer`` (float32 (rows, hidden), reused between
        blocks; allocated when None or too small) followed by ``pad`` rows of zeros."""
        from ..kernels import spmm

        dense = self.variables["params"]["encoder"]["_Block_0"]["Dense_0"]
        kernel, bias = np.asarray(dense["kernel"]), np.asarray(dense["bias"])
        rows = stop - start + pad
        if buffer is None or buffer.shape[0] < rows:
            buffer = np.empty((rows, kernel.shape[1]), np.float32)
        h = spmm.matmul_rows(X, kernel, start, stop, out=buffer[: stop - start])
        h += bias
        buffer[stop - start: rows] = 0
        return buffer

    def save(self, directory: str | Path) -> Path:
        """Write the model folder (manifest, genes, weights) atomically."""
        return write_model(
            directory, kind=self.kind, config=asdict(self.config), variables=self.variables,
            genes=self.genes, extra={"label_names": self.label_names, "info": self.info,
                                     "input": self.input_spec.to_dict()},
        )

    @classmethod
    def from_saved(cls, saved: SavedModel) -> MetricEncoder:
        """The model of a saved folder; one saved before the input was recorded reads raw
        counts in ``X`` (``InputSpec()``)."""
        config = MetricConfig(**saved["config"])
        extra = saved["extra"]
        return cls(config, saved["variables"], saved["genes"],
                   label_names=extra.get("label_names", ()), info=extra.get("info", {}),
                   input_spec=InputSpec.from_dict(extra.get("input")))


#: on the CPU the dense layers run on blocks of at most this many cells: XLA's
#: (n, 1,024) x (1,024, 1,024) product ran at 200-203 GFLOPS for 1,000-2,500 rows, 182 at 5,000
#: and 161 at 10,000, whose activations outgrow the L3 (2-core Zen 4, python -m
#: bench.metric_parts: the dense layers for 10,000 cells 0.276 s in one call, 0.251 s in blocks)
CPU_BLOCK_ROWS = 2500


def _block_rows(batch_size: int) -> int:
    """Rows per call of the jitted dense layers: ``batch_size`` split into equal blocks of at
    most :data:`CPU_BLOCK_ROWS` on the CPU (10,000 -> 2,500), whole elsewhere."""
    if jax.default_backend() != "cpu" or batch_size <= CPU_BLOCK_ROWS:
        return batch_size
    blocks = -(-batch_size // CPU_BLOCK_ROWS)
    return -(-batch_size // blocks)


def _mostly_zero(x: np.ndarray, threshold: float = 0.3, sample_rows: int = 64) -> bool:
    """Fewer than ``threshold`` of the entries are non-zero (dense expression usually is),
    judged on ``sample_rows`` evenly spaced rows (counting a whole 10,000 x 28,231 chunk took
    0.21 s, an eighth of embedding it)."""
    rows = x[:: max(1, x.shape[0] // sample_rows)]
    return np.count_nonzero(rows) < threshold * rows.size


#: the sparse training step (sparse_ops: CSR batch, first layer over the non-zeros) is chosen
#: automatically from this many genes on and up to this fraction of non-zero inputs. Step time
#: sparse vs dense, batch 1,000, 10 % non-zero, 2-core Zen 4 (python -m bench.metric_parts):
#: 1,000 genes 0.242 vs 0.263 s, 2,000 0.289 vs 0.315 s, 28,231 1.51 vs 1.95 s; ad hoc, 2,000
#: genes at 30 % non-zero: 0.297 vs 0.314 s. Below 1,000 genes, and for narrower layers or other
#: batch sizes than SCimilarity's (1,024, batch 1,000), it was not measured.
SPARSE_STEP_MIN_GENES = 1000
SPARSE_STEP_MAX_DENSITY = 0.3


def use_sparse_step(
    requested: bool | None, config: MetricConfig, n_devices: int, density: float | None = None
) -> bool:
    """Whether to train on CSR batches with :mod:`.sparse_ops` (CPU only).

    ``requested=None`` chooses it when it is possible and pays (at least
    :data:`SPARSE_STEP_MIN_GENES` genes and at most :data:`SPARSE_STEP_MAX_DENSITY` non-zero);
    ``True`` insists (a clear error when it is not possible); ``False`` never.
    """
    pays = config.n_genes >= SPARSE_STEP_MIN_GENES and (
        density is None or density <= SPARSE_STEP_MAX_DENSITY)
    if requested is False or (requested is None and not pays):
        return False
    if config.input_pcs is not None:  # the input is the dense PCA scores
        if requested is True:
            raise ScatlasInputError("sparse_step=True is not possible with input_pcs (the "
                                    "network's input is the dense PCA scores)")
        return False
    blockers = []
    if jax.default_backend() != "cpu":
        blockers.append(f"it runs on the CPU only (the JAX backend is {jax.default_backend()!r})")
    if n_devices > 1:
        blockers.append(f"it runs on one device ({n_devices} used: pass data_parallel=False)")
    if config.bf16:
        blockers.append("it computes in float32 (bf16=True given)")
    if not blockers:
        from ..kernels import xla_ffi

        if not xla_ffi.available():
            blockers.append("its XLA custom calls are unavailable here (see "
                            "scatlas.kernels.xla_ffi)")
    if requested is True:
        if blockers:
            raise ScatlasInputError("sparse_step=True is not possible: " + "; ".join(blockers))
        return True
    return not blockers


def _sparse_first_layer() -> bool:
    """Embed with the first layer as a host sparse product (float32): on the CPU backend, where
    skipping the zeros of expression input (~90 %) beats the dense GEMM (kernels.spmm)."""
    return jax.default_backend() == "cpu"


# ----------------------------------------------------------------------------------- benchmark

def benchmark_callables(
    n_genes: int, batch_size: int = 1000, *, seed: int = 0, bf16: bool = False,
    sparse: bool | None = None,
) -> dict[str, Any]:
    """Timed units for ``bench/metric.py`` at SCimilarity's default architecture.

    ``train_step()`` runs one full jitted training step (forward, on-device semi-hard mining,
    triplet + MSE + L1 loss, backward, AdamW) on a fixed device-resident batch (~10% non-zero
    log-normalised values, 20 labels, 5 studies) and blocks until done; ``embed(X)`` embeds a
    (n, n_genes) float32 array in 10,000-cell chunks (``precision="bfloat16"``: dense layers in
    bfloat16). ``bf16=True`` computes the dense layers in
    bfloat16 (parameters float32), SCimilarity's own runs being float32. ``model``: the
    :class:`MetricEncoder` ``embed`` uses. ``sparse``: the step
    on a CSR batch (:mod:`.sparse_ops`); None chooses as :func:`scatlas.tl.train_metric` does
    (:func:`use_sparse_step`), reported as ``"sparse_step"``. On the CPU glibc is asked to
    keep freed memory (:mod:`scatlas._host_memory`), as :func:`~.train.fit` does while it runs;
    the setting stays for the process.
    """
    from .train import Trainer

    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.15, size=(batch_size, n_genes)).astype(np.float32)
    x = np.log1p(counts * 1e4 / np.maximum(counts.sum(1, keepdims=True), 1))
    batch = {"x": x, "label": rng.integers(0, 20, batch_size).astype(np.int32),
             "study": rng.integers(0, 5, batch_size).astype(np.int32)}
    cfg = MetricConfig(n_genes=n_genes, bf16=bf16)
    sparse = use_sparse_step(sparse, cfg, 1, density=float(np.count_nonzero(x)) / x.size)
    if sparse:  # the batch in CSR form: the sparse step (sparse_ops), as tl.train_metric chooses
        from .data import csr_arrays

        batch = {**csr_arrays(batch.pop("x")), **batch}
    tcfg = TrainConfig(max_steps=10_000, seed=seed, data_parallel=False)
    trainer = Trainer(MetricTask(cfg, tcfg, np.eye(20, dtype=bool)), tcfg)
    holder = {"ts": trainer.init_state(batch)}
    device_batch = trainer.put(batch)
    if jax.default_backend() == "cpu":  # as fit() does for the length of a run
        from .._host_memory import keep_freed_memory

        keep_freed_memory(tcfg.reuse_host_memory)

    def train_step() -> None:
        holder["ts"], metrics = trainer.train_step(holder["ts"], device_batch)
        jax.block_until_ready((holder["ts"], metrics))  # the whole update, not just the loss

    variables = jax.device_get({"params": holder["ts"].params, **holder["ts"].state})
    model = MetricEncoder(cfg, variables, [f"g{i}" for i in range(n_genes)],
                          input_spec=InputSpec("lognorm"))

    def embed(X: np.ndarray, precision: str = "float32") -> np.ndarray:
        return model.embed(X, input="lognorm", batch_size=10_000, precision=precision)

    return {"train_step": train_step, "embed": embed, "sparse_step": sparse, "model": model}
