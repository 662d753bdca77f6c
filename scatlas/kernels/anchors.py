"""Seurat anchor-based integration (FindIntegrationAnchors -> IntegrateData) as array kernels.

Follows ../shared/reference/cca_mnn_rsvd.md section 1 (Seurat v3/v4 ``R/integration.R`` and
``src/integration.cpp``; line numbers from satijalab/seurat 17d6f4f):

1. :func:`scale_data` - ``ScaleData`` per dataset: centre and scale every gene (sd with n - 1),
   values above ``scale.max = 10`` clipped (upper side only, ``FastRowScale``).
2. :func:`find_anchors` - ``FindAnchors`` (integration.R:132 defaults): CCA of the two scaled
   matrices (``RunCCA``, :func:`scatlas.kernels.cca`, 30 canonical vectors, never the n1 x n2
   matrix), loadings ``ProjectDim`` = ``[X1; X2]^T [U; V]``, L2-normalised cells (``L2Dim``); genes
   with zero variance in either dataset are left out of the pair's CCA and loadings (``RunCCA``'s
   ``CheckFeatures``); kNN (``FindNN``, integration.R:4411) within each dataset (k + 1, the cell
   itself first) and across (k) with k = max(k.anchor, k.score); mutual pairs within the first
   k.anchor = 5 (``FindAnchorPairs``, integration.R:4301); optional filtering (``TopDimFeatures`` +
   ``FilterAnchors``, integration.R:5857, 3991): the ~200 genes with the top balanced loadings,
   cells L2-normalised in the log-normalised ``data``, an anchor is kept when its dataset-2 cell is
   among the k.filter = 200 nearest of its dataset-1 cell; scoring (``ScoreAnchors``,
   integration.R:5803): shared neighbours of the two anchor cells among ``nnaa[:30] + nnab[:30]``
   and ``nnba[:30] + nnbb[:30]``, rescaled by the 0.01 / 0.90 quantiles (R's type-7 quantiles =
   NumPy's default) and clipped to [0, 1].
3. :func:`integrate_pair` - ``FindIntegrationMatrix`` + ``FindWeights`` (integration.R:4360,
   4538) + ``FindWeightsC`` / ``IntegrateDataC`` (integration.cpp:13, 89): per query cell its
   k.weight = 100 nearest anchor query cells in the weight space, ``D = 1 - d / d_k``, walking
   the neighbour list an anchor cell contributes one entry per anchor it is in, at most k.weight
   entries in all, ``w = 1 - exp(-D score / (2 / sd.weight)^2)`` normalised per cell;
   ``query - W (query[b] - ref[a])``.
4. :func:`seurat_integrate` - the multi-dataset driver (``FindIntegrationAnchors`` over all
   pairs, ``CountAnchors`` / ``BuildSampleTree`` (integration.R:3969, 3935), progressive merges
   with the larger object as reference (``PairwiseIntegrateReference``, integration.R:4875ff)
   and a fresh ``ScaleData`` + ``RunPCA`` (30 PCs) of each merged pair as weight space
   (``RunIntegration``, integration.R:5628); or Seurat v5 ``CCAIntegration`` /
   ``IntegrateEmbeddings`` (integration5.R:206, integration.R:1681) on a supplied embedding,
   which is then both corrected and the weight space.

Deviations from Seurat (documented, deliberate):

- Exact neighbours (:func:`scatlas.kernels.knn`, ties to the smaller index) instead of Annoy
  (50 trees); the within-dataset lists put each cell first, then its k nearest OTHER cells
  (Annoy returns the cell first unless a duplicate ties with it).
- The CCA is the exact singular subspace, not irlba's approximation; signs follow Seurat's
  rule. The weight-space PCA is exact too (not irlba); its signs do not matter. This is the one
  measured source of difference from Seurat 4.3 (``python -m bench.seurat_parity``): on the
  CellBench pair CEL-seq2 / 5-line plate 2, irlba's 30th canonical vector is 2.5e-7 (1 - cos)
  off the exact one (sigma_30 / sigma_31 = 1.01), which moves a few near-tied 30th neighbours,
  so 0.7% of the anchor scores differ by one shared neighbour; given Seurat's own CCA, this
  module's scores equal Seurat's, and given Seurat's anchors and scores, :func:`integrate_pair`
  reproduces Seurat's corrected values to 2e-5 (the precision of the exported CSV).
- ``TopFeatures(balanced=TRUE)`` with one feature per dimension is taken as Seurat < 4's
  unbalanced top-1 (recent SeuratObject versions fail on ``round(1/2) = 0``); R's
  ``round`` (half to even) is NumPy's.
- Degenerate cases where Seurat divides by zero: a zero-variance gene scales to 0 (Seurat's
  NaN), a cell whose k.weight-th anchor neighbour is at distance 0 gets D = 1 for all of them,
  a cell whose weights are all 0 is left uncorrected (with a warning), and when the 0.90 and
  0.01 score quantiles coincide an anchor's score is 1 if it reaches them, else 0.
- Anchor order within a pair is Seurat's (dataset-1 cell, then its dataset-2 neighbours nearest
  first); across pairs the order of ``FindIntegrationAnchors`` (pairs (i, j), i < j, ordered by
  j then i, then the reversed copies), which fixes which anchors a cell keeps when the
  k.weight entries are cut.
- Small batches (Seurat 4.3 stops with "Max dimension too large" when a dataset has no more
  cells than ``dims``, and its Annoy lists come up short below ``k.score``): each pair of
  batches uses what its smaller batch (m cells) allows, ``dims``, ``k_anchor``, ``k_score``
  lowered to m - 1 (``dims`` also below the genes varying in both), the filter skipped when
  m < ``k_filter`` (as Seurat), and ``k_weight`` lowered per merge to the number of distinct
  anchor query cells (Seurat lowers it to the number of anchors, then stops when the cells are
  fewer). One :class:`SmallBatchWarning` names the batches and the values used, which are
  recorded (``Anchors.params``, ``SeuratIntegration.merge_params``). Batches large enough for
  the requested values give exactly the former (Seurat-parity) result.
- The merge tree is R's ``hclust`` complete-linkage algorithm (its nearest-neighbour lists and
  tie-breaking, so equal 1/similarity distances merge in R's order); infinite distances
  (datasets without anchors, where R's ``hclust`` stops with an error) are replaced by a finite
  value larger than all others.

No n1 x n2 matrix is ever formed: the CCA goes through p x p Gram matrices, neighbours are
searched block-wise, weights are a sparse (n_query x n_anchors) matrix with k.weight entries per
row and the correction is two sparse-times-data products.

Sparse input is never made dense cells x genes for the anchors: the gene scaling (per dataset,
or ``scale='joint'`` over all cells) is held implicitly (:func:`scale_data` with
``implicit=True``: a CSR of the input's pattern minus a per-gene shift, exact with the clip),
the CCA's Gram matrices are accumulated over dense row chunks of
:data:`~scatlas.kernels._operator.GRAM_CHUNK_BYTES`, the loadings are sparse products and the
filter densifies only its ~``max_features`` genes. Exceptions: the CCA's explicit route for
small pairs (n1 n2 <= 1e7, (n1 + n2) p <= 1e8: dense float64 rows of both), and the expression
path's corrected data and weight-space scaling, which are dense (n, p) by nature (the v5
embedding path has neither). Dense input is scaled one dataset at a time (no concatenated copy).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .. import backend
from .._validate import ScatlasInputError, check_positive_int, check_same_features
from . import _operator
from ._operator import ColumnShifted
from .cca import cca as _cca
from .linalg import as_compute_matrix
from .neighbors import knn

#: ScaleData's scale.max
SCALE_MAX = 10.0
#: TopDimFeatures' features.per.dim
FEATURES_PER_DIM = 100
#: ScoreAnchors' rescaling quantiles (low, high)
SCORE_QUANTILES = (0.01, 0.90)
# Anchors per chunk when counting shared neighbours (chunk x k x k booleans).
_SCORE_CHUNK = 8192

ScaleMode = Literal["dataset", "joint", "none"]


# ----------------------------------------------------------------------------------------------
# shared helpers (also used by kernels.fastmnn)
# ----------------------------------------------------------------------------------------------
def l2_normalize_rows(X: Any, floor: float = 0.0) -> Any:
    """Each row divided by its L2 norm (dense or CSR; same kind and dtype as X).

    ``floor=0`` is Seurat's ``L2Norm`` (all-zero rows stay zero), ``floor=1e-8`` batchelor's
    ``cosineNorm`` (norms floored at 1e-8).
    """
    xp = backend.array_module(X)
    if backend.issparse(X):
        sq = xp.asarray(X.multiply(X).sum(axis=1)).ravel().astype(np.float64)
    else:
        sq = xp.square(X).sum(axis=1, dtype=np.float64)
    norm = xp.sqrt(sq)
    norm = xp.maximum(norm, floor) if floor > 0 else norm
    inv = xp.where(norm > 0, 1.0 / xp.where(norm > 0, norm, 1.0), 0.0).astype(X.dtype)
    if not backend.issparse(X):
        return X * inv[:, None]
    return backend.sparse_module(X).diags(inv) @ X


def stable_argsort(v: Any) -> Any:
    """Stable argsort of a 1-D array (CuPy >= 12 takes ``kind="stable"``, its only kind)."""
    return backend.array_module(v).argsort(v, kind="stable")


def to_dense(X: Any) -> Any:
    """Dense copy of a sparse matrix (or a ColumnShifted); dense input is returned as is."""
    return X.toarray() if backend.issparse(X) or isinstance(X, ColumnShifted) else X


def _take_columns(X: Any, cols: Any) -> Any:
    """X[:, cols] for an array, a sparse matrix or a ColumnShifted."""
    return X.take_columns(cols) if isinstance(X, ColumnShifted) else X[:, cols]


def _t_matmul(X: Any, Z: Any) -> Any:
    """X^T Z (p, k) without densifying a sparse X or a ColumnShifted."""
    return X.rmatmat(Z) if isinstance(X, ColumnShifted) else X.T @ Z


def split_batches(X: Any, batch: Any, name: str = "X") -> tuple[list[Any], list[Any], Any]:
    """Rows of X grouped by batch label: (per-batch matrices, batch names, row indices).

    Batches are ordered as R's ``factor`` levels (sorted unique values), the rows within a
    batch keep their order; ``indices[b]`` (host int64) are batch b's rows in X.
    """
    labels = np.asarray(backend.to_host(batch.to_numpy() if hasattr(batch, "to_numpy")
                                        else batch))
    n = X.shape[0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ScatlasInputError(
            f"batch must be 1-D with one label per row of {name} ({n}), got shape {labels.shape}"
        )
    missing = (any(v is None or v != v for v in labels) if labels.dtype == object else
               labels.dtype.kind == "f" and bool(np.isnan(labels).any()))
    if missing:
        raise ScatlasInputError("batch contains missing values (None / NaN)")
    names, codes = np.unique(labels.astype(str) if labels.dtype == object else labels,
                             return_inverse=True)
    idx = [np.flatnonzero(codes == b) for b in range(names.size)]
    xp = backend.array_module(X)
    return [X[xp.asarray(i)] for i in idx], list(names), idx


def prepare_datasets(datasets: Sequence[Any], dtype: Any, device: str | None,
                     what: str = "datasets") -> tuple[list[Any], Any]:
    """Validated compute-dtype matrices on one device, and the caller's ``restore``.

    Raises for fewer than two datasets, NaN/inf, different feature counts, mixed devices.
    """
    if not isinstance(datasets, Sequence) or isinstance(datasets, str | bytes):
        raise ScatlasInputError(f"{what} must be a list of (cells x features) matrices")
    if len(datasets) < 2:
        raise ScatlasInputError(
            f"integration needs at least 2 batches/datasets, got {len(datasets)} (a single "
            "batch has nothing to integrate)"
        )
    out, restore = [], None
    for i, X in enumerate(datasets):
        if isinstance(X, ColumnShifted):  # scaled data held implicitly (scale_data)
            Xd, rest = backend.on_device(X.X, device, backend.resolve_dtype(dtype))
            shift = X.shift if Xd is X.X else backend.to_device(
                backend.to_host(X.shift), backend.device_of(Xd))
            restore = rest if restore is None else restore
            out.append(ColumnShifted(as_compute_matrix(Xd, dtype, f"{what}[{i}]"),
                                     shift.astype(backend.resolve_dtype(dtype))))
            continue
        Xd, rest = backend.on_device(X, device, backend.resolve_dtype(dtype))
        restore = rest if restore is None else restore
        out.append(as_compute_matrix(Xd, dtype, f"{what}[{i}]"))
    if len({backend.device_of(getattr(X, "X", X)) for X in out}) != 1:
        raise ScatlasInputError(f"all {what} must live on the same device (or pass device=)")
    check_same_features(out, [f"{what}[{i}]" for i in range(len(out))])
    return out, restore


def check_min_cells(sizes: Sequence[int], minimum: int, reason: str,
                    names: Sequence[Any] | None = None) -> None:
    """Every dataset has at least ``minimum`` cells; else a 'fewer cells than k' error naming the
    datasets (by ``names`` when given, else by position)."""
    label = (lambda i: repr(str(names[i]))) if names is not None else str
    small = [f"{label(i)} ({n} cells)" for i, n in enumerate(sizes) if n < minimum]
    if small:
        which = "batch(es)" if names is not None else "dataset(s) at position"
        raise ScatlasInputError(
            f"fewer cells than k: {reason} needs at least {minimum} cells per dataset/batch, "
            f"but {which} {', '.join(small)} have fewer; lower it or drop those batches"
        )


class SmallBatchWarning(UserWarning):
    """Parameters of an integration were lowered because some batches are too small for them
    (filter with ``warnings.filterwarnings("ignore", category=SmallBatchWarning)``)."""


def _caller_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function that points at the first
    frame outside the scatlas package (the user's call, not an internal line)."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] \
            == "scatlas":
        frame = frame.f_back
        level += 1
    return level


# ----------------------------------------------------------------------------------------------
# ScaleData
# ----------------------------------------------------------------------------------------------
def scale_data(X: Any, *, clip: float | None = SCALE_MAX, dtype: Any = None,
               implicit: bool = False) -> Any:
    """Seurat ``ScaleData`` (``FastRowScale``): each gene centred and divided by its sd (n - 1).

    X is (n_cells, n_genes), dense or sparse, numpy or cupy; returns a dense (n, p) array in the
    compute dtype (float32 by default). Values above ``clip`` (``scale.max = 10``) are set to it
    (Seurat clips the upper side only); ``clip=None`` disables it. Zero-variance genes give 0
    (Seurat: NaN). Needs at least 2 cells.

    ``implicit=True`` with a sparse X returns a :class:`~scatlas.kernels._operator.ColumnShifted`
    instead: the scaled values ``(x - mean) / sd`` held as a CSR of X's pattern minus a (p,)
    shift, so the dense (n, p) array is never formed (:func:`find_anchors`,
    :func:`scatlas.kernels.cca`, :func:`scatlas.kernels.linalg.pca` take it). Exact, clipping
    included, because an unstored zero scales to ``-mean / sd`` and is never clipped when
    ``mean + clip sd >= 0`` (always so for non-negative data); a gene where that fails (negative
    data) falls back to the dense array. Dense X is scaled densely either way.

    Peak device memory: the (n, p) output plus one input-sized temporary for sparse X (densified);
    with ``implicit=True`` and sparse X, one copy of X's stored entries and (p,) vectors.
    """
    X = as_compute_matrix(X, dtype, "X")
    n = X.shape[0]
    if n < 2:
        raise ScatlasInputError("scale_data needs at least 2 cells (sd with n - 1)")
    s1, s2 = _column_moments(X)
    mean, sd, inv = _scale_params(s1, s2, n)
    return _apply_scale(X, mean, sd, inv, clip, implicit)


def _scale_params(s1: Any, s2: Any, n: int) -> tuple[Any, Any, Any]:
    """(mean, sd, 1 / sd or 0 for a constant gene), float64, from column sums / squares."""
    xp = backend.array_module(s1)
    mean = s1 / n
    var = xp.clip(s2 - n * mean**2, 0, None) / (n - 1)
    sd = xp.sqrt(var)
    flat = var <= 1e-12 * xp.maximum(s2 / n, 1e-300)  # constant gene (round-off variance)
    inv = xp.where(flat, 0.0, 1.0 / xp.where(flat, 1.0, sd))
    return mean, sd, inv


def _apply_scale(X: Any, mean: Any, sd: Any, inv: Any, clip: float | None,
                 implicit: bool) -> Any:
    """``min((X - mean) inv, clip)``: dense, or a ColumnShifted for sparse X (``implicit``)."""
    xp = backend.array_module(X)
    if implicit and backend.issparse(X):
        thr = None if clip is None else mean + clip * sd
        if thr is None or bool((thr >= 0).all()):
            Xc = X.tocsr()
            if not Xc.has_canonical_format:
                Xc = Xc.copy() if Xc is X else Xc  # sum_duplicates works in place
                Xc.sum_duplicates()
            cols = Xc.indices
            data = xp.empty(cols.shape[0], dtype=X.dtype)
            block = _operator.ENTRY_BLOCK  # float64 temporaries by block
            for lo in range(0, cols.shape[0], block):
                seg = slice(lo, lo + block)
                v = Xc.data[seg].astype(np.float64)
                if thr is not None:
                    xp.minimum(v, thr[cols[seg]], out=v)
                v *= inv[cols[seg]]
                data[seg] = v
            S = backend.sparse_module(X).csr_matrix((data, cols, Xc.indptr), shape=X.shape)
            return ColumnShifted(S, (mean * inv).astype(X.dtype))
    out = to_dense(X).astype(X.dtype, copy=True)
    out -= mean.astype(X.dtype)[None, :]
    out *= inv.astype(X.dtype)[None, :]
    if clip is not None:
        xp.minimum(out, X.dtype.type(clip), out=out)
    return out


# ----------------------------------------------------------------------------------------------
# anchors
# ----------------------------------------------------------------------------------------------
@dataclass
class Anchors:
    """Anchor pairs between two datasets, as ``FindIntegrationAnchors`` lists them.

    ``cell1`` (m,) int64 rows of dataset 1, ``cell2`` (m,) int64 rows of dataset 2, ``score``
    (m,) float64 in [0, 1]; iterating gives ``(cell1, cell2, score)``. ``n_mnn`` counts the
    mutual pairs before filtering; ``filter_features`` are the gene columns used to filter
    (host int64; None when filtering was skipped). ``params`` holds the values used for this
    pair: ``dims``, ``k_anchor``, ``k_score``, ``k_filter`` (None: not filtered), lower than the
    requested ones where a dataset is too small for them (see :func:`find_anchors`).
    """

    cell1: Any
    cell2: Any
    score: Any
    n_mnn: int = 0
    filter_features: np.ndarray | None = None
    embeddings: tuple[Any, Any] | None = field(default=None, repr=False)
    params: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.cell1, self.cell2, self.score))

    def __len__(self) -> int:
        return int(self.cell1.shape[0])


def top_dim_features(loadings: Any, max_features: int = 200,
                     features_per_dim: int = FEATURES_PER_DIM) -> np.ndarray:
    """Seurat ``TopDimFeatures(balanced=TRUE)`` on a (p, dims) loading matrix -> gene indices.

    For y = 1..features_per_dim, the union over dimensions of the round(y/2) most positive and
    round(y/2) most negative genes (``Top``; ties by position, R's stable ``order``) is counted;
    the smallest y reaching the largest count below ``max(2 dims, max_features)`` (R's
    ``which.max`` over the counts below the limit) is used. Returns sorted host int64 indices.
    """
    L = np.asarray(backend.to_host(loadings), dtype=np.float64)
    p, n_dims = L.shape
    limit = max(2 * n_dims, int(max_features))
    order = np.argsort(-L, axis=0, kind="stable")  # decreasing, ties by position
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(p)[:, None], axis=0)
    best = np.minimum(rank, p - 1 - rank).min(axis=1)  # best balanced rank over dims
    top1 = np.unique(np.argmax(np.abs(L), axis=0))  # y = 1: unbalanced top-1 (Seurat < 4)
    halves = np.round(np.minimum(np.arange(1, features_per_dim + 1), p) / 2).astype(np.int64)
    counts = np.array([top1.size] + [int(np.count_nonzero(best < h)) for h in halves[1:]])
    below = np.flatnonzero(counts < limit)
    if below.size == 0:  # cannot happen for p >= 1 (count(1) <= dims < limit)
        return top1
    y_idx = below[np.argmax(counts[below])]  # first y with the largest count below the limit
    if y_idx == 0:
        return top1
    return np.flatnonzero(best < halves[y_idx]).astype(np.int64)


def _knn_self_first(E: Any, k: int, progress: bool | None) -> Any:
    """(n, k + 1) indices: each cell, then its k nearest other cells (``FindNN`` nnaa/nnbb)."""
    xp = backend.array_module(E)
    _, idx = knn(E, None, k, exclude_self=True, dtype=E.dtype, progress=progress)
    return xp.concatenate([xp.arange(E.shape[0], dtype=idx.dtype)[:, None], idx], axis=1)


def _mutual_in_order(nnab: Any, nnba: Any, k_anchor: int) -> tuple[Any, Any]:
    """``FindAnchorPairs``: (a, b) with b in nnab[a, :k] and a in nnba[b, :k], ordered by a,
    then by b's rank in a's list."""
    xp = backend.array_module(nnab)
    cand = nnab[:, :k_anchor]
    back = nnba[:, :k_anchor][cand]  # (n1, k, k)
    rows = xp.arange(nnab.shape[0])[:, None]
    mutual = (back == rows[:, :, None]).any(axis=2)
    a, r = xp.nonzero(mutual)  # row-major: a ascending, then rank
    return a.astype(np.int64), cand[a, r].astype(np.int64)


def _shared_neighbours(set_a: Any, set_b: Any) -> Any:
    """|set_a[i] & set_b[i]| per row for (m, s) integer arrays without repeats within a row."""
    xp = backend.array_module(set_a)
    m = set_a.shape[0]
    out = xp.empty(m, dtype=np.int64)
    for s in range(0, m, _SCORE_CHUNK):
        e = min(m, s + _SCORE_CHUNK)
        out[s:e] = (set_a[s:e, :, None] == set_b[s:e, None, :]).sum(axis=(1, 2))
    return out


def _score_anchors(a: Any, b: Any, nn: dict[str, Any], k_score: int) -> Any:
    """``ScoreAnchors``: shared neighbours of the anchor cells, quantile-rescaled to [0, 1]."""
    xp = backend.array_module(a)
    if a.shape[0] == 0:
        return xp.zeros(0, dtype=np.float64)
    ks = k_score
    n1 = nn["aa"].shape[0]
    set_a = xp.concatenate([nn["aa"][a, :ks], nn["ab"][a, :ks] + n1], axis=1)
    set_b = xp.concatenate([nn["ba"][b, :ks], nn["bb"][b, :ks] + n1], axis=1)
    raw = _shared_neighbours(set_a, set_b).astype(np.float64)
    lo = float(xp.quantile(raw, SCORE_QUANTILES[0]))
    hi = float(xp.quantile(raw, SCORE_QUANTILES[1]))
    if hi == lo:  # Seurat divides by zero here
        return (raw >= hi).astype(np.float64)
    return xp.clip((raw - lo) / (hi - lo), 0.0, 1.0)


def _filter_anchors(a: Any, b: Any, F1: Any, F2: Any, k_filter: int,
                    progress: bool | None) -> Any:
    """``FilterAnchors``: keep (a, b) when b is among the k_filter nearest F2 rows of F1[a]
    (F1, F2 already restricted to the top features and L2-normalised)."""
    xp = backend.array_module(a)
    if a.shape[0] == 0:
        return xp.zeros(0, dtype=bool)
    cells, inv = xp.unique(a, return_inverse=True)
    _, idx = knn(F1[cells], F2, k_filter, dtype=F1.dtype, progress=progress)
    inv = inv.ravel()
    keep = xp.empty(a.shape[0], dtype=bool)
    for s in range(0, a.shape[0], _SCORE_CHUNK):
        e = min(a.shape[0], s + _SCORE_CHUNK)
        keep[s:e] = (idx[inv[s:e]] == b[s:e, None]).any(axis=1)
    return keep


#: fewest cells a dataset / batch may have (a gene's sd with n - 1, one canonical vector)
MIN_CELLS = 2


def _anchor_params(n1: int, n2: int, dims: Any, k_anchor: Any, k_score: Any,
                   k_filter: Any, max_features: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(requested, effective) anchor parameters of one pair of datasets with n1, n2 cells.

    Where the smaller dataset (m = min(n1, n2) cells) is too small, the values are lowered to
    what it allows instead of stopping: ``dims`` to m - 1 (per-dataset gene scaling centres
    every gene, so a dataset's scaled matrix, and the cross-product, has rank <= m - 1),
    ``k_anchor`` and ``k_score`` to m - 1 (the within-dataset neighbour lists hold the cell and
    its k nearest others), and the filter is skipped when m < ``k_filter`` (Seurat's
    ``FilterAnchors``). Seurat 4.3 stops on the first two ("Max dimension too large"; Annoy's
    neighbour lists come up short). Large enough datasets get the requested values unchanged.
    """
    req = {"dims": check_positive_int(dims, "dims"),
           "k_anchor": check_positive_int(k_anchor, "k_anchor"),
           "k_score": check_positive_int(k_score, "k_score"),
           "k_filter": None if k_filter is None else check_positive_int(k_filter, "k_filter")}
    check_positive_int(max_features, "max_features")
    m = min(n1, n2)
    if m < MIN_CELLS:
        raise ScatlasInputError(
            f"a dataset has {m} cell(s) (datasets of {n1} and {n2} cells): Seurat CCA needs at "
            f"least {MIN_CELLS} cells per dataset/batch"
        )
    eff = {"dims": min(req["dims"], m - 1), "k_anchor": min(req["k_anchor"], m - 1),
           "k_score": min(req["k_score"], m - 1),
           "k_filter": None if req["k_filter"] is None or m < req["k_filter"]
           else req["k_filter"]}
    return req, eff


def _describe_changes(req: dict[str, Any], eff: dict[str, Any]) -> list[str]:
    """'name requested -> used' for each lowered parameter (k_filter: 'skipped')."""
    out = []
    for name in ("dims", "k_anchor", "k_score"):
        if eff[name] != req[name]:
            out.append(f"{name} {req[name]} -> {eff[name]}")
    if req["k_filter"] is not None and eff["k_filter"] is None:
        out.append(f"k_filter={req['k_filter']} skipped (anchors not filtered, as Seurat)")
    return out


def find_anchors(
    X1: Any,
    X2: Any,
    *,
    k_anchor: int = 5,
    k_filter: int | None = 200,
    k_score: int = 30,
    dims: int = 30,
    max_features: int = 200,
    filter_data1: Any = None,
    filter_data2: Any = None,
    l2_norm: bool = True,
    scale: bool = False,
    cca_method: str = "auto",
    seed: int = 42,
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
) -> Anchors:
    """Seurat ``FindIntegrationAnchors`` for one pair of datasets (reduction = "cca").

    Parameters
    ----------
    X1, X2
        (n1, p) and (n2, p) gene-scaled expression of the anchor features (Seurat's
        ``scale.data``; pass log-normalised data with ``scale=True`` to run ``ScaleData`` per
        dataset here). Dense or sparse, numpy or cupy; at least 2 cells each.
    k_anchor, k_score, k_filter, dims, max_features
        Seurat's defaults 5, 30, 200, 30 (``dims = 1:30``), 200. ``k_filter=None`` skips the
        filtering (Seurat's ``k.filter = NA``, the v5 ``CCAIntegration`` default). Small
        datasets: with m = min(n1, n2) cells in the smaller one, ``dims``, ``k_anchor`` and
        ``k_score`` are lowered to m - 1 (``dims`` also below the number of genes varying in
        both), and the filter is skipped when m < ``k_filter`` (as Seurat), with one
        :class:`SmallBatchWarning`; the values used are in ``Anchors.params``. Datasets large
        enough for the requested values get exactly them.
    filter_data1, filter_data2
        (n1, p) / (n2, p) log-normalised expression of the same genes (Seurat's ``data``),
        used by the filter; ``None`` uses X1 / X2.
    l2_norm
        L2-normalise the canonical vectors per cell before the neighbour searches (``L2Dim``).
    scale
        Run :func:`scale_data` on X1 and X2 first.
    cca_method, seed
        Passed to :func:`scatlas.kernels.cca` (``method`` / ``seed``).
    dtype, device, progress
        Compute dtype (float32 default), device override, progress bars.

    Returns
    -------
    Anchors
        ``cell1`` / ``cell2`` (m,) int64 and ``score`` (m,) float64 of the caller's array kind,
        in Seurat's order; ``embeddings`` holds the (L2-normalised) canonical vectors,
        ``params`` the parameter values used.

    Peak device memory (n = n1 + n2, b: the compute dtype's bytes): the inputs; with
    ``scale=True`` their scaled form (sparse: a copy of the stored entries, held implicitly;
    dense: an (n, p) b copy); the CCA's (:func:`scatlas.kernels.cca`: with p genes used,
    about 8 p^2 8 bytes and a 256 MiB chunk on the Gram route); the canonical vectors 2 n dims
    b; the four neighbour lists, n (k + 1) 8 bytes each side with k = max(k_anchor, k_score),
    while :func:`scatlas.kernels.knn` holds its score block (256 MiB on the CPU, a quarter of
    the free device memory on the GPU); the scoring's (m, 2 k_score) int64 neighbour sets
    and (8192, 2 k_score, 2 k_score) booleans per chunk; the filter's dense (n,
    ~max_features) rows and its kNN (n1 k_filter 8 bytes).
    """
    anc, req = _find_anchors(X1, X2, k_anchor=k_anchor, k_filter=k_filter, k_score=k_score,
                             dims=dims, max_features=max_features, filter_data1=filter_data1,
                             filter_data2=filter_data2, l2_norm=l2_norm, scale=scale,
                             cca_method=cca_method, seed=seed, dtype=dtype, device=device,
                             progress=progress)
    changes = _describe_changes(req, anc.params)
    if changes:
        n1, n2 = int(X1.shape[0]), int(X2.shape[0])
        warnings.warn(f"datasets of {n1} and {n2} cells are too small for the requested "
                      f"parameters; lowered: {'; '.join(changes)}", SmallBatchWarning,
                      stacklevel=_caller_stacklevel())
    return anc


def _find_anchors(X1: Any, X2: Any, *, k_anchor: int, k_filter: int | None, k_score: int,
                  dims: int, max_features: int, filter_data1: Any, filter_data2: Any,
                  l2_norm: bool, scale: bool, cca_method: str, seed: int, dtype: Any,
                  device: str | None, progress: bool | None
                  ) -> tuple[Anchors, dict[str, Any]]:
    """:func:`find_anchors` without the warning: (anchors, requested parameters)."""
    (X1d, X2d), restore = prepare_datasets([X1, X2], dtype, device, "X")
    n1, n2, p = X1d.shape[0], X2d.shape[0], X1d.shape[1]
    req, eff = _anchor_params(n1, n2, dims, k_anchor, k_score, k_filter, max_features)
    if scale:
        X1d, X2d = (scale_data(X, dtype=X.dtype, implicit=True) for X in (X1d, X2d))
    X1all, X2all = X1d, X2d  # all features (the filter's fallback data and shape check)
    used = _varying_in_both(X1d, X2d)  # RunCCA's CheckFeatures: drop zero-variance genes
    if used.size < 2:
        raise ScatlasInputError(
            f"only {used.size} of the {p} features vary in both datasets; the CCA needs at "
            "least 2"
        )
    # each cell is centred across the genes (Standardize), so the rank is <= (genes used) - 1
    eff["dims"] = min(eff["dims"], int(used.size) - 1)
    if used.size < p:
        cols = backend.to_device(used, backend.device_of(X1d))
        X1d, X2d = _take_columns(X1d, cols), _take_columns(X2d, cols)
    dims, k_anchor, k_score, k_filter = (eff[k] for k in ("dims", "k_anchor", "k_score",
                                                          "k_filter"))
    try:
        Z1, Z2 = _cca(X1d, X2d, dims, l2_norm=False, method=cca_method, seed=seed,
                      dtype=X1d.dtype, progress=progress)
    except ScatlasInputError as err:  # name the caller's parameter (the kernel's is k)
        raise ScatlasInputError(f"the CCA with dims={dims} failed: {err}; lower dims or look "
                                "for duplicated or empty cells in these datasets") from err
    E1, E2 = (l2_normalize_rows(Z1), l2_normalize_rows(Z2)) if l2_norm else (Z1, Z2)
    k = max(k_anchor, k_score)
    opts = dict(dtype=E1.dtype, progress=progress)
    nn = {"aa": _knn_self_first(E1, k, progress), "bb": _knn_self_first(E2, k, progress),
          "ab": knn(E1, E2, k, **opts)[1], "ba": knn(E2, E1, k, **opts)[1]}
    a, b = _mutual_in_order(nn["ab"], nn["ba"], k_anchor)
    n_mnn = int(a.shape[0])
    features = None
    if k_filter is not None:
        loadings = _t_matmul(X1d, Z1) + _t_matmul(X2d, Z2)  # ProjectDim on scale.data
        features = used[top_dim_features(loadings, max_features)]
        F1, F2 = _filter_inputs(filter_data1, filter_data2, X1all, X2all, features, device)
        keep = _filter_anchors(a, b, F1, F2, k_filter, progress)
        a, b = a[keep], b[keep]
    score = _score_anchors(a, b, nn, k_score)
    anc = Anchors(cell1=restore(a), cell2=restore(b), score=restore(score), n_mnn=n_mnn,
                  filter_features=features, embeddings=(restore(E1), restore(E2)), params=eff)
    return anc, req


def _column_moments(X: Any) -> tuple[Any, Any]:
    """Per-column sums of the values and of their squares, float64 on X's device (dense or
    sparse)."""
    xp = backend.array_module(X)
    if backend.issparse(X):
        s1 = xp.asarray(X.sum(axis=0)).ravel().astype(np.float64)
        s2 = xp.asarray(X.multiply(X).sum(axis=0)).ravel().astype(np.float64)
        return s1, s2
    return X.sum(axis=0, dtype=np.float64), xp.square(X).sum(axis=0, dtype=np.float64)


def _column_variance(X: Any) -> Any:
    """Per-column variance (host float64, ddof=0) of a dense or sparse matrix; columns that are
    constant up to round-off give exactly 0."""
    n = X.shape[0]
    if isinstance(X, ColumnShifted):  # S = X - b: S's variance is X's; its mean square is not
        s1, s2, b = X.column_moments()
        xp = X.xp
        mean = s1 / n
        var = xp.clip(s2 / n - mean**2, 0, None)
        mean_sq = xp.maximum(s2 / n, var + (mean - b) ** 2)
    else:
        xp = backend.array_module(X)
        s1, s2 = _column_moments(X)
        mean = s1 / n
        var = xp.clip(s2 / n - mean**2, 0, None)
        mean_sq = s2 / n
    var = xp.where(var <= 1e-12 * xp.maximum(mean_sq, 1e-300), 0.0, var)
    return np.asarray(backend.to_host(var))


def _varying_in_both(X1: Any, X2: Any) -> np.ndarray:
    """Host int64 indices of the columns with non-zero variance in both X1 and X2 (Seurat's
    ``CheckFeatures`` in ``RunCCA``: a gene constant in one dataset is left out of that pair's
    CCA and loadings)."""
    return np.flatnonzero((_column_variance(X1) > 0) & (_column_variance(X2) > 0))


def _filter_inputs(F1: Any, F2: Any, X1: Any, X2: Any, features: np.ndarray,
                   device: str | None) -> tuple[Any, Any]:
    """The filter's matrices: log-normalised data (or X) on the top features, L2-normalised."""
    if (F1 is None) != (F2 is None):
        raise ScatlasInputError("give both filter_data1 and filter_data2, or neither")
    if F1 is None:
        F1, F2 = X1, X2
    else:
        (F1, F2), _ = prepare_datasets([F1, F2], X1.dtype, device, "filter_data")
        for F, X, name in ((F1, X1, "filter_data1"), (F2, X2, "filter_data2")):
            if F.shape != X.shape:
                raise ScatlasInputError(f"{name} has shape {F.shape}; expected {X.shape}")
    cols = backend.to_device(features, backend.device_of(F1))
    return (l2_normalize_rows(to_dense(_take_columns(F, cols))) for F in (F1, F2))
