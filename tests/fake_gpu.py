"""A NumPy stand-in for CuPy, so that the GPU branches of scatlas run on the CPU in tests.

:func:`install` (or the ``fake_gpu`` fixture of the tests that import it) replaces
``scatlas.backend._cupy`` and ``scatlas.backend._cupyx_sparse`` with this module's stand-ins:

- :class:`FakeCupyArray` is a NumPy array whose type lives in a ``cupy...`` module, so
  ``backend.is_gpu_array`` is True for it, ``backend.array_module`` returns :data:`fake_cupy`, and
  every ``xp is np`` test in the kernels takes its CuPy branch;
- :data:`fake_cupy` forwards to NumPy and wraps every array it returns as a ``FakeCupyArray``;
  where CuPy behaves differently in a way the kernels rely on, it behaves like CuPy:
  ``linalg.cholesky`` does not raise on a matrix that is not positive definite but returns the
  partial, finite factor (CuPy's default ``cupyx.errstate(linalg="ignore")``), ``linalg.solve``
  returns NaNs for a singular system, sorts are stable, and ``RawKernel`` compiles only the
  kernels registered in :data:`RAW_KERNELS` (NumPy emulations, e.g. the kNN append kernel);
- :data:`fake_cupyx_sparse` holds CSR/CSC/COO matrices that accept only bool, float32, float64
  and complex data (``ValueError`` otherwise, as cupyx), record every construction in
  :data:`CONSTRUCTED`, and support the few operations the kernels' GPU branches use.

What this cannot show: CUDA itself (memory, streams, kernel compilation, float rounding of the
GPU's BLAS). It tests the logic of the CuPy branches; the ``gpu``-marked tests test the device.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp


class FakeCupyArray(np.ndarray):
    """A NumPy array that scatlas's backend takes for a ``cupy.ndarray``."""

    def get(self) -> np.ndarray:
        """Device-to-host copy, as ``cupy.ndarray.get``."""
        return np.array(self, copy=True).view(np.ndarray)


FakeCupyArray.__module__ = "cupy._fake"  # backend.is_gpu_array reads type(X).__module__


def _wrap(out: Any) -> Any:
    if isinstance(out, np.ndarray) and not isinstance(out, FakeCupyArray):
        return out.view(FakeCupyArray)
    if isinstance(out, tuple):
        return tuple(_wrap(o) for o in out)
    if isinstance(out, list):
        return [_wrap(o) for o in out]
    return out


def _wrapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return _wrap(fn(*args, **kwargs))

    return call


def _cupy_cholesky(a: Any) -> Any:
    """Lower Cholesky factor that, like CuPy under ``linalg="ignore"``, does not raise when the
    matrix is not positive definite: the columns before the failing pivot are the true factor,
    the rest is the partially updated matrix (finite, not a factor)."""
    A = np.array(a, dtype=np.result_type(a, np.float32), copy=True)
    n = A.shape[-1]
    L = np.tril(A)
    for j in range(n):
        d = L[j, j] - L[j, :j] @ L[j, :j]
        if not d > 0:
            return _wrap(np.tril(L))  # potrf's info > 0: stop, leave the rest as it is
        L[j, j] = np.sqrt(d)
        L[j + 1 :, j] = (L[j + 1 :, j] - L[j + 1 :, :j] @ L[j, :j]) / L[j, j]
    return _wrap(np.tril(L))


def _cupy_solve(a: Any, b: Any) -> Any:
    """``solve`` that returns NaNs for a singular system (CuPy's way) instead of raising."""
    try:
        return _wrap(np.linalg.solve(a, b))
    except np.linalg.LinAlgError:
        shape = np.broadcast_shapes(np.shape(a)[:-1], np.shape(b)[:-1]) + np.shape(b)[-1:]
        return _wrap(np.full(shape if np.ndim(b) > 1 else np.shape(b), np.nan))


class _Namespace(types.SimpleNamespace):
    """Forwards unknown attributes to a NumPy namespace, wrapping what callables return."""

    def __init__(self, base: Any, **overrides: Any):
        super().__init__(**overrides)
        object.__setattr__(self, "_base", base)

    def __getattr__(self, name: str) -> Any:
        value = getattr(object.__getattribute__(self, "_base"), name)
        if isinstance(value, type | np.ufunc):  # dtypes, np.ndarray; ufuncs keep .at, .reduce
            return value
        if callable(value):
            return _wrapped(value)
        return value


def _stable_sort(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(a: Any, axis: int = -1, kind: Any = None) -> Any:  # noqa: ARG001 - CuPy: stable
        return _wrap(fn(a, axis=axis, kind="stable"))

    return call


#: RawKernel names this stand-in can "compile": name -> factory(source) -> callable.
RAW_KERNELS: dict[str, Callable[[str], Callable[..., None]]] = {}
#: Every cupyx sparse construction, as (format, dtype) pairs, in order.
CONSTRUCTED: list[tuple[str, np.dtype]] = []


class RawKernel:
    """``cupy.RawKernel`` backed by a NumPy emulation from :data:`RAW_KERNELS`."""

    def __init__(self, code: str, name: str, **_: Any):
        if name not in RAW_KERNELS:
            raise RuntimeError(f"fake cupy: no emulation of raw kernel {name!r}")
        self.code, self.name = code, name
        self._fn = RAW_KERNELS[name](code)

    def compile(self) -> None:
        return None

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        self._fn(grid, block, args)


class _MemoryPool:
    def free_bytes(self) -> int:
        return 0

    def used_bytes(self) -> int:
        return 0


class _Runtime:
    free_bytes = 8 * 2**30
    total_bytes = 16 * 2**30

    def memGetInfo(self) -> tuple[int, int]:  # noqa: N802 - CuPy's name
        return self.free_bytes, self.total_bytes

    def getDeviceCount(self) -> int:  # noqa: N802
        return 1


class _Device:
    def __init__(self, i: int = 0):
        self.id = i

    def synchronize(self) -> None:
        return None

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _asnumpy(a: Any) -> np.ndarray:
    return a.get() if isinstance(a, FakeCupyArray) else np.asarray(a)


fake_cupy = _Namespace(
    np,
    __name__="cupy",
    linalg=_Namespace(np.linalg, cholesky=_cupy_cholesky, solve=_cupy_solve),
    random=_Namespace(np.random),
    argsort=_stable_sort(np.argsort),
    sort=_stable_sort(np.sort),
    asnumpy=_asnumpy,
    RawKernel=RawKernel,
    cuda=types.SimpleNamespace(runtime=_Runtime(), Device=_Device),
    get_default_memory_pool=_MemoryPool,
)


# ----------------------------------------------------------------------------------------------
# cupyx.scipy.sparse
# ----------------------------------------------------------------------------------------------
class _FakeSparse:
    """A scipy sparse matrix posing as a cupyx one (the operations the GPU branches use)."""

    def __init__(self, arg: Any, shape: tuple[int, int] | None = None, dtype: Any = None,
                 fmt: str = "csr"):
        if isinstance(arg, _FakeSparse):
            arg = arg._m
        elif isinstance(arg, tuple):
            arg = tuple(_host(a) for a in arg[:1]) + (
                tuple(_host(a) for a in arg[1]) if isinstance(arg[1], tuple) else
                tuple(_host(a) for a in arg[1:]))
            arg = (arg[0], arg[1]) if fmt == "coo" else arg
        elif isinstance(arg, np.ndarray):
            arg = np.asarray(arg).view(np.ndarray)
        m = sp.coo_matrix(arg, shape=shape, dtype=dtype) if fmt == "coo" else (
            sp.csr_matrix(arg, shape=shape, dtype=dtype) if fmt == "csr"
            else sp.csc_matrix(arg, shape=shape, dtype=dtype))
        if m.dtype.char not in "?fdFD":  # cupyx/scipy/sparse/_compressed.py, _coo.py
            raise ValueError("Only bool, float32, float64, complex64 and complex128 are "
                             "supported")
        self._m = m
        CONSTRUCTED.append((fmt, m.dtype))

    format = property(lambda self: self._m.format)
    shape = property(lambda self: self._m.shape)
    dtype = property(lambda self: self._m.dtype)
    nnz = property(lambda self: self._m.nnz)
    data = property(lambda self: _wrap(self._m.data))
    indices = property(lambda self: _wrap(getattr(self._m, "indices", None)))
    indptr = property(lambda self: _wrap(getattr(self._m, "indptr", None)))

    def get(self) -> Any:
        return self._m.copy()

    def tocsr(self) -> _FakeSparse:
        return csr_matrix(self._m.tocsr())

    def tocsc(self) -> _FakeSparse:
        return csc_matrix(self._m.tocsc())

    def toarray(self) -> FakeCupyArray:
        return _wrap(self._m.toarray())

    def astype(self, dtype: Any) -> _FakeSparse:
        return type(self)(self._m.astype(dtype))

    def __matmul__(self, other: Any) -> Any:
        return _wrap(np.asarray(self._m @ _host(other)))


def _host(a: Any) -> Any:
    return a.get() if isinstance(a, FakeCupyArray | _FakeSparse) else a


class csr_matrix(_FakeSparse):  # noqa: N801 - cupyx's name
    def __init__(self, arg: Any, shape: Any = None, dtype: Any = None, copy: bool = False):
        super().__init__(arg, shape, dtype, "csr")


class csc_matrix(_FakeSparse):  # noqa: N801
    def __init__(self, arg: Any, shape: Any = None, dtype: Any = None, copy: bool = False):
        super().__init__(arg, shape, dtype, "csc")


class coo_matrix(_FakeSparse):  # noqa: N801
    def __init__(self, arg: Any, shape: Any = None, dtype: Any = None, copy: bool = False):
        super().__init__(arg, shape, dtype, "coo")


for _cls in (_FakeSparse, csr_matrix, csc_matrix, coo_matrix):
    _cls.__module__ = "cupyx.scipy.sparse._fake"

fake_cupyx_sparse = types.SimpleNamespace(
    csr_matrix=csr_matrix, csc_matrix=csc_matrix, coo_matrix=coo_matrix,
    issparse=lambda X: isinstance(X, _FakeSparse),
)


def install(monkeypatch: Any) -> types.SimpleNamespace:
    """Make ``scatlas.backend`` see :data:`fake_cupy` as CuPy on one visible GPU (for one test,
    through pytest's ``monkeypatch``); returns the fake module."""
    from scatlas import backend

    monkeypatch.setattr(backend, "_cupy", lambda: fake_cupy)
    monkeypatch.setattr(backend, "_cupyx_sparse", lambda: fake_cupyx_sparse)
    CONSTRUCTED.clear()
    return fake_cupy


def to_fake_gpu(X: Any) -> Any:
    """A host array as a :class:`FakeCupyArray` (a "device" copy)."""
    return np.array(X, copy=True).view(FakeCupyArray)
