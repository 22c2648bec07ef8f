"""Reading the files an operator names: regular files only, bounded.

DESCRIPTION
    The configuration, user-map files and secret files are named in the
    configuration or on the command line.  :func:`read_regular` opens such
    a path without blocking (a FIFO would hang ``open()``), refuses
    anything that is not a regular file (``/dev/zero``, a FIFO, a
    directory) and reads at most a given number of bytes, so that a wrong
    path gives a clear error instead of a hang or unbounded memory.

DIAGNOSTICS
    :class:`FileReadError` whose message names the path and the reason,
    never the file's contents.
"""

from __future__ import annotations

import os
import stat


class FileReadError(Exception):
    """The file cannot be used; ``str(exc)`` names the path and why."""


def read_regular(path: str, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The contents of the regular file *path* (at most *max_bytes*) and its stat."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise FileReadError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileReadError(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise FileReadError(f"{path}: larger than {max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise FileReadError(f"{path}: larger than {max_bytes} bytes")
        return b"".join(chunks), info
    except OSError as exc:
        raise FileReadError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
