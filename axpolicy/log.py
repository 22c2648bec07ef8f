"""Logging: where log lines go, and making untrusted text safe to log.

DESCRIPTION
    :func:`configure` sends the ``axpolicy`` loggers to syslog (facility
    ``mail``, ident ``axpolicy``, the local socket ``log.syslog_socket``) or
    to standard error, at the configured level.  If the syslog socket cannot
    be reached, logging falls back to standard error with a warning rather
    than losing every line.

SECURITY
    Text from clients and from the directory goes through
    :func:`printable` first.  Secrets are never passed to a logger.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys

from axpolicy import limits
from axpolicy.config import LogConfig

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(cfg: LogConfig, *, stderr_ok: bool = True) -> None:
    """Install the one handler of the root logger according to *cfg*.

    *stderr_ok* is False once the process has detached (--daemon): standard
    error is gone then, and a syslog failure cannot fall back to it.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        # After --daemon detached, the old handler's descriptor is closed.
        with contextlib.suppress(OSError):
            old.close()
    handler: logging.Handler
    problem = None
    if cfg.target == "syslog":
        try:
            syslog = logging.handlers.SysLogHandler(address=cfg.syslog_socket,
                                                    facility=logging.handlers.SysLogHandler.LOG_MAIL)
        except OSError as exc:
            problem = f"cannot log to syslog at {cfg.syslog_socket} ({exc.strerror}); logging to stderr"
            handler = logging.StreamHandler(sys.stderr) if stderr_ok else logging.NullHandler()
            handler.setFormatter(logging.Formatter("axpolicy: %(levelname)s: %(message)s"))
        else:
            syslog.ident = f"axpolicy[{os.getpid()}]: "
            syslog.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
            handler = syslog
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("axpolicy: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(_LEVELS[cfg.level])
    if problem:
        logging.getLogger("axpolicy").warning("%s", problem)


def printable(text: str | bytes, limit: int = limits.LOG_TEXT_CHARS) -> str:
    """Return *text* with non-printable characters escaped, cut to *limit* chars.

    Like Postfix's ``printable()`` with ``%.100s``: a log line can never be
    split or forged by what a client or the directory sends.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[: limit + 1])
    if len(out) > limit:
        out = out[:limit] + "..."
    return out
