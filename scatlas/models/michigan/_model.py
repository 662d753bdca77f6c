"""The user-facing :class:`MichiGAN`: two-stage training, generation, latent arithmetic, saving.

Yu & Welch 2021 (MichiGAN, Genome Biology 22:158): a beta-TCVAE (Chen et al. 2018) learns a
disentangled latent space of log-normalised expression; a Wasserstein GAN with gradient penalty
(Gulrajani et al. 2017), whose generator and critic are conditioned on the VAE's posterior
means, then learns to sample realistic profiles for a given latent code. The generator replaces
the VAE's decoder: :meth:`MichiGAN.generate` keeps the code's meaning and samples sharper
profiles, and :meth:`MichiGAN.latent_shift` predicts a perturbation by latent arithmetic (the
mean code of the perturbed cells minus that of the controls, added to other cells' codes).

Both stages run on the shared loop (:func:`scatlas.models.train.fit`): the VAE as a plain
:class:`~._task.VAETask`, the GAN as a :class:`~._task.GANTask` that brings its own two-network
optimiser (the ``Task.optimizer`` hook of :mod:`scatlas.models.train`); each stage has its own
log, checkpoints and loss plot.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..._validate import check_positive_int
from ...exceptions import ScatlasInputError
from ..data import CellBatches
from ..inputs import InputSpec, model_chunks, resolve_input
from ..io import SavedModel, write_model
from ..train import TrainConfig, fit, plot_history
from ._module import TCVAE, ConditionalGAN
from ._task import ConditionedBatches, GANTask, MichiGANConfig, VAETask

log = logging.getLogger(__name__)

#: validation batches of the VAE stage at most (as the other models, SCimilarity's 10)
MAX_VALIDATION_BATCHES = 10


@dataclass
class LatentShift:
    """What :meth:`MichiGAN.latent_shift` returns.

    ``delta`` (D,) float32: mean latent code of the ``to`` cells minus that of the ``from``
    cells; ``cells`` (n,) int64: the cells it was added to; ``profiles`` (n * n_per_cell, G)
    float32: the generator's log-normalised profiles of their shifted codes (cell ``i``'s
    ``n_per_cell`` samples in rows ``i * n_per_cell ...``).
    """

    delta: np.ndarray
    cells: np.ndarray
    profiles: np.ndarray


class MichiGAN:
    """A trained MichiGAN: a beta-TCVAE and a latent-conditioned WGAN-GP (module docstring).

    Build one with :func:`scatlas.tl.train_michigan` (or :meth:`fit`); :meth:`embed` cells
    (posterior means), :meth:`generate` profiles from codes or cells, :meth:`decode` with the
    VAE's decoder (the baseline the GAN improves on), :meth:`latent_shift`; :meth:`save` /
    :func:`scatlas.models.load`. ``variables``: ``{"vae": flax variables, "gan": flax
    variables}``; profiles are log-normalised expression (``log1p`` of counts per 1e4) over
    ``genes``.
    """

    kind = "michigan"

    def __init__(
        self,
        config: MichiGANConfig,
        variables: dict[str, Any],
        genes: Any,
        *,
        input_spec: InputSpec | None = None,
        info: dict[str, Any] | None = None,
    ):
        self.config = config
        self.variables = {"vae": dict(variables["vae"]), "gan": dict(variables["gan"])}
        self.genes = pd.Index([str(g) for g in genes])
        if len(self.genes) != config.n_genes:
            raise ScatlasInputError(f"{len(self.genes)} genes given for {config.n_genes} inputs")
        self.input_spec = input_spec or InputSpec("lognorm")
        self.info = dict(info or {})
        self.history: dict[str, list[dict[str, Any]]] = {"vae": [], "gan": []}
        vae, gan = config.vae(), config.gan()
        self._device = jax.device_put(self.variables)
        self._encode = jax.jit(lambda v, x: vae.apply(v, x, method=TCVAE.encode))
        self._decode = jax.jit(lambda v, z: vae.apply(v, z, method=TCVAE.decode))
        self._generate = jax.jit(
            lambda v, z, n: gan.apply(v, z, n, method=ConditionalGAN.generate))

    # -- properties ------------------------------------------------------------------------

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def input_kind(self) -> str:
        return self.input_spec.kind

    @property
    def loss_terms(self) -> dict[str, dict[str, float | None]]:
        """Each stage's log terms and their weights in its loss (:func:`plot_history`)."""
        c = self.config
        return {"vae": {"nll": 1.0, "mi": c.alpha, "tc": c.beta, "dwkl": c.gamma},
                "gan": {"critic": 1.0, "generator": 1.0, "gp": c.gp_weight,
                        "wasserstein": None}}

    def __repr__(self) -> str:
        c = self.config
        return (f"MichiGAN({c.n_genes} genes -> {c.latent_dim}-d beta-TCVAE (beta {c.beta:g}), "
                f"WGAN-GP generator with {c.noise_dim}-d noise)")

    # -- training ----------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        X: Any,
        genes: Any,
        config: MichiGANConfig,
        *,
        vae_train: TrainConfig,
        gan_train: TrainConfig,
        rows: np.ndarray,
        val_rows: np.ndarray | None = None,
        batch_size: int = 128,
        transform: str = "none",
        input_spec: InputSpec | None = None,
        check_input: bool = True,
        info: dict[str, Any] | None = None,
    ) -> MichiGAN:
        """Train both stages on the cells ``rows`` of ``X`` (n_cells, n_genes; counts with
        ``transform="lognorm"``, log-normalised values with ``"none"``).

        Stage 1 trains the beta-TCVAE (``vae_train``; validation on ``val_rows``, whose best
        weights are kept); stage 2 encodes the training cells with the frozen encoder and trains
        the GAN on them conditioned on their posterior means (``gan_train``; no validation: a
        WGAN's losses choose no weights). ``config.n_train`` is set to ``rows.size``.
        """
        rows = np.sort(np.asarray(rows, np.int64))
        config = dataclasses.replace(config, n_train=int(rows.size))
        common = {"batch_size": batch_size, "balance": None, "transform": transform,
                  "rows": rows, "check_input": check_input, "nonnegative": True}
        batches = CellBatches(X, seed=vae_train.seed, **common)
        val = _validation(batches, val_rows, batches.batch_size)
        first = fit(VAETask(config), batches, vae_train, val_batches=val)
        vae_vars = first.variables
        vae = config.vae()
        encode = jax.jit(lambda v, x: vae.apply(v, x, method=TCVAE.encode)[0])
        latent = np.zeros((batches.source.n_obs, config.latent_dim), np.float32)
        for b in batches.sequential(rows, 4096):
            latent[b["index"]] = np.asarray(encode(vae_vars, jnp.asarray(b["x"])))
        gan_batches = ConditionedBatches(X, latent, seed=gan_train.seed, **common)
        second = fit(GANTask(config), gan_batches, gan_train)
        summary = dict(info or {})
        summary.update(
            n_train=int(rows.size), n_val=0 if val_rows is None else int(np.size(val_rows)),
            batch_size=batches.batch_size,
            vae={"steps": first.steps, "best_step": first.best_step, "best_val": first.best_val,
                 "stopped_early": first.stopped_early, "cells_per_s": first.cells_per_s,
                 "compile_s": first.compile_s, "train": vae_train.to_dict()},
            gan={"steps": second.steps, "cells_per_s": second.cells_per_s,
                 "compile_s": second.compile_s, "train": gan_train.to_dict()})
        model = cls(config, {"vae": vae_vars, "gan": second.variables}, genes,
                    input_spec=input_spec, info=summary)
        model.history = {"vae": first.history, "gan": second.history}
        return model

    def plot_history(self, path: str | Path) -> list[Path]:
        """Loss curves of both stages (:func:`scatlas.models.train.plot_history`):
        ``PATH_STEM.vae.png`` (NLL, MI, TC, DWKL) and ``PATH_STEM.gan.png`` (critic and generator
        losses, gradient penalty, Wasserstein estimate); returns the two paths."""
        stem = Path(path).with_suffix("")
        return [plot_history(self.history[s], stem.with_name(f"{stem.name}.{s}.png"),
                             terms=self.loss_terms[s]) for s in ("vae", "gan")]

    # -- inputs --------------------------------------------------------------------------------

    def _chunks(self, data: Any, layer: str | None, input: str | None, use_raw: bool | None,
                batch_size: int, min_overlap: float):
        data, layer, kind, where = resolve_input(data, self.input_spec, layer=layer,
                                                 input=input, use_raw=use_raw)
        return model_chunks(data, self.genes, layer=layer, input=kind, where=where,
                            chunk_size=batch_size, min_overlap=min_overlap)

    def _codes(self, z: Any, name: str = "z") -> np.ndarray:
        """``z`` as (n, D) float32 codes, checked."""
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ScatlasInputError(
                f"{name} must be a (n_cells, {self.latent_dim}) array of latent codes or an "
                f"AnnData of cells, got shape {z.shape}", param=name)
        if z.shape[0] == 0:
            raise ScatlasInputError(f"{name} holds no cells", param=name)
        if not np.isfinite(z).all():
            raise ScatlasInputError(f"{name} has NaN or infinite values", param=name)
        return z

    # -- public API ----------------------------------------------------------------------------

    def embed(
        self,
        data: Any,
        *,
        layer: str | None = None,
        input: str | None = None,
        use_raw: bool | None = None,
        batch_size: int = 4096,
        min_overlap: float = 0.5,
    ) -> np.ndarray:
        """Posterior means (n_cells, latent_dim) float32 of the beta-TCVAE's encoder.

        ``data``: an AnnData (genes matched by name, missing ones zero-filled, refused below
        ``min_overlap``) or a matrix whose columns are the model's genes, read as the model was
        trained (``layer``, ``input``, ``use_raw``: :func:`~scatlas.models.inputs.resolve_input`;
        values checked: negative values are refused).
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        out = [np.asarray(self._encode(self._device["vae"], jnp.asarray(x))[0])
               for x in self._chunks(data, layer, input, use_raw, batch_size, min_overlap)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def generate(
        self,
        data: Any,
        n_per_cell: int = 1,
        *,
        seed: int = 0,
        batch_size: int = 4096,
        **read: Any,
    ) -> np.ndarray:
        """Profiles (n_cells * n_per_cell, n_genes) float32 (log-normalised) from the generator.

        ``data``: latent codes (n_cells, latent_dim), or cells (an AnnData, encoded to their
        posterior means by :meth:`embed`, which takes ``read``: ``layer``, ``input``,
        ``use_raw``, ``min_overlap``). Each code gets ``n_per_cell`` samples (rows
        ``i * n_per_cell ...``), with standard-normal noise drawn on the host from ``seed`` (the
        same output for the same seed on any device).
        """
        n_per_cell = check_positive_int(n_per_cell, "n_per_cell")
        batch_size = check_positive_int(batch_size, "batch_size")
        z = self._as_codes(data, batch_size, read)
        z = np.repeat(z, n_per_cell, axis=0)
        noise = np.random.default_rng(seed).standard_normal(
            (z.shape[0], self.config.noise_dim)).astype(np.float32)
        out = [np.asarray(self._generate(self._device["gan"], jnp.asarray(z[i:i + batch_size]),
                                         jnp.asarray(noise[i:i + batch_size])))
               for i in range(0, z.shape[0], batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def decode(
        self,
        data: Any,
        n_per_cell: int = 1,
        *,
        sample: bool = True,
        seed: int = 0,
        batch_size: int = 4096,
        **read: Any,
    ) -> np.ndarray:
        """The VAE decoder's profiles (n_cells * n_per_cell, n_genes) float32 for codes or cells
        (as :meth:`generate`): its Gaussian mean, plus, with ``sample``, per-gene Gaussian noise
        of the learnt sd (drawn on the host from ``seed``), clipped at 0 (expression is never
        negative). What MichiGAN's generator replaces; the baseline of ``bench/michigan.py``."""
        n_per_cell = check_positive_int(n_per_cell, "n_per_cell")
        batch_size = check_positive_int(batch_size, "batch_size")
        z = np.repeat(self._as_codes(data, batch_size, read), n_per_cell, axis=0)
        means, log_sd = [], None
        for i in range(0, z.shape[0], batch_size):
            mean, log_sd = self._decode(self._device["vae"], jnp.asarray(z[i:i + batch_size]))
            means.append(np.asarray(mean))
        out = np.concatenate(means)
        if sample:
            sd = np.exp(np.asarray(log_sd, np.float32))
            out = out + sd * np.random.default_rng(seed).standard_normal(out.shape, np.float32)
        return np.maximum(out, 0.0).astype(np.float32, copy=False)

    def _as_codes(self, data: Any, batch_size: int, read: dict[str, Any]) -> np.ndarray:
        if hasattr(data, "n_obs") and hasattr(data, "var_names"):
            return self.embed(data, batch_size=batch_size, **read)
        if read:
            raise ScatlasInputError(f"{sorted(read)} apply to cells (an AnnData), not to codes",
                                    param=sorted(read)[0])
        return self._codes(data)

    def latent_shift(
        self,
        data: Any,
        from_mask: Any,
        to_mask: Any,
        *,
        apply_to: Any = None,
        n_per_cell: int = 1,
        seed: int = 0,
        batch_size: int = 4096,
        **read: Any,
    ) -> LatentShift:
        """A perturbation predicted by latent arithmetic (MichiGAN sec. "Predicting unseen
        perturbations"; scGen's vector arithmetic, Lotfollahi et al. 2019).

        ``delta = mean z(to_mask cells) - mean z(from_mask cells)`` (posterior means of
        ``data``'s cells, :meth:`embed` with ``read``); the generator then samples
        ``n_per_cell`` profiles of ``z + delta`` for every cell of ``apply_to`` (a boolean mask
        like the others; default ``from_mask``). Masks: boolean (n_cells,), non-empty.
        Returns a :class:`LatentShift`.
        """
        if not (hasattr(data, "n_obs") or np.ndim(data) == 2):
            raise ScatlasInputError("data must be an AnnData or a (n_cells, n_genes) matrix",
                                    param="data")
        n = int(data.n_obs if hasattr(data, "n_obs") else np.shape(data)[0])
        src = _mask(from_mask, n, "from_mask")
        dst = _mask(to_mask, n, "to_mask")
        target = src if apply_to is None else _mask(apply_to, n, "apply_to")
        n_per_cell = check_positive_int(n_per_cell, "n_per_cell")
        z = self.embed(data, batch_size=batch_size, **read)
        delta = (z[dst].mean(axis=0) - z[src].mean(axis=0)).astype(np.float32)
        cells = np.flatnonzero(target)
        profiles = self.generate(z[cells] + delta, n_per_cell, seed=seed, batch_size=batch_size)
        return LatentShift(delta=delta, cells=cells.astype(np.int64), profiles=profiles)

    # -- saving --------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the model folder (:func:`scatlas.models.io.write_model`, atomically)."""
        return write_model(directory, kind=self.kind, config=dataclasses.asdict(self.config),
                           variables=self.variables, genes=self.genes,
                           extra={"info": self.info, "input": self.input_spec.to_dict()})

    @classmethod
    def from_saved(cls, saved: SavedModel) -> MichiGAN:
        extra = saved["extra"]
        return cls(MichiGANConfig(**saved["config"]), saved["variables"], saved["genes"],
                   input_spec=InputSpec.from_dict(extra.get("input")), info=extra.get("info"))

    @classmethod
    def load(cls, directory: str | Path) -> MichiGAN:
        """A saved model folder (:func:`scatlas.models.load` reads any kind)."""
        from ..io import read_model

        saved = read_model(directory)
        if saved["kind"] != cls.kind:
            raise ScatlasInputError(f"{str(directory)!r} holds a {saved['kind']!r} model, not "
                                    "a MichiGAN", param="directory")
        return cls.from_saved(saved)


def _mask(mask: Any, n: int, name: str) -> np.ndarray:
    """A non-empty boolean (n,) mask, or :class:`ScatlasInputError` naming ``name``."""
    m = np.asarray(mask)
    if m.dtype != bool:
        raise ScatlasInputError(f"{name} must be a boolean mask, got dtype {m.dtype}",
                                param=name)
    if m.shape != (n,):
        raise ScatlasInputError(f"{name} has shape {m.shape} for {n} cells", param=name)
    if not m.any():
        raise ScatlasInputError(f"{name} selects no cells", param=name)
    return m


def _validation(batches: CellBatches, rows: np.ndarray | None, batch_size: int) -> list | None:
    """Fixed validation batches of ``rows`` (the cells that fill whole batches, at most
    :data:`MAX_VALIDATION_BATCHES`); None without any."""
    if rows is None or np.size(rows) < 2:
        return None
    rows = np.sort(np.asarray(rows, np.int64))
    vb = min(batch_size, rows.size)
    usable = rows[: min(rows.size // vb, MAX_VALIDATION_BATCHES) * vb]
    return list(batches.sequential(usable, vb))
