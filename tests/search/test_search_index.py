"""CellIndex: exact engine vs numpy brute force, IVF recall, native IVF vs faiss, filters, range
search, add/remove, input validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scatlas import backend
from scatlas._validate import ScatlasInputError
from scatlas.search import CellIndex, default_nlist, default_nprobe
from scatlas.search.engines.ivf_native import NativeIVF
from scatlas.search.synthetic import clustered_embeddings

faiss = pytest.importorskip("faiss")


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------
def brute(Q, X, k, metric, ids=None, allowed=None):
    """float64 brute force: (distances, ids) sorted on (distance, id), padded (inf, -1)."""
    Q, X = np.asarray(Q, np.float64), np.asarray(X, np.float64)
    ids = np.arange(len(X)) if ids is None else np.asarray(ids)
    if metric == "cosine":
        Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
        D = 1.0 - Q @ X.T
    elif metric == "ip":
        D = -(Q @ X.T)
    else:
        D = np.sqrt(np.maximum(((Q[:, None, :] - X[None]) ** 2).sum(-1), 0))
    if allowed is not None:
        D[:, ~allowed[ids]] = np.inf
    outD = np.full((len(Q), k), np.inf)
    outI = np.full((len(Q), k), -1, dtype=np.int64)
    for i in range(len(Q)):
        o = np.lexsort((ids, D[i]))[:k]
        o = o[np.isfinite(D[i, o])]
        outD[i, : o.size], outI[i, : o.size] = D[i, o], ids[o]
    return outD, outI


def recall(I, Iref):
    return float(np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max((b >= 0).sum(), 1)
                          for a, b in zip(I, Iref, strict=True)]))


@pytest.fixture(scope="module")
def small():
    """1,500 x 16 clustered rows with planted exact duplicates (ties), labels as metadata."""
    X, lab = clustered_embeddings(1500, 16, n_clusters=12, labels=True, seed=3)
    X = X.copy()
    X[100] = X[7]
    X[900] = X[7]
    X[901] = X[55]
    meta = pd.DataFrame({"cell_type": [f"t{v}" for v in lab],
                         "study": np.where(np.arange(1500) % 3 == 0, "s0", "s1"),
                         "n": np.arange(1500)})
    return X, meta


@pytest.fixture(scope="module")
def clustered():
    """30,000 x 128 unit rows from 300 anisotropic clusters, 200 held-out queries."""
    X = clustered_embeddings(30_200, 128, n_clusters=300, seed=11)
    return X[:30_000], X[30_000:]


# ------------------------------------------------------------------------------------------------
# exact engine
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "euclidean", "ip"])
def test_exact_matches_bruteforce(small, metric):
    X, _ = small
    idx = CellIndex.build(X, metric=metric)
    assert idx.engine == "exact" and idx.ntotal == len(X) and idx.dim == 16
    Q = np.concatenate([X[[7, 55, 3]], X[200:260] * 1.7])
    D, I = idx.search(Q, 12)
    Dr, Ir = brute(Q, X, 12, metric)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == (len(Q), 12)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(D, Dr, atol=2e-6 * max(1, np.abs(Dr).max()))
    # ties: the duplicates of row 7 come back in id order, at the same distance
    np.testing.assert_array_equal(I[0, :3], [7, 100, 900])
    assert D[0, 0] == D[0, 1] == D[0, 2]


def test_exact_is_batch_independent_and_pads(small):
    X, _ = small
    idx = CellIndex.build(X[:20])
    D1, I1 = idx.search(X[:5], 30)
    assert (I1[:, 20:] == -1).all() and np.isinf(D1[:, 20:]).all()
    D, I = CellIndex.build(X).search(X[:64], 10)
    Db, Ib = CellIndex.build(X).search(X[:64], 10, batch_size=7)
    np.testing.assert_array_equal(I, Ib)
    np.testing.assert_array_equal(D, Db)


# ------------------------------------------------------------------------------------------------
# IVF engines
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["faiss-ivf", "native-ivf"])
def test_ivf_recall_at_default_nprobe(clustered, engine):
    X, Q = clustered
    idx = CellIndex.build(X, engine=engine)
    assert idx.nlist == default_nlist(len(X)) and idx.nprobe == default_nprobe(idx.nlist)
    _, Ir = brute(Q, X, 10, "cosine")
    D, I = idx.search(Q, 10)
    assert recall(I, Ir) >= 0.95
    assert (np.diff(D, axis=1) >= 0).all()
    # probing every list is exact search
    _, Iall = idx.search(Q[:50], 10, nprobe=idx.nlist)
    assert recall(Iall, Ir[:50]) == 1.0


def _faiss_ivf_with(C, X, metric_kind, nprobe):
    d = X.shape[1]
    if metric_kind == "ip":
        q, m = faiss.IndexFlatIP(d), faiss.METRIC_INNER_PRODUCT
    else:
        q, m = faiss.IndexFlatL2(d), faiss.METRIC_L2
    q.add(np.ascontiguousarray(C))
    ivf = faiss.IndexIVFFlat(q, d, C.shape[0], m)
    assert ivf.is_trained
    ivf.add(X)
    ivf.nprobe = nprobe
    _KEEP.append(q)  # the quantizer must outlive the index
    return ivf


_KEEP: list = []


@pytest.mark.parametrize("kind", ["ip", "l2"])
def test_native_ivf_equals_faiss_with_same_centroids(kind):
    X = clustered_embeddings(6000, 32, n_clusters=40, seed=5)
    if kind == "l2":
        X = X * np.random.default_rng(0).uniform(0.5, 2, size=(len(X), 1)).astype(np.float32)
    Q = X[:200] + 0.05 * np.random.default_rng(1).standard_normal((200, 32)).astype(np.float32)
    nat = NativeIVF(32, kind, 64)
    nat.train(X[::3])
    nat.bulk_add(lambda record: iter([(X[:2500], np.arange(2500)),
                                      (X[2500:], np.arange(2500, 6000))]))
    ref = _faiss_ivf_with(backend.to_host(nat.centroids), X, kind, 5)
    Df, If = ref.search(Q, 10)
    keys, ids = nat.search(Q, 10, 5)
    np.testing.assert_array_equal(ids, If)
    want = -Df if kind == "ip" else Df
    np.testing.assert_allclose(keys, want, rtol=1e-5, atol=1e-5)


def test_native_ivf_incremental_add_equals_bulk():
    X = clustered_embeddings(4000, 16, n_clusters=20, seed=2)
    a = NativeIVF(16, "ip", 32)
    a.train(X)
    b = NativeIVF(16, "ip", 32)
    b.set_centroids(a.centroids)
    a.bulk_add(lambda record: iter([(X, np.arange(4000))]))
    b.add(X[:1000], np.arange(1000))
    b.add(X[1000:], np.arange(1000, 4000))
    for name in ("vectors", "ids", "offsets"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


# ------------------------------------------------------------------------------------------------
# filters and range search (IVF with nprobe = nlist must equal brute force)
# ------------------------------------------------------------------------------------------------
ENGINES = ["exact", "faiss-ivf", "native-ivf"]


def _build(X, meta, engine, **kw):
    if engine == "exact":
        return CellIndex.build(X, meta, engine="exact", **kw)
    return CellIndex.build(X, meta, engine=engine, nlist=16, **kw)


@pytest.mark.parametrize("engine", ENGINES)
def test_filters_match_bruteforce(small, engine):
    X, meta = small
    idx = _build(X, meta, engine)
    nprobe = idx.nlist
    Q = X[::97]
    cases = {
        "dict": ({"study": "s0"}, meta.study.eq("s0").to_numpy()),
        "dict-list": ({"cell_type": ["t1", "t3"]}, meta.cell_type.isin(["t1", "t3"]).to_numpy()),
        "exclude": ({"exclude": {"cell_type": "t1"}, "study": "s1"},
                    (meta.cell_type.ne("t1") & meta.study.eq("s1")).to_numpy()),
        "query": ("n < 300 and study == 's1'", ((meta.n < 300) & meta.study.eq("s1")).to_numpy()),
        "mask": (np.arange(1500) % 5 == 0, np.arange(1500) % 5 == 0),
        "ids": (np.arange(0, 1500, 7), np.isin(np.arange(1500), np.arange(0, 1500, 7))),
    }
    for name, (flt, allowed) in cases.items():
        D, I = idx.search(Q, 8, filter=flt, nprobe=nprobe)
        Dr, Ir = brute(Q, X, 8, "cosine", allowed=allowed)
        np.testing.assert_array_equal(I, Ir, err_msg=name)
        np.testing.assert_allclose(D, Dr, atol=1e-5, err_msg=name)
    # a filter that leaves 3 cells pads the rest
    D, I = idx.search(Q[:2], 5, filter=np.isin(np.arange(1500), [3, 4, 5]), nprobe=nprobe)
    assert (np.sort(I[:, :3], axis=1) == [3, 4, 5]).all() and (I[:, 3:] == -1).all()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_range_search_matches_bruteforce(small, engine, metric):
    X, meta = small
    idx = _build(X, meta, engine, metric=metric)
    Q = X[[7, 55, 400, 1200]]
    Dfull, Ifull = brute(Q, X, len(X), metric)
    radius = float(np.quantile(Dfull[:, 1:40], 0.5))
    res = idx.range_search(Q, radius, nprobe=idx.nlist)
    assert len(res) == len(Q)
    for (d, i), dr, ir in zip(res, Dfull, Ifull, strict=True):
        keep = dr <= radius
        np.testing.assert_array_equal(i, ir[keep])
        np.testing.assert_allclose(d, dr[keep], atol=1e-5)
    flt = {"study": "s1"}
    res = idx.range_search(Q, radius, filter=flt, nprobe=idx.nlist)
    ok = meta.study.eq("s1").to_numpy()
    for (_, i), ir, dr in zip(res, Ifull, Dfull, strict=True):
        np.testing.assert_array_equal(i, ir[(dr <= radius) & ok[np.maximum(ir, 0)]])


# ------------------------------------------------------------------------------------------------
# add / remove / metadata
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_add_remove(small, engine):
    X, meta = small
    idx = _build(X[:1000], meta.iloc[:1000], engine)
    new = idx.add(X[1000:], meta.iloc[1000:])
    np.testing.assert_array_equal(new, np.arange(1000, 1500))
    assert idx.ntotal == 1500 and idx.next_id == 1500
    assert idx.metadata.loc[1200, "n"] == 1200
    gone = np.arange(0, 1500, 4)
    assert idx.remove(np.concatenate([gone, gone[:5], [-3, 99_999]])) == gone.size
    assert idx.remove(gone[:10]) == 0
    assert idx.ntotal == 1500 - gone.size and len(idx.metadata) == idx.ntotal
    assert not idx.metadata.index.isin(gone).any()
    D, I = idx.search(X[::50], 10, nprobe=idx.nlist)
    assert not np.isin(I, gone).any()
    alive = ~np.isin(np.arange(1500), gone)
    Dr, Ir = brute(X[::50], X, 10, "cosine", allowed=alive)
    np.testing.assert_array_equal(I, Ir)
    # removed cells do not come back through a filter either
    _, I2 = idx.search(X[::50], 10, filter={"study": ["s0", "s1"]}, nprobe=idx.nlist)
    np.testing.assert_array_equal(I2, Ir)
    # ids are never reused
    again = idx.add(X[:3], meta.iloc[:3])
    np.testing.assert_array_equal(again, [1500, 1501, 1502])


def test_native_tombstones_compact(small):
    X, _ = small
    idx = CellIndex.build(X, engine="native-ivf", nlist=16)
    idx.remove(np.arange(0, 1500, 2))  # half: compaction runs
    assert idx._engine.n_dead == 0 and idx._engine.ids.shape[0] == 750
    _, I = idx.search(X[:20], 5, nprobe=16)
    assert (I % 2 == 1).all()


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["exact", "native-ivf", "faiss-ivf"])
def test_stream_of_chunks_builds_the_same(small, engine):
    X, meta = small
    kw = {} if engine == "exact" else {"nlist": 16}
    a = CellIndex.build(X, meta, engine=engine, **kw)
    chunks = (X[s : s + 400] for s in range(0, 1500, 400))
    metas = (meta.iloc[s : s + 400] for s in range(0, 1500, 400))
    b = CellIndex.build(chunks, metas, engine=engine, train_size=1500, **kw)
    assert b.ntotal == 1500
    pd.testing.assert_frame_equal(a.metadata, b.metadata)
    np.testing.assert_array_equal(a.search(X[:30], 5, nprobe=b.nprobe)[1],
                                  b.search(X[:30], 5, nprobe=b.nprobe)[1])


def test_anndata_input(small):
    ad = pytest.importorskip("anndata")
    X, meta = small
    adata = ad.AnnData(obs=meta.set_index(meta.index.astype(str)))
    adata.obsm["X_scatlas"] = X
    idx = CellIndex.build(adata)
    assert list(idx.metadata.columns) == ["cell_type", "study", "n"]
    with pytest.raises(ScatlasInputError, match="obsm"):
        CellIndex.build(adata, obsm_key="X_nope")


def test_auto_engine_choice():
    X = clustered_embeddings(2000, 8, n_clusters=5)
    assert CellIndex.build(X).engine == "exact"
    big = np.zeros((60_000, 2), np.float32)
    big[:, 0] = 1
    from scatlas.search.index import choose_engine

    assert choose_engine("auto", len(big), "cpu") == "faiss-ivf"
    assert choose_engine("auto", len(big), "gpu") in ("faiss-gpu", "native-ivf")


def test_query_validation(small):
    X, _ = small
    idx = CellIndex.build(X)
    bad = X[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(ScatlasInputError, match="NaN"):
        idx.search(bad)
    with pytest.raises(ScatlasInputError, match="dimension 16"):
        idx.search(X[:3, :10])
    with pytest.raises(ScatlasInputError, match="2-D"):
        idx.search(X[0])
    with pytest.raises(ScatlasInputError, match="k must be >= 1"):
        idx.search(X[:2], k=0)
    with pytest.raises(ScatlasInputError, match="no rows"):
        idx.search(X[:0])
    with pytest.raises(ScatlasInputError, match="not in the metadata"):
        idx.search(X[:2], filter={"nope": 1})
    with pytest.raises(ScatlasInputError, match="one entry per id"):
        idx.search(X[:2], filter=np.ones(3, bool))
    with pytest.raises(ScatlasInputError, match="metric"):
        CellIndex.build(X, metric="hamming")
    with pytest.raises(ScatlasInputError, match="engine"):
        CellIndex.build(X, engine="annoy")
    with pytest.raises(ScatlasInputError, match="NaN"):
        CellIndex.build(bad)
    with pytest.raises(ScatlasInputError, match="columns"):
        idx.add(X[:2, :4])
    with pytest.raises(ScatlasInputError, match="rows"):
        CellIndex.build(X, pd.DataFrame({"a": [1, 2]}))
    with pytest.raises(ScatlasInputError, match="nprobe"):
        CellIndex.build(X, engine="native-ivf", nlist=8).search(X[:2], nprobe=9)


# ------------------------------------------------------------------------------------------------
# GPU: the CuPy native IVF equals its NumPy twin and faiss' CPU IVF
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_native_ivf_gpu_matches_cpu_and_faiss(clustered):
    """Same centroids, same probed lists and candidates; the keys (128-term float32 dot
    products of unit rows) are summed by another device and another library: equal up to ties
    within that rounding (tests/helpers/neighbour_sets.py), not bit for bit."""
    from tests.helpers.neighbour_sets import assert_same_neighbours, float32_sum_tolerance

    tol = float32_sum_tolerance(128, scale=1.0)
    cp = backend.gpu_module()
    X, Q = clustered
    cpu = CellIndex.build(X, engine="native-ivf", device="cpu")
    gpu = CellIndex.build(X, engine="native-ivf", device="gpu")
    assert gpu.device == "gpu" and isinstance(gpu._engine.vectors, cp.ndarray)
    # same centroids for a like-for-like comparison
    g = NativeIVF(128, "ip", cpu.nlist, device="gpu")
    g.set_centroids(cpu._engine.centroids)
    g.bulk_add(lambda record: iter([(X, np.arange(len(X)))]))
    kc, ic = cpu._engine.search(Q, 10, cpu.nprobe)
    kg, ig = g.search(cp.asarray(Q), 10, cpu.nprobe)
    assert_same_neighbours(kc, ic, kg, ig, atol=tol)
    ref = _faiss_ivf_with(backend.to_host(cpu._engine.centroids), X, "ip", cpu.nprobe)
    Df, If = ref.search(Q, 10)
    assert_same_neighbours(-Df, If.astype(np.int64), kg, ig, atol=tol)  # faiss: similarities
    # the public API returns the caller's array kind
    D, I = gpu.search(cp.asarray(Q), 10)
    assert isinstance(I, cp.ndarray)
    _, Ir = brute(Q, X, 10, "cosine")
    assert recall(backend.to_host(I), Ir) >= 0.95


@pytest.mark.gpu
def test_faiss_gpu_engine_when_available(clustered):
    from scatlas.search.index import faiss_gpu_available

    if not faiss_gpu_available():
        pytest.skip("faiss without GPU support")
    X, Q = clustered
    idx = CellIndex.build(X, engine="faiss-gpu")
    _, Ir = brute(Q, X, 10, "cosine")
    assert recall(idx.search(Q, 10)[1], Ir) >= 0.95
    _, I = idx.search(Q, 10, filter=np.arange(0, 30_000, 2))
    assert ((I % 2 == 0) | (I < 0)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_gpu_matches_cpu(small, metric):
    cp = backend.gpu_module()
    X, meta = small
    cpu = CellIndex.build(X, meta, metric=metric, device="cpu")
    gpu = CellIndex.build(cp.asarray(X), meta, metric=metric)
    assert gpu.device == "gpu" and gpu.engine == "exact"
    from tests.helpers.neighbour_sets import (
        assert_same_neighbours,
        assert_same_range_hits,
        float32_sum_tolerance,
    )

    # 16-term float32 sums; cosine: unit rows (magnitudes sum to <= 1); euclidean: squared
    # distances of rows of norm <= ~|X|max sqrt(16), reported as their square roots
    scale = 1.0 if metric == "cosine" else 4 * 16 * float(np.abs(X).max()) ** 2
    tol = float32_sum_tolerance(16, scale=scale)
    tol = tol if metric == "cosine" else np.sqrt(tol)
    Q = X[::11]
    for flt in (None, {"study": "s0"}):
        Dc, Ic = cpu.search(Q, 10, filter=flt)
        Dg, Ig = gpu.search(Q, 10, filter=flt)
        assert_same_neighbours(Dc, Ic, Dg, Ig, atol=tol)
    assert_same_range_hits(cpu.range_search(Q, 0.2), gpu.range_search(Q, 0.2), 0.2, atol=tol)
    gpu.remove(np.arange(0, 1500, 3))
    cpu.remove(np.arange(0, 1500, 3))
    assert_same_neighbours(*cpu.search(Q, 10), *gpu.search(Q, 10), atol=tol)


@pytest.mark.gpu
def test_native_ivf_gpu_filters_add_remove(small):
    X, meta = small
    cpu = CellIndex.build(X[:1000], meta.iloc[:1000], engine="native-ivf", nlist=16,
                          device="cpu")
    gpu = CellIndex.build(X[:1000], meta.iloc[:1000], engine="native-ivf", nlist=16,
                          device="gpu")
    for idx in (cpu, gpu):
        idx.add(X[1000:], meta.iloc[1000:])
        idx.remove(np.arange(0, 1500, 5))
    from tests.helpers.neighbour_sets import assert_same_neighbours, float32_sum_tolerance

    Q = X[::13]
    alive = ~np.isin(np.arange(1500), np.arange(0, 1500, 5))
    for flt, allowed in ((None, alive), ({"study": "s1"}, alive & meta.study.eq("s1").values)):
        Dg, Ig = gpu.search(Q, 10, nprobe=16, filter=flt)
        Dr, Ir = brute(Q, X, 10, "cosine", allowed=allowed)  # float64: one side's rounding
        assert_same_neighbours(Dr, Ir, Dg, Ig, atol=float32_sum_tolerance(16, sides=1))


# ------------------------------------------------------------------------------------------------
# zero vectors under the cosine metric
# ------------------------------------------------------------------------------------------------
def test_cosine_refuses_zero_rows(small):
    """A zero vector has no direction: cosine searches, builds, adds and centroid queries refuse
    it naming the row; euclidean indexes accept it (distance = the other vector's norm)."""
    from scatlas.search import annotate, search_centroid

    X, meta = small
    idx = CellIndex.build(X, meta)
    Q = X[:5].copy()
    Q[[1, 3]] = 0.0
    for call in (lambda: idx.search(Q, 3), lambda: idx.range_search(Q, 0.5),
                 lambda: annotate(idx, Q, 5, label_key="cell_type"),
                 lambda: search_centroid(idx, Q, 3)):
        with pytest.raises(ScatlasInputError, match=r"row\(s\) 1, 3 are all zeros"):
            call()
    tiny = X[:2].copy()
    tiny[0] = 1e-30  # its float32 norm underflows to 0: no direction either
    with pytest.raises(ScatlasInputError, match=r"row\(s\) 0 are all zeros"):
        idx.search(tiny, 3)
    bad = X[:300].copy()
    bad[250] = 0.0
    with pytest.raises(ScatlasInputError, match=r"row\(s\) 250 are all zeros"):
        CellIndex.build(bad, chunk_size=100)  # row numbers count across chunks
    with pytest.raises(ScatlasInputError, match=r"row\(s\) 250 are all zeros"):
        CellIndex.build(bad, engine="native-ivf", nlist=4, chunk_size=100)
    n0 = idx.ntotal
    with pytest.raises(ScatlasInputError, match=r"row\(s\) 0 are all zeros"):
        idx.add(np.zeros((1, X.shape[1]), np.float32))
    assert idx.ntotal == n0
    # euclidean: a zero query is a point like any other, its distances are the norms
    eu = CellIndex.build(X[:50], metric="euclidean")
    D, ids = eu.search(np.zeros((1, X.shape[1]), np.float32), 3)
    want = np.sort(np.linalg.norm(X[:50].astype(np.float64), axis=1))[:3]
    np.testing.assert_allclose(D[0], want, rtol=1e-5)


def test_service_maps_zero_row_to_400(small):
    """POST /search and /annotate with a zero embedding: 400 naming the row; a concurrent good
    request batched with it still gets its answer (the batcher retries requests one by one)."""
    import asyncio
    import warnings

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    from scatlas.search.service import create_app

    X, meta = small
    idx = CellIndex.build(X, meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = create_app(idx, max_wait_ms=20.0)
    service = app.state.service
    Q = X[:3].copy()
    Q[2] = 0.0

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(
                c.post("/search", json={"embeddings": Q.tolist(), "k": 3}),
                c.post("/search", json={"embeddings": X[:2].tolist(), "k": 3}),
                c.post("/annotate", json={"embeddings": Q.tolist(), "k": 3,
                                          "label_key": "cell_type"}))
        await service.shutdown()
        return rs

    bad, good, bad_annotate = asyncio.run(main())
    assert bad.status_code == 400 and "row(s) 2 are all zeros" in bad.json()["error"]
    assert bad_annotate.status_code == 400 and "all zeros" in bad_annotate.json()["error"]
    assert good.status_code == 200
    np.testing.assert_array_equal(np.asarray(good.json()["ids"]), idx.search(X[:2], 3)[1])
