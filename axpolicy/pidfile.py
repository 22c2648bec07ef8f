"""A pidfile that is also a lock: one axpolicy per pidfile.

DESCRIPTION
    :meth:`PidFile.acquire` opens the file and takes an exclusive
    ``flock``; a second instance fails at once with a message naming the
    pid that holds it.  The lock belongs to the open file, so it survives
    the fork of ``--daemon`` as long as the descriptor is preserved; the
    daemon then writes its own pid with :meth:`PidFile.write`.  The file is
    removed on a clean exit; a stale file from a crash is not a problem,
    because nobody holds its lock.

    Also usable as the ``pidfile`` of python-daemon's DaemonContext (a
    context manager).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Any


class PidFileLocked(OSError):
    """Another process holds the pidfile."""


class PidFile:
    """See module docstring."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def fd(self) -> int | None:
        return self._fd

    def acquire(self) -> None:
        """Open and lock the file (PidFileLocked if another process has it)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise PidFileLocked(11, f"another axpolicy (pid {holder}) holds {self.path}") from None
        self._fd = fd

    def write(self, pid: int) -> None:
        """Record *pid* (the serving process) in the locked file."""
        if self._fd is None:
            raise RuntimeError("pidfile not acquired")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{pid}\n".encode("ascii"), 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the file and drop the lock (unlink may fail after a privilege drop)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> PidFile:
        if self._fd is None:
            self.acquire()
        self.write(os.getpid())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
