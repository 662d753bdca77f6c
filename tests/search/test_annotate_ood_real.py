"""The out-of-distribution flag on real held-out cells (../shared/data; skipped without it).

CellBench, leave the H838 line out: the reference is three batches without H838, the
calibration cells a fourth batch (``sc_celseq2_5cl_p2``) without H838, the queries the fifth
(``sc_celseq2_5cl_p1``: H838 cells are the unseen type). One split of ``bench/annotate_ood.py``,
whose JSON has every split pooled (bench/results/annotate_ood_cpu.json, docs/search.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scatlas.search import CellIndex, annotate

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CELLBENCH = DATA / "cellbench_lung_celllines_5batch.h5ad"
pytestmark = pytest.mark.skipif(not CELLBENCH.exists(), reason="../shared/data is absent")

QUERY, CALIB, LEFT_OUT = "sc_celseq2_5cl_p1", "sc_celseq2_5cl_p2", "H838"


@pytest.fixture(scope="module")
def cellbench():
    import anndata as ad

    a = ad.read_h5ad(CELLBENCH)
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    b = a.obs["batch"].astype(str).to_numpy()
    y = a.obs["cell_line"].astype(str).to_numpy()
    masks = {"ref": (b != QUERY) & (b != CALIB) & (y != LEFT_OUT),
             "cal": (b == CALIB) & (y != LEFT_OUT), "query": b == QUERY}
    return a, y, masks


def test_pca_index_distances_flag_nothing_calibration_flags_the_unseen_line(cellbench):
    """PCA fitted on the reference cells (2,000 most variable log-normalised genes, 50 PCs):
    the index's own 1-NN distances are inflated (each indexed cell keeps its noise in the
    components fitted to it), so their 0.99 quantile flags no query at all, not even the
    unseen line; calibrated on the held-out batch, the flag takes most H838 cells and few
    others (measured: 25 of 32 and 2 of 124)."""
    from scatlas.models.data import lognorm

    a, y, m = cellbench
    L = lognorm(a.X, dense=False)
    Lr = L[m["ref"]]
    mean = np.asarray(Lr.mean(axis=0)).ravel()
    var = np.asarray(Lr.multiply(Lr).mean(axis=0)).ravel() - mean**2
    genes = np.argsort(-var)[:2000]

    def centred(mask):
        return L[mask][:, genes].toarray() - mean[genes]

    W = np.linalg.svd(centred(m["ref"]), full_matrices=False)[2][:50].T

    def emb(mask):
        return (centred(mask) @ W).astype(np.float32)

    idx = CellIndex.build(emb(m["ref"]), pd.DataFrame({"line": y[m["ref"]]}))
    Q = emb(m["query"])
    unseen = y[m["query"]] == LEFT_OUT
    before = annotate(idx, Q, 50, label_key="line")
    own = idx.search(emb(m["ref"]), 2)[0][:, 1]
    assert np.median(own) > np.median(before["min_dist"][~unseen])  # in-sample inflation
    assert before.attrs["ood_source"] == "index"
    assert before["is_ood"].sum() == 0
    idx.calibrate_ood(emb(m["cal"]), labels=y[m["cal"]], label_key="line")
    after = annotate(idx, Q, 50, label_key="line")
    assert after.attrs["ood_source"] == "calibration"
    assert after["is_ood"][unseen].mean() >= 0.6
    assert after["is_ood"][~unseen].mean() <= 0.05
    assert (after["label"][~unseen] == y[m["query"]][~unseen]).mean() > 0.95


@pytest.mark.slow
def test_metric_encoder_calibrated_flag_on_an_unseen_line(cellbench):
    """The README's path: a metric encoder trained on the reference cells at its defaults
    (bench/results/annotate_ood_cpu.json, this split, whose unseen cells also include the H838
    cells of the other batches: the index-only rule flagged 0 of 124 seen and 140 of 146 unseen
    cells; calibrated, 1 of 124 and 146 of 146)."""
    import warnings

    import scatlas

    a, y, m = cellbench
    ref = a[m["ref"]].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scatlas.tl.train_metric(ref, "cell_line", "batch", seed=0, progress=False)
    idx = CellIndex.build(model.embed(ref, progress=False), ref.obs[["cell_line"]])
    cal = a[m["cal"]]
    idx.calibrate_ood(model.embed(cal, progress=False), labels=cal.obs["cell_line"],
                      label_key="cell_line")
    out = annotate(idx, model.embed(a[m["query"]], progress=False), 50, label_key="cell_line")
    unseen = y[m["query"]] == LEFT_OUT
    assert out["is_ood"][unseen].mean() >= 0.8
    assert out["is_ood"][~unseen].mean() <= 0.05
