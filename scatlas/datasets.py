"""Synthetic single-cell atlases with known ground truth, from 1e3 to 1e7 cells.

Generative model (all randomness derived from ``seed``):

* **Gene programs** ``P`` (``n_programs x n_genes``, non-negative): every program is the shared
  gene baseline ``b_g`` (log-normal, spanning ~3 orders of magnitude) up-regulated on its own
  random subset of genes (``program_gene_fraction`` of them, gamma fold changes of mean
  ``program_fold``).
* **Cell types** mix programs with type-specific weights ``W`` (``n_cell_types x n_programs``;
  each type has one dominant program plus a Dirichlet mixture of the others). A cell of type
  ``t`` has weights ``w = W[t] * exp(cell_variation * z)`` (renormalised, ``z ~ N(0, 1)``): the
  per-cell continuous variation. Its relative expression is ``w @ P``.
* **Batches** (proportions Dirichlet, composition of cell types varying mildly per batch)
  multiply genes by ``exp(batch_effect * N(0, 1))`` per (batch, gene) ("scaling"), add a
  batch-specific ambient profile that makes up ``~batch_shift`` of each cell's counts ("shift"),
  and shift the log library size by ``0.5 * batch_effect * N(0, 1)`` per batch.
* **Counts**: negative binomial with mean ``library_size_c * profile_cg`` and per-gene inverse
  dispersion ``theta_g`` (log-normal around ``theta``), so variance = ``mu + mu^2 / theta``.
  The mean library size is calibrated so that the expected fraction of non-zero entries equals
  ``density`` (or fixed with ``library_size=``).
* **Paired modalities** from the same cell weights ``w``: protein (ADT) counts, negative binomial
  over ``n_proteins`` program-driven proteins plus background, stored dense as a DataFrame of int32
  in ``obsm["protein_counts"]`` (as in the real CITE-seq file); binary ATAC peaks,
  ``Bernoulli(1 - exp(-depth_c * accessibility_cj))``, stored as CSR float32 in ``obsm["atac"]``.

Determinism: cells are generated in fixed internal blocks of :data:`BLOCK_SIZE` cells, block ``i``
drawing from ``np.random.default_rng([seed, stream, i])``. The result therefore depends only on
the parameters and ``seed``, never on ``chunk_size`` or ``n_jobs``, and ``synthetic(n)`` is the
first ``n`` cells of ``synthetic(m)`` for ``m > n`` (same other parameters).

Size (about 900 lines): one generative model, its block-wise sampler and its writers share the
determinism contract above; the block functions (:func:`build_model`, :func:`generate_block`,
:func:`slice_block`, :func:`stack_blocks`, :func:`obs_frame`, :func:`uns_record`) are public for
:mod:`scatlas.atlas`, which writes the same cells to zarr on Dask.

Sampling is vectorised per block: a dense float32 mean matrix, one float32 uniform per entry to
decide zero / non-zero by the negative binomial's exact zero probability, exact inversion (float64)
of the NB CDF for the rare non-zero entries of low mean, and gamma-Poisson draws for entries of
high mean. Blocks run on a small thread pool (NumPy releases the GIL).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import backend
from ._progress import bar
from ._validate import ScatlasInputError, check_positive_int

__all__ = [
    "BLOCK_SIZE",
    "SyntheticSpec",
    "iter_synthetic",
    "synthetic",
    "write_synthetic_h5ad",
]

#: Cells per internal generation block (fixed: changing it changes every generated dataset).
BLOCK_SIZE = 512
#: Bumped whenever the generative algorithm changes output for a given seed.
GENERATOR_VERSION = 1

_F32 = np.float32
# Entries with mean >= this are drawn gamma-Poisson directly; below, by CDF inversion.
_DIRECT_MEAN = 6.0
# Ground-truth arrays go into .uns["synthetic"] only when they have at most this many values.
_MAX_TRUTH_VALUES = 2_000_000
# RNG stream identifiers: default_rng([seed, stream, index]).
_GLOBAL, _CELLS, _PROTEIN, _ATAC = 0, 1, 2, 3


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the generative model (see the module docstring for their meaning).

    ``density`` is the target expected fraction of non-zero RNA counts; it calibrates the mean
    library size. Give ``library_size`` (mean total counts per cell, before the per-batch depth
    offsets) with ``density=None`` to fix the depth instead. ``n_programs=None`` means
    ``max(2 * n_cell_types, 10)``. ``theta`` is the typical negative-binomial inverse
    dispersion (per gene: ``theta * LogNormal(0, 0.5)``, clipped to [0.2, 1000]).
    """

    n_genes: int = 2_000
    n_cell_types: int = 8
    n_batches: int = 3
    n_programs: int | None = None
    batch_effect: float = 0.3
    batch_shift: float = 0.02
    density: float | None = 0.1
    library_size: float | None = None
    library_sd: float = 0.4
    theta: float = 5.0
    cell_variation: float = 0.5
    program_gene_fraction: float = 0.05
    program_fold: float = 6.0
    protein: bool = False
    n_proteins: int = 50
    protein_library_size: float = 1_500.0
    atac: bool = False
    n_peaks: int = 5_000
    atac_density: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_sizes()
        self._check_depth()
        self._check_effects()

    def _check_sizes(self) -> None:
        check_positive_int(self.n_genes, "n_genes")
        check_positive_int(self.n_cell_types, "n_cell_types", upper=127, what="the int8 codes")
        check_positive_int(self.n_batches, "n_batches", upper=127, what="the int8 codes")
        if self.n_programs is not None:
            check_positive_int(self.n_programs, "n_programs")
        if self.protein:
            check_positive_int(self.n_proteins, "n_proteins")
        if self.atac:
            check_positive_int(self.n_peaks, "n_peaks")
            _check_fraction(self.atac_density, "atac_density")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise ScatlasInputError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.seed < 0:
            raise ScatlasInputError(f"seed must be a non-negative integer, got {self.seed!r}")

    def _check_depth(self) -> None:
        if self.density is None and self.library_size is None:
            raise ScatlasInputError("give density= (target non-zero fraction) or library_size=")
        if self.density is not None and self.library_size is not None:
            raise ScatlasInputError(
                "density= and library_size= both set; density calibrates the library size, so "
                "pass density=None to fix library_size"
            )
        if self.density is not None:
            _check_fraction(self.density, "density")

    def _check_effects(self) -> None:
        for name in ("library_size", "theta", "protein_library_size", "program_fold"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ScatlasInputError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("batch_effect", "library_sd", "cell_variation"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ScatlasInputError(f"{name} must be >= 0, got {value!r}")
        _check_fraction(self.program_gene_fraction, "program_gene_fraction")
        if not 0 <= self.batch_shift < 1:
            raise ScatlasInputError(f"batch_shift must be in [0, 1), got {self.batch_shift!r}")

    @property
    def k(self) -> int:
        """Number of gene programs."""
        return self.n_programs or max(2 * self.n_cell_types, 10)


def _check_fraction(value: Any, name: str) -> None:
    if not (isinstance(value, int | float | np.floating) and 0 < value < 1):
        raise ScatlasInputError(f"{name} must be a fraction in (0, 1), got {value!r}")


def make_spec(n_genes: int, params: dict[str, Any]) -> SyntheticSpec:
    known = {f.name for f in fields(SyntheticSpec)} - {"n_genes"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise TypeError(f"unknown synthetic() parameter(s): {unknown}; known: {sorted(known)}")
    return SyntheticSpec(n_genes=n_genes, **params)


# --------------------------------------------------------------------------------------------
# Global model (everything shared by all cells)
# --------------------------------------------------------------------------------------------


@dataclass
class SyntheticModel:
    spec: SyntheticSpec
    baseline: np.ndarray  # (G,) float32, relative gene abundance
    programs: np.ndarray  # (K, G) float32, non-negative
    type_weights: np.ndarray  # (T, K) float32, rows sum to 1
    batch_probs: np.ndarray  # (B,) float64
    composition: np.ndarray  # (B, T) float64, P(type | batch)
    batch_scale: np.ndarray  # (B, G) float32, multiplicative gene scaling
    ambient: np.ndarray  # (B, G) float32, rows sum to 1
    shift_fraction: np.ndarray  # (B,) float32
    batch_log_library: np.ndarray  # (B,) float32
    gene_theta: np.ndarray  # (G,) float32
    mean_library_size: float = 0.0
    protein: dict[str, np.ndarray] | None = None
    atac: dict[str, np.ndarray] | None = None


def _grng(spec: SyntheticSpec, part: int) -> np.random.Generator:
    return np.random.default_rng([int(spec.seed), _GLOBAL, part])


def _normalise_rows(a: np.ndarray) -> np.ndarray:
    a /= a.sum(axis=-1, keepdims=True)
    return a


def build_model(spec: SyntheticSpec) -> SyntheticModel:
    G, K, T, B = spec.n_genes, spec.k, spec.n_cell_types, spec.n_batches
    baseline = _grng(spec, 0).lognormal(0.0, 1.5, size=G).astype(_F32)

    rng = _grng(spec, 1)
    mask = rng.random((K, G)) < spec.program_gene_fraction
    fold = rng.gamma(2.0, spec.program_fold / 2.0, size=(K, G))
    programs = (baseline * (1.0 + mask * fold)).astype(_F32)

    rng = _grng(spec, 2)
    mix = rng.dirichlet(np.full(K, 0.3), size=T)
    dominant = np.zeros((T, K))
    dominant[np.arange(T), np.arange(T) % K] = 1.0
    type_weights = (0.6 * dominant + 0.4 * mix).astype(_F32)
    type_probs = rng.dirichlet(np.full(T, 3.0))
    composition = rng.dirichlet(30.0 * type_probs + 0.5, size=B)
    batch_probs = rng.dirichlet(np.full(B, 10.0))

    rng = _grng(spec, 3)
    batch_scale = np.exp(spec.batch_effect * rng.standard_normal((B, G))).astype(_F32)
    ambient = _normalise_rows((baseline * rng.lognormal(0.0, 1.0, size=(B, G))).astype(_F32))
    shift_fraction = (spec.batch_shift * rng.uniform(0.5, 1.5, size=B)).astype(_F32)
    shift_fraction = np.minimum(shift_fraction, _F32(0.99))
    batch_log_library = (0.5 * spec.batch_effect * rng.standard_normal(B)).astype(_F32)

    rng = _grng(spec, 4)
    gene_theta = np.clip(spec.theta * rng.lognormal(0.0, 0.5, size=G), 0.2, 1e3).astype(_F32)

    model = SyntheticModel(
        spec, baseline, programs, type_weights, batch_probs, composition, batch_scale, ambient,
        shift_fraction, batch_log_library, gene_theta,
    )
    model.mean_library_size = _calibrate_library(model)
    if spec.protein:
        model.protein = _build_protein(spec)
    if spec.atac:
        model.atac = _build_atac(spec, model)
    return model


def _build_protein(spec: SyntheticSpec) -> dict[str, np.ndarray]:
    rng = _grng(spec, 6)
    P, K, B = spec.n_proteins, spec.k, spec.n_batches
    base = rng.lognormal(0.0, 1.0, size=P)
    mask = rng.random((K, P)) < 0.3
    loadings = (base * (1.0 + mask * rng.gamma(2.0, 5.0, size=(K, P)))).astype(_F32)
    background = _normalise_rows(rng.lognormal(0.0, 0.5, size=P).astype(_F32))
    return {
        "loadings": loadings,  # (K, P)
        "background": background,  # (P,)
        "background_fraction": np.asarray(0.15, dtype=_F32),
        "batch_scale": np.exp(0.5 * spec.batch_effect * rng.standard_normal((B, P))).astype(_F32),
        "theta": np.clip(5.0 * rng.lognormal(0.0, 0.3, size=P), 0.5, 1e3).astype(_F32),
    }


def _build_atac(spec: SyntheticSpec, model: SyntheticModel) -> dict[str, np.ndarray]:
    rng = _grng(spec, 7)
    Q, K, B = spec.n_peaks, spec.k, spec.n_batches
    base = rng.lognormal(0.0, 1.0, size=Q)
    mask = rng.random((K, Q)) < 0.05
    loadings = (base * (1.0 + mask * rng.gamma(2.0, 5.0, size=(K, Q)))).astype(_F32)
    atac = {
        "loadings": loadings,  # (K, Q)
        "batch_scale": np.exp(0.3 * spec.batch_effect * rng.standard_normal((B, Q))).astype(_F32),
        "depth": np.asarray(1.0, dtype=_F32),
    }
    model.atac = atac
    # Calibrate the depth so the expected fraction of open peaks is spec.atac_density.
    cells = _cell_state(model, _grng(spec, 8), 512)
    rates = _atac_rates(model, cells)

    def dens(scale: float) -> float:
        return float(np.mean(-np.expm1(-scale * rates)))

    atac["depth"] = np.asarray(_bisect_scale(dens, spec.atac_density), dtype=_F32)
    return atac


def _bisect_scale(density_of: Callable[[float], float], target: float) -> float:
    """Scale ``s`` with ``density_of(s) == target`` (``density_of`` increasing in ``s``)."""
    lo, hi = -30.0, 30.0
    for _ in range(36):  # log-scale interval 60 / 2**36: far below sampling noise
        mid = 0.5 * (lo + hi)
        if density_of(float(np.exp(mid))) < target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def _calibrate_library(model: SyntheticModel) -> float:
    spec = model.spec
    if spec.density is None:
        return float(spec.library_size)
    cells = _cell_state(model, _grng(spec, 5), 512)
    rel = _rna_means(model, cells, library=1.0).astype(np.float64)  # mean at unit depth
    theta = model.gene_theta.astype(np.float64)

    def dens(scale: float) -> float:
        return float(np.mean(-np.expm1(-theta * np.log1p(scale * rel / theta))))

    return _bisect_scale(dens, spec.density)


# --------------------------------------------------------------------------------------------
# One block of cells
# --------------------------------------------------------------------------------------------


class _Cells(NamedTuple):
    types: np.ndarray  # (n,) int8
    batches: np.ndarray  # (n,) int8
    weights: np.ndarray  # (n, K) float32, rows sum to 1
    log_library: np.ndarray  # (n,) float32, per-cell log depth factor (mean-one on linear scale)


class Block(NamedTuple):
    X: sp.csr_matrix  # (n, G) float32 counts
    types: np.ndarray  # (n,) int8
    batches: np.ndarray  # (n,) int8
    protein: np.ndarray | None  # (n, P) int32
    atac: sp.csr_matrix | None  # (n, Q) float32 binary


def _categorical_draw(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One category per row of ``probs`` (n, C) by inverse CDF; returns int8 codes."""
    cum = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[0])[:, None] * cum[:, -1:]
    return np.minimum((cum <= u).sum(axis=-1), probs.shape[-1] - 1).astype(np.int8)


def _cell_state(model: SyntheticModel, rng: np.random.Generator, n: int) -> _Cells:
    spec = model.spec
    batches = _categorical_draw(rng, np.broadcast_to(model.batch_probs, (n, spec.n_batches)))
    types = _categorical_draw(rng, model.composition[batches])
    z = rng.standard_normal((n, spec.k), dtype=_F32)
    weights = _normalise_rows(model.type_weights[types] * np.exp(_F32(spec.cell_variation) * z))
    sd = _F32(spec.library_sd)
    log_lib = sd * rng.standard_normal(n, dtype=_F32) - sd * sd / 2
    log_lib += model.batch_log_library[batches]
    return _Cells(types, batches, weights, log_lib)


def _rna_means(model: SyntheticModel, cells: _Cells, library: float) -> np.ndarray:
    """Negative-binomial means, (n, G) float32."""
    mu = cells.weights @ model.programs
    mu *= model.batch_scale[cells.batches]
    _normalise_rows(mu)
    frac = model.shift_fraction[cells.batches][:, None]
    mu *= 1 - frac
    mu += frac * model.ambient[cells.batches]
    mu *= (_F32(library) * np.exp(cells.log_library))[:, None]
    return mu


def _sample_nb_csr(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray) -> sp.csr_matrix:
    """Negative-binomial counts with means ``mu`` (n, G) float32 and inverse dispersion ``theta``.

    ``theta`` is (G,) float32. Exact in distribution: one uniform ``u`` per entry decides zero vs
    non-zero (``u < P(X = 0)``, screened in float32 with a safety margin) and, for means below
    ``_DIRECT_MEAN``, the same ``u`` is carried through the CDF in float64 (inversion); higher
    means are drawn gamma-Poisson. Returns CSR float32 with sorted indices. ``mu`` is consumed.
    """
    n, G = mu.shape
    u = rng.random(mu.shape, dtype=_F32)
    flat_mu, flat_u = mu.ravel().copy(), u.ravel()
    # screen: log(u) >= log P(X=0) = -theta * log1p(mu / theta)  (mu is overwritten in place)
    high = mu >= _F32(_DIRECT_MEAN)
    mu /= theta
    np.log1p(mu, out=mu)
    mu *= -theta
    mu -= _F32(1e-4)  # generous margin; the exact test is redone in float64
    with np.errstate(divide="ignore"):  # log(0) = -inf: a zero, as it should be
        cand = np.log(u) >= mu
    cand &= ~high
    low_idx = np.flatnonzero(cand)
    low_val = _nb_inverse_cdf(flat_u[low_idx], flat_mu[low_idx], theta[low_idx % G])
    high_idx = np.flatnonzero(high)
    th_high = theta[high_idx % G]
    lam = flat_mu[high_idx] * rng.standard_gamma(th_high, dtype=_F32) / th_high
    high_val = rng.poisson(lam)
    return _flat_to_csr(n, G, (low_idx, low_val), (high_idx, high_val))


def _nb_inverse_cdf(u: np.ndarray, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Smallest ``k`` with ``u < F(k)`` for NB(mu, theta), vectorised; int64 (float64 maths).

    Walks the CDF with the pmf recursion ``p(k) = p(k-1) * (k - 1 + theta) / k * q``,
    ``q = mu / (mu + theta)``, on a shrinking set of unresolved entries (the means are small, so
    most entries resolve at k = 0 or 1 and few iterations touch many entries).
    """
    u = u.astype(np.float64)
    theta = theta.astype(np.float64)
    q = mu.astype(np.float64)
    q /= q + theta
    p = np.log1p(-q)
    p *= theta
    np.exp(p, out=p)  # P(X = 0)
    out = (u >= p).astype(np.int64)  # k >= 1 where set
    p *= theta * q  # P(X = 1)
    cdf = p + np.exp(theta * np.log1p(-q))
    sel = (u >= cdf) & (out > 0)
    idx = np.flatnonzero(sel)
    u, p, q, theta, cdf = u[idx], p[idx], q[idx], theta[idx], cdf[idx]
    k = 1
    while idx.size and k < 100_000:
        k += 1
        out[idx] = k
        p *= (theta + (k - 1)) * (q / k)
        cdf += p
        sel = (u >= cdf) & (p > 0)
        if not sel.all():
            idx, u, p, q, theta, cdf = idx[sel], u[sel], p[sel], q[sel], theta[sel], cdf[sel]
    return out


def _flat_to_csr(n: int, m: int, *parts: tuple[np.ndarray, np.ndarray]) -> sp.csr_matrix:
    """CSR (n, m) float32 from (flat index, value) pairs; zero values are dropped."""
    idx = np.concatenate([p[0] for p in parts])
    val = np.concatenate([p[1] for p in parts])
    nz = val > 0
    idx, val = idx[nz], val[nz]
    order = np.argsort(idx, kind="stable")
    idx, val = idx[order], val[order].astype(_F32)
    rows, cols = np.divmod(idx, m)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return _csr(val, cols.astype(np.int32), indptr, (n, m))


def _csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape) -> sp.csr_matrix:
    """CSR without scipy's index-dtype upcasting (int32 indptr when nnz fits)."""
    if indptr[-1] < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    else:
        indices = indices.astype(np.int64)
    mat = sp.csr_matrix((data, indices, indptr), shape=shape, copy=False)
    mat.has_sorted_indices = True
    return mat


def _protein_counts(model: SyntheticModel, cells: _Cells, rng: np.random.Generator) -> np.ndarray:
    prot = model.protein
    n = cells.types.shape[0]
    rel = _normalise_rows((cells.weights @ prot["loadings"]) * prot["batch_scale"][cells.batches])
    frac = prot["background_fraction"]
    rel = (1 - frac) * rel + frac * prot["background"]
    lib = model.spec.protein_library_size * np.exp(
        0.8 * cells.log_library + rng.normal(-0.045, 0.3, size=n).astype(_F32)
    )
    mu = rel * lib[:, None].astype(_F32)
    theta = prot["theta"]
    lam = mu * rng.standard_gamma(np.broadcast_to(theta, mu.shape), dtype=_F32) / theta
    return rng.poisson(lam).astype(np.int32)


def _atac_rates(model: SyntheticModel, cells: _Cells) -> np.ndarray:
    atac = model.atac
    rates = (cells.weights @ atac["loadings"]) * atac["batch_scale"][cells.batches]
    rates /= rates.mean(axis=1, keepdims=True)
    rates *= np.exp(0.5 * cells.log_library)[:, None]
    return rates


def _atac_binary(model: SyntheticModel, cells: _Cells, rng: np.random.Generator) -> sp.csr_matrix:
    rates = _atac_rates(model, cells)
    rates *= -model.atac["depth"]
    p_open = -np.expm1(rates)
    idx = np.flatnonzero(rng.random(p_open.shape, dtype=_F32) < p_open)
    n, Q = p_open.shape
    return _flat_to_csr(n, Q, (idx, np.ones(idx.size, dtype=_F32)))


def generate_block(model: SyntheticModel, block: int) -> Block:
    """Cells ``[block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE)``, always a full block."""
    seed = int(model.spec.seed)
    rng = np.random.default_rng([seed, _CELLS, block])
    cells = _cell_state(model, rng, BLOCK_SIZE)
    mu = _rna_means(model, cells, model.mean_library_size)
    X = _sample_nb_csr(rng, mu, model.gene_theta)
    del mu
    protein = atac = None
    if model.protein is not None:
        protein = _protein_counts(model, cells, np.random.default_rng([seed, _PROTEIN, block]))
    if model.atac is not None:
        atac = _atac_binary(model, cells, np.random.default_rng([seed, _ATAC, block]))
    return Block(X, cells.types, cells.batches, protein, atac)


def _default_jobs(n_jobs: int | None) -> int:
    if n_jobs is None:
        return max(1, min(backend.cpu_threads(), 8))
    return check_positive_int(n_jobs, "n_jobs")


def _iter_blocks(model: SyntheticModel, n_blocks: int, n_jobs: int) -> Iterator[Block]:
    """Blocks ``0 .. n_blocks-1`` in order, at most ``2 * n_jobs`` in flight.

    BLAS runs on one thread while blocks are generated (:func:`backend.serial_blas`, held by
    the consuming thread): the per-block matrix products are small, where a multi-threaded BLAS
    spins more than it computes, and it would compete with the block threads.
    """
    with backend.serial_blas():
        if n_jobs == 1:
            for b in range(n_blocks):
                yield generate_block(model, b)
            return
        yield from _iter_blocks_pooled(model, n_blocks, n_jobs)


def _iter_blocks_pooled(model: SyntheticModel, n_blocks: int, n_jobs: int) -> Iterator[Block]:
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        pending = []
        for b in range(n_blocks):
            pending.append(pool.submit(backend.serial_blas_task(generate_block), model, b))
            if len(pending) >= 2 * n_jobs:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def _stack_csr(mats: list[sp.csr_matrix]) -> sp.csr_matrix:
    """Row-concatenate CSR matrices (faster and leaner than scipy.sparse.vstack)."""
    if len(mats) == 1:
        return mats[0]
    offsets = np.cumsum([0] + [m.nnz for m in mats])[:-1]
    tails = [m.indptr[1:].astype(np.int64) + o for m, o in zip(mats, offsets, strict=True)]
    indptr = np.concatenate([np.zeros(1, np.int64), *tails])
    data = np.concatenate([m.data for m in mats])
    indices = np.concatenate([m.indices.astype(np.int32, copy=False) for m in mats])
    shape = (sum(m.shape[0] for m in mats), mats[0].shape[1])
    return _csr(data, indices, indptr, shape)


def slice_block(block: Block, start: int, stop: int) -> Block:
    sl = slice(start, stop)
    return Block(
        block.X[sl], block.types[sl], block.batches[sl],
        None if block.protein is None else block.protein[sl],
        None if block.atac is None else block.atac[sl],
    )


def stack_blocks(blocks: list[Block]) -> Block:
    return Block(
        _stack_csr([b.X for b in blocks]),
        np.concatenate([b.types for b in blocks]),
        np.concatenate([b.batches for b in blocks]),
        None if blocks[0].protein is None else np.concatenate([b.protein for b in blocks]),
        None if blocks[0].atac is None else _stack_csr([b.atac for b in blocks]),
    )


def _iter_chunk_blocks(
    model: SyntheticModel, n_cells: int, chunk_size: int, n_jobs: int
) -> Iterator[tuple[int, Block]]:
    """``(start, block)`` with exactly ``chunk_size`` cells each (the last may be shorter)."""
    n_blocks = -(-n_cells // BLOCK_SIZE)
    buf: list[Block] = []
    have = start = 0
    for block in _iter_blocks(model, n_blocks, n_jobs):
        remaining = n_cells - start - have
        if remaining < BLOCK_SIZE:
            block = slice_block(block, 0, remaining)
        buf.append(block)
        have += block.X.shape[0]
        while have >= chunk_size or (have and start + have == n_cells):
            take = min(chunk_size, have)
            merged = stack_blocks(buf)
            yield start, slice_block(merged, 0, take)
            start += take
            have -= take
            buf = [slice_block(merged, take, merged.X.shape[0])] if have else []


# --------------------------------------------------------------------------------------------
# AnnData assembly
# --------------------------------------------------------------------------------------------


def numbered_names(prefix: str, n: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    width = max(4, len(str(max(n - 1, 0))))
    stop = n if stop is None else stop
    return np.array([f"{prefix}{i:0{width}d}" for i in range(start, stop)], dtype=object)


def _labels(model: SyntheticModel) -> tuple[list[str], list[str]]:
    s = model.spec
    return (
        [f"type{i}" for i in range(s.n_cell_types)],
        [f"batch{i}" for i in range(s.n_batches)],
    )


def obs_frame(model: SyntheticModel, block: Block, start: int, n_cells: int) -> pd.DataFrame:
    type_names, batch_names = _labels(model)
    n = block.types.shape[0]
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(block.types, categories=type_names),
            "batch": pd.Categorical.from_codes(block.batches, categories=batch_names),
        },
        index=pd.Index(numbered_names("cell", n_cells, start, start + n)),
    )


def _protein_names(n: int) -> list[str]:
    width = max(2, len(str(n - 1)))
    return [f"prot{i:0{width}d}" for i in range(n)]


def uns_record(model: SyntheticModel, n_cells: int) -> dict[str, Any]:
    spec = model.spec
    info: dict[str, Any] = {
        k: v for k, v in asdict(spec).items() if v is not None and not isinstance(v, bool)
    }
    info.update(
        n_cells=int(n_cells), n_programs=spec.k, protein=bool(spec.protein),
        atac=bool(spec.atac), block_size=BLOCK_SIZE, generator_version=GENERATOR_VERSION,
        mean_library_size=float(model.mean_library_size),
        cell_types=np.array(_labels(model)[0], dtype=object),
        batches=np.array(_labels(model)[1], dtype=object),
    )
    K, G, B = spec.k, spec.n_genes, spec.n_batches
    info.update(
        type_weights=model.type_weights, batch_probs=model.batch_probs,
        composition=model.composition, shift_fraction=model.shift_fraction,
        batch_log_library=model.batch_log_library,
    )
    if (K + 2 * B + 2) * G <= _MAX_TRUTH_VALUES:
        info.update(
            programs=model.programs, gene_baseline=model.baseline, gene_theta=model.gene_theta,
            batch_scale=model.batch_scale, batch_ambient=model.ambient,
        )
    if model.protein is not None:
        info["protein_model"] = dict(model.protein)
    if model.atac is not None and K * spec.n_peaks <= _MAX_TRUTH_VALUES:
        info["atac_model"] = dict(model.atac)
    return info


def _to_anndata(model: SyntheticModel, block: Block, start: int, n_cells: int) -> ad.AnnData:
    obs = obs_frame(model, block, start, n_cells)
    var = pd.DataFrame(index=pd.Index(numbered_names("gene", model.spec.n_genes)))
    adata = ad.AnnData(X=block.X, obs=obs, var=var)
    if block.protein is not None:
        adata.obsm["protein_counts"] = pd.DataFrame(
            block.protein, index=obs.index, columns=_protein_names(model.spec.n_proteins)
        )
    if block.atac is not None:
        adata.obsm["atac"] = block.atac
    adata.uns["synthetic"] = uns_record(model, n_cells)
    return adata


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def synthetic(
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    *,
    n_cell_types: int = 8,
    n_batches: int = 3,
    n_programs: int | None = None,
    batch_effect: float = 0.3,
    batch_shift: float = 0.02,
    density: float | None = 0.1,
    library_size: float | None = None,
    library_sd: float = 0.4,
    theta: float = 5.0,
    cell_variation: float = 0.5,
    protein: bool = False,
    n_proteins: int = 50,
    atac: bool = False,
    n_peaks: int = 5_000,
    atac_density: float = 0.05,
    chunk_size: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    n_jobs: int | None = None,
    **more: Any,
) -> ad.AnnData:
    """An in-memory synthetic atlas (see the module docstring for the model).

    Returns an AnnData of ``n_cells x n_genes``:

    * ``X``: ``scipy.sparse.csr_matrix`` float32 of integer-valued negative-binomial counts,
      about ``density`` non-zero (sorted indices; int32 indices);
    * ``obs["cell_type"]`` (``type0``...), ``obs["batch"]`` (``batch0``...): categoricals;
      ``obs_names`` ``cell0000``..., ``var_names`` ``gene0000``...;
    * ``obsm["protein_counts"]`` (``protein=True``): DataFrame ``n_cells x n_proteins`` int32;
    * ``obsm["atac"]`` (``atac=True``): CSR float32 ``n_cells x n_peaks`` of 0/1;
    * ``uns["synthetic"]``: every generating parameter, the calibrated ``mean_library_size``,
      the achieved ``density``, and the ground truth (``programs`` ``(n_programs, n_genes)``,
      ``type_weights`` ``(n_cell_types, n_programs)``, ``batch_scale`` ``(n_batches, n_genes)``,
      ``batch_ambient``, ``gene_theta``, ``composition`` ...) when it is small.

    ``chunk_size`` only sets how many cells are assembled between progress-bar updates: the
    output is identical for every ``chunk_size`` and ``n_jobs`` (threads; default:
    :func:`scatlas.backend.cpu_threads`, at most 8).
    ``more`` takes the remaining :class:`SyntheticSpec` fields (``program_gene_fraction``,
    ``program_fold``, ``protein_library_size``). Use :func:`write_synthetic_h5ad` beyond a few
    million cells.
    """
    spec = make_spec(n_genes, dict(
        n_cell_types=n_cell_types, n_batches=n_batches, n_programs=n_programs,
        batch_effect=batch_effect, batch_shift=batch_shift, density=density,
        library_size=library_size, library_sd=library_sd, theta=theta,
        cell_variation=cell_variation, protein=protein, n_proteins=n_proteins, atac=atac,
        n_peaks=n_peaks, atac_density=atac_density, seed=seed, **more,
    ))
    n_cells = check_positive_int(n_cells, "n_cells")
    chunk = 100_000 if chunk_size is None else check_positive_int(chunk_size, "chunk_size")
    model = build_model(spec)
    blocks = []
    with bar(desc="synthetic", total=n_cells, progress=progress, unit="cells") as pbar:
        for _, block in _iter_chunk_blocks(model, n_cells, chunk, _default_jobs(n_jobs)):
            blocks.append(block)
            pbar.update(block.X.shape[0])
    adata = _to_anndata(model, stack_blocks(blocks), 0, n_cells)
    adata.uns["synthetic"]["achieved_density"] = adata.X.nnz / (n_cells * n_genes)
    return adata


def iter_synthetic(
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    *,
    chunk_size: int = 100_000,
    progress: bool | None = None,
    n_jobs: int | None = None,
    **params: Any,
) -> Iterator[ad.AnnData]:
    """Yield the cells of ``synthetic(n_cells, n_genes, **params)`` as AnnData chunks.

    Each chunk has ``chunk_size`` cells (the last may have fewer), the global ``obs_names``,
    the full category lists, the same ``var``, ``obsm`` and ``uns["synthetic"]`` (without
    ``achieved_density``). Concatenating the chunks' rows gives exactly ``synthetic(...)``.
    Only one chunk (plus a few internal blocks) is held in memory at a time.
    """
    spec = make_spec(n_genes, params)  # validate now, not at the first next()
    n_cells = check_positive_int(n_cells, "n_cells")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    return _iter_anndata(build_model(spec), n_cells, chunk_size, progress, _default_jobs(n_jobs))


def _iter_anndata(
    model: SyntheticModel, n_cells: int, chunk_size: int, progress: bool | None, n_jobs: int
) -> Iterator[ad.AnnData]:
    with bar(desc="synthetic", total=n_cells, progress=progress, unit="cells") as pbar:
        for start, block in _iter_chunk_blocks(model, n_cells, chunk_size, n_jobs):
            pbar.update(block.X.shape[0])
            yield _to_anndata(model, block, start, n_cells)


def write_synthetic_h5ad(
    path: str | os.PathLike,
    n_cells: int = 1_000_000,
    n_genes: int = 2_000,
    *,
    chunk_size: int = 50_000,
    compression: str | None = None,
    progress: bool | None = None,
    n_jobs: int | None = None,
    **params: Any,
) -> Path:
    """Stream ``synthetic(n_cells, n_genes, **params)`` into an ``.h5ad`` file; return its path.

    Memory stays bounded by one chunk of ``chunk_size`` cells whatever ``n_cells``: ``X`` (and
    ``obsm["atac"]``) are written as CSR groups (float32 data, int32 indices, int64 indptr) and
    ``obs`` / ``obsm["protein_counts"]`` as resizable datasets, all in anndata's on-disk
    encoding, so ``anndata.read_h5ad(path, backed="r")`` and :func:`scatlas.io.iter_chunks`
    can read it row block by row block. ``compression`` (e.g. ``"gzip"``, ``"lzf"``) applies
    to the matrices; none by default (fastest). The file appears atomically (temporary file in
    the same folder, then ``os.replace``); on error no partial file is left.
    """
    from .io import atomic_write  # (io imports nothing from here)

    spec = make_spec(n_genes, params)
    n_cells = check_positive_int(n_cells, "n_cells")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    model = build_model(spec)
    path = Path(path)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        writer = _H5adWriter(f, model, n_cells, compression)
        with bar(desc="synthetic h5ad", total=n_cells, progress=progress, unit="cells") as pbar:
            for start, block in _iter_chunk_blocks(
                model, n_cells, chunk_size, _default_jobs(n_jobs)
            ):
                writer.append(start, block)
                pbar.update(block.X.shape[0])
        writer.finish()
    return path


def write_synthetic_zarr(path: str | os.PathLike, n_cells: int = 1_000_000, n_genes: int = 2_000,
                         **kwargs: Any) -> dict[str, Any]:
    """The same atlas written to a zarr store chunk by chunk, generated in parallel on Dask:
    :func:`scatlas.atlas.write_synthetic_zarr` (``kwargs``: its options and the generator's)."""
    from .atlas import write_synthetic_zarr as write

    return write(path, n_cells, n_genes, **kwargs)


# --------------------------------------------------------------------------------------------
# Streaming h5ad writer
# --------------------------------------------------------------------------------------------


class _CsrAppender:
    """A growing CSR group in anndata's encoding (``encoding-type: csr_matrix``)."""

    def __init__(self, group: h5py.Group, n_cols: int, compression: str | None):
        self.group, self.n_cols, self.rows, self.nnz = group, n_cols, 0, 0
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([0, n_cols], dtype=np.int64)
        opts = dict(maxshape=(None,), chunks=(1 << 18,), compression=compression)
        group.create_dataset("data", shape=(0,), dtype=_F32, **opts)
        group.create_dataset("indices", shape=(0,), dtype=np.int32, **opts)
        group.create_dataset("indptr", data=np.zeros(1, np.int64), maxshape=(None,),
                             chunks=(1 << 16,))

    def append(self, X: sp.csr_matrix) -> None:
        g, n, nnz = self.group, X.shape[0], X.nnz
        for name, values in (("data", X.data), ("indices", X.indices)):
            g[name].resize((self.nnz + nnz,))
            g[name][self.nnz :] = values
        g["indptr"].resize((self.rows + n + 1,))
        g["indptr"][self.rows + 1 :] = X.indptr[1:].astype(np.int64) + self.nnz
        self.rows += n
        self.nnz += nnz
        g.attrs["shape"] = np.array([self.rows, self.n_cols], dtype=np.int64)


def _append_rows(ds: h5py.Dataset, values: np.ndarray, start: int) -> None:
    ds.resize((start + values.shape[0], *ds.shape[1:]))
    ds[start:] = values


class _H5adWriter:
    """Writes a synthetic AnnData chunk by chunk; obs/obsm grow by resizing datasets."""

    _GROW = {"maxshape": (None,), "chunks": (1 << 16,)}

    def __init__(self, f: h5py.File, model: SyntheticModel, n_cells: int, compression: str | None):
        from anndata.io import write_elem

        self.f, self.model, self.n_cells, self.started = f, model, n_cells, False
        self.write_elem = write_elem
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        self.X = _CsrAppender(f.create_group("X"), model.spec.n_genes, compression)
        write_elem(f, "obsm", {})
        self.atac = None
        if model.atac is not None:
            self.atac = _CsrAppender(
                f["obsm"].create_group("atac"), model.spec.n_peaks, compression
            )

    def append(self, start: int, block: Block) -> None:
        f = self.f
        self.X.append(block.X)
        if self.atac is not None:
            self.atac.append(block.atac)
        adata = _to_anndata(self.model, block, start, self.n_cells)
        frames = [(f, "obs", adata.obs)]
        if block.protein is not None:
            frames.append((f["obsm"], "protein_counts", adata.obsm["protein_counts"]))
        for parent, key, frame in frames:
            if not self.started:
                self.write_elem(parent, key, frame, dataset_kwargs=self._GROW)
                continue
            group = parent[key]
            _append_rows(group["_index"], frame.index.to_numpy(dtype=object), start)
            for col in frame.columns:
                values = frame[col]
                if isinstance(values.dtype, pd.CategoricalDtype):
                    _append_rows(group[col]["codes"], values.cat.codes.to_numpy(), start)
                else:
                    _append_rows(group[col], values.to_numpy(), start)
        self.started = True

    def finish(self) -> None:
        if self.X.rows != self.n_cells:
            raise RuntimeError(f"wrote {self.X.rows} cells, expected {self.n_cells}")
        spec = self.model.spec
        var = pd.DataFrame(index=pd.Index(numbered_names("gene", spec.n_genes)))
        uns = {"synthetic": uns_record(self.model, self.n_cells)}
        uns["synthetic"]["achieved_density"] = self.X.nnz / (self.n_cells * spec.n_genes)
        for key, elem in (("var", var), ("uns", uns), ("layers", {}), ("obsp", {}),
                          ("varm", {}), ("varp", {})):
            self.write_elem(self.f, key, elem)
