"""Benchmark ``metric_parts``: the pieces behind the metric encoder's CPU figures, each against the
alternative it replaced, in one process (medians of alternating calls).

The docstrings of :mod:`scatlas.kernels.spmm`, :mod:`scatlas.models.xla_ffi`,
:mod:`scatlas._host_memory` and :mod:`scatlas.models.metric` quote these rows:

- ``spmm``: ``X @ W`` (10,000 cells, 10 % non-zero) by the per-cell kernel (small W) or the
  gene-chunk kernel (large W) against the row-blocked gene-major kernel (``_csr_matmul``) and
  scipy; ``X.T @ D`` (1,000 cells) against scipy;
- ``callback``: what ``jax.pure_callback`` costs to pass a 28,231 x 1,024 float32 operand in, or
  to return a result that size (a callback doing nothing else);
- ``mining``: semi-hard mining of a 1,000-cell batch by the host loop (CPU backend) against
  XLA's array form;
- ``blocks``: XLA's 1,024-wide product by rows, and the embedding's dense layers for 10,000
  cells in one call against equal blocks;
- ``restore``: embedding after a training run, glibc at its static defaults against the
  setting ``scatlas._host_memory`` restores;
- ``step``: one training step (batch 1,000, 10 % non-zero), sparse against dense, per gene count,
  with the minor page faults per step (``getrusage``), with freed memory kept (as ``fit`` runs)
  and returned (the setting ``fit`` restores afterwards).

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


def _alternate(calls: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, float]:
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
    import scipy.sparse as sp

    X = sp.random(n, genes, density=0.1, format="csr", dtype=np.float32, random_state=seed)
    X.sort_indices()
    return X


def spmm_rows(repeats: int) -> dict[str, Any]:
    from scatlas.kernels import spmm

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
    import jax
    import jax.numpy as jnp

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


def mining_rows(repeats: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from scatlas.models import host_mining, metric_losses

    rng = np.random.default_rng(0)
    B = 1000
    z = rng.normal(size=(B, 128)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    labels = jnp.asarray(rng.integers(0, 20, B), jnp.int32)
    studies = jnp.asarray(rng.integers(0, 5, B), jnp.int32)
    args = (metric_losses.squared_distances(jnp.asarray(z)),
            metric_losses.candidate_pairs(labels, studies, True),
            metric_losses.candidate_negatives(labels, jnp.eye(20, dtype=bool)),
            jnp.asarray(rng.random((B, B)), jnp.float32))
    host_args = [np.asarray(a) for a in args]
    in_xla = jax.jit(lambda *a: metric_losses.mine_in_xla(*a, margin=0.05))
    return {"semi-hard mining, batch 1,000 (20 labels, 5 studies)": _alternate({
        "host loop (host_mining.mine_on_host)": lambda: host_mining.mine_on_host(
            *host_args, 0.05, "semihard"),
        "XLA array form (metric_losses.mine_in_xla)": lambda: jax.block_until_ready(
            in_xla(*args))}, repeats)}


def block_rows(repeats: int) -> dict[str, Any]:
    """XLA's (n, 1,024) x (1,024, 1,024) product by rows, and the embedding's dense layers for
    10,000 cells in one call or in blocks (``metric.CPU_BLOCK_ROWS``)."""
    import jax
    import jax.numpy as jnp

    from scatlas.models import metric

    rng = np.random.default_rng(0)
    B = jnp.asarray(rng.standard_normal((1024, 1024)), jnp.float32)
    product = jax.jit(lambda a, b: a @ b)
    sizes = (1000, 2500, 5000, 10_000)
    operands = {n: jnp.asarray(rng.standard_normal((n, 1024)), jnp.float32) for n in sizes}
    times = _alternate({n: lambda A=A: product(A, B).block_until_ready()
                        for n, A in operands.items()}, repeats)
    gflops = {f"{n:,} rows, GFLOPS": round(2 * n * 1024 * 1024 / times[n] / 1e9, 1)
              for n in sizes}
    from bench.metric_units import benchmark_callables

    model = benchmark_callables(2000)["model"]
    H = rng.standard_normal((10_000, 1024)).astype(np.float32)
    _, after_first = model._encoders("float32")

    def layers(rows: int) -> None:
        for s in range(0, H.shape[0], rows):
            np.asarray(after_first(model._device_variables, H[s: s + rows]))

    rows = metric._block_rows(10_000)
    return {"XLA product (n, 1,024) x (1,024, 1,024)": gflops,
            "embedding dense layers, 10,000 cells": _alternate(
                {"one call": lambda: layers(10_000),
                 f"blocks of {rows:,} rows": lambda: layers(rows)}, repeats)}


def restore_rows(repeats: int) -> dict[str, Any]:
    """Embedding 10,000 cells at 2,000 genes (CSR and dense input) after a training run, with
    glibc left at its static defaults (mmap from 128 KiB) or as ``_host_memory`` restores it."""
    import scipy.sparse as sp

    from bench.metric_units import benchmark_callables
    from scatlas import _host_memory

    libc = _host_memory._libc()  # noqa: SLF001
    if libc is None:
        return {"embedding after training": {"skipped": "needs glibc"}}
    model = benchmark_callables(2000)["model"]
    rng = np.random.default_rng(1)
    counts = rng.poisson(0.15, size=(10_000, 2000)).astype(np.float32)
    X = np.log1p(counts * 1e4 / np.maximum(counts.sum(1, keepdims=True), 1)).astype(np.float32)

    def static() -> None:
        libc.mallopt(_host_memory._M_MMAP_MAX, 65536)  # noqa: SLF001
        libc.mallopt(_host_memory._M_MMAP_THRESHOLD, 128 * 1024)  # noqa: SLF001
        libc.mallopt(_host_memory._M_TRIM_THRESHOLD, 128 * 1024)  # noqa: SLF001
        libc.malloc_trim(0)

    out: dict[str, Any] = {}
    for name, data in (("CSR", sp.csr_matrix(X)), ("dense", X)):
        row: dict[str, Any] = {}
        for tag, setting in (("static glibc defaults", static),
                             ("as restored", lambda: _host_memory.keep_freed_memory(False))):
            setting()
            model.embed(data, input="lognorm")
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            row[f"{tag}, s"] = _alternate({"e": lambda d=data: model.embed(d, input="lognorm")},
                                          repeats)["e"]
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            row[f"{tag}, page faults a call"] = round(faults / (repeats + 1))
        out[f"embedding after training, 10,000 cells x 2,000 genes, {name} input"] = row
    _host_memory.keep_freed_memory(False)
    return out


def step_rows(genes: Sequence[int], repeats: int) -> dict[str, Any]:
    from bench.metric_units import benchmark_callables
    from scatlas._host_memory import keep_freed_memory

    out: dict[str, Any] = {}
    for g in genes:
        steps = {kind: benchmark_callables(g, sparse=kind == "sparse")["train_step"]
                 for kind in ("sparse", "dense")}
        row: dict[str, Any] = {}
        for keep in (True, False):
            keep_freed_memory(keep)
            tag = "kept" if keep else "returned (the setting fit restores)"
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


def loader_rows(repeats: int) -> dict[str, Any]:
    """The loader's per-block input check (``CellBatches(check_input=True)``, run on backed and
    lazily read inputs) beside the same block's log-normalisation, 1,000 cells of raw counts."""
    from scatlas.models.data import check_rows, lognorm

    out: dict[str, Any] = {}
    rows = np.arange(1000)
    for genes in (2000, 28231):
        X = _csr(1000, genes)
        X.data = np.floor(X.data * 10)  # counts
        for form, block in (("CSR", X), ("dense", X.toarray())):
            out[f"loader block, 1,000 x {genes:,} {form}"] = _alternate(
                {"check_rows (input check)": lambda b=block: check_rows(b, rows, counts=True),
                 "lognorm (the block's transform)": lambda b=block: lognorm(b)}, repeats)
    return out


PARTS = {"spmm": spmm_rows, "callback": callback_rows, "mining": mining_rows,
         "blocks": block_rows, "restore": restore_rows, "loader": loader_rows}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metric_parts")
    parser.add_argument("--genes", default="2000,5000,10000,28231")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--parts", default=",".join([*PARTS, "steps"]),
                        help="parts to run (default all); the rows of the others are kept from "
                        "the existing result file")
    args = parser.parse_args(argv)
    genes = [int(float(g)) for g in args.genes.split(",")]
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - {*PARTS, "steps"})
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {[*PARTS, 'steps']}")
    out = Path(args.out)
    previous = out / "metric_parts_cpu.json"
    from .environment import capture, describe_hardware

    record: dict[str, Any] = {"benchmark": "metric_parts",
                              "machine": describe_hardware(capture("cpu")),
                              "repeats": args.repeats, "unit": "median seconds", "rows": {}}
    if len(parts) < len(PARTS) + 1 and previous.is_file():
        record["rows"] = json.loads(previous.read_text())["rows"]
    for name in parts:
        log(f"[metric_parts] {name} ...")
        part = step_rows(genes, args.repeats) if name == "steps" else PARTS[name](args.repeats)
        record["rows"].update(part)
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
