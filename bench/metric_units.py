"""Timed units of the metric encoder for ``bench/metric.py`` and ``bench/metric_parts.py``.

Moved here from ``scatlas.models.metric`` (issue 18): benchmark helpers are not part of the
library. Importing this module imports JAX and :mod:`scatlas.models.metric`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from scatlas._host_memory import keep_freed_memory
from scatlas.models.data import csr_arrays
from scatlas.models.inputs import InputSpec
from scatlas.models.metric import MetricConfig, MetricEncoder, MetricTask, use_sparse_step
from scatlas.models.train import TrainConfig, Trainer


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
    :class:`~scatlas.models.metric.MetricEncoder` ``embed`` uses. ``sparse``: the step on a
    CSR batch (:mod:`scatlas.models.sparse_ops`); None chooses as
    :func:`scatlas.tl.train_metric` does (:func:`~scatlas.models.metric.use_sparse_step`),
    reported as ``"sparse_step"``. On the CPU glibc is asked to keep freed memory
    (:mod:`scatlas._host_memory`), as :func:`scatlas.models.train.fit` does while it runs; the
    setting stays for the process.
    """

    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.15, size=(batch_size, n_genes)).astype(np.float32)
    x = np.log1p(counts * 1e4 / np.maximum(counts.sum(1, keepdims=True), 1))
    batch = {"x": x, "label": rng.integers(0, 20, batch_size).astype(np.int32),
             "study": rng.integers(0, 5, batch_size).astype(np.int32)}
    cfg = MetricConfig(n_genes=n_genes, bf16=bf16)
    sparse = use_sparse_step(sparse, cfg, 1, density=float(np.count_nonzero(x)) / x.size)
    if sparse:  # the batch in CSR form: the sparse step (sparse_ops), as tl.train_metric chooses
        batch = {**csr_arrays(batch.pop("x")), **batch}
    tcfg = TrainConfig(max_steps=10_000, seed=seed, data_parallel=False)
    trainer = Trainer(MetricTask(cfg, tcfg, np.eye(20, dtype=bool)), tcfg)
    holder = {"ts": trainer.init_state(batch)}
    device_batch = trainer.put(batch)
    if jax.default_backend() == "cpu":  # as fit() does for the length of a run
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
