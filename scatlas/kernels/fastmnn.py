"""batchelor ``fastMNN``: mutual-nearest-neighbour correction in a multi-batch PC space.

Follows ../shared/reference/cca_mnn_rsvd.md section 2.2 (LTLA/batchelor 72f37b8, R/fastMNN.R,
R/multiBatchPCA.R, R/cosineNorm.R, R/utils_tricube.R):

1. ``cosineNorm``: each cell divided by its L2 norm over the genes, floored at 1e-8.
2. ``multiBatchPCA`` (``.process_listed_matrices_for_pca``): the grand centre is the mean of the
   per-batch gene means (every batch weighs 1, not the pooled mean); the SVD is of the centred
   data with batch b's cells scaled by 1 / sqrt(n_b), so that each batch contributes equally;
   the top d = 50 right singular vectors are the rotation and the UNSCALED centred data are
   projected on it.
3. Progressive merging (``.fast_mnn_core``), in the input order (or ``merge_order``); the left
   node is the reference, the right one is corrected:

   a. each side is centred along the other side's earlier batch vectors
      (``.orthogonalize_other`` = ``.center_along_batch_vector`` per vector);
   b. mutual nearest neighbours, k = 20 both ways (``findMutualNN``; here
      :func:`scatlas.kernels.mnn_pairs`, exact euclidean);
   c. per right cell in a pair, the mean of ``left[m1] - right[m2]`` (``.average_correction``);
      the overall batch vector is the mean of those;
   d. the relative batch magnitude ``||overall|| / sqrt(mean ||v||^2)``; the merge is skipped
      only below ``min_batch_skip`` (0: never);
   e. both sides centred along the overall batch vector (``.center_along_batch_vector``: each
      cell moved along the unit vector u to the side's mean position ``mean(x . u)``), then the
      averaged vectors recomputed with the same pairs;
   f. ``.tricube_weighted_correction``: for every right cell its min(k, #MNN cells) nearest
      right cells that are in pairs, bandwidth ``ndist`` (3) times the distance to the
      ceil(k / 2)-th of them (floored at 1e-8), weights ``(1 - min(d / bw, 1)^3)^3``
      normalised; the weighted mean of their averaged vectors is added;
   g. left and corrected right become the next left node; the overall vector is stored.

4. The corrected (n, d) coordinates are returned in the original cell order.

Input normalisation: batchelor's workflow runs ``multiBatchNorm`` before ``fastMNN``
(:func:`multi_batch_norm`: library-size factors rescaled so every batch has the coverage of the
shallowest one, then ``log2(x / sf + 1)``). Per-cell scaling to 1e4 counts instead inflates
the log-expression spread of shallow batches; in the 50-PC cosine space that spread separates
batches within a cell type, and no shift-based correction removes it. Measured (issue 15,
2000 batch-aware HVGs, defaults, seed 0): an oracle that moves every (batch, label) group to
its label's mean in this space reaches iLISI 0.205 on Baron by donor (fastMNN: 0.207) and
0.277 on synthetic counts (fastMNN: 0.271), while the same oracle in Harmony's space (30 PCs
of scaled genes) reaches 0.448 and 0.789: fastMNN's correction is at the ceiling of its own
space there. With ``multi_batch_norm`` input, iLISI / cross-batch label transfer go from
0.499 / 0.961 to 0.488 / 0.965 (CellBench), 0.207 / 0.887 to 0.234 / 0.951 (Baron, donors),
0.903 / 0.994 to 0.910 / 0.997 (Baron, species), 0.699 / 0.975 to 0.886 / 1.000 (mESC) and
0.271 / 0.943 to 0.352 / 0.966 (synthetic, 3,000 cells). Chosen on synthetic sets only
(seeds 1-3, 3 and 5 batches): iLISI up in 5 of 6 (-0.005 to +0.098), label transfer up in 6.

Merge order: the reference side keeps its spread and the corrected side is moved onto it, so
the mixing depends on which batch is the reference. On the synthetic 3,000 cells (multiBatchNorm
input) the six progressive orders give iLISI 0.256-0.686, and with two of its batches 0.039 or
0.776 depending on which is the reference. ``auto_merge`` is not a better default: on the six
synthetic sets above it lowered iLISI in 4.

Deviations: exact neighbours (:func:`scatlas.kernels.knn`; batchelor's default KMKNN is exact
too, ties may be broken differently); the PCA is exact (Gram route) or randomized with many
power iterations (:func:`scatlas.kernels.linalg.svd_operator`) instead of irlba, signs by
scikit-learn's rule (the correction is equivariant to PC signs); ``lost.var``, ``restrict``,
``prop.k`` and ``weights`` are not implemented; no MNN pair in a merge is an
error (batchelor produces NaN).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _progress, backend
from .._validate import ScatlasInputError, check_matrix, check_positive_int
from ._operator import ShiftedOperator
from .anchors import check_min_cells, l2_normalize_rows, prepare_datasets, split_batches
from .linalg import svd_operator
from .neighbors import knn, mnn_pairs

#: batchelor's floor on cosine-normalisation norms and on tricube bandwidths
NORM_FLOOR = 1e-8


@dataclass
class MergeInfo:
    """One merge step: batches on each side, MNN pairs (rows of the output), the overall batch
    vector (d,), its relative magnitude and whether the correction was skipped."""

    left: list[Any]
    right: list[Any]
    pairs: tuple[np.ndarray, np.ndarray]
    batch_vector: Any
    batch_size: float
    skipped: bool


@dataclass
class FastMNNResult:
    """Output of :func:`fastmnn`.

    corrected (n, d): corrected coordinates in the input cell order; batch (n,) host int64
    index into ``batches`` (the batch names); rotation (p, d) gene loadings of the multi-batch
    PCA (None with ``d=None``); merges: one :class:`MergeInfo` per merge step.
    """

    corrected: Any
    batch: np.ndarray
    batches: list[Any]
    rotation: Any
    merges: list[MergeInfo] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------
def cosine_normalize(X: Any) -> Any:
    """batchelor ``cosineNorm``: rows divided by max(||row||_2, 1e-8); dense or CSR."""
    return l2_normalize_rows(X, floor=NORM_FLOOR)


def _stack(mats: list[Any]) -> Any:
    if backend.issparse(mats[0]):
        return backend.sparse_module(mats[0]).vstack(mats, format="csr")
    return backend.array_module(mats[0]).concatenate(mats)


def multi_batch_pca(batches: list[Any], d: int, *, method: str = "auto", seed: int = 0,
                    progress: bool | None = None) -> tuple[list[Any], Any]:
    """batchelor ``multiBatchPCA`` with equal batch weights.

    ``batches``: (n_b, p) matrices (dense or CSR, one device, compute dtype). Returns the
    per-batch (n_b, d) PC coordinates of the centred, unscaled data and the (p, d) rotation.
    Sparse data are never densified (implicit centring and scaling).
    """
    xp = backend.array_module(batches[0])
    dt = batches[0].dtype
    sizes = [X.shape[0] for X in batches]
    means = [xp.asarray(X.sum(axis=0, dtype=np.float64)).ravel() / X.shape[0] for X in batches]
    center = (sum(means) / len(batches)).astype(dt)
    scale = xp.concatenate([xp.full(n, 1.0 / math.sqrt(n), dtype=dt) for n in sizes])
    X = _stack(batches)
    with ShiftedOperator(X, col_shift=center, row_scale=scale) as op:
        _, _, Vt = svd_operator(op, d, method=method, seed=seed, progress=progress)
    V = Vt.T.astype(dt)
    pcs = []
    for Xb in batches:
        with ShiftedOperator(Xb, col_shift=center) as op:
            pcs.append(op.matmat(V))
    return pcs, V


def center_along_batch_vector(mat: Any, vec: Any) -> Any:
    """batchelor ``.center_along_batch_vector``: move every row along u = vec / ||vec|| to the
    mean position of the rows along u (removes variation along the batch vector)."""
    u = vec / backend.array_module(vec).linalg.norm(vec)
    loc = mat @ u
    return mat + (loc.mean() - loc)[:, None] * u[None, :]


def average_correction(left: Any, il: Any, right: Any, jr: Any) -> tuple[Any, Any]:
    """batchelor ``.average_correction``: per right cell in a pair, the mean of
    ``left[il] - right[jr]`` over its pairs. Returns (averaged (u, d), the u right cells)."""
    xp = backend.array_module(left)
    vec = left[il] - right[jr]
    cells, inv, counts = xp.unique(jr, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    S = backend.sparse_module(left).coo_matrix(
        (xp.ones(inv.shape[0], dtype=vec.dtype), (inv, xp.arange(inv.shape[0]))),
        shape=(cells.shape[0], inv.shape[0])).tocsr()
    return (S @ vec) / counts.astype(vec.dtype)[:, None], cells


def batch_magnitude(averaged: Any, overall: Any) -> float:
    """batchelor ``.get_batch_magnitude``: ||overall|| / sqrt(sum of column means of v^2)."""
    ave_l2sq = float((averaged**2).mean(axis=0).sum())
    return 0.0 if ave_l2sq == 0 else math.sqrt(float((overall**2).sum()) / ave_l2sq)


def tricube_weights(dist: Any, ndist: float) -> Any:
    """batchelor ``.compute_tricube_average`` weights for (n, k) sorted neighbour distances:
    bandwidth ndist x the ceil(k/2)-th distance (floored at 1e-8), (1 - min(d/bw, 1)^3)^3,
    normalised per row."""
    xp = backend.array_module(dist)
    middle = math.ceil(dist.shape[1] / 2) - 1
    bw = xp.maximum(dist[:, middle] * ndist, NORM_FLOOR)
    rel = xp.minimum(dist / bw[:, None], 1.0)
    tri = (1.0 - rel**3) ** 3
    return tri / tri.sum(axis=1, keepdims=True)


def _row_weighted_mean(weights: Any, idx: Any, values: Any) -> Any:
    """sum_j weights[i, j] values[idx[i, j]] as one sparse (n, m) x (m, d) product."""
    xp = backend.array_module(values)
    n, k = idx.shape
    W = backend.sparse_module(values).csr_matrix(
        (weights.astype(values.dtype).ravel(), idx.ravel(),
         xp.arange(0, n * k + 1, k, dtype=np.int64)), shape=(n, values.shape[0]))
    return W @ values


def tricube_correction(right: Any, averaged: Any, in_mnn: Any, k: int, ndist: float,
                       progress: bool | None = None) -> Any:
    """batchelor ``.tricube_weighted_correction``: right + the tricube-weighted mean of the
    averaged vectors of each cell's min(k, #MNN cells) nearest MNN cells."""
    safe_k = min(k, int(in_mnn.shape[0]))
    dist, idx = knn(right, right[in_mnn], safe_k, dtype=right.dtype, progress=progress)
    return right + _row_weighted_mean(tricube_weights(dist, ndist), idx, averaged)


def multi_batch_norm(counts: Any, batch: Any, *, genes: Any = None, min_mean: float = 1.0,
                     dtype: Any = None) -> Any:
    """batchelor ``multiBatchNorm`` + scater ``logNormCounts``: log2 expression on which the
    batches have comparable coverage (the normalisation batchelor's workflow runs before
    ``fastMNN``; LTLA/batchelor R/multiBatchNorm.R).

    1. library-size factors centred to mean 1 within each batch: ``sf = lib / mean_b(lib)``;
    2. per batch, the average size-factor-normalised count of every gene (``calculateAverage``);
    3. for each pair of batches, the median ratio of their averages over the genes whose
       pooled average is at least ``min_mean`` (1);
    4. the lowest-coverage batch is the reference: every batch's size factors are divided by
       its ratio to it, so deeper batches are scaled down to its coverage;
    5. ``log2(counts / sf + 1)``.

    Scaling every batch down to the shallowest one gives all batches the same pseudo-count
    shrinkage, so their log-expression has the same depth-dependent spread; log-normalising
    every cell to 1e4 counts instead inflates the spread of shallow batches, which a
    shift-based correction such as fastMNN cannot remove.

    ``counts`` (n, p) raw counts, dense or CSR (numpy or cupy); ``batch`` (n,) labels;
    ``genes``: column positions (or a boolean mask) of the output, e.g. the HVGs fastMNN uses
    (the size factors always come from every gene, as in batchelor's workflow:
    ``multiBatchNorm`` on all genes, then ``fastMNN(subset.row = hvgs)``). Returns
    (n, p or len(genes)) of the same kind (CSR stays CSR), float32 unless ``dtype``. Raises
    for a cell with no counts. When no gene reaches ``min_mean`` in a pair of batches (shallow
    data), the ratio is taken over the genes detected in both, with a warning (batchelor would
    return NA there).
    """
    X = check_matrix(counts, "counts", nonnegative=True)
    xp = backend.array_module(X)
    _, batch_names, parts_rows = split_batches(X[:, :1], batch, "counts")  # R's level order
    dt = backend.resolve_dtype(dtype)
    Xs = X.tocsr() if backend.issparse(X) else X
    lib = xp.asarray(Xs.sum(axis=1, dtype=np.float64)).ravel()
    if bool((lib <= 0).any()):
        empty = np.flatnonzero(backend.to_host(lib <= 0))
        raise ScatlasInputError(f"{empty.size} cell(s) have no counts (rows {empty[:5].tolist()}"
                                "...); remove them before normalising")
    sf = xp.empty_like(lib)
    aves = []
    for rows in parts_rows:
        r = xp.asarray(rows)
        sf[r] = lib[r] / lib[r].mean()
        inv = 1.0 / sf[r]
        if backend.issparse(Xs):
            ave = xp.asarray(Xs[r].T @ inv).ravel() / rows.size
        else:
            ave = (Xs[r].astype(np.float64).T @ inv) / rows.size
        aves.append(ave)
    nb = len(aves)
    ratios = np.ones((nb, nb))
    names = [str(b) for b in batch_names]
    shallow: list[str] = []
    for i in range(nb - 1):
        for j in range(i + 1, nb):
            si, sj = float(aves[i].sum()), float(aves[j].sum())
            grand = (aves[i] / si + aves[j] / sj) / 2 * (si + sj) / 2
            keep = grand >= min_mean
            if not bool(keep.any()):  # shallow data: no gene averages min_mean counts
                keep = (aves[i] > 0) & (aves[j] > 0)
                shallow.append(f"{names[i]!r} / {names[j]!r}")
            with np.errstate(divide="ignore", invalid="ignore"):
                r = float(xp.median(aves[j][keep] / aves[i][keep])) if bool(keep.any()) \
                    else float("nan")
            if not np.isfinite(r) or r == 0:
                raise ScatlasInputError(
                    f"multi_batch_norm: batches {names[i]!r} and {names[j]!r} share no gene "
                    "detected in both, so their coverage cannot be compared")
            ratios[i, j], ratios[j, i] = r, 1.0 / r
    if shallow:
        warnings.warn(
            f"multi_batch_norm: no gene averages {min_mean} counts per cell in batches "
            f"{', '.join(shallow)} (shallow data); their coverage ratio is the median over every "
            "gene detected in both", stacklevel=2)
    rescale = ratios[:, int(np.argmin(ratios.min(axis=0)))]
    for b, rows in enumerate(parts_rows):
        r = xp.asarray(rows)
        sf[r] = sf[r] / rescale[b]
    if genes is not None:
        cols = np.asarray(backend.to_host(genes))
        cols = np.flatnonzero(cols) if cols.dtype == bool else cols.astype(np.int64)
        Xs = Xs[:, xp.asarray(cols)]
    if backend.issparse(Xs):
        out = backend.sparse_module(Xs).diags(1.0 / sf) @ Xs.astype(np.float64)
        out = out.tocsr()
        out.data = xp.log2(out.data + 1.0)
        return out.astype(dt)
    return xp.log2(Xs.astype(np.float64) / sf[:, None] + 1.0).astype(dt)


# ----------------------------------------------------------------------------------------------
# merging
# ----------------------------------------------------------------------------------------------
@dataclass
class _Node:
    data: Any
    batches: list[int]
    cells: np.ndarray  # global output rows of data's rows (host)
    vectors: list[Any]


def _orthogonalize(mat: Any, vectors: list[Any]) -> Any:
    for v in vectors:
        mat = center_along_batch_vector(mat, v)
    return mat


def _merge(left: _Node, right: _Node, k: int, ndist: float, min_batch_skip: float,
           names: list[Any], progress: bool | None) -> tuple[_Node, MergeInfo]:
    xp = backend.array_module(left.data)
    rdata = _orthogonalize(right.data, left.vectors)
    ldata = _orthogonalize(left.data, right.vectors)
    il, jr = mnn_pairs(ldata, rdata, k, k2=k, dtype=ldata.dtype, progress=progress)
    if il.shape[0] == 0:
        raise ScatlasInputError(
            f"no mutual nearest neighbours between batches {[names[b] for b in left.batches]} "
            f"and {[names[b] for b in right.batches]} (k={k}); increase k"
        )
    averaged, _ = average_correction(ldata, il, rdata, jr)
    overall = averaged.mean(axis=0)
    size = batch_magnitude(averaged, overall)
    skipped = size < min_batch_skip
    added = []
    if not skipped:
        ldata = center_along_batch_vector(ldata, overall)
        rdata = center_along_batch_vector(rdata, overall)
        averaged, in_mnn = average_correction(ldata, il, rdata, jr)
        rdata = tricube_correction(rdata, averaged, in_mnn, k, ndist, progress)
        added = [overall]
    node = _Node(xp.concatenate([ldata, rdata]), left.batches + right.batches,
                 np.concatenate([left.cells, right.cells]),
                 left.vectors + right.vectors + added)
    info = MergeInfo([names[b] for b in left.batches], [names[b] for b in right.batches],
                     (left.cells[backend.to_host(il)], right.cells[backend.to_host(jr)]),
                     overall, size, skipped)
    return node, info


def _leaf(tree: Any, names: list[Any]) -> int:
    """A batch named by its label, else by its index."""
    for i, nm in enumerate(names):
        if not isinstance(tree, bool) and tree == nm:
            return i
    if isinstance(tree, int | np.integer) and not isinstance(tree, bool) and \
            0 <= tree < len(names):
        return int(tree)
    raise ScatlasInputError(f"merge_order names an unknown batch {tree!r} (batches: {names})")


def _resolve_tree(merge_order: Any, names: list[Any]) -> Any:
    """merge_order -> nested lists of batch indices; None is the input order."""
    if merge_order is None:
        return list(range(len(names)))

    def walk(node: Any) -> Any:
        if isinstance(node, Sequence) and not isinstance(node, str | bytes):
            if len(node) == 0:
                raise ScatlasInputError("merge_order contains an empty group")
            return [walk(c) for c in node]
        return _leaf(node, names)

    tree = walk(merge_order)
    tree = tree if isinstance(tree, list) else [tree]
    leaves = _flatten(tree)
    if sorted(leaves) != list(range(len(names))):
        raise ScatlasInputError(
            f"merge_order must name every batch exactly once; got {merge_order!r} for batches "
            f"{names}"
        )
    return tree


def _flatten(tree: Any) -> list[int]:
    return [x for c in tree for x in _flatten(c)] if isinstance(tree, list) else [tree]


def fastmnn(
    X: Any,
    batch: Any = None,
    *,
    k: int = 20,
    d: int | None = 50,
    ndist: float = 3.0,
    merge_order: Any = None,
    auto_merge: bool = False,
    cos_norm: bool = True,
    min_batch_skip: float = 0.0,
    pca_method: str = "auto",
    seed: int = 0,
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
) -> FastMNNResult:
    """batchelor ``fastMNN`` on log-expression (or, with ``d=None``, on low-dim coordinates).

    Parameters
    ----------
    X, batch
        A list of (n_b, p) matrices, one per batch (output rows: the batches concatenated), or
        one (n, p) matrix with ``batch`` labels (batches ordered as R's factor levels, i.e. the
        sorted labels; output rows in X's order). Log-normalised expression of the selected
        genes (e.g. 2000 HVGs); dense or sparse, numpy or cupy.
    k, d, ndist, cos_norm, min_batch_skip
        batchelor's defaults 20, 50, 3, TRUE, 0. ``d=None`` skips cosine normalisation and
        PCA: X are already low-dimensional (batchelor ``reducedMNN``).
    merge_order
        None (input order: batch 1 + 2, then + 3, ...), a sequence of batch names / indices
        (progressive in that order), or nested sequences (a tree; each group merged left to
        right, e.g. ``[[0, 3], [1, 2]]``).
    auto_merge
        batchelor's ``auto.merge`` (default FALSE): at each step, among the current nodes, merge
        the pair with the most MNN pairs (each side orthogonalised against the other's batch
        vectors first; ties to the first pair in batchelor's (i, j < i) order), the later
        node as the reference; the merged node goes last. Pair counts are kept until one of
        the pair is merged (batchelor recounts every pair at every step; the counts are the
        same), so B batches cost B(B-1)/2 + (B-1)(B-2)/2 MNN searches at most. Excludes
        ``merge_order``.
    pca_method, seed
        :func:`scatlas.kernels.linalg.svd_operator` route ('auto' = exact Gram when cheap).
    dtype, device, progress
        Compute dtype (float32 default), device override, progress bars.

    Returns
    -------
    FastMNNResult
        ``corrected`` (n, d) of the caller's array kind, rows in input order.

    Peak device memory (b: the compute dtype's bytes): the batches (a cast copy when the
    dtype differs), their cosine-normalised copies (same sparsity) and one stacked copy for the
    multi-batch PCA, whose operator is centred and scaled implicitly (never (n, p) dense; its
    Gram route holds a (p, p) float64 matrix, eigh's workspace and a dense row chunk of
    :data:`~scatlas.kernels._operator.GRAM_CHUNK_BYTES` = 256 MiB, see
    :func:`scatlas.kernels.linalg.rsvd`); then (n, d) coordinates, about four copies during a
    merge (both sides orthogonalised and centred), and per merge the MNN search's score block
    (:func:`scatlas.kernels.knn`) and n_right k int64 / float arrays of the tricube
    correction. With ``d=None`` a sparse input is densified (it is low-dimensional there).
    """
    if batch is not None:
        if isinstance(X, Sequence):
            raise ScatlasInputError("give either a list of batches or one matrix with batch=")
        parts, names, rows = split_batches(X, batch)
    else:
        if hasattr(X, "shape"):
            raise ScatlasInputError("a single matrix needs batch= labels (one per row)")
        parts = list(X)
        names, rows = list(range(len(parts))), None
    data, restore = prepare_datasets(parts, dtype, device, "batches")
    sizes = [B.shape[0] for B in data]
    if rows is None:
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        rows = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(sizes))]
    k = check_positive_int(k, "k")
    check_min_cells(sizes, k, f"k={k}")
    if not (np.isfinite(ndist) and ndist > 0):
        raise ScatlasInputError(f"ndist must be a positive number, got {ndist}")
    if auto_merge and merge_order is not None:
        raise ScatlasInputError("give either merge_order or auto_merge=True, not both")
    tree = _resolve_tree(merge_order, names)
    rotation = None
    if d is not None:
        d = check_positive_int(d, "d", upper=min(sum(sizes), data[0].shape[1]),
                               what="min(n_cells, n_features)")
        if cos_norm:
            data = [cosine_normalize(B) for B in data]
        data, rotation = multi_batch_pca(data, d, method=pca_method, seed=seed,
                                         progress=progress)
    else:
        data = [B.toarray() if backend.issparse(B) else B for B in data]
    leaves = [_Node(data[b], [b], rows[b], []) for b in range(len(data))]
    merges: list[MergeInfo] = []
    bar = _progress.bar(desc="fastMNN merges", total=len(data) - 1, progress=progress,
                        unit="merge")

    def build(node: Any) -> _Node:
        if not isinstance(node, list):
            return leaves[node]
        acc = build(node[0])
        for child in node[1:]:
            acc, info = _merge(acc, build(child), k, ndist, min_batch_skip, names, progress)
            merges.append(info)
            bar.update(1)
        return acc

    def auto() -> _Node:
        nodes = list(leaves)
        counts: dict[frozenset, int] = {}  # a pair's count holds until one of them is merged

        def n_pairs(a: _Node, b: _Node) -> int:
            key = frozenset((id(a), id(b)))
            if key not in counts:
                ia, _ = mnn_pairs(_orthogonalize(a.data, b.vectors),
                                  _orthogonalize(b.data, a.vectors), k, k2=k,
                                  dtype=a.data.dtype, progress=progress)
                counts[key] = int(ia.shape[0])
            return counts[key]

        while len(nodes) > 1:
            best = (-1, 0, 0)
            for i in range(len(nodes)):
                for j in range(i):
                    n = n_pairs(nodes[i], nodes[j])
                    if n > best[0]:
                        best = (n, i, j)
            _, i, j = best
            gone = {id(nodes[i]), id(nodes[j])}  # ids may be reused once these are freed
            counts = {key: n for key, n in counts.items() if not key & gone}
            merged, info = _merge(nodes[i], nodes[j], k, ndist, min_batch_skip, names,
                                  progress)
            merges.append(info)
            bar.update(1)
            nodes = [nd for t, nd in enumerate(nodes) if t not in (i, j)] + [merged]
        return nodes[0]

    with bar:
        final = auto() if auto_merge else build(tree)
    xp = backend.array_module(final.data)
    out = xp.empty_like(final.data)
    out[xp.asarray(final.cells)] = final.data
    batch_idx = np.empty(sum(sizes), dtype=np.int64)
    for b, r in enumerate(rows):
        batch_idx[r] = b
    return FastMNNResult(corrected=restore(out), batch=batch_idx, batches=names,
                         rotation=None if rotation is None else restore(rotation),
                         merges=merges)
