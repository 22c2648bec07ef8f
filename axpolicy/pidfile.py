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

SECURITY
    The daemon opens its pidfile as root and truncates it.  In a directory
    that others can write, a planted symbolic or hard link would make it
    truncate any file: the file is opened with ``O_NOFOLLOW`` and
    ``O_NONBLOCK``, and refused unless it is a regular file with one link,
    owned by the user opening it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from typing import Any


class PidFileLocked(OSError):
    """Another process holds the pidfile."""


def _open(path: str, flags: int) -> int:
    """Open *path* without following a link and check it is a file of ours (OSError naming why)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, f"{path} is a symbolic link; refusing to follow it") from None
        raise OSError(exc.errno, f"{path}: {exc.strerror}") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_nlink != 1:
        problem = f"has {info.st_nlink} hard links"
    elif info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}, not by uid {os.geteuid()}"
    if problem is not None:
        os.close(fd)
        raise OSError(errno.EPERM, f"{path} {problem}; refusing to use it as a pidfile")
    return fd


def check_pidfile(path: str) -> None:
    """Whether :meth:`PidFile.acquire` would accept *path* as a file (OSError naming why); creates nothing."""
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:   # OSError(ENOENT, ...) is one
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise OSError(errno.ENOENT, f"{path}: no such directory {directory}") from None
        return
    os.close(fd)


class PidFile:
    """See module docstring."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def fd(self) -> int | None:
        return self._fd

    def acquire(self) -> None:
        """Open and lock the file (PidFileLocked if another process has it; OSError if it is not safe)."""
        fd = _open(self.path, os.O_RDWR | os.O_CREAT)
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
