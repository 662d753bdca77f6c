"""glibc keeps freed memory inside ``reused_freed_memory`` (fewer page faults), not outside."""

from __future__ import annotations

import ctypes
import platform
import resource

import pytest

from scatlas import _host_memory

pytestmark = pytest.mark.skipif(_host_memory._libc() is None, reason="needs glibc")  # noqa: SLF001

SIZE = 96 * 2**20  # above glibc's largest mmap threshold (32 MiB)


def _faults_of_three_allocations() -> int:
    """Minor page faults of allocating, touching and freeing SIZE bytes three times (the first
    allocation may fault either way; the later ones only when the memory went back to the OS)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    ptr = libc.malloc(SIZE)
    ctypes.memset(ptr, 1, SIZE)
    libc.free(ptr)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        ptr = libc.malloc(SIZE)
        ctypes.memset(ptr, 1, SIZE)
        libc.free(ptr)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_memory_is_reused_inside_and_returned_after():
    assert platform.system() == "Linux"
    pages = 2 * SIZE // 4096
    assert _faults_of_three_allocations() > pages // 2  # default glibc: unmapped on free
    with _host_memory.reused_freed_memory() as on:
        assert on
        with _host_memory.reused_freed_memory() as nested:  # nesting keeps the setting
            assert nested
        assert _faults_of_three_allocations() < pages // 20
    assert _faults_of_three_allocations() > pages // 2  # 96 MiB goes back to the OS again
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):  # blocks below 32 MiB are reused, as glibc's dynamic threshold does
        ptr = libc.malloc(8 * 2**20)
        ctypes.memset(ptr, 1, 8 * 2**20)
        libc.free(ptr)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 3 * 2048 // 2
    with _host_memory.reused_freed_memory(enabled=False) as on:
        assert not on
