"""Online iNMF streams mini-batches from a zarr store exactly as from memory."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scatlas import datasets
from scatlas.kernels import liger_preprocess, online_inmf

zarr = pytest.importorskip("zarr")


def test_online_inmf_from_zarr_equals_in_memory(tmp_path):
    from anndata.io import sparse_dataset, write_elem

    a = datasets.synthetic(3000, 300, n_batches=2, seed=0)
    Xs = [sp.csr_matrix(a.X[(a.obs["batch"] == b).to_numpy()]) for b in ("batch0", "batch1")]
    prepared, _ = liger_preprocess(Xs)
    group = zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
    for i, M in enumerate(prepared):
        write_elem(group, f"d{i}", sp.csr_matrix(M))
    readonly = zarr.open_group(str(tmp_path / "d.zarr"), mode="r")
    stores = [sparse_dataset(readonly[f"d{i}"]) for i in range(2)]
    on_disk = online_inmf(stores, k=10, seed=1, minibatch_size=1000)
    in_memory = online_inmf([sp.csr_matrix(M) for M in prepared], k=10, seed=1,
                            minibatch_size=1000)
    np.testing.assert_array_equal(on_disk.W, in_memory.W)
    assert on_disk.objective == in_memory.objective
