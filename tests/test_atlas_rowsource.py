"""scatlas.io.RowSource: one protocol over in-memory matrices, backed h5ad, zarr, Dask arrays and
lists of chunks; rows and blocks equal the in-memory matrix exactly, and StoreBatches reads any of
them."""

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
def data(tmp_path_factory, write_zarr):
    adata = scatlas.datasets.synthetic(900, 40, progress=False, seed=7)
    root = tmp_path_factory.mktemp("rows")
    write_zarr(adata, root / "a.zarr")
    adata.write_h5ad(root / "a.h5ad")
    return adata, root


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


def test_every_kind_reads_the_same_rows_and_blocks(data):
    adata, root = data
    ref = adata.X.toarray()
    idx = np.array([0, 5, 299, 300, 309, 310, 899])
    for name, X in _kinds(adata, root).items():
        src = as_row_source(X)
        assert isinstance(src, RowSource), name
        assert src.shape == ref.shape, name
        np.testing.assert_array_equal(_dense(src.rows(idx)), ref[idx], err_msg=name)
        blocks = list(src.blocks(256))
        assert [(a, b) for a, b, _ in blocks] == [(0, 256), (256, 512), (512, 768), (768, 900)]
        np.testing.assert_array_equal(np.vstack([_dense(b) for _, _, b in blocks]), ref,
                                      err_msg=name)
    assert isinstance(MatrixSource(adata.X), RowSource)
    assert as_row_source(src) is src


def test_store_batches_read_any_row_source(data):
    adata, root = data
    for name in ("dask", "chunks"):
        X = _kinds(adata, root)[name]
        sb = StoreBatches(X, batch_size=64, block_rows=50, fetch_blocks=3, seed=2)
        for t in (0, 7, 20):
            b = sb.batch(t)
            np.testing.assert_array_equal(b["x"], lognorm(adata.X[b["index"]]), err_msg=name)


def test_errors():
    with pytest.raises(ScatlasInputError):
        ArrayRows([])
    with pytest.raises(ScatlasInputError, match="columns"):
        ArrayRows([np.ones((2, 3)), np.ones((2, 4))])
    with pytest.raises(ScatlasInputError):
        ArrayRows(np.ones(3))
