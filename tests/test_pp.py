"""Preprocessing wrappers: hand-checked normalisation, HVG through scanpy, boundary errors."""

from __future__ import annotations

import importlib.util

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from scatlas import backend, datasets, pp
from scatlas._validate import ScatlasInputError


@pytest.fixture(scope="module")
def counts() -> ad.AnnData:
    return datasets.synthetic(1200, 300, n_cell_types=4, n_batches=3, density=0.3, seed=21)


def hand_log1p(X, target_sum=1e4) -> np.ndarray:
    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    return np.log1p(X / X.sum(1, keepdims=True) * target_sum)


# ---------------------------------------------------------------------------- normalize_log1p


@pytest.mark.parametrize("kind", ["csr", "dense", "int"])
def test_normalize_log1p_matches_hand_computation(counts, kind):
    X = counts.X.copy()  # scanpy normalises in place: never hand it the fixture's matrix
    if kind == "dense":
        X = X.toarray()
    elif kind == "int":
        X = X.astype(np.int32)
    a = ad.AnnData(X)
    assert pp.normalize_log1p(a) is None
    assert a.X.dtype == np.float32
    out = a.X.toarray() if sp.issparse(a.X) else a.X
    np.testing.assert_allclose(out, hand_log1p(counts.X), rtol=1e-5, atol=1e-5)


def test_normalize_log1p_layer_copy_and_target_sum(counts):
    a = counts.copy()
    a.layers["raw"] = a.X.copy()
    b = pp.normalize_log1p(a, target_sum=100.0, layer="raw", copy=True)
    assert (a.layers["raw"] != counts.X).nnz == 0  # original untouched
    np.testing.assert_allclose(b.layers["raw"].toarray(), hand_log1p(counts.X, 100.0),
                               rtol=1e-5, atol=1e-5)
    assert (b.X != counts.X).nnz == 0  # X untouched when a layer is given


def test_normalize_log1p_real_mesc(mesc):
    a = mesc.copy()
    pp.normalize_log1p(a)
    np.testing.assert_allclose(a.X.toarray(), hand_log1p(mesc.X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.array([[1.0, np.nan], [2.0, 3.0]]), "NaN"),
        (np.array([[1.0, np.inf], [2.0, 3.0]]), "NaN or infinite"),
        (np.array([[1.0, -1.0], [2.0, 3.0]]), "negative"),
        (np.zeros((0, 3)), "empty"),
        (sp.csr_matrix(np.array([[1.0, -2.0], [0.0, 3.0]])), "negative"),
    ],
)
def test_bad_counts_rejected(bad, match):
    with pytest.raises(ScatlasInputError, match=match):
        pp.normalize_log1p(ad.AnnData(bad))
    with pytest.raises(ScatlasInputError, match=match):
        pp.highly_variable_genes(ad.AnnData(bad), n_top_genes=1)


def test_missing_layer_and_bad_target_sum(counts):
    with pytest.raises(ScatlasInputError, match="layer 'nope'"):
        pp.normalize_log1p(counts.copy(), layer="nope")
    with pytest.raises(ScatlasInputError, match="target_sum"):
        pp.normalize_log1p(counts.copy(), target_sum=-1)


def test_gpu_request_without_gpu(counts):
    if backend.gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(backend.DeviceUnavailableError):
        pp.normalize_log1p(counts.copy(), device="gpu")


@pytest.mark.gpu
def test_gpu_matches_cpu(counts):
    cpu = counts.copy()
    pp.normalize_log1p(cpu)
    gpu = counts.copy()
    pp.normalize_log1p(gpu, device="gpu")
    assert not backend.is_gpu_array(gpu.X)  # result comes back as the caller's kind
    np.testing.assert_allclose(gpu.X.toarray(), cpu.X.toarray(), rtol=1e-5, atol=1e-5)
    pp.highly_variable_genes(gpu, n_top_genes=50, device="gpu")
    assert gpu.var["highly_variable"].sum() == 50


# ----------------------------------------------------------------------- highly_variable_genes


@pytest.fixture(scope="module")
def lognorm(counts) -> ad.AnnData:
    a = counts.copy()
    pp.normalize_log1p(a)
    return a


def program_gene_enrichment(a: ad.AnnData) -> float:
    """P(program gene | HVG) / P(program gene | not HVG), program genes from the ground truth."""
    info = a.uns["synthetic"]
    prof = info["type_weights"] @ info["programs"]
    spread = np.log(prof / prof.sum(1, keepdims=True)).std(0)  # variation across cell types
    program = spread > 2 * np.median(spread)
    hv = a.var["highly_variable"].to_numpy()
    return program[hv].mean() / program[~hv].mean()


def test_hvg_is_scanpy_and_finds_program_genes(lognorm):
    a = lognorm.copy()
    pp.highly_variable_genes(a, n_top_genes=60)
    ref = lognorm.copy()
    sc.pp.highly_variable_genes(ref, n_top_genes=60, flavor="seurat")
    assert a.var["highly_variable"].sum() == 60
    pd.testing.assert_frame_equal(a.var, ref.var)
    assert program_gene_enrichment(a) > 1.5


def test_hvg_batch_key(lognorm):
    a = lognorm.copy()
    pp.highly_variable_genes(a, n_top_genes=60, batch_key="batch")
    assert a.var["highly_variable"].sum() == 60
    assert a.var["highly_variable_nbatches"].max() <= 3
    assert program_gene_enrichment(a) > 1.8


def test_hvg_batch_errors(lognorm):
    a = lognorm.copy()
    with pytest.raises(ScatlasInputError, match="'donor' is not a column"):
        pp.highly_variable_genes(a, n_top_genes=50, batch_key="donor")
    a.obs["batch"] = a.obs["batch"].cat.add_categories(["batch_empty"])
    with pytest.raises(ScatlasInputError, match=r"\['batch_empty'\].*zero cells"):
        pp.highly_variable_genes(a, n_top_genes=50, batch_key="batch")
    b = lognorm.copy()
    b.obs["batch"] = b.obs["batch"].astype(object)
    b.obs.iloc[:3, b.obs.columns.get_loc("batch")] = np.nan
    with pytest.raises(ScatlasInputError, match="3 cell"):
        pp.highly_variable_genes(b, n_top_genes=50, batch_key="batch")
    c = lognorm.copy()
    in_batch0 = (c.obs["batch"] == "batch0").to_numpy()
    X = c.X.toarray()
    X[in_batch0] = 0
    c.X = sp.csr_matrix(X)
    with pytest.raises(ScatlasInputError, match=r"\['batch0'\].*no data"):
        pp.highly_variable_genes(c, n_top_genes=50, batch_key="batch")


def test_hvg_flavor_and_size_checks(counts, lognorm):
    with pytest.raises(ScatlasInputError, match="flavor"):
        pp.highly_variable_genes(lognorm.copy(), flavor="magic")
    with pytest.warns(UserWarning, match="raw integer counts"):
        pp.highly_variable_genes(counts.copy(), n_top_genes=20)
    a = lognorm.copy()
    with pytest.warns(UserWarning, match="exceeds the number of genes"):
        pp.highly_variable_genes(a, n_top_genes=10_000)
    expressed = a.var["dispersions_norm"].notna()  # all-zero genes have no dispersion
    assert expressed.sum() > 250 and a.var["highly_variable"][expressed].all()


@pytest.mark.skipif(importlib.util.find_spec("skmisc") is not None, reason="skmisc installed")
def test_seurat_v3_needs_skmisc(counts):
    with pytest.raises(ImportError, match="scikit-misc"):
        pp.highly_variable_genes(counts.copy(), n_top_genes=50, flavor="seurat_v3")


@pytest.mark.skipif(importlib.util.find_spec("skmisc") is None, reason="needs scikit-misc")
def test_seurat_v3_on_counts(counts):
    a = counts.copy()
    pp.highly_variable_genes(a, n_top_genes=40, flavor="seurat_v3")
    assert a.var["highly_variable"].sum() == 40


def test_hvg_real_mesc_batches(mesc):
    a = mesc.copy()
    pp.normalize_log1p(a)
    pp.highly_variable_genes(a, n_top_genes=200, batch_key="batch")
    assert a.var["highly_variable"].sum() == 200


@pytest.mark.skipif(importlib.util.find_spec("skmisc") is None, reason="needs scikit-misc")
def test_count_flavor_on_log_data_warns(lognorm):
    """seurat_v3 models counts: handing it log-normalised values is flagged, not silently run."""
    with pytest.warns(UserWarning, match="non-integer"):
        pp.highly_variable_genes(lognorm.copy(), n_top_genes=40, flavor="seurat_v3")


@pytest.mark.skipif(importlib.util.find_spec("skmisc") is None, reason="needs scikit-misc")
def test_seurat_integration_is_select_integration_features(counts):
    """flavor='seurat_integration' with a batch key is Seurat's SelectIntegrationFeatures: per
    batch vst top-n lists (loess of log10 variance on log10 mean, span 0.3, values clipped at
    sqrt(n), standardised variance; equal values in gene order), genes ranked by how many
    batches list them, then the median rank within the lists that hold them, then name.
    Checked against that rule written out here on scanpy's per-batch vst (a single-batch call
    per batch); scanpy's batch-aware 'seurat_v3_paper' ranks alike except for exact ties."""
    n_top = 60
    a = counts.copy()
    pp.highly_variable_genes(a, n_top_genes=n_top, flavor="seurat_integration",
                             batch_key="batch")
    lists = []
    for b in sorted(a.obs["batch"].unique()):
        sub = counts[counts.obs["batch"] == b].copy()
        sc.pp.highly_variable_genes(sub, n_top_genes=n_top, flavor="seurat_v3")
        order = np.argsort(-sub.var["variances_norm"].to_numpy(), kind="stable")
        lists.append(list(sub.var_names[order[:n_top]]))
    count = pd.Series([g for lst in lists for g in lst]).value_counts()
    median = {g: np.median([lst.index(g) + 1 for lst in lists if g in lst])
              for g in count.index}
    ranked = sorted(count.index, key=lambda g: (-count[g], median[g], g))
    assert set(a.var_names[a.var["highly_variable"]]) == set(ranked[:n_top])
    got = a.var.loc[list(count.index)]
    np.testing.assert_array_equal(got["highly_variable_nbatches"], count.to_numpy())
    np.testing.assert_array_equal(got["highly_variable_rank"], [median[g] for g in count.index])
    b = counts.copy()
    pp.highly_variable_genes(b, n_top_genes=n_top, flavor="seurat_v3_paper", batch_key="batch")
    assert (b.var["highly_variable"] != a.var["highly_variable"]).sum() <= 2  # exact ties


@pytest.mark.skipif(importlib.util.find_spec("skmisc") is None, reason="needs scikit-misc")
def test_seurat_integration_orders_equal_variances_by_gene_position():
    """Two genes with identical counts have equal standardised variance; R's stable order
    lists the earlier one first, so with room for one of them only it is kept."""
    rng = np.random.default_rng(0)
    X = rng.poisson(1.0, size=(200, 30)).astype(np.float32)
    X[:, 7] = 0
    X[:, 3] = 0
    X[:5, 7] = X[:5, 3] = 40  # genes 3 and 7: the most variable, and tied
    a = ad.AnnData(X=sp.csr_matrix(X))
    a.var_names = [f"g{i:02d}" for i in range(30)]
    pp.highly_variable_genes(a, n_top_genes=1, flavor="seurat_integration")
    assert list(a.var_names[a.var["highly_variable"]]) == ["g03"]


@pytest.mark.gpu
def test_seurat_integration_gpu_matches_cpu(counts):
    """The GPU path (rapids-singlecell's per-batch vst, or scanpy on a host copy when it is not
    installed) selects the same genes as the CPU path."""
    cpu = counts.copy()
    pp.highly_variable_genes(cpu, 60, batch_key="batch", flavor="seurat_integration")
    gpu = counts.copy()
    gpu.X = backend.to_device(gpu.X, "gpu")
    pp.highly_variable_genes(gpu, 60, batch_key="batch", flavor="seurat_integration")
    assert set(gpu.var_names[gpu.var["highly_variable"]]) == set(
        cpu.var_names[cpu.var["highly_variable"]])


@pytest.mark.skipif(importlib.util.find_spec("skmisc") is None, reason="needs scikit-misc")
def test_loess_direct_equals_scikit_misc_direct_surface():
    from skmisc.loess import loess

    rng = np.random.default_rng(0)
    x = rng.normal(size=1500)
    y = np.sin(x) + 0.3 * rng.normal(size=1500)
    ref = loess(x, y, span=0.3, degree=2, surface="direct")
    ref.fit()
    np.testing.assert_allclose(pp.loess_direct(x, y, 0.3), ref.outputs.fitted_values,
                               rtol=0, atol=1e-10)


@pytest.mark.skipif(importlib.util.find_spec("skmisc") is None, reason="needs scikit-misc")
def test_vst_fallback_agrees_with_scanpy_where_loess_works(mesc):
    """The direct-loess vst ranks genes as scanpy's (interpolated-surface) vst does."""
    sub = mesc[mesc.obs["batch"] == mesc.obs["batch"].iloc[0]].copy()
    sub.X = sub.X.astype(np.float32)
    v = pp.vst_standardized_variance(sub.X)
    sc.pp.highly_variable_genes(sub, n_top_genes=300, flavor="seurat_v3")
    top = set(np.argsort(-v, kind="stable")[:300])
    assert len(top & set(np.flatnonzero(sub.var["highly_variable"].to_numpy()))) >= 0.97 * 300


@pytest.mark.skipif(importlib.util.find_spec("skmisc") is None, reason="needs scikit-misc")
def test_seurat_integration_on_small_batches(shared_data):
    """Baron donors of 23-58 cells: scikit-misc's loess stops on near-singular local fits
    (R's loess warns and goes on); the flavor fits those batches' trends directly, says so,
    and still selects n_top_genes genes."""
    import anndata

    from tests.conftest import dataset_path

    raw = anndata.read_h5ad(dataset_path(shared_data, "baron_pancreas_human_mouse_cider.h5ad"))
    a = anndata.AnnData(X=sp.csr_matrix(raw.X, dtype=np.float32),
                        obs=raw.obs[["donor"]].astype(str))
    a.var_names = raw.var_names
    a.var_names_make_unique()
    with pytest.warns(UserWarning, match="human4 .23 cells"):
        pp.highly_variable_genes(a, 1000, batch_key="donor", flavor="seurat_integration")
    assert a.var["highly_variable"].sum() == 1000


@pytest.mark.parametrize("sparse", [False, True])
def test_scale_per_batch_equals_seurat_scaledata_by_hand(sparse):
    """pp.scale(batch_key=) = per batch: (x - mean) / sd (n - 1), clipped above at 10, zero-sd
    genes 0 — computed here in float64 NumPy, independently of kernels.scale_data."""
    rng = np.random.default_rng(0)
    X = rng.poisson(0.7, (190, 12)).astype(np.float64)
    X[:, 3] = 2.0  # constant gene
    X[5, 4] = 300.0  # an outlier that clips (z up to (n - 1) / sqrt(n) = 12.2 in batch a)
    batch = np.array(["a"] * 150 + ["b"] * 40)
    adata = ad.AnnData(sp.csr_matrix(X) if sparse else X.copy(),
                       obs=pd.DataFrame({"batch": batch}, index=[f"c{i}" for i in range(190)]))
    pp.scale(adata, batch_key="batch")
    want = np.empty_like(X)
    for b in ("a", "b"):
        rows = batch == b
        mean, sd = X[rows].mean(0), X[rows].std(0, ddof=1)
        z = np.divide(X[rows] - mean, sd, out=np.zeros_like(X[rows]), where=sd > 0)
        want[rows] = np.minimum(z, 10.0)
    assert adata.X.dtype == np.float32 and not sp.issparse(adata.X)
    np.testing.assert_allclose(adata.X, want, rtol=1e-5, atol=1e-5)
    assert adata.X[5, 4] == pytest.approx(10.0)
    whole = pp.scale(ad.AnnData(X.copy()), clip=None, copy=True)
    np.testing.assert_allclose(whole.X, (X - X.mean(0)) / np.where(X.std(0, ddof=1) > 0,
                               X.std(0, ddof=1), 1) * (X.std(0, ddof=1) > 0), rtol=1e-5,
                               atol=1e-5)


def test_scale_errors_name_the_problem():
    adata = ad.AnnData(np.ones((3, 2)), obs=pd.DataFrame({"b": ["x", "x", "y"]},
                                                         index=["a", "b", "c"]))
    with pytest.raises(ScatlasInputError, match="at least 2 cells per batch.*'y'"):
        pp.scale(adata, batch_key="b")
    with pytest.raises(ScatlasInputError, match="nope"):
        pp.scale(adata, batch_key="nope")
    with pytest.raises(ScatlasInputError, match="clip"):
        pp.scale(adata, clip=-1)
