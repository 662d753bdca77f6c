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
    """CuPy's sorts: always stable; ``kind`` may only be None or "stable" (CuPy >= 12)."""

    @functools.wraps(fn)
    def call(a: Any, axis: int = -1, kind: Any = None) -> Any:
        if kind not in (None, "stable"):
            raise ValueError(f"fake cupy: kind={kind!r} (CuPy sorts accept None or 'stable')")
        return _wrap(fn(a, axis=axis, kind="stable"))

    return call


#: RawKernel names this stand-in can "compile": name -> factory(source) -> callable.
RAW_KERNELS: dict[str, Callable[[str], Callable[..., None]]] = {}
def _knn_append(code: str) -> Callable[..., None]:
    """``knn_append`` (scatlas.kernels.neighbors) by its CPU twin, ``append_reference``."""
    from scatlas.kernels.neighbors import append_reference

    assert "atomicAdd" in code

    def launch(grid: tuple, block: tuple, args: tuple) -> None:  # noqa: ARG001
        S, width, thr, cnt, buf_key, buf_idx, col_ids, cap = args
        assert grid[1] == S.shape[0] and int(width) == S.shape[1]
        assert int(cap) == buf_key.shape[1] == buf_idx.shape[1]
        assert cnt.dtype == np.int32 and buf_idx.dtype == col_ids.dtype == np.int64
        append_reference(S, thr, cnt, buf_key, buf_idx, col_ids)

    return launch


RAW_KERNELS["knn_append"] = _knn_append
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
    """A scipy sparse matrix posing as a cupyx one: constructors refuse what cupyx refuses,
    everything else forwards to scipy, with host arguments in and fake device results out."""

    def __init__(self, arg: Any, shape: tuple[int, int] | None = None, dtype: Any = None,
                 fmt: str = "csr", record: bool = True):
        if isinstance(arg, _FakeSparse):
            arg = arg._m
        elif isinstance(arg, tuple) and len(arg) == 2 and isinstance(arg[1], tuple):
            arg = (_host(arg[0]), tuple(_host(a) for a in arg[1]))  # (data, (row, col))
        elif isinstance(arg, tuple) and len(arg) == 3:  # (data, indices, indptr)
            arg = tuple(_host(a) for a in arg)
        elif isinstance(arg, np.ndarray):
            arg = np.asarray(arg).view(np.ndarray)
        make = {"coo": sp.coo_matrix, "csr": sp.csr_matrix, "csc": sp.csc_matrix}[fmt]
        m = make(arg, shape=shape, dtype=dtype)
        if m.dtype.char not in "?fdFD":  # cupyx/scipy/sparse/_compressed.py, _coo.py
            raise ValueError("Only bool, float32, float64, complex64 and complex128 are "
                             "supported")
        self._m = m
        if record:
            CONSTRUCTED.append((fmt, m.dtype))

    # the array attributes are device views of the host matrix's buffers (writes go through)
    data = property(lambda self: _wrap(self._m.data),
                    lambda self, v: setattr(self._m, "data", _host(v)))
    indices = property(lambda self: _wrap(getattr(self._m, "indices", None)))
    indptr = property(lambda self: _wrap(getattr(self._m, "indptr", None)))
    row = property(lambda self: _wrap(getattr(self._m, "row", None)))
    col = property(lambda self: _wrap(getattr(self._m, "col", None)))
    T = property(lambda self: _device(self._m.T))

    def __getattr__(self, name: str) -> Any:
        value = getattr(object.__getattribute__(self, "_m"), name)
        if callable(value):
            return lambda *a, **kw: _device(value(*_hosts(a), **dict(zip(
                kw, _hosts(tuple(kw.values())), strict=True))))
        return _device(value)

    def get(self) -> Any:
        return self._m.copy()

    def __len__(self) -> int:
        raise TypeError("sparse matrix length is ambiguous; use getnnz() or shape[0]")

    def __getitem__(self, key: Any) -> Any:
        key = tuple(_host(k) for k in key) if isinstance(key, tuple) else _host(key)
        return _device(self._m[key])


def _binary(name: str) -> Callable[..., Any]:
    def op(self: _FakeSparse, other: Any) -> Any:
        return _device(getattr(self._m, name)(_host(other)))

    op.__name__ = name
    return op


for _name in ("__matmul__", "__rmatmul__", "__mul__", "__rmul__", "__add__", "__radd__",
              "__sub__", "__rsub__", "__truediv__", "__neg__", "__pow__", "__eq__", "__ne__",
              "__lt__", "__gt__", "__le__", "__ge__"):
    setattr(_FakeSparse, _name, _binary(_name) if _name != "__neg__" else
            (lambda self: _device(-self._m)))


def _host(a: Any) -> Any:
    if isinstance(a, FakeCupyArray):
        return a.get()
    if isinstance(a, _FakeSparse):
        return a._m
    return a


def _hosts(args: tuple) -> tuple:
    return tuple([_host(x) for x in a] if isinstance(a, list) else _host(a) for a in args)


def _device(out: Any) -> Any:
    """A scipy result as the fake device's kind (sparse formats kept; np.matrix -> 2-D)."""
    if sp.issparse(out):
        fmt = out.format if out.format in ("csr", "csc", "coo") else "csr"
        return _FORMATS[fmt](out.asformat(fmt), record=False)
    if isinstance(out, np.matrix):
        return np.asarray(out).view(FakeCupyArray)
    if isinstance(out, tuple):
        return tuple(_device(o) for o in out)
    return _wrap(out)


class csr_matrix(_FakeSparse):  # noqa: N801 - cupyx's name
    format = "csr"

    def __init__(self, arg: Any, shape: Any = None, dtype: Any = None, copy: bool = False,
                 record: bool = True):
        super().__init__(arg, shape, dtype, "csr", record)


class csc_matrix(_FakeSparse):  # noqa: N801
    format = "csc"

    def __init__(self, arg: Any, shape: Any = None, dtype: Any = None, copy: bool = False,
                 record: bool = True):
        super().__init__(arg, shape, dtype, "csc", record)


class coo_matrix(_FakeSparse):  # noqa: N801
    format = "coo"

    def __init__(self, arg: Any, shape: Any = None, dtype: Any = None, copy: bool = False,
                 record: bool = True):
        super().__init__(arg, shape, dtype, "coo", record)


_FORMATS = {"csr": csr_matrix, "csc": csc_matrix, "coo": coo_matrix}
for _cls in (_FakeSparse, csr_matrix, csc_matrix, coo_matrix):
    _cls.__module__ = "cupyx.scipy.sparse._fake"


class _SparseModule(types.SimpleNamespace):
    """``cupyx.scipy.sparse``: the three formats, ``issparse``, and scipy's other functions
    (``diags``, ``hstack``, ``vstack``, ``eye`` ...) on host copies, results on the "device"."""

    def __getattr__(self, name: str) -> Any:
        fn = getattr(sp, name)
        return lambda *a, **kw: _device(fn(*_hosts(a), **kw))


fake_cupyx_sparse = _SparseModule(
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
