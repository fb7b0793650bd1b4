"""Keep a long run's memory flat: large arrays straight from and back to the OS (glibc).

glibc serves allocations above ``M_MMAP_THRESHOLD`` with mmap and returns them on free, but
by default it raises that threshold (up to 32 MiB) each time such a block is freed. After the
first blocks of an image, block-sized arrays (a few to tens of MiB) then come from per-thread
heap arenas that fragment and grow with every block processed: measured with
benchmarks/memory.py, an 8k x 8k image peaked at 1,663 MB against 1,404 MB with the threshold
fixed at 1 MiB (2k x 2k: 1,492 -> 1,305 MB).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
THRESHOLD_BYTES = 1 << 20
_done = False


def use_mmap_for_large_arrays() -> bool:
    """Fix glibc's mmap threshold at 1 MiB in this process (idempotent). False where not glibc."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl, macOS: no mallopt; their allocators behave otherwise
        return False
    return _done
