"""StoreBatches (block-shuffled mini-batches from a store on disk) and scatlas.io.RowSource,
against exact references: every cell once per epoch; values equal lognorm of the same rows read
in memory; batch t a pure function of (seed, t); every kind of row source (in-memory, backed h5ad,
zarr, Dask, a list of chunks, a path) reads the same rows and blocks as the in-memory matrix."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import scatlas
from scatlas.exceptions import ScatlasInputError
from scatlas.io import ArrayRows, RowSource, as_row_source
from scatlas.models.data import MatrixSource, StoreBatches, lognorm

da = pytest.importorskip("dask.array")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, write_zarr):
    adata = scatlas.datasets.synthetic(2300, 60, progress=False, seed=5)
    root = tmp_path_factory.mktemp("loader")
    write_zarr(adata, root / "a.zarr")
    adata.write_h5ad(root / "a.h5ad")
    return adata, root


def _backed(root, kind):
    if kind == "zarr":
        return scatlas.io.read_zarr(root / "a.zarr", backed=True)
    return ad.read_h5ad(root / "a.h5ad", backed="r")


@pytest.mark.parametrize("kind", ["zarr", "h5ad"])
def test_epoch_covers_every_cell_once_with_exact_values(stores, kind):
    adata, root = stores
    X = _backed(root, kind).X
    sb = StoreBatches(X, labels=adata.obs["cell_type"], batch_size=100, block_rows=64,
                      fetch_blocks=4, seed=3)
    per_epoch = adata.n_obs // 100
    seen = []
    for _, b in zip(range(per_epoch), sb.iterate(prefetch=2), strict=False):
        np.testing.assert_array_equal(b["x"], lognorm(adata.X[b["index"]]))
        np.testing.assert_array_equal(b["label"], sb.labels[b["index"]])
        seen.append(b["index"])
        assert b["x"].shape == (100, adata.n_vars) and b["x"].dtype == np.float32
    seen = np.concatenate(seen)
    assert np.unique(seen).size == seen.size == per_epoch * 100
    # shuffled: far from the store's order, and blocks mixed within a batch
    assert np.abs(np.diff(seen[:100])).mean() > 64


def test_resumable_and_sparse(stores):
    adata, root = stores
    X = _backed(root, "zarr").X
    a = StoreBatches(X, batch_size=128, block_rows=50, fetch_blocks=5, seed=1)
    b = StoreBatches(X, batch_size=128, block_rows=50, fetch_blocks=5, seed=1)
    for t in (30, 2, 17, 2 + adata.n_obs // 128):  # any order, across epochs
        np.testing.assert_array_equal(a.batch(t)["x"], b.batch(t)["x"])
        np.testing.assert_array_equal(a.batch(t)["index"], b.indices(t))
    first, second = a.indices(0), a.indices(adata.n_obs // 128)
    assert not np.array_equal(first, second)  # a new epoch, a new order
    s = StoreBatches(X, batch_size=128, block_rows=50, fetch_blocks=5, seed=1, sparse=True)
    got = s.batch(3)
    n = got["x_indptr"].size - 1
    rebuilt = sp.csr_matrix((got["x_data"], got["x_indices"], got["x_indptr"]),
                            shape=(n, adata.n_vars))[:128]
    np.testing.assert_allclose(rebuilt.toarray(), lognorm(adata.X[got["index"]]), rtol=1e-6)


def test_rows_restriction_and_errors(stores):
    adata, root = stores
    X = _backed(root, "zarr").X
    rows = np.arange(0, adata.n_obs, 3)
    sb = StoreBatches(X, batch_size=50, block_rows=40, fetch_blocks=3, rows=rows, seed=0)
    got = np.concatenate([sb.batch(t)["index"] for t in range(rows.size // 50)])
    assert np.isin(got, rows).all() and np.unique(got).size == got.size
    with pytest.raises(ScatlasInputError, match="balance"):
        StoreBatches(X, balance="label")


def test_encoder_trains_from_a_store_without_loading_it(stores, monkeypatch):
    """tl.train_metric on a backed zarr AnnData with uniform sampling reads StoreBatches."""
    adata, root = stores
    calls = []
    batch = StoreBatches.batch

    def counted(self, t):
        calls.append(t)
        return batch(self, t)

    monkeypatch.setattr(StoreBatches, "batch", counted)
    backed = _backed(root, "zarr")
    assert not isinstance(backed.X, np.ndarray | sp.spmatrix)
    model = scatlas.tl.train_metric(backed, "cell_type", balance=None, max_steps=5,
                                    batch_size=64, validation_fraction=0.1, progress=False,
                                    n_top_genes=None)
    assert len(calls) >= 5
    z = model.embed(adata[:50], progress=False)
    assert z.shape == (50, model.latent_dim) and np.isfinite(z).all()


def _kinds(adata, root):
    X = adata.X
    return {
        "csr": X, "dense": X.toarray(),
        "zarr_path": root / "a.zarr", "h5ad_path": root / "a.h5ad",
        "zarr_backed": scatlas.io.read_zarr(root / "a.zarr", backed=True).X,
        "h5ad_backed": ad.read_h5ad(root / "a.h5ad", backed="r").X,
        "dask": da.from_array(X, chunks=(250, 40), asarray=False),
        "chunks": [X[:300], X[300:310], X[310:]],
    }


def _dense(block):
    return block.toarray() if sp.issparse(block) else np.asarray(block)


def test_every_kind_reads_the_same_rows_and_blocks(stores):
    adata, root = stores
    ref = adata.X.toarray()
    idx = np.array([0, 5, 299, 300, 309, 310, adata.n_obs - 1])
    for name, X in _kinds(adata, root).items():
        src = as_row_source(X)
        assert isinstance(src, RowSource), name
        assert src.shape == ref.shape, name
        np.testing.assert_array_equal(_dense(src.rows(idx)), ref[idx], err_msg=name)
        blocks = list(src.blocks(256))
        n = ref.shape[0]
        assert [(a, b) for a, b, _ in blocks] == [(a, min(n, a + 256)) for a in range(0, n, 256)]
        np.testing.assert_array_equal(np.vstack([_dense(b) for _, _, b in blocks]), ref,
                                      err_msg=name)
    assert isinstance(MatrixSource(adata.X), RowSource)
    assert as_row_source(src) is src


def test_store_batches_read_any_row_source(stores):
    adata, root = stores
    for name in ("dask", "chunks"):
        X = _kinds(adata, root)[name]
        sb = StoreBatches(X, batch_size=64, block_rows=50, fetch_blocks=3, seed=2)
        for t in (0, 7, 20):
            b = sb.batch(t)
            np.testing.assert_array_equal(b["x"], lognorm(adata.X[b["index"]]), err_msg=name)


def test_row_source_errors():
    with pytest.raises(ScatlasInputError):
        ArrayRows([])
    with pytest.raises(ScatlasInputError, match="columns"):
        ArrayRows([np.ones((2, 3)), np.ones((2, 4))])
    with pytest.raises(ScatlasInputError):
        ArrayRows(np.ones(3))
