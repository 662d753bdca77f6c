"""The search service reads expression as its model was trained and speaks HTTP in its errors
(issue 16, items 5 and 9).

- A model trained on log-normalised values embeds requests of log-normalised values (they were
  refused as "not integer counts", with advice to pass ``input='lognorm'``, which a request
  could not do); the answer equals ``index.search(model.embed(adata))``.
- Errors name what the HTTP caller can change (the request's fields), never Python arguments.
- ``Content-Type``: JSON (with or without a charset, ``+json``, or no header) is read; anything
  else gets 415.
"""

from __future__ import annotations

import re
import warnings

import anndata as ad
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scatlas.models.inputs import InputSpec
from scatlas.models.metric import MetricConfig, MetricEncoder
from scatlas.search import CellIndex
from scatlas.search.service import create_app

with warnings.catch_warnings():  # starlette 1.x suggests httpx2 for its TestClient
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

GENES = [f"g{i}" for i in range(30)]
DIM = 8
#: Python argument forms that an HTTP caller cannot act on
PYTHON_ARGS = re.compile(r"\b(input|layer|use_raw|min_overlap)=")


def _encoder(kind: str) -> MetricEncoder:
    """An untrained encoder (random weights) recording input ``kind``."""
    cfg = MetricConfig(n_genes=len(GENES), hidden=(16,), latent_dim=DIM)
    variables = cfg.net().init({"params": jax.random.PRNGKey(0)},
                               np.zeros((1, len(GENES)), np.float32), train=False)
    return MetricEncoder(cfg, jax.device_get(variables), GENES, input_spec=InputSpec(kind))


def _counts(n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(3.0, (n, len(GENES))).astype(np.float32)


def _lognorm(counts: np.ndarray) -> np.ndarray:
    return np.log1p(1e4 * counts / counts.sum(1, keepdims=True)).astype(np.float32)


def _index(model: MetricEncoder, kind: str) -> CellIndex:
    ref = _counts(200, seed=1)
    a = ad.AnnData(sp.csr_matrix(ref if kind == "counts" else _lognorm(ref)))
    a.var_names = GENES
    Z = model.embed(a)
    meta = pd.DataFrame({"cell_type": [f"t{i % 3}" for i in range(len(Z))]})
    return CellIndex.build(Z, meta, engine="exact")


@pytest.fixture(scope="module", params=["counts", "lognorm"])
def served(request):
    kind = request.param
    model = _encoder(kind)
    with TestClient(create_app(_index(model, kind), model), raise_server_exceptions=False) as c:
        yield kind, model, c


def test_expression_is_read_as_the_model_was_trained(served):
    kind, model, c = served
    counts = _counts()
    values = counts if kind == "counts" else _lognorm(counts)
    a = ad.AnnData(sp.csr_matrix(values))
    a.var_names = GENES
    D, ids = c.app.state.service.index.search(model.embed(a), 5)
    assert c.get("/health").json()["model_input"] == kind
    for body in ({"genes": GENES, "counts": values.tolist(), "k": 5},
                 {"genes": GENES, "counts": values.tolist(), "k": 5, "input": kind}):
        r = c.post("/search/expression", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["ids"] == ids.tolist()
        np.testing.assert_allclose(r.json()["distances"], D, rtol=1e-5, atol=1e-6)
    r = c.post("/annotate", json={"genes": GENES, "counts": values.tolist(), "k": 5,
                                  "label_key": "cell_type"})
    assert r.status_code == 200, r.text


def test_errors_advise_what_the_request_can_change(served):
    kind, model, c = served
    counts = _counts()
    other = "lognorm" if kind == "counts" else "counts"
    wrong = _lognorm(counts) if kind == "counts" else counts * 50  # the other kind's values
    scaled = (_lognorm(counts) - _lognorm(counts).mean(0)) / (_lognorm(counts).std(0) + 1e-6)
    cases = {
        "other kind": ({"genes": GENES, "counts": wrong.tolist()},
                       "non-integer" if kind == "counts" else "raw counts"),
        "scaled": ({"genes": GENES, "counts": scaled.tolist()}, "scaled or z-scored"),
        "input field": ({"genes": GENES, "counts": counts.tolist(), "input": other},
                        "cannot be chosen per request"),
        "few genes": ({"genes": GENES[:10], "counts": counts[:, :10].tolist()}, "'genes' names"),
    }
    for endpoint in ("/search/expression", "/annotate"):
        for name, (body, expect) in cases.items():
            r = c.post(endpoint, json={**body, "label_key": "cell_type"})
            assert r.status_code == 400, (endpoint, name, r.text)
            err = r.json()["error"]
            assert expect in err, (endpoint, name, err)
            assert not PYTHON_ARGS.search(err), (endpoint, name, err)
            if name != "few genes":  # says what to send: the model's kind
                assert ("raw counts" if kind == "counts" else "log-normalised") in err, err


@pytest.mark.parametrize("content_type, status", [
    (None, 200),
    ("application/json", 200),
    ("application/json; charset=utf-8", 200),
    ("Application/JSON;charset=UTF-8", 200),
    ("application/vnd.api+json", 200),
    ("text/plain", 415),
    ("text/plain; charset=utf-8", 415),
    ("application/x-www-form-urlencoded", 415),  # curl -d without -H
    ("multipart/form-data; boundary=x", 415),
    ("application/xml", 415),
])
def test_content_type(content_type, status):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, DIM)).astype(np.float32)
    index = CellIndex.build(X, engine="exact")
    body = ('{"embeddings": [' + ", ".join(map(str, X[0].tolist())) + '], "k": 3}').encode()
    headers = {} if content_type is None else {"content-type": content_type}
    with TestClient(create_app(index)) as c:
        r = c.post("/search", content=body, headers=headers)
        assert r.status_code == status, r.text
        if status == 415:
            err = r.json()["error"]
            assert content_type in err and "application/json" in err
            assert c.get("/metrics").json()["endpoints"]["search"]["status"] == {"415": 1}
        else:
            assert r.json()["ids"][0][0] == 0  # the cell itself
