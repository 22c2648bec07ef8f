"""Replies to whole requests, kept while the answer behind them is certain not to change.

DESCRIPTION
    Postfix asks table servers one key at a time and waits for each
    answer, so every microsecond a cached answer spends in Python is a
    microsecond of every lookup (docs/benchmarks.rst).  For the table
    protocols (socketmap, tcp_table) the same request bytes always ask the
    same question, so a connection whose read holds exactly one complete
    request can look its reply up by those bytes, skipping framing,
    address parsing, the search plan, the cache and reply encoding.

    An entry is only ever made from an answer the router gives without
    I/O (:meth:`axpolicy.router.Router.query_fresh`) -- on the fast path,
    or right after a lookup that filled the cache -- and is used only as
    long as that answer holds: until the earliest cache entry behind it
    stops being fresh, and for a replica's answer only while the replica's
    change counter is unchanged (any change, and losing its session,
    moves it).  Until then the router would give the same answer by
    construction.  File-map answers, which can change at any moment, are
    never kept.  A reload makes new services and so a new, empty memo.

LIMITS
    ``limits.REPLY_MEMO_ENTRIES`` entries per listener; the oldest goes
    first.  A hit is counted as a cache hit and as a request in the
    metrics, with its own latency.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from axpolicy import limits
from axpolicy.cache import LookupCache
from axpolicy.result import LookupResult
from axpolicy.router import Fresh, Router
from axpolicy.stats import OUTCOME, STATS
from axpolicy.usermap import UserMap

_Entry = tuple[bytes, float, tuple[str, str, str], UserMap | None, int]


class ReplyMemo:
    """Request bytes -> (reply, fresh until, metrics key, user map to watch, its answers' version)."""

    def __init__(self, protocol: str, cache: LookupCache) -> None:
        self._protocol = protocol
        self._cache = cache
        self._clock: Callable[[], float] = cache.clock
        self._requests = STATS.requests
        self._latency = STATS.latency[protocol]
        self._entries: dict[bytes, _Entry] = {}
        # Few distinct replies and metrics keys: one object each, shared by
        # every entry (a copy per entry doubled the memo's memory).
        self._shared_replies: dict[bytes, bytes] = {}
        self._shared_keys: dict[tuple[str, str, str], tuple[str, str, str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, request: bytes) -> bytes | None:
        """The reply to *request* (one whole request, as read), or None."""
        started = time.perf_counter()
        item = self._entries.get(request)
        if item is None:
            return None
        reply, until, key, watch, version = item
        if self._clock() >= until or (watch is not None and watch.answers_version() != version):
            del self._entries[request]
            return None
        self._cache.hits += 1
        self._requests[key] += 1
        self._latency.observe(time.perf_counter() - started)
        return reply

    def reply_now(self, router: Router, map_name: str, key: str, encode: Callable[[LookupResult], bytes],
                  started: float, whole: bytes | None) -> bytes | None:
        """A table protocol's fast path: the router's answer without I/O, encoded, counted, kept if *whole*."""
        fresh = router.query_fresh(map_name, key)
        if fresh is None:
            return None
        outcome = OUTCOME[fresh.result.status]
        STATS.record(self._protocol, map_name, outcome, time.perf_counter() - started)
        reply = encode(fresh.result)
        if whole is not None:
            self.put(whole, reply, fresh, map_name, outcome)
        return reply

    def put_if_current(self, request: bytes, reply: bytes, router: Router, map_name: str, key: str,
                       result: LookupResult, outcome: str) -> None:
        """After a lookup that needed I/O: keep *reply* if the router's cache now gives *result* too.

        Then the second time a key is asked is already a replay.  A stale
        answer (stale-if-error) or a TEMP is not fresh in the cache, and an
        answer that changed meanwhile is not equal: neither is kept.
        """
        fresh = router.query_fresh(map_name, key, count=False)
        if fresh is not None and fresh.result == result:
            self.put(request, reply, fresh, map_name, outcome)

    def put(self, request: bytes, reply: bytes, fresh: Fresh, map_name: str, outcome: str) -> None:
        """Remember *reply* for *request* for as long as *fresh* says its answer holds."""
        if fresh.until <= self._clock():
            return
        entries = self._entries
        if len(entries) >= limits.REPLY_MEMO_ENTRIES:
            del entries[next(iter(entries))]
        key = (self._protocol, map_name, outcome)
        if len(self._shared_replies) < limits.REPLY_MEMO_ENTRIES:
            reply = self._shared_replies.setdefault(reply, reply)
            key = self._shared_keys.setdefault(key, key)
        entries[request] = (reply, fresh.until, key, fresh.watch, fresh.version)
