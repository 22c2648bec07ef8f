"""Postfix ``tcp:`` (tcp_table) server.

PROTOCOL
    tcp_table(5), src/util/dict_tcp.c.  One line per request,
    ``get SP <key> LF``, and one per reply, ``<code> SP <text> LF``:

    ===========  =====================================================
    ``200 v``    found; ``v`` is the value
    ``500 t``    not found
    ``400 t``    temporary failure; Postfix drops the connection
    ===========  =====================================================

    Key and text are hex-quoted (hex_quote.c): ``%``, white space and every
    byte outside printable ASCII become ``%XX``.  A listener serves the one
    map named by its ``map`` setting.  Only ``get`` is a command; anything
    else is answered ``400``.  There is no permanent-error code, so PERM
    becomes ``400`` too.

LIMITS
    ``TCP_TABLE_MAX_REQUEST_BYTES`` per request line (``400`` and close);
    a reply longer than ``TCP_TABLE_MAX_LINE_BYTES`` including LF becomes a
    ``400``.  A trailing CR is ignored; replies end in LF only (Postfix
    keeps a CR as part of the value).
"""

from __future__ import annotations

import logging

from axpolicy import limits
from axpolicy.log import printable
from axpolicy.result import LookupResult, Status
from axpolicy.router import Router
from axpolicy.table import TableService
from axpolicy.wire import UNSAFE_VALUE_REASON, FrameError, LineTooLong, split_lines, unsafe_value

logger = logging.getLogger(__name__)

_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_SAFE = frozenset(range(0x21, 0x7F)) - {0x25}  # printable ASCII except '%', no space


class QuoteError(ValueError):
    """A '%' not followed by two hex digits."""


def quote(data: bytes) -> bytes:
    """hex_quote(): ``%``, white space and non-printable bytes become ``%XX``."""
    return b"".join(bytes((b,)) if b in _SAFE else b"%%%02X" % b for b in data)


def unquote(data: bytes) -> bytes:
    """hex_unquote(): decode ``%XX``; a malformed escape raises QuoteError."""
    if b"%" not in data:
        return data
    out = bytearray()
    start = 0
    while (percent := data.find(b"%", start)) >= 0:
        out += data[start:percent]
        pair = data[percent + 1:percent + 3]
        if len(pair) != 2 or not all(c in _HEX_DIGITS for c in pair):
            raise QuoteError("bad % escape")
        out.append(int(pair, 16))
        start = percent + 3
    out += data[start:]
    return bytes(out)


def reply_line(result: LookupResult) -> bytes:
    """The reply line (with LF) for *result*, within the 4096-byte limit."""
    if result.status is Status.FOUND and result.value:
        if unsafe_value("tcp_table", result.value):
            # Hex quoting would keep the line intact, but Postfix would
            # decode the value and put it into a transport or a reply.
            return b"400 " + quote(UNSAFE_VALUE_REASON.encode()) + b"\n"
        line = b"200 " + quote(result.value.encode("utf-8")) + b"\n"
    elif result.status in (Status.FOUND, Status.NOTFOUND):
        return b"500 not%20found\n"
    else:
        line = b"400 " + quote(result.reason.encode("utf-8")) + b"\n"
    if len(line) > limits.TCP_TABLE_MAX_LINE_BYTES:
        return b"400 reply%20too%20long\n"
    return line


class _Framer:
    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def partial(self) -> bool:
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        try:
            lines = split_lines(self._buffer, data, limits.TCP_TABLE_MAX_REQUEST_BYTES)
        except LineTooLong:
            raise FrameError("tcp_table: request line too long", b"400 request%20too%20long\n") from None
        return [line[:-1] if line.endswith(b"\r") else line for line in lines]

    def eof(self) -> list[bytes]:
        return []


class TcpTableService(TableService):
    """Answers tcp_table requests from one configured map."""

    protocol = "tcp_table"
    tempfail_reply = b"400 internal%20error\n"

    def __init__(self, router: Router, map_name: str) -> None:
        super().__init__(router, map_name)
        self._map = map_name

    def framer(self) -> _Framer:
        return _Framer()

    def decode(self, line: bytes) -> tuple[str, str] | bytes:
        command, space, argument = line.partition(b" ")
        if command != b"get" or not space:
            logger.warning("tcp_table: unsupported request: %s", printable(line))
            return b"400 unsupported%20request\n"
        try:
            return self._map, unquote(argument).decode("utf-8")
        except QuoteError:
            logger.warning("tcp_table: malformed key: %s", printable(argument))
            return b"400 malformed%20key\n"
        except UnicodeDecodeError:
            logger.info("tcp_table: key is not UTF-8, not found: %s", printable(argument))
            return b"500 not%20found\n"

    def encode(self, result: LookupResult) -> bytes:
        return reply_line(result)
