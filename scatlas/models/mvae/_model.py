"""The user-facing :class:`MultimodalVAE`: embed from any subset of modalities, impute a
modality from others, save / load."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..._validate import ScatlasInputError, check_positive_int
from ..io import SavedModel, write_model
from ..mvae_data import (
    Modality,
    batch_codes,
    locate,
    modality_arrays,
    read_modalities,
)
from ..mvae_likelihoods import (
    product_of_experts,
)
from ._module import INPUT_PCA, MVAEConfig, MVAENet
from ._task import expected_value, one_hot

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- model

class MultimodalVAE:
    """A trained multimodal VAE: config, weights, per-modality features and locations.

    Build one with :func:`scatlas.tl.train_mvae`; :meth:`embed` cells from any subset of their
    modalities, :meth:`impute` a modality from others, :meth:`save` /
    :func:`scatlas.models.load`.
    """

    kind = "mvae"

    def __init__(
        self,
        config: MVAEConfig,
        variables: Mapping[str, Any],
        features: Mapping[str, Sequence[str]],
        *,
        locations: Mapping[str, str] | None = None,
        batch_key: str | None = None,
        batch_names: Sequence[str] = (),
        info: dict[str, Any] | None = None,
    ):
        self.config = config
        self.variables = dict(variables)
        self.features = {m: pd.Index([str(f) for f in features[m]]) for m in config.modalities}
        for m, f in zip(config.modalities, config.n_features, strict=True):
            if len(self.features[m]) != f:
                raise ScatlasInputError(
                    f"{len(self.features[m])} features given for modality {m!r} of {f} inputs"
                )
        self.locations = dict(locations or {})
        self.batch_key = batch_key
        self.batch_names = list(batch_names)
        self.info = dict(info or {})
        if (INPUT_PCA in self.variables) != any(config.input_pcs):
            raise ScatlasInputError(
                f"a model with input_pcs={config.input_pcs} needs variables[{INPUT_PCA!r}] "
                "exactly when some modality's input_pcs is > 0")
        self._net = config.net()
        self._device_variables = jax.device_put(self.variables)
        self._encode = jax.jit(self._encode_impl)
        self._decode = jax.jit(self._decode_impl, static_argnums=(2, 5))

    # -- properties ------------------------------------------------------------------------

    @property
    def modalities(self) -> list[str]:
        return list(self.config.modalities)

    @property
    def likelihoods(self) -> dict[str, str]:
        return dict(zip(self.config.modalities, self.config.likelihoods, strict=True))

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def input_kind(self) -> str:
        """``"counts"``: every modality is read as raw counts (or 0/1 for Bernoulli ones)."""
        return "counts"

    @property
    def loss_terms(self) -> dict[str, float | None]:
        """The training log's loss terms and their weights (the KL's rises over the warm-up:
        None), for :func:`~.train.plot_history`."""
        c = self.config
        return {**{f"nll_{m}": 1.0 for m in c.modalities}, "kl": None,
                "align": float(c.alignment_weight), "contrast": float(c.contrastive_weight)}

    @property
    def genes(self) -> pd.Index:
        """The first modality's features (the saved folder's ``genes.txt``)."""
        return self.features[self.config.modalities[0]]

    def __repr__(self) -> str:
        c = self.config
        mods = ", ".join(f"{m}: {f} {lik}" for m, f, lik in
                         zip(c.modalities, c.n_features, c.likelihoods, strict=True))
        return (f"MultimodalVAE({mods} -> {c.latent_dim}-d latent, hidden {c.hidden}, "
                f"{c.n_batches} batches)")

    # -- jitted pieces ----------------------------------------------------------------------

    def _encode_impl(self, variables, xs, masks):
        libs = [jnp.sum(x, axis=1) for x in xs]
        mus, logvars = self._net.apply(variables, xs, libs, False, method=MVAENet.encode)
        return product_of_experts(mus, logvars, masks)

    def _decode_impl(self, variables, z, m, cov, log_lib, log_scale):
        c = self.config
        outs = self._net.apply(variables, z, one_hot(cov, c.n_batches), method=MVAENet.decode)
        out = outs[m]
        if log_lib is None:  # the model's predicted log library
            log_lib = out["lib"] * c.log_lib_sd[m] + c.log_lib_mean[m]
            if not log_scale:  # the mean of its lognormal (log scale: its mean, the median)
                sd = jnp.exp(out["lib_log_sd"]) * c.log_lib_sd[m]
                log_lib = log_lib + 0.5 * sd**2
        if log_scale and c.likelihoods[m] == "log1p_normal":
            return out["logits"]  # the mean of log1p x itself
        mean = expected_value(c.likelihoods[m], out, log_lib, c.log_lib_mean[m])
        return jnp.log1p(mean) if log_scale else mean

    # -- data ------------------------------------------------------------------------------

    def _resolve(self, data: Any, modalities: Any, *, present_only: bool) -> dict[str, Any]:
        """name -> location of the modalities to read (None: all whose location resolves)."""
        if isinstance(modalities, Mapping):
            chosen = dict(modalities)
        elif modalities is None:
            chosen = {m: self.locations.get(m, m) for m in self.config.modalities}
            if present_only:
                chosen = {m: loc for m, loc in chosen.items() if _resolves(data, m, loc)}
                if not chosen:
                    raise ScatlasInputError(
                        f"none of the model's modalities {self.locations} is in the data; pass "
                        "modalities= to say which to read (in Python also where: name -> "
                        "location)",
                        param="modalities")
        else:
            names = [modalities] if isinstance(modalities, str) else list(modalities)
            chosen = {m: self.locations.get(m, m) for m in names}
        unknown = set(chosen) - set(self.config.modalities)
        if unknown:
            raise ScatlasInputError(
                f"modalities {sorted(unknown)} are not in the model ({self.modalities})"
            )
        if not chosen:
            raise ScatlasInputError("no modalities selected")
        return chosen

    def _read(self, data: Any, chosen: Mapping[str, Any], masks: Any, min_overlap: float):
        mods = read_modalities(
            data, chosen, self.likelihoods, features=self.features, masks=masks,
            min_overlap=min_overlap,
        )
        return {mod.name: mod for mod in mods}

    def _posterior(self, mods: Mapping[str, Modality], batch_size: int, progress: bool | None):
        """(n, D) posterior means and log-variances of the PoE of ``mods`` (other experts off)."""
        from ..._progress import track

        c = self.config
        n = len(next(iter(mods.values())).observed)
        order = [mods.get(m) for m in c.modalities]
        means, logvars = [], []
        starts = range(0, n, batch_size)
        for start in track(starts, desc="encoding", progress=progress):
            idx = np.arange(start, min(start + batch_size, n))
            size = batch_size if n > batch_size else n
            xs, masks = [], []
            for m, mod in enumerate(order):
                if mod is None:
                    xs.append(np.zeros((size, c.n_features[m]), np.float32))
                    masks.append(np.zeros(size, np.float32))
                    continue
                arr = modality_arrays([mod], idx)
                xs.append(_pad(arr["x0"], size))
                masks.append(_pad(arr["m0"], size))
            mu, lv = self._encode(self._device_variables, xs, jnp.asarray(np.stack(masks)))
            means.append(np.asarray(mu)[: idx.size])
            logvars.append(np.asarray(lv)[: idx.size])
        return np.concatenate(means), np.concatenate(logvars)

    # -- public API --------------------------------------------------------------------------

    def embed(
        self,
        data: Any,
        modalities: Any = None,
        *,
        masks: Mapping[str, Any] | None = None,
        batch_size: int = 4096,
        min_overlap: float = 0.5,
        return_logvar: bool = False,
        progress: bool | None = None,
        layer: str | None = None,
        input: str | None = None,
        use_raw: bool | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Posterior mean (n_cells, latent_dim) float32 of the product of the chosen experts.

        ``modalities``: None (every model modality whose location is in ``data``), names (read
        at the training locations), or ``{name: location}``. Each cell uses the chosen
        modalities it has (missing ones masked); a cell with none of them is an error. Features
        are aligned by name to the model's (zero fill, ``min_overlap`` enforced). ``layer``,
        ``input`` and ``use_raw`` exist for :func:`scatlas.tl.embed`: the model reads raw counts
        (``input_kind``) at its modalities' locations, so only None (or ``input="counts"``) is
        accepted. ``return_logvar``: also the log-variances.
        """
        if input not in (None, "counts"):
            raise ScatlasInputError(
                f"a multimodal VAE reads raw counts (its likelihoods model counts), not "
                f"input={input!r}; give the raw counts at the modalities' locations "
                f"({self.locations or 'X'}), or pass modalities= to say which to read",
                param="input")
        if layer is not None or use_raw:
            raise ScatlasInputError(
                "a multimodal VAE reads its modalities at their locations "
                f"({self.locations or 'X'}); pass modalities= to say which to read instead of "
                "layer= / use_raw=", param="layer")
        batch_size = check_positive_int(batch_size, "batch_size")
        chosen = self._resolve(data, modalities, present_only=True)
        mods = self._read(data, chosen, masks, min_overlap)
        mu, logvar = self._posterior(mods, batch_size, progress)
        mu = mu.astype(np.float32, copy=False)
        return (mu, logvar.astype(np.float32, copy=False)) if return_logvar else mu

    def impute(
        self,
        data: Any,
        source: Any = None,
        target: str | None = None,
        *,
        library: str | float = "predicted",
        batch: str | None = None,
        masks: Mapping[str, Any] | None = None,
        n_samples: int = 0,
        scale: str = "counts",
        seed: int = 0,
        batch_size: int = 4096,
        min_overlap: float = 0.5,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Expected ``target`` values (n_cells, n_target_features) float32 from ``source``.

        The latent is the posterior mean of the ``source`` experts' product (``source`` as
        ``modalities`` in :meth:`embed`; None: every model modality present except the target).
        Values: expected counts for NB / NB-mixture / log1p-normal targets, probabilities for
        Bernoulli. ``library``: ``"predicted"`` (the model's log-library mean for the latent),
        ``"observed"`` (the target's observed totals; every cell must have the target) or a
        number (a fixed total, e.g. 1e4 for normalised values); a log1p-normal target has no
        library (its decoder predicts the values), so only ``"predicted"`` is accepted there.
        ``batch``: the batch category to decode in (default: the cells' ``obs[batch_key]`` when
        present, else the first).
        ``n_samples``: 0 decodes the posterior mean; ``k > 0`` averages the decoded means of
        ``k`` posterior samples (Monte Carlo posterior predictive mean; ``seed`` fixes them).
        ``scale``: ``"counts"`` (the values above) or ``"log1p"``: ``log1p`` of them, the library
        taken at its predicted log-scale mean (the median of its lognormal, not the mean), and
        with ``n_samples=k`` the average over posterior samples taken on that scale,
        ``E_q(z|source)[log1p E[x | z]]``: the estimate of the log-scale values under posterior
        uncertainty in ``z`` (what a log-scale comparison such as the Pearson correlation of
        ``log1p`` counts scores; averaging counts and then taking the log favours the samples
        with the largest values). A log1p-normal target's ``"log1p"`` values are its decoded
        means of ``log1p x`` (the counts scale: ``exp(mean + sd^2 / 2) - 1``).
        """
        c = self.config
        if target not in c.modalities:
            raise ScatlasInputError(f"target must be one of {self.modalities}, got {target!r}")
        m = c.modalities.index(target)
        if source is None:
            chosen = self._resolve(data, None, present_only=True)
            chosen.pop(target, None)
            if not chosen:
                raise ScatlasInputError(f"no source modality other than {target!r} in the data")
        else:
            chosen = self._resolve(data, source, present_only=False)
        batch_size = check_positive_int(batch_size, "batch_size")
        if int(n_samples) < 0:
            raise ScatlasInputError(f"n_samples must be >= 0, got {n_samples!r}")
        if scale not in ("counts", "log1p"):
            raise ScatlasInputError(f"scale must be 'counts' or 'log1p', got {scale!r}")
        if scale == "log1p" and c.likelihoods[m] == "bernoulli":
            raise ScatlasInputError(f"scale='log1p' needs a count target; {target!r} is bernoulli")
        if c.likelihoods[m] == "log1p_normal" and not (isinstance(library, str)
                                                      and library == "predicted"):
            raise ScatlasInputError(
                f"{target!r} has the log1p_normal likelihood, which has no library: only "
                f"library='predicted' applies, got {library!r}", param="library")
        log_scale = scale == "log1p"
        mods = self._read(data, chosen, masks, min_overlap)
        z, z_logvar = self._posterior(mods, batch_size, progress)
        n = z.shape[0]
        cov = self._covariate(data, batch, n)
        if isinstance(library, str):
            if library == "predicted":
                log_lib = None
            elif library == "observed":
                tmod = self._read(data, {target: self.locations.get(target, target)}, masks,
                                  min_overlap)[target]
                if not tmod.observed.all():
                    raise ScatlasInputError(
                        f"library='observed' needs {target!r} in every cell; "
                        f"{int((~tmod.observed).sum())} lack it"
                    )
                log_lib = np.log(np.asarray(tmod.matrix.sum(axis=1)).ravel())
            else:
                raise ScatlasInputError(
                    f"library must be 'predicted', 'observed' or a number, got {library!r}"
                )
        else:
            if not library > 0:
                raise ScatlasInputError(f"library must be > 0, got {library!r}")
            log_lib = np.full(n, np.log(float(library)))
        rng = np.random.default_rng(seed)
        out = []
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            size = batch_size if n > batch_size else n
            ll = None if log_lib is None else jnp.asarray(_pad(log_lib[sl].astype(np.float32),
                                                               size))
            cv = _pad(cov[sl], size)
            if n_samples == 0:
                vals = np.asarray(self._decode(self._device_variables, _pad(z[sl], size), m,
                                               cv, ll, log_scale))
            else:  # Monte Carlo mean over q(z | source) of E[x | z] (or of its log1p)
                sd = np.exp(0.5 * z_logvar[sl])
                vals = 0.0
                for _ in range(int(n_samples)):
                    zs = z[sl] + sd * rng.standard_normal(sd.shape).astype(np.float32)
                    vals = vals + np.asarray(self._decode(self._device_variables,
                                                          _pad(zs, size), m, cv, ll, log_scale))
                vals = vals / int(n_samples)
            out.append(vals[: sl.stop - sl.start])
        return np.concatenate(out).astype(np.float32, copy=False)

    def _covariate(self, data: Any, batch: str | None, n: int) -> np.ndarray:
        if self.config.n_batches == 0:
            return np.zeros(n, np.int32)
        if batch is not None:
            if batch not in self.batch_names:
                raise ScatlasInputError(f"batch {batch!r} is not one of {self.batch_names}")
            return np.full(n, self.batch_names.index(batch), np.int32)
        obs = getattr(data, "obs", None)
        if self.batch_key is not None and obs is not None and self.batch_key in obs:
            return batch_codes(data, self.batch_key, self.batch_names)[0]
        log.warning("no batch given and no obs[%r]: decoding in batch %r",
                    self.batch_key, self.batch_names[0])
        return np.zeros(n, np.int32)

    # -- persistence -------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the model folder (manifest, first modality's features, weights) atomically."""
        extra = {
            "features": {m: list(map(str, f)) for m, f in self.features.items()},
            "locations": {m: loc for m, loc in self.locations.items() if isinstance(loc, str)},
            "batch_key": self.batch_key, "batch_names": self.batch_names, "info": self.info,
        }
        return write_model(directory, kind=self.kind, config=asdict(self.config),
                           variables=self.variables, genes=self.genes, extra=extra)

    @classmethod
    def from_saved(cls, saved: SavedModel) -> MultimodalVAE:
        config = MVAEConfig(**saved["config"])
        extra = saved["extra"]
        return cls(config, saved["variables"], extra["features"],
                   locations=extra.get("locations"), batch_key=extra.get("batch_key"),
                   batch_names=extra.get("batch_names", ()), info=extra.get("info", {}))


def _resolves(data: Any, name: str, location: Any) -> bool:
    try:
        locate(data, name, location)
    except ScatlasInputError:
        return False
    return True


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    a = np.asarray(a)
    if a.shape[0] == size:
        return a
    pad = np.zeros((size - a.shape[0], *a.shape[1:]), a.dtype)
    return np.concatenate([a, pad])

