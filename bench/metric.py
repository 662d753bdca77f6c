"""Benchmark ``metric``: metric-learning cell encoder, ours (JAX/Flax) vs SCimilarity (PyTorch).

Issue 5's requirement: training and embedding throughput (cells/s) at least 2x SCimilarity's own
PyTorch model and loss at the same architecture and batch size (1,000), at 2,000 and at 28,231
input genes, on CPU. The harness size is the number of input genes.

Architecture (both sides, SCimilarity's ``MetricLearning`` defaults): encoder
``n_genes -> 1024 -> 1024 -> 1024 -> 128`` (Dropout, Linear, BatchNorm1d, PReLU blocks; input
dropout 0.4, dropout 0.5; L2-normalised output), mirror decoder; loss
``0.001 * triplet(margin 0.05, semi-hard in-batch mining across studies) + 0.999 * MSE`` + L1;
AdamW lr 5e-3, weight decay 0.01; batch 1,000 cells.

Methods, in two groups (the ratio column is baseline time / our time = our throughput /
baseline throughput):

``train``
    ``scatlas.metric.train_step``: ``bench.metric_units.benchmark_callables(n_genes, 1000,
    seed)["train_step"]``, one jitted step incl. on-device mining on a fixed device-resident
    batch, blocking until the whole new state is computed (not only the loss: the optimizer
    update would otherwise spill into the next timed call). The step is the one
    ``tl.train_metric`` chooses: from 1,000 genes the sparse step on a CSR batch
    (``scatlas.models.sparse_ops``); ``scatlas.metric.train_step[dense]`` is always the dense
    step (skipped when JAX runs on a GPU: the sparse step is CPU-only, so both are the same).
    Both keep freed host memory as ``fit`` does (``scatlas._host_memory``; embedding calls are
    timed with the setting ``fit`` leaves behind, as ``tl.embed`` runs after training).
    ``scimilarity.train_step``: SCimilarity 0.4.1's ``Encoder``,
    ``Decoder`` and ``TripletLoss``/``TripletSelector`` with ``MetricLearning.training_step``
    repeated statement by statement plus Lightning's ``zero_grad``/``backward``/``step``
    (``bench/peers/scimilarity_runner.py``; the batch as SCimilarity's collator delivers it,
    dense, on a fixed batch: 20 labels, 5 studies, 10 % non-zero).
``embed``
    ``scatlas.metric.embed``: ``benchmark_callables(...)["embed"](X)`` on a dense float32
    ``(n_embed, n_genes)`` array (host in, host out); with ``--param embed_input=csr`` both sides
    get the same cells as a CSR matrix (SCimilarity's ``get_embeddings`` then densifies each
    chunk with ``.toarray()``, as it does for an AnnData's sparse ``X``).
    ``scimilarity.embed``: SCimilarity's ``Encoder`` in ``eval()`` under
    ``torch.inference_mode()`` in 10,000-cell chunks, as ``CellEmbedding.get_embeddings`` does
    (``torch.Tensor(X[chunk])``, vstack, ``.numpy()``). Default 10,000 cells (one chunk).

Columns: ``cells/s`` (batch or n_embed / harness median; added by ``python -m bench.metric``),
``mining share`` (SCimilarity: median over the timed steps of the time in
``TripletSelector.get_triplets_idx`` / step time, measured inside the peer), ``in-process s``
(median step/embed time over the timed calls, measured inside the process doing the work; for
the peer the harness time adds one JSON round trip over a pipe), ``‖z‖-1`` (max deviation of
the embedding norms from 1).

Peer: ``bench/peers/scimilarity_install.sh`` (or ``python -m bench.metric --install``) creates
``bench/.peers/scimilarity`` (CPU torch + scimilarity without its dependencies); the python used
is ``$SCATLAS_PEER_PYTHON_SCIMILARITY`` when set. The peer is one long-lived worker per gene count
(started at the first baseline call, i.e. the harness warm-up), ``torch.set_num_threads(threads)``
(default 2, the machine's cores). Our side runs in this process with JAX's default CPU threading
(all available cores); where JAX's default backend is a GPU our side runs there and the record is
``metric_gpu.json`` (our entries ``runs_on: gpu``, the peer's ``cpu``). The data of both sides
come from the runner's ``synthetic_batch`` with the same shape, density, label and study counts;
the Cell Ontology the SCimilarity miner needs is a synthetic 3,000-term DAG (no network): see the
runner's docstring. Worker log: ``bench/.cache/peers/scimilarity.log``.

Timing: ``python -m bench.metric`` alternates ours and SCimilarity's timed calls (ABBA, after
each method's warm-up calls; :func:`run_interleaved`) because the 2 cores are shared and the load
drifts; ``--blocks`` (or ``python -m bench run metric``) times each method's repeats in one block
as the other benchmarks do. The 1-minute load average is recorded after every timed call.

Usage::

    python -m bench.metric [--genes 2000,28231] [--repeats 5] [--methods baseline] [--install]
    python -m bench run metric --sizes 2000,28231 --repeats 5 --warmup 2   # no cells/s column
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import time
import traceback
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from . import workloads
from .peer_process import JsonLinesWorker
from .runner import DEFAULT_OUT, load_record, log, result_path, run_benchmark, save_record
from .spec import Benchmark, Method, Metric, Workload

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "peers" / "scimilarity_runner.py"
INSTALL = HERE / "peers" / "scimilarity_install.sh"
PEERS_DIR = HERE / ".peers"
PEER_ENV = "SCATLAS_PEER_PYTHON_SCIMILARITY"

DEFAULT_PARAMS: dict[str, Any] = {
    "batch_size": 1000,
    "n_embed": 10_000,
    "embed_input": "dense",  # "csr": both sides get a CSR matrix (SCimilarity densifies chunks)
    "n_labels": 20,
    "n_studies": 5,
    "density": 0.1,
    "threads": 2,  # torch.set_num_threads in the peer
    "seed": 0,
}

METRICS = {
    "cells_per_s": Metric("cells/s", ",.0f", higher_is_better=True),
    "gflops_dense_eq": Metric("dense-eq. GFLOPS", ".0f", higher_is_better=True),
    "mining_share": Metric("mining share", ".2f"),
    "peer_s": Metric("in-process s", ".3g"),
    "norm_err": Metric("‖z‖-1", ".1e"),
    "cos_min": Metric("min cos to f32", ".5f", higher_is_better=True),
    "knn15_shared": Metric("shared 15-NN", ".3f", higher_is_better=True),
}

#: group -> the params key giving the cells one call processes
GROUP_CELLS = {"train": "batch_size", "embed": "n_embed", "embed_bf16": "n_embed"}

#: calls per method and size that are the harness's warm-up (left out of the in-process medians);
#: ``python -m bench run`` defaults to 1, :func:`main` sets it to its ``--warmup``
WARMUP_CALLS = 1


def runner_module() -> ModuleType:
    """``bench/peers/scimilarity_runner.py`` as a module (its workload helpers need NumPy only)."""
    name = "_bench_scimilarity_runner"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, RUNNER)
    if spec is None or spec.loader is None:  # pragma: no cover - the file ships with bench
        raise ImportError(f"cannot load {RUNNER}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def peer_python() -> Path | None:
    """The peer's interpreter: ``$SCATLAS_PEER_PYTHON_SCIMILARITY``, else the peer venv."""
    env = os.environ.get(PEER_ENV, "").strip()
    path = Path(env) if env else PEERS_DIR / "scimilarity" / "bin" / "python"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def install_peer() -> int:
    """Run ``bench/peers/scimilarity_install.sh``; returns its exit status."""
    return subprocess.call(["bash", str(INSTALL)])


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- workload ------------------------------------------------------------------------------------


def build(size: int, device: str, params: Mapping[str, Any]) -> Workload:
    """Nothing heavy up front: each side builds its data at its first (warm-up) call."""
    p = dict(params)
    rates = gemm_rates(size)
    wide = rates[f"xla_f32_1000x1024x{size}"]
    info = {
        "n_genes": size, "batch_size": p["batch_size"], "n_embed": p["n_embed"],
        "gemm_gflops": rates,
        "summary": (f"{size:,} genes; float32 GEMM rate of this machine, XLA (the ceiling of "
                    f"dense float32 work): {wide:.0f} GFLOPS on "
                    f"1000 x 1024 x {size:,}, {rates['xla_f32_10000x1024x1024']:.0f} on "
                    f"10,000 x 1024 x 1024 (numpy/OpenBLAS "
                    f"{rates['numpy_f32_10000x1024x1024']:.0f}); "
                    f"train: batch {p['batch_size']:,} cells, "
                    f"{p['n_labels']} labels, {p['n_studies']} studies, "
                    f"{p['density']:.0%} non-zero; embed: {p['n_embed']:,} cells dense float32 "
                    "(rows marked [csr]: the same cells as a CSR matrix); "
                    f"ours jax {_version('jax')}, flax {_version('flax')}; "
                    f"peer torch threads {p['threads']}"),
    }
    w = Workload(host=None, data=None, info=info,
                 extra={"params": p, "n_genes": size, "peer": {}, "calls": {}})
    weakref.finalize(w, _close, w.extra["peer"])
    return w


def _close(peer: dict[str, Any]) -> None:
    worker = peer.pop("worker", None)
    if worker is not None:
        worker.close()


def _recording(method: Method) -> Method:
    """``method`` keeping each call's in-process facts under its name (read by :func:`accuracy`)."""

    def call(w: Workload) -> Any:
        reply = method.call(w)
        w.extra["calls"].setdefault(method.name, []).append(dict(reply))
        return reply

    return dataclasses.replace(method, call=call)


def _kind(group: str) -> str:
    """``train``, ``embed`` or ``embed_bf16`` (``[csr]`` groups: the same for CSR input)."""
    if group == "train":
        return "train"
    return "embed_bf16" if group.startswith("embed-bf16") else "embed"


# --- ours ----------------------------------------------------------------------------------------


def _ours_callables(w: Workload, step: str = "auto") -> dict[str, Any]:
    """Our timed units; ``step="dense"`` forces the dense training step (else chosen as
    ``tl.train_metric`` does: the sparse step from 1,000 genes)."""
    key = "ours" if step == "auto" else f"ours_{step}"
    if key not in w.extra:
        try:
            from bench.metric_units import benchmark_callables
        except ImportError as exc:
            raise RuntimeError(
                "our side is not available: bench.metric_units.benchmark_callables(n_genes, "
                f"batch_size=1000, *, seed=0) could not be imported ({exc})") from exc
        p = w.extra["params"]
        start = time.perf_counter()
        w.extra[key] = benchmark_callables(w.extra["n_genes"], p["batch_size"], seed=p["seed"],
                                           sparse=False if step == "dense" else None)
        w.info[f"{key}_setup_s"] = round(time.perf_counter() - start, 3)
        w.info[f"{key}_train_step"] = "sparse" if w.extra[key]["sparse_step"] else "dense"
    return w.extra[key]


def _embed_cells(w: Workload) -> np.ndarray:
    """The cells our side embeds: the same generator, seed and shape as the peer's."""
    if "X_embed" not in w.extra:
        p = w.extra["params"]
        X = runner_module().synthetic_batch(
            p["n_embed"], w.extra["n_genes"], density=p["density"], seed=p["seed"] + 1)[0]
        if p["embed_input"] == "csr":
            import scipy.sparse as sp

            X = sp.csr_matrix(X)
        w.extra["X_embed"] = X
    return w.extra["X_embed"]


def _ours_train(w: Workload, step: str = "auto") -> dict[str, Any]:
    train_step = _ours_callables(w, step)["train_step"]
    start = time.perf_counter()
    train_step()
    reply = {"peer_s": time.perf_counter() - start}
    return reply


def _ours_train_dense(w: Workload) -> dict[str, Any]:
    return _ours_train(w, "dense")


def _ours_embed(w: Workload, precision: str = "float32") -> dict[str, Any]:
    from scatlas._host_memory import keep_freed_memory

    X = _embed_cells(w)
    embed = _ours_callables(w)["embed"]
    keep_freed_memory(False)  # embedding runs as tl.embed runs after training
    try:
        start = time.perf_counter()
        Z = np.asarray(embed(X, precision=precision))
        seconds = time.perf_counter() - start
    finally:
        keep_freed_memory(True)  # back to the training steps' setting
    if Z.shape != (X.shape[0], 128):
        raise RuntimeError(f"embed returned shape {Z.shape}, expected {(X.shape[0], 128)}")
    reply = {"peer_s": seconds,
             "norm_err": float(np.max(np.abs(np.linalg.norm(Z, axis=1) - 1.0)))}
    if precision == "float32":
        w.extra["Z_float32"] = Z
    else:  # deterministic output: measured at the first (warm-up) call, outside later timings
        if "agreement" not in w.extra:
            w.extra["agreement"] = _agreement(w, Z)
        reply.update(w.extra["agreement"])
    return reply


def _ours_embed_bf16(w: Workload) -> dict[str, Any]:
    return _ours_embed(w, "bfloat16")


def _agreement(w: Workload, Z: np.ndarray) -> dict[str, Any]:
    """How far a reduced-precision embedding is from the float32 one of the same cells: the
    smallest per-cell cosine, and the mean fraction of shared 15 nearest neighbours (first 2,000
    cells, exact cosine)."""
    if "Z_float32" not in w.extra:
        w.extra["Z_float32"] = np.asarray(_ours_callables(w)["embed"](_embed_cells(w)))
    ref = w.extra["Z_float32"]
    cos = np.sum(ref * Z, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(Z, axis=1))

    def knn(E: np.ndarray) -> np.ndarray:
        E = E[:2000]
        S = E @ E.T
        np.fill_diagonal(S, -np.inf)
        return np.argsort(-S, axis=1)[:, :15]

    a, b = knn(ref), knn(Z)
    shared = np.mean([len(np.intersect1d(x, y)) / 15 for x, y in zip(a, b, strict=True)])
    return {"cos_min": float(cos.min()), "knn15_shared": float(shared)}


# --- peer ----------------------------------------------------------------------------------------


class PeerWorker(JsonLinesWorker):
    """``scimilarity_runner.py worker`` in the peer venv, driven over JSON lines."""

    def __init__(self, python: Path, n_genes: int, params: Mapping[str, Any],
                 log_dir: Path) -> None:
        start = time.perf_counter()
        super().__init__("scimilarity", [python, "-W", "ignore", RUNNER, "worker"],
                         log_dir / "scimilarity.log")
        self.setup = self.request({"cmd": "setup", "n_genes": n_genes, "params": dict(params)})
        self.startup_s = time.perf_counter() - start
        log(f"[metric] scimilarity worker ready in {self.startup_s:.1f} s (scimilarity "
            f"{self.hello.get('scimilarity')}, torch {self.hello.get('torch')}, "
            f"{self.setup.get('torch_threads')} threads)")


def _worker(w: Workload) -> PeerWorker:
    peer = w.extra["peer"]
    if "worker" not in peer:  # first call (the harness warm-up): start, import, build data
        python = peer_python()
        if python is None:
            raise RuntimeError(f"no peer python (run {INSTALL} or set {PEER_ENV})")
        worker = PeerWorker(python, w.extra["n_genes"], w.extra["params"],
                            workloads.cache_dir() / "peers")
        peer["worker"] = worker
        keep = ("scimilarity", "scimilarity_files_sha256_16", "torch", "numpy", "python")
        w.info["peer"] = {**{k: worker.hello.get(k) for k in keep},
                          "torch_threads": worker.setup.get("torch_threads"),
                          "l1_layer_shape": worker.setup.get("l1_layer_shape"),
                          "startup_s": round(worker.startup_s, 2)}
        w.info["summary"] += (f"; peer scimilarity {worker.hello.get('scimilarity')}, torch "
                              f"{worker.hello.get('torch')} ({worker.setup.get('torch_threads')}"
                              f" threads), its L1 term on the {worker.setup.get('l1_layer_shape')}"
                              " Linear")
    return peer["worker"]


def _peer_train(w: Workload) -> dict[str, Any]:
    reply = _worker(w).request({"cmd": "train"})
    reply = {"peer_s": reply["step_s"], "mining_s": reply["mining_s"],
             "n_triplets": reply["n_triplets"], "loss": reply["loss"]}
    return reply


def _peer_embed(w: Workload, bf16: bool = False) -> dict[str, Any]:
    reply = _worker(w).request({"cmd": "embed", "bf16": bf16})
    reply = {"peer_s": reply["embed_s"], "norm_err": reply["norm_err"]}
    return reply


def _peer_embed_bf16(w: Workload) -> dict[str, Any]:
    return _peer_embed(w, bf16=True)


def _peer_method(name: str, call: Any, group: str, description: str) -> Method:
    if peer_python() is None:
        where = os.environ.get(PEER_ENV) or PEERS_DIR / "scimilarity" / "bin" / "python"
        return Method(name, call, "baseline", group, description, max_size=0,
                      skip_reason=f"peer python not found at {where} (run python -m "
                                  f"bench.metric --install or set {PEER_ENV})")
    return Method(name, call, "baseline", group, description)


def methods(params: Mapping[str, Any]) -> list[Method]:
    """Ours and SCimilarity's, for training steps and for embedding.

    With ``embed_input="csr"`` the embedding methods and their group carry a ``[csr]`` suffix,
    so dense and CSR results live side by side in one record.
    """
    csr = params.get("embed_input", "dense") == "csr"
    tag = "[csr]" if csr else ""
    what = "CSR float32" if csr else "dense float32"
    on_cpu = _jax_device() == "cpu"
    return [_recording(m) for m in (
        Method("scatlas.metric.train_step", _ours_train, "ours", "train",
               "benchmark_callables()['train_step']: one jitted step incl. on-device mining; "
               "the step tl.train_metric chooses (sparse from 1,000 genes: CSR batch, "
               "scatlas.models.sparse_ops)", on_device=True),
        Method("scatlas.metric.train_step[dense]", _ours_train_dense, "ours", "train",
               "the same, always the dense step (dense batch)", on_device=True,
               max_size=None if on_cpu else 0,
               skip_reason="" if on_cpu else "the sparse step is CPU-only: on a GPU "
                                             "scatlas.metric.train_step is this same dense step"),
        _peer_method("scimilarity.train_step", _peer_train, "train",
                     "SCimilarity 0.4.1 Encoder/Decoder/TripletLoss, MetricLearning."
                     "training_step + backward + AdamW step, torch CPU"),
        Method(f"scatlas.metric.embed{tag}", _ours_embed, "ours", f"embed{tag}",
               f"benchmark_callables()['embed'](X), X {what} on the host", on_device=True),
        _peer_method(f"scimilarity.embed{tag}", _peer_embed, f"embed{tag}",
                     "SCimilarity Encoder.eval() under inference_mode, 10,000-cell chunks"
                     + (" (each densified with .toarray())" if csr else "")),
        Method(f"scatlas.metric.embed-bf16{tag}", _ours_embed_bf16, "ours", f"embed-bf16{tag}",
               "the same with precision='bfloat16' (dense layers bf16; sparse first layer "
               "float32); agreement with our float32 embedding recorded", on_device=True),
        _peer_method(f"scimilarity.embed-bf16{tag}", _peer_embed_bf16, f"embed-bf16{tag}",
                     "the same under torch.autocast('cpu', bfloat16): not SCimilarity's own "
                     "setting, the equal-precision counterpart"),
    )]


def accuracy(w: Workload, method: Method, output: Any) -> dict[str, Any]:
    """Medians of in-process facts over this method's timed calls (warm-up calls left out)."""
    calls = w.extra["calls"].get(method.name, [])
    timed = calls[WARMUP_CALLS:] or calls
    out: dict[str, Any] = {"peer_s": float(np.median([c["peer_s"] for c in timed]))}
    if "mining_s" in output:
        out["mining_share"] = float(np.median([c["mining_s"] / c["peer_s"] for c in timed]))
    out.update({k: output[k] for k in ("norm_err", "cos_min", "knn15_shared") if k in output})
    return out


BENCHMARK = Benchmark(
    name="metric",
    description=("Metric-learning cell encoder (SCimilarity architecture: 3 x 1024 hidden, "
                 "128-d, batch 1,000): training step and embedding throughput, scatlas "
                 "(JAX/Flax, on-device mining) vs SCimilarity 0.4.1's own PyTorch model, "
                 "TripletSelector and loss (CPU torch, own venv). Size = input genes."),
    build=build,
    methods=methods,
    accuracy=accuracy,
    metrics=METRICS,
    default_sizes=(2000, 28231),
    default_params=DEFAULT_PARAMS,
    size_label="genes",
)


# --- interleaved timing --------------------------------------------------------------------------


def run_interleaved(
    sizes: str | Sequence[int], repeats: int = 5, warmup: int = 2, out: str | Path = DEFAULT_OUT,
    *, methods_: Sequence[str] | None = None, **params: Any,
) -> dict[str, Any]:
    """Time ours and SCimilarity's calls alternately, into the harness's JSON record.

    The machine is shared, so load drifts over minutes; timing one method's repeats in a block
    and then the other's would let that drift into the ratio. Per size and group, every method
    is first called ``warmup`` times (peer start, JIT compilation), then the timed calls
    alternate ABBA (ours, baseline, baseline, ours, ...), ``repeats`` per method. The entries
    have the harness's fields (``times_s``, median/min/max, ``load_1m`` = median of the 1-minute
    load read after each timed call, ``load_1m_all`` all of them); the record merges into
    ``<out>/metric_<device>.json`` (``cpu`` or ``gpu``: JAX's default backend, where our side
    runs) as ``run_benchmark`` would.
    """
    from . import runner

    global WARMUP_CALLS  # noqa: PLW0603 - read by accuracy() during this run
    WARMUP_CALLS = warmup
    if repeats < 1 or warmup < 1:
        raise ValueError(f"need repeats >= 1 and warmup >= 1, got {repeats}, {warmup}")
    unknown = set(params) - set(DEFAULT_PARAMS)
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}; known: {sorted(DEFAULT_PARAMS)}")
    full = {**DEFAULT_PARAMS, **params}
    declared = methods(full)
    chosen = runner.select_methods(declared, methods_)
    size_list = runner.parse_sizes(sizes)
    device = _jax_device()
    path = result_path(out, BENCHMARK.name, device)
    record = load_record(path) or runner.new_record(BENCHMARK, device)
    record.update(description=BENCHMARK.description, size_label=BENCHMARK.size_label,
                  metrics={k: m.to_json() for k, m in BENCHMARK.metrics.items()})
    run_id, _ = runner._start_run(record, device, full, repeats, warmup, None)  # noqa: SLF001
    record["runs"][run_id]["timing"] = "interleaved ABBA (bench.metric.run_interleaved)"
    record["methods"] = runner._method_table(declared, record["methods"])  # noqa: SLF001
    log(f"[metric] interleaved, genes={size_list}, repeats={repeats}, warmup={warmup} -> {path}")
    for size in size_list:
        w = build(size, device, full)
        w.info["timing"] = "interleaved ABBA"
        w.info["summary"] += f"; timing interleaved ABBA, warm-up {warmup}"
        results: dict[str, Any] = {}
        for group in dict.fromkeys(m.group for m in chosen):
            group_methods = [m for m in chosen if m.group == group]
            results.update(_interleave_group(w, group_methods, size, repeats, warmup, device))
        for res in results.values():
            res["run_id"] = run_id
        runner.merge_size(record, size, {"size": size, "workload": runner._jsonable(w.info),  # noqa: SLF001
                                         "methods": results})
        del w
        gc.collect()
        runner.prune_runs(record)
        add_throughput(record)
        save_record(record, path)
    return record


def _jax_device() -> str:
    """``gpu`` when JAX's default backend is a GPU (our side then runs there), else ``cpu``:
    the device the result file is named after."""
    import jax

    return "cpu" if jax.default_backend() == "cpu" else "gpu"


def _interleave_group(w: Workload, group_methods: Sequence[Method], size: int, repeats: int,
                      warmup: int, device: str) -> dict[str, Any]:
    """``device``: where our methods (``on_device``) run; the peer runs on the CPU."""
    from . import runner

    def base(m: Method) -> dict[str, Any]:
        return {"role": m.role, "group": m.group, "runs_on": device if m.on_device else "cpu"}

    results: dict[str, Any] = {}
    active: list[Method] = []
    for m in group_methods:
        skip = m.skip_message(size)
        if skip is not None:
            results[m.name] = {**base(m), "status": "skipped", "reason": skip}
            continue
        log(f"[metric] genes={size:,}: {m.name} warm-up x{warmup} ...")
        try:
            for _ in range(warmup):
                m.call(w)
        except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking
            traceback.print_exc(file=sys.stderr)
            results[m.name] = {**base(m), "status": "error",
                               "error": f"{type(exc).__name__}: {exc}"}
            continue
        active.append(m)
    times: dict[str, list[float]] = {m.name: [] for m in active}
    loads: dict[str, list[float | None]] = {m.name: [] for m in active}
    last: dict[str, Any] = {}
    for r in range(repeats):
        for m in (active if r % 2 == 0 else active[::-1]):
            if m.name in results:  # failed in an earlier round
                continue
            try:
                start = time.perf_counter()
                last[m.name] = m.call(w)
                times[m.name].append(time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                results[m.name] = {**base(m), "status": "error",
                                   "error": f"{type(exc).__name__}: {exc}"}
                continue
            loads[m.name].append(runner._load_1m())  # noqa: SLF001
    for m in active:
        if m.name in results:
            continue
        known = [x for x in loads[m.name] if x is not None]
        entry = {**base(m), "status": "ok",
                 "times_s": times[m.name], "warmup": warmup,
                 "load_1m": float(np.median(known)) if known else None,
                 "load_1m_all": loads[m.name], **runner.summarize(times[m.name])}
        try:
            entry["accuracy"] = {k: runner._number(v)  # noqa: SLF001
                                 for k, v in accuracy(w, m, last[m.name]).items()}
        except Exception as exc:  # noqa: BLE001 - timing stays valid without accuracy
            entry["accuracy_error"] = f"{type(exc).__name__}: {exc}"
        results[m.name] = entry
        log(f"[metric] genes={size:,}: {m.name}: median {entry['median_s']:.4g} s "
            f"[{entry['min_s']:.4g}, {entry['max_s']:.4g}] x{entry['repeats']}, "
            f"load {entry['load_1m']}")
    return results


# --- command line --------------------------------------------------------------------------------


def gemm_rates(n_genes: int, repeats: int = 3) -> dict[str, float]:
    """Measured float32 GEMM GFLOPS of this machine at the model's two product shapes (XLA, as
    our dense layers run; numpy's BLAS for comparison): the ceiling of dense float32 work."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    matmul = jax.jit(jnp.matmul)
    for m, k, n in ((1000, 1024, n_genes), (10_000, 1024, 1024)):
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        ja, jb = jax.device_put(a), jax.device_put(b)
        for name, call in ((f"xla_f32_{m}x{k}x{n}",
                            functools.partial(_xla_product, matmul, ja, jb)),
                           (f"numpy_f32_{m}x{k}x{n}", functools.partial(np.matmul, a, b))):
            call()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            out[name] = 2 * m * k * n / float(np.median(times)) / 1e9
    return out


def _xla_product(matmul: Any, a: Any, b: Any) -> Any:
    return matmul(a, b).block_until_ready()


def dense_flops_per_cell(kind: str, n_genes: int, hidden: int = 1024, latent: int = 128) -> int:
    """Dense-equivalent FLOPs per cell of SCimilarity's architecture (3 x ``hidden``).

    embed: the encoder's forward products. train: encoder + decoder forward, their weight
    gradients and their input gradients except the first layer's (input is data)."""
    enc = n_genes * hidden + 2 * hidden * hidden + hidden * latent
    dec = latent * hidden + 2 * hidden * hidden + hidden * n_genes
    macs = enc if kind != "train" else 3 * (enc + dec) - n_genes * hidden
    return 2 * macs


def add_throughput(record: dict[str, Any]) -> None:
    """``cells_per_s`` = cells per call / harness median, and the dense-equivalent GFLOPS that
    rate implies (``gflops_dense_eq``: above the machine's GEMM rate only by skipping work),
    into every ok entry's accuracy."""
    runs = record.get("runs", {})
    for size_key, size in record["results"].items():
        n_genes = int(size.get("size") or size_key)
        for res in size["methods"].values():
            if res.get("status") != "ok" or res.get("median_s", 0) <= 0:
                continue
            params = runs.get(res.get("run_id"), {}).get("params", DEFAULT_PARAMS)
            kind = _kind(res.get("group", ""))
            key = GROUP_CELLS[kind]
            cells = params.get(key, DEFAULT_PARAMS[key])
            acc = res.setdefault("accuracy", {})
            acc["cells_per_s"] = cells / res["median_s"]
            acc["gflops_dense_eq"] = (acc["cells_per_s"]
                                      * dense_flops_per_cell(kind, n_genes) / 1e9)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.metric``: run (or install the peer), add cells/s, write the report."""
    parser = argparse.ArgumentParser(prog="python -m bench.metric",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--genes", default="2000,28231", help="comma-separated gene counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default=None,
                        help="comma-separated names, patterns or roles (ours, baseline)")
    parser.add_argument("--blocks", action="store_true",
                        help="time each method's repeats in one block (the bench harness) "
                             "instead of alternating ours and SCimilarity's calls")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="with --blocks: per method and size, stop repeating after this")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override {sorted(DEFAULT_PARAMS)}")
    parser.add_argument("--install", action="store_true",
                        help="create bench/.peers/scimilarity first")
    args = parser.parse_args(argv)
    if args.install:
        code = install_peer()
        if code:
            return code
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first call starts the peer / compiles ours)")
    from .__main__ import parse_params

    params = parse_params(args.param)
    methods_ = [m.strip() for m in args.methods.split(",")] if args.methods else None
    if args.blocks:
        global WARMUP_CALLS  # noqa: PLW0603 - read by accuracy() during this run
        WARMUP_CALLS = args.warmup
        run_benchmark("metric", sizes=args.genes, repeats=args.repeats, warmup=args.warmup,
                      device=_jax_device(), out=args.out, methods=methods_, budget_s=args.budget,
                      report=False, **params)
    else:
        run_interleaved(args.genes, args.repeats, args.warmup, args.out, methods_=methods_,
                        **params)
    path = result_path(args.out, "metric", _jax_device())
    record = load_record(path)
    if record is None:  # pragma: no cover - run_benchmark just wrote it
        return 1
    add_throughput(record)
    save_record(record, path)
    from .report import write_benchmark_report

    write_benchmark_report(record, path.parent)
    log(f"[metric] wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
