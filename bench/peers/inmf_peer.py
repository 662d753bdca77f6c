"""Peer iNMF solvers (pyplanc, pyliger) as a long-lived worker in their own virtual environment.

Started by ``bench/inmf.py`` as ``<peer python> bench/peers/inmf_peer.py {pyplanc|pyliger}``; it
imports only NumPy, SciPy and the peer library (never scatlas: the peers pin other NumPy
versions). Protocol: one JSON object per line on stdin, one JSON reply per line on the original
stdout (the peers' C++ progress bars print to file descriptor 1, so it is pointed at stderr):

* ``{"cmd": "load", "path": "data.npz"}``: the datasets (CSR cells x genes float64:
  ``data{i}``, ``indices{i}``, ``indptr{i}``, ``shape{i}``), the initial factors in scatlas's
  orientation (``W`` genes x k, ``V{i}`` genes x k, ``H{i}`` cells x k) and ``k``, ``lam``,
  ``n_iter``, ``ncores``. The data are converted to the peer's input format here, untimed.
* ``{"cmd": "run", "out": "factors.npz"}``: one fit from the initial factors. Only the solver call
  is timed (``time.perf_counter``); the factors go to ``out`` in scatlas's orientation. Reply:
  ``{"ok": true, "solver_s": ..., "n_iter": ..., "peer_objective": ...}``.
* ``{"cmd": "quit"}``.

Errors are replied as ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

import numpy as np
import scipy.sparse as sp


def _datasets(z: Any) -> list[sp.csr_matrix]:
    out, i = [], 0
    while f"data{i}" in z:
        shape = tuple(int(s) for s in z[f"shape{i}"])
        out.append(sp.csr_matrix((z[f"data{i}"], z[f"indices{i}"], z[f"indptr{i}"]),
                                 shape=shape, dtype=np.float64))
        i += 1
    return out


class Pyplanc:
    """libplanc's BPP iNMF (``pyplanc.bppinmf``), inputs genes x cells CSC float64."""

    def __init__(self) -> None:
        import pyplanc

        self.lib = pyplanc

    def load(self, z: Any) -> None:
        self.E = [X.T.tocsc() for X in _datasets(z)]  # genes x cells
        for E in self.E:
            E.sort_indices()
        self.k, self.lam, self.n_iter = int(z["k"]), float(z["lam"]), int(z["n_iter"])
        self.ncores = int(z["ncores"])
        self.W = np.asfortranarray(z["W"], dtype=np.float64)
        self.V = [np.asfortranarray(z[f"V{i}"], dtype=np.float64) for i in range(len(self.E))]
        self.H = [np.asfortranarray(z[f"H{i}"], dtype=np.float64) for i in range(len(self.E))]

    def run(self) -> tuple[float, dict[str, np.ndarray], float | None]:
        W, V, H = self.W.copy(order="F"), [v.copy(order="F") for v in self.V], [
            h.copy(order="F") for h in self.H]
        start = time.perf_counter()
        res = self.lib.bppinmf(self.E, self.k, self.lam, self.n_iter, False, H, V, W,
                               self.ncores)
        elapsed = time.perf_counter() - start
        out = {"W": np.asarray(res.W)}
        for i, (v, h) in enumerate(zip(res.VList, res.HList, strict=True)):
            out[f"V{i}"], out[f"H{i}"] = np.asarray(v), np.asarray(h)
        return elapsed, out, float(res.objErr)


class _Dataset:
    """The slice of an AnnData that ``optimize_ALS`` touches."""

    def __init__(self, X: sp.csr_matrix) -> None:
        self.shape = X.shape
        self.layers = {"scale_data": X}
        self.obsm: dict[str, Any] = {}
        self.varm: dict[str, Any] = {}


class _Liger:
    def __init__(self, Xs: list[sp.csr_matrix]) -> None:
        self.adata_list = [_Dataset(X) for X in Xs]
        self.num_samples = len(Xs)
        self.var_genes = np.arange(Xs[0].shape[1])


class Pyliger:
    """pyliger's ``optimize_ALS`` (NumPy BPP on dense data), orientation k x genes."""

    def __init__(self) -> None:
        from pyliger.factorization._iNMF_ANLS import optimize_ALS

        self.fn = optimize_ALS

    def load(self, z: Any) -> None:
        self.X = _datasets(z)
        self.k, self.lam, self.n_iter = int(z["k"]), float(z["lam"]), int(z["n_iter"])
        self.W = np.asarray(z["W"], dtype=np.float64)
        self.V = [np.asarray(z[f"V{i}"], dtype=np.float64) for i in range(len(self.X))]
        self.H = [np.asarray(z[f"H{i}"], dtype=np.float64) for i in range(len(self.X))]

    def run(self) -> tuple[float, dict[str, np.ndarray], float | None]:
        obj = _Liger(self.X)
        start = time.perf_counter()
        # thresh=-1: never stop early, run exactly n_iter iterations as the other methods
        self.fn(obj, self.k, value_lambda=self.lam, thresh=-1.0, max_iters=self.n_iter,
                H_init=[h.copy() for h in self.H], W_init=self.W.T.copy(),
                V_init=[v.T.copy() for v in self.V])
        elapsed = time.perf_counter() - start
        out = {"W": np.asarray(obj.adata_list[0].varm["W"])}
        for i, d in enumerate(obj.adata_list):
            out[f"V{i}"], out[f"H{i}"] = np.asarray(d.varm["V"]), np.asarray(d.obsm["H"])
        return elapsed, out, None


PEERS = {"pyplanc": Pyplanc, "pyliger": Pyliger}


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in PEERS:
        print(f"usage: inmf_peer.py {{{'|'.join(PEERS)}}}", file=sys.stderr)
        return 2
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # C++ progress output goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    start = time.perf_counter()
    peer = PEERS[argv[0]]()
    hello = {"ok": True, "peer": argv[0], "import_s": time.perf_counter() - start,
             "version": _version(argv[0]), "numpy": np.__version__,
             "python": sys.version.split()[0]}
    proto.write(json.dumps(hello) + "\n")
    for line in sys.stdin:
        try:
            msg = json.loads(line)
            if msg["cmd"] == "quit":
                break
            if msg["cmd"] == "load":
                with np.load(msg["path"]) as z:
                    peer.load(z)
                reply: dict[str, Any] = {"ok": True}
            elif msg["cmd"] == "run":
                elapsed, factors, objective = peer.run()
                np.savez(msg["out"], **factors)
                reply = {"ok": True, "solver_s": elapsed, "n_iter": peer.n_iter,
                         "peer_objective": objective}
            else:
                reply = {"ok": False, "error": f"unknown command {msg['cmd']!r}"}
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            traceback.print_exc(file=sys.stderr)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
