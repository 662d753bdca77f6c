"""Preprocessing wrappers: scanpy on the CPU, rapids-singlecell on the GPU.

Nothing here reimplements normalisation or highly-variable-gene selection. Each function
validates its input at the boundary (finite, non-negative values; the batch column exists and
every batch has cells and data), decides where to compute with :mod:`scatlas.backend`, and calls

* ``scanpy.pp`` when the matrix is on the host (NumPy / SciPy), or
* ``rapids_singlecell.pp`` (imported lazily) when the matrix is on the GPU (CuPy / cupyx).

``device=None`` computes where the data live; ``device="cpu"`` / ``"gpu"`` / ``"auto"`` moves the
matrix there for the call and moves results back to the caller's kind (host stays host, GPU stays
GPU). When the GPU is chosen but rapids-singlecell is not installed, scanpy runs on a host copy
(logged as a warning) and the result is moved back.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd

from . import backend
from ._validate import ScatlasInputError, check_counts, check_obs_key, check_positive_int

__all__ = ["COUNT_FLAVORS", "HVG_FLAVORS", "highly_variable_genes", "loess_direct",
           "log_normalized_hvg", "normalize_log1p", "scale", "vst_standardized_variance"]

log = logging.getLogger(__name__)

HVGFlavor = Literal["seurat", "cell_ranger", "seurat_v3", "seurat_v3_paper", "seurat_integration"]
#: Flavors accepted by :func:`highly_variable_genes`: scanpy's and rapids-singlecell's names,
#: and ``"seurat_integration"`` (Seurat's ``SelectIntegrationFeatures`` on per-batch vst).
HVG_FLAVORS: tuple[str, ...] = ("seurat", "cell_ranger", "seurat_v3", "seurat_v3_paper",
                                "seurat_integration")
#: Flavors that rank genes on raw counts (vst); the others expect log-normalised data.
COUNT_FLAVORS: tuple[str, ...] = ("seurat_v3", "seurat_v3_paper", "seurat_integration")
_COUNT_FLAVORS = COUNT_FLAVORS


def _rapids():
    """The ``rapids_singlecell`` module, or None when it is not installed / not importable."""
    try:
        import rapids_singlecell

        return rapids_singlecell
    except Exception:  # ImportError, or a CUDA / RAPIDS mismatch at import time
        return None


def _get_matrix(adata: ad.AnnData, layer: str | None) -> Any:
    if layer is not None:
        if layer not in adata.layers:
            raise ScatlasInputError(
                f"layer {layer!r} not found (available: {list(adata.layers.keys())})"
            )
        return adata.layers[layer]
    return adata.X


def _set_matrix(adata: ad.AnnData, layer: str | None, X: Any) -> None:
    if layer is None:
        adata.X = X
    else:
        adata.layers[layer] = X


def _check_adata(adata: Any, layer: str | None, name: str) -> Any:
    """Validated matrix (``X`` or the layer) of an in-memory AnnData."""
    if not isinstance(adata, ad.AnnData):
        raise ScatlasInputError(f"{name} needs an AnnData, got {type(adata)}")
    if adata.isbacked:
        raise ScatlasInputError(
            f"{name} modifies data in memory; load the backed AnnData first (adata.to_memory())"
        )
    X = _get_matrix(adata, layer)
    return check_counts(X, "adata.X" if layer is None else f"adata.layers[{layer!r}]")


def _target_device(X: Any, device: str | None) -> backend.Device:
    return backend.device_of(X) if device is None else backend.resolve_device(device)


@contextmanager
def _matrix_on(
    adata: ad.AnnData, layer: str | None, target: backend.Device, *, write_back: bool
) -> Iterator[None]:
    """Temporarily place the matrix on ``target``; afterwards restore the caller's kind.

    With ``write_back`` the (modified) matrix is moved back to the original device; without it
    the original object is put back unchanged.
    """
    original = _get_matrix(adata, layer)
    caller = backend.device_of(original)
    if caller == target:
        yield
        return
    _set_matrix(adata, layer, backend.to_device(original, target))
    try:
        yield
    except BaseException:
        _set_matrix(adata, layer, original)
        raise
    if write_back:
        _set_matrix(adata, layer, backend.to_device(_get_matrix(adata, layer), caller))
    else:
        _set_matrix(adata, layer, original)


def _engine(target: backend.Device):
    """``(pp module, where)``: rapids-singlecell on the GPU when installed, else scanpy."""
    if target == "gpu":
        rsc = _rapids()
        if rsc is not None:
            return rsc.pp, "gpu"
        log.warning("rapids_singlecell is not installed; running scanpy on a host copy")
    import scanpy as sc

    return sc.pp, "cpu"


def normalize_log1p(
    adata: ad.AnnData,
    target_sum: float | None = 1e4,
    layer: str | None = None,
    device: str | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Library-size normalise then ``log1p``: ``X[i, j] <- log1p(X[i, j] / sum_j X[i, j] * t)``.

    Calls ``normalize_total(target_sum=t)`` and ``log1p`` of scanpy (host data) or
    rapids-singlecell (GPU data). ``adata.X`` (or ``adata.layers[layer]``), shape
    ``(n_obs, n_vars)``, dense or CSR, must hold finite, non-negative counts; integer input
    becomes float32. Cells with zero counts stay zero. ``target_sum=None`` uses the median
    count per cell. Modifies ``adata`` in place and returns None, or returns a modified copy
    with ``copy=True``. Sets ``adata.uns["log1p"]`` as scanpy does.

    Raises :class:`~scatlas._validate.ScatlasInputError` for an empty matrix, NaN/inf or
    negative values, or a missing layer.
    """
    _check_adata(adata, layer, "normalize_log1p")
    if target_sum is not None and not (np.isfinite(target_sum) and target_sum > 0):
        raise ScatlasInputError(f"target_sum must be a positive number or None, got {target_sum}")
    if copy:
        adata = adata.copy()
    target = _target_device(_get_matrix(adata, layer), device)
    pp, where = _engine(target)
    with _matrix_on(adata, layer, where, write_back=True):
        pp.normalize_total(adata, target_sum=target_sum, layer=layer)
        pp.log1p(adata, layer=layer)
    return adata if copy else None


def highly_variable_genes(
    adata: ad.AnnData,
    n_top_genes: int = 2000,
    batch_key: str | None = None,
    flavor: HVGFlavor = "seurat",
    layer: str | None = None,
    device: str | None = None,
) -> None:
    """Flag the ``n_top_genes`` most variable genes in ``adata.var`` (in place).

    Calls ``highly_variable_genes`` of scanpy (host data) or rapids-singlecell (GPU data) with
    ``n_top_genes``, ``flavor``, ``batch_key`` and ``layer``. Adds to ``adata.var`` the boolean
    ``highly_variable`` column and the flavor's statistics (``means``, ``dispersions``,
    ``dispersions_norm`` or ``variances``, ``variances_norm``, ``highly_variable_rank``; with a
    batch key also ``highly_variable_nbatches`` ...). ``n_top_genes`` larger than ``n_vars``
    is capped at ``n_vars`` (with a warning).

    Flavor: the default ``"seurat"`` (scanpy's own default) needs only the core dependencies and
    expects **log-normalised** data (run :func:`normalize_log1p` first); a warning is issued
    when the input looks like raw integer counts. ``"cell_ranger"`` likewise. ``"seurat_v3"`` /
    ``"seurat_v3_paper"`` rank genes on **raw counts** and are usually preferred on counts, but
    scanpy needs the ``scikit-misc`` package for them (a dependency of scatlas; a clear
    ImportError names it if it is missing). They are not this function's default because they
    need counts, not the log-normalised data the dispersion flavors take.

    ``"seurat_integration"`` (counts) is Seurat 4's ``SelectIntegrationFeatures`` exactly:
    per batch, scanpy's / rapids-singlecell's single-batch ``"seurat_v3"`` vst (Seurat's
    ``FindVariableFeatures(selection.method = "vst")``: loess of log10 variance on log10 mean,
    span 0.3, values clipped at sqrt(n_cells), standardised variance) lists the top
    ``n_top_genes`` genes, equal standardised variances in gene order (R's stable ``order``);
    genes are then ranked by the number of batches listing them, then by their median
    (1-based) rank in those lists, then by name (R's ``table`` order; R collates in its locale,
    here by code point), and the first ``n_top_genes`` are kept. scanpy's batch-aware
    ``"seurat_v3_paper"`` ranks the same way but orders equal variances arbitrarily
    (``np.argsort``), which swapped one of 2,000 genes on the Baron human/mouse data and, through
    it, 5% of the CCA anchors. Without ``batch_key`` it is Seurat's single-object vst list.
    Writes ``highly_variable``, ``highly_variable_nbatches``, ``highly_variable_rank`` (median
    rank, NaN for unlisted genes) and ``variances_norm`` (mean over batches). On small batches
    (tens of cells: many genes share one mean and variance) scikit-misc's loess stops at a
    near-singular local fit where R's loess warns and goes on; such a batch's trend is then
    fitted by :func:`loess_direct` (the same local quadratic, evaluated at every point rather
    than interpolated, with a pseudoinverse), with a warning naming the batches.

    Raises :class:`~scatlas._validate.ScatlasInputError` for an empty matrix, NaN/inf or negative
    values, a ``batch_key`` missing from ``adata.obs``, cells without a batch (NaN), a batch
    with no cells (an unused category) or with no data (all values zero), or an unknown flavor.
    """
    X = _check_adata(adata, layer, "highly_variable_genes")
    n_top_genes = check_positive_int(n_top_genes, "n_top_genes")
    if flavor not in HVG_FLAVORS:
        raise ScatlasInputError(f"flavor must be one of {HVG_FLAVORS}, got {flavor!r}")
    if n_top_genes > adata.n_vars:
        warnings.warn(
            f"n_top_genes={n_top_genes} exceeds the number of genes ({adata.n_vars}); "
            "selecting all of them",
            UserWarning,
            stacklevel=2,
        )
        n_top_genes = adata.n_vars
    if batch_key is not None:
        _check_batches(adata, batch_key, X)
    _check_flavor_input(X, flavor)
    target = _target_device(X, device)
    pp, where = _engine(target)
    if where == "cpu" and flavor in _COUNT_FLAVORS and importlib.util.find_spec("skmisc") is None:
        raise ImportError(
            f"flavor={flavor!r} needs the scikit-misc package on the CPU (pip install "
            "scikit-misc); or use flavor='seurat' on log-normalised data"
        )
    with _matrix_on(adata, layer, where, write_back=False):
        if flavor == "seurat_integration":
            _select_integration_features(pp, adata, n_top_genes, batch_key, layer)
        else:
            pp.highly_variable_genes(
                adata, n_top_genes=n_top_genes, flavor=flavor, batch_key=batch_key, layer=layer
            )


def _select_integration_features(engine: Any, adata: ad.AnnData, n_top: int,
                                 batch_key: str | None, layer: str | None) -> None:
    """Seurat's per-batch vst lists + ``SelectIntegrationFeatures`` (see highly_variable_genes)."""
    X = _get_matrix(adata, layer)
    n_vars = adata.n_vars
    if batch_key is None:
        groups = [np.arange(adata.n_obs)]
    else:
        codes = adata.obs[batch_key].astype(str).to_numpy()
        groups = [np.flatnonzero(codes == b) for b in sorted(set(codes))]
    ranks = np.full((len(groups), n_vars), np.nan)
    norm = np.zeros((len(groups), n_vars))
    direct = []
    for i, rows in enumerate(groups):
        sub = ad.AnnData(X=X[backend.to_device(rows, backend.device_of(X))],
                         var=pd.DataFrame(index=adata.var_names.copy()))
        try:
            engine.highly_variable_genes(sub, n_top_genes=n_top, flavor="seurat_v3")
            v = np.asarray(backend.to_host(np.asarray(sub.var["variances_norm"])),
                           dtype=np.float64)
        except ValueError as err:  # scikit-misc's loess stops at a near-singular local fit
            direct.append((i, rows.size, str(err)))
            v = vst_standardized_variance(backend.to_host(sub.X))
        norm[i] = v
        top = np.argsort(-v, kind="stable")[:n_top]  # R's order(): ties in gene order
        ranks[i, top] = np.arange(1, top.size + 1)
    if direct:
        names_b = ([str(b) for b in sorted(set(codes))] if batch_key is not None else ["all"])
        warnings.warn(
            "scikit-misc's loess stopped on a near-singular local fit (few cells, many genes "
            "with equal mean and variance) for batch(es) "
            f"{[f'{names_b[i]} ({n} cells)' for i, n, _ in direct]}: "
            f"{direct[0][2]!r}; their vst trend was fitted directly (local quadratic, span "
            "0.3, least-squares pseudoinverse, as R's loess continues with a warning there)",
            UserWarning,
            stacklevel=4,
        )
    listed = ~np.isnan(ranks)
    count = listed.sum(axis=0)
    median = np.full(n_vars, np.nan)
    has = count > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median[has] = np.nanmedian(ranks[:, has], axis=0)
    names = np.asarray(adata.var_names.astype(str))
    cand = np.flatnonzero(has)
    order = cand[np.lexsort((names[cand], median[cand], -count[cand]))]
    chosen = np.zeros(n_vars, dtype=bool)
    chosen[order[:n_top]] = True
    adata.var["highly_variable"] = chosen
    adata.var["highly_variable_nbatches"] = count.astype(np.int64)
    adata.var["highly_variable_rank"] = median
    adata.var["variances_norm"] = norm.mean(axis=0)


def loess_direct(x: np.ndarray, y: np.ndarray, span: float = 0.3) -> np.ndarray:
    """Fitted values of a 1-D local quadratic loess (Cleveland's, ``surface = "direct"``).

    At each x0, weighted least squares of y on (1, x - x0, (x - x0)^2) with tricube weights
    ``(1 - (d / h)^3)^3``, h the distance to the ``floor(span n)``-th nearest point; rank-
    deficient local systems (tied x) are solved by the pseudoinverse (``numpy.linalg.lstsq``),
    as R's ``loess`` does with a warning. Fits are computed once per distinct x. ``x``, ``y``
    (n,) float; returns (n,) float64.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    q = max(int(np.floor(span * n)), 3)
    ux, inv = np.unique(x, return_inverse=True)
    fitted = np.empty(ux.size)
    for j, x0 in enumerate(ux):
        d = np.abs(x - x0)
        h = np.partition(d, min(q, n) - 1)[min(q, n) - 1]
        if h <= 0:
            fitted[j] = y[d == 0].mean()
            continue
        w = np.clip(1.0 - (d / h) ** 3, 0.0, None) ** 3
        sel = w > 0
        dx = x[sel] - x0
        sw = np.sqrt(w[sel])
        A = np.column_stack([sw, sw * dx, sw * dx * dx])
        beta = np.linalg.lstsq(A, sw * y[sel], rcond=None)[0]
        fitted[j] = beta[0]
    return fitted[inv.ravel()]


def vst_standardized_variance(X: Any, span: float = 0.3) -> np.ndarray:
    """Seurat's vst standardised variance per gene of a host counts matrix (cells x genes),
    with the loess trend of log10 variance on log10 mean fitted by :func:`loess_direct`:
    values clipped at ``mean + sqrt(n) sd_expected``, variance of the clipped, standardised
    counts (ddof = 1). Genes with zero variance get 0. The fallback of the
    ``"seurat_integration"`` flavor when scikit-misc's loess stops."""
    import scipy.sparse as sp

    X = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else np.asarray(X, np.float64)
    n = X.shape[0]
    mean = np.asarray(X.mean(axis=0)).ravel()
    sq = np.asarray((X.multiply(X) if sp.issparse(X) else X * X).sum(axis=0)).ravel()
    var = np.clip(sq - n * mean**2, 0, None) / max(n - 1, 1)
    nc = var > 0
    log_fit = np.zeros(X.shape[1])
    if nc.sum() >= 3:
        log_fit[nc] = loess_direct(np.log10(mean[nc]), np.log10(var[nc]), span)
    reg_std = np.sqrt(10.0**log_fit)
    clip = reg_std * np.sqrt(n) + mean
    if sp.issparse(X):
        data = np.minimum(X.data, clip[X.indices])
        s1 = np.bincount(X.indices, weights=data, minlength=X.shape[1])
        s2 = np.bincount(X.indices, weights=data * data, minlength=X.shape[1])
    else:
        C = np.minimum(X, clip[None, :])
        s1, s2 = C.sum(axis=0), (C * C).sum(axis=0)
    out = (n * mean**2 + s2 - 2 * s1 * mean) / (max(n - 1, 1) * reg_std**2)
    return np.where(nc, out, 0.0)


def _check_batches(adata: ad.AnnData, batch_key: str, X: Any) -> None:
    """Every cell has a batch; every batch has cells and non-zero data."""
    check_obs_key(adata, batch_key, "batch_key")
    col = adata.obs[batch_key]
    n_missing = int(col.isna().sum())
    if n_missing:
        raise ScatlasInputError(
            f"{n_missing} cell(s) have no value in adata.obs[{batch_key!r}] (NaN); assign them "
            "a batch or drop them"
        )
    cats = col if isinstance(col.dtype, pd.CategoricalDtype) else col.astype("category")
    sizes = cats.value_counts(sort=False)
    empty = sizes.index[sizes.to_numpy() == 0].astype(str).tolist()
    if empty:
        raise ScatlasInputError(
            f"batch(es) {empty} of adata.obs[{batch_key!r}] have zero cells (unused "
            "categories); drop them with adata.obs[batch_key].cat.remove_unused_categories()"
        )
    xp = backend.array_module(X)
    row_sums = backend.to_host(xp.asarray(X.sum(axis=1)).ravel())
    totals = np.bincount(cats.cat.codes.to_numpy(), weights=np.asarray(row_sums, np.float64),
                         minlength=len(cats.cat.categories))
    no_data = cats.cat.categories[totals == 0].astype(str).tolist()
    if no_data:
        raise ScatlasInputError(
            f"batch(es) {no_data} of adata.obs[{batch_key!r}] have no data (every value is "
            "zero); remove those cells or check how the batches were assembled"
        )


def _check_flavor_input(X: Any, flavor: str) -> None:
    """Warn when dispersion flavors get raw counts (they expect log-normalised data), or count
    flavors get non-integer values (they model raw counts)."""
    values = X.data if backend.issparse(X) else X.ravel()
    sample = backend.to_host(values[:100_000])
    if flavor in _COUNT_FLAVORS:
        if sample.size and not np.all(sample == np.round(sample)):
            warnings.warn(
                f"flavor={flavor!r} models raw counts but the matrix has non-integer values "
                "(log-normalised?); give it the counts, or use flavor='seurat' on "
                "log-normalised data",
                UserWarning,
                stacklevel=3,
            )
        return
    if sample.size and np.all(sample == np.round(sample)) and float(sample.max()) > 1:
        warnings.warn(
            f"flavor={flavor!r} expects log-normalised data but the matrix looks like raw "
            "integer counts; run scatlas.pp.normalize_log1p first (or use flavor='seurat_v3' "
            "with scikit-misc installed)",
            UserWarning,
            stacklevel=3,
        )


def scale(
    adata: ad.AnnData,
    *,
    batch_key: str | None = None,
    layer: str | None = None,
    clip: float | None = 10.0,
    copy: bool = False,
) -> ad.AnnData | None:
    """Seurat's ``ScaleData``: every gene centred and divided by its sd (n - 1), values above
    ``clip`` set to it (Seurat's ``scale.max = 10``; upper side only; None: no clip), per batch
    of ``obs[batch_key]`` (Seurat scales each object before ``FindIntegrationAnchors``) or over
    all cells (``batch_key=None``).

    ``adata.X`` (or ``layers[layer]``), (n_obs, n_vars), dense or sparse, NumPy or CuPy, is
    replaced by the dense scaled float32 matrix of the same array kind
    (:func:`scatlas.kernels.scale_data` per batch). Zero-variance genes give 0 (Seurat: NaN).
    Every batch needs at least 2 cells. Modifies ``adata`` in place and returns None, or returns
    a modified copy with ``copy=True``.
    """
    from .kernels import scale_data

    _check_adata(adata, layer, "scale")
    if clip is not None and not (np.isfinite(clip) and clip > 0):
        raise ScatlasInputError(f"clip must be a positive number or None, got {clip!r}",
                                param="clip")
    if copy:
        adata = adata.copy()
    X = _get_matrix(adata, layer)
    xp = backend.array_module(X)
    if batch_key is None:
        groups = [np.arange(adata.n_obs)]
    else:
        check_obs_key(adata, batch_key, "batch_key")
        codes = pd.Categorical(adata.obs[batch_key]).codes
        groups = [np.flatnonzero(codes == c) for c in np.unique(codes)]
        small = [str(adata.obs[batch_key].iloc[g[0]]) for g in groups if g.size < 2]
        if small:
            raise ScatlasInputError(
                f"scale needs at least 2 cells per batch (sd with n - 1); batch(es) {small} of "
                f"obs[{batch_key!r}] have one", param="batch_key")
    out = xp.empty(X.shape, dtype=np.float32)
    for rows in groups:
        idx = rows if xp is np else xp.asarray(rows)
        out[idx] = scale_data(X[idx], clip=clip, dtype=np.float32)
    _set_matrix(adata, layer, out)
    return adata if copy else None


def log_normalized_hvg(
    adata: ad.AnnData, batch_key: str, layer: str | None = None, n_top_genes: int = 2000,
    genes: Any = None, hvg_flavor: str = "seurat", device: str | None = None,
) -> tuple[ad.AnnData, np.ndarray]:
    """The input of :func:`scatlas.tl.integrate` and of the integration report: a new AnnData
    of the log-normalised counts (:func:`normalize_log1p`) on the selected genes, and their
    positions (int64, in ``adata.var_names``).

    Genes: ``genes`` (names or a boolean mask over ``var_names``) or the ``n_top_genes``
    batch-aware highly variable genes of ``hvg_flavor`` (:func:`highly_variable_genes` with
    ``batch_key``; count flavors rank the counts, the others the log-normalised values). Counts
    are ``adata.X`` or ``layers[layer]``; ``adata`` is not modified. Needs at least two batches.
    """
    counts = _get_matrix(adata, layer)
    work = ad.AnnData(X=counts.copy(), obs=adata.obs[[batch_key]].copy(),
                      var=adata.var.iloc[:, :0].copy())
    n_batches = work.obs[batch_key].nunique(dropna=True)
    if n_batches < 2:
        raise ScatlasInputError(
            f"obs[{batch_key!r}] has {n_batches} batch(es); integration needs at least 2"
        )
    on_counts = genes is None and hvg_flavor in COUNT_FLAVORS
    # at most every gene: a data set with fewer genes than the default 2000 uses all of them
    # (no warning: nothing was asked that could not be done)
    n_top_genes = min(check_positive_int(n_top_genes, "n_top_genes"), adata.n_vars)
    if on_counts:  # vst-type flavors model the counts themselves (Seurat's FindVariableFeatures)
        highly_variable_genes(work, check_positive_int(n_top_genes, "n_top_genes"),
                                 batch_key=batch_key, flavor=hvg_flavor, device=device)
    normalize_log1p(work, device=device)
    if genes is not None:
        pos = _gene_positions(adata, genes)
    else:
        if not on_counts:  # dispersion flavors expect log-normalised data
            highly_variable_genes(work, check_positive_int(n_top_genes, "n_top_genes"),
                                     batch_key=batch_key, flavor=hvg_flavor, device=device)
        pos = np.flatnonzero(work.var["highly_variable"].to_numpy())
    cols = backend.to_device(np.asarray(pos), backend.device_of(work.X))
    work = ad.AnnData(X=work.X[:, cols], obs=work.obs)
    return work, pos


def _gene_positions(adata: ad.AnnData, genes: Any) -> np.ndarray:
    arr = np.asarray(genes)
    if arr.dtype == bool:
        if arr.shape != (adata.n_vars,):
            raise ScatlasInputError(f"genes mask must have shape ({adata.n_vars},)")
        pos = np.flatnonzero(arr)
    else:
        idx = adata.var_names.get_indexer(arr.astype(str))
        missing = arr[idx < 0]
        if missing.size:
            raise ScatlasInputError(f"{missing.size} gene(s) not in var_names: "
                                    f"{list(missing[:5])}")
        pos = idx
    if pos.size < 2:
        raise ScatlasInputError("genes selects fewer than 2 genes")
    return pos
