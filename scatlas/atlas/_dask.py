"""The Dask side of the atlas pipeline: the cluster, worker-side tasks and resource probes.

Worker processes run one thread each, with every BLAS / OpenMP / XLA pool at one thread
(:data:`WORKER_ENV`), so that 2 workers on 2 cores use 2 cores, not 2 x (BLAS threads).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import backend

#: environment of the worker processes of the local cluster (no nested thread pools)
WORKER_ENV = {
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}

_MODELS: dict[str, Any] = {}


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``getrusage``; Linux reports KiB,
    macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@contextlib.contextmanager
def cluster(client: Any = None, scheduler: str | None = None,
            n_workers: int | None = None, memory_limit: str | None = "3.5GiB") -> Iterator[Any]:
    """A ``distributed.Client``: ``client`` as given, one connected to ``scheduler`` (an
    address), else a new ``LocalCluster`` of ``n_workers`` single-threaded worker processes
    (default: the usable cores, at most 4), closed on exit."""
    import distributed

    if client is not None:
        yield client
        return
    if scheduler:
        with distributed.Client(scheduler) as cl:
            yield cl
        return
    n = n_workers or max(1, min(backend.cpu_threads(), 4))
    with distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                  dashboard_address=None, memory_limit=memory_limit,
                                  env=dict(WORKER_ENV)) as lc, distributed.Client(lc) as cl:
        yield cl


def worker_peak_rss(client: Any) -> dict[str, int]:
    """Peak RSS (bytes) of every worker process of ``client``'s cluster, by worker address."""
    return {str(k): int(v) for k, v in client.run(peak_rss).items()}


def _model(model: Any) -> Any:
    """The model of a folder, loaded once per worker process (or the object itself)."""
    if not isinstance(model, str | os.PathLike):
        return model
    key = str(Path(model).resolve())
    if key not in _MODELS:
        from ..models import load

        _MODELS[key] = load(key)
    return _MODELS[key]


def embed_block(x: Any, model: Any, batch_size: int) -> np.ndarray:
    """(rows, latent_dim) float32 embedding of a block of log-normalised cells whose columns
    are the model's genes (``model.embed(x, input="lognorm")``), BLAS on one thread."""
    import warnings

    with backend.serial_blas(), warnings.catch_warnings():
        # a counts model warns about lognorm input; x is its own normalisation (log1p of
        # counts per 1e4 over its genes), done by scanpy upstream
        warnings.filterwarnings("ignore", message="this model was trained on raw counts")
        z = _model(model).embed(x, input="lognorm", batch_size=batch_size, progress=False)
    return np.asarray(z, dtype=np.float32)
