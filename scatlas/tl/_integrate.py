"""``tl.integrate``: batch integration of an AnnData of raw counts (Seurat CCA, fastMNN, iNMF).

Each method gets the preprocessing its reference implementation expects, done on a private
copy of the counts (the caller's ``.X`` is not modified):

* ``"cca"`` - Seurat v3/v4 (``NormalizeData`` -> features -> ``FindIntegrationAnchors`` ->
  ``IntegrateData`` -> ``ScaleData`` -> ``RunPCA``): log-normalisation (1e4, log1p), 2000
  batch-aware highly variable genes, per-batch gene scaling for the CCA
  (:func:`scatlas.kernels.seurat.seurat_integrate`), then the PCA (``n_pcs`` = 30) of the
  gene-scaled corrected expression. ``flavor="v5"`` runs Seurat v5's ``CCAIntegration``
  instead: one joint ``ScaleData``, a joint PCA (``n_pcs``), CCA anchors without filtering,
  and the anchor correction applied to the PCA itself.
* ``"mnn"`` - batchelor ``fastMNN``: batch-aware HVGs (chosen on log-normalised counts), then
  :func:`scatlas.kernels.fastmnn.fastmnn` (cosine normalisation, multi-batch PCA, d = 50) on
  the HVGs of batchelor's ``multiBatchNorm`` log2 expression
  (:func:`scatlas.kernels.fastmnn.multi_batch_norm`: every batch scaled to the coverage of the
  shallowest one, as batchelor's workflow does before ``fastMNN``).
* ``"inmf"`` - LIGER: delegated to :func:`scatlas.tl.inmf` (its own normalisation, gene
  selection and scaling); see that function for its keys.

Written (``key = key_added or f"X_{method}"``; ``name = key`` without a leading ``"X_"``):

* ``.obsm[key]`` (n_obs, n_dims): the integrated embedding (cca: PCA of the corrected
  expression, or the corrected PCA for v5; mnn: the corrected coordinates). For ``"inmf"``
  these are tl.inmf's keys: ``obsm[key]`` the loadings, ``obsm[key + "_norm"]`` the integrated
  (quantile-normalised) embedding.
* ``.obsm[key + "_corrected"]`` (cca v3 only, n_obs x n_hvg, dense): the integrated
  log-expression of the anchor features (Seurat's ``integrated`` assay). It is stored in
  ``.obsm`` rather than as a layer because it covers the HVGs only; the gene names are
  ``.uns[name]["genes"]``.
* ``.varm[key]`` (mnn only, n_vars x d): the multi-batch PCA rotation, zero rows for genes not
  used (like ``varm["PCs"]``).
* ``.uns[name]``: ``method``, ``genes`` (the features used), ``batches``, ``merges`` (per merge
  step the reference and query batches joined by ``";"``; mnn also ``n_pairs``, ``batch_size``,
  ``skipped``), cca ``n_anchors`` per pair, ``anchors`` (each pair's anchors once: ``cell1``,
  ``cell2`` cell positions, ``score``, ``dataset1``, ``dataset2`` batch names) and ``flavor``,
  and ``params``: the requested values; for cca also ``params["effective"]``, the values used
  (``pairs``: per pair of batches ``dataset1``, ``dataset2``, ``dims``, ``k_anchor``,
  ``k_score``, ``k_filter`` with 0 = not filtered; ``merges``: per merge ``k_weight`` and
  ``weight_pcs``; ``n_pcs``), and ``params["adapted"]``, the text of the
  :class:`~scatlas.kernels.anchors.SmallBatchWarning` ("" when nothing was lowered).

cca on small batches (e.g. Baron pancreas donors of 23-102 cells, where Seurat 4.3 stops at
``dims = 30``): each pair of batches uses the ``dims``, ``k_anchor``, ``k_score`` its smaller
batch allows (cells - 1), anchor filtering is skipped below ``k_filter`` cells and ``k_weight``
is lowered to the anchor cells available (as Seurat), with one warning naming the batches; see
:func:`scatlas.kernels.seurat.seurat_integrate`. A batch of fewer than 2 cells is an error.

Features: cca's default is Seurat's own selection, vst on the counts of each batch and
``SelectIntegrationFeatures``: :func:`scatlas.pp.highly_variable_genes` with
``flavor="seurat_integration"`` (scanpy's / rapids-singlecell's single-batch ``"seurat_v3"`` vst
per batch, then Seurat's ranking; scanpy needs the ``scikit-misc`` package for its loess); mnn and
harmony default to ``flavor="seurat"`` (dispersion of the log-normalised data, ranked by the number
of batches calling a gene variable). The rest is as documented in :mod:`scatlas.kernels.anchors`
and :mod:`scatlas.kernels.fastmnn`.
"""

from __future__ import annotations

from typing import Any, Literal

import anndata as ad
import numpy as np

from .. import backend, pp
from .._validate import ScatlasInputError, check_obs_key, check_positive_int
from ..kernels.fastmnn import fastmnn, multi_batch_norm
from ..kernels.seurat import check_batch_sizes, seurat_integrate
from ._common import get_matrix, on_device_of, scaled_pca

Method = Literal["cca", "mnn", "inmf", "harmony"]
_METHODS = ("cca", "mnn", "inmf", "harmony")


def integrate(
    adata: ad.AnnData,
    batch_key: str = "batch",
    method: Method = "cca",
    key_added: str | None = None,
    *,
    layer: str | None = None,
    n_top_genes: int = 2000,
    genes: Any = None,
    hvg_flavor: str | None = None,
    n_pcs: int = 30,
    flavor: Literal["v3", "v5"] = "v3",
    seed: int = 0,
    dtype: Any = None,
    device: str | None = None,
    progress: bool | None = None,
    copy: bool = False,
    **kwargs: Any,
) -> ad.AnnData | None:
    """Integrate the batches ``adata.obs[batch_key]`` of raw counts with one method.

    Parameters
    ----------
    adata
        Cells x genes raw counts in ``.X`` (or ``layers[layer]``); numpy / scipy.sparse, or
        cupy / cupyx on the GPU. Not modified except for the keys written.
    batch_key
        ``.obs`` column of the batches (>= 2).
    method
        ``"cca"`` (Seurat), ``"mnn"`` (fastMNN) or ``"inmf"`` (LIGER, via tl.inmf).
        ``"harmony"``: harmonypy / rapids-singlecell on ``n_pcs`` PCs of the scaled HVGs
        (:mod:`scatlas.tl._harmony`; ``.obsm["X_harmony"]``, ``.uns["harmony"]``).
    key_added
        ``.obsm`` key of the embedding (default ``f"X_{method}"``).
    n_top_genes, genes, hvg_flavor
        Features for cca / mnn / harmony: ``genes`` (names, or a bool mask over ``var_names``)
        if given, else the ``n_top_genes`` (every gene when there are fewer) batch-aware HVGs of
        :func:`scatlas.pp.highly_variable_genes` with ``hvg_flavor``. Default (``None``):
        ``"seurat_integration"`` for cca - Seurat's ``FindVariableFeatures(vst)`` per batch on
        the raw counts and ``SelectIntegrationFeatures`` (genes ranked by the number of batches
        listing them, then by median rank), which reproduces Seurat 4.3's features (all 2000
        on CellBench and Baron human/mouse, ``python -m bench.seurat_parity``); ``"seurat"``
        (dispersion of the log-normalised data) for mnn and harmony. The vst flavors
        (``"seurat_integration"``, ``"seurat_v3"``, ``"seurat_v3_paper"``) run on the counts,
        ``"seurat"`` / ``"cell_ranger"`` on the log-normalised data. scanpy's ``"seurat_v3"``
        ranks by median rank first, which is not Seurat's ``SelectIntegrationFeatures`` (71% of
        the features shared on CellBench); ``"seurat_v3_paper"`` is, but breaks exact ties
        arbitrarily (1 of 2000 genes differs on Baron human/mouse).
    n_pcs
        cca: PCs of the corrected expression (v3) or of the joint PCA that is corrected (v5);
        Seurat's 30.
    flavor
        cca only: ``"v3"`` (``IntegrateData`` on expression) or ``"v5"`` (``CCAIntegration``).
    seed, dtype, device, progress
        PCA seed, compute dtype, device override, progress bars.
    kwargs
        Passed to :func:`scatlas.kernels.seurat.seurat_integrate` (``dims``, ``k_anchor``,
        ``k_filter``, ``k_score``, ``k_weight`` ...), :func:`scatlas.kernels.fastmnn.fastmnn`
        (``k``, ``d``, ``ndist``, ``merge_order`` ...) or ``tl.inmf`` (``k``, ``lam`` ...).

    Returns
    -------
    None (or the modified copy with ``copy=True``).
    """
    if method not in _METHODS:
        raise ScatlasInputError(f"method must be one of {_METHODS}, got {method!r}")
    adata = adata.copy() if copy else adata
    check_obs_key(adata, batch_key, "batch_key")
    key = key_added or f"X_{method}"
    if method == "inmf":
        _run_inmf(adata, batch_key, key, layer=layer, dtype=dtype, device=device,
                  progress=progress, **kwargs)
        return adata if copy else None
    if method == "cca":  # before the per-batch vst (scikit-misc's loess crashes on 1 cell)
        counts = adata.obs[batch_key].astype(str).value_counts(sort=False)
        check_batch_sizes(counts.to_list(), lambda i: f"obs[{batch_key!r}] batch "
                          f"{str(counts.index[i])!r}")
    if hvg_flavor is None:
        hvg_flavor = "seurat_integration" if method == "cca" else "seurat"
    work, genes_used = pp.log_normalized_hvg(adata, batch_key, layer, n_top_genes, genes,
                                             hvg_flavor, device)
    X = work.X
    batch = work.obs[batch_key].astype(str).to_numpy()
    common = dict(dtype=dtype, device=device, progress=progress)
    name = key[2:] if key.startswith("X_") else key
    if method == "harmony":
        from ._harmony import run_integrate_harmony

        uns = run_integrate_harmony(adata, key, X, batch, n_pcs, seed, common, kwargs)
    elif method == "mnn":
        # batchelor's workflow: multiBatchNorm on the counts (every gene), fastMNN on the HVGs
        counts, _ = backend.on_device(get_matrix(adata, layer), device)
        X = multi_batch_norm(counts, batch, genes=genes_used, dtype=dtype)
        uns = _run_mnn(adata, key, X, batch, genes_used, common, kwargs)
    else:
        uns = _run_cca(adata, key, X, batch, n_pcs, flavor, seed, common, kwargs)
    adata.uns[name] = {"method": method, "genes": np.asarray(adata.var_names[genes_used]),
                       **uns}
    return adata if copy else None


def _run_mnn(adata: ad.AnnData, key: str, X: Any, batch: np.ndarray, genes: np.ndarray,
             common: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    res = fastmnn(X, batch, **common, **kwargs)
    adata.obsm[key] = res.corrected
    xp = backend.array_module(res.rotation)
    rot = xp.zeros((adata.n_vars, res.rotation.shape[1]), dtype=res.rotation.dtype)
    rot[on_device_of(rot, genes)] = res.rotation
    adata.varm[key] = rot
    return {"batches": [str(b) for b in res.batches],
            "merges": {"left": _joined(m.left for m in res.merges),
                       "right": _joined(m.right for m in res.merges),
                       "n_pairs": np.array([m.pairs[0].size for m in res.merges]),
                       "batch_size": np.array([m.batch_size for m in res.merges]),
                       "skipped": np.array([m.skipped for m in res.merges])},
            "params": _plain(kwargs)}


def _run_cca(adata: ad.AnnData, key: str, X: Any, batch: np.ndarray, n_pcs: int, flavor: str,
             seed: int, common: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    n_pcs = check_positive_int(n_pcs, "n_pcs")
    if flavor == "v3":
        res = seurat_integrate(X, batch, **common, **kwargs)
        corrected = res.corrected
        adata.obsm[key] = scaled_pca(corrected, n_pcs, seed=seed, dtype=corrected.dtype,
                                     progress=common["progress"])
        adata.obsm[key + "_corrected"] = corrected
    elif flavor == "v5":
        emb = scaled_pca(X, n_pcs, seed=seed, dtype=common["dtype"],  # one joint ScaleData
                         progress=common["progress"])
        opts = {"scale": "joint", "k_filter": None, **kwargs}
        res = seurat_integrate(X, batch, embeddings=emb, **common, **opts)
        adata.obsm[key] = res.corrected
    else:
        raise ScatlasInputError(f"flavor must be 'v3' or 'v5', got {flavor!r}")
    requested = {k: v for k, v in res.params.items() if k != "n_pcs"}  # n_pcs: tl's own
    return {"batches": [str(b) for b in res.batches], "flavor": flavor,
            "merges": {"reference": _joined([res.batches[d] for d in ref] for ref, _ in res.merges),
                       "query": _joined([res.batches[d] for d in q] for _, q in res.merges)},
            "n_anchors": {f"{res.batches[i]}|{res.batches[j]}": len(a)
                          for (i, j), a in res.anchors.items()},
            "anchors": _anchor_table(res, batch),
            "params": {"n_pcs": n_pcs, **_plain(requested), **_plain(kwargs),
                       "effective": _effective_params(res, adata.obsm[key].shape[1]),
                       "adapted": res.adapted}}


def _effective_params(res: Any, n_pcs: int) -> dict[str, Any]:
    """The values actually used (lower than the requested ones where batches are small):
    per pair of batches ``dataset1``, ``dataset2``, ``dims``, ``k_anchor``, ``k_score``,
    ``k_filter`` (0: anchors not filtered); per merge step ``k_weight`` and ``weight_pcs``
    (the weight space's width); ``n_pcs`` of the output embedding."""
    pairs = list(res.anchors.items())
    table: dict[str, Any] = {
        "dataset1": np.array([str(res.batches[i]) for (i, _), _ in pairs], dtype=str),
        "dataset2": np.array([str(res.batches[j]) for (_, j), _ in pairs], dtype=str)}
    for name in ("dims", "k_anchor", "k_score", "k_filter"):
        table[name] = np.array([a.params[name] or 0 for _, a in pairs], dtype=np.int64)
    merges = {name: np.array([m[name] for m in res.merge_params], dtype=np.int64)
              for name in ("k_weight", "weight_pcs")}
    return {"pairs": table, "merges": merges, "n_pcs": int(n_pcs)}


def _anchor_table(res: Any, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Every pair's anchors once (i < j), as ``cell1`` / ``cell2`` cell positions in the
    AnnData, ``score`` and ``dataset1`` / ``dataset2`` batch names (h5ad-writable arrays)."""
    rows = {name: np.flatnonzero(batch == str(name)) for name in res.batches}
    parts: dict[str, list[Any]] = {k: [] for k in ("cell1", "cell2", "score", "dataset1",
                                                    "dataset2")}
    for (i, j), anc in res.anchors.items():
        b1, b2 = str(res.batches[i]), str(res.batches[j])
        c1 = rows[b1][np.asarray(backend.to_host(anc.cell1), dtype=np.int64)]
        parts["cell1"].append(c1)
        parts["cell2"].append(rows[b2][np.asarray(backend.to_host(anc.cell2), dtype=np.int64)])
        parts["score"].append(np.asarray(backend.to_host(anc.score), dtype=np.float64))
        parts["dataset1"].append(np.full(c1.size, b1))
        parts["dataset2"].append(np.full(c1.size, b2))
    return {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}


def _joined(groups: Any) -> np.ndarray:
    """Per merge step, its batches joined by ';' (an h5ad-writable string array)."""
    return np.array([";".join(str(b) for b in g) for g in groups], dtype=str)


def _plain(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Parameters as h5ad-writable values (others as their repr)."""
    out = {}
    for k, v in kwargs.items():
        out[k] = v if isinstance(v, int | float | str | bool) else repr(v)
    return out


def _run_inmf(adata: ad.AnnData, batch_key: str, key: str, **kwargs: Any) -> None:
    from ._inmf import inmf

    inmf(adata, batch_key, key_added=key, **kwargs)
