"""The native IVF sharded over devices (NumPy shards on the CPU, GPUs when there are several):
results equal the unsharded engine's exactly, and exact search at nprobe = nlist; save / load
across shard counts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scatlas import backend
from scatlas._validate import ScatlasInputError
from scatlas.search import CellIndex
from scatlas.search.engines.ivf_sharded import ShardedNativeIVF, gpu_count
from scatlas.search.synthetic import clustered_embeddings

NLIST = 16


@pytest.fixture(scope="module")
def data():
    """1,500 x 16 clustered rows with planted exact duplicates (ties across shards)."""
    X, lab = clustered_embeddings(1500, 16, n_clusters=12, labels=True, seed=3)
    X = X.copy()
    X[100] = X[7]
    X[900] = X[7]
    X[1200] = X[7]
    X[901] = X[55]
    meta = pd.DataFrame({"cell_type": [f"t{v}" for v in lab],
                         "study": np.where(np.arange(1500) % 3 == 0, "s0", "s1")})
    Q = np.concatenate([X[::37], X[[7, 55]]])  # includes the duplicated rows
    return X, meta, Q


def _build(X, meta, n_shards, metric="cosine", **kw):
    return CellIndex.build(X, meta, metric=metric, engine="native-ivf", nlist=NLIST,
                           chunk_size=400, device="cpu", n_shards=n_shards, **kw)


def _same(a: CellIndex, b: CellIndex, Q, nprobe=4, radius=0.05, filters=(None,)):
    """Bit-identical search and range_search results of two indexes."""
    for flt in filters:
        Da, Ia = a.search(Q, 10, nprobe=nprobe, filter=flt)
        Db, Ib = b.search(Q, 10, nprobe=nprobe, filter=flt)
        np.testing.assert_array_equal(Ia, Ib)
        np.testing.assert_array_equal(Da, Db)
        ra = a.range_search(Q, radius, nprobe=nprobe, filter=flt)
        rb = b.range_search(Q, radius, nprobe=nprobe, filter=flt)
        assert len(ra) == len(rb) == len(Q)
        for (da, ia), (db, ib) in zip(ra, rb, strict=True):
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(da, db)


def _assert_layout_equal(sharded: ShardedNativeIVF, native) -> None:
    g = sharded.to_native("cpu")
    for name in ("centroids", "vectors", "ids", "offsets", "dead"):
        np.testing.assert_array_equal(getattr(g, name), getattr(native, name), err_msg=name)


@pytest.mark.parametrize("n_shards", [2, 3])
def test_sharded_equals_unsharded_through_add_remove(data, n_shards):
    X, meta, Q = data
    ref = _build(X[:1000], meta.iloc[:1000], None)
    sh = _build(X[:1000], meta.iloc[:1000], n_shards)
    assert ref.n_shards == 1 and sh.n_shards == n_shards and sh.engine == "native-ivf"
    eng = sh._engine
    np.testing.assert_array_equal(eng.centroids, ref._engine.centroids)
    for s in eng.shards:  # one shared quantiser
        np.testing.assert_array_equal(s.centroids, ref._engine.centroids)
    sizes = eng.shard_sizes()
    assert sum(sizes) == 1000 and max(sizes) - min(sizes) <= NLIST  # <= 1 row per list apart
    assert min(sizes) > 0
    _assert_layout_equal(eng, ref._engine)
    filters = (None, {"study": "s0"}, np.arange(0, 1000, 2), "cell_type != 't3'")
    _same(ref, sh, Q, filters=filters)
    assert sh.stats == ref.stats  # OOD quantiles come from the same searches
    for idx in (ref, sh):
        idx.add(X[1000:1300], meta.iloc[1000:1300])
        idx.add(X[1300:1301], meta.iloc[1300:1301])  # a single row
        idx.add(X[1301:], meta.iloc[1301:])
        assert idx.remove(np.arange(0, 1500, 7)) == len(range(0, 1500, 7))
        assert idx.remove([3, 3, 7, 10**6]) == 1
    assert sh.ntotal == ref.ntotal == sh._engine.ntotal
    assert max(eng.shard_sizes()) - min(eng.shard_sizes()) <= NLIST + 1
    _same(ref, sh, Q, filters=filters)
    eng.compact()
    ref._engine.compact()
    _assert_layout_equal(eng, ref._engine)
    _same(ref, sh, Q, nprobe=NLIST)


@pytest.mark.parametrize("metric", ["euclidean", "ip"])
def test_sharded_equals_exact_at_full_nprobe(data, metric):
    X, meta, Q = data
    ex = CellIndex.build(X, meta, metric=metric, engine="exact", device="cpu")
    sh = _build(X, meta, 3, metric=metric)
    ref = _build(X, meta, None, metric=metric)
    _same(ref, sh, Q, radius=1.0 if metric == "euclidean" else -0.9)
    for flt in (None, {"study": "s1"}):
        De, Ie = ex.search(Q, 10, filter=flt)
        Ds, Is = sh.search(Q, 10, nprobe=NLIST, filter=flt)
        np.testing.assert_array_equal(Is, Ie)
        np.testing.assert_allclose(Ds, De, rtol=1e-5, atol=1e-5)
    rad = 1.0 if metric == "euclidean" else -0.9
    for (de, ie), (ds, is_) in zip(ex.range_search(Q, rad), sh.range_search(Q, rad, nprobe=NLIST),
                                   strict=True):
        np.testing.assert_array_equal(is_, ie)
        np.testing.assert_allclose(ds, de, rtol=1e-5, atol=1e-5)
    # more shards than a list has rows: k beyond the live cells pads with (inf, -1)
    D, ids = sh.search(Q[:2], 2000, nprobe=NLIST, filter=np.arange(5))
    assert (ids[:, :5] >= 0).all() and (ids[:, 5:] == -1).all() and np.isinf(D[:, 5:]).all()


def test_threads_and_one_shot_stream_equal(data):
    X, meta, Q = data
    ref = _build(X, meta, None)
    chunks = (X[s : s + 300] for s in range(0, 1500, 300))  # a one-shot generator
    metas = (meta.iloc[s : s + 300] for s in range(0, 1500, 300))
    sh = CellIndex.build(chunks, metas, engine="native-ivf", nlist=NLIST, device="cpu",
                         n_shards=2)
    sh._engine.parallel = True  # the GPU's one-thread-per-shard path, on NumPy shards
    _same(ref, sh, Q, filters=(None, {"study": "s0"}))
    sh.remove(np.arange(0, 1500, 3))
    ref.remove(np.arange(0, 1500, 3))
    _same(ref, sh, Q)


def test_save_sharded_load_unsharded_and_back(tmp_path, data):
    X, meta, Q = data
    sh = _build(X[:1200], meta.iloc[:1200], 3)
    sh.add(X[1200:], meta.iloc[1200:])
    sh.remove(np.arange(5, 1500, 11))
    sh.save(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["engine"] == "native-ivf" and manifest["engine_meta"]["n_shards"] == 3
    one = CellIndex.load(tmp_path / "a", device="cpu")  # unsharded by default on the CPU
    assert one.n_shards == 1 and type(one._engine).__name__ == "NativeIVF"
    filters = (None, {"cell_type": ["t1", "t2"]})
    _same(sh, one, Q, filters=filters)
    two = CellIndex.load(tmp_path / "a", device="cpu", n_shards=2)
    assert two.n_shards == 2 and two.ntotal == sh.ntotal
    assert max(two._engine.shard_sizes()) - min(two._engine.shard_sizes()) <= NLIST
    _same(sh, two, Q, filters=filters)
    one.save(tmp_path / "b")
    back = CellIndex.load(tmp_path / "b", device="cpu", n_shards=3)
    _same(one, back, Q, filters=filters)
    for name in ("vectors", "ids", "offsets", "dead"):  # the saved layouts are one and the same
        np.testing.assert_array_equal(np.load(tmp_path / "a" / f"{name}.npy"),
                                      np.load(tmp_path / "b" / f"{name}.npy"))
    # updates after a re-shard keep agreeing
    for idx in (one, back):
        idx.remove(np.arange(0, 1500, 4))
    _same(one, back, Q)


def test_shard_arguments(data, tmp_path):
    X, meta, _ = data
    with pytest.raises(ScatlasInputError, match="n_shards"):
        CellIndex.build(X, engine="exact", n_shards=2, device="cpu")
    with pytest.raises(ScatlasInputError, match="n_shards"):
        CellIndex.build(X, engine="native-ivf", nlist=NLIST, n_shards=0, device="cpu")
    small = CellIndex.build(X, n_shards=2, device="cpu")  # auto below 50k cells: exact, 1 shard
    assert small.engine == "exact" and small.n_shards == 1
    small.save(tmp_path / "ex")
    with pytest.raises(ScatlasInputError, match="n_shards"):
        CellIndex.load(tmp_path / "ex", device="cpu", n_shards=2)
    assert CellIndex.load(tmp_path / "ex", device="cpu").n_shards == 1
    with pytest.raises(FileNotFoundError):
        CellIndex.load(tmp_path / "missing", device="cpu", n_shards=2)


# ------------------------------------------------------------------------------------------------
# GPU: shards over every visible GPU equal the NumPy twin
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_shards_equal_cpu_twin(data, tmp_path):
    """GPU shards against the CPU: the same lists and candidates, but keys summed in float32 by
    another device (16 terms of unit vectors, |key| <= 1): results agree up to ties within
    that rounding, not bit for bit."""
    from tests.helpers import neighbour_sets as ns

    tol = ns.float32_sum_tolerance(16, scale=1.0)
    n_gpu = gpu_count()
    if n_gpu < 2:
        pytest.skip(f"needs at least 2 GPUs, {n_gpu} visible")
    cp = backend.gpu_module()
    X, meta, Q = data
    # built on the GPUs (None: one shard per GPU); at nprobe = nlist it is exact search
    gpu = CellIndex.build(X[:1200], meta.iloc[:1200], engine="native-ivf", nlist=NLIST,
                          chunk_size=400, device="gpu")
    ex = CellIndex.build(X[:1200], meta.iloc[:1200], engine="exact", device="cpu")
    assert gpu.n_shards == n_gpu
    assert sorted({int(s.vectors.device.id) for s in gpu._engine.shards}) == list(range(n_gpu))
    for idx in (gpu, ex):
        idx.add(X[1200:], meta.iloc[1200:])
        idx.remove(np.arange(0, 1500, 6))
    for flt in (None, {"study": "s1"}):
        De, Ie = ex.search(Q, 10, filter=flt)
        Dg, Ig = gpu.search(cp.asarray(Q), 10, nprobe=NLIST, filter=flt)
        assert isinstance(Ig, cp.ndarray)
        ns.assert_same_neighbours(De, Ie, Dg, Ig, atol=tol)
    # the CPU twin's layout re-sharded over the GPUs: same centroids, like for like
    cpu = _build(X[:1200], meta.iloc[:1200], n_gpu)
    cpu.save(tmp_path / "c")
    g2 = CellIndex.load(tmp_path / "c", device="gpu")
    assert g2.n_shards == n_gpu and g2.device == "gpu"
    for idx in (cpu, g2):
        idx.add(X[1200:], meta.iloc[1200:])
        idx.remove(np.arange(0, 1500, 6))
    for flt in (None, {"study": "s1"}):
        Dc, Ic = cpu.search(Q, 10, nprobe=4, filter=flt)
        Dg, Ig = g2.search(Q, 10, nprobe=4, filter=flt)
        ns.assert_same_neighbours(Dc, Ic, Dg, Ig, atol=tol)
    ns.assert_same_range_hits(cpu.range_search(Q, 0.05, nprobe=4),
                              g2.range_search(Q, 0.05, nprobe=4), 0.05, atol=tol)
    g2.save(tmp_path / "g")
    one = CellIndex.load(tmp_path / "g", device="cpu")
    # both searched on the CPU, same stored vectors and centroids: bit for bit
    np.testing.assert_array_equal(one.search(Q, 10, nprobe=4)[1], cpu.search(Q, 10, nprobe=4)[1])


def test_float16_lists_sharded_equal_unsharded(data, tmp_path):
    """fp16 lists (issue 19): every shard stores float16, results equal one unsharded fp16
    engine's exactly, and the gathered save keeps float16."""
    from scatlas.search.engines.ivf_native import NativeIVF

    X, _, Q = data
    one = NativeIVF(16, "ip", NLIST, list_dtype="float16")
    one.train(X)
    sh = ShardedNativeIVF(16, "ip", NLIST, n_shards=3, list_dtype="float16")
    sh.set_centroids(one.centroids)
    for eng in (one, sh):
        eng.bulk_add(lambda record: iter([(X[:1200], np.arange(1200))]))
        eng.add(X[1200:], np.arange(1200, 1500))
    assert sh.list_dtype == np.float16 and all(s.list_dtype == np.float16 for s in sh.shards)
    for nprobe in (2, NLIST):
        for a, b in zip(one.search(Q, 10, nprobe), sh.search(Q, 10, nprobe), strict=True):
            np.testing.assert_array_equal(a, b)
    assert sh.meta()["list_dtype"] == "float16"
    sh.save(tmp_path)
    assert np.load(tmp_path / "vectors.npy").dtype == np.float16
    back = ShardedNativeIVF.load(tmp_path, {"dim": 16, "nlist": NLIST, "kind": "ip",
                                            "engine_meta": sh.meta()}, "cpu")
    assert back.list_dtype == np.float16
    np.testing.assert_array_equal(back.search(Q, 10, 3)[1], one.search(Q, 10, 3)[1])
