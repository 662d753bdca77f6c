"""Benchmark ``mvae``: multimodal VAE training throughput (cells/s), ours (JAX/Flax) vs totalVI.

Issue 6's requirement: training throughput for RNA + protein at 2,000 genes on CPU and on an
H100-class GPU (>= 100k cells/s there), side by side with totalVI at its default configuration.
The harness size is the number of cells.

Workload: ``scatlas.datasets.synthetic(n, 2000, protein=True, n_proteins=50, seed)``: raw RNA
counts (CSR, ~10 % non-zero) and 50 protein counts per cell, written once to an ``.h5ad`` under
``bench/.cache/`` (the peer reads the same file).

Methods (group ``train``; the ratio column is baseline time / our time per call, and the
``cells/s`` column is what to compare across methods):

``scatlas.mvae.epoch[b=B]``
    One epoch of training on 90 % of the cells (totalVI's default split) at batch ``B``:
    ``ceil(0.9 n / B)`` steps of the jitted train step (two experts, PoE posteriors of the joint
    and of each modality, NB decoders with cross-reconstruction, library model, backward, AdamW)
    fed by :class:`~scatlas.models.mvae_data.MultiModalBatches` through the stack's prefetching
    iterator (row gathering and densifying on the host, overlapped with the step). The default
    architecture (latent 20, hidden 128, one layer each side). The first (warm-up) call compiles.
``scatlas.mvae.step[b=B]``
    One training step on a fixed device-resident batch (no data loading): the compute ceiling.
``totalvi.epoch``
    ``scvi.model.TOTALVI(adata)`` and ``model.train(max_epochs=E)`` at their defaults (batch 256,
    lr 4e-3, 90/10 split with a validation pass per epoch), CPU torch with ``threads`` threads,
    in ``bench/.peers/totalvi`` (``bench/peers/mvae_totalvi_install.sh``). The peer runs once
    per size (its first call); its ``cells/s`` is the training cells over the median epoch time
    measured inside the peer after the first epoch (``bench/peers/mvae_totalvi_runner.py``),
    not the harness time of the call (later calls return the recorded run). Above
    ``peer_max_size`` cells it is skipped.

Columns: ``cells/s`` (training cells processed per second), ``peer s`` (median epoch seconds
inside the peer), ``loss`` (our training loss after the call, a sanity check that it trains).
``python -m bench.mvae`` replaces totalVI's timing columns by its in-peer epoch times (the
harness times of its calls are kept as ``harness_times_s``), so the ratio column compares one
epoch of each (9,000 training cells for totalVI, ``ceil(0.9 n / B) * B`` for ours).

Usage::

    python -m bench.mvae [--sizes 20000,100000] [--repeats 3] [--methods ours]
    python -m bench run mvae --sizes 20000 --repeats 3     # once "mvae" is in bench.REGISTRY
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import workloads
from .runner import DEFAULT_OUT, log, result_path, save_record
from .spec import Benchmark, Method, Metric, Workload

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "peers" / "mvae_totalvi_runner.py"
INSTALL = HERE / "peers" / "mvae_totalvi_install.sh"
PEER_ENV = "SCATLAS_PEER_PYTHON_TOTALVI"

DEFAULT_PARAMS: dict[str, Any] = {
    "n_genes": 2000,
    "n_proteins": 50,
    "batch_sizes": "256,1024",
    "peer_epochs": 3,
    "peer_max_size": 200_000,
    "threads": 2,  # torch.set_num_threads in the peer
    "train_fraction": 0.9,
    "seed": 0,
}

METRICS = {
    "cells_per_s": Metric("cells/s", ",.0f", higher_is_better=True),
    "peer_s": Metric("peer s", ".3g"),
    "loss": Metric("loss", ".4g"),
}


def peer_python() -> Path | None:
    """The totalVI peer's interpreter: ``$SCATLAS_PEER_PYTHON_TOTALVI``, else the peer venv."""
    env = os.environ.get(PEER_ENV, "").strip()
    path = Path(env) if env else HERE / ".peers" / "totalvi" / "bin" / "python"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _batch_sizes(params: Mapping[str, Any]) -> list[int]:
    raw = params["batch_sizes"]
    items = raw.split(",") if isinstance(raw, str) else [raw] if isinstance(raw, int) else raw
    return [int(b) for b in items]


# --- workload ------------------------------------------------------------------------------------


def _data_path(size: int, p: Mapping[str, Any]) -> Path:
    key = (f"mvae_{size}_{p['n_genes']}_{p['n_proteins']}_{p['seed']}_"
           f"{workloads.generator_fingerprint()}.h5ad")
    path = workloads.cache_dir() / key
    if not path.is_file():
        from scatlas.datasets import synthetic
        from scatlas.io import write_h5ad

        start = time.perf_counter()
        adata = synthetic(size, p["n_genes"], protein=True, n_proteins=p["n_proteins"],
                          seed=p["seed"], progress=False)
        adata.uns.pop("synthetic", None)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_h5ad(adata, path)
        log(f"[mvae] wrote {path} in {time.perf_counter() - start:.1f} s")
    return path


def build(size: int, device: str, params: Mapping[str, Any]) -> Workload:
    """The synthetic cells on disk and in memory; our trainers are built at their first call."""
    import anndata as ad

    p = dict(params)
    path = _data_path(size, p)
    adata = ad.read_h5ad(path)
    nnz = adata.X.nnz / (adata.n_obs * adata.n_vars)
    info = {
        "n_cells": size, "n_genes": p["n_genes"], "n_proteins": p["n_proteins"],
        "rna_density": round(float(nnz), 4),
        "summary": (f"{size:,} cells x {p['n_genes']:,} genes (CSR, {nnz:.1%} non-zero) + "
                    f"{p['n_proteins']} proteins; epochs over {p['train_fraction']:.0%} of the "
                    f"cells; peer torch threads {p['threads']}"),
    }
    return Workload(host=adata, data=adata, info=info,
                    extra={"params": p, "path": path, "ours": {}, "peer": None})


# --- ours ----------------------------------------------------------------------------------------


def _ours(w: Workload, batch_size: int) -> dict[str, Any]:
    if batch_size not in w.extra["ours"]:
        import jax

        from scatlas.models.mvae import MVAEConfig, MVAETask
        from scatlas.models.mvae_data import MultiModalBatches, read_modalities
        from scatlas.models.train import TrainConfig, Trainer

        p = w.extra["params"]
        start = time.perf_counter()
        mods = read_modalities(w.host, {"rna": "X", "protein": "obsm/protein_counts"},
                               {"rna": "nb", "protein": "nb"})
        n = w.host.n_obs
        rows = np.arange(n)
        libs = [np.log(np.maximum(np.asarray(m.matrix.sum(1)).ravel(), 1)) for m in mods]
        cfg = MVAEConfig(("rna", "protein"), ("nb", "nb"), tuple(m.n_features for m in mods),
                         log_lib_mean=tuple(float(v.mean()) for v in libs),
                         log_lib_sd=tuple(float(max(v.std(), 0.1)) for v in libs),
                         kl_warmup_steps=1000)
        bs = min(batch_size, n)
        batches = MultiModalBatches(mods, batch_size=bs, rows=rows, seed=p["seed"])
        tcfg = TrainConfig(max_steps=10**9, learning_rate=2e-3, seed=p["seed"],
                           data_parallel=False)
        trainer = Trainer(MVAETask(cfg), tcfg)
        ts = trainer.init_state(batches.batch(0))
        fixed = trainer.put(batches.batch(0))
        w.extra["ours"][batch_size] = {
            "trainer": trainer, "ts": ts, "batches": batches, "t": 0, "fixed": fixed,
            "steps": math.ceil(p["train_fraction"] * n / bs), "bs": bs, "jax": jax,
        }
        w.info[f"ours_setup_s[b={batch_size}]"] = round(time.perf_counter() - start, 3)
        w.info["jax_devices"] = [str(d) for d in jax.devices()]
    return w.extra["ours"][batch_size]


def _ours_epoch(batch_size: int):
    def call(w: Workload) -> dict[str, Any]:
        o = _ours(w, batch_size)
        trainer, jax = o["trainer"], o["jax"]
        start = time.perf_counter()
        stream = o["batches"].iterate(o["t"], prefetch=4, put=trainer.put)
        try:
            ts = o["ts"]
            for _ in range(o["steps"]):
                ts, metrics = trainer.train_step(ts, next(stream))
            jax.block_until_ready(ts)  # the last update too, not only its loss
            loss = float(jax.device_get(metrics["loss"]))
        finally:
            stream.close()
        seconds = time.perf_counter() - start
        o["ts"], o["t"] = ts, o["t"] + o["steps"]
        return {"cells": o["steps"] * o["bs"], "seconds": seconds, "loss": loss}
    return call


def _ours_step(batch_size: int):
    def call(w: Workload) -> dict[str, Any]:
        o = _ours(w, batch_size)
        start = time.perf_counter()
        o["ts"], metrics = o["trainer"].train_step(o["ts"], o["fixed"])
        o["jax"].block_until_ready(o["ts"])  # the whole update, not only the loss
        loss = float(o["jax"].device_get(metrics["loss"]))
        return {"cells": o["bs"], "seconds": time.perf_counter() - start, "loss": loss}
    return call


# --- peer ----------------------------------------------------------------------------------------


def _peer(w: Workload) -> dict[str, Any]:
    if w.extra["peer"] is None:
        python = peer_python()
        if python is None:
            raise RuntimeError(f"no totalVI peer python (run {INSTALL} or set {PEER_ENV})")
        p = w.extra["params"]
        cmd = [str(python), "-W", "ignore", str(RUNNER), str(w.extra["path"]),
               "--epochs", str(p["peer_epochs"]), "--threads", str(p["threads"])]
        log_dir = workloads.cache_dir() / "peers"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "totalvi.log", "ab") as err:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not lines:
            raise RuntimeError(f"totalVI peer failed (code {out.returncode}); see "
                               f"{log_dir / 'totalvi.log'}")
        reply = json.loads(lines[-1])
        w.extra["peer"] = reply
        keep = ("scvi_tools", "torch", "torch_threads", "n_train", "setup_s", "epoch_s",
                "batch_size")
        w.info["peer"] = {k: reply.get(k) for k in keep}
    return w.extra["peer"]


def _peer_epoch(w: Workload) -> dict[str, Any]:
    reply = _peer(w)
    epochs = reply["epoch_s"][1:] or reply["epoch_s"]
    seconds = float(np.median(epochs))
    return {"cells": reply["n_train"], "seconds": seconds, "peer_s": seconds}


def methods(params: Mapping[str, Any]) -> list[Method]:
    """Ours per batch size (an epoch through the stream; one step on a fixed batch), totalVI."""
    out = []
    for b in _batch_sizes(params):
        out.append(Method(f"scatlas.mvae.epoch[b={b}]", _ours_epoch(b), "ours", "train",
                          f"one epoch (90% of the cells) at batch {b} through the prefetched "
                          "batch stream"))
    for b in _batch_sizes(params):
        out.append(Method(f"scatlas.mvae.step[b={b}]", _ours_step(b), "ours", "step",
                          f"one step on a fixed device-resident batch of {b}"))
    desc = "scvi-tools TOTALVI defaults, one epoch (batch 256, validation pass), CPU torch"
    if peer_python() is None:
        out.append(Method("totalvi.epoch", _peer_epoch, "baseline", "train", desc, max_size=0,
                          skip_reason=f"peer python not found (run {INSTALL} or set "
                                      f"{PEER_ENV})"))
    else:
        out.append(Method("totalvi.epoch", _peer_epoch, "baseline", "train", desc,
                          max_size=int(params["peer_max_size"]),
                          skip_reason="the peer's epochs take too long on this machine"))
    return out


def accuracy(w: Workload, method: Method, output: Any) -> dict[str, Any]:
    """Throughput measured inside the call (ours) or inside the peer (totalVI)."""
    out: dict[str, Any] = {"cells_per_s": output["cells"] / max(output["seconds"], 1e-9)}
    for key in ("peer_s", "loss"):
        if key in output:
            out[key] = output[key]
    return out


BENCHMARK = Benchmark(
    name="mvae",
    description=("Multimodal VAE (PoE posterior, RNA NB + protein NB, 2,000 genes + 50 "
                 "proteins, latent 20): training throughput in cells/s, scatlas (JAX/Flax) vs "
                 "totalVI (scvi-tools defaults, CPU torch, own venv). Size = cells."),
    build=build,
    methods=methods,
    accuracy=accuracy,
    metrics=METRICS,
    default_sizes=(20_000,),
    default_params=DEFAULT_PARAMS,
    size_label="cells",
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.mvae``: run the benchmark (registering it if needed), write the table."""
    from . import REGISTRY
    from .__main__ import parse_params
    from .runner import run_benchmark

    parser = argparse.ArgumentParser(prog="python -m bench.mvae",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20000", help="comma-separated cell counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=None,
                        help="comma-separated names, patterns or roles (ours, baseline)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override {sorted(DEFAULT_PARAMS)}")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first call compiles ours / runs the peer)")
    REGISTRY.setdefault("mvae", ("bench.mvae", "multimodal VAE: training cells/s vs totalVI"))
    methods_ = [m.strip() for m in args.methods.split(",")] if args.methods else None
    record = run_benchmark("mvae", sizes=args.sizes, repeats=args.repeats, warmup=args.warmup,
                           device=args.device, out=args.out, methods=methods_,
                           budget_s=args.budget, report=False, **parse_params(args.param))
    peer_times(record)
    path = result_path(args.out, "mvae", record["device"])
    save_record(record, path)
    from .report import write_benchmark_report

    write_benchmark_report(record, path.parent)
    log(f"[mvae] wrote {path} and {path.with_suffix('.md')}")
    return 0


def peer_times(record: dict[str, Any]) -> None:
    """totalVI's timing columns := its epoch times measured inside the peer (after the first
    epoch), so that the ratio column compares an epoch of theirs with an epoch of ours; the
    harness times of its calls (the recorded run returned again) are meaningless."""
    for size in record["results"].values():
        res = size["methods"].get("totalvi.epoch")
        peer = size.get("workload", {}).get("peer") or {}
        epochs = (peer.get("epoch_s") or [])[1:]
        if not res or res.get("status") != "ok" or not epochs:
            continue
        if res.get("times_s") != epochs:
            res["harness_times_s"] = res.get("times_s")
        res.update(times_s=epochs, median_s=float(np.median(epochs)), min_s=min(epochs),
                   max_s=max(epochs), repeats=len(epochs))


if __name__ == "__main__":
    sys.exit(main())
