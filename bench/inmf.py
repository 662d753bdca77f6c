"""Benchmark ``inmf``: LIGER's batch iNMF (k = 20, lambda = 5, 30 iterations), ours vs peers.

Workload: ``scatlas.datasets.synthetic(n, 2000, n_batches=2, seed)`` raw counts split into its
batches, LIGER's log-free preprocessing (:mod:`scatlas.kernels.liger_prep`: cells divided by
their totals, genes scaled by their root mean square per batch, no centring) on the same genes
for every method (default all 2,000; ``--param genes=select`` applies rliger's ``selectGenes``),
cells without counts dropped. Every method starts from the same U(0, 2) factors
(``default_rng(seed)``: W, V_1.., H_1.., as ``kernels.inmf`` draws them) and runs exactly 30
iterations (no tolerance stop).

Methods (group ``inmf``):
    ``scatlas.inmf[bpp]`` (``kernels.inmf``, BPP, float32: the default), ``scatlas.inmf[hals]``
    (one HALS sweep per block), ``scatlas.inmf[bpp,f64]`` (float64);
    ``pyplanc.bppinmf`` (libplanc's C++ BPP iNMF, PyPI pyplanc 0.0.2, ``ncores`` = the cores
    available) and ``pyliger.optimize_ALS`` (pyliger 0.2.4, NumPy BPP on densified data), each
    in its own virtual environment and process.

Peers: pyplanc pins NumPy down and pyliger brings numba and a plotting stack, so neither lives in
the main venv. ``bench/peers/install.sh`` creates ``bench/.peers/{pyplanc,pyliger}``; the python
used is ``$SCATLAS_PEER_PYTHON_PYPLANC`` / ``$SCATLAS_PEER_PYTHON_PYLIGER`` when set. A peer whose
python is missing is recorded as skipped with the reason. Each peer runs as a long-lived worker
(``bench/peers/inmf_peer.py``) started at the method's first call (the harness's warm-up: keep
``--warmup 1``), which imports the library and loads the data from a temporary ``.npz`` untimed;
each timed call then asks the worker for one fit (solver call timed inside the worker) and reads
the factors back from a temporary ``.npz``, so the harness time is the solver time plus that
transfer (milliseconds). Worker logs: ``bench/.cache/peers/``.

Accuracy columns: ``objective`` is LIGER's objective of every method's final factors computed by
OUR ``kernels.inmf_objective`` on the float64 data (comparable across methods); ``s/iter`` and
``solver s`` are the time inside the solver call (for the peers measured in their process).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from . import workloads
from .environment import REPO_ROOT, available_cores, get_backend
from .peer_process import JsonLinesWorker
from .runner import log
from .spec import Benchmark, Method, Metric, Workload

DEFAULT_PARAMS: dict[str, Any] = {
    "k": 20,
    "lam": 5.0,
    "n_iter": 30,
    "n_genes": 2000,
    "n_batches": 2,
    "seed": 1,
    "genes": "all",  # or "select": rliger selectGenes defaults
    "peer_ncores": 0,  # pyplanc ncores; 0 = the cores available
    "pyliger_max_size": 10_000,
    "f64_max_size": 100_000,
}

PREP_VERSION = "liger-prep-v1"
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "inmf_peer.py"
PEERS_DIR = Path(__file__).resolve().parent / ".peers"
PEER_ENV = {"pyplanc": "SCATLAS_PEER_PYTHON_PYPLANC", "pyliger": "SCATLAS_PEER_PYTHON_PYLIGER"}

METRICS = {
    "objective": Metric("objective (ours)", ".6g"),
    "s_per_iter": Metric("s/iter", ".3g"),
    "solver_s": Metric("solver s", ".3g"),
    "n_iter": Metric("iters", "d"),
}


# --- data ----------------------------------------------------------------------------------


def peer_python(name: str) -> Path | None:
    """The peer's interpreter: ``$SCATLAS_PEER_PYTHON_<NAME>``, else ``bench/.peers/<name>``."""
    env = os.environ.get(PEER_ENV[name], "").strip()
    path = Path(env) if env else PEERS_DIR / name / "bin" / "python"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _preprocessed(size: int, params: Mapping[str, Any]) -> tuple[list[sp.csr_matrix], dict]:
    """LIGER-scaled batches (float64 CSR, cached) and facts about them."""
    n_genes, n_batches, seed = params["n_genes"], params["n_batches"], params["seed"]
    key = (f"inmf_n{size}_g{n_genes}_b{n_batches}_s{seed}_{params['genes']}_{PREP_VERSION}_"
           f"{workloads.generator_fingerprint()}")

    def build() -> dict[str, np.ndarray]:
        from scatlas import datasets
        from scatlas.kernels import liger_prep

        log(f"[workload] synthetic({size:,}, {n_genes}, n_batches={n_batches}) + LIGER prep")
        adata = datasets.synthetic(size, n_genes, n_batches=n_batches, seed=seed)
        X = adata.X.tocsr()
        codes = np.asarray(adata.obs["batch"].cat.codes)
        parts = []
        for b in range(n_batches):
            P = X[np.flatnonzero(codes == b)]
            parts.append(P[np.flatnonzero(np.asarray(P.sum(axis=1)).ravel() > 0)])
        genes = None if params["genes"] == "select" else np.arange(n_genes)
        scaled, used = liger_prep.liger_preprocess(parts, genes=genes, dtype=np.float64)
        keep_genes = np.logical_or.reduce([np.asarray(S.getnnz(axis=0)) > 0 for S in scaled])
        out: dict[str, np.ndarray] = {"genes": used[keep_genes]}
        for i, S in enumerate(scaled):
            S = S[:, np.flatnonzero(keep_genes)]
            S = S[np.flatnonzero(S.getnnz(axis=1) > 0)].tocsr()
            out.update({f"data{i}": S.data, f"indices{i}": S.indices, f"indptr{i}": S.indptr,
                        f"shape{i}": np.asarray(S.shape)})
        return out

    start = time.perf_counter()
    arrays = workloads.cached_arrays(key, build)
    Xs = []
    for i in range(n_batches):
        Xs.append(sp.csr_matrix((arrays[f"data{i}"], arrays[f"indices{i}"],
                                 arrays[f"indptr{i}"]), shape=tuple(arrays[f"shape{i}"])))
    info = {"cache_key": key, "load_s": round(time.perf_counter() - start, 3),
            "n_genes_used": int(arrays["genes"].size)}
    return Xs, info


def _init(Xs: list[sp.csr_matrix], k: int, seed: int) -> dict[str, Any]:
    """U(0, 2) factors in ``kernels.inmf``'s draw order (W, V_1.., H_1..), float64."""
    rng = np.random.default_rng(seed)
    m = Xs[0].shape[1]
    W = rng.uniform(0.0, 2.0, (m, k))
    V = [rng.uniform(0.0, 2.0, (m, k)) for _ in Xs]
    H = [rng.uniform(0.0, 2.0, (X.shape[0], k)) for X in Xs]
    return {"W": W, "V": V, "H": H}


def build(size: int, device: str, params: Mapping[str, Any]) -> Workload:
    """The preprocessed batches (float64 host copy, float32 on the device) and the init."""
    X64, info = _preprocessed(size, params)
    init = _init(X64, params["k"], params["seed"])
    be = get_backend()
    X32 = [X.astype(np.float32) for X in X64]
    data = [be.to_device(X, device) for X in X32]
    n_cells = [X.shape[0] for X in X64]
    info.update(
        shape=[int(sum(n_cells)), int(X64[0].shape[1])], cells_per_batch=n_cells,
        nnz=int(sum(X.nnz for X in X64)),
        summary=(f"{sum(n_cells):,} cells ({' + '.join(f'{n:,}' for n in n_cells)}) × "
                 f"{X64[0].shape[1]} genes, LIGER-scaled CSR, density "
                 f"{sum(X.nnz for X in X64) / (sum(n_cells) * X64[0].shape[1]):.3f}; "
                 f"k={params['k']}, λ={params['lam']}, {params['n_iter']} iterations"),
    )
    tmp = tempfile.TemporaryDirectory(prefix="scatlas-inmf-bench-")
    w = Workload(host=X64, data=data, info=info,
                 extra={"init": init, "params": dict(params), "tmp": tmp, "peers": {},
                        "device": device})
    weakref.finalize(w, _close, w.extra["peers"], tmp)
    return w


def _close(peers: dict[str, Any], tmp: tempfile.TemporaryDirectory) -> None:
    for peer in list(peers.values()):
        peer.close()
    peers.clear()
    tmp.cleanup()


# --- ours ----------------------------------------------------------------------------------


def _ours(solver: str, dtype: Any):
    def call(w: Workload) -> dict[str, Any]:
        from scatlas import kernels

        p, be = w.extra["params"], get_backend()
        Xs = w.data if dtype == np.float32 else [be.to_device(X, w.extra["device"])
                                                 for X in w.host]
        init = w.extra["init"]
        start = time.perf_counter()
        res = kernels.inmf(Xs, k=p["k"], lam=p["lam"], n_iter=p["n_iter"], solver=solver,
                           seed=p["seed"], dtype=dtype, init=init, progress=False)
        be.synchronize()
        elapsed = time.perf_counter() - start
        return {"W": res.W, "V": res.V, "H": res.H, "solver_s": elapsed,
                "n_iter": int(res.n_iter)}
    return call


# --- peers ---------------------------------------------------------------------------------


class PeerWorker(JsonLinesWorker):
    """A peer solver process (``bench/peers/inmf_peer.py``) driven over JSON lines."""

    def __init__(self, name: str, python: Path, data_path: Path, log_dir: Path) -> None:
        start = time.perf_counter()
        super().__init__(name, [python, "-W", "ignore", PEER_SCRIPT, name],
                         log_dir / f"{name}.log", quit_timeout=10)
        self.request({"cmd": "load", "path": str(data_path)})
        self.startup_s = time.perf_counter() - start
        log(f"[inmf] {name} worker ready in {self.startup_s:.1f} s "
            f"(import {self.hello.get('import_s', 0):.1f} s, {name} {self.hello.get('version')},"
            f" numpy {self.hello.get('numpy')})")


def _write_peer_data(w: Workload) -> Path:
    """The float64 data, init and parameters as one ``.npz`` (once per workload)."""
    path = Path(w.extra["tmp"].name) / "data.npz"
    if path.is_file():
        return path
    p, init = w.extra["params"], w.extra["init"]
    arrays: dict[str, Any] = {"k": p["k"], "lam": p["lam"], "n_iter": p["n_iter"],
                              "ncores": p["peer_ncores"] or available_cores(), "W": init["W"]}
    for i, X in enumerate(w.host):
        arrays.update({f"data{i}": X.data, f"indices{i}": X.indices, f"indptr{i}": X.indptr,
                       f"shape{i}": np.asarray(X.shape), f"V{i}": init["V"][i],
                       f"H{i}": init["H"][i]})
    np.savez(path, **arrays)
    return path


def _peer(name: str):
    def call(w: Workload) -> dict[str, Any]:
        peers = w.extra["peers"]
        if name not in peers:  # first call (the warm-up): start the worker, import, load data
            python = peer_python(name)
            if python is None:
                raise RuntimeError(f"no python for {name}")
            peers[name] = PeerWorker(name, python, _write_peer_data(w),
                                     workloads.cache_dir() / "peers")
        out = Path(w.extra["tmp"].name) / f"{name}_factors.npz"
        reply = peers[name].request({"cmd": "run", "out": str(out)})
        with np.load(out) as z:
            n = len(w.host)
            result = {"W": z["W"], "V": [z[f"V{i}"] for i in range(n)],
                      "H": [z[f"H{i}"] for i in range(n)]}
        return {**result, "solver_s": reply["solver_s"], "n_iter": int(reply["n_iter"]),
                "peer_objective": reply.get("peer_objective")}
    return call


def _peer_method(name: str, description: str, max_size: int | None, reason: str) -> Method:
    python = peer_python(name)
    if python is None:
        where = os.environ.get(PEER_ENV[name]) or PEERS_DIR / name / "bin" / "python"
        return Method(name + (".bppinmf" if name == "pyplanc" else ".optimize_ALS"),
                      _peer(name), "baseline", "inmf", description, max_size=0,
                      skip_reason=f"peer python not found at {where} (run bench/peers/install.sh "
                                  f"{name} or set {PEER_ENV[name]})")
    return Method(name + (".bppinmf" if name == "pyplanc" else ".optimize_ALS"), _peer(name),
                  "baseline", "inmf", description, max_size=max_size, skip_reason=reason)


def methods(params: Mapping[str, Any]) -> list[Method]:
    """Ours (BPP float32, HALS, BPP float64) and the two peers."""
    return [
        Method("scatlas.inmf[bpp]", _ours("bpp", np.float32), "ours", "inmf",
               "kernels.inmf(solver='bpp'), float32", on_device=True),
        Method("scatlas.inmf[hals]", _ours("hals", np.float32), "ours", "inmf",
               "kernels.inmf(solver='hals'), float32, 1 sweep per block", on_device=True),
        Method("scatlas.inmf[bpp,f64]", _ours("bpp", np.float64), "ours", "inmf",
               "kernels.inmf(solver='bpp', dtype=float64)", on_device=True,
               max_size=params["f64_max_size"],
               skip_reason="float64 variant only timed at small sizes (--param f64_max_size)"),
        _peer_method("pyplanc", "pyplanc 0.0.2 bppinmf (libplanc C++ BPP), float64, own venv",
                     None, ""),
        _peer_method("pyliger", "pyliger 0.2.4 optimize_ALS (NumPy BPP, dense), own venv",
                     params["pyliger_max_size"],
                     "pyliger densifies the data and forms dense residuals every iteration; "
                     "~4-6x slower than pyplanc (raise --param pyliger_max_size)"),
    ]


def accuracy(w: Workload, method: Method, output: Any) -> dict[str, Any]:
    """LIGER's objective of the method's factors by our ``inmf_objective``; solver timings."""
    from scatlas.kernels import inmf_objective

    be = get_backend()
    W = np.asarray(be.to_host(output["W"]), dtype=np.float64)
    V = [np.asarray(be.to_host(v), dtype=np.float64) for v in output["V"]]
    H = [np.asarray(be.to_host(h), dtype=np.float64) for h in output["H"]]
    obj = inmf_objective(w.host, W, V, H, lam=w.extra["params"]["lam"])
    n_iter = output["n_iter"]
    return {"objective": obj, "s_per_iter": output["solver_s"] / n_iter,
            "solver_s": output["solver_s"], "n_iter": n_iter}


BENCHMARK = Benchmark(
    name="inmf",
    description=("LIGER batch iNMF, k=20, λ=5, 30 iterations from the same U(0,2) init, 2 "
                 "batches of synthetic counts × 2,000 genes (LIGER-scaled). Objective of every "
                 "method's factors by scatlas's inmf_objective."),
    build=build,
    methods=methods,
    accuracy=accuracy,
    metrics=METRICS,
    default_sizes=(10_000, 100_000),
    default_params=DEFAULT_PARAMS,
    size_label="cells",
)


if __name__ == "__main__":  # pragma: no cover
    print(f"run with: {sys.executable} -m bench run inmf --sizes 1e4", file=sys.stderr)
    print(f"peers: { {n: str(peer_python(n)) for n in PEER_ENV} } (repo {REPO_ROOT})",
          file=sys.stderr)
