"""NativeIVF.add appends a segment instead of rebuilding the lists (issue 17, item 8): the
stored rows are neither copied nor moved, and every result equals a fresh build's."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from scatlas import backend
from scatlas.search.engines import ivf_native
from scatlas.search.engines.ivf_native import NativeIVF
from scatlas.search.synthetic import clustered_embeddings
from tests.helpers import fake_gpu

NLIST = 12


@pytest.fixture(scope="module")
def data():
    X = clustered_embeddings(3000, 16, n_clusters=10, seed=5).astype(np.float32)
    X[2500] = X[3]  # exact duplicates across segments: ties broken by id
    X[2999] = X[3]
    return X, X[::41] + 0.001


def _centroids(X):
    eng = NativeIVF(16, "ip", NLIST)
    eng.train(X[:1500])
    return backend.to_host(eng.centroids)


def _engine(C, device="cpu"):
    eng = NativeIVF(16, "ip", NLIST, device=device)
    eng.set_centroids(C)
    return eng


def _fresh(C, X, removed, device="cpu"):
    eng = _engine(C, device)
    eng.bulk_add(lambda record: iter([(X, np.arange(len(X)))]))
    eng.remove(removed)
    return eng


def _assert_same(a: NativeIVF, b: NativeIVF, Q, device="cpu") -> None:
    q = Q if device == "cpu" else fake_gpu.to_fake_gpu(Q)
    for nprobe in (1, 4, NLIST):
        ka, ia = (backend.to_host(x) for x in a.search(q, 10, nprobe))
        kb, ib = (backend.to_host(x) for x in b.search(q, 10, nprobe))
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ka, kb)
        allowed = np.arange(3000) % 3 != 0
        al = allowed if device == "cpu" else fake_gpu.to_fake_gpu(allowed)
        np.testing.assert_array_equal(backend.to_host(a.search(q, 10, nprobe, al)[1]),
                                      backend.to_host(b.search(q, 10, nprobe, al)[1]))
        for (ra, rb) in zip(a.range_search(q, -0.9, nprobe), b.range_search(q, -0.9, nprobe),
                            strict=True):
            np.testing.assert_array_equal(backend.to_host(ra[1]), backend.to_host(rb[1]))
            np.testing.assert_array_equal(backend.to_host(ra[0]), backend.to_host(rb[0]))


@pytest.mark.parametrize("device", ["cpu", "gpu"], ids=["numpy", "cupy-stand-in"])
def test_appended_segments_equal_a_fresh_build(data, monkeypatch, tmp_path, device):
    if device == "gpu":  # the CuPy branch, on the NumPy stand-in (id: not "gpu", which the
        fake_gpu.install(monkeypatch)  # conftest takes for the marker and skips)
    X, Q = data
    C = _centroids(X)
    eng = _engine(C, device)
    eng.bulk_add(lambda record: iter([(X[:1000], np.arange(1000))]))
    bounds = [1000, 1500, *range(1600, 3000, 140), 3000]  # 12 adds: the tail is merged once
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        eng.add(X[a:b], np.arange(a, b))
    assert 1 < eng.n_segments <= 1 + ivf_native._MAX_TAIL
    removed = np.arange(0, 3000, 7)  # under a quarter: tombstones, no compaction
    eng.remove(removed)
    fresh = _fresh(C, X, removed, device)
    assert eng.ntotal == fresh.ntotal and eng.n_segments > 1
    np.testing.assert_array_equal(backend.to_host(eng.list_counts()),
                                  backend.to_host(fresh.list_counts()))
    _assert_same(eng, fresh, Q, device)
    # saved: the one-array layout of a single build of the same rows in the same order
    eng.save(tmp_path)
    assert eng.n_segments > 1  # merged on the host for saving, not on the device
    for name in ("vectors", "ids", "offsets", "dead"):
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"),
                                      backend.to_host(getattr(fresh, name)), err_msg=name)
    # compaction merges every segment without the dead rows
    eng.compact()
    fresh.compact()
    assert eng.n_segments == 1 and eng.n_dead == 0
    _assert_same(eng, fresh, Q, device)


def test_add_copies_no_stored_row(data):
    """The stored segment stays the same array, and the memory an add allocates is of the
    order of the new rows (the rebuild it replaced allocated the whole index again)."""
    X, _ = data
    big = np.tile(X, (40, 1))  # 120,000 x 16 float32: 7.7 MB of vectors
    eng = _engine(_centroids(X))
    eng.bulk_add(lambda record: iter([(big, np.arange(len(big)))]))
    base = eng._segs[0].vectors
    index_bytes = base.nbytes + eng._segs[0].ids.nbytes
    tracemalloc.start()
    try:
        eng.add(X[:500], np.arange(10**6, 10**6 + 500))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert eng._segs[0].vectors is base and eng.n_stored == len(big) + 500
    assert peak < 0.1 * index_bytes, (peak, index_bytes)
    # reading the one-array layout merges (a copy), on request only
    assert eng.vectors.shape == (len(big) + 500, 16) and eng.n_segments == 1
