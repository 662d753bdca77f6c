"""Seurat's IntegrateData as array kernels: the correction of one pair (:func:`integrate_pair`,
``FindIntegrationMatrix`` + ``FindWeights`` + ``IntegrateDataC``) and the multi-dataset driver
(:func:`seurat_integrate`: anchors over all pairs, ``CountAnchors`` / ``BuildSampleTree``,
progressive merges), on the anchors of :mod:`scatlas.kernels.anchors`.

Split from :mod:`scatlas.kernels.anchors` (issue 18: modules of about 600 lines); the algorithm,
its sources (``../shared/reference/cca_mnn_rsvd.md`` section 1, Seurat v3/v4
``R/integration.R``) and its documented deviations from Seurat are described there.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _progress, backend
from .._validate import ScatlasInputError, check_positive_int
from ._operator import ShiftedOperator
from .anchors import (
    MIN_CELLS,
    SCALE_MAX,
    Anchors,
    ScaleMode,
    SmallBatchWarning,
    _apply_scale,
    _caller_stacklevel,
    _column_moments,
    _find_anchors,
    _scale_params,
    prepare_datasets,
    scale_data,
    split_batches,
    stable_argsort,
    to_dense,
)
from .linalg import as_compute_matrix
from .linalg import pca as _pca
from .neighbors import knn


# ----------------------------------------------------------------------------------------------
# integration of one pair
# ----------------------------------------------------------------------------------------------
def _anchor_arrays(anchors: Any, n_ref: int, n_query: int, xp: Any) -> tuple[Any, Any, Any]:
    try:
        a, b, s = anchors
    except (TypeError, ValueError) as err:
        raise ScatlasInputError("anchors must be an Anchors or a (cell1, cell2, score) "
                                "triple") from err
    a = xp.asarray(backend.to_host(a) if xp is np else a).astype(np.int64).ravel()
    b = xp.asarray(backend.to_host(b) if xp is np else b).astype(np.int64).ravel()
    s = xp.asarray(backend.to_host(s) if xp is np else s).astype(np.float64).ravel()
    if not a.shape == b.shape == s.shape:
        raise ScatlasInputError(
            f"anchor arrays differ in length: {a.shape[0]}, {b.shape[0]}, {s.shape[0]}"
        )
    if a.shape[0] == 0:
        raise ScatlasInputError("no anchors: nothing to integrate (are the datasets related?)")
    for v, n, name in ((a, n_ref, "cell1"), (b, n_query, "cell2")):
        if int(v.min()) < 0 or int(v.max()) >= n:
            raise ScatlasInputError(f"anchors.{name} has indices outside [0, {n})")
    if not bool(xp.all(xp.isfinite(s))):
        raise ScatlasInputError("anchor scores contain NaN or infinite values")
    return a, b, s


def _first_appearance(v: Any) -> tuple[Any, Any]:
    """Unique values of v in order of first appearance, and each element's position in it."""
    xp = backend.array_module(v)
    uniq, first, inv = xp.unique(v, return_index=True, return_inverse=True)
    order = xp.argsort(first)
    rank = xp.empty_like(order)
    rank[order] = xp.arange(order.shape[0])
    return uniq[order], rank[inv.ravel()]


def anchor_weights(dist: Any, nbr: Any, anchor_pos: Any, score: Any, sd_weight: float) -> Any:
    """``FindWeightsC``: the (n_query, n_anchors) CSR weight matrix, k entries per row.

    ``dist`` / ``nbr`` (n, k): each query cell's k nearest anchor query cells (positions among
    the unique anchor cells) and distances, nearest first; ``anchor_pos`` (m,): each anchor's
    query-cell position; ``score`` (m,). Walking a cell's neighbours nearest first, a neighbour
    contributes one entry per anchor it belongs to (in anchor order) until k entries are taken;
    ``D = 1 - d / d_k``, ``w = 1 - exp(-D score / (2 / sd)^2)``, normalised per cell.
    """
    xp = backend.array_module(dist)
    n, k = nbr.shape
    n_cells = int(anchor_pos.max()) + 1
    rows_sorted = stable_argsort(anchor_pos)  # anchors grouped by query cell, in anchor order
    counts = xp.bincount(anchor_pos, minlength=n_cells)
    ptr = xp.concatenate([xp.zeros(1, dtype=counts.dtype), xp.cumsum(counts)])
    cnt = counts[nbr]
    start = xp.cumsum(cnt, axis=1) - cnt  # first entry slot of each neighbour
    mark = xp.zeros((n, k), dtype=np.int32)
    r_idx, s_idx = xp.nonzero(start < k)
    mark[r_idx, start[r_idx, s_idx]] = 1
    slot = xp.cumsum(mark, axis=1) - 1  # the neighbour that fills entry t
    rows = xp.arange(n)[:, None]
    j = xp.arange(k)[None, :] - start[rows, slot]
    anchor = rows_sorted[ptr[nbr[rows, slot]] + j]  # (n, k) anchor rows
    d = dist.astype(np.float64)
    dk = d[:, -1:]
    D = xp.where(dk > 0, 1.0 - d / xp.where(dk > 0, dk, 1.0), 1.0)[rows, slot]
    w = 1.0 - xp.exp(-D * score[anchor] / (2.0 / sd_weight) ** 2)
    total = w.sum(axis=1, keepdims=True)
    dead = int(xp.count_nonzero(total <= 0))
    if dead:
        warnings.warn(f"{dead} query cell(s) have all anchor weights 0 (scores 0); they are "
                      "left uncorrected", UserWarning, stacklevel=_caller_stacklevel())
    w = xp.where(total > 0, w / xp.where(total > 0, total, 1.0), 0.0)
    indptr = xp.arange(0, n * k + 1, k, dtype=np.int64)
    spm = backend.sparse_module(dist)
    return spm.csr_matrix((w.ravel(), anchor.ravel(), indptr), shape=(n, score.shape[0]))


def _relabel_columns(W: Any, cols: Any, n_cols: int) -> Any:
    """W @ P with P the (m, n_cols) selection matrix of ``cols`` (duplicates summed)."""
    spm = backend.sparse_module(W)
    out = spm.csr_matrix((W.data.copy(), cols[W.indices], W.indptr.copy()),
                         shape=(W.shape[0], n_cols))
    out.sum_duplicates()  # in place: W's buffers must not be shared
    return out


def _product(W: Any, X: Any) -> Any:
    """W (sparse, k entries per row) @ X (dense) -> dense; on the CPU split over row blocks on
    a thread pool (:class:`~scatlas.kernels._operator.ShiftedOperator`)."""
    with ShiftedOperator(W) as op:
        return op.matmat(X)


def integrate_pair(
    ref_data: Any,
    query_data: Any,
    anchors: Any,
    weight_space_query: Any,
    *,
    k_weight: int = 100,
    sd_weight: float = 1.0,
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
    return_weights: bool = False,
) -> Any:
    """Seurat ``IntegrateData`` for one reference / query pair: the corrected query.

    Parameters
    ----------
    ref_data, query_data
        (n1, g) and (n2, g): what is corrected (log-normalised expression of the features to
        integrate, or an embedding on the v5 path). Dense or sparse, numpy or cupy.
    anchors
        :class:`Anchors` or a ``(cell1, cell2, score)`` triple: ``cell1`` rows of ref_data,
        ``cell2`` rows of query_data (for a pair found as (query, reference) pass the arrays
        swapped).
    weight_space_query
        (n2, d) query coordinates for the anchor weights (Seurat: the first 30 PCs of the
        scaled merged pair, or the embedding itself).
    k_weight, sd_weight
        Seurat's 100 and 1. With fewer than k_weight anchors it is lowered to their number
        (as ``RunIntegration``), and with fewer distinct anchor query cells to their number
        (``FindWeights`` stops there), with one :class:`SmallBatchWarning`.
    return_weights
        Also return the (n2, m) CSR weight matrix (float64).

    Returns
    -------
    corrected : (n2, g) dense, compute dtype, caller's array kind (and the weights).

    Peak device memory (b: the compute dtype's bytes): dense copies of sparse ``ref_data``
    and ``query_data`` ((n1 + n2) g b), the weight-space kNN of every query cell
    (:func:`scatlas.kernels.knn`: its score block and n2 k_weight (b + 8) bytes), the
    weights' construction (about eight (n2, k_weight) int64 / float64 arrays) and the CSR
    weights, two (n2, g) b products and the (n2, g) b output.
    """
    corrected, W, k_used, n_cells = _integrate_pair(
        ref_data, query_data, anchors, weight_space_query, k_weight=k_weight,
        sd_weight=sd_weight, dtype=dtype, device=device, progress=progress)
    if k_used < k_weight:
        warnings.warn(f"the anchors ({_count(anchors)}) or their distinct query cells "
                      f"({n_cells}) are fewer than k_weight={k_weight}; k_weight lowered to "
                      f"{k_used} for this pair (as Seurat's RunIntegration)", SmallBatchWarning,
                      stacklevel=_caller_stacklevel())
    return (corrected, W) if return_weights else corrected


def _count(anchors: Any) -> int:
    return len(anchors) if isinstance(anchors, Anchors) else int(np.size(anchors[0]))


def _integrate_pair(ref_data: Any, query_data: Any, anchors: Any, weight_space_query: Any, *,
                    k_weight: int, sd_weight: float, dtype: Any, device: str | None,
                    progress: bool | None) -> tuple[Any, Any, int, int]:
    """:func:`integrate_pair` without the warning: (corrected, weights, k_weight used, number
    of distinct anchor query cells)."""
    (R, Q), restore = prepare_datasets([ref_data, query_data], dtype, device, "data")
    (Wq,), _ = _prepare_one(weight_space_query, Q.dtype, device, "weight_space_query")
    if Wq.shape[0] != Q.shape[0]:
        raise ScatlasInputError(
            f"weight_space_query has {Wq.shape[0]} rows but query_data has {Q.shape[0]}"
        )
    xp = backend.array_module(Q)
    a, b, s = _anchor_arrays(anchors, R.shape[0], Q.shape[0], xp)
    k_weight = check_positive_int(k_weight, "k_weight")
    if not (np.isfinite(sd_weight) and sd_weight > 0):
        raise ScatlasInputError(f"sd_weight must be a positive number, got {sd_weight}")
    cells, pos = _first_appearance(b)
    # RunIntegration lowers k.weight to the number of anchors; FindWeights needs k.weight
    # distinct anchor query cells (their number is <= that of the anchors)
    k_used = min(k_weight, int(cells.shape[0]))
    Wd = to_dense(Wq)
    dist, nbr = knn(Wd, Wd[cells], k_used, dtype=Wd.dtype, progress=progress)
    W = anchor_weights(dist, nbr, pos, s, sd_weight)
    Wc = W.astype(Q.dtype)
    Qd = to_dense(Q)  # sparse x dense products: cheaper than sparse x sparse here
    corr = _product(_relabel_columns(Wc, b, Q.shape[0]), Qd)
    corr -= _product(_relabel_columns(Wc, a, R.shape[0]), to_dense(R))
    corrected = Qd - corr
    return restore(corrected), restore(W), k_used, int(cells.shape[0])


def _prepare_one(X: Any, dtype: Any, device: str | None, name: str) -> tuple[list[Any], Any]:
    Xd, restore = backend.on_device(X, device, backend.resolve_dtype(dtype))
    return [as_compute_matrix(Xd, dtype, name)], restore


# ----------------------------------------------------------------------------------------------
# several datasets
# ----------------------------------------------------------------------------------------------
@dataclass
class SeuratIntegration:
    """Output of :func:`seurat_integrate`.

    corrected (n, g): integrated values, rows in input order (the concatenated datasets, or the
    rows of the single input matrix); anchors: {(i, j): Anchors} for every pair i < j (the
    values used per pair in ``Anchors.params``); similarity (B, B): ``CountAnchors``; merges:
    per merge step, (reference datasets, query datasets); batches: dataset names; params: the
    requested parameters; merge_params: per merge step the values used, ``k_weight`` and
    ``weight_pcs`` (PCs of the weight space; on the embedding path its width); adapted: the
    :class:`SmallBatchWarning` text when parameters were lowered for small batches, else "".
    """

    corrected: Any
    anchors: dict[tuple[int, int], Anchors]
    similarity: np.ndarray
    merges: list[tuple[list[int], list[int]]]
    batches: list[Any]
    params: dict[str, Any] = field(default_factory=dict)
    merge_params: list[dict[str, int]] = field(default_factory=list)
    adapted: str = ""


def count_anchors(anchors: dict[tuple[int, int], Anchors], sizes: Sequence[int]) -> np.ndarray:
    """``CountAnchors``: rows of the (doubled) anchor list between i and j / min(n_i, n_j)."""
    B = len(sizes)
    sim = np.zeros((B, B))
    for (i, j), anc in anchors.items():
        sim[i, j] = sim[j, i] = 2 * len(anc) / min(sizes[i], sizes[j])
    return sim


def _hclust_complete(dist: np.ndarray) -> list[tuple[int, int]]:
    """R's ``hclust(method = "complete")`` merge pairs (Murtagh's ``hclust.f`` as in R).

    ``dist`` (B, B) symmetric, finite. Returns per step the two merged cluster representatives
    (0-based; a cluster is represented by its smallest original index, as in ``hclust.f``):
    nearest-neighbour lists with strict ``<`` comparisons, so among equal distances the first
    row, then the first column, wins - the tie-breaking that makes Seurat's merge order
    reproducible.
    """
    B = dist.shape[0]
    d = dist.astype(np.float64).copy()
    active = np.ones(B, dtype=bool)
    nn = np.zeros(B, dtype=np.int64)
    disnn = np.full(B, np.inf)

    def nearest(i: int) -> None:
        best, arg = np.inf, i
        for j in range(i + 1, B):
            if active[j] and d[i, j] < best:
                best, arg = d[i, j], j
        nn[i], disnn[i] = arg, best

    for i in range(B - 1):
        nearest(i)
    steps = []
    for _ in range(B - 1):
        best, im, jm = np.inf, -1, -1
        for i in range(B - 1):
            if active[i] and disnn[i] < best:
                best, im, jm = disnn[i], i, int(nn[i])
        i2, j2 = min(im, jm), max(im, jm)
        steps.append((i2, j2))
        active[j2] = False
        best, jj = np.inf, i2
        for k in range(B):
            if active[k] and k != i2:
                d[i2, k] = d[k, i2] = max(d[i2, k], d[j2, k])  # complete linkage
                if i2 < k and d[i2, k] < best:
                    best, jj = d[i2, k], k
        nn[i2], disnn[i2] = jj, best
        for i in range(B - 1):
            if active[i] and nn[i] in (i2, j2):
                nearest(i)
    return steps


def sample_tree(similarity: np.ndarray) -> list[tuple[int, int]]:
    """``BuildSampleTree``: ``hclust(as.dist(1 / similarity))$merge`` (complete linkage).

    Rows in R's convention: -(i + 1) for dataset i, +s for the node made at step s (1-based);
    within a row singletons first (smaller dataset first), then nodes (earlier first). Ties are
    broken as R's ``hclust`` breaks them (:func:`_hclust_complete`).
    """
    B = similarity.shape[0]
    with np.errstate(divide="ignore"):
        dist = 1.0 / similarity
    np.fill_diagonal(dist, 0.0)
    finite = dist[np.isfinite(dist) & (dist > 0)]
    big = 2.0 * finite.max() + 1.0 if finite.size else 1.0
    dist[~np.isfinite(dist)] = big
    owner = {i: -(i + 1) for i in range(B)}  # representative -> current R id
    rows = []
    for step, (i2, j2) in enumerate(_hclust_complete(dist), start=1):
        ids = [owner[i2], owner[j2]]
        ids.sort(key=lambda v: (v > 0, abs(v)))
        rows.append((ids[0], ids[1]))
        owner[i2] = step
        del owner[j2]
    return rows


@dataclass
class _Node:
    datasets: list[int]
    data: Any
    starts: dict[int, int]

    @property
    def n(self) -> int:
        return self.data.shape[0]


def _merge_anchors(anchors: dict[tuple[int, int], Anchors], ref: _Node, query: _Node,
                   xp: Any, names: Sequence[Any], k_anchor: Any) -> tuple[Any, Any, Any]:
    """Anchors from reference-node to query-node datasets, as node row indices, in the order
    of ``FindIntegrationAnchors`` (pairs by (j, i), then the reversed copies)."""
    pairs = sorted(anchors, key=lambda ij: (ij[1], ij[0]))
    parts = []
    for flip in (False, True):
        for i, j in pairs:
            src, dst = (j, i) if flip else (i, j)
            if src in ref.starts and dst in query.starts:
                anc = anchors[(i, j)]
                c_src, c_dst = (anc.cell2, anc.cell1) if flip else (anc.cell1, anc.cell2)
                parts.append((c_src + ref.starts[src], c_dst + query.starts[dst], anc.score))
    if not parts:
        raise ScatlasInputError(
            f"no anchors between batch(es) {[str(names[d]) for d in ref.datasets]} and "
            f"{[str(names[d]) for d in query.datasets]}: no cell pair is mutual nearest "
            f"neighbours within k_anchor={k_anchor}; raise k_anchor or check that these batches "
            "share cell types"
        )
    return tuple(xp.concatenate([p[t] for p in parts]) for t in range(3))


def _weight_space(ref: _Node, query: _Node, n_pcs: int | None, seed: int,
                  progress: bool | None) -> tuple[Any, int]:
    """Query rows of the weight space: ScaleData + RunPCA (n_pcs, uncentred, scores) of the
    merged pair, or (n_pcs=None, the v5 embedding path) the query's current values; and its
    width."""
    if n_pcs is None:
        return query.data, int(query.data.shape[1])
    xp = backend.array_module(query.data)
    if backend.issparse(ref.data) and backend.issparse(query.data):  # scaled implicitly
        merged = backend.sparse_module(ref.data).vstack([ref.data, query.data], format="csr")
    else:
        merged = xp.concatenate([to_dense(ref.data), to_dense(query.data)])
    n_comp = min(n_pcs, max(merged.shape[1] - 1, 1), merged.shape[0] - 1)  # RunPCA's cap
    res = _pca(scale_data(merged, dtype=merged.dtype, implicit=True), n_comp, center=False,
               seed=seed, dtype=merged.dtype, progress=progress)
    return res.scores[ref.n:], n_comp


def _input_datasets(datasets: Any, batch: Any) -> tuple[list[Any], list[Any], list | None]:
    """(per-dataset matrices, names, row indices into the single matrix or None)."""
    if batch is not None:
        if isinstance(datasets, Sequence) and not hasattr(datasets, "shape"):
            raise ScatlasInputError("give either a list of datasets or one matrix with batch=")
        parts, names, idx = split_batches(datasets, batch)
        return parts, names, idx
    if hasattr(datasets, "shape"):
        raise ScatlasInputError("a single matrix needs batch= labels (one per row)")
    return list(datasets), list(range(len(datasets))), None


def _scaled_for_cca(data: list[Any], scale: str) -> list[Any]:
    """Each dataset's CCA input: scaled per dataset, over all cells, or as given. Sparse data
    stay sparse (:func:`scale_data` ``implicit=True``); dense data are scaled one dataset at a
    time (no concatenated copy)."""
    if scale == "dataset":
        return [scale_data(X, dtype=X.dtype, implicit=True) for X in data]
    if scale == "joint":  # v5: one ScaleData over all cells (by.layer = FALSE)
        moments = [_column_moments(X) for X in data]
        n = sum(X.shape[0] for X in data)
        mean, sd, inv = _scale_params(sum(m[0] for m in moments), sum(m[1] for m in moments), n)
        return [_apply_scale(X, mean, sd, inv, SCALE_MAX, implicit=True) for X in data]
    if scale == "none":
        return data
    raise ScatlasInputError(f"scale must be 'dataset', 'joint' or 'none', got {scale!r}")


def _assemble(node: _Node, sizes: list[int], idx: list | None, xp: Any) -> Any:
    """Final rows in input order."""
    blocks = [node.data[node.starts[i]: node.starts[i] + n] for i, n in enumerate(sizes)]
    stacked = xp.concatenate(blocks)
    if idx is None:
        return stacked
    order = np.concatenate(idx)
    out = xp.empty_like(stacked)
    out[xp.asarray(order)] = stacked
    return out


def seurat_integrate(
    datasets: Any,
    batch: Any = None,
    *,
    embeddings: Any = None,
    scale: ScaleMode = "dataset",
    dims: int = 30,
    k_anchor: int = 5,
    k_filter: int | None = 200,
    k_score: int = 30,
    max_features: int = 200,
    k_weight: int = 100,
    sd_weight: float = 1.0,
    n_pcs: int | None = None,
    preserve_order: bool = False,
    l2_norm: bool = True,
    seed: int = 42,
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
) -> SeuratIntegration:
    """Seurat CCA integration of several datasets (``FindIntegrationAnchors`` +
    ``IntegrateData``, or v5 ``CCAIntegration`` with ``embeddings``).

    Parameters
    ----------
    datasets
        A list of (n_i, p) log-normalised expression matrices of the anchor features (same
        genes, same order), or one (n, p) matrix with ``batch`` labels (datasets ordered as the
        sorted labels; output rows in the input order).
    embeddings
        v5 path: a list of (n_i, e) embeddings (or one (n, e) matrix when ``batch`` is given),
        e.g. a joint PCA. They are integrated instead of the expression, and their current
        values are the weight space of every merge (``IntegrateEmbeddings``, dims = NULL).
        Seurat's v5 defaults are ``scale='joint'`` and ``k_filter=None``.
    scale
        How the CCA input is scaled: ``'dataset'`` (v3 ``ScaleData`` per dataset),
        ``'joint'`` (v5: one ``ScaleData`` over all cells) or ``'none'`` (datasets are used
        as given).
    dims, k_anchor, k_filter, k_score, max_features
        :func:`find_anchors` (Seurat defaults 30, 5, 200, 30, 200).
    k_weight, sd_weight
        :func:`integrate_pair` (100, 1).
    n_pcs
        PCs of each merged pair's weight space (expression path); default ``dims``
        (Seurat: ``npcs = max(dims)``).
    preserve_order
        Keep the tree's order instead of making the larger object the reference.

    Notes
    -----
    Small batches:
        Seurat 4.3 stops when a batch has no more cells than ``dims`` (and its neighbour
        searches come up short below ``k_score``); here every pair of batches uses what its
        smaller batch (m cells) allows: ``dims``, ``k_anchor``, ``k_score`` lowered to m - 1,
        the filter skipped when m < ``k_filter`` (as Seurat), and per merge ``k_weight``
        lowered to the number of distinct anchor query cells (Seurat lowers it to the number
        of anchors, then stops if the cells are fewer). One :class:`SmallBatchWarning` names
        the batches and the values used; they are recorded in ``anchors[(i, j)].params`` and
        ``merge_params``. Batches large enough for the requested values get exactly them (the
        same result as before this adaptation). A batch of fewer than 2 cells, a pair whose
        CCA fails (e.g. empty cells) and merges without any anchor still raise
        :class:`~scatlas._validate.ScatlasInputError`, naming the batches.

    Returns
    -------
    SeuratIntegration
        ``corrected`` is (n, p) expression (or (n, e) embedding) of the caller's array kind.

    Peak device memory (n cells in all, b: the compute dtype's bytes): the datasets and their
    CCA input (``'dataset'`` / ``'joint'`` on sparse data: a copy of the stored entries held
    implicitly, never (n, p) dense; on dense data an (n, p) b scaled copy), every pair's
    anchors, and the largest of one pair's :func:`find_anchors` and one merge. A merge on the
    expression path holds the merged pair's dense (n_ref + n_query, p) data, the scaled form
    for its weight-space PCA (implicit when both sides are still sparse) and
    :func:`integrate_pair`'s; the corrected data grow to a dense (n, p) b array (the output).
    On the embedding path (``embeddings``) a merge holds only (n, e)-sized arrays and the
    kNN's blocks.
    """
    parts, names, idx = _input_datasets(datasets, batch)
    data, restore = prepare_datasets(parts, dtype, device)
    sizes = [X.shape[0] for X in data]
    label = _batch_labels(names, idx is not None)
    check_batch_sizes(sizes, label)
    requested = {"dims": check_positive_int(dims, "dims"),
                 "k_anchor": check_positive_int(k_anchor, "k_anchor"),
                 "k_score": check_positive_int(k_score, "k_score"),
                 "k_filter": None if k_filter is None else check_positive_int(k_filter,
                                                                              "k_filter"),
                 "max_features": check_positive_int(max_features, "max_features"),
                 "k_weight": check_positive_int(k_weight, "k_weight"),
                 "sd_weight": sd_weight}
    targets = data
    if embeddings is not None:
        emb_parts = _input_datasets(embeddings, batch)[0]
        targets, _ = prepare_datasets(emb_parts, data[0].dtype, device, "embeddings")
        if [E.shape[0] for E in targets] != sizes:
            raise ScatlasInputError(
                f"embeddings have {[E.shape[0] for E in targets]} cells per dataset, the "
                f"datasets {sizes}"
            )
    n_pcs = None if embeddings is not None else (dims if n_pcs is None else
                                                 check_positive_int(n_pcs, "n_pcs"))
    requested["n_pcs"] = n_pcs
    scaled = _scaled_for_cca(data, scale)
    B = len(data)
    pairs = [(i, j) for j in range(B) for i in range(j)]
    anchors: dict[tuple[int, int], Anchors] = {}
    for i, j in _progress.track(pairs, desc="anchors", total=len(pairs), progress=progress,
                                unit="pair"):
        try:
            anchors[(i, j)], _ = _find_anchors(
                scaled[i], scaled[j], k_anchor=k_anchor, k_filter=k_filter, k_score=k_score,
                dims=dims, max_features=max_features, filter_data1=data[i],
                filter_data2=data[j], l2_norm=l2_norm, scale=False, cca_method="auto",
                seed=seed, dtype=data[0].dtype, device=None, progress=progress)
        except ScatlasInputError as err:
            raise ScatlasInputError(
                f"{label(i)} ({sizes[i]} cells) and {label(j)} ({sizes[j]} cells): {err}"
            ) from err
    sim = count_anchors(anchors, sizes)
    xp = backend.array_module(data[0])
    nodes: dict[int, _Node] = {-(i + 1): _Node([i], targets[i], {i: 0}) for i in range(B)}
    merges, merge_params = [], []
    for step, (l_id, r_id) in enumerate(
            _progress.track(sample_tree(sim), desc="merges", total=B - 1, progress=progress,
                            unit="merge"), start=1):
        ref, query = nodes.pop(l_id), nodes.pop(r_id)
        if not preserve_order and query.n > ref.n:
            ref, query = query, ref
        a, b, s = _merge_anchors(anchors, ref, query, xp, [label(d) for d in range(B)],
                                 k_anchor)
        ws, ws_width = _weight_space(ref, query, n_pcs, seed, progress)
        corrected, _, k_used, _ = _integrate_pair(
            ref.data, query.data, (a, b, s), ws, k_weight=k_weight, sd_weight=sd_weight,
            dtype=data[0].dtype, device=None, progress=progress)
        merged = xp.concatenate([to_dense(ref.data), corrected])
        starts = dict(ref.starts)
        starts.update({d: st + ref.n for d, st in query.starts.items()})
        nodes[step] = _Node(ref.datasets + query.datasets, merged, starts)
        merges.append((list(ref.datasets), list(query.datasets)))
        merge_params.append({"k_weight": k_used, "weight_pcs": ws_width})
    (final,) = nodes.values()
    out = _assemble(final, sizes, idx, xp)
    adapted = _small_batch_message(label, sizes, requested, anchors, merges, merge_params)
    if adapted:
        warnings.warn(adapted, SmallBatchWarning, stacklevel=_caller_stacklevel())
    return SeuratIntegration(corrected=restore(out), anchors=anchors, similarity=sim,
                             merges=merges, batches=names, params=requested,
                             merge_params=merge_params, adapted=adapted)


def check_batch_sizes(sizes: Sequence[int], label: Any) -> None:
    """Every batch has at least :data:`MIN_CELLS` cells, else an error naming them
    (``label(i)``: how the caller knows batch i)."""
    tiny = [f"{label(i)} ({n} cell{'s' if n != 1 else ''})" for i, n in enumerate(sizes)
            if n < MIN_CELLS]
    if tiny:
        raise ScatlasInputError(
            f"{_listing(tiny)} ha{'ve' if len(tiny) > 1 else 's'} fewer than {MIN_CELLS} cells: "
            "Seurat CCA scales every gene within a batch (sd with n - 1), so each batch needs "
            f"at least {MIN_CELLS}; drop such batches or merge them with others"
        )


def _batch_labels(names: Sequence[Any], named: bool) -> Any:
    """Dataset i as the caller knows it: its batch label quoted, or 'dataset i' for a list."""
    if named:
        return lambda i: repr(str(names[i]))
    return lambda i: f"dataset {i}"


def _listing(items: Sequence[str], limit: int = 8) -> str:
    """Comma-separated, the first ``limit`` items and a count of the others."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _small_batch_message(label: Any, sizes: Sequence[int], req: dict[str, Any],
                         anchors: dict[tuple[int, int], Anchors],
                         merges: Sequence[tuple[list[int], list[int]]],
                         merge_params: Sequence[dict[str, int]]) -> str:
    """The one warning text for every parameter lowered on small batches ('' if none)."""
    out = []
    n_pairs = len(anchors)
    per_batch = []
    for b, n in sorted(enumerate(sizes), key=lambda t: t[1]):
        lowered = [f"{k}={n - 1}" for k in ("dims", "k_anchor", "k_score") if n - 1 < req[k]]
        if lowered:
            per_batch.append(f"{label(b)} ({n} cells): {', '.join(lowered)}")
    if per_batch:
        out.append(
            f"{len(per_batch)} batch(es) have too few cells for dims={req['dims']}, "
            f"k_anchor={req['k_anchor']}, k_score={req['k_score']}; each pair of batches uses "
            f"what its smaller batch allows: {_listing(per_batch)} (Seurat 4.3 stops here)"
        )
    by_features = [f"{label(i)} / {label(j)}: dims={a.params['dims']}"
                   for (i, j), a in anchors.items()
                   if a.params["dims"] < min(req["dims"], sizes[i] - 1, sizes[j] - 1)]
    if by_features:
        out.append("dims lowered below the number of genes varying in both batches: "
                   + _listing(by_features))
    if req["k_filter"] is not None:
        skipped = sum(a.params["k_filter"] is None for a in anchors.values())
        if skipped:
            small = [f"{label(b)} ({n})" for b, n in sorted(enumerate(sizes), key=lambda t: t[1])
                     if n < req["k_filter"]]
            out.append(
                f"k_filter={req['k_filter']}: anchors not filtered in {skipped} of {n_pairs} "
                f"pair(s), those with a batch of fewer cells ({_listing(small)}), as Seurat "
                "does"
            )
    kw = [f"{mp['k_weight']} (query {'+'.join(label(d) for d in q)})"
          for (_, q), mp in zip(merges, merge_params, strict=True)
          if mp["k_weight"] < req["k_weight"]]
    if kw:
        out.append(
            f"k_weight={req['k_weight']} lowered to the number of distinct anchor query cells "
            f"in {len(kw)} of {len(merge_params)} merge(s): {_listing(kw)} (Seurat lowers "
            "k.weight to the number of anchors)"
        )
    if req["n_pcs"] is not None:
        wp = [f"{mp['weight_pcs']} (query {'+'.join(label(d) for d in q)})"
              for (_, q), mp in zip(merges, merge_params, strict=True)
              if mp["weight_pcs"] < req["n_pcs"]]
        if wp:
            out.append(f"weight-space PCs n_pcs={req['n_pcs']} lowered to what the merged "
                       f"pair allows (cells - 1) in {len(wp)} merge(s): {_listing(wp)}")
    if not out:
        return ""
    return ("Seurat CCA adapted to small batches: " + "; ".join(out)
            + ". The values used are recorded per pair and merge (tl.integrate: "
            "uns[key]['params']['effective']; kernels: Anchors.params, "
            "SeuratIntegration.merge_params).")
