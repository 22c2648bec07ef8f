"""The Dovecot authentication protocol, server side, as Postfix's smtpd speaks it.

PROTOCOL
    Dovecot's auth client protocol version 1, as used by Postfix
    (``smtpd_sasl_type = dovecot``, src/xsasl/xsasl_dovecot_server.c) and
    by Exim's ``dovecot`` authenticator.  Lines of TAB-separated fields
    ending in LF.  On connect the server sends, without waiting for the
    client (Exim reads until DONE before it writes anything)::

        VERSION 1 2 / MECH PLAIN plaintext / MECH LOGIN plaintext /
        SPID <pid> / CUID <n> / COOKIE <32 hex> / DONE

    (at least one MECH before SPID: Postfix takes a SPID first for the
    auth-master socket and gives up).  Then per authentication::

        AUTH <id> <mech> service=smtp [nologin] lip=.. rip=.. [secured] [resp=<base64>]
        CONT <id> <base64>

    answered with ``OK <id> user=<login>``, ``CONT <id> <base64>`` (the
    third field always present, empty for an empty challenge) or ``FAIL
    <id>``.  A temporary failure closes the connection: Postfix then
    answers ``454 4.7.0 Temporary authentication failure``, where FAIL
    would be a final 535.

    PLAIN: ``authzid NUL authcid NUL password``, as an initial response or
    after an empty challenge.  LOGIN: ``Username:`` then ``Password:``
    challenges (an initial response is the username).  ``resp==`` is an
    empty initial response.  Requests of one connection are kept apart by
    id; a client may abandon one (``*`` from the SMTP client is answered
    by Postfix itself), so at most ``DOVECOT_MAX_PENDING`` unfinished
    exchanges are kept per connection, the oldest dropped first.

SECURITY
    Nothing of a request but its command and id is ever logged (the
    base64 carries the password).  A malformed line, an unknown command or
    a VERSION other than 1 closes the connection.

LIMITS
    ``DOVECOT_MAX_LINE_BYTES`` per line.
"""

from __future__ import annotations

import base64
import binascii
import collections
import logging
import os
from collections.abc import Awaitable

from axpolicy import limits
from axpolicy.authn import Authenticator, AuthResult, Outcome
from axpolicy.wire import FrameError, LineTooLong, split_lines

logger = logging.getLogger(__name__)

_USERNAME = base64.b64encode(b"Username:")
_PASSWORD = base64.b64encode(b"Password:")


class _Framer:
    """Lines of one connection, and the exchanges still waiting for a CONT."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.pending: collections.OrderedDict[bytes, tuple[bytes, dict[bytes, bytes], bytes]] = \
            collections.OrderedDict()   # id -> (mechanism, parameters, username so far)

    @property
    def partial(self) -> bool:
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[tuple[_Framer, list[bytes]]]:
        try:
            lines = split_lines(self._buffer, data, limits.DOVECOT_MAX_LINE_BYTES)
        except LineTooLong:
            raise FrameError("dovecot_auth: line too long") from None
        return [(self, line.split(b"\t")) for line in lines if line]

    def eof(self) -> list[tuple[_Framer, list[bytes]]]:
        return []

    def remember(self, request_id: bytes, state: tuple[bytes, dict[bytes, bytes], bytes]) -> None:
        self.pending.pop(request_id, None)
        self.pending[request_id] = state
        while len(self.pending) > limits.DOVECOT_MAX_PENDING:
            self.pending.popitem(last=False)


def _decode(value: bytes) -> bytes | None:
    """Base64 as Dovecot reads it: ``=`` alone is empty; None when malformed."""
    if value == b"=":
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


class DovecotAuthService:
    """SMTP AUTH for Postfix (and Exim's dovecot driver) from the authenticator."""

    protocol = "dovecot_auth"
    close_after_reply = False
    tempfail_reply: bytes | None = None       # a temporary failure closes the connection

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator
        self._connections = 0

    def framer(self) -> _Framer:
        return _Framer()

    def replay(self, data: bytes) -> bytes | None:
        return None

    def greeting(self) -> bytes:
        self._connections += 1
        return (b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t%d\nCUID\t%d\n"
                b"COOKIE\t%s\nDONE\n" % (os.getpid(), self._connections, os.urandom(16).hex().encode()))

    def answer(self, request: tuple[_Framer, list[bytes]], whole: bytes | None = None
               ) -> bytes | None | Awaitable[bytes | None]:
        framer, fields = request
        command = fields[0]
        if command == b"VERSION":
            if len(fields) < 2 or fields[1] != b"1":
                logger.warning("dovecot_auth: client speaks another major version; closing")
                return None
            return b""
        if command == b"CPID":
            return b""
        if command == b"AUTH" and len(fields) >= 3:
            return self._start(framer, fields[1], fields[2], fields[3:])
        if command == b"CONT" and len(fields) == 3:
            return self._continue(framer, fields[1], fields[2])
        logger.warning("dovecot_auth: unexpected %s request; closing", "command" if command.isalpha() else "line")
        return None

    def _start(self, framer: _Framer, request_id: bytes, mechanism: bytes, raw: list[bytes]
               ) -> bytes | None | Awaitable[bytes | None]:
        params = {}
        for item in raw:
            name, _, value = item.partition(b"=")
            params[name] = value
        if not request_id.isdigit():
            logger.warning("dovecot_auth: malformed request id; closing")
            return None
        if mechanism.upper() not in (b"PLAIN", b"LOGIN"):
            return b"FAIL\t%s\n" % request_id
        mechanism = mechanism.upper()
        initial = _decode(params[b"resp"]) if b"resp" in params else None
        if b"resp" in params and initial is None:
            return self._fail_now(request_id, params)
        if mechanism == b"PLAIN":
            if initial is None:
                framer.remember(request_id, (mechanism, params, b""))
                return b"CONT\t%s\t\n" % request_id
            return self._plain(request_id, params, initial)
        if initial:                    # LOGIN with the username as initial response
            framer.remember(request_id, (mechanism, params, initial))
            return b"CONT\t%s\t%s\n" % (request_id, _PASSWORD)
        framer.remember(request_id, (mechanism, params, b""))
        return b"CONT\t%s\t%s\n" % (request_id, _USERNAME)

    def _continue(self, framer: _Framer, request_id: bytes, value: bytes
                  ) -> bytes | None | Awaitable[bytes | None]:
        state = framer.pending.pop(request_id, None)
        if state is None:
            if not request_id.isdigit():
                logger.warning("dovecot_auth: malformed request id; closing")
                return None
            return b"FAIL\t%s\n" % request_id
        mechanism, params, username = state
        data = _decode(value)
        if data is None:
            return self._fail_now(request_id, params)
        if mechanism == b"PLAIN":
            return self._plain(request_id, params, data)
        if not username:
            framer.remember(request_id, (mechanism, params, data or b"\x00"))
            return b"CONT\t%s\t%s\n" % (request_id, _PASSWORD)
        return self._verify(request_id, params, username.rstrip(b"\x00"), data, b"")

    def _plain(self, request_id: bytes, params: dict[bytes, bytes], data: bytes
               ) -> bytes | Awaitable[bytes | None]:
        parts = data.split(b"\x00")
        if len(parts) != 3:
            return self._fail_now(request_id, params)
        authzid, authcid, password = parts
        return self._verify(request_id, params, authcid, password, authzid)

    def _verify(self, request_id: bytes, params: dict[bytes, bytes], login: bytes, password: bytes,
                authzid: bytes) -> bytes | Awaitable[bytes | None]:
        client = params.get(b"rip", b"").decode("ascii", "replace")
        try:
            texts = [part.decode("utf-8") for part in (login, password, authzid)]
        except UnicodeDecodeError:
            texts = ["", "", ""]       # refused below, as any malformed input
        known = self._auth.verify_now(texts[0], texts[1], texts[2], client)
        if known is not None:          # a cached pair: answered in the callback that read it
            return b"OK\t%s\tuser=%s\n" % (request_id, known.login.encode("utf-8"))
        return self._reply(request_id, self._auth.verify(texts[0], texts[1], texts[2], client))

    @staticmethod
    async def _reply(request_id: bytes, pending: Awaitable[AuthResult]) -> bytes | None:
        result = await pending
        if result.outcome is Outcome.OK:
            return b"OK\t%s\tuser=%s\n" % (request_id, result.login.encode("utf-8"))
        if result.outcome is Outcome.FAIL:
            return b"FAIL\t%s\n" % request_id
        return None                    # TEMP: closing makes Postfix answer 454 4.7.0

    def _fail_now(self, request_id: bytes, params: dict[bytes, bytes]) -> bytes | Awaitable[bytes | None]:
        """A FAIL for malformed input, after the usual delay and counted like any failure."""
        return self._verify(request_id, params, b"", b"", b"")
