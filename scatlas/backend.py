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

Dtypes on the way to the GPU
----------------------------
``cupyx.scipy.sparse`` holds only bool, float32, float64 and complex data, and int32 indices.
Counts arrive as integer CSR, so every move casts on the host first, here and only here
(:func:`to_device`, :func:`on_device`, :func:`anndata_to_device`): to the requested ``dtype``,
else integer sparse data to float32 (exact for counts below 2**24). A sparse matrix with
``nnz > 2**31 - 1`` stored entries cannot be indexed with int32 and is refused with an error
naming the way round (move it in row blocks).

CPU threads
-----------
One rule: BLAS threads never multiply with scatlas's own thread pools, and LAPACK
factorisations run on one BLAS thread.

- :func:`cpu_threads` is the thread budget of a CPU pool: ``$SCATLAS_NUM_THREADS``, else the
  number of threads the BLAS is allowed (``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` /
  ``threadpoolctl`` limits as the user set them), capped by the usable cores.
- :func:`serial_blas` limits the BLAS to one thread for the duration of a block. A pooled
  section holds it in the thread that starts the pool, and wraps its tasks in
  :func:`serial_blas_task` (for a BLAS on the OpenMP threading layer, such as faiss-cpu's
  bundled OpenBLAS, limits are per thread), so ``pool size x BLAS threads <= budget``.
  OpenBLAS built with pthreads (NumPy's and SciPy's wheels) has one process-wide thread pool and
  a process-wide limit, and threadpoolctl >= 3.8 lets only one "controlling" thread change it
  (a limit set from another thread is silently ignored). So the limit is reference counted
  across threads: the first section to enter sets it, the last to leave restores the limits
  that were in force before, taking control of OpenBLAS from whichever thread had it.
- Dense LAPACK factorisations (``eigh``, ``svd``) run under :func:`serial_blas`: OpenBLAS
  synchronises its threads at every level-2 step of a tridiagonalisation (O(m) barriers with
  busy-waiting), so on a machine whose cores are taken by other work, a thread descheduled for
  one time slice stalls the others. Measured on 2 shared cores at load ~10
  (``OPENBLAS_NUM_THREADS=1`` vs ``2``, ``scipy.linalg.eigh(..., subset_by_index=top 30,
  driver="evr")``, median of 5): m = 256: 18 vs 67 ms; 1,024: 262 vs 1,153 ms; 2,048: 2.0 vs
  9.7 s. A GEMM has few barriers: at 1,024 and 2,048 two threads were on par or faster, below
  512 they were 4-36x slower, hence :func:`blas_for_flops` (one thread below 1 GFlop).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from .exceptions import DeviceUnavailableError, ScatlasInputError  # noqa: F401 (re-exported)

Device = Literal["cpu", "gpu"]
DEVICE_ENV = "SCATLAS_DEVICE"
_VALID = ("cpu", "gpu", "auto")




@functools.lru_cache(maxsize=1)
def _cupy():  # tests replace it with a NumPy stand-in (tests/helpers/fake_gpu.py)
    """Import CuPy lazily; None when it is missing or sees no device."""
    try:
        import cupy

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
        raise ScatlasInputError(f"{source} must be one of {_VALID}, got {choice!r}")
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


def _cupyx_sparse():
    """The ``cupyx.scipy.sparse`` module (imported on first use; tests replace it)."""
    import cupyx.scipy.sparse as csp

    return csp


def issparse(X: Any) -> bool:
    """True for scipy.sparse and cupyx.scipy.sparse matrices / arrays."""
    if sp.issparse(X):
        return True
    if is_gpu_array(X):
        return bool(_cupyx_sparse().issparse(X))
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
        return _cupyx_sparse()
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
        raise ScatlasInputError(f"dtype must be float32 or float64, got {dt}")
    return dt


#: Data dtypes (``dtype.char``) cupyx.scipy.sparse accepts: bool, float32/64, complex64/128.
GPU_SPARSE_DTYPES = "?fdFD"
#: cupyx.scipy.sparse indexes stored entries with int32: at most this many per matrix.
GPU_SPARSE_MAX_NNZ = 2**31 - 1


def device_dtype(X: Any, dtype: Any = None, *, matrix: bool = False) -> np.dtype | None:
    """The dtype host data ``X`` get on their way to the GPU (None: keep their own).

    ``dtype`` given: that one. Else sparse data of a dtype cupyx rejects (integer counts) and,
    with ``matrix=True`` (a data matrix, not an index array), non-floating dense arrays become
    float32. Non-numeric data are never cast (the kernels' validation names the problem).
    """
    dt = np.dtype(X.dtype)
    if dt.kind not in "biufc":  # not numbers: left to the kernels' validation to name
        return None
    if dtype is not None:
        return np.dtype(dtype)
    if sp.issparse(X):
        return None if dt.char in GPU_SPARSE_DTYPES else np.dtype(np.float32)
    if matrix and dt.kind not in "fc":
        return np.dtype(np.float32)
    return None


def check_gpu_sparse(X: Any, name: str = "matrix") -> None:
    """Refuse a sparse matrix cupyx cannot hold: more than 2**31 - 1 stored entries (cupyx
    casts its indices to int32, where they would wrap around)."""
    nnz = int(X.nnz)
    if nnz > GPU_SPARSE_MAX_NNZ:
        raise ScatlasInputError(
            f"{name} has {nnz:,} stored entries, more than cupyx.scipy.sparse can index with "
            f"int32 (at most {GPU_SPARSE_MAX_NNZ:,}); move it to the GPU in row blocks "
            "(X[start:stop]) or keep it on the host (device='cpu')"
        )


def to_device(X: Any, device: str | None = None, *, dtype: Any = None,
              matrix: bool = False) -> Any:
    """Move an array or sparse matrix to ``device`` (no copy when already there, uncast).

    Parameters
    ----------
    X
        numpy / scipy.sparse / cupy / cupyx.scipy.sparse; any shape (sparse: 2-D).
    device
        ``"cpu"``, ``"gpu"``, ``"auto"``, or None (``$SCATLAS_DEVICE``, else auto).
    dtype
        Cast to this dtype; towards the GPU on the host, before the move. None keeps the dtype,
        except that integer sparse data become float32 (cupyx holds floating sparse data only)
        and, with ``matrix=True``, so do non-floating dense arrays.
    matrix
        ``X`` is a data matrix (counts), not an index array: integers become float32 too.

    Notes
    -----
    Sparse matrices keep their format (CSR/CSC/COO); other scipy formats become CSR. A sparse
    matrix with more than 2**31 - 1 stored entries is refused (:func:`check_gpu_sparse`).
    """
    target = resolve_device(device)
    if target == "cpu":
        X = to_host(X)
        return X if dtype is None or X.dtype == np.dtype(dtype) else X.astype(dtype)
    if is_gpu_array(X):
        return X if dtype is None or X.dtype == np.dtype(dtype) else X.astype(dtype)
    cp = _require_cupy()
    dt = device_dtype(X, dtype, matrix=matrix)
    if sp.issparse(X):
        check_gpu_sparse(X)
        fmt = X.format if X.format in ("csr", "csc", "coo") else "csr"
        X = X.asformat(fmt)
        if dt is not None and X.dtype != dt:
            X = X.astype(dt)  # on the host: cupyx refuses integer data
        csp = _cupyx_sparse()
        return {"csr": csp.csr_matrix, "csc": csp.csc_matrix, "coo": csp.coo_matrix}[fmt](X)
    if dt is not None:
        X = np.asarray(X, dtype=dt)
    return cp.asarray(X)


def to_host(X: Any) -> Any:
    """Move a CuPy array / cupyx sparse matrix to NumPy / SciPy (no copy for host data)."""
    if not is_gpu_array(X):
        return X
    return X.get()  # cupy.ndarray and cupyx sparse matrices both provide .get()


def on_device(X: Any, device: str | None,
              dtype: Any = None) -> tuple[Any, Callable[[Any], Any]]:
    """Prepare one kernel input for a per-call ``device`` override.

    Returns ``(X_on_device, restore)`` where ``restore(result)`` moves a result back to the
    caller's array kind. With ``device=None`` (or the device the data are on) they stay where
    they are, uncast: the kernel casts them. A move to the GPU casts on the host first, to
    ``dtype`` (the kernel's compute dtype) or, when None, integer data to float32
    (:func:`to_device` with ``matrix=True``).
    """
    if device is None:
        return X, _identity
    target = resolve_device(device)
    caller = device_of(X)
    if target == caller:
        return X, _identity
    moved = to_device(X, target, dtype=dtype if target == "gpu" else None, matrix=True)
    return moved, (to_host if caller == "cpu" else functools.partial(to_device, device="gpu"))


def _identity(x: Any) -> Any:
    return x


def synchronize(X: Any = None) -> None:
    """Block until queued GPU work finishes (no-op on the CPU); used by benchmarks."""
    cp = _cupy()
    if cp is not None and (X is None or is_gpu_array(X)):
        cp.cuda.Device().synchronize()


def anndata_to_device(adata, device: str | None = None, layers: bool = True,
                      dtype: Any = None) -> None:
    """Move ``adata.X`` (and ``adata.layers``) to ``device`` in place.

    Same convention as rapids-singlecell's ``rsc.get.anndata_to_GPU``: dense matrices become
    ``cupy.ndarray``, sparse ones ``cupyx.scipy.sparse`` (CSR/CSC/COO kept). Towards the GPU
    each matrix is cast on the host first: to ``dtype`` when given, else integer counts (dense
    or sparse) to float32, floating data kept as they are. A sparse matrix with more than
    2**31 - 1 stored entries is refused before anything moves.
    """
    mats: dict[Any, Any] = {} if adata.X is None else {None: adata.X}
    if layers:
        mats.update(adata.layers.items())
    if resolve_device(device) == "gpu":
        for key, M in mats.items():
            if sp.issparse(M):
                check_gpu_sparse(M, "adata.X" if key is None else f"adata.layers[{key!r}]")
    for key, M in mats.items():
        moved = to_device(M, device, dtype=dtype, matrix=True)
        if key is None:
            adata.X = moved
        else:
            adata.layers[key] = moved


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


# ----------------------------------------------------------------------------------------------
# CPU threads: one budget for our pools, BLAS limited inside them (see the module docstring)
# ----------------------------------------------------------------------------------------------
THREADS_ENV = "SCATLAS_NUM_THREADS"
#: Below this many flops a BLAS call runs on one thread (:func:`blas_for_flops`).
SERIAL_BLAS_FLOPS = 1e9

_BLAS_LOCK = threading.Lock()
_BLAS_STATE: dict[str, Any] = {"depth": 0, "limiter": None, "budget": None}


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def _blas_controller() -> Any:
    """threadpoolctl's controller of the loaded BLAS libraries, or None without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        return None
    try:
        from threadpoolctl import get_cached_controller  # (>= 3.8)

        return get_cached_controller()
    except ImportError:
        return ThreadpoolController()


def blas_threads() -> int | None:
    """The largest thread count any loaded BLAS is allowed right now (None when unknown)."""
    ctl = _blas_controller()
    if ctl is None:
        return None
    counts = [lib.num_threads for lib in ctl.select(user_api="blas").lib_controllers
              if lib.num_threads]
    return max(counts) if counts else None


def cpu_threads() -> int:
    """Thread budget for scatlas's CPU pools.

    ``$SCATLAS_NUM_THREADS`` when set; otherwise the BLAS thread limit in force outside any
    :func:`serial_blas` section (so ``OPENBLAS_NUM_THREADS=1`` also makes our pools serial),
    capped by the usable cores.
    """
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ScatlasInputError(
                f"${THREADS_ENV} must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ScatlasInputError(f"${THREADS_ENV} must be a positive integer, got {env!r}")
        return n
    cores = _usable_cores()
    with _BLAS_LOCK:
        blas = _BLAS_STATE["budget"] if _BLAS_STATE["depth"] else blas_threads()
    return max(1, min(cores, blas or cores))


def _force_blas_control() -> None:
    """Let this thread change OpenBLAS's process-wide limit (threadpoolctl >= 3.8 otherwise
    ignores a change made from any thread but the first one that set a limit)."""
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:  # pragma: no cover
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


@contextlib.contextmanager
def serial_blas() -> Iterator[None]:
    """Limit every loaded BLAS to one thread for the duration of the block.

    Safe to nest and to hold from several threads at once. Libraries with a process-wide limit
    (OpenBLAS on pthreads, as in NumPy's and SciPy's wheels) are limited when the first holder
    enters, and their previous limits come back when the last one leaves, whichever threads
    those are. Libraries with per-thread limits (OpenBLAS on the OpenMP threading layer, as
    bundled by faiss-cpu) are limited in each holding thread for as long as it holds. Hold it in
    the thread that starts a pool, around the pooled work, and in each task
    (:func:`serial_blas_task`).
    """
    ctl = _blas_controller()
    if ctl is None:  # pragma: no cover - no threadpoolctl: nothing to control
        yield
        return
    with _BLAS_LOCK:
        if _BLAS_STATE["depth"] == 0:
            _BLAS_STATE["budget"] = blas_threads()
            _force_blas_control()
            _BLAS_STATE["limiter"] = ctl.limit(limits=1, user_api="blas")
        _BLAS_STATE["depth"] += 1
    local = ctl.select(user_api="blas", threading_layer="openmp")
    local_limiter = local.limit(limits=1) if local.lib_controllers else None
    owner = threading.get_ident()
    try:
        yield
    finally:
        if local_limiter is not None and threading.get_ident() == owner:
            local_limiter.restore_original_limits()
        with _BLAS_LOCK:
            _BLAS_STATE["depth"] -= 1
            if _BLAS_STATE["depth"] == 0:
                limiter, _BLAS_STATE["limiter"] = _BLAS_STATE["limiter"], None
                _force_blas_control()
                limiter.restore_original_limits()
                _force_blas_control()  # leave no thread in control of OpenBLAS


def serial_blas_task(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a pool task in :func:`serial_blas`: the pool's starter already holds the
    process-wide limit, and a BLAS with per-thread limits (OpenMP threading layer, e.g.
    faiss-cpu's bundled OpenBLAS) starts every worker at its default, so each task sets it too.
    """

    @functools.wraps(fn)
    def task(*args: Any, **kwargs: Any) -> Any:
        with serial_blas():
            return fn(*args, **kwargs)

    return task


def blas_for_flops(flops: float, like: Any = None) -> contextlib.AbstractContextManager[None]:
    """:func:`serial_blas` for a host BLAS call of fewer than :data:`SERIAL_BLAS_FLOPS` flops
    (threads cost more than they save there, see the module docstring), else a no-op; also a
    no-op when ``like`` is a GPU array (the call does not run on the host BLAS)."""
    if flops >= SERIAL_BLAS_FLOPS or (like is not None and is_gpu_array(like)):
        return contextlib.nullcontext()
    return serial_blas()
