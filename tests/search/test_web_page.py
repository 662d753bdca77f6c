"""The web page of ``scatlas serve`` (issue 23): the stored 2-D map, the page's endpoints, and the
page itself in a real browser (Debian's chromium + chromium-driver, driven by selenium).

The reference the page is checked against is computed here, independently of the page: the
neighbours shown for a cell id equal ``CellIndex.search`` of the embedding the index was built
from; the annotation shown for an uploaded ``.h5ad`` equals :func:`scatlas.search.annotate` of
``model.embed`` of its cells. The model is a real ``MetricEncoder`` (random weights: training
is not what is tested), saved and loaded by ``scatlas serve --model``.

The browser test writes a screenshot to ``$SCATLAS_WEB_SCREENSHOT`` (default: the test's
temporary folder) and skips when chromium, chromedriver or selenium are absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import anndata as ad
import httpx
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scatlas.exceptions import ScatlasInputError
from scatlas.search import CellIndex, annotate
from scatlas.search.atlas_map import HEIGHT, WIDTH, compute_map, load_map, save_map
from scatlas.search.service import create_app

with warnings.catch_warnings():  # starlette 1.x suggests httpx2 for its TestClient
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

REPO = Path(__file__).resolve().parents[2]
N_GENES, DIM, K = 50, 8, 10


# ------------------------------------------------------------------------------------------------
# a small atlas: counts, a saved model, an index with its map
# ------------------------------------------------------------------------------------------------


def _counts(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered Poisson counts ``(n, N_GENES)`` of 4 cell types, and the types."""
    rng = np.random.default_rng(seed)
    profiles = np.random.default_rng(42).gamma(0.6, 4.0, size=(4, N_GENES))
    types = rng.integers(0, 4, size=n)
    return rng.poisson(profiles[types]).astype(np.float32), types


def _adata(counts: np.ndarray, genes: list[str] | None = None) -> ad.AnnData:
    a = ad.AnnData(sp.csr_matrix(counts))
    a.var_names = genes or [f"g{i}" for i in range(counts.shape[1])]
    a.obs_names = [f"q{i}" for i in range(counts.shape[0])]
    return a


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    import jax

    from scatlas.models import load
    from scatlas.models.metric import MetricConfig, MetricEncoder

    root = tmp_path_factory.mktemp("web")
    genes = [f"g{i}" for i in range(N_GENES)]
    cfg = MetricConfig(n_genes=N_GENES, hidden=(32,), latent_dim=DIM)
    variables = cfg.net().init({"params": jax.random.PRNGKey(0)},
                               np.zeros((1, N_GENES), np.float32), train=False)
    MetricEncoder(cfg, jax.device_get(variables), genes).save(root / "model")
    model = load(root / "model")
    counts, types = _counts(400, seed=1)
    X = model.embed(_adata(counts))
    rng = np.random.default_rng(2)
    meta = pd.DataFrame({
        "cell_type": pd.Categorical([f"type{t}" for t in types]),
        "study": rng.choice(["study A", "study B", "study C"], size=len(types)),
        "tissue": rng.choice(["lung", "blood"], size=len(types)),
        "n_counts": counts.sum(1).astype(int),
    })
    index = CellIndex.build(X, meta, engine="exact")
    index.save(root / "index")
    method = "tsne" if importlib.util.find_spec("openTSNE") else "pca"  # tsne: the dev extra
    save_map(root / "index", X, compute_map(X, method), method=method)
    return {"root": root, "model": model, "X": X, "index": CellIndex.load(root / "index"),
            "genes": genes}


@pytest.fixture(scope="module")
def client(atlas):
    app = create_app(str(atlas["root"] / "index"), atlas["model"], max_body_bytes=200_000)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _h5ad_bytes(adata: ad.AnnData, tmp_path: Path) -> bytes:
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path.read_bytes()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# ------------------------------------------------------------------------------------------------
# the stored map
# ------------------------------------------------------------------------------------------------


def test_map_is_stored_with_the_index_and_survives_a_resave(atlas, tmp_path):
    folder = tmp_path / "index"
    atlas["index"].save(folder)
    X = atlas["X"]
    coords = compute_map(X, "pca")
    # pca: the two leading principal components of the unit rows (up to sign), from numpy
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    _, _, vt = np.linalg.svd(U - U.mean(0), full_matrices=False)
    ref = (U - U.mean(0)) @ vt[:2].T
    np.testing.assert_allclose(np.abs(coords), np.abs(ref), atol=1e-4)
    save_map(folder, X, coords, method="pca")
    stored = load_map(folder, verify=True)
    assert stored.method == "pca" and stored.n == len(X)
    np.testing.assert_array_equal(stored.vector(3), X[3])
    # calibrating rewrites the folder: the map is carried over (same index data)
    idx = CellIndex.load(folder)
    idx.calibrate_ood(X[:120])
    idx.save(folder)
    assert load_map(folder, verify=True) is not None
    # a different index saved over the folder drops it
    CellIndex.build(X[:50], engine="exact").save(folder)
    assert load_map(folder) is None
    with pytest.raises(ScatlasInputError, match="method"):
        compute_map(X, "mds")
    with pytest.raises(ScatlasInputError, match="coords"):
        save_map(folder, X, coords[:10], method="pca")


def test_map_picture_and_pixels(atlas, client):
    info = client.get("/map").json()
    assert info["available"] and info["method"] in ("tsne", "pca")
    assert info["color"] == "cell_type"
    assert sorted(e["value"] for e in info["legend"]) == [f"type{t}" for t in range(4)]
    assert sum(e["cells"] for e in info["legend"]) == len(atlas["X"])
    r = client.get("/map.png?color=study")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert _png_size(r.content) == (WIDTH, HEIGHT)
    raw = zlib.decompress(r.content[r.content.index(b"IDAT") + 4:])
    assert len(raw) == HEIGHT * (1 + 3 * WIDTH)  # rows of filter byte + RGB
    xy = client.post("/map/points", json={"ids": [[0, 5, -1]]}).json()["xy"]
    assert xy[0][2] is None
    assert all(0 <= p[0] <= WIDTH and 0 <= p[1] <= HEIGHT for p in xy[0][:2])
    assert client.get("/map.png?color=nope").status_code == 400
    assert client.post("/map/points", json={"ids": ["a"]}).status_code == 400


# ------------------------------------------------------------------------------------------------
# the page's endpoints
# ------------------------------------------------------------------------------------------------


def test_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
    # every form control has a label
    for control in ("k", "label-key", "cell-id", "upload", "paste", "group-by", "query-cell"):
        assert f'id="{control}"' in html and f'for="{control}"' in html, control
    for name in ("app.js", "app.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text
    assert client.get("/static/../service.py").status_code == 404
    assert client.get("/static/missing.js").json()["error"].startswith("no static file")


def test_cell_endpoint_gives_the_indexed_vector(atlas, client):
    r = client.get("/cells/17").json()
    np.testing.assert_array_equal(np.float32(r["embedding"]), atlas["X"][17])
    assert r["metadata"]["cell_type"] == atlas["index"].metadata["cell_type"].iloc[17]
    assert r["xy"] is not None
    assert client.get("/cells/400").status_code == 404
    assert client.get("/cells/-1").status_code == 404
    bad = client.get("/cells/seven")
    assert bad.status_code == 400 and "integer" in bad.json()["error"]


def test_upload_answers_as_the_pipeline_does(atlas, client, tmp_path):
    counts, _ = _counts(6, seed=9)
    data = _h5ad_bytes(_adata(counts), tmp_path)
    r = client.post("/query/h5ad?k=7&label_key=cell_type", content=data,
                    headers={"content-type": "application/x-hdf5"})
    assert r.status_code == 200, r.text
    out = r.json()
    emb = atlas["model"].embed(_adata(counts))
    D, ids = atlas["index"].search(emb, k=7)
    assert out["search"]["ids"] == ids.tolist()
    np.testing.assert_allclose(out["search"]["distances"], D, rtol=1e-6)
    expected = annotate(atlas["index"], emb, label_key="cell_type", k=7)
    assert [p["label"] for p in out["annotation"]["predictions"]] == list(expected["label"])
    assert out["n_cells"] == 6 and out["genes_matched"] == N_GENES


@pytest.mark.parametrize("case, status, words", [
    ("text", 400, "not an .h5ad"),
    ("genes", 400, "include 0 of the model's 50"),
    ("negative", 400, "negative value"),
    ("big", 413, "limit"),
    ("type", 415, "application/x-hdf5"),
    ("k", 400, "k must be in"),
])
def test_bad_uploads_get_readable_messages(client, tmp_path, case, status, words):
    counts, _ = _counts(3, seed=5)
    adata = _adata(counts)
    headers = {"content-type": "application/x-hdf5"}
    query = ""
    if case == "text":
        data = b"gene,count\nCD3E,4\n"
    elif case == "genes":
        data = _h5ad_bytes(_adata(counts, [f"other{i}" for i in range(N_GENES)]), tmp_path)
    elif case == "negative":
        adata.X = sp.csr_matrix(-counts - 1)
        data = _h5ad_bytes(adata, tmp_path)
    elif case == "big":
        data = b"\x89HDF\r\n\x1a\n" + bytes(300_000)
    elif case == "type":
        data, headers = _h5ad_bytes(adata, tmp_path), {"content-type": "text/plain"}
    else:
        data, query = _h5ad_bytes(adata, tmp_path), "?k=0"
    r = client.post(f"/query/h5ad{query}", content=data, headers=headers)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert client.get("/health").json()["status"] == "ok"


def test_without_a_map_or_model_the_page_says_so(atlas):
    app = create_app(atlas["index"], None)  # an index object: no folder, no map
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/").status_code == 200
        info = c.get("/map").json()
        assert info["available"] is False and "scatlas index map" in info["message"]
        assert c.get("/cells/3").status_code == 404
        assert c.post("/query/h5ad", content=b"x").status_code == 404


def test_cli_builds_the_map(atlas, tmp_path):
    from scatlas.cli import main

    np.save(tmp_path / "emb.npy", atlas["X"])
    out = tmp_path / "idx"
    assert main(["index", "build", str(tmp_path / "emb.npy"), "--out", str(out), "--engine",
                 "exact", "--map", "pca"]) == 0
    assert load_map(out, verify=True).method == "pca"
    assert main(["index", "map", str(out), str(tmp_path / "emb.npy"), "--method", "pca",
                 "--seed", "3"]) == 0
    assert json.loads((out / "map" / "map.json").read_text())["seed"] == 3
    np.save(tmp_path / "short.npy", atlas["X"][:10])
    assert main(["index", "map", str(out), str(tmp_path / "short.npy")]) == 2


# ------------------------------------------------------------------------------------------------
# a real browser
# ------------------------------------------------------------------------------------------------


def _browser():
    """A headless chromium driven by selenium, or a skip naming what is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs selenium (pip install 'scatlas[browser]')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1700", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(atlas) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-m", "scatlas.cli", "serve", "--index", str(atlas["root"] / "index"),
         "--model", str(atlas["root"] / "model"), "--port", str(port), "--max-wait-ms", "0",
         "--label-key", "cell_type", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        if proc.poll() is not None:
            raise AssertionError(f"scatlas serve exited: {proc.communicate()[1][-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("scatlas serve did not start in 60 s")


def _settled(driver, timeout: float = 30) -> str:
    """Wait until the page is no longer loading; its ``data-state``."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-state")
        in ("ready", "done", "error"))
    return driver.find_element("tag name", "body").get_attribute("data-state")


def _shown_hits(driver) -> tuple[list[int], list[float]]:
    rows = driver.find_elements("css selector", "#neighbours tbody tr")
    ids = [int(r.find_element("css selector", "td[data-col=id]").text) for r in rows]
    dist = [float(r.find_element("css selector", "td[data-col=distance]").text) for r in rows]
    return ids, dist


@pytest.fixture
def driver():
    """The headless browser (requested before the atlas, so that a skip costs nothing)."""
    browser = _browser()
    yield browser
    browser.quit()


@pytest.mark.browser
def test_the_page_in_a_real_browser(driver, atlas, tmp_path):
    proc, url = _serve(atlas)
    index, X = atlas["index"], atlas["X"]
    try:
        from selenium.webdriver.common.keys import Keys

        # loads
        driver.get(f"{url}/")
        assert _settled(driver) == "ready"
        assert "400 cells" in driver.find_element("id", "facts").text
        assert driver.find_element("id", "error").get_attribute("hidden") is not None

        # a query by cell id, typed and sent with the keyboard
        box = driver.find_element("id", "cell-id")
        box.send_keys("12", Keys.ENTER)
        assert _settled(driver) == "done"
        ids, dist = _shown_hits(driver)
        D, I = index.search(X[12:13], k=50)
        assert ids == I[0].tolist()
        np.testing.assert_allclose(dist, D[0], rtol=1e-4, atol=1e-6)

        # the stable URL: /?cell=<id>&k=<k> shows the same result on a fresh load
        driver.get(f"{url}/?cell=31&k={K}")
        assert _settled(driver) == "done"
        ids, dist = _shown_hits(driver)
        D, I = index.search(X[31:32], k=K)
        assert ids == I[0].tolist()
        np.testing.assert_allclose(dist, D[0], rtol=1e-4, atol=1e-6)
        expected = annotate(index, X[31:32], label_key="cell_type", k=K)
        assert driver.find_element("id", "annotation-label").text == expected["label"].iloc[0]
        bars = driver.find_elements("css selector", "#bars .bar-row")
        assert bars and "hits" in bars[0].get_attribute("aria-label")
        # sorting by distance, descending on the second click
        header = driver.find_element("css selector", "th[data-col=distance] button")
        header.click()
        driver.find_element("css selector", "th[data-col=distance] button").click()
        assert _shown_hits(driver)[1] == sorted(dist, reverse=True)
        # the CSV download holds the same hits
        driver.execute_cdp_cmd("Page.setDownloadBehavior",
                               {"behavior": "allow", "downloadPath": str(tmp_path)})
        driver.find_element("id", "download").click()
        csv = tmp_path / "scatlas_hits.csv"
        t0 = time.monotonic()
        while not csv.is_file() and time.monotonic() - t0 < 15:
            time.sleep(0.1)
        table = pd.read_csv(csv)
        assert table["id"].tolist() == I[0].tolist() and set(table["query"]) == {"cell 31"}
        np.testing.assert_allclose(table["distance"], D[0], rtol=1e-6, atol=1e-7)
        assert table["cell_type"].tolist() == index.metadata["cell_type"].iloc[I[0]].tolist()
        shot = Path(os.environ.get("SCATLAS_WEB_SCREENSHOT", tmp_path / "web_page.png"))
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.find_element("css selector", "th[data-col=rank] button").click()
        driver.execute_script("window.scrollTo(0, 0)")
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")

        # a bad k in the URL: the API's message, readable
        driver.get(f"{url}/?cell=5&k=0")
        assert _settled(driver) == "error"
        assert "k must be in [1, 1000], got 0" in driver.find_element("id", "error").text

        # an upload shows the pipeline's annotation
        counts, _ = _counts(5, seed=11)
        path = tmp_path / "query.h5ad"
        _adata(counts).write_h5ad(path)
        driver.get(f"{url}/?k={K}")
        assert _settled(driver) == "ready"
        driver.find_element("id", "upload").send_keys(str(path))
        driver.find_element("id", "go-upload").click()
        assert _settled(driver) == "done", driver.find_element("id", "error").text
        emb = atlas["model"].embed(_adata(counts))
        expected = annotate(index, emb, label_key="cell_type", k=K)
        assert driver.find_element("id", "annotation-label").text == expected["label"].iloc[0]
        flag = driver.find_element("id", "annotation-ood").text
        assert ("out of distribution" in flag) == bool(expected["is_ood"].iloc[0]), flag
        assert len(driver.find_elements("css selector", "#query-cell option")) == 5

        # pasted expression (one cell as "GENE count" lines) answers as the pipeline does
        cell = counts[2:3]
        text = "\n".join(f"{g} {int(v)}" for g, v in zip(atlas["genes"], cell[0], strict=True))
        driver.execute_script("document.getElementById('paste').value = arguments[0]", text)
        driver.find_element("id", "go-paste").click()
        assert _settled(driver) == "done", driver.find_element("id", "error").text
        emb = atlas["model"].embed(_adata(cell))
        D, I = index.search(emb, k=K)
        assert _shown_hits(driver)[0] == I[0].tolist()
        expected = annotate(index, emb, label_key="cell_type", k=K)
        assert driver.find_element("id", "annotation-label").text == expected["label"].iloc[0]

        # bad uploads: readable messages, no stack trace
        for name, content, words in (
            ("notes.h5ad", b"not an h5ad at all", "not an .h5ad"),
            ("genes.h5ad", None, "of the model's 50"),
        ):
            bad = tmp_path / name
            if content is None:
                _adata(counts, [f"x{i}" for i in range(N_GENES)]).write_h5ad(bad)
            else:
                bad.write_bytes(content)
            upload = driver.find_element("id", "upload")
            upload.clear()
            upload.send_keys(str(bad))
            driver.find_element("id", "go-upload").click()
            assert _settled(driver) == "error"
            message = driver.find_element("id", "error").text
            assert words in message and "Traceback" not in message, message
    finally:
        proc.terminate()
        proc.wait(timeout=30)
