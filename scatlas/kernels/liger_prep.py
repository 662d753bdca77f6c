"""LIGER's preprocessing for integrative NMF: normalise, select genes, scale without centring.

rliger (``R/preprocess.R``, ``R/selectGenes.R``, ``R/scaleNotCenter.R``, v2.x) prepares each
dataset (cells x genes raw counts ``X_i``) for :func:`scatlas.kernels.nmf.inmf` in three steps:

1. ``normalize()``: each cell divided by its total count (no log, no scale factor):
   :func:`normalize_rows`.
2. ``selectGenes(thresh=0.1, alpha=0.99, combine="union", nGenes=NULL)``: per dataset, on the
   normalised data, a Poisson excess-variance test (:func:`excess_variance`); genes passing in
   any dataset are kept (union), restricted to genes present in every dataset:
   :func:`select_genes`.
3. ``scaleNotCenter()``: per dataset, each selected gene divided by its root mean square over
   cells, ``sqrt(sum_c x^2 / (n - 1))``, without centring (NMF needs non-negative input);
   zero-variance genes become 0: :func:`scale_not_center`.

The per-gene statistics of steps 2 and 3 are sums over cells, so they can be accumulated chunk by
chunk (:class:`GeneMoments`) for data streamed from disk; :func:`liger_transform` then applies
steps 1 and 3 to any chunk of raw counts.

Arrays: NumPy / SciPy sparse on the CPU, CuPy / cupyx sparse on the GPU (the array module comes
from the input, :func:`scatlas.backend.array_module`); sparse stays sparse. Per-gene statistics
are accumulated in float64 and returned as NumPy arrays (they are small).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import norm

from .. import backend
from .._validate import ScatlasInputError, check_matrix, check_positive_int

__all__ = [
    "GeneMoments",
    "excess_variance",
    "gene_rms",
    "liger_preprocess",
    "liger_transform",
    "normalize_rows",
    "row_totals",
    "scale_not_center",
    "select_genes",
]

Combine = Literal["union", "intersection"]


# --------------------------------------------------------------------------------------------
# normalize() and scaleNotCenter()
# --------------------------------------------------------------------------------------------


def row_totals(X: Any) -> Any:
    """Total count of each cell: (cells,) float64 array of the input's array module."""
    xp = backend.array_module(X)
    if backend.issparse(X):
        return xp.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
    return xp.asarray(X).sum(axis=1, dtype=np.float64)


def _scale_rows(X: Any, factors: Any, dt: np.dtype) -> Any:
    """``diag(factors) @ X`` in dtype ``dt``, sparse kept sparse (CSR)."""
    xp = backend.array_module(X)
    factors = xp.asarray(factors, dtype=dt)
    if backend.issparse(X):
        X = X.tocsr() if X.format != "csr" else X
        diag = backend.sparse_module(X).diags(factors)
        return (diag @ X.astype(dt)).tocsr()
    return xp.asarray(X, dtype=dt) * factors[:, None]


def _scale_cols(X: Any, factors: Any, dt: np.dtype) -> Any:
    """``X @ diag(factors)`` in dtype ``dt``, sparse kept sparse (CSR)."""
    xp = backend.array_module(X)
    factors = xp.asarray(factors, dtype=dt)
    if backend.issparse(X):
        X = X.tocsr() if X.format != "csr" else X
        out = X.astype(dt, copy=True)
        out.data *= factors[out.indices]
        out.eliminate_zeros()
        return out
    return xp.asarray(X, dtype=dt) * factors[None, :]


def normalize_rows(X: Any, *, dtype: Any = None) -> Any:
    """rliger ``normalize()``: every cell (row) divided by its total count; no log.

    Parameters
    ----------
    X
        (cells, genes) non-negative counts: NumPy / SciPy sparse / CuPy / cupyx sparse.
    dtype
        float32 (default) or float64 result.

    Returns
    -------
    Matrix of the input's kind (sparse CSR stays sparse), rows summing to 1; a cell without
    counts stays a zero row (rliger removes such cells beforehand).
    """
    check_matrix(X, "X", nonnegative=True)
    dt = backend.resolve_dtype(dtype)
    xp = backend.array_module(X)
    tot = row_totals(X)
    inv = xp.where(tot > 0, 1.0 / xp.where(tot > 0, tot, 1.0), 0.0)
    return _scale_rows(X, inv, dt)


def gene_rms(X: Any) -> Any:
    """Root mean square of each gene (column) over cells, ``sqrt(sum x^2 / (n - 1))``.

    ``X`` (cells, genes); returns (genes,) float64 of the input's array module (rliger's
    ``scaleNotCenterFast`` divisor; ``n - 1`` becomes 1 for a single cell).
    """
    xp = backend.array_module(X)
    if backend.issparse(X):
        sq = xp.asarray(X.multiply(X).sum(axis=0, dtype=np.float64)).ravel()
    else:
        Xd = xp.asarray(X, dtype=np.float64)
        sq = (Xd * Xd).sum(axis=0)
    return xp.sqrt(sq / max(X.shape[0] - 1, 1))


def _inverse(rms: Any) -> Any:
    """``1 / rms`` with 0 where ``rms`` is 0 (rliger sets the NaN / Inf of 0/0 to 0)."""
    xp = backend.array_module(rms)
    return xp.where(rms > 0, 1.0 / xp.where(rms > 0, rms, 1.0), 0.0)


def scale_not_center(X: Any, *, rms: Any = None, dtype: Any = None) -> Any:
    """rliger ``scaleNotCenter()``: each gene divided by its root mean square; no centring.

    Parameters
    ----------
    X
        (cells, genes) normalised expression of one dataset (typically already restricted to the
        selected genes), non-negative.
    rms
        Optional (genes,) divisors, e.g. ``GeneMoments.rms[genes]`` accumulated over a whole
        dataset streamed in chunks; default :func:`gene_rms` of ``X``.
    dtype
        float32 (default) or float64 result.

    Returns
    -------
    Matrix of the input's kind and sparsity; genes with ``rms == 0`` are all zero.
    """
    check_matrix(X, "X", nonnegative=True)
    dt = backend.resolve_dtype(dtype)
    xp = backend.array_module(X)
    rms = gene_rms(X) if rms is None else xp.asarray(rms, dtype=np.float64)
    if rms.shape != (X.shape[1],):
        raise ScatlasInputError(f"rms must have shape ({X.shape[1]},), got {rms.shape}")
    return _scale_cols(X, _inverse(rms), dt)


def liger_transform(X: Any, genes: Any, rms: Any, *, dtype: Any = None) -> Any:
    """Normalise raw counts per cell, keep ``genes`` and scale them: one chunk of LIGER input.

    Parameters
    ----------
    X
        (cells, all_genes) raw counts (any chunk of cells of a dataset).
    genes
        Integer indices of the selected genes (columns of ``X``), host array.
    rms
        (len(genes),) root mean squares of the normalised selected genes over the whole dataset
        (``GeneMoments.rms[genes]``).
    dtype
        float32 (default) or float64.

    Returns
    -------
    (cells, len(genes)) matrix, ``normalize_rows(X)[:, genes] / rms`` (0 where ``rms`` is 0),
    the same as scaling the whole dataset at once. The cell totals use all genes of ``X``.
    """
    check_matrix(X, "X", nonnegative=True)
    dt = backend.resolve_dtype(dtype)
    xp = backend.array_module(X)
    genes = np.asarray(genes, dtype=np.int64)
    rms = xp.asarray(rms, dtype=np.float64)
    if rms.shape != genes.shape:
        raise ScatlasInputError(f"rms must have one value per gene ({genes.size}), got {rms.shape}")
    tot = row_totals(X)  # over all genes, before the selection
    inv = xp.where(tot > 0, 1.0 / xp.where(tot > 0, tot, 1.0), 0.0)
    if backend.issparse(X) and X.format != "csr":
        X = X.tocsr()
    sub = X[:, xp.asarray(genes)]
    return _scale_cols(_scale_rows(sub, inv, np.dtype(np.float64)), _inverse(rms), dt)


# --------------------------------------------------------------------------------------------
# per-gene statistics, accumulated over chunks
# --------------------------------------------------------------------------------------------


@dataclass
class GeneMoments:
    """Per-gene sums over the cells of one dataset, for :func:`select_genes` / scaling.

    Cells without any count are skipped (rliger's ``createLiger(removeMissing=TRUE)`` drops
    them). All fields are host NumPy values (float64 / int64).

    Attributes
    ----------
    n_cells
        Cells with a positive total count seen so far.
    sum, sum_sq
        (genes,) sums of the normalised expression (count / cell total) and of its squares.
    n_expressing
        (genes,) number of cells with a non-zero count of the gene.
    inv_total_sum
        Sum over cells of ``1 / total count`` (``nolan = inv_total_sum / n_cells``).
    """

    n_genes: int
    n_cells: int = 0
    sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_sq: np.ndarray = field(default=None)  # type: ignore[assignment]
    n_expressing: np.ndarray = field(default=None)  # type: ignore[assignment]
    inv_total_sum: float = 0.0

    def __post_init__(self) -> None:
        m = self.n_genes
        if self.sum is None:
            self.sum = np.zeros(m)
        if self.sum_sq is None:
            self.sum_sq = np.zeros(m)
        if self.n_expressing is None:
            self.n_expressing = np.zeros(m, dtype=np.int64)

    @classmethod
    def from_counts(cls, X: Any) -> GeneMoments:
        """Moments of a whole (cells, genes) raw-count matrix."""
        return cls(int(X.shape[1])).update(X)

    def update(self, X: Any) -> GeneMoments:
        """Add a chunk of cells, (cells, genes) raw counts; returns ``self``."""
        check_matrix(X, "counts chunk", nonnegative=True)
        if X.shape[1] != self.n_genes:
            raise ScatlasInputError(
                f"a chunk has {X.shape[1]} genes, these moments {self.n_genes}"
            )
        xp = backend.array_module(X)
        tot = row_totals(X)
        keep = tot > 0
        n = int(keep.sum())
        if n == 0:
            return self
        if n < X.shape[0]:
            X = X[xp.flatnonzero(keep)]
            tot = tot[keep]
        Xn = normalize_rows(X, dtype=np.float64)
        if backend.issparse(Xn):
            s = Xn.sum(axis=0)
            s2 = Xn.multiply(Xn).sum(axis=0)
            B = Xn.copy()
            B.data = (B.data > 0).astype(np.float64)
            nz = B.sum(axis=0)
        else:
            s, s2 = Xn.sum(axis=0), (Xn * Xn).sum(axis=0)
            nz = (xp.asarray(X) > 0).sum(axis=0)
        self.sum += _host_vec(s)
        self.sum_sq += _host_vec(s2)
        self.n_expressing += _host_vec(nz).astype(np.int64)
        self.inv_total_sum += float((1.0 / tot).sum())
        self.n_cells += n
        return self

    def subset(self, genes: Any) -> GeneMoments:
        """The moments of the genes ``genes`` (integer indices or bool mask) only."""
        idx = np.asarray(genes)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)
        return GeneMoments(
            n_genes=int(idx.size), n_cells=self.n_cells, sum=self.sum[idx].copy(),
            sum_sq=self.sum_sq[idx].copy(), n_expressing=self.n_expressing[idx].copy(),
            inv_total_sum=self.inv_total_sum,
        )

    @property
    def mean(self) -> np.ndarray:
        """(genes,) mean normalised expression."""
        return self.sum / max(self.n_cells, 1)

    @property
    def var(self) -> np.ndarray:
        """(genes,) variance of the normalised expression over cells (``n - 1``)."""
        n = self.n_cells
        if n < 2:
            return np.zeros(self.n_genes)
        return np.maximum((self.sum_sq - n * self.mean**2) / (n - 1), 0.0)

    @property
    def rms(self) -> np.ndarray:
        """(genes,) ``sqrt(sum x^2 / (n - 1))``: the :func:`scale_not_center` divisor."""
        return np.sqrt(self.sum_sq / max(self.n_cells - 1, 1))

    @property
    def nolan(self) -> float:
        """rliger's ``nolan_constant``: mean over cells of ``1 / total count``."""
        return self.inv_total_sum / max(self.n_cells, 1)

    @property
    def expressed(self) -> np.ndarray:
        """(genes,) bool: the gene has a count in at least one cell."""
        return self.n_expressing > 0


def _host_vec(a: Any) -> np.ndarray:
    return np.asarray(backend.to_host(a), dtype=np.float64).ravel()


# --------------------------------------------------------------------------------------------
# selectGenes()
# --------------------------------------------------------------------------------------------


def excess_variance(
    moments: GeneMoments, *, alpha: float = 0.99, n_tests: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """rliger's Poisson excess-variance statistics of one dataset.

    With ``mu``, ``var`` the per-gene mean and variance (``n - 1``) of the normalised data,
    ``nolan`` the mean of ``1 / total count`` and ``n`` the cells::

        upper = mu + qnorm(1 - alpha / n_tests / 2) * sqrt(mu * nolan / n)
        base  = log10(mu * nolan)
        score = log10(var) - base        # excess of the variance over the Poisson level

    A gene is variable at threshold ``thresh`` when ``var / nolan > upper`` and
    ``score > thresh``.

    Parameters
    ----------
    moments
        The dataset's :class:`GeneMoments`.
    alpha
        rliger's ``alpha.thresh`` (0.99).
    n_tests
        Bonferroni divisor; default the number of genes expressed in the dataset (rliger divides
        by ``nrow`` of the dataset, whose unexpressed genes ``createLiger(removeMissing=TRUE)``
        has removed).

    Returns
    -------
    score, above_upper
        (genes,) float64 scores (``-inf`` / NaN for unexpressed genes) and the bool mean test.
    """
    if not 0 < alpha < 1:
        raise ScatlasInputError(f"alpha must be in (0, 1), got {alpha!r}")
    n_tests = int(moments.expressed.sum()) if n_tests is None else n_tests
    n_tests = check_positive_int(n_tests, "n_tests")
    mu, var, nolan, n = moments.mean, moments.var, moments.nolan, max(moments.n_cells, 1)
    z = norm.ppf(1.0 - alpha / n_tests / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        upper = mu + z * np.sqrt(mu * nolan / n)
        score = np.log10(var) - np.log10(mu * nolan)
        above = var / nolan > upper if nolan > 0 else np.zeros_like(mu, dtype=bool)
    return score, np.asarray(above, dtype=bool) & moments.expressed


def _as_moments(datasets: Sequence[Any]) -> list[GeneMoments]:
    if isinstance(datasets, GeneMoments) or hasattr(datasets, "shape") or isinstance(datasets, str):
        raise ScatlasInputError("select_genes needs a list of datasets (one entry per dataset)")
    out = [d if isinstance(d, GeneMoments) else GeneMoments.from_counts(d) for d in datasets]
    if not out:
        raise ScatlasInputError("select_genes got an empty list of datasets")
    if len({m.n_genes for m in out}) != 1:
        raise ScatlasInputError(
            f"datasets must share the same genes; got widths {[m.n_genes for m in out]}"
        )
    for i, m in enumerate(out):
        if m.n_cells < 2:
            raise ScatlasInputError(
                f"dataset {i} has {m.n_cells} cell(s) with counts; gene variances need >= 2"
            )
    return out


def select_genes(
    datasets: Sequence[Any],
    *,
    thresh: float | Sequence[float] = 0.1,
    alpha: float = 0.99,
    n_genes: int | None = None,
    combine: Combine = "union",
    shared_only: bool = True,
) -> np.ndarray:
    """rliger ``selectGenes()``: variable genes per dataset, combined across datasets.

    Parameters
    ----------
    datasets
        One entry per dataset: a (cells, genes) raw-count matrix (any array kind; it is
        normalised internally, as rliger runs the test on ``normalize()``'s output) or its
        :class:`GeneMoments` (for data streamed in chunks). Same genes, same order.
    thresh
        ``var.thresh``: minimum ``score`` (:func:`excess_variance`), one value or one per
        dataset (0.1).
    alpha
        ``alpha.thresh`` of the mean test (0.99).
    n_genes
        Optional ``nGenes``: per dataset, only the ``n_genes`` passing genes with the highest
        score are kept before combining.
    combine
        ``"union"`` (default) or ``"intersection"`` of the per-dataset selections.
    shared_only
        Keep only genes expressed in every dataset (default; in rliger, genes absent from a
        dataset are removed from it and ``selectGenes`` returns shared features only).

    Returns
    -------
    np.ndarray
        Sorted int64 indices of the selected genes (columns).

    Raises
    ------
    ScatlasInputError
        When no gene is selected (lower ``thresh``) or the inputs are inconsistent.
    """
    moments = _as_moments(datasets)
    if combine not in ("union", "intersection"):
        raise ScatlasInputError(f"combine must be 'union' or 'intersection', got {combine!r}")
    threshs = list(np.broadcast_to(np.asarray(thresh, dtype=np.float64), (len(moments),)))
    if n_genes is not None:
        n_genes = check_positive_int(n_genes, "n_genes")
    shared = np.logical_and.reduce([m.expressed for m in moments]) if shared_only else None
    picked = []
    for m, th in zip(moments, threshs, strict=True):
        score, above = excess_variance(m, alpha=alpha)
        with np.errstate(invalid="ignore"):
            ok = above & (score > th)
        if n_genes is not None and ok.sum() > n_genes:
            cand = np.flatnonzero(ok)
            top = cand[np.argsort(-score[cand], kind="stable")[:n_genes]]
            ok = np.zeros_like(ok)
            ok[top] = True
        picked.append(ok)
    reduce = np.logical_or if combine == "union" else np.logical_and
    mask = reduce.reduce(picked)
    if shared is not None:
        mask &= shared
    genes = np.flatnonzero(mask).astype(np.int64)
    if genes.size == 0:
        raise ScatlasInputError(
            f"no gene selected (thresh={thresh}, alpha={alpha}, combine={combine!r}); lower "
            "thresh, use combine='union', or give the genes explicitly"
        )
    return genes


# --------------------------------------------------------------------------------------------
# the whole pipeline, in memory
# --------------------------------------------------------------------------------------------


def liger_preprocess(
    Xs: Sequence[Any],
    *,
    genes: Any = None,
    thresh: float | Sequence[float] = 0.1,
    alpha: float = 0.99,
    n_genes: int | None = None,
    combine: Combine = "union",
    dtype: Any = None,
) -> tuple[list[Any], np.ndarray]:
    """rliger's ``normalize() -> selectGenes() -> scaleNotCenter()`` on in-memory datasets.

    Parameters
    ----------
    Xs
        List of (cells_i, genes) raw-count matrices (same genes, any array kind).
    genes
        Optional integer indices (or a bool mask) of the genes to use, skipping selection.
    thresh, alpha, n_genes, combine
        :func:`select_genes` options.
    dtype
        float32 (default) or float64 result.

    Returns
    -------
    scaled, genes
        ``scaled``: list of (cells_i, len(genes)) matrices of the inputs' kind, ready for
        :func:`scatlas.kernels.nmf.inmf` (cells without counts are kept as zero rows: remove
        them first); ``genes``: int64 indices used.
    """
    moments = [GeneMoments.from_counts(X) for X in Xs]
    if genes is None:
        genes = select_genes(moments, thresh=thresh, alpha=alpha, n_genes=n_genes,
                             combine=combine)
    else:
        genes = np.asarray(backend.to_host(genes))
        if genes.dtype == bool:
            genes = np.flatnonzero(genes)
        genes = genes.astype(np.int64)
    scaled = [
        liger_transform(X, genes, m.rms[genes], dtype=dtype)
        for X, m in zip(Xs, moments, strict=True)
    ]
    return scaled, genes
