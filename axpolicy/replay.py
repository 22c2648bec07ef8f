"""Replies to whole requests, kept while the answer behind them is certain not to change.

DESCRIPTION
    Postfix asks table servers one key at a time and waits for each
    answer, so every microsecond a cached answer spends in Python is a
    microsecond of every lookup (docs/benchmarks.rst).  For the table
    protocols (socketmap, tcp_table) the same request bytes always ask the
    same question, so a connection whose read holds exactly one complete
    request can look its reply up by those bytes, skipping framing,
    address parsing, the search plan, the cache and reply encoding.

    An entry is only ever made from an :class:`axpolicy.router.Answer` --
    the router says how long each answer holds, on the fast path and
    right after a lookup that filled the cache -- and is used only as
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
from axpolicy.router import Answer
from axpolicy.stats import STATS
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

    def put(self, request: bytes, reply: bytes, answer: Answer, map_name: str, outcome: str) -> None:
        """Remember *reply* for *request* for as long as *answer* says it holds."""
        if answer.until <= self._clock():
            return
        entries = self._entries
        if len(entries) >= limits.REPLY_MEMO_ENTRIES:
            del entries[next(iter(entries))]
        key = (self._protocol, map_name, outcome)
        if len(self._shared_replies) < limits.REPLY_MEMO_ENTRIES:
            reply = self._shared_replies.setdefault(reply, reply)
            key = self._shared_keys.setdefault(key, key)
        entries[request] = (reply, answer.until, key, answer.watch, answer.version)
