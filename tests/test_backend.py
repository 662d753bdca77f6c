"""Backend selection, device moves and the one-module rule."""

from __future__ import annotations

import pathlib
import re
import types

import numpy as np
import pytest
import scipy.sparse as sp

from scatlas import backend
from tests.helpers import fake_gpu


def test_env_variable_selects_cpu(monkeypatch):
    monkeypatch.setenv("SCATLAS_DEVICE", "cpu")
    assert backend.resolve_device() == "cpu"
    assert backend.resolve_device("CPU") == "cpu"


def test_invalid_device_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SCATLAS_DEVICE", "tpu")
    with pytest.raises(ValueError, match="SCATLAS_DEVICE"):
        backend.resolve_device()
    with pytest.raises(ValueError, match="device argument"):
        backend.resolve_device("metal")


def test_auto_matches_gpu_availability(monkeypatch):
    monkeypatch.delenv("SCATLAS_DEVICE", raising=False)
    expected = "gpu" if backend.gpu_available() else "cpu"
    assert backend.resolve_device() == expected
    assert backend.resolve_device("auto") == expected


@pytest.mark.skipif(backend.gpu_available(), reason="a GPU is present")
def test_gpu_request_without_gpu_raises(monkeypatch):
    with pytest.raises(backend.DeviceUnavailableError, match="no usable GPU"):
        backend.resolve_device("gpu")
    monkeypatch.setenv("SCATLAS_DEVICE", "gpu")
    with pytest.raises(backend.DeviceUnavailableError):
        backend.to_device(np.zeros(3))
    with pytest.raises(backend.DeviceUnavailableError):
        backend.device_module("gpu")
    assert backend.device_module("cpu") is np


def test_host_arrays_stay_put():
    X = np.ones((3, 2))
    S = sp.random(5, 4, density=0.5, format="csr")
    assert backend.to_device(X, "cpu") is X
    assert backend.to_host(S) is S
    moved, restore = backend.on_device(X, None)
    assert moved is X and restore(X) is X
    assert backend.array_module(S) is np and backend.sparse_module(S) is sp
    assert backend.issparse(S) and not backend.issparse(X)


def test_dtype_policy():
    assert backend.resolve_dtype(None) == np.float32
    assert backend.resolve_dtype("float64") == np.float64
    with pytest.raises(ValueError, match="float32 or float64"):
        backend.resolve_dtype(np.int32)


def test_no_module_but_backend_imports_cupy_at_top_level():
    root = pathlib.Path(backend.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "backend.py":
            continue
        for line in path.read_text().splitlines():
            if re.match(r"^(import cupy|from cupy)", line):
                offenders.append(f"{path}: {line}")
    assert not offenders, offenders


@pytest.mark.gpu
def test_round_trip_to_gpu_keeps_values_and_format():
    X = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    S = sp.random(40, 30, density=0.2, format="csr", dtype=np.float32, random_state=0)
    Xg, Sg = backend.to_device(X, "gpu"), backend.to_device(S, "gpu")
    assert backend.is_gpu_array(Xg) and backend.issparse(Sg)
    np.testing.assert_array_equal(backend.to_host(Xg), X)
    assert (backend.to_host(Sg) != S).nnz == 0
    moved, restore = backend.on_device(X, "gpu")
    assert backend.is_gpu_array(moved) and isinstance(restore(moved), np.ndarray)


# ----------------------------------------------------------------------------------------------
# moves to the GPU, on the CPU: a NumPy stand-in for CuPy that refuses what cupyx refuses
# ----------------------------------------------------------------------------------------------
def _counts(fmt: str = "csr") -> sp.spmatrix:
    """Integer counts, as every real dataset stores them (int32 CSR)."""
    rng = np.random.default_rng(0)
    X = sp.random(30, 12, density=0.3, format=fmt, random_state=rng,
                  data_rvs=lambda n: rng.integers(1, 50, n))
    return X.astype(np.int32)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "lil"])
def test_integer_counts_reach_the_gpu_as_float32(monkeypatch, fmt):
    """cupyx.scipy.sparse refuses int data: the cast must happen on the host, before the move
    (it used to happen after, in the kernels, so every real dataset failed)."""
    fake = fake_gpu.install(monkeypatch)
    X = _counts(fmt)
    with pytest.raises(ValueError, match="Only bool, float32"):  # what cupyx itself does
        fake_gpu.csr_matrix(X.tocsr())
    moved = backend.to_device(X, "gpu")
    assert backend.is_gpu_array(moved) and backend.issparse(moved)
    assert moved.format == ("csr" if fmt == "lil" else fmt) and moved.dtype == np.float32
    assert (backend.to_host(moved) != X).nnz == 0  # counts < 2**24 are exact in float32
    f64 = backend.to_device(X, "gpu", dtype=np.float64)
    assert f64.dtype == np.float64
    assert backend.to_device(X.astype(np.float64), "gpu").dtype == np.float64  # floats kept
    # dense: index arrays keep their integer dtype, matrices become float32
    idx = backend.to_device(np.arange(5), "gpu")
    assert backend.is_gpu_array(idx) and idx.dtype == np.arange(5).dtype
    assert backend.to_device(X.toarray(), "gpu", matrix=True).dtype == np.float32
    assert isinstance(fake.zeros(2), fake_gpu.FakeCupyArray)


def test_kernel_device_override_casts_on_the_host(monkeypatch):
    fake_gpu.install(monkeypatch)
    X = _counts()
    moved, restore = backend.on_device(X, "gpu")
    assert moved.dtype == np.float32 and backend.issparse(moved)
    moved64, _ = backend.on_device(X, "gpu", dtype=np.float64)
    assert moved64.dtype == np.float64
    assert fake_gpu.CONSTRUCTED == [("csr", np.float32), ("csr", np.float64)]
    out = restore(fake_gpu.to_fake_gpu(np.ones(3)))
    assert isinstance(out, np.ndarray) and not backend.is_gpu_array(out)
    same, ident = backend.on_device(moved, "gpu")  # already there: untouched
    assert same is moved and ident(same) is same


def _adata(X, **layers):
    """An AnnData stand-in (.X and .layers): anndata itself does not take the fake cupyx
    matrices for GPU matrices; the ``gpu``-marked test below runs the real one."""
    return types.SimpleNamespace(X=X, layers=dict(layers))


def test_anndata_counts_to_gpu_and_back(monkeypatch):
    fake_gpu.install(monkeypatch)
    X = _counts()
    a = _adata(X.copy(), counts=X.copy(), dense=X.toarray(), f64=X.astype(np.float64))
    backend.anndata_to_device(a, "gpu")
    assert a.X.dtype == np.float32 and backend.issparse(a.X)
    assert a.layers["dense"].dtype == np.float32 and backend.is_gpu_array(a.layers["dense"])
    assert a.layers["f64"].dtype == np.float64
    backend.anndata_to_host(a)
    assert sp.issparse(a.X) and (a.X != X).nnz == 0
    b = _adata(X.copy())
    backend.anndata_to_device(b, "gpu", dtype=np.float64)
    assert b.X.dtype == np.float64


def test_too_many_stored_entries_for_cupyx_is_refused(monkeypatch):
    """cupyx casts its indices to int32: beyond 2**31 - 1 stored entries they would wrap."""
    fake_gpu.install(monkeypatch)
    monkeypatch.setattr(backend, "GPU_SPARSE_MAX_NNZ", 10)  # the real limit needs 24 GB
    X = _counts()
    with pytest.raises(ValueError, match=r"stored entries.*int32.*row blocks"):
        backend.to_device(X, "gpu")
    a = _adata(X[:2].copy(), big=X.copy())
    with pytest.raises(ValueError, match=r"adata.layers\['big'\]"):
        backend.anndata_to_device(a, "gpu")
    assert not backend.is_gpu_array(a.X)  # refused before anything moved
    assert backend.is_gpu_array(backend.to_device(X[:1], "gpu"))


@pytest.mark.gpu
def test_counts_to_the_real_gpu():
    """int32 CSR counts through every public move (was: cupyx ValueError on int data)."""
    import anndata as ad

    X = _counts()
    assert backend.to_device(X, "gpu").dtype == np.float32
    a = ad.AnnData(X=X.copy(), layers={"counts": X.copy()})
    backend.anndata_to_device(a)
    assert backend.issparse(a.X) and a.X.dtype == np.float32
    backend.anndata_to_host(a)
    assert (a.X != X).nnz == 0
