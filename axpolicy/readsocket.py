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

    ``AUTH <login> <password> <client> [<authzid>]`` (each base64) is an
    SMTP AUTH request from exim/auth.conf: ``OK <login>``, ``FAIL`` or
    ``TEMP <reason>`` (axpolicy/authn.py); ``AUTH`` is never a map name.

LIMITS
    ``READSOCKET_MAX_REQUEST_BYTES``; more is answered ``PERM request too
    large``.  ``idle_timeout`` (default 10 s) bounds a client that never
    finishes its request.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable

from axpolicy import limits
from axpolicy.authn import AuthResult, Outcome
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

    def answer(self, request: bytes, whole: bytes | None = None) -> bytes | Awaitable[bytes]:
        """A map request (see TableService), or an SMTP AUTH request from Exim's authenticators."""
        if request.startswith(b"AUTH "):
            return self._authenticate(request[5:])
        return super().answer(request, whole)

    def _authenticate(self, fields: bytes) -> bytes | Awaitable[bytes]:
        """``AUTH <login> <password> <client address> [<authzid>]``, each base64 (Exim's str2b64).

        ``OK <login>`` (the canonical login), ``FAIL`` or ``TEMP <reason>``;
        nothing of the request is ever logged.
        """
        auth = self._router.authenticator
        if auth is None:
            logger.warning("readsocket: AUTH request but no auth section is configured")
            return b"PERM SMTP AUTH is not configured"
        parts = fields.split(b" ")
        texts = ["", "", "", ""]
        if len(parts) in (3, 4):
            try:
                texts[:len(parts)] = [base64.b64decode(p, validate=True).decode("utf-8") for p in parts]
            except (binascii.Error, ValueError):
                texts = ["", "", "", ""]        # refused (FAIL after the delay), like any malformed input
        login, password, client, authzid = texts
        known = auth.verify_now(login, password, authzid, client)
        if known is not None:
            return b"OK " + known.login.encode("utf-8")
        return self._authenticated(auth.verify(login, password, authzid, client))

    @staticmethod
    async def _authenticated(pending: Awaitable[AuthResult]) -> bytes:
        result = await pending
        if result.outcome is Outcome.OK:
            return b"OK " + result.login.encode("utf-8")
        if result.outcome is Outcome.FAIL:
            return b"FAIL"
        return b"TEMP user map unavailable"

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
