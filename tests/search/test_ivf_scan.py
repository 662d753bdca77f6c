"""The native IVF's list-major scan (issue 19, item 1): GEMM screening per list, a running top-k,
and exact re-scoring of the candidates within the GEMM error of the k-th.

Reference: exact search (float64) restricted to the probed lists, by brute force over the rows
stored in those lists (the index's own layout says which list holds a row; the probe is the
engine's ``_probe``, which the scan is given). Compared up to ties
(tests/helpers/neighbour_sets.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from scatlas import backend
from scatlas.search.engines import ivf_native
from scatlas.search.engines.ivf_native import NativeIVF
from scatlas.search.synthetic import clustered_embeddings
from tests.helpers import fake_gpu
from tests.helpers.neighbour_sets import assert_same_neighbours, float32_sum_tolerance, recall

D = 16
NLIST = 24


@pytest.fixture(scope="module")
def data():
    X = clustered_embeddings(4000, D, n_clusters=12, seed=11).astype(np.float32)
    X[3000:3030] = X[17]  # 31 exact copies in one list: ties at the k-th cut, broken by id
    Q = np.concatenate([X[::53] + 0.01, X[17:18]]).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    return X, Q


@pytest.fixture(params=["classes", "merged"])
def shapes(request, monkeypatch):
    """Both extremes of the plan: units in classes of similar shape, never merged; or every
    class merged into the longest of its query count (one padded shape)."""
    merge = 0 if request.param == "classes" else 2**62
    monkeypatch.setattr(ivf_native, "_MERGE_CPU", merge)
    monkeypatch.setattr(ivf_native, "_MERGE_GPU", merge)
    return request.param


def _build(X, kind, device="cpu", list_dtype="float32", scale=1.0, pieces=1):
    eng = NativeIVF(D, kind, NLIST, device=device, list_dtype=list_dtype)
    Xs = (X * scale).astype(np.float32)
    eng.train(Xs[:2000])
    bounds = np.linspace(0, len(Xs), pieces + 1).astype(int)
    if device == "gpu":
        Xs = fake_gpu.to_fake_gpu(Xs)
    eng.bulk_add(lambda record: iter([(Xs[: bounds[1]], np.arange(bounds[1]))]))
    for a, b in zip(bounds[1:-1], bounds[2:], strict=True):  # appended segments
        eng.add(Xs[a:b], np.arange(a, b))
    return eng, (X * scale).astype(np.float32)


def _list_of_ids(eng):
    """List of every stored id, from the index's layout (all segments)."""
    out = {}
    for seg in eng._segs:
        ids = backend.to_host(seg.ids)
        lst = backend.to_host(seg.list_of_rows())
        out.update(zip(ids.tolist(), lst.tolist(), strict=True))
    return out


def _reference(eng, Xs, Q, k, nprobe, allowed=None, dead=(), radius=None):
    """Exact (float64) keys over the rows of each query's probed lists, as stored."""
    stored = Xs.astype(eng.list_dtype).astype(np.float64)  # what the index holds
    probe = backend.to_host(eng._probe(eng_q(eng, Q), nprobe))
    where = _list_of_ids(eng)
    ids_all = np.array(sorted(where))
    lists = np.array([where[i] for i in ids_all])
    keep = ~np.isin(ids_all, np.asarray(dead, dtype=np.int64))
    if allowed is not None:
        keep &= allowed[ids_all]
    Dk, Ik, hits = [], [], []
    for q, pr in zip(Q.astype(np.float64), probe, strict=True):
        rows = ids_all[np.isin(lists, pr) & keep]
        V = stored[rows]
        key = ((V - q) ** 2).sum(1) if eng.kind == "l2" else -(V @ q)
        o = np.lexsort((rows, key))
        if radius is not None:
            sel = o[key[o] <= radius]
            hits.append((key[sel], rows[sel]))
            continue
        o = o[:k]
        Dk.append(np.concatenate([key[o], np.full(k - len(o), np.inf)]))
        Ik.append(np.concatenate([rows[o], np.full(k - len(o), -1)]))
    if radius is not None:
        return hits
    return np.array(Dk), np.array(Ik)


def eng_q(eng, Q):
    return fake_gpu.to_fake_gpu(Q) if eng.device == "gpu" else Q


def _tol(Xs, Q, kind):
    scale = float(np.abs(Xs).max() * np.abs(Q).max() * D) if kind == "ip" else float(
        (np.abs(Xs).max() + np.abs(Q).max()) ** 2 * D)
    return float32_sum_tolerance(D, scale) * 4


@pytest.mark.parametrize("kind,scale", [("ip", 1.0), ("l2", 1.0), ("l2", 30.0)])
@pytest.mark.parametrize("pieces", [1, 3], ids=["one-segment", "appended"])
def test_equals_exact_search_over_the_probed_lists(data, kind, scale, pieces, shapes):
    X, Q = data
    eng, Xs = _build(X, kind, scale=scale, pieces=pieces)
    Qs = (Q * scale).astype(np.float32)
    for nprobe in (1, 3, NLIST):
        for k in (1, 10, 40):
            Dg, Ig = (backend.to_host(a) for a in eng.search(Qs, k, nprobe))
            Dr, Ir = _reference(eng, Xs, Qs, k, nprobe)
            assert_same_neighbours(Dr, Ir, Dg, Ig, atol=_tol(Xs, Qs, kind))


def test_ties_at_the_cut_go_to_the_smaller_ids(data):
    """31 copies of one vector: keys bit-identical (exact re-scoring, whatever GEMM shape
    scored them), so the k best are the k smallest ids among the copies."""
    X, Q = data
    eng, _ = _build(X, "ip", pieces=2)
    copies = np.array([17, *range(3000, 3030)])
    for k in (5, 10, 20):
        Dg, Ig = (backend.to_host(a) for a in eng.search(X[17:18], k, 2))
        np.testing.assert_array_equal(Ig[0], copies[:k])
        assert len(set(Dg[0].tolist())) == 1


def test_filters_and_tombstones(data, shapes):
    X, Q = data
    eng, Xs = _build(X, "ip", pieces=2)
    dead = np.arange(0, 4000, 5)
    eng.remove(dead)
    assert eng.n_dead == len(dead)
    allowed = np.arange(4000) % 3 != 1
    for nprobe in (2, 6):
        Dg, Ig = (backend.to_host(a) for a in eng.search(Q, 10, nprobe, allowed))
        Dr, Ir = _reference(eng, Xs, Q, 10, nprobe, allowed=allowed, dead=dead)
        assert_same_neighbours(Dr, Ir, Dg, Ig, atol=_tol(Xs, Q, "ip"))
        assert not np.isin(Ig, dead).any() and allowed[Ig[Ig >= 0]].all()


def test_range_search_equals_the_reference(data, shapes):
    X, Q = data
    eng, Xs = _build(X, "l2", pieces=2)
    radius = 0.08
    got = eng.range_search(Q, radius, 4)
    ref = _reference(eng, Xs, Q, None, 4, radius=radius)
    tol = _tol(Xs, Q, "l2")
    for (gk, gi), (rk, ri) in zip(got, ref, strict=True):
        gk, gi = backend.to_host(gk), backend.to_host(gi)
        a, b = dict(zip(gi.tolist(), gk.tolist(), strict=True)), dict(
            zip(ri.tolist(), rk.tolist(), strict=True))
        for i in set(a) ^ set(b):  # only at the radius, within rounding
            assert abs(a.get(i, b.get(i)) - radius) <= tol
        assert all(abs(a[i] - b[i]) <= tol for i in set(a) & set(b))
        assert np.all(np.diff(gk) >= 0)


def test_more_neighbours_than_candidates_pads(data):
    X, Q = data
    eng, _ = _build(X, "ip")
    Dg, Ig = (backend.to_host(a) for a in eng.search(Q[:4], 3000, 1))
    n = (Ig >= 0).sum(axis=1)
    assert (n < 3000).all() and np.isinf(Dg[Ig < 0]).all()
    for row, cnt in zip(Dg, n, strict=True):
        assert np.isfinite(row[:cnt]).all() and np.all(np.diff(row[:cnt]) >= 0)
    empty = NativeIVF(D, "ip", NLIST)
    empty.set_centroids(backend.to_host(eng.centroids))
    Dk, Ik = empty.search(Q[:3], 5, 2)
    assert Ik.shape == (3, 5) and (Ik == -1).all() and np.isinf(Dk).all()


def test_float16_lists_recall_and_exact_over_stored_values(data, tmp_path):
    """fp16 lists: half the bytes; results are the exact search over the stored (fp16) values,
    and recall@10 against the float32 index stays >= 0.95."""
    X, Q = data
    e32, Xs = _build(X, "ip")
    e16, _ = _build(X, "ip", list_dtype="float16")
    assert e16.list_dtype == np.float16 and e16.vectors.dtype == np.float16
    assert e16.vectors.nbytes * 2 == e32.vectors.nbytes
    for nprobe in (2, NLIST):
        D16, I16 = (backend.to_host(a) for a in e16.search(Q, 10, nprobe))
        _, I32 = (backend.to_host(a) for a in e32.search(Q, 10, nprobe))
        assert recall(I16, I32) >= 0.95
        Dr, Ir = _reference(e16, Xs, Q, 10, nprobe)
        assert_same_neighbours(Dr, Ir, D16, I16, atol=_tol(Xs, Q, "ip"))
    # saved as float16 and loaded as such (the manifest's engine_meta carries list_dtype)
    e16.add(X[:50] * 0.5, np.arange(5000, 5050))
    e16.save(tmp_path)
    assert np.load(tmp_path / "vectors.npy").dtype == np.float16
    meta = {"dim": D, "nlist": NLIST, "kind": "ip", "engine_meta": e16.meta()}
    assert meta["engine_meta"]["list_dtype"] == "float16"
    back = NativeIVF.load(tmp_path, meta, "cpu")
    assert back.list_dtype == np.float16
    for a, b in zip(back.search(Q, 10, 3), e16.search(Q, 10, 3), strict=True):
        np.testing.assert_array_equal(backend.to_host(a), backend.to_host(b))
    with pytest.raises(ValueError, match="list_dtype"):
        NativeIVF(D, "ip", NLIST, list_dtype="int32")


@pytest.mark.parametrize("kind", ["ip", "l2"])
def test_cupy_path_equals_numpy_path(data, monkeypatch, kind, shapes):
    """The CuPy branch (on the NumPy stand-in, with the GPU's query blocks and step sizes)
    returns exactly what the NumPy twin returns: the final keys are exact pair keys."""
    X, Q = data
    cpu, _ = _build(X, kind, pieces=2)
    allowed = np.arange(4000) % 4 != 0
    want = [[backend.to_host(a) for a in cpu.search(Q, 10, nprobe, al)]
            for nprobe in (1, 5) for al in (None, allowed)]
    want_r = cpu.range_search(Q, -0.9 if kind == "ip" else 0.1, 3)
    fake_gpu.install(monkeypatch)
    monkeypatch.setattr(ivf_native, "_QBLOCK_GPU", 4)  # many query blocks per list
    gpu, _ = _build(X, kind, device="gpu", pieces=2)
    got = [[a for a in gpu.search(eng_q(gpu, Q), 10, nprobe,
                                  None if al is None else fake_gpu.to_fake_gpu(al))]
           for nprobe in (1, 5) for al in (None, allowed)]
    for (wk, wi), (gk, gi) in zip(want, got, strict=True):
        assert backend.is_gpu_array(gk) and backend.is_gpu_array(gi)
        np.testing.assert_array_equal(backend.to_host(gi), wi)
        np.testing.assert_array_equal(backend.to_host(gk), wk)
    got_r = gpu.range_search(eng_q(gpu, Q), -0.9 if kind == "ip" else 0.1, 3)
    for (wk, wi), (gk, gi) in zip(want_r, got_r, strict=True):
        np.testing.assert_array_equal(backend.to_host(gi), backend.to_host(wi))
        np.testing.assert_array_equal(backend.to_host(gk), backend.to_host(wk))


def test_every_probed_list_is_read_once_per_batch(data, monkeypatch):
    """The scan is list-major: one GEMM unit per probed list (when its queries fit one
    block), rows read = the probed lists' padded lengths, not once per (query, list) pair."""
    X, Q = data
    eng, _ = _build(X, "ip")
    Qm = np.repeat(Q, 8, axis=0)  # every list probed by many queries
    monkeypatch.setattr(ivf_native, "_MERGE_CPU", 0)  # classes as the grid makes them
    eng.search(Qm, 10, 4)
    c = eng.scan_counts()
    per_list = np.bincount(backend.to_host(eng._probe(Qm, 4)).ravel(), minlength=NLIST)
    probed = np.flatnonzero(per_list)
    sizes = np.diff(backend.to_host(eng.offsets))[probed]
    units = -(-per_list[probed] // ivf_native._QBLOCK_CPU)  # query blocks of each list
    assert c["queries"] == len(Qm) and c["pairs"] == len(Qm) * 4
    assert c["lists_read"] == units.sum()
    assert c["rows_read"] == (units * ivf_native._row_class(sizes)).sum()
    assert (units * sizes).sum() <= c["rows_read"] <= 1.25 * (units * sizes).sum()
    assert units.sum() < per_list.sum() / 8  # far fewer list reads than (query, list) pairs
    assert c["real_scores"] <= c["scores"] and c["candidates"] >= 10 * len(Qm)
    assert c["list_bytes"] == c["rows_read"] * D * 4
    # batches: a small score budget splits the queries, each batch reads its lists again
    monkeypatch.setattr(ivf_native, "_SCORES_CPU", 20_000)
    D1, I1 = eng.search(Qm, 10, 4)
    assert eng.scan_counts()["queries"] == len(Qm) and eng.scan_counts()["rows_read"] > c[
        "rows_read"]
    monkeypatch.undo()
    D2, I2 = eng.search(Qm, 10, 4)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_array_equal(D1, D2)


@pytest.mark.parametrize("kind", ["ip", "l2"])
def test_block_pruned_probe_equals_a_full_selection(kind, monkeypatch):
    """The probe prunes by block minima; it picks the same lists as a selection over every
    centroid, ties (duplicate centroids) by the smaller list, on NumPy and the CuPy stand-in."""
    from scatlas.search.engines import smallest_k

    rng = np.random.default_rng(3)
    nlist = 700
    C = rng.standard_normal((nlist, D)).astype(np.float32)
    C[350:360] = C[5]  # exact ties across blocks
    Q = np.concatenate([rng.standard_normal((300, D)), C[5:6] * 1.5]).astype(np.float32)
    S = Q.astype(np.float64) @ C.T.astype(np.float64)
    for nprobe in (1, 4, 11, 40):
        eng = NativeIVF(D, kind, nlist)
        eng.set_centroids(C)
        got = eng._probe(Q, nprobe)
        keys = (eng._cnorm[None, :] - 2.0 * (Q @ C.T)) if kind == "l2" else -(Q @ C.T)
        lists = np.broadcast_to(np.arange(nlist), keys.shape)
        np.testing.assert_array_equal(got, smallest_k(keys, lists, nprobe)[1])
        if kind == "ip":  # and the true best lists, up to float rounding
            want = np.argsort(-S, axis=1, kind="stable")[:, :nprobe]
            assert np.mean(np.sort(got, 1) == np.sort(want, 1)) > 0.99
        assert list(got[-1][: min(nprobe, 11)]) == [5, *range(350, 360)][: min(nprobe, 11)]
    fake_gpu.install(monkeypatch)
    gpu = NativeIVF(D, kind, nlist, device="gpu")
    gpu.set_centroids(fake_gpu.to_fake_gpu(C))
    np.testing.assert_array_equal(backend.to_host(gpu._probe(fake_gpu.to_fake_gpu(Q), 11)),
                                  eng._probe(Q, 11))
