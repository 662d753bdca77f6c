"""Dask PCA (scatlas.kernels.dask_linalg) on a 2-worker LocalCluster against exact references.

References: the float64 eigh of the centred (or raw) Gram of the same matrix, and the in-memory
``tl.pca`` / ``kernels.pca``. The 2e5 x 2,000 check is ``bench/atlas_pca.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import scatlas
from scatlas import io as sio
from scatlas.exceptions import ScatlasInputError
from scatlas.kernels import dask_linalg, pca

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as cl:
        yield cl


def _counts(n: int, p: int, seed: int = 0) -> sp.csr_matrix:
    """Sparse counts with a few programs and gene means spanning two decades."""
    rng = np.random.default_rng(seed)
    W = rng.gamma(0.5, size=(n, 6))
    H = rng.gamma(0.5, size=(6, p)) * np.logspace(0, 2, p)[None, :]
    mu = (W @ H) * 0.02
    X = rng.poisson(mu * (rng.random((n, p)) < 0.2))
    return sp.csr_matrix(X.astype(np.float32))


def _exact(X: sp.csr_matrix, k: int, center: bool = True):
    A = X.toarray().astype(np.float64)
    if center:
        A -= A.mean(axis=0)
    w, V = np.linalg.eigh(A.T @ A)
    return w[::-1][:k] / (X.shape[0] - 1), V[:, ::-1][:, :k]


def _cosines(V1: np.ndarray, V2: np.ndarray) -> np.ndarray:
    return np.abs(np.sum(V1 * V2, axis=0)) / (np.linalg.norm(V1, axis=0)
                                               * np.linalg.norm(V2, axis=0))


@pytest.fixture(scope="module")
def store(tmp_path_factory, write_zarr):
    import anndata as ad

    X = _counts(6000, 400)
    path = tmp_path_factory.mktemp("dask") / "counts.zarr"
    write_zarr(ad.AnnData(X), path)
    return X, path


def test_tl_pca_on_zarr_matches_exact_and_in_memory(client, store):
    X, path = store
    lazy = sio.read_dask(path, chunk_rows=700)
    assert dask_linalg.is_dask_array(lazy.X)
    scatlas.tl.pca(lazy, 20)
    w, V = _exact(X, 20)
    var = lazy.uns["pca"]["variance"]
    assert np.max(np.abs(var / w - 1)) < 1e-5
    assert _cosines(lazy.varm["PCs"], V).min() >= 0.9999
    import anndata as ad

    mem = ad.AnnData(X.copy())
    scatlas.tl.pca(mem, 20)
    np.testing.assert_allclose(var, mem.uns["pca"]["variance"], rtol=1e-5)
    np.testing.assert_allclose(lazy.uns["pca"]["variance_ratio"],
                               mem.uns["pca"]["variance_ratio"], rtol=1e-5)
    scores = np.asarray(lazy.obsm["X_pca"].compute())
    ref = mem.obsm["X_pca"]
    np.testing.assert_allclose(scores, ref, atol=1e-3 * np.abs(ref).max())
    assert lazy.uns["pca"]["params"]["method"] == "gram"


def test_uncentred_matches_truncated_svd(client, store):
    X, _ = store
    dX = da.from_array(X, chunks=(1000, X.shape[1]), asarray=False)
    res = pca(dX, 10, center=False)
    w, V = _exact(X, 10, center=False)
    assert np.max(np.abs(res.explained_variance / w - 1)) < 1e-5
    assert _cosines(res.components.T, V).min() >= 0.9999
    assert np.all(res.mean == 0)


def test_randomized_route_blockwise(client):
    rng = np.random.default_rng(1)
    n, p = 5000, 300
    L = rng.standard_normal((n, 8)) * np.linspace(20, 4, 8)
    X = (L @ rng.standard_normal((8, p)) + rng.standard_normal((n, p)) + 3).astype(np.float32)
    dX = da.from_array(X, chunks=(800, 100))  # columns are rechunked to one block
    res = pca(dX, 8, method="randomized")
    ref = pca(X, 8, method="randomized")
    w, V = _exact(sp.csr_matrix(X), 8)
    assert res.method == "randomized"
    assert np.max(np.abs(res.explained_variance / w - 1)) < 1e-4
    assert _cosines(res.components.T, V).min() >= 0.9999
    np.testing.assert_allclose(res.explained_variance, ref.explained_variance, rtol=1e-4)


def test_dense_chunks_and_threaded_scheduler(store):
    """Without a client the local threaded scheduler runs the same graph."""
    X, _ = store
    import dask

    dX = da.from_array(X.toarray(), chunks=(1500, 400))
    with dask.config.set(scheduler="threads"):
        res = pca(dX, 5)
    w, _ = _exact(X, 5)
    assert np.max(np.abs(res.explained_variance / w - 1)) < 1e-5


def test_errors():
    dX = da.from_array(np.ones((10, 4)), chunks=5)
    with pytest.raises(ScatlasInputError):
        pca(dX, 5)
    with pytest.raises(ScatlasInputError, match="method"):
        pca(dX, 2, method="svd")
    unknown = dX[dX[:, 0] > 0]
    with pytest.raises(ScatlasInputError, match="chunk sizes"):
        pca(unknown, 2)
