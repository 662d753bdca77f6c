"""A GPU-resident AnnData (rapids-singlecell's convention: cupy in ``.X``) goes into the models
(issue 17, item 3): ``tl.train_metric``, ``tl.embed`` and ``tl.train_mvae`` read it on the host
(JAX places the batches) and give what the same call gives on the host copy. The GPU is the
NumPy stand-in of tests/helpers/fake_gpu.py, whose arrays ``np.asarray`` alone would not accept as
host data in scatlas's checks (``backend.is_gpu_array`` is True for them)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scatlas
from scatlas import backend, datasets
from tests.helpers import fake_gpu


@pytest.fixture
def gpu(monkeypatch):
    return fake_gpu.install(monkeypatch)


def _on_gpu(adata):
    out = adata.copy()
    out.X = fake_gpu.to_fake_gpu(np.asarray(adata.X))
    assert backend.is_gpu_array(out.X)
    return out


def test_metric_train_and_embed_from_a_gpu_anndata(gpu):
    host = datasets.synthetic(200, 80, n_batches=2, n_cell_types=3, seed=0)
    host.X = np.asarray(host.X.todense())  # the same dense values on both sides
    device = _on_gpu(host)
    kw = dict(max_steps=5, batch_size=50, hidden=(16,), latent_dim=4, progress=False, seed=0)
    want = scatlas.tl.train_metric(host, "cell_type", "batch", **kw)
    got = scatlas.tl.train_metric(device, "cell_type", "batch", **kw)
    Z_host = scatlas.tl.embed(host, want)
    Z_dev = scatlas.tl.embed(device, got)
    assert not backend.is_gpu_array(Z_dev)
    # same data, seed and steps on the same CPU: the same weights, so the same embedding
    np.testing.assert_allclose(Z_dev, Z_host, rtol=1e-5, atol=1e-6)
    assert backend.is_gpu_array(device.X)  # the caller's data stay where they were


@pytest.mark.slow  # 13-30 s: opt in with -m slow (default suite under 10 min)
def test_mvae_from_a_gpu_anndata(gpu):
    host = datasets.synthetic(120, 60, n_batches=1, n_cell_types=3, seed=1)
    host.X = np.asarray(host.X.todense())
    rng = np.random.default_rng(0)
    host.obsm["protein"] = pd.DataFrame(rng.poisson(5, size=(120, 6)).astype(np.float32),
                                        index=host.obs_names,
                                        columns=[f"p{i}" for i in range(6)])
    device = _on_gpu(host)
    kw = dict(modalities={"rna": "X", "protein": "obsm/protein"}, seed=0, max_steps=5,
              batch_size=32, progress=False)
    want = scatlas.tl.train_mvae(host, **kw)
    got = scatlas.tl.train_mvae(device, **kw)
    np.testing.assert_allclose(got.embed(device), want.embed(host), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_metric_from_a_real_cupy_anndata():
    """On a device: a CuPy ``.X`` (which ``np.asarray`` refuses) trains and embeds."""
    if not backend.gpu_available():
        pytest.skip("needs a CUDA GPU with CuPy")
    host = datasets.synthetic(200, 80, n_batches=2, n_cell_types=3, seed=0)
    device = host.copy()
    backend.anndata_to_device(device)
    kw = dict(max_steps=5, batch_size=50, hidden=(16,), latent_dim=4, progress=False, seed=0)
    model = scatlas.tl.train_metric(device, "cell_type", "batch", **kw)
    Z = scatlas.tl.embed(device, model)
    assert Z.shape == (200, 4) and np.isfinite(Z).all()
