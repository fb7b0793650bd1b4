"""The one way files of OUT (and of ``nucleibatch export``) are written: never visible half-written.

Local: the data go to a hidden temporary beside the file (``.NAME.tmp-PID``, which a later run's
:func:`~nucleibatch.output.tables.remove_stale_temporaries` deletes if a writer was killed),
then a rename puts them in place. Object store: one PUT, which stores make visible whole or not
at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..io.location import Location, is_remote
from ..runtime import faults


def temporary_path(path: Path) -> Path:
    """The hidden temporary that :func:`replaced_on_success` writes before ``path``."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


@contextmanager
def replaced_on_success(path: Path, fsync: bool = False, fail_point: str | None = None) -> Iterator[Path]:
    """Yield a temporary local path to write ``path``'s content to; when the block succeeds the
    temporary replaces ``path``, when it raises the temporary is deleted.

    Args:
        path: the local file to (re)place; its folder is created.
        fsync: flush the temporary to disk before the rename (OUT's files: a power cut after
            the rename must not leave an empty file behind).
        fail_point: the :mod:`nucleibatch.runtime.faults` point passed just before the rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        if fail_point is not None:
            faults.point(fail_point)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def write_bytes_atomic(path: Location, data: bytes) -> None:
    """Make ``path`` (local or on an object store) hold ``data``, never visible half-written.

    Fail points ``write:NAME`` before writing and ``rename:NAME`` before the rename (local).
    """
    faults.point(f"write:{path.name}")
    if is_remote(path):
        path.write_bytes(data)
        return
    with replaced_on_success(path, fsync=True, fail_point=f"rename:{path.name}") as tmp:
        tmp.write_bytes(data)
