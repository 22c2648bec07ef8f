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
import time

from axpolicy import limits, netstring
from axpolicy.log import printable
from axpolicy.replay import ReplyMemo
from axpolicy.result import LookupResult, Status
from axpolicy.router import Router
from axpolicy.stats import OUTCOME, STATS
from axpolicy.wire import UNSAFE_VALUE_REASON, FrameError, split_map_request, unsafe_value

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


class SocketmapService:
    """Answers socketmap requests from the configured maps."""

    protocol = "socketmap"
    close_after_reply = False
    tempfail_reply = netstring.encode(b"TEMP internal error")

    def __init__(self, router: Router) -> None:
        self._router = router
        self._memo = ReplyMemo(self.protocol, router.cache)

    def framer(self) -> _Framer:
        return _Framer()

    def replay(self, data: bytes) -> bytes | None:
        return self._memo.get(data)

    def answer_now(self, payload: bytes, whole: bytes | None = None) -> bytes | None:
        """The reply if the router knows it without I/O (cache, file map), else None."""
        started = time.perf_counter()
        request = split_map_request(payload)
        if request is None:
            return None   # the slow path says why
        map_name, text = request
        return self._memo.reply_now(self._router, map_name, text, encode_reply, started, whole)

    async def answer(self, payload: bytes, whole: bytes | None = None) -> bytes:
        started = time.perf_counter()
        name, space, key = payload.partition(b" ")
        if not space or not name:
            logger.warning("socketmap: request without map name: %s", printable(payload))
            return netstring.encode(b"PERM malformed request")
        try:
            map_name = name.decode("ascii")
            text = key.decode("utf-8")
        except UnicodeDecodeError:
            logger.info("socketmap: key is not UTF-8, not found: %s", printable(key))
            return _NOTFOUND
        result = await self._router.query(map_name, text)
        if result.status is Status.PERM:
            logger.warning("socketmap: %s: %s", result.reason, printable(map_name))
        outcome = OUTCOME[result.status]
        STATS.record("socketmap", map_name if result.status is not Status.PERM else "", outcome,
                     time.perf_counter() - started)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("socketmap %s %s: %s", map_name, printable(text), result.status.value)
        reply = encode_reply(result)
        if whole is not None:
            self._memo.put_if_current(whole, reply, self._router, map_name, text, result, outcome)
        return reply
