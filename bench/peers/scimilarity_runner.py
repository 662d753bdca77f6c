"""SCimilarity's own PyTorch encoder, decoder, triplet mining and loss, timed on the CPU.

The baseline side of ``bench/metric.py``. Runs inside the peer venv ``bench/.peers/scimilarity``
(``bench/peers/scimilarity_install.sh``): CPU torch and the PyPI ``scimilarity`` package (0.4.1)
installed without its dependencies. It imports NumPy, torch, networkx and SCimilarity only, never
scatlas. Three modes::

    python scimilarity_runner.py run --genes 2000,28231 --repeats 5   # standalone, JSON on stdout
    python scimilarity_runner.py worker                               # JSON-lines worker
    python scimilarity_runner.py selftest                             # tiny mining case, JSON

What is SCimilarity's code and what is ours
-------------------------------------------
Used as shipped (``scimilarity`` 0.4.1): ``nn_models.Encoder``, ``nn_models.Decoder``,
``triplet_selector.TripletLoss`` (which builds ``triplet_selector.TripletSelector``:
squared-distance ``pdist``, all anchor-positive pairs per label, ``sample_across_studies``
filter, ontology-aware negatives, per-pair ``semihard_negative``) and
``torch.nn.functional.triplet_margin_loss``.

Not imported, and why:

* ``scimilarity/__init__.py`` imports ``CellEmbedding``, ``CellAnnotation``, ``CellQuery`` and
  ``Interpreter`` (zarr, hnswlib, tiledb, captum, scanpy ...). :func:`import_scimilarity` registers
  an empty ``scimilarity`` package object whose ``__path__`` is the installed package folder, so
  ``scimilarity.nn_models``, ``scimilarity.ontologies`` and ``scimilarity.triplet_selector`` are
  imported from their installed files unchanged, without running ``__init__.py``.
* ``training_models.MetricLearning`` is a ``pytorch_lightning.LightningModule``.
  :class:`ScimilarityTrainer` repeats its ``__init__``/``configure_optimizers``/``training_step``
  statement by statement (same module construction order, ``get_losses``, ``get_mixed_loss``, the
  L1 loop, ``AdamW(lr=5e-3, weight_decay=0.01)``, ``CosineAnnealingLR`` read through
  ``get_last_lr``) followed by what Lightning's automatic optimisation does per step
  (``zero_grad``, ``backward``, ``step``). Lightning's ``self.log`` calls are left out.
* ``TripletSelector.__init__`` calls ``import_cell_ontology()``, which downloads
  ``cl-basic.obo`` (no network here). ``triplet_selector.import_cell_ontology`` is replaced by a
  function returning :func:`synthetic_ontology`: a random DAG of 3,000 terms in SCimilarity's
  orientation (edges parent -> child, nodes with a ``name``), in which some batch labels are
  ancestors of others, so the ancestor/descendant exclusion of negatives does real work.

Note on SCimilarity's L1 term: ``training_step`` adds ``l1 * sum|p| * lr`` for the first
``nn.Linear`` that is a *direct* child of ``encoder.network``. The hidden blocks are
``nn.Sequential``, so that is the bottleneck ``Linear(1024, 128)`` (weight and bias), not the
input layer; this runner does exactly what the code does and reports the shape it hit.

Workload (:func:`synthetic_batch`, also imported by ``bench/metric.py`` for our side): dense
float32 log-normalised-like cells (``density`` of the entries non-zero, values ``log1p`` of
library-size-normalised Gamma counts), integer labels drawn uniformly from ``n_labels``, studies
drawn uniformly from ``n_studies`` (as the collator hands them over: labels a float
``torch.Tensor``, studies a NumPy object array of study id strings). The cells to embed are a
dense array, or with ``embed_input="csr"`` a SciPy CSR matrix (``get_embeddings``' sparse
branch: each chunk densified with ``.toarray()``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import sys
import time
import traceback
import types
from typing import Any

import numpy as np

HIDDEN = (1024, 1024, 1024)
LATENT = 128

#: SCimilarity's training defaults (MetricLearning.__init__, scripts/train.py)
DEFAULTS: dict[str, Any] = {
    "batch_size": 1000,
    "hidden": list(HIDDEN),
    "latent": LATENT,
    "dropout": 0.5,
    "input_dropout": 0.4,
    "triplet_loss_weight": 0.001,
    "margin": 0.05,
    "negative_selection": "semihard",
    "sample_across_studies": True,
    "lr": 5e-3,
    "l1": 1e-4,
    "l2": 0.01,
    "max_epochs": 500,
    "n_labels": 20,
    "n_studies": 5,
    "density": 0.1,
    "n_embed": 10_000,
    "embed_input": "dense",  # or "csr": get_embeddings' sparse branch (densifies each chunk)
    "buffer_size": 10_000,
    "threads": 2,
    "seed": 0,
}


# --- workload (NumPy only: imported by bench/metric.py too) -------------------------------------


def synthetic_batch(
    n_cells: int, n_genes: int, *, density: float = 0.1, n_labels: int = 20, n_studies: int = 5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense log-normalised-like cells with labels and studies.

    Returns ``X`` float32 (n_cells, n_genes) with about ``density`` of the entries non-zero
    (``log1p(1e4 * c / sum(c))`` of Gamma(0.5, 2) "counts" at random positions), ``labels``
    int64 (n_cells,) uniform in ``[0, n_labels)`` and ``studies`` int64 (n_cells,) uniform in
    ``[0, n_studies)``. Deterministic in ``seed`` (``numpy.random.default_rng``).
    """
    rng = np.random.default_rng(seed)
    nnz = int(round(density * n_cells * n_genes))
    rows = rng.integers(0, n_cells, nnz)
    cols = rng.integers(0, n_genes, nnz)
    counts = rng.gamma(0.5, 2.0, nnz).astype(np.float32) + np.float32(1.0)
    X = np.zeros((n_cells, n_genes), dtype=np.float32)
    X[rows, cols] = counts
    totals = X.sum(axis=1, keepdims=True)
    np.divide(X, np.maximum(totals, 1.0), out=X)
    X *= np.float32(1e4)
    np.log1p(X, out=X)
    labels = rng.integers(0, n_labels, n_cells)
    studies = rng.integers(0, n_studies, n_cells)
    return X, labels, studies


def synthetic_ontology(n_labels: int = 20, *, n_terms: int = 3000, n_related: int | None = None,
                       seed: int = 0) -> tuple[Any, dict[int, str]]:
    """A Cell-Ontology-shaped DAG and the batch's ``int2label``.

    Random recursive tree on ``n_terms`` terms ``CL:0000000`` .. (term i's parent is uniform among
    the earlier terms, depth ~ ln(n_terms)), 15 % of the terms with a second parent; edges point
    parent -> child as in ``ontologies.import_cell_ontology`` (the obo graph reversed); every node
    has a ``name``. The labels are ``n_labels - n_related`` random terms from the deeper three
    quarters plus a parent of ``n_related`` of them (default ``n_labels // 5``), so some labels
    are ancestors of others.
    """
    import networkx as nx

    n_related = n_labels // 5 if n_related is None else n_related
    if not 0 <= n_related <= n_labels // 2:
        raise ValueError(f"need 0 <= n_related <= n_labels // 2, got {n_related}, {n_labels}")
    rng = np.random.default_rng(seed + 7919)
    ids = [f"CL:{i:07d}" for i in range(n_terms)]
    graph = nx.DiGraph()
    graph.add_node(ids[0], name="cell")
    for i in range(1, n_terms):
        graph.add_node(ids[i], name=f"cell type {i}")
        parent = int(rng.integers(0, i))
        graph.add_edge(ids[parent], ids[i])
        if i > 2 and rng.random() < 0.15:
            other = int(rng.integers(0, i))
            if other != parent:
                graph.add_edge(ids[other], ids[i])
    n_leafish = n_labels - n_related
    chosen = [int(t) for t in rng.choice(np.arange(n_terms // 4, n_terms), n_leafish,
                                         replace=False)]
    for term in chosen[:n_related]:
        parents = sorted(int(p.split(":")[1]) for p in graph.predecessors(ids[term]))
        extra = next((p for p in parents if p not in chosen), None)
        if extra is None:  # all parents taken already: any other unused term
            extra = next(t for t in range(n_terms) if t not in chosen)
        chosen.append(extra)
    int2label = {k: graph.nodes[ids[t]]["name"] for k, t in enumerate(chosen)}
    return graph, int2label


# --- SCimilarity ---------------------------------------------------------------------------------


def import_scimilarity() -> dict[str, Any]:
    """``nn_models``, ``ontologies`` and ``triplet_selector`` from the installed package.

    The package's ``__init__.py`` (which pulls zarr, hnswlib, tiledb, captum, scanpy) is not run:
    an empty module with the package folder as ``__path__`` stands in for it.
    """
    if "scimilarity" not in sys.modules:
        spec = importlib.util.find_spec("scimilarity")
        if spec is None or spec.origin is None:
            raise ImportError("scimilarity is not installed in this interpreter")
        pkg = types.ModuleType("scimilarity")
        pkg.__path__ = list(spec.submodule_search_locations or [os.path.dirname(spec.origin)])
        pkg.__file__ = spec.origin
        pkg.__spec__ = spec
        sys.modules["scimilarity"] = pkg
    import scimilarity.nn_models as nn_models
    import scimilarity.ontologies as ontologies
    import scimilarity.triplet_selector as triplet_selector

    return {"nn_models": nn_models, "ontologies": ontologies,
            "triplet_selector": triplet_selector}


def provenance() -> dict[str, Any]:
    """Versions of torch, SCimilarity, NumPy and hashes of the SCimilarity files used."""
    import torch

    mods = import_scimilarity()
    hashes = {}
    for name, mod in mods.items():
        with open(mod.__file__, "rb") as fh:
            hashes[f"{name}.py"] = hashlib.sha256(fh.read()).hexdigest()[:16]
    try:
        version = importlib.metadata.version("scimilarity")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "scimilarity": version,
        "scimilarity_files_sha256_16": hashes,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


class ScimilarityTrainer:
    """``MetricLearning`` without Lightning: SCimilarity's modules, loss and one training step.

    ``cells`` float32 (batch, n_genes) stays fixed (the benchmark times steps, not data loading).
    """

    def __init__(self, n_genes: int, cells: np.ndarray, labels: np.ndarray,
                 studies: np.ndarray, int2label: dict[int, str], onto: Any,
                 params: dict[str, Any]) -> None:
        import torch
        from torch import nn

        mods = import_scimilarity()
        ts = mods["triplet_selector"]
        ts.import_cell_ontology = lambda *a, **k: onto  # no network: the synthetic ontology
        p = {**DEFAULTS, **params}
        self.p = p
        torch.manual_seed(p["seed"])
        np.random.seed(p["seed"])  # noqa: NPY002 - SCimilarity's miner draws from it
        random.seed(p["seed"])
        hidden = list(p["hidden"])
        # MetricLearning.__init__
        self.encoder = mods["nn_models"].Encoder(
            n_genes, latent_dim=p["latent"], hidden_dim=hidden, dropout=p["dropout"],
            input_dropout=p["input_dropout"])
        self.decoder = mods["nn_models"].Decoder(
            n_genes, latent_dim=p["latent"], hidden_dim=list(reversed(hidden)),
            dropout=p["dropout"])
        self.triplet_loss_weight = p["triplet_loss_weight"]
        self.l1 = p["l1"]
        self.triplet_loss_fn = ts.TripletLoss(
            margin=p["margin"], negative_selection=p["negative_selection"],
            sample_across_studies=p["sample_across_studies"], perturb_labels=False,
            perturb_labels_fraction=0.5)
        self.mse_loss_fn = nn.MSELoss()
        # MetricLearning.configure_optimizers (Lightning collects encoder + decoder parameters)
        params_ = list(self.encoder.parameters()) + list(self.decoder.parameters())
        self.optimizer = torch.optim.AdamW(params_, p["lr"], weight_decay=p["l2"])
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=p["max_epochs"])
        # the batch as scCollator returns it: dense X, float labels, study id strings
        self.cells = torch.Tensor(cells)
        self.labels = torch.Tensor(labels)
        self.studies = np.array([f"DS{int(s):06d}" for s in studies], dtype=object)
        self.int2label = int2label
        # time the mining (TripletSelector.get_triplets_idx) inside the step
        selector = self.triplet_loss_fn.triplet_selector
        original = selector.get_triplets_idx
        self.mining_s = 0.0

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.mining_s += time.perf_counter() - start

        selector.get_triplets_idx = timed
        self.l1_shape = next(
            (list(layer.weight.shape) for layer in self.encoder.network
             if isinstance(layer, nn.Linear)), None)

    def training_step(self) -> dict[str, Any]:
        """``MetricLearning.training_step`` + Lightning's ``zero_grad``/``backward``/``step``."""
        import torch
        from torch import nn

        self.encoder.train()
        self.decoder.train()
        self.mining_s = 0.0
        start = time.perf_counter()
        self.optimizer.zero_grad()
        # get_losses(batch, val_metrics=False)
        cells, labels, studies = self.cells, self.labels, self.studies
        embedding = self.encoder(cells)  # MetricLearning.forward
        reconstruction = self.decoder(embedding)
        triplet_losses, num_hard_triplets, num_viable_triplets, triplets_idx = (
            self.triplet_loss_fn(embedding, labels, self.int2label, studies))
        mse = self.mse_loss_fn(cells, reconstruction)
        # training_step
        triplet_loss = triplet_losses.mean()
        num_nonzero_loss = (triplet_losses > 0).sum(dtype=torch.float).detach()
        hard_triplets = num_hard_triplets / num_viable_triplets
        w = self.triplet_loss_weight  # get_mixed_loss
        loss = (w * triplet_loss) + ((1.0 - w) * mse)
        current_lr = self.scheduler.get_last_lr()[0]
        if self.l1 > 0:  # "use l1 penalty for first layer" (see the module docstring)
            for layer in self.encoder.network:
                if isinstance(layer, nn.Linear):
                    l1_norm = sum(p.abs().sum() for p in layer.parameters())
                    l1_penalty = self.l1 * l1_norm * current_lr
                    loss += l1_penalty
                    break
        loss.backward()
        self.optimizer.step()
        elapsed = time.perf_counter() - start
        return {"step_s": elapsed, "mining_s": self.mining_s,
                "n_triplets": len(triplets_idx[0]), "n_nonzero": float(num_nonzero_loss),
                "hard_fraction": float(hard_triplets), "loss": float(loss.detach()),
                "mse": float(mse.detach()), "triplet": float(triplet_loss.detach())}

    def embed(self, X: Any, buffer_size: int, bf16: bool = False) -> tuple[float, np.ndarray]:
        """``CellEmbedding.get_embeddings``: eval, inference mode, chunks (CSR densified).

        ``bf16``: the same under ``torch.autocast("cpu", bfloat16)`` (not SCimilarity's own
        setting; the equal-precision counterpart of our bfloat16 embedding)."""
        import torch

        self.encoder.eval()
        start = time.perf_counter()
        parts = []
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            for i in range(0, X.shape[0], buffer_size):
                if isinstance(X, np.ndarray):
                    profiles = torch.Tensor(X[i: i + buffer_size])
                else:  # scipy CSR/CSC, as get_embeddings does
                    profiles = torch.Tensor(X[i: i + buffer_size].toarray())
                parts.append(self.encoder(profiles).float())
        embedding = torch.vstack(parts).detach().numpy()
        return time.perf_counter() - start, embedding


class Session:
    """One gene count: the trainer, the training batch and the cells to embed."""

    def __init__(self, n_genes: int, params: dict[str, Any]) -> None:
        import torch

        p = {**DEFAULTS, **params}
        torch.set_num_threads(int(p["threads"]))
        self.p = p
        start = time.perf_counter()
        X, labels, studies = synthetic_batch(
            p["batch_size"], n_genes, density=p["density"], n_labels=p["n_labels"],
            n_studies=p["n_studies"], seed=p["seed"])
        onto, int2label = synthetic_ontology(p["n_labels"], seed=p["seed"])
        self.trainer = ScimilarityTrainer(n_genes, X, labels, studies, int2label, onto, p)
        self.X_embed = (synthetic_batch(p["n_embed"], n_genes, density=p["density"],
                                        seed=p["seed"] + 1)[0] if p["n_embed"] else None)
        if self.X_embed is not None and p["embed_input"] == "csr":
            import scipy.sparse as sp

            self.X_embed = sp.csr_matrix(self.X_embed)
        elif p["embed_input"] not in ("dense", "csr"):
            raise ValueError(f"embed_input must be 'dense' or 'csr', got {p['embed_input']!r}")
        self.setup_s = time.perf_counter() - start

    def embed(self, bf16: bool = False) -> dict[str, Any]:
        if self.X_embed is None:
            raise RuntimeError("n_embed is 0: no cells to embed")
        seconds, Z = self.trainer.embed(self.X_embed, int(self.p["buffer_size"]), bf16)
        norms = np.linalg.norm(Z, axis=1)
        return {"embed_s": seconds, "n_cells": int(Z.shape[0]), "dim": int(Z.shape[1]),
                "norm_err": float(np.max(np.abs(norms - 1.0)))}


# --- modes ---------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return float(np.median(np.asarray(values)))


def run(genes: list[int], repeats: int, warmup: int, params: dict[str, Any]) -> dict[str, Any]:
    """Standalone timing: per gene count, ``warmup`` + ``repeats`` steps and embeddings."""
    out: dict[str, Any] = {"params": {**DEFAULTS, **params}, "repeats": repeats,
                           "warmup": warmup, "results": {}}
    for n_genes in genes:
        session = Session(n_genes, params)
        if "provenance" not in out:
            out["provenance"] = provenance()
        steps = [session.trainer.training_step() for _ in range(warmup + repeats)][warmup:]
        step_s = [s["step_s"] for s in steps]
        mining_s = [s["mining_s"] for s in steps]
        train_load = os.getloadavg()[0]
        embeds = [session.embed() for _ in range(warmup + repeats)][warmup:] \
            if session.X_embed is not None else []
        embed_s = [e["embed_s"] for e in embeds]
        batch = session.p["batch_size"]
        result: dict[str, Any] = {
            "setup_s": session.setup_s,
            "train": {"step_s": step_s, "median_s": _median(step_s), "min_s": min(step_s),
                      "max_s": max(step_s), "cells_per_s": batch / _median(step_s),
                      "mining_s_median": _median(mining_s),
                      "mining_share": _median([m / s for m, s in zip(mining_s, step_s,
                                                                       strict=True)]),
                      "n_triplets": steps[-1]["n_triplets"], "loss_last": steps[-1]["loss"],
                      "load_1m": round(train_load, 2),
                      "l1_layer_shape": session.trainer.l1_shape},
        }
        if embed_s:
            result["embed"] = {"embed_s": embed_s, "median_s": _median(embed_s),
                               "min_s": min(embed_s), "max_s": max(embed_s),
                               "n_cells": embeds[-1]["n_cells"],
                               "cells_per_s": embeds[-1]["n_cells"] / _median(embed_s),
                               "norm_err": embeds[-1]["norm_err"],
                               "load_1m": round(os.getloadavg()[0], 2)}
        out["results"][str(n_genes)] = result
        del session
    return out


def worker(proto: Any) -> int:
    """JSON lines on stdin: ``setup`` (n_genes, params), ``train``, ``embed``, ``quit``."""
    session: Session | None = None
    start = time.perf_counter()
    hello = {"ok": True, "peer": "scimilarity", **provenance(),
             "import_s": time.perf_counter() - start}
    proto.write(json.dumps(hello) + "\n")
    for line in sys.stdin:
        try:
            msg = json.loads(line)
            cmd = msg["cmd"]
            if cmd == "quit":
                break
            if cmd == "setup":
                session = None
                session = Session(int(msg["n_genes"]), dict(msg.get("params", {})))
                import torch

                reply = {"setup_s": session.setup_s, "torch_threads": torch.get_num_threads(),
                         "l1_layer_shape": session.trainer.l1_shape}
            elif session is None:
                raise RuntimeError("send setup first")
            elif cmd == "train":
                reply = session.trainer.training_step()
            elif cmd == "embed":
                reply = session.embed(bool(msg.get("bf16", False)))
            else:
                raise ValueError(f"unknown command {cmd!r}")
            proto.write(json.dumps({"ok": True, **reply}) + "\n")
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            traceback.print_exc(file=sys.stderr)
            proto.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
                        + "\n")
    return 0


def selftest(params: dict[str, Any]) -> dict[str, Any]:
    """A tiny case for tests: SCimilarity's mining and loss on known embeddings, one step.

    Returns the inputs (embeddings, labels, studies, which label pairs are ontology-related),
    SCimilarity's triplets, hard/viable counts and per-triplet losses, and a short training run
    on a tiny network (losses per step, whether the parameters moved).
    """
    import torch

    p = {**DEFAULTS, **params}
    torch.set_num_threads(1)
    mods = import_scimilarity()
    ts = mods["triplet_selector"]
    onto, int2label = synthetic_ontology(p["n_labels"], seed=p["seed"])
    ts.import_cell_ontology = lambda *a, **k: onto
    rng = np.random.default_rng(p["seed"])
    n = int(p["batch_size"])
    labels = rng.integers(0, p["n_labels"], n)
    studies = rng.integers(0, p["n_studies"], n)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    loss_fn = ts.TripletLoss(margin=p["margin"], negative_selection="semihard",
                             sample_across_studies=True)
    np.random.seed(p["seed"])  # noqa: NPY002 - SCimilarity's miner draws from it
    losses, n_hard, n_viable, idx = loss_fn(
        torch.from_numpy(emb), torch.Tensor(labels), int2label,
        np.array([f"DS{s:06d}" for s in studies], dtype=object))
    ontologies = mods["ontologies"]
    name2id = {v: k for k, v in ontologies.get_id_mapper(onto).items()}
    related = []
    for a, name_a in int2label.items():
        term = name2id[name_a]
        rel = ontologies.get_all_ancestors(onto, term) | ontologies.get_all_descendants(onto, term)
        related += [[a, b] for b, name_b in int2label.items() if name2id[name_b] in rel]
    # a tiny training run through the same trainer
    X, lab, stu = synthetic_batch(n, 50, density=0.3, n_labels=p["n_labels"],
                                  n_studies=p["n_studies"], seed=p["seed"])
    tiny = {**p, "hidden": [32, 32, 32], "latent": 8}
    trainer = ScimilarityTrainer(50, X, lab, stu, int2label, onto, tiny)
    before = [t.detach().clone() for t in trainer.encoder.parameters()]
    steps = [trainer.training_step() for _ in range(3)]
    moved = any(not torch.equal(a, b.detach())
                for a, b in zip(before, trainer.encoder.parameters(), strict=True))
    seconds, Z = trainer.embed(X, buffer_size=7)
    return {
        "embeddings": emb.tolist(), "labels": labels.tolist(), "studies": studies.tolist(),
        "related": related, "margin": p["margin"],
        "triplets": [list(map(int, t)) for t in idx],
        "losses": losses.detach().numpy().tolist(),
        "n_hard": float(n_hard), "n_viable": float(n_viable),
        "steps": steps, "params_moved": bool(moved), "l1_layer_shape": trainer.l1_shape,
        "embed_shape": list(Z.shape),
        "embed_norm_err": float(np.max(np.abs(np.linalg.norm(Z, axis=1) - 1.0))),
        "provenance": provenance(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("run", "worker", "selftest"))
    parser.add_argument("--genes", default="2000,28231")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--params", default="{}", help="JSON object overriding DEFAULTS")
    args = parser.parse_args(argv)
    params = json.loads(args.params)
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        parser.error(f"unknown params {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the JSON
    sys.stdout = sys.stderr
    if args.mode == "worker":
        return worker(proto)
    if args.mode == "run":
        genes = [int(float(g)) for g in args.genes.split(",") if g.strip()]
        result = run(genes, args.repeats, args.warmup, params)
    else:
        result = selftest(params)
    proto.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
