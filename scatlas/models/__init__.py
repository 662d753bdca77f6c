"""JAX / Flax / Optax models and the training stack they share.

- :mod:`.train`: :class:`TrainConfig`, :func:`fit` (jitted step, AdamW + cosine schedule,
  clipping, data parallelism over devices, orbax checkpoints, early stopping, logging);
- :mod:`.data`: :class:`CellBatches`, deterministic balanced mini-batches with prefetching;
- :mod:`.metric`: :class:`MetricEncoder`, the SCimilarity-style metric-learning encoder;
- :mod:`.covel`: :class:`CoVEL`, graph-linked, fine-grained and contrastive views (issue 21);
- :mod:`.io`: saved model folders; :func:`load` reads any of them.

Submodules load on first use (importing jax takes a second).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": ".train",
    "fit": ".train",
    "CellBatches": ".data",
    "MetricEncoder": ".metric",
    "MetricConfig": ".metric",
    "load": ".io",
    "CoVEL": ".covel",
    "MichiGAN": ".michigan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'scatlas.models' has no attribute {name!r}")
