"""The one module that chooses between CuPy (GPU) and NumPy/SciPy (CPU).

Nothing else in scatlas imports CuPy at module level: every other module asks this one for the
array module of its inputs (:func:`array_module`), the sparse module (:func:`sparse_module`), or
moves data with :func:`to_device` / :func:`to_host`.

Device choice, in order of precedence:

1. an explicit ``device=`` argument (``"cpu"``, ``"gpu"`` or ``"auto"``);
2. the environment variable ``SCATLAS_DEVICE`` (same values);
3. ``"auto"``: the GPU when CuPy imports and sees at least one CUDA device, else the CPU.

Asking for ``"gpu"`` where there is none raises :class:`DeviceUnavailableError`.

Kernels compute where their input lives and return the caller's array kind: numpy /
scipy.sparse in, numpy out; cupy / cupyx.scipy.sparse in, cupy out. A ``device=`` argument on a
kernel moves the input there, computes, and moves the result back to the caller's kind
(:func:`on_device`).

AnnData matrices follow rapids-singlecell's convention: on the GPU ``.X`` (and layers) hold
``cupy.ndarray`` or ``cupyx.scipy.sparse`` matrices (:func:`anndata_to_device`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

Device = Literal["cpu", "gpu"]
DEVICE_ENV = "SCATLAS_DEVICE"
_VALID = ("cpu", "gpu", "auto")


class DeviceUnavailableError(RuntimeError):
    """Raised when the GPU is requested but no usable CUDA device and CuPy are present."""


@functools.lru_cache(maxsize=1)
def _cupy():
    """Import CuPy lazily; None when it is missing or sees no device."""
    try:
        import cupy  # noqa: PLC0415

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # ImportError, CUDARuntimeError, driver mismatch ...
        return None


def gpu_available() -> bool:
    """True when CuPy imports and at least one CUDA device is visible."""
    return _cupy() is not None


def resolve_device(device: str | None = None) -> Device:
    """Turn ``device`` (or ``$SCATLAS_DEVICE``, or auto-detection) into ``"cpu"`` or ``"gpu"``."""
    choice = device if device is not None else os.environ.get(DEVICE_ENV, "auto")
    choice = str(choice).strip().lower()
    if choice not in _VALID:
        source = "device argument" if device is not None else f"${DEVICE_ENV}"
        raise ValueError(f"{source} must be one of {_VALID}, got {choice!r}")
    if choice == "auto":
        return "gpu" if gpu_available() else "cpu"
    if choice == "gpu" and not gpu_available():
        raise DeviceUnavailableError(
            "device 'gpu' was requested but no usable GPU was found (CuPy missing or no CUDA "
            "device visible); install scatlas[gpu] on a CUDA machine or use device='cpu'"
        )
    return choice  # type: ignore[return-value]


def is_gpu_array(X: Any) -> bool:
    """True for cupy arrays and cupyx.scipy.sparse matrices (without importing CuPy)."""
    mod = type(X).__module__
    return mod.startswith("cupy") or mod.startswith("cupyx")


def issparse(X: Any) -> bool:
    """True for scipy.sparse and cupyx.scipy.sparse matrices / arrays."""
    if sp.issparse(X):
        return True
    if is_gpu_array(X):
        import cupyx.scipy.sparse as csp  # noqa: PLC0415

        return csp.issparse(X)
    return False


def device_of(X: Any) -> Device:
    """The device an array lives on."""
    return "gpu" if is_gpu_array(X) else "cpu"


def array_module(X: Any = None):
    """``numpy`` or ``cupy``: the dense array module matching ``X`` (numpy when ``X`` is None)."""
    if X is not None and is_gpu_array(X):
        return _require_cupy()
    return np


def sparse_module(X: Any = None):
    """``scipy.sparse`` or ``cupyx.scipy.sparse`` matching ``X``."""
    if X is not None and is_gpu_array(X):
        _require_cupy()
        import cupyx.scipy.sparse as csp  # noqa: PLC0415

        return csp
    return sp


def gpu_module():
    """The ``cupy`` module (for code that creates GPU arrays from nothing); raises without a GPU."""
    return _require_cupy()


def device_module(device: str):
    """The dense array module of a resolved device name: ``numpy`` for "cpu", ``cupy`` for
    "gpu" (raises without a GPU)."""
    return _require_cupy() if device == "gpu" else np


def _require_cupy():
    cp = _cupy()
    if cp is None:
        raise DeviceUnavailableError("a CuPy array was given but CuPy/CUDA is not usable here")
    return cp


def resolve_dtype(dtype: Any = None) -> np.dtype:
    """The floating dtype for computation: float32 by default, float64 on request."""
    if dtype is None:
        return np.dtype(np.float32)
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def to_device(X: Any, device: str | None = None) -> Any:
    """Move an array or sparse matrix to ``device`` (no copy when already there).

    Sparse matrices keep their format (CSR/CSC/COO); other scipy formats become CSR.
    """
    target = resolve_device(device)
    if target == "cpu":
        return to_host(X)
    if is_gpu_array(X):
        return X
    cp = _require_cupy()
    if sp.issparse(X):
        import cupyx.scipy.sparse as csp  # noqa: PLC0415

        fmt = X.format if X.format in ("csr", "csc", "coo") else "csr"
        X = X.asformat(fmt)
        return {"csr": csp.csr_matrix, "csc": csp.csc_matrix, "coo": csp.coo_matrix}[fmt](X)
    return cp.asarray(X)


def to_host(X: Any) -> Any:
    """Move a CuPy array / cupyx sparse matrix to NumPy / SciPy (no copy for host data)."""
    if not is_gpu_array(X):
        return X
    return X.get()  # cupy.ndarray and cupyx sparse matrices both provide .get()


def on_device(X: Any, device: str | None) -> tuple[Any, Callable[[Any], Any]]:
    """Prepare one kernel input for a per-call ``device`` override.

    Returns ``(X_on_device, restore)`` where ``restore(result)`` moves a result back to the
    caller's array kind. With ``device=None`` the data stays where it is.
    """
    if device is None:
        return X, _identity
    target = resolve_device(device)
    caller = device_of(X)
    if target == caller:
        return X, _identity
    moved = to_device(X, target)
    return moved, (to_host if caller == "cpu" else functools.partial(to_device, device="gpu"))


def _identity(x: Any) -> Any:
    return x


def synchronize(X: Any = None) -> None:
    """Block until queued GPU work finishes (no-op on the CPU); used by benchmarks."""
    cp = _cupy()
    if cp is not None and (X is None or is_gpu_array(X)):
        cp.cuda.Device().synchronize()


def anndata_to_device(adata, device: str | None = None, layers: bool = True) -> None:
    """Move ``adata.X`` (and ``adata.layers``) to ``device`` in place.

    Same convention as rapids-singlecell's ``rsc.get.anndata_to_GPU``: dense matrices become
    ``cupy.ndarray``, sparse ones ``cupyx.scipy.sparse.csr_matrix``.
    """
    adata.X = to_device(adata.X, device)
    if layers:
        for key in list(adata.layers.keys()):
            adata.layers[key] = to_device(adata.layers[key], device)


def anndata_to_host(adata, layers: bool = True) -> None:
    """Move ``adata.X`` (and layers) back to NumPy / SciPy in place (rsc's ``anndata_to_CPU``)."""
    adata.X = to_host(adata.X)
    if layers:
        for key in list(adata.layers.keys()):
            adata.layers[key] = to_host(adata.layers[key])


def describe() -> dict[str, Any]:
    """Backend facts for ``scatlas info`` and benchmark records."""
    info: dict[str, Any] = {
        "device_env": os.environ.get(DEVICE_ENV),
        "resolved_device": resolve_device(None) if _env_ok() else "invalid $SCATLAS_DEVICE",
        "gpu_available": gpu_available(),
        "gpus": [],
    }
    cp = _cupy()
    if cp is not None:
        for i in range(cp.cuda.runtime.getDeviceCount()):
            props = cp.cuda.runtime.getDeviceProperties(i)
            name = props["name"]
            info["gpus"].append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                }
            )
    return info


def _env_ok() -> bool:
    try:
        resolve_device(None)
        return True
    except (ValueError, DeviceUnavailableError):
        return False
