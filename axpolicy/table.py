"""What socketmap, tcp_table and readsocket share: one table service.

DESCRIPTION
    The three table protocols differ only in framing and in their words
    for the three outcomes.  :class:`TableService` does the rest once, so
    that their answers, log lines and metric labels cannot drift: it looks
    the map up, asks the router once (:meth:`axpolicy.router.Router.query`),
    counts the request, encodes the reply and, for whole requests, keeps
    it for replay (:mod:`axpolicy.replay`).  A reply that needs no I/O is
    returned at once, in the callback that read the request; otherwise an
    awaitable is returned.

    A protocol module subclasses it with ``decode`` (request -> map name
    and key, or a ready reply for a malformed request, logged) and
    ``encode`` (outcome -> reply bytes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

from axpolicy.log import printable
from axpolicy.replay import ReplyMemo
from axpolicy.result import LookupResult, Status, perm
from axpolicy.router import Answer, Router
from axpolicy.stats import OUTCOME, STATS
from axpolicy.wire import Framer

logger = logging.getLogger(__name__)


class TableService:
    """One table protocol on one listener (see module docstring)."""

    protocol: str
    close_after_reply: bool = False
    tempfail_reply: bytes
    replays: bool = True     # whole requests may be answered from the reply memo

    def __init__(self, router: Router, default_map: str | None = None) -> None:
        self._router = router
        self._default_map = default_map
        self._memo = ReplyMemo(self.protocol, router.cache) if self.replays else None

    def framer(self) -> Framer:
        raise NotImplementedError

    def decode(self, request: Any) -> tuple[str, str] | bytes:
        """(map name, key), or the reply to a request that asks nothing (logged)."""
        raise NotImplementedError

    def encode(self, result: LookupResult) -> bytes:
        """The reply for one outcome."""
        raise NotImplementedError

    def replay(self, data: bytes) -> bytes | None:
        return self._memo.get(data) if self._memo is not None else None

    def greeting(self) -> bytes | None:
        """The client speaks first."""
        return None

    def answer(self, request: Any, whole: bytes | None = None) -> bytes | Awaitable[bytes]:
        """The reply at once when it needs no I/O, else an awaitable reply."""
        started = time.perf_counter()
        decoded = self.decode(request)
        if isinstance(decoded, bytes):
            return decoded
        map_name, key = decoded
        spec = self._router.config.maps.get(map_name)
        if spec is None:
            logger.warning("%s: unknown map name: %s", self.protocol, printable(map_name))
            STATS.record(self.protocol, "", OUTCOME[Status.PERM], time.perf_counter() - started)
            return self.encode(perm("unknown map name"))
        answer = self._router.query(spec, key)
        if isinstance(answer, Answer):
            return self._reply(map_name, key, answer, started, whole)
        return self._later(map_name, key, answer, started, whole)

    async def _later(self, map_name: str, key: str, pending: Awaitable[Answer], started: float,
                     whole: bytes | None) -> bytes:
        return self._reply(map_name, key, await pending, started, whole)

    def _reply(self, map_name: str, key: str, answer: Answer, started: float, whole: bytes | None) -> bytes:
        outcome = OUTCOME[answer.result.status]
        STATS.record(self.protocol, map_name, outcome, time.perf_counter() - started)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s %s: %s", self.protocol, map_name, printable(key), answer.result.status.value)
        reply = self.encode(answer.result)
        if whole is not None and self._memo is not None:
            self._memo.put(whole, reply, answer, map_name, outcome)
        return reply
