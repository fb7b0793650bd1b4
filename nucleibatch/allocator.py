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

_libc = None


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

    Cheap (milliseconds); call it after a block's arrays are dropped. False where not glibc.
    """
    libc = _load_libc()
    if not libc:
        return False
    libc.malloc_trim(0)
    return True
