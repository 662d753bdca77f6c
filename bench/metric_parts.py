"""Benchmark ``metric_parts``: the pieces behind the metric encoder's CPU figures, each against the
alternative it replaced, in one process (medians of alternating calls).

The docstrings of :mod:`scatlas.kernels.spmm`, :mod:`scatlas.kernels.xla_ffi`,
:mod:`scatlas._host_memory` and :mod:`scatlas.models.metric` quote these rows:

- ``spmm``: ``X @ W`` (10,000 cells, 10 % non-zero) by the per-cell kernel (small W) or the
  gene-chunk kernel (large W) against the row-blocked gene-major kernel (``_csr_matmul``) and
  scipy; ``X.T @ D`` (1,000 cells) against scipy;
- ``callback``: what ``jax.pure_callback`` costs to pass a 28,231 x 1,024 float32 operand in, or
  to return a result that size (a callback doing nothing else);
- ``gram``: ``A.T @ A`` for A 28,231 x 1,024 by BLAS ``ssyrk`` (custom call) against XLA;
- ``step``: one training step (batch 1,000, 10 % non-zero), sparse against dense, per gene count,
  with the minor page faults per step (``getrusage``), with and without freed memory kept.

Usage::

    python -m bench.metric_parts [--genes 2000,5000,10000,28231] [--repeats 5]

Writes ``bench/results/metric_parts_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .runner import DEFAULT_OUT, log


def _alternate(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, one warm-up each, then rounds in alternating order."""
    for f in calls.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - start)
    return {k: round(float(np.median(v)), 4) for k, v in times.items()}


def _csr(n: int, genes: int, seed: int = 1) -> Any:
    import scipy.sparse as sp  # noqa: PLC0415

    X = sp.random(n, genes, density=0.1, format="csr", dtype=np.float32, random_state=seed)
    X.sort_indices()
    return X


def spmm_rows(repeats: int) -> dict[str, Any]:
    from scatlas.kernels import spmm  # noqa: PLC0415

    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for genes in (2000, 28231):
        X = _csr(10_000, genes)
        W = rng.standard_normal((genes, 1024)).astype(np.float32)
        ip = X.indptr.astype(np.int64)

        def blocked(X=X, W=W, ip=ip) -> None:
            o = np.empty((X.shape[0], W.shape[1]), np.float32)
            spmm._csr_matmul(ip, X.indices, X.data, W, o, spmm.ROWS_PER_BLOCK)

        calls = {"scatlas (chosen kernel)": lambda X=X, W=W: spmm.sparse_matmul(X, W),
                 "row-blocked gene-major (_csr_matmul)": blocked}
        if genes == 2000:
            calls["scipy"] = lambda X=X, W=W: X @ W
        out[f"X @ W, 10,000 x {genes:,}"] = _alternate(calls, repeats)
    X = _csr(1000, 28231)
    D = rng.standard_normal((1000, 1024)).astype(np.float32)
    out["X.T @ D, 1,000 x 28,231"] = _alternate(
        {"scatlas sparse_t_matmul": lambda: spmm.sparse_t_matmul(X, D), "scipy": lambda: X.T @ D},
        repeats)
    return out


def callback_rows(repeats: int) -> dict[str, Any]:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    big = jnp.ones((28231, 1024), jnp.float32)
    small = jnp.ones((1000, 1024), jnp.float32)
    z_small, z_big = np.zeros((1000, 1024), np.float32), np.zeros((28231, 1024), np.float32)
    spec_small = jax.ShapeDtypeStruct((1000, 1024), jnp.float32)
    spec_big = jax.ShapeDtypeStruct((28231, 1024), jnp.float32)
    big_in = jax.jit(lambda a: jax.pure_callback(lambda a: z_small, spec_small, a))
    big_out = jax.jit(lambda a: jax.pure_callback(lambda a: z_big, spec_big, a))
    none = jax.jit(lambda a: jax.pure_callback(lambda a: z_small, spec_small, a))
    return {"pure_callback, 28,231 x 1,024 float32": _alternate({
        "operand in": lambda: big_in(big).block_until_ready(),
        "result out": lambda: big_out(small).block_until_ready(),
        "neither (1,000 x 1,024)": lambda: none(small).block_until_ready()}, repeats)}


def gram_rows(repeats: int) -> dict[str, Any]:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from scatlas.kernels import xla_ffi  # noqa: PLC0415

    if not xla_ffi.available():
        return {"A.T @ A": {"skipped": "custom calls unavailable"}}
    A = jnp.asarray(np.random.default_rng(0).standard_normal((28231, 1024)).astype(np.float32))
    syrk, xla = jax.jit(xla_ffi.gram), jax.jit(lambda a: a.T @ a)
    return {"A.T @ A, A 28,231 x 1,024": _alternate({
        "ssyrk custom call": lambda: syrk(A).block_until_ready(),
        "XLA": lambda: xla(A).block_until_ready()}, repeats)}


def step_rows(genes: Sequence[int], repeats: int) -> dict[str, Any]:
    from scatlas._host_memory import keep_freed_memory  # noqa: PLC0415
    from scatlas.models.metric import benchmark_callables  # noqa: PLC0415

    out: dict[str, Any] = {}
    for g in genes:
        steps = {kind: benchmark_callables(g, sparse=kind == "sparse")["train_step"]
                 for kind in ("sparse", "dense")}
        row: dict[str, Any] = {}
        for keep in (True, False):
            keep_freed_memory(keep)
            tag = "kept" if keep else "glibc defaults"
            row.update({f"{k} step, memory {tag}": v
                        for k, v in _alternate(steps, repeats).items()})
            for kind, f in steps.items():
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(3):
                    f()
                faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
                row[f"{kind} step page faults, memory {tag}"] = round(faults)
        keep_freed_memory(False)
        out[f"train step, {g:,} genes"] = row
        del steps
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metric_parts")
    parser.add_argument("--genes", default="2000,5000,10000,28231")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    genes = [int(float(g)) for g in args.genes.split(",")]
    from .environment import capture, describe_hardware  # noqa: PLC0415

    record: dict[str, Any] = {"benchmark": "metric_parts",
                              "machine": describe_hardware(capture("cpu")),
                              "repeats": args.repeats, "unit": "median seconds", "rows": {}}
    for part in (spmm_rows, callback_rows, gram_rows):
        log(f"[metric_parts] {part.__name__} ...")
        record["rows"].update(part(args.repeats))
    log("[metric_parts] step_rows ...")
    record["rows"].update(step_rows(genes, args.repeats))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metric_parts_cpu.json").write_text(json.dumps(record, indent=1))
    lines = ["## metric_parts — cpu", "", f"Machine: {record['machine']}; median seconds of "
             f"{args.repeats} alternating calls (page faults: per step).", ""]
    for name, row in record["rows"].items():
        lines += [f"**{name}**", "", "| | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in row.items()] + [""]
    (out / "metric_parts_cpu.md").write_text("\n".join(lines))
    log(f"[metric_parts] wrote {out / 'metric_parts_cpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
