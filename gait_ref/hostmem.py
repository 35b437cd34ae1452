"""Host memory between training steps: keep what a step freed for the next step.

A CPU training step allocates the same large temporaries every step (im2col columns,
activations, GEMM outputs: tens of MiB each). glibc's malloc gives requests above its
mmap threshold (128 KiB, raised on the fly up to 32 MiB) fresh pages from the kernel and
returns freed memory at the top of the heap to the kernel once more than its trim
threshold is free there. A training step frees nearly everything it allocated, so each
step gave its memory back and faulted it in again, zero-filled: BP's conv7 step at 64 px
took about 6,000 minor page faults, and half its time went to them (``python
bench/host_memory.py``; the figures are in docs/BENCHMARKS.md).

``keep_freed_memory()`` sets glibc's trim threshold to 2 GiB and its mmap threshold to its
largest allowed value, 32 MiB, so freed blocks stay in the process and the next step
reuses them. The process then holds its peak working set between steps, which it reaches
at every step anyway. Elsewhere (not Linux, or another C library) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1          # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = (1 << 31) - 1   # the largest int: in effect, never trim
MMAP_THRESHOLD = 32 << 20        # glibc's upper limit on 64-bit (HEAP_MAX_SIZE / 2)

_kept = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring). Idempotent;
    True where the settings were applied, False where the C library has no ``mallopt``."""
    global _kept
    if _kept is None:
        _kept = _apply()
    return _kept


def _apply() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version         # glibc only: musl's mallopt ignores these parameters
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def describe() -> str:
    """For a run's config.json: what the host allocator was told."""
    if not keep_freed_memory():
        return "default"
    return f"glibc mallopt: trim threshold {TRIM_THRESHOLD}, mmap threshold {MMAP_THRESHOLD}"
