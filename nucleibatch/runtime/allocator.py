"""Keep the network fast and a long run's memory flat (glibc's allocator).

Two findings, measured on the CPU (2 cores, 95 DSB images, ``benchmarks/pipeline.py``):

* **Speed.** By default glibc serves allocations above its mmap threshold (at most 32 MiB)
  with fresh ``mmap``s, and deletes a thread arena's 64 MiB heaps once they are free. The
  network's activations (tens to hundreds of MiB) were therefore page-faulted afresh on every
  forward pass: 9 million page faults and 17 s of kernel time in a 29 s run. One arena, no
  ``mmap`` and no automatic trimming (:data:`ALLOCATOR_ENV`, :func:`tune_allocator`) keep the
  freed pages for the next pass: 0.33 million faults, the run 29 -> 20 s. All three are
  needed: without any one of them the faults come back (measured one by one).
* **Memory.** Freed pages kept in the heap would then pile up over a long run (fragmentation):
  :func:`release_free_memory` hands them back when the heap's free share exceeds a budget,
  which keeps a 16k x 16k image's peak close to a 2k one's (``benchmarks/memory.py``).

The settings take full effect only before a process starts threads (the arena count is fixed
when the second arena is made), hence the environment variables for worker processes and
:func:`tune_allocator` as the first step of the command line (:func:`nucleibatch.cli.main`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import time
from collections.abc import Iterator

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_NEVER_TRIM = 2**31 - 1  # mallopt takes an int; automatic trimming off: release_free_memory decides
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_NEVER_TRIM)}
"""The same settings as environment variables, for worker processes (Ray actors, Dask nannies)."""
MIN_TRIM_INTERVAL_S = 1.0
"""Where glibc cannot say how much is free (before 2.33: no ``mallinfo2``): trim at most this often."""

FREE_BUDGET_BYTES = 512 << 20
"""Free heap memory kept for reuse; above it, :func:`release_free_memory` trims."""

_libc = None
_tuned = False
_last_trim = -float("inf")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _load_libc():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 - glibc only
            _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            if hasattr(_libc, "mallinfo2"):  # glibc >= 2.33
                _libc.mallinfo2.restype = _Mallinfo2
        except (OSError, AttributeError):  # musl, macOS: no malloc_trim; their allocators behave otherwise
            _libc = False
    return _libc


def default_malloc() -> bool:
    """``NUCLEIBATCH_DEFAULT_MALLOC=1``: leave glibc's defaults alone, here and in the workers."""
    return os.environ.get("NUCLEIBATCH_DEFAULT_MALLOC") == "1"


def worker_environment() -> dict[str, str]:
    """Environment variables for worker processes that run the network: :data:`ALLOCATOR_ENV`
    (empty under ``NUCLEIBATCH_DEFAULT_MALLOC=1``). They must be in the environment the process
    starts with: glibc reads them once, at start-up."""
    return {} if default_malloc() else dict(ALLOCATOR_ENV)


@contextlib.contextmanager
def environment_for_children(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` in this process's environment while processes are started in the block,
    then the environment as it was, also undoing what the block's own code set (Dask's nannies
    put their pre-spawn variables there): they are for those children, not for whatever this
    process starts later."""
    saved = dict(os.environ)
    os.environ.update(variables)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def tune_allocator() -> bool:
    """Apply :data:`ALLOCATOR_ENV`'s settings to this process with ``mallopt``.

    Call it before the process starts threads (the command line does, first thing). It is
    idempotent. Returns whether the settings apply (False where not glibc). Setting
    ``NUCLEIBATCH_DEFAULT_MALLOC=1`` leaves glibc's defaults alone.
    """
    global _tuned
    libc = _load_libc()
    if not libc or default_malloc():
        return False
    if not _tuned:
        # all three: a fixed trim threshold also fixes the mmap threshold (at 128 KiB), harmless only with mmap off
        ok = libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
        _tuned = bool(ok)
    return _tuned


def free_heap_bytes() -> int | None:
    """Bytes free inside glibc's heaps (``mallinfo2().fordblks``); None where unknown."""
    libc = _load_libc()
    if not libc or not hasattr(libc, "mallinfo2"):
        return None
    return int(libc.mallinfo2().fordblks)


def release_free_memory(budget_bytes: int = FREE_BUDGET_BYTES) -> bool:
    """Return freed heap pages to the OS (``malloc_trim(0)``) when more than ``budget_bytes`` are free.

    Call it after a block's arrays are dropped. Below the budget the free pages stay for the
    next block and forward pass (trimming them would page-fault them in again). Where the free
    size is unknown (glibc < 2.33), it trims at most every :data:`MIN_TRIM_INTERVAL_S`. Returns
    whether it trimmed (False where not glibc).
    """
    global _last_trim
    libc = _load_libc()
    if not libc:
        return False
    free = free_heap_bytes()
    now = time.monotonic()
    if free is None:
        if now - _last_trim < MIN_TRIM_INTERVAL_S:
            return False
    elif free <= budget_bytes:
        return False
    _last_trim = now
    libc.malloc_trim(0)
    return True

