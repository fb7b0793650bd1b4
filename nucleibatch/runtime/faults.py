"""Named fail points for fault-injection tests.

Code that writes outputs calls :func:`point` at the moments where a crash or a full disk must
lose nothing (between a temporary file and its rename, after a store's metadata, during table
consolidation...). Normally a point does nothing: one dictionary lookup. The environment
variable ``NUCLEIBATCH_FAIL_AT`` arms points, as a comma-separated list of
``NAME:COUNT[:ACTION]``: the COUNT-th time the process passes NAME it runs ACTION:

* ``kill`` (default): SIGKILL itself, like a power cut or the OOM killer;
* ``enospc``: raise ``OSError(ENOSPC)`` then and at every later pass (the disk stays full).

``NAME`` may end with ``*`` to match every point with that prefix. Used by
tests/test_faults.py; never set it in production.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections import Counter

ENVIRONMENT = "NUCLEIBATCH_FAIL_AT"
ACTIONS = ("kill", "enospc")
_passes: Counter = Counter()
_lock = threading.Lock()


def _armed() -> list[tuple[str, int, str]]:
    spec = os.environ.get(ENVIRONMENT, "")
    armed = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        parts = item.split(":")  # NAME may itself hold colons (rename:run.json)
        action = parts.pop() if parts[-1] in ACTIONS else "kill"
        count = int(parts.pop()) if len(parts) > 1 and parts[-1].isdigit() else 1
        armed.append((":".join(parts), count, action))
    return armed


def point(name: str) -> None:
    """Pass the fail point ``name`` (a no-op unless ``NUCLEIBATCH_FAIL_AT`` arms it)."""
    if ENVIRONMENT not in os.environ:
        return
    for pattern, count, action in _armed():
        if pattern == name or (pattern.endswith("*") and name.startswith(pattern[:-1])):
            with _lock:
                _passes[pattern] += 1
                passes = _passes[pattern]
            if action == "kill" and passes == count:
                os.write(2, f"nucleibatch: fail point {name} reached: SIGKILL\n".encode())
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "enospc" and passes >= count:
                raise OSError(errno.ENOSPC, f"No space left on device (fail point {name})")
