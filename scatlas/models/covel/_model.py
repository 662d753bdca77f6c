"""``CoVEL``: the trained model: embed cells of any modality, impute one modality from another,
feature embeddings, save / load (``scatlas.models.load``).

Training goes through :func:`scatlas.tl.train_covel` (or :meth:`CoVEL.fit` with arrays), which
runs :func:`scatlas.models.train.fit` on :class:`~._task.CoVELTask`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...exceptions import ScatlasInputError
from ..io import SavedModel, write_model
from ._module import VIEWS, CoVELConfig, CoVELNet, decoder_logits
from ._task import CoVELBatches, CoVELTask

log = logging.getLogger(__name__)

KIND = "covel"
GRAPH_KEY = "covel_graph"  # graph arrays saved beside the variables


class CoVEL:
    """A trained CoVEL model (see :mod:`scatlas.models.covel`).

    ``config``: :class:`~._module.CoVELConfig`; ``variables``: flax variables; ``features``:
    {modality: pandas Index of its features, in model order}; ``graph``: the resolved graph
    arrays (``src``, ``tgt``, ``weight``, ``sign``, ``norm``); ``info``: the training summary;
    ``history``: the log records.
    """

    def __init__(self, config: CoVELConfig, variables: Any, features: Mapping[str, Sequence[str]],
                 graph: Mapping[str, np.ndarray], *, info: dict[str, Any] | None = None):
        self.config = config
        self.variables = variables
        self.features = {m: pd.Index([str(f) for f in features[m]]) for m in config.modalities}
        self.graph = {k: np.asarray(v) for k, v in graph.items()}
        self.info = dict(info or {})
        self.history: list[dict[str, Any]] = []
        self._task = CoVELTask(config, self.graph)
        self._enc = jax.jit(self._encode, static_argnums=0)

    def __repr__(self) -> str:
        views = [v for v in VIEWS
                 if getattr(self.config, v)]
        return (f"CoVEL({dict(zip(self.config.modalities, self.config.n_features, strict=True))}"
                f", latent_dim={self.config.latent_dim}, views={views})")

    # ------------------------------------------------------------------------------ training

    @classmethod
    def fit(cls, config: CoVELConfig, features: Mapping[str, Sequence[str]],
            matrices: Sequence[Any], graph: Mapping[str, np.ndarray], train_cfg: Any, *,
            batch_size: int = 128, seed: int = 0, info: dict[str, Any] | None = None) -> CoVEL:
        """Train on ``matrices`` (per modality, cells x features, counts; CSR or dense) with the
        shared loop (:func:`scatlas.models.train.fit`, settings ``train_cfg``)."""
        from ..train import fit

        batches = CoVELBatches(config.modalities, matrices, batch_size, seed=seed,
                               paired=config.paired)
        result = fit(CoVELTask(config, graph), batches, train_cfg)
        info = {**(info or {}), "steps": result.steps, "cells_per_s": result.cells_per_s,
                "compile_s": result.compile_s, "batch_size": batch_size, "seed": seed,
                "train": train_cfg.to_dict()}
        model = cls(config, result.variables, features, graph, info=info)
        model.history = result.history
        return model

    # ----------------------------------------------------------------------------- inference

    def _index(self, modality: str) -> int:
        if modality not in self.config.modalities:
            raise ScatlasInputError(
                f"modality {modality!r} is not one of the model's {list(self.config.modalities)}",
                param="modality")
        return self.config.modalities.index(modality)

    def _encode(self, k: int, params: Any, x: jax.Array) -> jax.Array:
        loc, _ = self._task.net.apply({"params": params}, k, x, False, method=CoVELNet.encode)
        return loc

    def _matrix(self, data: Any, modality: str) -> np.ndarray | sp.csr_matrix:
        """The modality's counts in model feature order (missing features are zeros)."""
        from anndata import AnnData

        if hasattr(data, "mod") and not isinstance(data, AnnData):
            if modality not in data.mod:
                raise ScatlasInputError(f"the MuData has no modality {modality!r}",
                                        param="modality")
            data = data.mod[modality]
        if not isinstance(data, AnnData):
            raise ScatlasInputError(f"expected an AnnData (or MuData), got {type(data).__name__}",
                                    param="adata")
        feats = self.features[modality]
        pos = pd.Index(data.var_names.astype(str)).get_indexer(feats)
        found = pos >= 0
        if found.mean() < 0.5:
            raise ScatlasInputError(
                f"only {int(found.sum())} of the model's {len(feats)} {modality} features are in "
                f"the data (need half); were they renamed?", param="adata")
        X = data.X
        X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
        out = sp.lil_matrix((data.n_obs, len(feats)), dtype=np.float32) if sp.issparse(X) else \
            np.zeros((data.n_obs, len(feats)), np.float32)
        out[:, np.flatnonzero(found)] = X[:, pos[found]]
        out = sp.csr_matrix(out) if sp.issparse(out) else out
        from ..._validate import check_counts

        check_counts(out, f"{modality} counts")
        return out

    def latent(self, X: Any, modality: str, *, batch_size: int = 4096) -> np.ndarray:
        """Posterior means (n, latent_dim) float32 of counts ``X`` (model feature order)."""
        k = self._index(modality)
        params = self.variables["params"]
        outs = []
        for s in range(0, X.shape[0], batch_size):
            block = X[s:s + batch_size]
            block = block.toarray() if sp.issparse(block) else np.asarray(block)
            outs.append(np.asarray(self._enc(k, params, jnp.asarray(block, jnp.float32))))
        return np.concatenate(outs) if outs else np.zeros((0, self.config.latent_dim), np.float32)

    def embed(self, adata: Any, modality: str, *, key_added: str = "X_covel",
              batch_size: int = 4096) -> np.ndarray:
        """Embed cells of ``modality`` (AnnData of that modality's counts, features by name, or
        a MuData with it); writes ``adata.obsm[key_added]`` (n, latent_dim) and returns it."""
        self._index(modality)
        Z = self.latent(self._matrix(adata, modality), modality, batch_size=batch_size)
        target = adata.mod[modality] if hasattr(adata, "mod") and modality in adata.mod \
            else adata
        target.obsm[key_added] = Z
        return Z

    def feature_embeddings(self) -> dict[str, pd.DataFrame]:
        """{modality: DataFrame (features x latent_dim)} of the feature posterior means."""
        vloc, _ = self._task.net.apply({"params": self.variables["params"]},
                                       *self._task.conv_edges(), method=CoVELNet.features)
        vloc = np.asarray(vloc)
        out, start = {}, 0
        for m, f in zip(self.config.modalities, self.config.n_features, strict=True):
            out[m] = pd.DataFrame(vloc[start:start + f], index=self.features[m])
            start += f
        return out

    def decode(self, Z: np.ndarray, target: str, *, library: float | None = None) -> np.ndarray:
        """Expected ``target`` values (n, F_target) from latents: NB means at ``library``
        (default: the mean training total, ``exp(log_lib_mean)``) or Bernoulli probabilities."""
        k = self._index(target)
        v = self.feature_embeddings()[target].to_numpy()
        p = self.variables["params"]
        m = self.config.modalities[k]
        logits = decoder_logits(jnp.asarray(Z), jnp.asarray(v), p[f"dec_{m}_scale"],
                                p[f"dec_{m}_bias"])
        if self.config.likelihoods[k] == "bernoulli":
            return np.asarray(jax.nn.sigmoid(logits))
        lib = float(np.exp(self.config.log_lib_mean[k])) if library is None else float(library)
        return np.asarray(jax.nn.softmax(logits, axis=-1)) * lib

    def impute(self, adata: Any, source: str, target: str, *, key_added: str | None = None,
               library: float | None = None) -> pd.DataFrame:
        """Impute ``target`` for cells measured in ``source``: decode the ``source`` posterior
        means with the ``target`` decoder (module :meth:`decode`); writes
        ``adata.obsm[key_added or f"{target}_imputed"]`` (DataFrame named by the target's
        features) and returns it."""
        self._index(target)
        Z = self.latent(self._matrix(adata, source), source)
        df = pd.DataFrame(self.decode(Z, target, library=library),
                          index=(adata.mod[source] if hasattr(adata, "mod") and source in
                                 adata.mod else adata).obs_names,
                          columns=self.features[target])
        host = adata.mod[source] if hasattr(adata, "mod") and source in adata.mod else adata
        host.obsm[key_added or f"{target}_imputed"] = df
        return df

    # ----------------------------------------------------------------------------- save/load

    def save(self, directory: str | Path) -> Path:
        """Write a model folder (atomically; :mod:`scatlas.models.io`)."""
        names = [f"{m}\t{f}" for m in self.config.modalities for f in self.features[m]]
        variables = {**jax.device_get(self.variables), GRAPH_KEY: self.graph}
        return write_model(directory, kind=KIND, config=self.config.to_dict(),
                           variables=variables, genes=names,
                           extra={"info": _jsonable(self.info)})

    @classmethod
    def from_saved(cls, saved: SavedModel) -> CoVEL:
        config = CoVELConfig(**saved["config"])
        variables = dict(saved["variables"])
        graph = variables.pop(GRAPH_KEY)
        features: dict[str, list[str]] = {m: [] for m in config.modalities}
        for line in saved["genes"]:
            m, f = line.split("\t", 1)
            features[m].append(f)
        return cls(config, variables, features, graph, info=saved["extra"].get("info"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
