"""Keep freed host memory for reuse during CPU training (glibc ``mallopt``).

XLA on the CPU allocates a step's temporaries afresh at every execution (hundreds of MB per step
for the metric encoder at 28,231 genes: gradients of the two (28,231 x 1,024) layers, the
reconstruction and their intermediates). glibc serves blocks that large with ``mmap`` and
unmaps them on ``free``, so every step page-faults all of them in again: 150,900 minor faults a
step (``getrusage``). With ``M_MMAP_MAX = 0`` glibc serves them from its heap instead, and with
a high ``M_TRIM_THRESHOLD`` it keeps freed heap memory for the next step: 27,600 faults a step
(blocks above 64 MiB that XLA's worker threads allocate are still mmapped by their arenas), and
the sparse step 1.68 -> 1.51 s (dense 2.14 -> 1.95 s) on the 2-core Zen 4 VM
(``python -m bench.metric_parts``). PyTorch's performance guide gives the same advice for CPU
training (a caching allocator such as jemalloc or tcmalloc).

The price is that the process keeps its peak memory while the setting is on; the context manager
returns the memory (``malloc_trim``) when training ends and leaves glibc as a process runs once
it has freed a block of 32 MiB or more. glibc's own defaults are dynamic: the mmap threshold
starts at 128 KiB and rises to the size of each freed mmapped block up to 32 MiB, the trim
threshold to twice that; but any ``mallopt`` call freezes them. Restoring the static 128 KiB
made everything above it mmapped again: embedding 10,000 cells at 2,000 genes after a training
run took 0.427 s with 28,000 page faults, against 0.377 s and 2,000 faults in a fresh process.
The restore therefore sets the values the dynamic rule reaches (mmap from 32 MiB, trim above 64
MiB): 0.370 s and 580 faults (ad hoc). In one process (``python -m bench.metric_parts``, rows
"embedding after training"): 0.406 s and 30,700 faults a call with the static defaults, 0.358 s
and none as restored (CSR input). Elsewhere than glibc (macOS, musl)
nothing is changed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import platform
from collections.abc import Iterator

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
#: after training: glibc's default mmap count, and the mmap and trim thresholds its dynamic rule
#: reaches once a block of 32 MiB or more has been freed (what a numeric process runs with)
_RESTORED_MMAP_MAX, _RESTORED_MMAP_THRESHOLD = 65536, 32 * 2**20
_RESTORED_TRIM_THRESHOLD = 2 * _RESTORED_MMAP_THRESHOLD
_KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB free at the top
_state = {"depth": 0}


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):  # pragma: no cover - unusual libc
        return None


def keep_freed_memory(keep: bool = True) -> bool:
    """Ask glibc to keep (``True``) or return (``False``: blocks from 32 MiB mmapped, more
    than 64 MiB free at the heap's top trimmed; module docstring) freed memory; True when the
    setting took effect (glibc only)."""
    libc = _libc()
    if libc is None:
        return False
    if keep:
        options = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD))
    else:
        options = ((_M_MMAP_MAX, _RESTORED_MMAP_MAX), (_M_MMAP_THRESHOLD, _RESTORED_MMAP_THRESHOLD),
                   (_M_TRIM_THRESHOLD, _RESTORED_TRIM_THRESHOLD))
    ok = all([libc.mallopt(option, value) == 1 for option, value in options])  # each one tried
    if not keep:
        libc.malloc_trim(0)
    if not ok:  # pragma: no cover - glibc refused a documented option
        log.debug("mallopt refused the setting keep=%s", keep)
    return ok


@contextlib.contextmanager
def reused_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block freed memory is kept for reuse (see the module docstring); nested
    blocks are fine. Yields whether the setting is in effect."""
    if not enabled:
        yield False
        return
    outer = _state["depth"] == 0
    on = keep_freed_memory(True) if outer else True
    _state["depth"] += 1
    try:
        yield on
    finally:
        _state["depth"] -= 1
        if outer and on:
            keep_freed_memory(False)
