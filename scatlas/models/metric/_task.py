"""The metric encoder's training task: the label hierarchy, :class:`MetricTask` (triplet or
InfoNCE + reconstruction + L1, :mod:`scatlas.models.metric_losses`) and the fixed PCA input
layer fitted before training (:func:`fit_input_pca`)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from ..._validate import ScatlasInputError, check_positive_int
from .. import metric_losses
from ..train import TrainConfig, make_schedule
from ._module import MetricConfig, MetricNet

# ------------------------------------------------------------------------------ label hierarchy

def read_hierarchy(path: str | Path) -> dict[str, list[str]]:
    """A child -> parents map from a file: JSON ``{child: parent or [parents]}`` or a two-column
    CSV/TSV (``child, parent``; header optional), e.g. cell-ontology is_a edges exported once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label hierarchy file {str(path)!r} does not exist")
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or not raw:
            raise ScatlasInputError(
                f"label hierarchy {str(path)!r}: expected a non-empty JSON object "
                "{child: parent or [parents]}"
            )
        return {str(k): [v] if isinstance(v, str) else [str(x) for x in v] for k, v in raw.items()}
    delim = "\t" if path.suffix in (".tsv", ".tab") else ","
    parents: dict[str, list[str]] = {}
    with open(path, newline="") as fh:
        for row in csv.reader(fh, delimiter=delim):
            if len(row) < 2 or row[0].strip().lower() in ("child", "#child"):
                continue
            parents.setdefault(row[0].strip(), []).append(row[1].strip())
    if not parents:
        raise ScatlasInputError(
            f"label hierarchy {str(path)!r} has no (child, parent) rows"
        )
    return parents


def related_labels(
    names: Sequence[str], parents: Mapping[str, str | Iterable[str]] | None
) -> np.ndarray:
    """(L, L) bool: label i equals, is an ancestor of, or a descendant of label j.

    Raises :class:`ScatlasInputError` when ``parents`` is given but names none of the labels
    (as a child or a parent): a hierarchy of ontology IDs applied to label names, say, would
    otherwise be silently ignored.
    """
    L = len(names)
    rel = np.eye(L, dtype=bool)
    if not parents:
        return rel
    norm = {c: [p] if isinstance(p, str) else list(p) for c, p in parents.items()}
    terms = set(norm) | {p for ps in norm.values() for p in ps}
    if not terms & set(names):
        raise ScatlasInputError(
            f"the label hierarchy ({len(terms)} terms, e.g. {sorted(terms)[:3]}) names none of "
            f"the {L} labels (e.g. {list(names)[:3]}); it must use the labels' own names"
        )
    pos = {n: i for i, n in enumerate(names)}
    for i, name in enumerate(names):
        seen, stack = set(), list(norm.get(name, []))
        while stack:
            p = stack.pop()
            if p in seen:
                continue
            seen.add(p)
            stack.extend(norm.get(p, []))
            if p in pos:
                rel[i, pos[p]] = rel[pos[p], i] = True
    return rel


# ----------------------------------------------------------------------------------------- task

@dataclass
class MetricTask:
    """The :class:`~scatlas.models.train.Task` of the metric encoder."""

    config: MetricConfig
    train_config: TrainConfig
    related: np.ndarray = field(default_factory=lambda: np.eye(1, dtype=bool))
    #: (L,) bool: labels with a single training cell (negatives only; counted in the log as
    #: ``n_negative_only``, the mined triplets whose negative has such a label). None: none.
    negative_only: np.ndarray | None = None
    #: the fixed PCA input layer of ``config.input_pcs``: ``{"mean": (n_genes,),
    #: "components": (n_genes, input_pcs)}`` float32 (:func:`fit_input_pca`); None: the network
    #: reads the genes
    projection: Mapping[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.net = self.config.net()
        if (self.projection is None) != (self.config.input_pcs is None):
            raise ScatlasInputError("input_pcs and the PCA projection go together")
        if self.projection is not None:
            self._proj_mean = jnp.asarray(self.projection["mean"], jnp.float32)
            self._proj_components = jnp.asarray(self.projection["components"], jnp.float32)
        self._related = jnp.asarray(self.related, dtype=bool)
        self._negative_only = (None if self.negative_only is None or not np.any(self.negative_only)
                               else jnp.asarray(self.negative_only, dtype=bool))
        self._lr = make_schedule(self.train_config)

    def init(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        x = jnp.zeros((1, self.config.n_inputs), jnp.float32)
        return self.net.init({"params": rng, "dropout": rng}, x, train=False)

    def _apply(self, variables, x, train, rng, **kw):
        """``net.apply`` in train mode (dropout, batch statistics updated) or eval mode;
        returns ``(outputs, new_state)``."""
        if train:
            return self.net.apply(variables, x, train=True, rngs={"dropout": rng},
                                  mutable=["batch_stats"], **kw)
        out = self.net.apply(variables, x, train=False, **kw)
        return out, {k: v for k, v in variables.items() if k != "params"}

    def _embed_and_mse(self, params, state, batch, rng, train):
        """``(z, reconstruction MSE, new_state)`` of a dense batch (``x``) or a CSR batch
        (``x_indptr``, ``x_indices``, ``x_data``: :mod:`scatlas.models.sparse_ops`, CPU)."""
        variables = {"params": params, **state}
        if "x_indptr" not in batch:
            x = batch["x"].astype(jnp.float32)
            if self.projection is not None:  # the fixed PCA input layer: (x - mean) @ components
                x = (x - self._proj_mean) @ self._proj_components
            (z, recon), new_state = self._apply(variables, x, train, rng)
            return z, jnp.mean((recon - x) ** 2), new_state
        from .. import sparse_ops, xla_ffi

        X = sparse_ops.CSR(batch["x_indptr"], batch["x_indices"], batch["x_data"])
        input_rng, rng = jax.random.split(rng)
        Xd = sparse_ops.dropout(X, self.config.input_dropout, input_rng) if train else X
        first = params["encoder"]["_Block_0"]["Dense_0"]
        h = sparse_ops.csr_matmul(Xd, first["kernel"]) + first["bias"]
        (z, recon), new_state = self._apply(variables, h, train, rng,
                                            method=MetricNet.after_first)
        target = xla_ffi.csr_to_dense(X.indptr, X.indices, X.data, self.config.n_genes)
        return z, jnp.mean((recon - target) ** 2), new_state

    def loss(self, params, state, batch, rng, step, train):
        cfg = self.config
        drop_rng, mine_rng = jax.random.split(rng)
        z, mse, new_state = self._embed_and_mse(params, state, batch, drop_rng, train)
        if cfg.objective == "triplet":
            metric, extra = metric_losses.mined_triplet_loss(
                z, batch["label"], batch["study"], self._related, mine_rng, margin=cfg.margin,
                strategy=cfg.mining, across_studies=cfg.across_studies,
                negative_only=self._negative_only,
                same_study_negatives=cfg.negatives == "same_study",
            )
        else:
            metric = metric_losses.supcon_loss(
                z, batch["label"], self._related, cfg.temperature,
                batch["study"] if cfg.negatives == "same_study" else None)
            extra = {}
        w = cfg.metric_weight
        w1 = params["encoder"]["_Block_0"]["Dense_0"]["kernel"]
        # the L1 penalty follows the learning rate: left out of the validation loss, which
        # would otherwise fall with the schedule and bias early stopping toward later steps
        l1 = cfg.l1 * self._lr(step) * jnp.sum(jnp.abs(w1)) if train else jnp.zeros(())
        loss = w * metric + (1 - w) * mse + l1
        return loss, ({cfg.objective: metric, "mse": mse, "l1": l1, **extra}, new_state)


def fit_input_pca(X: Any, n_components: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed PCA input layer of ``MetricConfig.input_pcs``, fitted on the training cells.

    ``X``: (n_cells, n_genes) log-normalised training cells (dense or CSR). Returns
    ``{"mean": (n_genes,), "components": (n_genes, k)}`` float32 with
    ``k = min(n_components, n_cells - 1, n_genes)``: sklearn's ``PCA`` (centred, its ``"auto"``
    solver, ``random_state=seed``); a cell's input is ``(x - mean) @ components``, its scores.
    """
    from sklearn.decomposition import PCA

    n_components = check_positive_int(n_components, "input_pcs")
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    k = min(n_components, X.shape[0] - 1, X.shape[1])
    if k < 1:
        raise ScatlasInputError(f"input_pcs needs at least 2 training cells, got {X.shape[0]}")
    pca = PCA(k, random_state=seed).fit(X.astype(np.float64))
    return {"mean": pca.mean_.astype(np.float32),
            "components": np.ascontiguousarray(pca.components_.T, dtype=np.float32)}

