"""Keep a long run's memory flat: hand freed heap memory back to the OS between blocks (glibc).

glibc serves allocations below its mmap threshold (which it raises up to 32 MiB as large
blocks are freed) from per-thread heap arenas. Block-sized arrays (a few to tens of MiB)
then live in arenas that fragment and, without a trim, keep their freed pages: measured with
benchmarks/memory.py, an 8k x 8k image peaked at 1,663 MB, rising block after block.
Fixing the threshold low (every array above 1 MiB mmapped) cured that but made each forward
pass of the network 30-40 % slower on the CPU (its activations were mmapped and page-faulted
afresh on every call), so instead the freed pages are released with ``malloc_trim`` after
each block, and allocation itself is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

_libc = None
_last_trim = -float("inf")
# A trim walks every arena (a few ms); small images finish many blocks a second, and trimming
# after each cost ~10 % of their post-processing. Once a second still returns the pages of a
# large image's blocks (seconds each) as before.
MIN_TRIM_INTERVAL_S = 1.0


def _load_libc():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):  # musl, macOS: no malloc_trim; their allocators behave otherwise
            _libc = False
    return _libc


def release_free_memory() -> bool:
    """Return the freed pages of every glibc heap arena to the OS (``malloc_trim(0)``).

    Call it after a block's arrays are dropped; it trims at most once per
    :data:`MIN_TRIM_INTERVAL_S`. Returns whether it trimmed (False where not glibc).
    """
    global _last_trim
    libc = _load_libc()
    now = time.monotonic()
    if not libc or now - _last_trim < MIN_TRIM_INTERVAL_S:
        return False
    _last_trim = now
    libc.malloc_trim(0)
    return True
