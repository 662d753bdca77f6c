"""Sparse batch kernels of :mod:`scatlas.kernels.spmm` as XLA custom calls on the CPU
(zero-copy, in a jit; moved here from ``kernels``: it is JAX FFI, not array-in/array-out).

A training step that keeps its expression batch sparse needs, inside the jitted step, ``X @ B``
and ``X.T @ D`` for a CSR batch X (the first layer and its weight gradient) and X written out
densely (the reconstruction target). ``jax.pure_callback`` copies every operand and result
through Python (0.018-0.028 s for a 28,231 x 1,024 float32 operand, 0.053-0.070 s for a result
of that size, ``python -m bench.metric_parts``), so these are registered instead as typed XLA
FFI handlers (``jax.ffi``, API 0.x) written as numba C callbacks: XLA passes its own buffers,
nothing is copied, and the kernels run on numba's threads.

The handlers read XLA's C structs (``xla/ffi/api/c_api.h``: the call frame, argument and result
lists, buffers) as 64-bit words; they answer XLA's metadata query (API version 0.3, no traits).

Version guard
-------------
Laid out by hand, these structs are only as right as the XLA they were read from: another JAX
can move a field, and a wrong offset is a segfault (at test collection, since the sparse-step
tests ask :func:`available`). So the custom calls are opt-in beyond the JAX releases they were
checked against (:data:`TESTED_JAX`, exact ``(jax, jaxlib)`` versions), through
``$SCATLAS_XLA_FFI``:

- unset or ``auto``: on a tested JAX only; elsewhere :func:`available` is False (the dense step
  runs) and nothing is compiled, registered or called;
- ``1`` / ``force``: on any JAX (to check a new release: ``SCATLAS_XLA_FFI=1 python -m pytest
  tests/models/test_sparse_step.py``, then add it to :data:`TESTED_JAX`);
- ``0`` / ``off``: never.
A process-wide mutex serialises them, because numba's default threading layer refuses
concurrent parallel launches and XLA may run independent custom calls at once.
:func:`available` registers them once and checks them against scipy on a small product; callers
fall back to the dense step when it is False (no numba, a platform without pthreads, or an XLA
whose FFI they do not match).

All take the CSR batch as three arrays: ``indptr`` int32 (n + 1), ``indices`` int32 (cap) and
``data`` float32 (cap); entries from ``indptr[n]`` to ``cap`` are padding (ignored). The
products skip explicit zeros (dropped-out inputs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_TARGETS = {"matmul": "scatlas_csr_matmul", "t_matmul": "scatlas_csr_t_matmul",
            "densify": "scatlas_csr_densify"}
_state: dict[str, Any] = {"ok": None}

#: (jax, jaxlib) versions whose XLA FFI structs these handlers were checked against (the
#: layout in ``jaxlib/include/xla/ffi/api/c_api.h`` and tests/models/test_sparse_step.py passing).
TESTED_JAX: frozenset[tuple[str, str]] = frozenset({("0.10.2", "0.10.2")})
ENV = "SCATLAS_XLA_FFI"
#: ``XLA_FFI_Api_Version_STRUCT_SIZE``: size_t struct_size, a pointer, int major, int minor.
API_VERSION_STRUCT_SIZE = 24
#: The FFI API version the handlers declare (``XLA_FFI_API_MAJOR`` / ``_MINOR``).
API_VERSION = (0, 3)


def enabled() -> tuple[bool, str]:
    """Whether the custom calls may be used in this process, and why (no JAX import beyond
    reading its version; nothing compiled or registered)."""
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return False, f"${ENV}={mode}"
    try:
        import jax
        import jaxlib
    except ImportError as exc:  # pragma: no cover - JAX is a dependency
        return False, f"JAX unavailable ({exc})"
    versions = (jax.__version__, jaxlib.__version__)
    if mode in ("1", "on", "force", "true", "yes"):
        return True, f"${ENV}={mode} (JAX {versions[0]}, jaxlib {versions[1]})"
    if mode != "auto":
        return False, f"${ENV} must be auto, 1/force or 0/off, got {mode!r}"
    if versions in TESTED_JAX:
        return True, f"JAX {versions[0]} / jaxlib {versions[1]} is a tested release"
    return False, (f"JAX {versions[0]} / jaxlib {versions[1]} is not among the releases these "
                   f"hand-laid FFI structs were checked with ({sorted(TESTED_JAX)}); set "
                   f"{ENV}=1 to try them")


def _compile_handlers() -> dict[str, Any]:
    """Compile the numba C callbacks (on first use: a few seconds)."""
    import numba
    from numba import types
    from numba.core.extending import intrinsic

    from ..kernels import spmm

    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    lock, unlock, init = libc.pthread_mutex_lock, libc.pthread_mutex_unlock, libc.pthread_mutex_init
    for fn in (lock, unlock):
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int
    init.argtypes, init.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    mutex = ctypes.create_string_buffer(128)  # larger than any pthread_mutex_t
    if init(ctypes.addressof(mutex), None) != 0:
        raise OSError("pthread_mutex_init failed")
    mutex_addr = ctypes.addressof(mutex)

    @intrinsic
    def _ptr(typingctx, addr):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.voidptr))
        return types.voidptr(types.int64), codegen

    @numba.njit(inline="always")
    def words(addr, n):
        return numba.carray(_ptr(addr), (n,), np.int64)

    @numba.njit(inline="always")
    def buffer(list_addr, i):
        # XLA_FFI_Buffer: struct_size, extension_start, dtype, data, rank, dims
        b = words(words(list_addr, i + 1)[i], 6)
        return b[3], words(b[5], b[4])

    @numba.njit(inline="always")
    def answered_metadata(frame):
        """XLA's metadata query: fill in the API version (0.3) and traits (none)."""
        ext = frame[1]
        if ext != 0:
            e = words(ext, 4)  # XLA_FFI_Metadata_Extension: size, type, next, metadata
            if (e[1] & 0xFFFFFFFF) == 1:
                md = words(e[3], 5)  # XLA_FFI_Metadata: size, api_version (3 words), traits
                md[1] = API_VERSION_STRUCT_SIZE
                md[2] = 0
                md[3] = API_VERSION[0] | (API_VERSION[1] << 32)  # major low, minor high half
                md[4] = 0
                return True
        return False

    @numba.njit(inline="always")
    def csr_args(args):
        p_addr, p_dims = buffer(args, 0)
        i_addr, i_dims = buffer(args, 1)
        d_addr, _ = buffer(args, 2)
        indptr = numba.carray(_ptr(p_addr), (p_dims[0],), np.int32)
        indices = numba.carray(_ptr(i_addr), (i_dims[0],), np.int32)
        data = numba.carray(_ptr(d_addr), (i_dims[0],), np.float32)
        return indptr, indices, data

    @numba.njit(inline="always")
    def matrix(list_addr, i):
        addr, dims = buffer(list_addr, i)
        return numba.carray(_ptr(addr), (dims[0], dims[1]), np.float32)

    def csr_handler(kernel):
        """A C callback running ``kernel(args, indptr, indices, data, out)`` on XLA's buffers
        (``args``: the argument list, for a kernel reading an operand after the batch; the call
        frame as words: 1 extension_start, 9 args.args, 14 rets.rets)."""

        @numba.cfunc(types.int64(types.voidptr))
        def handler(frame_ptr):  # pragma: no cover - called by XLA
            frame = numba.carray(frame_ptr, (15,), np.int64)
            if answered_metadata(frame):
                return 0
            indptr, indices, data = csr_args(frame[9])
            lock(_ptr(mutex_addr))
            kernel(frame[9], indptr, indices, data, matrix(frame[14], 0))
            unlock(_ptr(mutex_addr))
            return 0

        return handler

    @numba.njit
    def row_blocked(args, indptr, indices, data, out):  # pragma: no cover - compiled
        spmm._csr_matmul(indptr, indices, data, matrix(args, 3), out, spmm.ROWS_PER_BLOCK)

    @numba.njit
    def transposed(args, indptr, indices, data, out):  # pragma: no cover - compiled
        spmm._csr_t_matmul(indptr, indices, data, matrix(args, 3), out)

    @numba.njit
    def densify(args, indptr, indices, data, out):  # pragma: no cover - compiled
        spmm._csr_to_dense(indptr, indices, data, out)

    return {"matmul": csr_handler(row_blocked), "t_matmul": csr_handler(transposed),
            "densify": csr_handler(densify), "mutex": mutex}


def _register() -> None:
    import jax

    handlers = _compile_handlers()
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    for key, name in _TARGETS.items():
        capsule = new_capsule(handlers[key].address, b"xla._CUSTOM_CALL_TARGET", None)
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    _state["handlers"] = handlers  # keep the callbacks and the mutex alive


def _require() -> None:
    if not available():
        raise RuntimeError("scatlas's sparse XLA custom calls are unavailable in this process "
                           "(see scatlas.models.xla_ffi.available)")


def csr_matmul(indptr: Any, indices: Any, data: Any, B: Any) -> Any:
    """``X @ B`` for the CSR batch X (n, G) and B (G, K) float32: a (n, K) float32 jax array."""
    import jax
    import jax.numpy as jnp

    _require()
    out = jax.ShapeDtypeStruct((indptr.shape[0] - 1, B.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(_TARGETS["matmul"], out)(indptr, indices, data, B)


def csr_t_matmul(indptr: Any, indices: Any, data: Any, D: Any, n_cols: int) -> Any:
    """``X.T @ D`` for the CSR batch X (n, n_cols) and D (n, K) float32: (n_cols, K) float32."""
    import jax
    import jax.numpy as jnp

    _require()
    out = jax.ShapeDtypeStruct((int(n_cols), D.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(_TARGETS["t_matmul"], out)(indptr, indices, data, D)


def csr_to_dense(indptr: Any, indices: Any, data: Any, n_cols: int) -> Any:
    """The CSR batch X (n, n_cols) as a dense (n, n_cols) float32 jax array."""
    import jax
    import jax.numpy as jnp

    _require()
    out = jax.ShapeDtypeStruct((indptr.shape[0] - 1, int(n_cols)), jnp.float32)
    return jax.ffi.ffi_call(_TARGETS["densify"], out)(indptr, indices, data)


def _self_test() -> bool:
    import jax
    import jax.numpy as jnp
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    X = sp.random(37, 53, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    indptr = jnp.asarray(X.indptr.astype(np.int32))  # 5 padding entries past indptr[-1]
    indices = jnp.asarray(np.r_[X.indices, np.zeros(5, np.int32)].astype(np.int32))
    data = jnp.asarray(np.r_[X.data, np.full(5, 9.0, np.float32)])
    B = rng.normal(size=(53, 19)).astype(np.float32)
    D = rng.normal(size=(37, 19)).astype(np.float32)
    prod = jax.jit(csr_matmul)(indptr, indices, data, jnp.asarray(B))
    tprod = jax.jit(csr_t_matmul, static_argnums=4)(indptr, indices, data, jnp.asarray(D), 53)
    dense = jax.jit(csr_to_dense, static_argnums=3)(indptr, indices, data, 53)
    return bool(np.array_equal(np.asarray(dense), X.toarray())
                and np.allclose(np.asarray(prod), X @ B, rtol=1e-4, atol=1e-4)
                and np.allclose(np.asarray(tprod), X.T @ D, rtol=1e-4, atol=1e-4))


def available() -> bool:
    """The custom calls are enabled here (:func:`enabled`), registered, and agree with scipy
    (checked once per process). Under an untested JAX this is False without touching XLA."""
    if _state["ok"] is None:
        ok, why = enabled()
        if not ok:
            log.info("scatlas sparse custom calls not used: %s", why)
            _state["ok"] = False
            return False
        try:
            import jax

            if jax.default_backend() != "cpu":
                raise RuntimeError(f"the default JAX backend is {jax.default_backend()!r}")
            _register()
            _state["ok"] = True  # registered: let the self-test's calls through
            with jax.ensure_compile_time_eval():  # evaluated now, even if called while tracing
                _state["ok"] = _self_test()
            if not _state["ok"]:
                log.warning("scatlas sparse custom calls disagree with scipy; not used")
        except Exception as exc:  # no numba, no pthreads, an XLA without this FFI ...
            log.info("scatlas sparse custom calls unavailable: %s", exc)
            _state["ok"] = False
    return bool(_state["ok"])
