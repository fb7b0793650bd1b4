"""Child processes of the tests: their environment, and finding what they left running."""

from __future__ import annotations

import os

from nucleibatch.runtime.faults import ENVIRONMENT as FAIL_POINT_VARIABLE


def child_environment(fail_at: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a `python -m nucleibatch ...` child: unbuffered output (its progress is
    read as it comes), 2 OpenMP threads unless set, the fail point ``fail_at`` or none (see
    :mod:`nucleibatch.runtime.faults`), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != FAIL_POINT_VARIABLE}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), **extra)
    if fail_at:
        env[FAIL_POINT_VARIABLE] = fail_at
    return env


def descendants(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of every process below ``pid`` (from /proc; Linux)."""
    parent_of, commands = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent_of[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                commands[int(entry)] = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    children: dict[int, list[int]] = {}
    for child, parent in parent_of.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = commands.get(child, "")
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie or a dead process does not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
