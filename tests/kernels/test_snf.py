"""Similarity network fusion (scatlas.kernels.snf, scatlas.tl.snf).

Reference: snfpy 0.2.2, run in its own venv (bench/.peers/snfpy, with scikit-learn < 1.6:
snfpy calls ``check_array(force_all_finite=...)``, which scikit-learn 1.8 removed) through a
subprocess on the same inputs; those tests skip when the venv is absent. Install it with::

    python -m venv bench/.peers/snfpy
    bench/.peers/snfpy/bin/pip install snfpy==0.2.2 "scikit-learn<1.6" numpy scipy
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from scatlas import backend, tl
from scatlas.exceptions import ScatlasInputError
from scatlas.kernels import affinity, knn, snf, spectral_clusters
from tests.helpers import fake_gpu

SNFPY = Path(__file__).resolve().parents[2] / "bench" / ".peers" / "snfpy" / "bin" / "python"

_PEER = """
import json, sys
import numpy as np, snf
x1, x2, out = np.load(sys.argv[1]), np.load(sys.argv[2]), sys.argv[3]
res = {}
for name, kw, t in (("default", {}, 20), ("k10_mu08_t5", {"K": 10, "mu": 0.8}, 5),
                    ("euclidean", {"metric": "euclidean"}, 20),
                    ("cosine", {"metric": "cosine"}, 20)):
    aff = snf.make_affinity(x1, x2, **kw)
    fused = snf.snf(*aff, K=kw.get("K", 20), t=t)
    np.save(f"{out}/{name}_a0.npy", aff[0])
    np.save(f"{out}/{name}_fused.npy", fused)
    res[name] = [int(c) for c in snf.get_n_clusters(fused, range(2, 8))]
print(json.dumps(res))
"""
CASES = {"default": ({}, 20), "k10_mu08_t5": ({"K": 10, "mu": 0.8}, 5),
         "euclidean": ({"metric": "euclidean"}, 20), "cosine": ({"metric": "cosine"}, 20)}


def views(n: int = 160, seed: int = 0, groups: int = 4, spread: float = 1.2):
    """Two views of ``n`` cells in planted groups (continuous values: no distance ties)."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, groups, n)
    x1 = rng.normal(size=(n, 12)) + spread * rng.normal(size=(groups, 12))[g]
    x2 = rng.normal(size=(n, 7)) + spread * rng.normal(size=(groups, 7))[g]
    return x1, x2, g


def rel(a, b) -> float:
    a = a.toarray() if sp.issparse(a) else np.asarray(a)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def snfpy_ref(tmp_path_factory):
    if not SNFPY.exists():
        pytest.skip(f"snfpy venv absent ({SNFPY})")
    tmp = tmp_path_factory.mktemp("snfpy")
    x1, x2, _ = views()
    np.save(tmp / "x1.npy", x1)
    np.save(tmp / "x2.npy", x2)
    proc = subprocess.run([str(SNFPY), "-c", _PEER, str(tmp / "x1.npy"), str(tmp / "x2.npy"),
                           str(tmp)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return tmp, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_equals_snfpy(snfpy_ref, case):
    tmp, counts = snfpy_ref
    kw, t = CASES[case]
    x1, x2, _ = views()
    a0, fused = np.load(tmp / f"{case}_a0.npy"), np.load(tmp / f"{case}_fused.npy")
    assert rel(affinity(x1, **kw), a0) < 1e-6
    F = snf([x1, x2], t=t, **kw)
    assert rel(F, fused) < 1e-6
    # the sparse route with every pair in its support is the same computation
    Fs = snf([x1, x2], t=t, sparse=True, n_support=x1.shape[0] - 1, **kw)
    assert sp.issparse(Fs) and rel(Fs, fused) < 1e-6
    # the eigengap's two best counts, as snfpy's get_n_clusters
    res = spectral_clusters(F, n_range=range(2, 8))
    assert list(res.eigengap_best) == counts[case]


def test_fused_properties_without_snfpy():
    x1, x2, g = views(200, seed=1)
    F = snf([x1, x2])
    assert F.shape == (200, 200) and F.dtype == np.float64
    np.testing.assert_allclose(F, F.T, rtol=0, atol=1e-15)
    # float32 computes the same network to float32 rounding
    F32 = snf([x1, x2], dtype=np.float32)
    assert F32.dtype == np.float32 and rel(F32, F) < 1e-4
    # fusion recovers the planted groups at least as well as either view alone
    fused = adjusted_rand_score(g, spectral_clusters(F, 4).labels)
    single = [adjusted_rand_score(g, spectral_clusters(affinity(x), 4).labels)
              for x in (x1, x2)]
    assert fused >= max(single) - 0.02, (fused, single)


def test_sparse_route_is_bounded_and_close():
    x1, x2, g = views(300, seed=2, groups=5, spread=0.9)
    dense = snf([x1, x2])
    auto = snf([x1, x2], max_dense_bytes=0)  # the budget forces the sparse route
    assert sp.issparse(auto) and auto.nnz < 0.4 * 300**2
    # the support holds every cell's 40 nearest neighbours (z-scored features) of each view
    for x in (x1, x2):
        _, nn = knn((x - x.mean(0)) / x.std(0, ddof=1), None, 40, exclude_self=True)
        assert all(set(nn[i]) <= set(auto.indices[auto.indptr[i]:auto.indptr[i + 1]])
                   for i in range(0, 300, 37))
    ari_d = adjusted_rand_score(g, spectral_clusters(dense, 5).labels)
    ari_s = adjusted_rand_score(g, spectral_clusters(auto, 5).labels)
    assert ari_s >= ari_d - 0.05, (ari_s, ari_d)


@pytest.fixture
def gpu(monkeypatch):
    return fake_gpu.install(monkeypatch)


@pytest.mark.parametrize("sparse", [False, True])
def test_fake_gpu_matches_cpu(gpu, sparse):
    x1, x2, _ = views(150, seed=3)
    cpu = snf([x1, x2], sparse=sparse)
    dev = snf([fake_gpu.to_fake_gpu(x1), fake_gpu.to_fake_gpu(x2)], sparse=sparse)
    assert backend.is_gpu_array(dev)
    assert rel(backend.to_host(dev), cpu.toarray() if sparse else cpu) < 1e-12
    labels = spectral_clusters(dev, 4)
    assert backend.is_gpu_array(labels.labels)
    np.testing.assert_array_equal(backend.to_host(labels.labels),
                                  spectral_clusters(cpu, 4).labels)
    # device= moves host views there and the result back
    moved = snf([x1, x2], sparse=sparse, device="gpu")
    assert not backend.is_gpu_array(moved) and rel(moved, cpu.toarray() if sparse else cpu) < 1e-12


def test_bad_input_names_the_parameter():
    x1, x2, _ = views(50)
    cases = [
        (lambda: snf([x1, x2[:40]]), "views", "40 cells"),
        (lambda: snf([x1]), "views", "at least 2"),
        (lambda: snf(x1), "views", "list"),
        (lambda: snf([x1, x2], K=50), "K", "K=50"),
        (lambda: snf([x1, x2], K=0), "K", ">= 1"),
        (lambda: snf([x1, x2], mu=0), "mu", "positive"),
        (lambda: snf([x1, x2], t=-1), "t", ">= 0"),
        (lambda: snf([x1, x2], metric="manhattan"), "metric", "sqeuclidean"),
        (lambda: snf([x1, x2], sparse=True, n_support=5), "n_support", "at least K"),
        (lambda: affinity(np.where(np.eye(50, 12) > 0, np.nan, x1)), "X", "NaN"),
        (lambda: spectral_clusters(np.eye(5), n_range=range(2, 9)), "n_range", "n - 1"),
    ]
    bad = x2.copy()
    bad[3, 1] = np.inf
    cases.append((lambda: snf([x1, bad]), "views", r"views\[1\] contains 1 NaN or infinite"))
    for call, param, text in cases:
        with pytest.raises(ScatlasInputError, match=text) as err:
            call()
        assert err.value.param == param, (param, err.value)


def test_tl_snf_anndata_and_mudata():
    x1, x2, g = views(120, seed=4)
    adata = ad.AnnData(np.zeros((120, 2), dtype=np.float32))
    adata.obsm["X_pca"] = x1
    adata.obsm["protein"] = pd.DataFrame(x2, index=adata.obs_names)
    tl.snf(adata, ["X_pca", "protein"], n_clusters=4)
    assert adata.obsp["snf_connectivities"].shape == (120, 120)
    assert list(adata.obs["snf_cluster"].cat.categories) == ["0", "1", "2", "3"]
    assert adata.uns["snf"]["route"] == "dense" and adata.uns["snf"]["n_clusters"] == 4
    assert adjusted_rand_score(g, adata.obs["snf_cluster"]) > 0.8
    np.testing.assert_allclose(adata.obsp["snf_connectivities"], snf([x1, x2]))
    with pytest.raises(ScatlasInputError, match="not in adata.obsm") as err:
        tl.snf(adata, ["X_pca", "missing"])
    assert err.value.param == "obsm_keys"

    md = pytest.importorskip("mudata")
    mdata = md.MuData({"rna": ad.AnnData(x1), "prot": ad.AnnData(x2)})
    out = tl.snf(mdata, key_added="fused", copy=True)
    assert out.uns["fused"]["views"] == ["rna:X", "prot:X"]
    np.testing.assert_allclose(out.obsp["fused_connectivities"], snf([x1, x2]))
    with pytest.raises(ScatlasInputError, match="modalities") as err:
        tl.snf(mdata, {"atac": "X"})
    assert err.value.param == "obsm_keys"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_cli_snf_equals_the_library(tmp_path, capsys):
    from scatlas.cli import main

    x1, x2, _ = views(100, seed=5)
    adata = ad.AnnData(np.zeros((100, 2), dtype=np.float32))
    adata.obsm["A"], adata.obsm["B"] = x1, x2
    src, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    adata.write_h5ad(src)
    assert main(["snf", str(src), str(out), "--obsm-keys", "A,B", "--k", "15",
                 "--n-clusters", "3"]) == 0
    got = ad.read_h5ad(out)
    np.testing.assert_allclose(got.obsp["snf_connectivities"], snf([x1, x2], K=15), rtol=1e-6)
    assert got.obs["snf_cluster"].nunique() == 3
    assert main(["snf", str(src), str(out), "--obsm-keys", "A,C"]) == 2
    assert "--obsm-keys" in capsys.readouterr().err
