"""Backend selection, device moves and the one-module rule."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
import scipy.sparse as sp

from scatlas import backend


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
