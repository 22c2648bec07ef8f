"""Exim ``${readsocket{...}}`` server.

PROTOCOL
    Exim (expand.c, lookups/readsock.c) opens one connection per expansion,
    writes the request verbatim, half-closes by default (``shutdown=yes``)
    and reads until the server closes.  A request is ``<map> SP <key>``,
    ended by LF or by the half-close (so ``shutdown=no`` works when the
    request ends in ``\\n``).  The reply carries the status in the body, with
    no trailing newline (a newline would break ACL conditions), and the
    server closes at once:

    ===================  ===============================================
    ``OK <value>``       found
    ``NOTFOUND``         not found
    ``TEMP <reason>``    temporary failure: the Exim configuration defers
    ``PERM <reason>``    a bad request (unknown map, malformed)
    ===================  ===============================================

    A listener's ``map`` setting, when given, is used for requests that
    consist of a key alone (no space).

LIMITS
    ``READSOCKET_MAX_REQUEST_BYTES``; more is answered ``PERM request too
    large``.  ``idle_timeout`` (default 10 s) bounds a client that never
    finishes its request.
"""

from __future__ import annotations

import logging

from axpolicy import limits
from axpolicy.log import printable
from axpolicy.result import LookupResult, Status
from axpolicy.table import TableService
from axpolicy.wire import UNSAFE_VALUE_REASON, FrameError, unsafe_value

logger = logging.getLogger(__name__)


def reply_body(result: LookupResult) -> bytes:
    """The reply for *result*; never an empty ``OK``."""
    if result.status is Status.FOUND and result.value:
        if unsafe_value("readsocket", result.value):
            return b"TEMP " + UNSAFE_VALUE_REASON.encode()
        return b"OK " + result.value.encode("utf-8")
    if result.status in (Status.FOUND, Status.NOTFOUND):
        return b"NOTFOUND"
    word = b"TEMP " if result.status is Status.TEMP else b"PERM "
    return word + result.reason.encode("utf-8")


class _Framer:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._done = False

    @property
    def partial(self) -> bool:
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        if self._done:
            return []  # one request per connection; the rest is ignored
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end >= 0:
            line = bytes(self._buffer[:end])
            # A CR before the LF is line framing (CRLF), not part of the key.
            return self._finish(line[:-1] if line.endswith(b"\r") else line)
        if len(self._buffer) > limits.READSOCKET_MAX_REQUEST_BYTES:
            raise FrameError("readsocket: request too large", b"PERM request too large")
        return []

    def eof(self) -> list[bytes]:
        if self._done:
            return []
        return self._finish(bytes(self._buffer))

    def _finish(self, request: bytes) -> list[bytes]:
        self._done = True
        self._buffer.clear()
        if len(request) > limits.READSOCKET_MAX_REQUEST_BYTES:
            raise FrameError("readsocket: request too large", b"PERM request too large")
        return [request]


class ReadsocketService(TableService):
    """Answers one Exim readsocket request per connection."""

    protocol = "readsocket"
    close_after_reply = True
    tempfail_reply = b"TEMP internal error"
    # Never replayed: Exim opens a connection per request, which costs far
    # more than the answer.
    replays = False

    def framer(self) -> _Framer:
        return _Framer()

    def decode(self, request: bytes) -> tuple[str, str] | bytes:
        name, space, key = request.partition(b" ")
        if not space:
            if self._default_map is None or not request:
                logger.warning("readsocket: malformed request: %s", printable(request))
                return b"PERM malformed request"
            name, key = self._default_map.encode(), request
        try:
            return name.decode("ascii"), key.decode("utf-8")
        except UnicodeDecodeError:
            logger.info("readsocket: request is not UTF-8, not found: %s", printable(request))
            return b"NOTFOUND"

    def encode(self, result: LookupResult) -> bytes:
        return reply_body(result)
