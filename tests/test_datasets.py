"""Synthetic atlas generator: determinism, chunk independence, and the generative model's
invariants (programs recoverable, batch scaling measurable, NB overdispersion, density)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from scatlas import datasets
from scatlas._validate import ScatlasInputError


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    return datasets.synthetic(3000, 600, n_cell_types=5, n_batches=3, seed=7, protein=True,
                              n_proteins=20, atac=True, n_peaks=700)


def same_matrix(a, b) -> bool:
    a, b = sp.csr_matrix(a), sp.csr_matrix(b)
    return a.shape == b.shape and (a != b).nnz == 0


def test_structure(small):
    a = small
    assert a.shape == (3000, 600)
    assert isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.float32
    assert a.X.has_sorted_indices
    assert np.array_equal(a.X.data, np.round(a.X.data)) and a.X.data.min() >= 1
    assert a.var_names[0] == "gene0000" and a.var_names[-1] == "gene0599"
    assert a.obs_names.is_unique and a.obs_names[0] == "cell0000"
    for key, n in (("cell_type", 5), ("batch", 3)):
        assert a.obs[key].dtype == "category" and len(a.obs[key].cat.categories) == n
        assert a.obs[key].nunique() == n
    prot = a.obsm["protein_counts"]
    assert prot.shape == (3000, 20) and (prot.dtypes == np.int32).all()
    assert list(prot.index) == list(a.obs_names) and (prot.to_numpy() >= 0).all()
    atac = a.obsm["atac"]
    assert isinstance(atac, sp.csr_matrix) and atac.shape == (3000, 700)
    assert set(np.unique(atac.data)) == {1.0}
    info = a.uns["synthetic"]
    assert info["seed"] == 7 and info["n_cells"] == 3000 and info["n_programs"] == 10
    assert info["programs"].shape == (10, 600) and (info["programs"] >= 0).all()
    assert info["type_weights"].shape == (5, 10)
    np.testing.assert_allclose(info["type_weights"].sum(1), 1, rtol=1e-5)
    assert info["batch_scale"].shape == (3, 600)


def test_same_seed_identical_whatever_chunking(small):
    kw = dict(n_cell_types=5, n_batches=3, seed=7, protein=True, n_proteins=20, atac=True,
              n_peaks=700)
    other = datasets.synthetic(3000, 600, chunk_size=333, n_jobs=1, **kw)
    assert same_matrix(small.X, other.X)
    assert small.obs.equals(other.obs)
    assert small.obsm["protein_counts"].equals(other.obsm["protein_counts"])
    assert same_matrix(small.obsm["atac"], other.obsm["atac"])
    chunks = list(datasets.iter_synthetic(3000, 600, chunk_size=1100, n_jobs=2, **kw))
    assert [c.n_obs for c in chunks] == [1100, 1100, 800]
    assert chunks[1].obs_names[0] == "cell1100"
    assert same_matrix(small.X, sp.vstack([c.X for c in chunks]))
    assert np.array_equal(
        small.obs["cell_type"].cat.codes, np.concatenate([c.obs["cell_type"].cat.codes
                                                          for c in chunks])
    )
    assert same_matrix(small.obsm["atac"], sp.vstack([c.obsm["atac"] for c in chunks]))


@pytest.mark.parametrize("n_cells, chunk_size", [(5, 2), (1024, 512), (1025, 1), (700, 5000)])
def test_chunk_boundaries(n_cells, chunk_size):
    whole = datasets.synthetic(n_cells, 40, seed=1)
    chunks = list(datasets.iter_synthetic(n_cells, 40, chunk_size=chunk_size, seed=1))
    assert [c.n_obs for c in chunks[:-1]] == [chunk_size] * (len(chunks) - 1)
    assert sum(c.n_obs for c in chunks) == n_cells
    assert same_matrix(whole.X, sp.vstack([c.X for c in chunks]))
    assert list(whole.obs_names) == [n for c in chunks for n in c.obs_names]


def test_seed_changes_data_and_prefix_property():
    a = datasets.synthetic(1300, 300, seed=1)
    b = datasets.synthetic(1300, 300, seed=2)
    assert not same_matrix(a.X, b.X)
    longer = datasets.synthetic(2100, 300, seed=1)
    assert same_matrix(a.X, longer.X[:1300])
    assert np.array_equal(a.obs["batch"].cat.codes, longer.obs["batch"].cat.codes[:1300])


def test_optional_modalities_do_not_change_rna():
    plain = datasets.synthetic(600, 200, seed=3)
    multi = datasets.synthetic(600, 200, seed=3, protein=True, atac=True, n_peaks=300)
    assert same_matrix(plain.X, multi.X)


def _normalised(X) -> np.ndarray:
    X = X.toarray().astype(np.float64)
    return X / X.sum(1, keepdims=True).clip(1)


def _expected_type_profiles(info) -> np.ndarray:
    prof = info["type_weights"].astype(np.float64) @ info["programs"]
    return prof / prof.sum(1, keepdims=True)


def test_cell_types_recover_generating_programs():
    a = datasets.synthetic(4000, 800, n_cell_types=6, batch_effect=0.3, seed=11)
    info = a.uns["synthetic"]
    expected = np.log(_expected_type_profiles(info))
    norm = _normalised(a.X)
    codes = a.obs["cell_type"].cat.codes.to_numpy()
    observed = np.log(np.stack([norm[codes == t].mean(0) for t in range(6)]) + 1e-6)
    expressed = np.exp(expected).mean(0) > 1.0 / 800 / 4  # genes with enough counts
    for t in range(6):
        rho = stats.spearmanr(expected[t, expressed], observed[t, expressed]).statistic
        assert rho > 0.9, (t, rho)
    # type-specific parts (centred across types) match their own type, not another one;
    # on the genes whose expected expression varies most between types
    spread = expected.var(0)
    specific = expressed & (spread > np.quantile(spread[expressed], 0.8))
    ec = expected[:, specific] - expected[:, specific].mean(0)
    oc = observed[:, specific] - observed[:, specific].mean(0)
    corr = np.corrcoef(ec, oc)[:6, 6:]
    assert np.array_equal(corr.argmax(0), np.arange(6))
    assert np.diag(corr).min() > 0.8


def test_batch_scaling_is_measurable():
    def log_ratios(batch_effect: float) -> tuple[np.ndarray, np.ndarray]:
        a = datasets.synthetic(6000, 500, n_cell_types=1, n_batches=2,
                               batch_effect=batch_effect, batch_shift=0.0, seed=5)
        norm = _normalised(a.X)
        b = a.obs["batch"].cat.codes.to_numpy()
        m0, m1 = norm[b == 0].mean(0), norm[b == 1].mean(0)
        ok = (m0 > 2e-3) & (m1 > 2e-3)
        scale = a.uns["synthetic"]["batch_scale"]
        return np.log(m0[ok] / m1[ok]), np.log(scale[0, ok] / scale[1, ok])

    observed, truth = log_ratios(0.5)
    assert np.corrcoef(observed, truth)[0, 1] > 0.9
    # per-batch gene means differ by the generated scaling (up to the normalisation constant)
    np.testing.assert_allclose(observed - np.median(observed - truth), truth, atol=0.35)
    observed0, truth0 = log_ratios(0.0)
    assert np.all(truth0 == 0)
    assert observed0.std() < observed.std() / 3  # without a batch effect the batches agree


def test_negative_binomial_overdispersion():
    # one type, one batch, no per-cell variation: every cell shares the same means
    a = datasets.synthetic(6000, 300, n_cell_types=1, n_batches=1, batch_effect=0.0,
                           library_sd=0.0, cell_variation=0.0, theta=1.5, density=0.3, seed=2)
    X = a.X.toarray().astype(np.float64)
    mean, var = X.mean(0), X.var(0, ddof=1)
    ok = mean > 1.0
    assert ok.sum() > 30
    assert np.all(var[ok] > mean[ok])
    inv_theta_hat = (var[ok] - mean[ok]) / mean[ok] ** 2
    inv_theta = 1.0 / a.uns["synthetic"]["gene_theta"][ok]
    assert np.corrcoef(inv_theta_hat, inv_theta)[0, 1] > 0.8
    assert np.median(inv_theta_hat / inv_theta) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("mu", [0.05, 0.8, 3.0, 12.0, 60.0])
@pytest.mark.parametrize("theta", [0.5, 4.0])
def test_nb_sampler_matches_scipy(mu, theta):
    """Both paths of the sampler (inversion below 6, gamma-Poisson above) against scipy's NB."""
    n = 200_000
    rng = np.random.default_rng(0)
    means = np.full((n // 100, 100), mu, dtype=np.float32)
    counts = datasets._sample_nb_csr(rng, means, np.full(100, theta, np.float32)).toarray()
    counts = counts.ravel().astype(np.int64)
    ref = stats.nbinom(theta, theta / (theta + mu))
    kmax = int(ref.ppf(0.999))
    observed = np.bincount(np.minimum(counts, kmax + 1), minlength=kmax + 2)
    expected = np.append(ref.pmf(np.arange(kmax + 1)), ref.sf(kmax)) * n
    keep = expected > 20
    chi2 = (((observed - expected) ** 2 / expected)[keep]).sum()
    assert stats.chi2(keep.sum() - 1).sf(chi2) > 1e-4, (chi2, keep.sum())
    assert counts.mean() == pytest.approx(mu, rel=0.03)


@pytest.mark.parametrize("density", [0.05, 0.15])
def test_density_as_requested(density):
    a = datasets.synthetic(2000, 1000, density=density, seed=4)
    achieved = a.X.nnz / np.prod(a.shape)
    assert achieved == pytest.approx(density, abs=0.01)
    assert a.uns["synthetic"]["achieved_density"] == pytest.approx(achieved)


def test_fixed_library_size():
    a = datasets.synthetic(3000, 500, density=None, library_size=2000, batch_effect=0.0,
                           seed=9)
    assert float(a.X.sum(1).mean()) == pytest.approx(2000, rel=0.05)


def test_modalities_follow_the_latent(small):
    codes = small.obs["cell_type"].cat.codes.to_numpy()
    # proteins: per-type mean profiles differ between types far more than within (F-test)
    prot = small.obsm["protein_counts"].to_numpy().astype(np.float64)
    logp = np.log1p(prot / prot.sum(1, keepdims=True) * 1e3)
    f_prot = stats.f_oneway(*[logp[codes == t] for t in range(5)]).statistic
    assert np.median(f_prot) > 20
    atac = small.obsm["atac"]
    assert atac.nnz / np.prod(atac.shape) == pytest.approx(0.05, abs=0.01)
    open_frac = np.stack([np.asarray(atac[codes == t].mean(0)).ravel() for t in range(5)])
    truth = small.uns["synthetic"]["type_weights"] @ small.uns["synthetic"]["atac_model"][
        "loadings"]
    for t in range(5):
        assert stats.spearmanr(open_frac[t], truth[t]).statistic > 0.6


def test_write_synthetic_h5ad_roundtrip(tmp_path, small):
    kw = dict(n_cell_types=5, n_batches=3, seed=7, protein=True, n_proteins=20, atac=True,
              n_peaks=700)
    path = datasets.write_synthetic_h5ad(tmp_path / "syn.h5ad", 3000, 600, chunk_size=900, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.h5ad"]
    back = ad.read_h5ad(path, backed="r")
    assert back.shape == (3000, 600)
    assert same_matrix(back.X[1000:2000], small.X[1000:2000])
    back = ad.read_h5ad(path)
    assert same_matrix(back.X, small.X)
    assert back.obs.equals(small.obs)
    assert back.obsm["protein_counts"].equals(small.obsm["protein_counts"])
    assert same_matrix(back.obsm["atac"], small.obsm["atac"])
    np.testing.assert_array_equal(back.uns["synthetic"]["programs"],
                                  small.uns["synthetic"]["programs"])
    assert back.uns["synthetic"]["achieved_density"] == pytest.approx(
        small.uns["synthetic"]["achieved_density"])


def test_interrupted_synthetic_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "atlas.h5ad"
    target.write_bytes(b"previous contents")
    calls = {"n": 0}
    original = datasets._H5adWriter.append

    def failing_append(self, start, block):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full (simulated)")
        return original(self, start, block)

    monkeypatch.setattr(datasets._H5adWriter, "append", failing_append)
    with pytest.raises(RuntimeError, match="simulated"):
        datasets.write_synthetic_h5ad(target, 2000, 100, chunk_size=600)
    assert target.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["atlas.h5ad"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_genes=0),
        dict(n_cell_types=0),
        dict(density=1.5),
        dict(density=None),
        dict(library_size=100.0),
        dict(theta=-1.0),
        dict(batch_effect=-0.1),
        dict(seed=-3),
        dict(n_cells=0),
        dict(chunk_size=0),
    ],
)
def test_invalid_parameters(kwargs):
    args = dict(n_cells=10, n_genes=20)
    args.update(kwargs)
    with pytest.raises(ScatlasInputError):
        datasets.synthetic(**args)


def test_unknown_parameter():
    with pytest.raises(TypeError, match="bogus"):
        datasets.iter_synthetic(10, 20, bogus=1)  # raised eagerly, before iterating


@pytest.mark.slow
def test_large_generation_streams(tmp_path):
    """1e5 cells x 2000 genes streamed to disk, compared chunk by chunk with the generator."""
    from scatlas import io

    path = datasets.write_synthetic_h5ad(tmp_path / "big.h5ad", 100_000, 2000, chunk_size=25_000)
    gen = datasets.iter_synthetic(100_000, 2000, chunk_size=30_000)
    disk = io.iter_chunks(path, chunk_size=30_000)
    for chunk, (start, _, X) in zip(gen, disk, strict=True):
        assert chunk.obs_names[0] == f"cell{start:05d}"
        assert same_matrix(chunk.X, X)
    info = ad.read_h5ad(path, backed="r").uns["synthetic"]
    assert info["achieved_density"] == pytest.approx(0.1, abs=0.01)
