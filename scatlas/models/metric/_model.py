"""The user-facing :class:`MetricEncoder`: embedding new cells, save / load; the choice of
the sparse training step (:func:`use_sparse_step`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..._validate import ScatlasInputError, check_positive_int
from ..inputs import InputSpec, model_chunks, resolve_input
from ..io import SavedModel, write_model
from ._module import INPUT_PCA, PRECISIONS, MetricConfig, MetricNet

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
        (``w * metric + (1 - w) * mse + l1``): for :func:`~scatlas.models.train.plot_history`."""
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
        one), :func:`~scatlas.models.inputs.resolve_input`; the values are checked against the
        kind (scaled or z-scored data, with negative values, are refused). Chunks of
        ``batch_size`` cells are embedded on the default JAX device. On the CPU,
        sparse input stays sparse for the first layer (``x @ W1`` over the non-zeros only,
        :mod:`scatlas.kernels.spmm`); the rest of the network runs jitted, on blocks of at most
        :data:`CPU_BLOCK_ROWS` cells (the product's cache-friendly size).

        ``precision``: ``"float32"`` or ``"bfloat16"`` for the dense layers (default: the
        precision the model was trained in). On a CPU with AVX512-BF16 XLA's bfloat16 products
        ran 1.7-1.8x faster than float32 ones (whole embedding at 2,000 genes: 1.46x); on the CPU
        the sparse first layer stays float32. Agreement with float32 is measured in
        ``bench/results/metric_cpu.md`` (smallest cosine, shared 15 nearest neighbours).
        """
        from ..._progress import track
        from ...kernels import spmm

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
        from ...kernels import spmm

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
    """Whether to train on CSR batches with :mod:`scatlas.models.sparse_ops` (CPU only).

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
        from .. import xla_ffi

        if not xla_ffi.available():
            blockers.append("its XLA custom calls are unavailable here (see "
                            "scatlas.models.xla_ffi)")
    if requested is True:
        if blockers:
            raise ScatlasInputError("sparse_step=True is not possible: " + "; ".join(blockers))
        return True
    return not blockers


def _sparse_first_layer() -> bool:
    """Embed with the first layer as a host sparse product (float32): on the CPU backend, where
    skipping the zeros of expression input (~90 %) beats the dense GEMM (kernels.spmm)."""
    return jax.default_backend() == "cpu"

