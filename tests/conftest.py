"""Shared fixtures: paths to the real datasets (skip when absent) and the GPU marker."""

from __future__ import annotations

from pathlib import Path

import pytest

from scatlas import backend

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when no usable GPU is present."""
    if backend.gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def write_zarr():
    """``write_zarr(adata, path)``: ``AnnData.write_zarr`` without anndata's notice that zarr v2
    will no longer be the default format."""
    import warnings

    def write(adata, path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            adata.write_zarr(path)

    return write


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real datasets beside the checkout; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


def dataset_path(shared: Path, name: str) -> Path:
    path = shared / name
    if not path.exists():
        pytest.skip(f"dataset {name} not found in {shared}")
    return path


@pytest.fixture(scope="session")
def cellbench(shared_data):
    """CellBench lung cell lines, 5 batches (raw counts; labels in obs['cell_line'])."""
    import anndata as ad

    return ad.read_h5ad(dataset_path(shared_data, "cellbench_lung_celllines_5batch.h5ad"))


@pytest.fixture(scope="session")
def mesc(shared_data):
    """scMerge mESC, 2 batches x 100 cells, 1047 genes (raw read counts)."""
    import anndata as ad

    return ad.read_h5ad(dataset_path(shared_data, "scmerge_mesc_2batch.h5ad"))
