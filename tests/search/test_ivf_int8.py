"""int8 scalar-quantised lists of the native IVF, with exact re-ranking of a shortlist (issue 19,
item 1).

References: NumPy (float64) over the DECODED codes (``offset + scale * code``, computed here from
the stored codes and quantiser) restricted to the probed lists, for ``rerank=0``; exact search
(float64 over the float32 data) for recall; the float16 refine rows for range search.
"""

from __future__ import annotations

import numpy as np
import pytest

from scatlas import backend
from scatlas.exceptions import ScatlasInputError
from scatlas.search import CellIndex
from scatlas.search.engines.ivf_native import NativeIVF
from scatlas.search.synthetic import clustered_embeddings
from tests.helpers import fake_gpu
from tests.helpers.neighbour_sets import assert_same_neighbours, float32_sum_tolerance, recall

D = 16
NLIST = 24


@pytest.fixture(scope="module")
def data():
    X = clustered_embeddings(4000, D, n_clusters=12, seed=11).astype(np.float32)
    Q = (X[::37] + 0.02 * clustered_embeddings(109, D, n_clusters=12, seed=5)[:109])
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    return X, Q.astype(np.float32)


def _build(X, kind, rerank, device="cpu", pieces=2):
    eng = NativeIVF(D, kind, NLIST, device=device, list_dtype="int8", rerank=rerank)
    eng.train(X)  # the quantiser sees every row: all in range
    cut = len(X) // pieces
    Xd = fake_gpu.to_fake_gpu(X) if device == "gpu" else X
    eng.bulk_add(lambda record: iter([(Xd[:cut], np.arange(cut))]))
    for a in range(cut, len(X), cut):  # appended segments
        eng.add(Xd[a : a + cut], np.arange(a, min(len(X), a + cut)))
    return eng


def _decoded_by_id(eng):
    """id -> (list, decoded float64 row) from the stored codes and quantiser."""
    sq = backend.to_host(eng.sq).astype(np.float64)
    out = {}
    for seg in eng._segs:
        codes = backend.to_host(seg.vectors).astype(np.float64)
        ids = backend.to_host(seg.ids)
        lst = backend.to_host(seg.list_of_rows())
        for i, li, c in zip(ids.tolist(), lst.tolist(), codes, strict=True):
            out[i] = (li, sq[1] + sq[0] * c)
    return out


def _reference(eng, Q, k, nprobe, rows_of=None):
    """Exact float64 search over the probed lists of the decoded rows (or ``rows_of``)."""
    dec = _decoded_by_id(eng)
    ids = np.array(sorted(dec))
    lists = np.array([dec[i][0] for i in ids])
    V = np.stack([dec[i][1] for i in ids]) if rows_of is None else rows_of[ids].astype(
        np.float64)
    probe = backend.to_host(eng._probe(Q if eng.device == "cpu" else fake_gpu.to_fake_gpu(Q),
                                       nprobe))
    Dk, Ik = [], []
    for q, pr in zip(Q.astype(np.float64), probe, strict=True):
        sel = np.isin(lists, pr)
        key = ((V[sel] - q) ** 2).sum(1) if eng.kind == "l2" else -(V[sel] @ q)
        o = np.lexsort((ids[sel], key))[:k]
        Dk.append(key[o])
        Ik.append(ids[sel][o])
    return np.array(Dk), np.array(Ik)


def test_quantiser_codes_and_decode_error(data):
    X, _ = data
    eng = _build(X, "ip", rerank=0)
    codes = np.concatenate([backend.to_host(s.vectors) for s in eng._segs])
    assert codes.dtype == np.int8 and codes.min() >= -127 and codes.max() <= 127
    dec = _decoded_by_id(eng)
    scale = backend.to_host(eng.sq)[0]
    err = np.abs(np.stack([dec[i][1] for i in range(len(X))]) - X)
    assert (err <= scale / 2 * (1 + 1e-5) + 1e-7).all()  # rounding: half a step, in range
    assert eng.bytes_per_cell() == D + 13 and eng.list_dtype == np.int8


@pytest.mark.parametrize("kind", ["ip", "l2"])
def test_scan_scores_equal_the_decoded_reference(data, kind):
    """rerank=0: the results are the exact search over the decoded codes (the scan scores the
    codes with pre-scaled queries; candidates re-scored from the decoded rows)."""
    X, Q = data
    eng = _build(X, kind, rerank=0)
    for nprobe in (2, NLIST):
        Dg, Ig = (backend.to_host(a) for a in eng.search(Q, 10, nprobe))
        Dr, Ir = _reference(eng, Q, 10, nprobe)
        tol = float32_sum_tolerance(D, 8.0) * 8
        assert_same_neighbours(Dr, Ir, Dg, Ig, atol=tol)


@pytest.mark.parametrize("kind", ["ip", "l2"])
def test_reranked_keys_are_the_refine_rows_and_recall(data, kind):
    """rerank=4: keys are exact over the float16 refine rows, recall@10 vs exact float32
    search >= 0.95 (and no lower than without re-ranking)."""
    X, Q = data
    eng = _build(X, kind, rerank=4)
    X16 = X.astype(np.float16)
    D4, I4 = (backend.to_host(a) for a in eng.search(Q, 10, NLIST))
    _, Iex = _reference(eng, Q, 10, NLIST, rows_of=X)
    Dr, Ir = _reference(eng, Q, 10, NLIST, rows_of=X16)
    assert recall(I4, Iex) >= 0.95
    assert recall(I4, Ir) >= 0.99  # the shortlist keeps the refine-exact top 10
    hit = (I4 == Ir).all(axis=1)
    np.testing.assert_allclose(D4[hit], Dr[hit], atol=float32_sum_tolerance(D, 4.0) * 8)
    _, I0 = (backend.to_host(a) for a in _build(X, kind, rerank=0).search(Q, 10, NLIST))
    assert recall(I4, Iex) >= recall(I0, Iex)


def test_range_search_with_reranking(data):
    X, Q = data
    eng = _build(X, "ip", rerank=4)
    X16 = X.astype(np.float64).astype(np.float16).astype(np.float64)
    res = eng.range_search(Q, -0.95, NLIST)
    for q, (kk, ii) in zip(Q.astype(np.float64), res, strict=True):
        key = -(X16 @ q)
        want = np.flatnonzero(key <= -0.95 - 1e-5)  # clear of the rounding at the radius
        assert set(want.tolist()) <= set(backend.to_host(ii).tolist())
        assert (backend.to_host(kk) <= -0.95).all()


def test_cellindex_int8_recall_and_persist(tmp_path):
    """CellIndex.build(list_dtype="int8"): recall@10 >= 0.95 vs exact at the default nprobe on
    clustered data; saved (codes, quantiser, refine rows) and loaded identically."""
    X = clustered_embeddings(20000, 32, n_clusters=40, seed=3)
    Q = X[::200] + 0.05 * clustered_embeddings(100, 32, n_clusters=40, seed=4)
    idx = CellIndex.build(X[:18000], list_dtype="int8")
    assert idx.engine == "native-ivf"
    idx.add(X[18000:])
    idx.remove(np.arange(0, 20000, 97))
    ref = CellIndex.build(X, engine="exact")
    ref.remove(np.arange(0, 20000, 97))
    _, I = idx.search(Q, 10)
    _, G = ref.search(Q, 10)
    assert recall(I, G) >= 0.95
    assert idx.bytes_per_cell() == 32 + 13 + 2 * 32
    idx.save(tmp_path / "i8")
    back = CellIndex.load(tmp_path / "i8")
    assert back.engine_object.list_dtype == np.int8 and back.engine_object.rerank == 4
    for a, b in zip(back.search(Q, 10), idx.search(Q, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    assert {"quantizer.npy", "refine.npy"} <= {p.name for p in (tmp_path / "i8").iterdir()}
    plain = CellIndex.build(X[:5000], list_dtype="int8", rerank=0, engine="native-ivf")
    plain.save(tmp_path / "p")
    assert not (tmp_path / "p" / "refine.npy").exists()
    np.testing.assert_array_equal(CellIndex.load(tmp_path / "p").search(Q, 5)[1],
                                  plain.search(Q, 5)[1])


def test_bad_options():
    X = clustered_embeddings(2000, 8, n_clusters=4, seed=1)
    with pytest.raises(ScatlasInputError, match="native-ivf") as err:
        CellIndex.build(X, engine="exact", list_dtype="int8")
    assert err.value.param == "list_dtype"
    with pytest.raises(ScatlasInputError, match="rerank"):
        CellIndex.build(X, engine="native-ivf", list_dtype="int8", rerank=-1)
    with pytest.raises(ScatlasInputError, match="list_dtype"):
        CellIndex.build(X, engine="native-ivf", list_dtype="int4")
    with pytest.raises(ScatlasInputError, match="sharded"):
        CellIndex.build(X, engine="native-ivf", list_dtype="int8", n_shards=2)


@pytest.mark.parametrize("rerank", [0, 4])
def test_cupy_path_equals_numpy_path(data, monkeypatch, rerank):
    """The CuPy branch (NumPy stand-in): the same ids and keys as the NumPy twin."""
    X, Q = data
    want = [backend.to_host(a) for a in _build(X, "l2", rerank).search(Q, 10, 5)]
    fake_gpu.install(monkeypatch)
    gpu = _build(X, "l2", rerank, device="gpu")
    got = gpu.search(fake_gpu.to_fake_gpu(Q), 10, 5)
    assert all(backend.is_gpu_array(a) for a in got)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(backend.to_host(g), w)
