"""The lookup cache: TTLs, stale-if-error, LRU bound; TEMP is never stored."""

from __future__ import annotations

from axpolicy.cache import LookupCache
from axpolicy.config import CacheConfig
from axpolicy.result import NOTFOUND, found, temp


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**cfg: float) -> tuple[LookupCache, Clock]:
    clock = Clock()
    defaults = {"ttl": 300.0, "negative_ttl": 60.0, "stale_if_error": 3600.0, "max_entries": 100}
    defaults.update(cfg)
    return LookupCache(CacheConfig(**defaults), clock), clock  # type: ignore[arg-type]


def test_positive_answers_live_ttl() -> None:
    cache, clock = make()
    cache.put("k", found("h"))
    clock.now += 299
    assert cache.get("k") == found("h")
    clock.now += 1
    assert cache.get("k") is None


def test_negative_answers_live_negative_ttl() -> None:
    cache, clock = make()
    cache.put("k", NOTFOUND)
    clock.now += 59
    assert cache.get("k") == NOTFOUND
    clock.now += 1
    assert cache.get("k") is None


def test_temporary_failures_are_never_cached() -> None:
    cache, _ = make()
    cache.put("k", temp("down"))
    assert cache.get("k") is None and cache.get_stale("k") is None and len(cache) == 0


def test_stale_answers_are_available_until_stale_if_error() -> None:
    cache, clock = make()
    cache.put("k", found("h"))
    clock.now += 3599
    assert cache.get("k") is None          # not served normally
    assert cache.get_stale("k") == found("h")
    clock.now += 1
    assert cache.get_stale("k") is None
    assert len(cache) == 0                 # and forgotten


def test_lru_bound_evicts_the_least_recently_used() -> None:
    cache, _ = make(max_entries=3)
    for key in "abc":
        cache.put(key, found(key))
    assert cache.get("a") is not None      # a is now most recent
    cache.put("d", found("d"))
    assert len(cache) == 3
    assert cache.get("b") is None
    assert [cache.get(k) is not None for k in "acd"] == [True, True, True]


def test_counters() -> None:
    cache, _ = make()
    cache.put("k", found("h"))
    cache.get("k")
    cache.get("missing")
    cache.get_stale("k")
    assert (cache.hits, cache.misses, cache.stale) == (1, 1, 1)


def test_zero_sizes_disable_caching() -> None:
    cache, _ = make(max_entries=0)
    cache.put("k", found("h"))
    assert cache.get("k") is None
    cache, _ = make(ttl=0, negative_ttl=0, stale_if_error=0)
    cache.put("k", found("h"))
    assert cache.get("k") is None and cache.get_stale("k") is None
