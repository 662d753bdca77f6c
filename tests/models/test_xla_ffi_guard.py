"""The hand-laid XLA FFI custom calls stay out of processes whose JAX they were not checked
with (a wrong struct offset is a segfault, at test collection), and declare the right sizes."""

from __future__ import annotations

import ctypes
import importlib.util
import re
from pathlib import Path

import pytest

from scatlas.models import xla_ffi


@pytest.fixture
def fresh(monkeypatch):
    """A process state in which available() has not run yet, and registering would fail."""
    monkeypatch.setitem(xla_ffi._state, "ok", None)
    calls = []

    def no_register():
        calls.append(1)
        raise AssertionError("registered under a JAX it must not touch")

    monkeypatch.setattr(xla_ffi, "_register", no_register)
    monkeypatch.delenv(xla_ffi.ENV, raising=False)
    return calls


def test_untested_jax_is_never_touched(fresh, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "__version__", "99.0.0")
    ok, why = xla_ffi.enabled()
    assert not ok and "99.0.0" in why and xla_ffi.ENV in why
    assert xla_ffi.available() is False and fresh == []
    assert xla_ffi.available() is False and fresh == []  # remembered


def test_opt_in_and_opt_out(fresh, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "__version__", "99.0.0")
    monkeypatch.setenv(xla_ffi.ENV, "1")
    assert xla_ffi.enabled()[0]
    if jax.default_backend() == "cpu":
        assert xla_ffi.available() is False and fresh == [1]  # tried (here: the stub refused)
    monkeypatch.setitem(xla_ffi._state, "ok", None)
    monkeypatch.setenv(xla_ffi.ENV, "off")
    assert xla_ffi.enabled() == (False, f"${xla_ffi.ENV}=off")
    assert xla_ffi.available() is False
    monkeypatch.setenv(xla_ffi.ENV, "maybe")
    assert not xla_ffi.enabled()[0] and "must be" in xla_ffi.enabled()[1]


def test_tested_releases_are_enabled_by_default(fresh, monkeypatch):
    import jax
    import jaxlib

    version = sorted(xla_ffi.TESTED_JAX)[0]
    monkeypatch.setattr(jax, "__version__", version[0])
    monkeypatch.setattr(jaxlib, "__version__", version[1])
    assert xla_ffi.enabled()[0]


def test_api_version_struct_size_is_24_bytes():
    """XLA_FFI_Api_Version {size_t struct_size; void* extension_start; int major, minor;}:
    XLA_FFI_STRUCT_SIZE = offsetof(minor_version) + sizeof(int) = 24 on LP64 (was written as
    28)."""

    class ApiVersion(ctypes.Structure):
        _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                    ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]

    size = ApiVersion.minor_version.offset + ctypes.sizeof(ctypes.c_int)
    assert xla_ffi.API_VERSION_STRUCT_SIZE == size == 24


def test_the_installed_jaxlib_header_matches_what_the_handlers_assume():
    """When jaxlib ships its FFI header: the API version and the struct fields the handlers read
    as 64-bit words are where they are assumed to be (a tested release must pass this)."""
    import jax
    import jaxlib

    versions = (jax.__version__, jaxlib.__version__)
    if versions not in xla_ffi.TESTED_JAX:  # e.g. JAX 0.12.1 declares FFI API 0.5
        assert not xla_ffi.enabled()[0] or xla_ffi.ENV in xla_ffi.enabled()[1]
        pytest.skip(f"JAX {versions} is not a tested release: the custom calls stay off")
    spec = importlib.util.find_spec("jaxlib")
    header = Path(spec.origin).parent / "include/xla/ffi/api/c_api.h" if spec else None
    if header is None or not header.is_file():
        pytest.skip("jaxlib ships no FFI header here")
    text = header.read_text()
    major = int(re.search(r"#define XLA_FFI_API_MAJOR (\d+)", text).group(1))
    minor = int(re.search(r"#define XLA_FFI_API_MINOR (\d+)", text).group(1))
    assert (major, minor) == xla_ffi.API_VERSION

    def fields(name: str) -> list[str]:
        """The member names of ``struct name {...};``, in order."""
        body = re.search(r"struct " + name + r" \{(.*?)\};", text, re.S).group(1)
        body = re.sub(r"//[^\n]*", "", body)
        return [re.search(r"(\w+)\s*$", decl.strip()).group(1)
                for decl in body.split(";") if decl.strip()]

    assert fields("XLA_FFI_Buffer") == ["struct_size", "extension_start", "dtype", "data",
                                         "rank", "dims"]
    assert fields("XLA_FFI_Args")[:5] == ["struct_size", "extension_start", "size", "types",
                                          "args"]
    assert fields("XLA_FFI_Rets")[:5] == ["struct_size", "extension_start", "size", "types",
                                          "rets"]
    # call frame words: 0 size, 1 extension_start, 2 api, 3 ctx, 4 stage, 5-9 args, 10-14 rets
    assert fields("XLA_FFI_CallFrame")[:7] == ["struct_size", "extension_start", "api", "ctx",
                                               "stage", "args", "rets"]
    assert fields("XLA_FFI_Api_Version") == ["struct_size", "extension_start", "major_version",
                                             "minor_version"]
    assert fields("XLA_FFI_Metadata")[:3] == ["struct_size", "api_version", "traits"]
