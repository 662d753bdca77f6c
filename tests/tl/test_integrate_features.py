"""tl.integrate(method="cca") features and parity with Seurat 4.3 (issue 15 item 5)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import scanpy as sc

from scatlas import datasets, pp
from scatlas.tl import integrate

needs_skmisc = pytest.mark.skipif(importlib.util.find_spec("skmisc") is None,
                                  reason="needs scikit-misc (scanpy's vst loess)")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def counts():
    return datasets.synthetic(900, 400, n_cell_types=4, n_batches=3, density=0.3, seed=5)


def _scanpy_hvgs(counts, flavor, n_top):
    """scanpy's batch-aware HVGs computed independently: on the raw counts for the vst flavors,
    on log-normalised data for the dispersion ones."""
    a = counts.copy()
    if flavor not in ("seurat_v3", "seurat_v3_paper"):
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor=flavor, batch_key="batch")
    return set(a.var_names[a.var["highly_variable"]])


@needs_skmisc
@pytest.mark.parametrize("flavor", [None, "seurat_v3", "seurat"])
def test_cca_features_follow_the_flavor_on_the_right_data(counts, flavor):
    """Default (None) = Seurat's vst SelectIntegrationFeatures (pp flavor 'seurat_integration')
    on the counts; 'seurat_v3' also on the counts (it ran on log data before); 'seurat' on log
    data."""
    out = integrate(counts, "batch", method="cca", n_top_genes=150, hvg_flavor=flavor,
                    dims=10, k_score=10, k_weight=40, copy=True)
    if flavor is None:
        ref = counts.copy()
        pp.highly_variable_genes(ref, 150, batch_key="batch", flavor="seurat_integration")
        expected = set(ref.var_names[ref.var["highly_variable"]])
        assert len(expected ^ _scanpy_hvgs(counts, "seurat_v3_paper", 150)) <= 2  # ties only
    else:
        expected = _scanpy_hvgs(counts, flavor, 150)
    assert set(out.uns["cca"]["genes"]) == expected


@needs_skmisc
def test_anchor_table_lists_each_pair_once_in_cell_positions(counts):
    out = integrate(counts, "batch", method="cca", n_top_genes=150, dims=10, k_score=10,
                    k_weight=40, copy=True)
    tab = out.uns["cca"]["anchors"]
    batch = counts.obs["batch"].astype(str).to_numpy()
    assert np.all(batch[tab["cell1"]] == tab["dataset1"])
    assert np.all(batch[tab["cell2"]] == tab["dataset2"])
    assert np.all(tab["dataset1"] < tab["dataset2"]) and np.all((tab["score"] >= 0)
                                                                 & (tab["score"] <= 1))
    n_total = sum(int(v) for v in out.uns["cca"]["n_anchors"].values())
    assert len(tab["cell1"]) == n_total


def _seurat_or_skip():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.peers import seurat

    if not seurat.seurat_available():
        pytest.skip("Rscript with Seurat not installed")
    return seurat


@pytest.mark.slow
@needs_skmisc
@pytest.mark.parametrize("name", ["mesc", "baron_species"])
def test_parity_with_seurat(shared_data, name):
    """Against Seurat 4.3 itself (Rscript), at both sides' defaults on real batches (mESC; Baron
    human vs mouse): the same features, >= 90% of the anchors (unordered cell pairs) shared and
    >= 0.85 mean overlap of each cell's 15 nearest neighbours in the integrated 30-PC embedding
    (``python -m bench.seurat_parity`` has the figures)."""
    seurat = _seurat_or_skip()
    from bench.quality.data import load
    from bench.seurat_parity import anchor_agreement, knn_overlap, pair_set

    adata = load(name, shared_data)
    theirs = seurat.seurat_cca_integrate(adata, "batch")
    assert theirs["embedding"].shape == (adata.n_obs, 30)
    out = integrate(adata, "batch", method="cca", copy=True)
    info = out.uns["cca"]
    assert set(info["genes"]) == set(theirs["features"])
    agree = anchor_agreement(pair_set(info["anchors"]["cell1"], info["anchors"]["cell2"]),
                             pair_set(theirs["anchors"]["cell1"], theirs["anchors"]["cell2"]))
    assert agree["shared"] >= 0.9, agree
    assert knn_overlap(out.obsm["X_cca"], theirs["embedding"]) >= 0.85
