"""Postfix ``socketmap:`` table server.

PROTOCOL
    socketmap_table(5), src/util/dict_sockmap.c.  One netstring per request,
    payload ``NAME SP KEY``; one netstring per reply:

    =====================  ==========================================
    ``OK <value>``         found; the value is never empty
    ``NOTFOUND ``          not found (the trailing space is required)
    ``TEMP <reason>``      temporary failure; Postfix defers
    ``PERM <reason>``      a request that is wrong in itself (unknown
                           map name, malformed payload)
    =====================  ==========================================

    NAME selects an entry of ``maps:`` in the configuration.  Connections
    are persistent; replies keep request order.

LIMITS
    ``limits.SOCKETMAP_MAX_REQUEST_BYTES`` per request: a longer one is
    answered ``PERM request too large`` and the connection is closed
    without reading it.  Replies over ``SOCKETMAP_MAX_REPLY_BYTES`` become
    TEMP.

SECURITY
    A key that is not UTF-8 is not found (Postfix skips such keys itself).
    The reason text never contains peer input.
"""

from __future__ import annotations

import logging

from axpolicy import limits, netstring
from axpolicy.log import printable
from axpolicy.result import LookupResult, Status
from axpolicy.table import TableService
from axpolicy.wire import UNSAFE_VALUE_REASON, FrameError, unsafe_value

logger = logging.getLogger(__name__)

_NOTFOUND = netstring.encode(b"NOTFOUND ")


def reply_payload(result: LookupResult) -> bytes:
    """The unframed reply for *result*."""
    if result.status is Status.FOUND and result.value:
        if unsafe_value("socketmap", result.value):
            return b"TEMP " + UNSAFE_VALUE_REASON.encode()
        payload = b"OK " + result.value.encode("utf-8")
    elif result.status in (Status.FOUND, Status.NOTFOUND):
        # An empty "OK " is a configuration error in Postfix (maps.c).
        return b"NOTFOUND "
    elif result.status is Status.TEMP:
        payload = b"TEMP " + result.reason.encode("utf-8")
    else:
        payload = b"PERM " + result.reason.encode("utf-8")
    if len(payload) > limits.SOCKETMAP_MAX_REPLY_BYTES:
        return b"TEMP reply exceeds socketmap_max_reply_size"
    return payload


def encode_reply(result: LookupResult) -> bytes:
    """The framed reply for *result*."""
    return netstring.encode(reply_payload(result))


class _Framer:
    def __init__(self) -> None:
        self._decoder = netstring.Decoder(limits.SOCKETMAP_MAX_REQUEST_BYTES)

    @property
    def partial(self) -> bool:
        return self._decoder.partial

    def feed(self, data: bytes) -> list[bytes]:
        try:
            return self._decoder.feed(data)
        except netstring.NetstringTooLong as exc:
            raise FrameError(f"socketmap: {exc}", netstring.encode(b"PERM request too large")) from None
        except netstring.NetstringError as exc:
            raise FrameError(f"socketmap: {exc}", netstring.encode(b"PERM malformed netstring")) from None

    def eof(self) -> list[bytes]:
        return []


class SocketmapService(TableService):
    """Answers socketmap requests from the configured maps."""

    protocol = "socketmap"
    tempfail_reply = netstring.encode(b"TEMP internal error")

    def framer(self) -> _Framer:
        return _Framer()

    def decode(self, payload: bytes) -> tuple[str, str] | bytes:
        name, space, key = payload.partition(b" ")
        if not space or not name:
            logger.warning("socketmap: request without map name: %s", printable(payload))
            return netstring.encode(b"PERM malformed request")
        try:
            return name.decode("ascii"), key.decode("utf-8")
        except UnicodeDecodeError:
            logger.info("socketmap: key is not UTF-8, not found: %s", printable(key))
            return _NOTFOUND

    def encode(self, result: LookupResult) -> bytes:
        return encode_reply(result)
