"""One live run per OUT: :class:`Lock` on ``OUT/.nucleibatch/lock`` (a flock, or an object-store lease)."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from ..errors import OutputError
from ..io.location import Location, fresh_listing, is_remote, read_many, remove
from .atomic import write_bytes_atomic
from .folder import OutputFolder

log = logging.getLogger(__name__)


class Lock:
    """``OUT/.nucleibatch/lock``: one live run per output.

    On a filesystem, an exclusive ``flock`` on a file held open for the whole run: the OS
    releases it when the run ends or dies (SIGKILL included), so a dead run never blocks the
    next one. Object stores have no locks: there the lock is a lease object that the run renews
    every ``LEASE_RENEW_S``; a lease not renewed for ``LEASE_STALE_S`` belongs to a dead run and
    is taken over.
    """

    LEASE_RENEW_S = 20.0
    LEASE_STALE_S = 90.0

    def __init__(self, out_dir: Location) -> None:
        self.out_dir = out_dir
        self.path = OutputFolder(out_dir).lock
        self.handle = None
        self.owner = f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex[:8]})"
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> Lock:
        if is_remote(self.path):
            self._take_lease()
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise self._busy(holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{self.owner}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # releases the flock; the file stays (harmless, reused next run)
            self.handle = None
        if self._renewer is not None:
            self._stop.set()
            self._renewer.join()
            self._renewer = None
            if self._lease_holder() == self.owner:
                remove(self.path)

    def _busy(self, holder: str) -> OutputError:
        return OutputError(f"{self.out_dir} is being written by another run ({holder}); wait for it to finish or give another -o OUT")

    def _lease_holder(self) -> str | None:
        """The owner of a live lease (None when there is none or it is stale)."""
        data = read_many(fresh_listing(self.path.parent, self.path.name)).get(str(self.path))
        try:
            lease = json.loads(data) if data else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(lease, dict) or time.time() - float(lease.get("renewed", 0)) > self.LEASE_STALE_S:
            return None
        return str(lease.get("owner"))

    def _write_lease(self) -> None:
        write_bytes_atomic(self.path, json.dumps({"owner": self.owner, "renewed": time.time()}).encode())

    def _take_lease(self) -> None:
        holder = self._lease_holder()
        if holder is not None:
            raise self._busy(holder)
        self._write_lease()
        time.sleep(1.0)  # two runs that wrote at the same moment: the last write wins, the other sees it
        holder = self._lease_holder()
        if holder != self.owner:
            raise self._busy(holder or "another process")
        self._renewer = threading.Thread(target=self._renew, name="nucleibatch-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.LEASE_RENEW_S):
            try:
                self._write_lease()
            except Exception as error:  # a store hiccup: try again at the next beat
                log.warning("could not renew the lock lease %s: %s", self.path, error)
