"""What every protocol module provides to the server (sans-I/O).

A protocol module is split in two: a *framer*, a pure parser that turns
received bytes into requests and knows nothing about sockets, and a
*service*, whose ``answer`` coroutine turns one request into reply bytes by
asking the router.  :mod:`axpolicy.server` drives both.  The split keeps
parsers fuzzable without a network and the server the same for every
protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, Protocol

from axpolicy.log import printable

logger = logging.getLogger(__name__)

# The reason sent instead of a value that no reply may carry.
UNSAFE_VALUE_REASON = "user map value unsafe"


class FrameError(Exception):
    """The peer broke the framing.

    ``str(exc)`` is for the log.  ``reply`` (if not None) is written before
    the connection is closed; the byte stream cannot be trusted after this.
    """

    def __init__(self, message: str, reply: bytes | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class Framer(Protocol):
    """Per-connection parser state."""

    def feed(self, data: bytes) -> list[Any]:
        """Consume *data*; return the requests completed by it (FrameError on garbage)."""
        ...

    def eof(self) -> list[Any]:
        """The peer half-closed: return a request that this completes, if any."""
        ...

    @property
    def partial(self) -> bool:
        """True while part of a request is buffered."""
        ...


class Service(Protocol):
    """One protocol on one listener."""

    protocol: str
    close_after_reply: bool

    @property
    def tempfail_reply(self) -> bytes | None:
        """The protocol's "temporary failure" reply, sent for a request whose answer raised an
        unexpected exception (the server logs it once); None closes the connection instead (the
        dovecot auth protocol's temporary failure)."""
        ...

    def greeting(self) -> bytes | None:
        """What the server says first, as soon as a client connects (None: nothing)."""
        ...

    def framer(self) -> Framer:
        ...

    def replay(self, data: bytes) -> bytes | None:
        """The reply if *data*, as read, is one whole request answered before and still current."""
        ...

    def answer(self, request: Any, whole: bytes | None = None) -> bytes | None | Awaitable[bytes | None]:
        """Reply bytes for *request*: at once when they need no I/O (the fast path, written in the
        callback that read the request), else an awaitable.  None closes the connection without a
        reply.  *whole* is the bytes read when they held exactly this request: a service may keep the
        reply for :meth:`replay`.
        """
        ...


class LineTooLong(ValueError):
    """A line (or the unfinished rest of one) exceeds the framer's limit."""


def split_lines(buffer: bytearray, data: bytes, max_line: int) -> list[bytes]:
    """Append *data* to *buffer*; remove and return every complete line (LF stripped).

    The line-based framers (tcp_table, policy) share this; each turns
    LineTooLong into its own FrameError.
    """
    buffer += data
    lines: list[bytes] = []
    while (end := buffer.find(b"\n")) >= 0:
        if end > max_line:
            raise LineTooLong
        lines.append(bytes(buffer[:end]))
        del buffer[: end + 1]
    if len(buffer) > max_line:
        raise LineTooLong
    return lines


def split_map_request(payload: bytes) -> tuple[str, str] | None:
    """``<map> SP <key>`` as (map name, key), or None when malformed or not UTF-8."""
    name, space, key = payload.partition(b" ")
    if not space or not name:
        return None
    try:
        return name.decode("ascii"), key.decode("utf-8")
    except UnicodeDecodeError:
        return None


def unsafe_value(protocol: str, value: str) -> bool:
    """True (and logged) when *value* must not go into a *protocol* reply.

    CR, LF and NUL end or split a reply (a policy reply, an Exim readsocket
    answer, a transport value) on every protocol; every other control,
    format or separator character (U+2028, U+0085, ...) is refused with
    them.  Host values are validated where the user maps read them
    (:func:`axpolicy.address.valid_host`); this is the last guard, so that
    no reply can ever carry such a character whatever a map or template
    produced.
    """
    if value.isprintable():
        return False
    logger.warning("%s: refusing to answer a value with control or separator characters: %s", protocol,
                   printable(value))
    return True
