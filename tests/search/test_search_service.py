"""The HTTP search service: endpoints against direct ``index.search``, micro-batching that never
mixes rows, the malformed-request battery, the expression path with a model double, and a real
uvicorn server shut down by SIGTERM while requests are in flight.

``LinearModel`` stands in for a trained encoder (``scatlas.models.load(dir)``): it has the model
contract (``genes``, ``latent_dim``, ``embed(adata_or_counts)``) and embeds by aligning genes
(zero fill), log-normalising counts (``log1p(1e4 x / rowsum)``), a fixed random linear map and L2
normalisation, so the expected embedding of any input is computable independently.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scatlas.search._batcher import BatcherClosedError, MicroBatcher
from scatlas.search.service import create_app
from tests.helpers.search_models import DIM, LinearModel, reference

with warnings.catch_warnings():  # starlette 1.x suggests httpx2 for its TestClient
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


REPO = Path(__file__).resolve().parents[2]
def build_index(X, meta, **kwargs):
    from scatlas.search import CellIndex

    return CellIndex.build(X, meta, **kwargs)


def queries(m: int, seed: int = 1, d: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, d)).astype(np.float32)


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def index(ref):
    X, meta = ref
    return build_index(X, meta, engine="exact")


@pytest.fixture(scope="module")
def model():
    # a centre, as a trained encoder's biases: an all-zero cell embeds to a non-zero vector
    # (a cosine index refuses zero vectors)
    return LinearModel([f"g{i}" for i in range(40)], DIM, seed=3, center=0.5)


@pytest.fixture
def client(index, model):
    with TestClient(create_app(index, model, max_wait_ms=1.0)) as c:
        yield c


def check_same(result: dict, distances: np.ndarray, ids: np.ndarray) -> None:
    """A JSON answer equals a direct search (ids exactly, float32 distances to rounding; padded
    slots, id -1, carry a null distance)."""
    got_ids = np.asarray(result["ids"], dtype=np.int64)
    np.testing.assert_array_equal(got_ids, ids)
    pad = ids < 0
    got_d = np.array([[np.nan if v is None else v for v in row] for row in result["distances"]],
                     dtype=np.float32)
    assert np.isnan(got_d[pad]).all()
    np.testing.assert_allclose(got_d[~pad], distances[~pad], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# endpoints
# ------------------------------------------------------------------------------------------------


def test_health(client, index):
    r = client.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok"
    assert (h["ntotal"], h["dim"]) == (index.ntotal, index.dim)
    assert h["engine"] == index.engine and h["metric"] == "cosine"
    assert h["model_loaded"] is True and h["model_latent_dim"] == DIM
    assert set(h["metadata_columns"]) == {"cell_type", "donor", "n_counts"}


@pytest.mark.parametrize("k", [1, 7, 50])
def test_search_equals_direct(client, index, k):
    Q = queries(5, seed=k)
    r = client.post("/search", json={"embeddings": Q.tolist(), "k": k})
    assert r.status_code == 200, r.text
    out = r.json()
    D, I = index.search(Q, k)
    check_same(out, D, I)
    assert out["k"] == k
    # metadata rows are those of the hits, in order
    meta = index.metadata
    for i in range(Q.shape[0]):
        types = [row["cell_type"] for row in out["metadata"][i]]
        assert types == [str(meta.loc[j, "cell_type"]) for j in I[i]]
        assert [row["n_counts"] for row in out["metadata"][i]] == \
            [int(meta.loc[j, "n_counts"]) for j in I[i]]


def test_search_filter_and_options(client, index):
    Q = queries(4, seed=11)
    filt = {"cell_type": ["type1", "type2"], "exclude": {"donor": "d3"}}
    r = client.post("/search", json={"embeddings": Q.tolist(), "k": 6, "filter": filt,
                                     "metadata_columns": ["donor"]})
    assert r.status_code == 200, r.text
    out = r.json()
    D, I = index.search(Q, 6, filter=filt)
    check_same(out, D, I)
    rows = [row for per_query in out["metadata"] for row in per_query]
    assert all(set(row) == {"donor"} and row["donor"] != "d3" for row in rows)
    meta = index.metadata
    assert set(meta.loc[np.asarray(out["ids"]).ravel(), "cell_type"]) <= {"type1", "type2"}
    # without metadata; a single flat vector is one query
    r = client.post("/search", json={"embeddings": Q[0].tolist(), "k": 3,
                                     "include_metadata": False})
    assert r.status_code == 200 and "metadata" not in r.json()
    check_same(r.json(), *index.search(Q[:1], 3))


def test_search_pads_when_filter_leaves_few(client, index):
    meta = index.metadata
    donor_ids = meta.index[(meta["donor"] == "d1") & (meta["cell_type"] == "type0")]
    k = len(donor_ids) + 5
    r = client.post("/search", json={"embeddings": queries(1).tolist(), "k": k,
                                     "filter": {"donor": "d1", "cell_type": "type0"}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["ids"][0][-5:] == [-1] * 5
    assert out["distances"][0][-5:] == [None] * 5
    assert out["metadata"][0][-5:] == [None] * 5
    assert sorted(out["ids"][0][:-5]) == sorted(donor_ids.tolist())


def test_expression_dense_and_sparse(client, index, model):
    rng = np.random.default_rng(5)
    genes = [f"g{i}" for i in range(40)][::-1] + ["not_in_model"]  # reordered, one extra
    counts = rng.poisson(2.0, size=(6, len(genes))).astype(np.float32)
    counts[0, :] = 0  # an all-zero cell is fine
    import anndata as ad

    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = genes
    expected = model.embed(adata)
    D, I = index.search(expected, 5)

    r = client.post("/search/expression", json={"genes": genes, "counts": counts.tolist(),
                                                "k": 5, "return_embeddings": True})
    assert r.status_code == 200, r.text
    check_same(r.json(), D, I)
    np.testing.assert_allclose(np.asarray(r.json()["embeddings"]), expected, atol=1e-6)

    coo = sp.coo_matrix(counts)
    body = {"genes": genes, "k": 5, "sparse": {"shape": list(counts.shape),
                                               "row": coo.row.tolist(), "col": coo.col.tolist(),
                                               "data": coo.data.tolist()}}
    r = client.post("/search/expression", json=body)
    assert r.status_code == 200, r.text
    check_same(r.json(), D, I)

    csr = sp.csr_matrix(counts)
    body["sparse"] = {"shape": list(counts.shape), "indptr": csr.indptr.tolist(),
                      "indices": csr.indices.tolist(), "data": csr.data.tolist()}
    r = client.post("/search/expression", json=body)
    assert r.status_code == 200, r.text
    check_same(r.json(), D, I)


def test_expression_without_model_is_404(index):
    with TestClient(create_app(index)) as c:
        r = c.post("/search/expression", json={"genes": ["a"], "counts": [[1]]})
        assert r.status_code == 404
        assert "no model" in r.json()["error"]
        assert c.get("/health").json()["model_loaded"] is False


def test_model_dimension_must_match_index(index):
    from scatlas._validate import ScatlasInputError

    with pytest.raises(ScatlasInputError, match="dimensions"):
        create_app(index, LinearModel(["a", "b"], DIM + 1))


def test_annotate_endpoint(client, index, model):
    from scatlas.search import annotate

    Q = queries(8, seed=21)
    r = client.post("/annotate", json={"embeddings": Q.tolist(), "k": 15,
                                       "label_key": "cell_type"})
    assert r.status_code == 200, r.text
    out = r.json()
    table = annotate(index, Q, k=15, label_key="cell_type")
    assert [p["label"] for p in out["predictions"]] == [str(v) for v in table["label"]]
    np.testing.assert_allclose([p["confidence"] for p in out["predictions"]],
                               table["confidence"].to_numpy(dtype=float), rtol=1e-6)
    np.testing.assert_allclose([p["min_dist"] for p in out["predictions"]],
                               table["min_dist"].to_numpy(dtype=float), rtol=1e-5, atol=1e-6)
    assert [p["is_ood"] for p in out["predictions"]] == [bool(v) for v in table["is_ood"]]
    # the rule behind is_ood comes back with the labels, as annotate records it
    assert out["ood"]["ood_source"] == table.attrs["ood_source"]
    assert out["ood"]["ood_rule"] == table.attrs["ood_rule"]
    # a given threshold may be negative (an "ip" index's distances are -q.x); it is applied
    r = client.post("/annotate", json={"embeddings": Q.tolist(), "k": 15,
                                       "label_key": "cell_type", "ood_distance": -1.0})
    assert r.status_code == 200, r.text
    assert r.json()["ood"]["ood_source"] == "given"
    assert all(p["is_ood"] for p in r.json()["predictions"])  # every min_dist > -1
    r = client.post("/annotate", json={"embeddings": Q.tolist(), "label_key": "cell_type",
                                       "ood_distance": "far"})
    assert r.status_code == 400 and "finite number" in r.json()["error"]

    # from expression: same as annotating the model's embedding
    genes = [f"g{i}" for i in range(40)]
    counts = np.random.default_rng(2).poisson(1.5, size=(3, 40))
    r = client.post("/annotate", json={"genes": genes, "counts": counts.tolist(), "k": 10,
                                       "label_key": "cell_type"})
    assert r.status_code == 200, r.text
    emb = model.embed(counts.astype(np.float32))
    expected = annotate(index, emb, k=10, label_key="cell_type")
    assert [p["label"] for p in r.json()["predictions"]] == [str(v) for v in expected["label"]]

    r = client.post("/annotate", json={"embeddings": Q.tolist(), "label_key": "nope"})
    assert r.status_code == 400 and "nope" in r.json()["error"]


# ------------------------------------------------------------------------------------------------
# micro-batching
# ------------------------------------------------------------------------------------------------


def test_concurrent_requests_get_their_own_rows(index):
    """Many simultaneous requests (mixed sizes, k and filters) through one event loop: each answer
    equals the direct search of its own queries, and the batcher really merged requests."""
    app = create_app(index, max_wait_ms=100.0, max_batch=512)
    service = app.state.service
    rng = np.random.default_rng(7)
    filters = [None, {"donor": "d1"}, {"exclude": {"cell_type": "type0"}}]
    specs = []
    for i in range(90):
        m = int(rng.integers(1, 5))
        specs.append((queries(m, seed=100 + i), [5, 9][i % 2], filters[i % 3]))

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            async def one(Q, k, filt):
                body = {"embeddings": Q.tolist(), "k": k, "include_metadata": False}
                if filt is not None:
                    body["filter"] = filt
                return await c.post("/search", json=body)

            out = await asyncio.gather(*(one(*s) for s in specs))
        await service.shutdown()
        return out

    responses = asyncio.run(main())
    for (Q, k, filt), r in zip(specs, responses, strict=True):
        assert r.status_code == 200, r.text
        check_same(r.json(), *index.search(Q, k, filter=filt))
    stats = service.batcher.stats
    assert stats.requests == len(specs)
    assert stats.calls < len(specs) / 3  # 6 (k, filter) groups; far fewer calls than requests
    assert max(stats.requests_hist) > 1
    metrics = service.metrics.snapshot(service.batcher)
    assert metrics["endpoints"]["search"]["requests"] == len(specs)
    assert metrics["batches"]["index_calls"] == stats.calls


def test_threaded_clients_through_testclient(index):
    """Requests from several threads through one TestClient (one server loop)."""
    Qs = [queries(2, seed=300 + i) for i in range(24)]
    results: dict[int, dict] = {}
    with TestClient(create_app(index, max_wait_ms=5.0)) as c:
        def worker(i: int) -> None:
            results[i] = c.post("/search", json={"embeddings": Qs[i].tolist(), "k": 4}).json()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(Qs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, Q in enumerate(Qs):
        check_same(results[i], *index.search(Q, 4))


def test_batcher_groups_isolates_failures_and_drains():
    calls: list[tuple[int, int]] = []

    def search(Q, *, k, fail=False):
        calls.append((Q.shape[0], k))
        if fail or (Q[:, 0] < 0).any():
            raise ValueError("bad query")
        D = np.repeat(Q[:, :1], k, axis=1) + np.arange(k, dtype=np.float32)
        return D, np.tile(np.arange(k), (Q.shape[0], 1))

    async def main():
        b = MicroBatcher(search, max_batch=100, max_wait_ms=50.0)
        await b.start()
        good = [np.full((2, 3), float(i), np.float32) for i in range(1, 6)]
        bad = np.full((1, 3), -1.0, np.float32)
        tasks = [asyncio.ensure_future(b.submit(Q, key=("k", 2), k=2)) for Q in good]
        tasks.append(asyncio.ensure_future(b.submit(bad, key=("k", 2), k=2)))
        tasks.append(asyncio.ensure_future(b.submit(good[0], key=("k", 4), k=4)))
        await asyncio.sleep(0)  # everything submitted before the batch window closes
        results = await asyncio.gather(*tasks, return_exceptions=True)
        # close() answers what is pending without waiting out max_wait, then refuses new work
        late = asyncio.ensure_future(b.submit(good[1], key=("k", 2), k=2))
        await asyncio.sleep(0)
        await b.close()
        late_result = await late
        with pytest.raises(BatcherClosedError):
            await b.submit(good[1], key=("k", 2), k=2)
        b.shutdown_executor()
        return good, results, late_result

    good, results, late_result = asyncio.run(main())
    for Q, (D, ids) in zip(good, results[:5], strict=True):
        np.testing.assert_array_equal(D[:, 0], Q[:, 0])
        assert D.shape == ids.shape == (2, 2)
    assert isinstance(results[5], ValueError)
    assert results[6][0].shape == (2, 4)
    np.testing.assert_array_equal(late_result[0][:, 0], good[1][:, 0])
    # one call of 11 rows for k=2 (failed), retried per request (6 calls), one call for k=4,
    # then the late request
    assert calls[0] == (11, 2) and (2, 4) in calls and len(calls) == 9


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def _battery(dim: int):
    ok = [[0.1] * dim]
    big = json.dumps({"embeddings": [[0.0] * dim] * 3000})
    return [
        ("empty body", b"", 400),
        ("not json", b"{embeddings: [1]}", 400),
        ("truncated", b'{"embeddings": [[1, 2', 400),
        ("not an object", b"[[1, 2, 3]]", 400),
        ("NaN literal", b'{"embeddings": [[NaN, 1]]}', 400),
        ("Infinity literal", b'{"embeddings": [[Infinity]]}', 400),
        ("overflowing number", json.dumps({"embeddings": [[1e39] * dim]}).encode(), 400),
        ("deep nesting", b"[" * 50_000 + b"]" * 50_000, 400),
        ("invalid utf-8", b'{"embeddings": "\xff\xfe"}', 400),
        ("missing embeddings", json.dumps({"k": 3}).encode(), 400),
        ("empty embeddings", json.dumps({"embeddings": []}).encode(), 400),
        ("empty row", json.dumps({"embeddings": [[]]}).encode(), 400),
        ("wrong dimension", json.dumps({"embeddings": [[0.1] * (dim + 1)]}).encode(), 400),
        ("ragged", json.dumps({"embeddings": [[0.1] * dim, [0.1] * (dim - 1)]}).encode(), 400),
        ("strings", json.dumps({"embeddings": [["0.1"] * dim]}).encode(), 400),
        ("nulls", json.dumps({"embeddings": [[None] * dim]}).encode(), 400),
        ("booleans", json.dumps({"embeddings": [[True] * dim]}).encode(), 400),
        ("3-D", json.dumps({"embeddings": [[[0.1] * dim]]}).encode(), 400),
        ("string embeddings", json.dumps({"embeddings": "abc"}).encode(), 400),
        ("object embeddings", json.dumps({"embeddings": {"a": 1}}).encode(), 400),
        ("too many queries", json.dumps({"embeddings": ok * 101}).encode(), 400),
        ("k zero", json.dumps({"embeddings": ok, "k": 0}).encode(), 400),
        ("k too large", json.dumps({"embeddings": ok, "k": 10**6}).encode(), 400),
        ("k string", json.dumps({"embeddings": ok, "k": "5"}).encode(), 400),
        ("k fractional", json.dumps({"embeddings": ok, "k": 2.5}).encode(), 400),
        ("k bool", json.dumps({"embeddings": ok, "k": True}).encode(), 400),
        ("too many hits", json.dumps({"embeddings": ok * 60, "k": 200}).encode(), 400),
        ("nprobe negative", json.dumps({"embeddings": ok, "nprobe": -1}).encode(), 400),
        ("unknown filter column",
         json.dumps({"embeddings": ok, "filter": {"tissue": "lung"}}).encode(), 400),
        ("unknown exclude column",
         json.dumps({"embeddings": ok, "filter": {"exclude": {"x": [1]}}}).encode(), 400),
        ("query-string filter",
         json.dumps({"embeddings": ok, "filter": "donor == 'd1'"}).encode(), 400),
        ("nested filter value",
         json.dumps({"embeddings": ok, "filter": {"donor": [{"a": 1}]}}).encode(), 400),
        ("empty filter list", json.dumps({"embeddings": ok, "filter": {"donor": []}}).encode(),
         400),
        ("bad metadata_columns",
         json.dumps({"embeddings": ok, "metadata_columns": ["nope"]}).encode(), 400),
        ("include_metadata not bool",
         json.dumps({"embeddings": ok, "include_metadata": "yes"}).encode(), 400),
        ("body too large", big.encode(), 413),
    ]


def test_malformed_request_battery(index, model):
    app = create_app(index, model, max_queries_per_request=100, max_k=200,
                     max_body_bytes=100_000, max_hits=10_000)
    with TestClient(app, raise_server_exceptions=False) as c:
        for name, body, status in _battery(index.dim):
            r = c.post("/search", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (name, r.status_code, r.text)
            assert isinstance(r.json()["error"], str) and r.json()["error"], name
        # a non-number is named where it is, in JSON's terms (not numpy's dtype kind 'O')
        row = [0.1] * index.dim
        row[2] = None
        r = c.post("/search", json={"embeddings": [[0.1] * index.dim, row]})
        assert r.status_code == 400 and "row 1, column 2 is null" in r.json()["error"], r.text
        row[2] = "x"
        r = c.post("/search", json={"embeddings": [row]})
        assert 'row 0, column 2 is a string "x"' in r.json()["error"], r.text
        # a lying Content-Length is caught while streaming; a bad header is a 400
        r = c.post("/search", content=b'{"embeddings": [[1]]}',
                   headers={"content-length": "abc"})
        assert r.status_code == 400
        # expression / annotate specific errors
        expr_cases = [
            ({"genes": "g1", "counts": [[1]]}, 400),
            ({"genes": [], "counts": [[1]]}, 400),
            ({"genes": ["g1", "g1"], "counts": [[1, 2]]}, 400),
            ({"genes": ["g1", 2], "counts": [[1, 2]]}, 400),
            ({"genes": ["g1", "g2"]}, 400),
            ({"genes": ["g1", "g2"], "counts": [[1, -2]]}, 400),
            ({"genes": ["g1", "g2"], "counts": [[1, 2, 3]]}, 400),
            ({"genes": ["g1", "g2"], "counts": [[1, 2]], "sparse": {}}, 400),
            ({"genes": ["g1", "g2"], "sparse": {"shape": [1, 3], "row": [], "col": [],
                                                 "data": []}}, 400),
            ({"genes": ["g1", "g2"], "sparse": {"shape": [1, 2], "row": [0], "col": [5],
                                                 "data": [1]}}, 400),
            ({"genes": ["g1", "g2"], "sparse": {"shape": [1, 2], "row": [0, 0], "col": [0],
                                                 "data": [1]}}, 400),
            ({"genes": ["g1", "g2"], "sparse": {"shape": [1, 2], "indptr": [0, 3],
                                                 "indices": [0], "data": [1]}}, 400),
            ({"genes": ["x1", "x2"], "counts": [[1, 2]]}, 400),  # no overlap with the model
        ]
        for body, status in expr_cases:
            r = c.post("/search/expression", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]
        for body in ({}, {"embeddings": [[0.1] * index.dim]},
                     {"embeddings": [[0.1] * index.dim], "label_key": "cell_type", "k": 0},
                     {"embeddings": [[0.1] * index.dim], "label_key": "cell_type",
                      "ood_distance": "far"}):
            r = c.post("/annotate", json=body)
            assert r.status_code == 400, (body, r.text)
        assert c.get("/metrics?format=xml").status_code == 400
        assert c.get("/nowhere").status_code == 404 and "error" in c.get("/nowhere").json()
        assert c.get("/search").status_code == 405
        # still alive and still correct
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok"
        Q = queries(2)
        r = c.post("/search", json={"embeddings": Q.tolist(), "k": 3})
        check_same(r.json(), *index.search(Q, 3))
        m = c.get("/metrics").json()
        search = m["endpoints"]["search"]
        assert search["errors"] == len(_battery(index.dim)) + 3  # + 2 non-numbers, bad header
        assert search["status"]["413"] == 1
        assert {"p50", "p90", "p99"} <= set(search["latency_ms"])
        prom = c.get("/metrics?format=prometheus")
        assert prom.status_code == 200
        assert 'scatlas_requests_total{endpoint="search",status="400"}' in prom.text


def test_index_error_is_400_and_does_not_fail_neighbours(index):
    """An error raised inside the index call (a filter value of the wrong type for the engine,
    here an nprobe the exact engine ignores is fine; an ids filter is refused) maps to 4xx."""
    class Strict:
        dim, ntotal, metric, engine, nprobe = index.dim, index.ntotal, "cosine", "strict", None
        metadata = index.metadata

        def search(self, Q, k=10, **kw):
            if kw.get("nprobe") == 999:
                from scatlas._validate import ScatlasInputError

                raise ScatlasInputError("nprobe=999 exceeds nlist")
            return index.search(Q, k)

    app = create_app(Strict(), max_wait_ms=20.0)
    service = app.state.service

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            Q = queries(1)
            rs = await asyncio.gather(
                c.post("/search", json={"embeddings": Q.tolist(), "k": 3, "nprobe": 999}),
                c.post("/search", json={"embeddings": Q.tolist(), "k": 3}))
        await service.shutdown()
        return rs

    bad, good = asyncio.run(main())
    assert bad.status_code == 400 and "nlist" in bad.json()["error"]
    assert good.status_code == 200


# ------------------------------------------------------------------------------------------------
# a real server: graceful shutdown
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.communicate()[1][-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become healthy")


def test_server_sigterm_drains_in_flight_requests(tmp_path, index, ref):
    """``scatlas serve`` in a subprocess: requests waiting in the batcher (a long max-wait) when
    SIGTERM arrives still get full answers; the process exits 0.

    SIGTERM is sent once ``/metrics`` shows all six requests queued, not after a fixed sleep: on
    a loaded machine the requests could reach the server after the signal (refused) or, with a
    short window, be answered before it (nothing left to drain). The 5 s window leaves time for
    six concurrent requests to arrive and ends well inside uvicorn's 30 s graceful shutdown, so
    a shutdown that dropped the pending requests still fails."""
    folder = tmp_path / "idx"
    index.save(folder)
    port = _free_port()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "scatlas.cli", "serve", "--index", str(folder), "--port",
         str(port), "--max-wait-ms", "5000", "--max-batch", "10000", "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        Qs = [queries(1, seed=500 + i) for i in range(6)]

        async def fire():
            async with httpx.AsyncClient(base_url=url, timeout=30.0) as c:
                tasks = [asyncio.ensure_future(
                    c.post("/search", json={"embeddings": Q.tolist(), "k": 5})) for Q in Qs]
                t0 = time.monotonic()
                while True:  # until every request waits in the batch window
                    await asyncio.sleep(0.05)
                    depth = (await c.get("/metrics")).json()["batches"]["queue_depth"]
                    if depth == len(Qs):
                        break
                    assert time.monotonic() - t0 < 5, f"only {depth} requests queued in 5 s"
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        responses = asyncio.run(fire())
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    for Q, r in zip(Qs, responses, strict=True):
        assert not isinstance(r, BaseException), (r, err[-2000:])
        assert r.status_code == 200
        check_same(r.json(), *index.search(Q, 5))
    assert proc.returncode == 0, err[-3000:]
    assert "Shutting down" in err and "serve: stopped" in err
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=1.0)


def test_metadata_table_values_and_non_range_ids():
    """JSON-ready metadata: categories with missing values, NaN floats, ints, strings, and ids
    that are not row positions (an index with removed cells)."""
    from scatlas.search.service import MetadataTable

    meta = pd.DataFrame({
        "cat": pd.Categorical(["a", None, "b", "a"]),
        "x": [0.5, np.nan, 2.0, np.inf],
        "n": np.array([1, 2, 3, 4], dtype=np.int64),
        "s": ["u", "v", None, "w"],
        "t": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]),
    }, index=pd.Index([10, 11, 13, 17], name="id"))
    table = MetadataTable(meta)
    rows = table.rows(np.array([[13, 10, -1], [11, 99, 17]]), None)
    assert rows[0][0] == {"cat": "b", "x": 2.0, "n": 3, "s": None, "t": "2024-01-03T00:00:00"}
    assert rows[0][1]["cat"] == "a" and rows[0][2] is None and rows[1][1] is None
    assert rows[1][0]["cat"] is None and rows[1][0]["x"] is None
    assert rows[1][2]["x"] is None and type(rows[1][2]["n"]) is int
    json.dumps(rows, allow_nan=False)  # strictly valid JSON
    assert table.rows(np.array([[10]]), ["n"]) == [[{"n": 1}]]
    assert MetadataTable(None).columns == []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_batch_window_does_not_spin(loop, monkeypatch):
    """One wait for the first request and one for the window per request: uvloop's millisecond
    timers fire a little early, and re-waiting for the remainder used to spin ~20 times."""
    runner = asyncio.run if loop == "asyncio" else pytest.importorskip("uvloop").run
    waits = 0
    original = asyncio.Event.wait

    async def counting_wait(self):
        nonlocal waits
        waits += 1
        return await original(self)

    monkeypatch.setattr(asyncio.Event, "wait", counting_wait)

    def search(Q, *, k):
        return np.zeros((len(Q), k), np.float32), np.zeros((len(Q), k), np.int64)

    async def main():
        b = MicroBatcher(search, max_wait_ms=2.0)
        await b.start()
        for _ in range(20):
            D, _ = await b.submit(np.zeros((1, 4), np.float32), key=1, k=3)
            assert D.shape == (1, 3)
        await b.close()
        b.shutdown_executor()

    runner(main())
    assert waits <= 2 * 20 + 2
