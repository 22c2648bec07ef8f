"""Lookup cache: TTLs, stale-if-error and an LRU bound.

DESCRIPTION
    Positive answers (FOUND) are fresh for ``ttl`` seconds, negative ones
    (NOTFOUND) for ``negative_ttl``.  After that an entry is no longer
    served normally, but it is kept until it is ``stale_if_error`` seconds
    old: when the directory fails, :meth:`LookupCache.get_stale` lets the
    router answer with what the directory said last instead of TEMP.
    TEMP results are never stored.  At most ``max_entries`` entries are
    kept; the least recently used is evicted first.

    Pure data structure: no I/O, no asyncio; the clock is injectable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

from axpolicy.config import CacheConfig
from axpolicy.result import LookupResult, Status


class LookupCache:
    """A bounded map from lookup key to its last definite answer."""

    def __init__(self, cfg: CacheConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        self.clock = clock
        # A plain dict keeps insertion order and is smaller than an
        # OrderedDict; "most recently used" = re-inserted at the end.
        self._entries: dict[Hashable, tuple[LookupResult, float]] = {}
        self._keep = max(cfg.ttl, cfg.negative_ttl, cfg.stale_if_error)
        self.hits = 0
        self.misses = 0
        self.stale = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, count_miss: bool = True) -> LookupResult | None:
        """The fresh answer for *key*, or None.

        *count_miss* is False for a fast-path probe that is followed by a
        real lookup, so that a miss is counted once.
        """
        hit = self.get_until(key, count_miss)
        return None if hit is None else hit[0]

    def get_until(self, key: Hashable, count_miss: bool = True,
                  count_hit: bool = True) -> tuple[LookupResult, float] | None:
        """The fresh answer for *key* and until when it stays fresh (clock time), or None."""
        item = self._entries.get(key)
        if item is not None:
            result, stored = item
            ttl = self._cfg.ttl if result.status is Status.FOUND else self._cfg.negative_ttl
            if self.clock() - stored < ttl:
                entries = self._entries
                del entries[key]
                entries[key] = item
                if count_hit:
                    self.hits += 1
                return result, stored + ttl
        if count_miss:
            self.misses += 1
        return None

    def get_stale(self, key: Hashable) -> LookupResult | None:
        """An answer younger than ``stale_if_error``, fresh or not, or None."""
        item = self._entries.get(key)
        if item is None:
            return None
        result, stored = item
        if self.clock() - stored >= self._cfg.stale_if_error:
            del self._entries[key]
            return None
        self.stale += 1
        return result

    def put(self, key: Hashable, result: LookupResult) -> None:
        """Remember a FOUND or NOTFOUND answer; anything else is ignored."""
        if result.status not in (Status.FOUND, Status.NOTFOUND) or self._cfg.max_entries == 0 or self._keep == 0:
            return
        entries = self._entries
        entries.pop(key, None)
        entries[key] = (result, self.clock())
        while len(entries) > self._cfg.max_entries:
            del entries[next(iter(entries))]

    def clear(self) -> None:
        """Forget everything (used when the user maps change on reload)."""
        self._entries.clear()
