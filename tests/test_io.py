"""h5ad reading, chunked row iteration, gene alignment and atomic writes."""

from __future__ import annotations

import logging

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scatlas import datasets, io
from scatlas._validate import ScatlasInputError


@pytest.fixture(scope="module")
def syn() -> ad.AnnData:
    a = datasets.synthetic(1500, 120, n_cell_types=3, n_batches=2, seed=3)
    a.layers["counts"] = a.X.copy()
    a.layers["dense"] = a.X.toarray() * 2
    return a


@pytest.fixture(scope="module")
def syn_path(syn, tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "syn.h5ad"
    syn.write_h5ad(path)
    return path


def stacked(chunks):
    starts, stops, mats = zip(*chunks, strict=True)
    if sp.issparse(mats[0]):
        return list(starts), list(stops), sp.vstack(mats).toarray()
    return list(starts), list(stops), np.vstack(mats)


# ---------------------------------------------------------------------------------- read_h5ad


def test_read_h5ad_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        io.read_h5ad(tmp_path / "missing.h5ad")
    text = tmp_path / "notes.h5ad"
    text.write_text("not hdf5")
    with pytest.raises(ScatlasInputError, match="not HDF5"):
        io.read_h5ad(text)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["data"] = np.arange(3)
    with pytest.raises(ScatlasInputError, match="not an AnnData"):
        io.read_h5ad(plain)
    with pytest.raises(ScatlasInputError, match="folder.*read_zarr"):
        io.read_h5ad(tmp_path)


def test_read_h5ad_memory_and_backed(syn, syn_path):
    a = io.read_h5ad(syn_path)
    assert not a.isbacked and (a.X != syn.X).nnz == 0
    b = io.read_h5ad(syn_path, backed=True)
    assert b.isbacked and b.shape == syn.shape
    b.file.close()


# ---------------------------------------------------------------------------------- read_zarr


def dense(X) -> np.ndarray:
    X = X[:] if not (isinstance(X, np.ndarray) or sp.issparse(X)) else X
    return X.toarray() if sp.issparse(X) else np.asarray(X)


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
@pytest.mark.parametrize("backed", [False, True])
def test_read_zarr_round_trip(syn, tmp_path, kind, backed, write_zarr):
    a = syn[:200].copy()
    a.X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": sp.csr_matrix.toarray}[kind](a.X)
    a.obsm["X_pca"] = np.arange(400, dtype=np.float32).reshape(200, 2)
    path = tmp_path / "syn.zarr"
    write_zarr(a, path)
    b = io.read_zarr(path, backed=backed)
    assert b.shape == a.shape and not b.isbacked
    pd.testing.assert_frame_equal(b.obs, a.obs)
    pd.testing.assert_frame_equal(b.var, a.var)
    np.testing.assert_array_equal(b.obsm["X_pca"], a.obsm["X_pca"])
    assert set(b.layers) == set(a.layers) and "synthetic" in b.uns
    lazy = not (isinstance(b.X, np.ndarray) or sp.issparse(b.X))
    assert lazy == backed  # backed: X left on disk (sparse dataset / zarr array)
    np.testing.assert_array_equal(dense(b.X), dense(a.X))
    np.testing.assert_array_equal(dense(b.layers["dense"]), a.layers["dense"])
    np.testing.assert_array_equal(dense(b.layers["counts"]), a.layers["counts"].toarray())
    assert b.X.dtype == a.X.dtype
    rows = b.X[50:90]  # rows read on demand
    np.testing.assert_array_equal(dense(rows), dense(a.X[50:90]))
    _, _, got = stacked(io.iter_chunks(b, chunk_size=64))
    np.testing.assert_array_equal(got, dense(a.X))


def test_read_zarr_errors(syn, tmp_path, write_zarr):
    import zarr

    with pytest.raises(FileNotFoundError, match="no such zarr store"):
        io.read_zarr(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScatlasInputError, match="not a zarr store.*zgroup"):
        io.read_zarr(tmp_path / "empty", backed=True)
    group = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    group["data"] = np.arange(3)
    with pytest.raises(ScatlasInputError, match=r"not an AnnData \(no \['obs', 'var'\]"):
        io.read_zarr(tmp_path / "plain.zarr")
    text = tmp_path / "notes.zarr"
    text.write_text("not zarr")
    with pytest.raises(ScatlasInputError, match="is a file"):
        io.read_zarr(text)
    write_zarr(syn[:20].copy(), tmp_path / "ok.zarr")
    with pytest.raises(ScatlasInputError, match="read-only"):
        io.read_zarr(tmp_path / "ok.zarr", backed="r+")


# -------------------------------------------------------------------------------- iter_chunks


def test_iter_chunks_path_equals_memory(syn, syn_path):
    starts, stops, X = stacked(io.iter_chunks(syn_path, chunk_size=400))
    assert starts == [0, 400, 800, 1200] and stops == [400, 800, 1200, 1500]
    np.testing.assert_array_equal(X, syn.X.toarray())
    first = next(io.iter_chunks(syn_path, chunk_size=400))[2]
    assert isinstance(first, sp.csr_matrix) and first.shape == (400, 120)
    assert first.dtype == np.float32


def test_iter_chunks_backed_equals_memory(syn, syn_path):
    backed = ad.read_h5ad(syn_path, backed="r")
    _, _, X = stacked(io.iter_chunks(backed, chunk_size=333))
    np.testing.assert_array_equal(X, syn.X.toarray())
    assert backed.isbacked
    backed.file.close()


def test_iter_chunks_reads_only_requested_rows(syn_path, monkeypatch):
    """On a path, each chunk reads a slice of data/indices, never the whole arrays."""
    reads = []
    original = h5py.Dataset.__getitem__

    def spy(self, key):
        if self.name in ("/X/data", "/X/indices"):
            reads.append((self.shape[0], key))
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    n = sum(1 for _ in io.iter_chunks(syn_path, chunk_size=500))
    assert n == 3 and len(reads) == 6
    for total, key in reads:
        assert isinstance(key, slice) and key.stop - key.start < total


def test_iter_chunks_layers_and_dense(syn, syn_path):
    _, _, X = stacked(io.iter_chunks(syn_path, chunk_size=700, layer="dense"))
    np.testing.assert_array_equal(X, syn.layers["dense"])
    _, _, X = stacked(io.iter_chunks(syn, chunk_size=700, layer="counts"))
    np.testing.assert_array_equal(X, syn.X.toarray())
    dense = ad.AnnData(syn.X.toarray())
    _, _, X = stacked(io.iter_chunks(dense, chunk_size=1000))
    np.testing.assert_array_equal(X, syn.X.toarray())
    with pytest.raises(ScatlasInputError, match="layer"):
        next(io.iter_chunks(syn, layer="nope"))
    with pytest.raises(ScatlasInputError, match="layer"):
        next(io.iter_chunks(syn_path, layer="nope"))
    with pytest.raises(ScatlasInputError):
        next(io.iter_chunks(syn, chunk_size=0))


def test_iter_chunks_csc(syn, tmp_path):
    csc = ad.AnnData(sp.csc_matrix(syn.X))
    path = tmp_path / "csc.h5ad"
    csc.write_h5ad(path)
    for source in (csc, path):
        _, _, X = stacked(io.iter_chunks(source, chunk_size=600))
        np.testing.assert_array_equal(X, syn.X.toarray())


# -------------------------------------------------------------------------------- align_genes


def test_align_genes_puts_columns_under_the_right_gene(syn, caplog):
    genes = list(syn.var_names[::-3][:30]) + ["NEW1", "NEW2"] + list(syn.var_names[:10])
    with caplog.at_level(logging.INFO, logger="scatlas.io"):
        out = io.align_genes(syn, genes, min_overlap=0.9)
    assert list(out.var_names) == genes
    assert isinstance(out.X, sp.csr_matrix) and out.X.dtype == syn.X.dtype
    dense_in, dense_out = syn.X.toarray(), out.X.toarray()
    for j, g in enumerate(genes):
        if g.startswith("NEW"):
            assert dense_out[:, j].sum() == 0 and out.X[:, j].nnz == 0
        else:
            np.testing.assert_array_equal(dense_out[:, j], dense_in[:, syn.var_names.get_loc(g)])
    np.testing.assert_array_equal(out.layers["dense"], dense_out * 2)
    info = out.uns["scatlas_alignment"]
    assert info["n_target"] == 42 and info["n_found"] == 40
    assert info["fraction"] == pytest.approx(40 / 42)
    assert info["n_dropped"] == 120 - 40
    assert list(info["missing_examples"]) == ["NEW1", "NEW2"]
    assert "40 of 42" in caplog.text
    assert out.obs.equals(syn.obs)


def test_align_genes_fill_value_and_dense(syn):
    genes = ["gene0005", "absent", "gene0001"]
    out = io.align_genes(syn, genes, min_overlap=0.5, fill=np.nan)
    X = out.X.toarray()
    assert np.isnan(X[:, 1]).all()
    np.testing.assert_array_equal(X[:, 0], syn.X[:, 5].toarray().ravel())
    dense = ad.AnnData(syn.X.toarray(), var=pd.DataFrame(index=syn.var_names))
    out = io.align_genes(dense, genes, min_overlap=0.5)
    assert isinstance(out.X, np.ndarray)
    np.testing.assert_array_equal(out.X[:, 2], dense.X[:, 1])
    assert (out.X[:, 1] == 0).all()


def test_align_genes_errors(syn):
    with pytest.raises(ScatlasInputError, match="0 of 2"):
        io.align_genes(syn, ["x", "y"])
    with pytest.raises(ScatlasInputError, match=r"1 of 4 .*25\.0%.*min_overlap=50\.0%"):
        io.align_genes(syn, ["gene0001", "a", "b", "c"])
    with pytest.raises(ScatlasInputError, match="duplicated"):
        io.align_genes(syn, ["gene0001", "gene0001"])
    dup = syn.copy()
    dup.var_names = ["g"] * 2 + list(syn.var_names[2:])
    with pytest.raises(ScatlasInputError, match="var_names has 1 duplicated"):
        io.align_genes(dup, ["gene0005"])


def test_align_genes_real_cellbench(cellbench):
    rng = np.random.default_rng(0)
    picked = list(rng.choice(cellbench.var_names, 500, replace=False))
    genes = picked + [f"FAKE{i}" for i in range(50)]
    rng.shuffle(genes)
    out = io.align_genes(cellbench, genes)
    assert out.uns["scatlas_alignment"]["n_found"] == 500
    X_in = cellbench.X.tocsc()
    X_out = out.X.tocsc()
    for j in rng.choice(len(genes), 60, replace=False):
        g = genes[j]
        col = X_out[:, j].toarray().ravel()
        if g.startswith("FAKE"):
            assert not col.any()
        else:
            np.testing.assert_array_equal(
                col, X_in[:, cellbench.var_names.get_loc(g)].toarray().ravel()
            )
    assert X_out.sum() == X_in[:, cellbench.var_names.get_indexer(picked)].sum()


def test_align_genes_real_mesc_vs_cellbench(mesc, cellbench):
    # mouse Ensembl IDs against human symbols: nothing in common
    with pytest.raises(ScatlasInputError, match="no overlapping genes"):
        io.align_genes(mesc, cellbench.var_names[:100])
    out = io.align_genes(mesc, mesc.var_names[::-1])
    np.testing.assert_array_equal(out.X.toarray(), mesc.X.toarray()[:, ::-1])


# ------------------------------------------------------------------------------ atomic writes


def test_atomic_write_success_and_failure(tmp_path):
    target = tmp_path / "index.bin"
    with io.atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and not tmp.exists() and tmp.suffix == ".bin"
        tmp.write_bytes(b"v1")
    assert target.read_bytes() == b"v1"
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with io.atomic_write(target) as tmp:
                tmp.write_bytes(b"half-writ")
                raise exc("interrupted")
        assert target.read_bytes() == b"v1"
        assert [p.name for p in tmp_path.iterdir()] == ["index.bin"]
    with pytest.raises(RuntimeError, match="nothing was written"):
        with io.atomic_write(tmp_path / "empty.bin"):
            pass
    with pytest.raises(FileNotFoundError):
        with io.atomic_write(tmp_path / "no" / "such" / "dir.bin"):
            pass


def test_atomic_write_folder(tmp_path):
    target = tmp_path / "store"
    with pytest.raises(ValueError):
        with io.atomic_write(target) as tmp:
            tmp.mkdir()
            (tmp / "part").write_text("x")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    with io.atomic_write(target) as tmp:
        tmp.mkdir()
        (tmp / "part").write_text("x")
    assert (target / "part").read_text() == "x"


def test_write_h5ad_roundtrip_and_interrupted(syn, tmp_path, monkeypatch):
    path = io.write_h5ad(syn, tmp_path / "out.h5ad")
    back = ad.read_h5ad(path)
    assert (back.X != syn.X).nnz == 0 and back.obs.equals(syn.obs)
    before = path.read_bytes()

    def broken_write(self, filename, **kwargs):
        with h5py.File(filename, "w") as f:
            f["X"] = np.zeros(3)  # a partial file, then the crash
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken_write)
    with pytest.raises(OSError, match="simulated"):
        io.write_h5ad(syn[:10].copy(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5ad"]


@pytest.mark.parametrize("keep", [0.1, 0.9])
def test_read_h5ad_truncated_file_names_it(syn, tmp_path, keep):
    whole = tmp_path / "whole.h5ad"
    syn.write_h5ad(whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(data[: int(len(data) * keep)])  # an interrupted copy
    with pytest.raises(ScatlasInputError, match=r"cut\.h5ad.*truncated") as err:
        io.read_h5ad(cut)
    assert f"{len(data):,}" in str(err.value)  # the size the file should have
