"""Router: from a recipient address to FOUND(host), NOTFOUND or TEMP.

DESCRIPTION
    Every protocol module asks the router; the router asks a user map.
    For one address it

    1. refuses what can never be a user (:func:`axpolicy.address.parse`),
    2. answers NOTFOUND for a domain outside ``domains`` (when configured),
    3. tries the Postfix search order ``user+ext@dom``, ``user@dom``,
       ``@dom`` (the last only for maps with catch-alls), stopping at the
       first FOUND or TEMP -- a TEMP is never skipped over, because a later
       key could then answer for an address the directory might hold,
    4. caches definite answers per exact key, serves a stale answer when
       the map fails (stale-if-error), and lets concurrent lookups of the
       same key share one map lookup.

DIAGNOSTICS
    FOUND, NOTFOUND, TEMP.  One warning line per TEMP answer and per stale
    answer served.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Mapping
from typing import NamedTuple

from axpolicy.address import AddressError, normalize_domain, parse, search_keys
from axpolicy.cache import LookupCache
from axpolicy.config import Config, expand_template
from axpolicy.log import printable
from axpolicy.result import NOTFOUND, LookupResult, Status, found, perm, temp
from axpolicy.usermap import UserMap, open_usermap

logger = logging.getLogger(__name__)


_NOT_A_USER: tuple[str, ...] = ("",)   # marker: parse() refused the address


class Fresh(NamedTuple):
    """An answer known without I/O, and how long it stays the answer.

    It holds until ``until`` (the cache's clock) and, when ``watch`` is a
    user map, only while ``watch.answers_version()`` still returns
    ``version``.  ``until`` 0 means it may change at any moment.
    """

    result: LookupResult
    until: float
    watch: UserMap | None = None
    version: int = 0


@functools.lru_cache(maxsize=4096)
def _plan(address: str, delimiters: str, catchall: bool, domains: frozenset[str] | None) -> tuple[str, ...]:
    """The exact keys to try for *address*, memoised for the fast path.

    Small: repeated requests are mostly replayed (axpolicy/replay.py)
    before they get here, and each entry costs about 400 bytes.

    ``()`` when the domain is outside ``domains``; ``_NOT_A_USER`` when the
    address can never be a user.  Pure function of its arguments, so the
    memo can never be stale.
    """
    try:
        parsed = parse(address)
    except AddressError:
        return _NOT_A_USER
    if domains is not None and parsed.domain not in domains:
        return ()
    return tuple(search_keys(parsed, delimiters, catchall))


def _same_answers(old: Config, new: Config) -> bool:
    return (old.usermaps == new.usermaps and old.domains == new.domains
            and old.recipient_delimiter == new.recipient_delimiter and old.cache == new.cache)


class Router:
    """Resolve addresses through named user maps with a shared cache."""

    def __init__(self, config: Config, usermaps: Mapping[str, UserMap], cache: LookupCache) -> None:
        self.config = config
        self.usermaps = dict(usermaps)
        self.cache = cache
        self._inflight: dict[str, asyncio.Task[LookupResult]] = {}
        self._answers: dict[tuple[str, str], LookupResult] = {}

    @classmethod
    def open(cls, config: Config, previous: Router | None = None) -> Router:
        """Build the router and its user maps (FileMapError for a bad file).

        On reload, *previous* lends what has not changed: a user map whose
        configuration is identical keeps its connections and failover
        state, and the cache is kept when nothing that decides an answer
        changed (user maps, domains, delimiter, cache settings).
        """
        usermaps: dict[str, UserMap] = {}
        for name, cfg in config.usermaps.items():
            if previous is not None and previous.config.usermaps.get(name) == cfg and name in previous.usermaps:
                usermaps[name] = previous.usermaps[name]
            else:
                usermaps[name] = open_usermap(cfg)
        if previous is not None and _same_answers(previous.config, config):
            cache = previous.cache
        else:
            cache = LookupCache(config.cache)
        return cls(config, usermaps, cache)

    def start(self) -> None:
        """Start the user maps' background work (replicas); on the event loop."""
        for usermap in self.usermaps.values():
            usermap.start()

    async def close(self, keep: Router | None = None) -> None:
        """Close every user map that *keep* (the router replacing this one) does not use."""
        kept = {id(m) for m in keep.usermaps.values()} if keep is not None else set()
        for usermap in self.usermaps.values():
            if id(usermap) not in kept:
                await usermap.close()

    async def query(self, map_name: str, key: str) -> LookupResult:
        """Answer *key* in the configured map *map_name* (``maps:`` in the configuration).

        FOUND with the map's ``result`` (``%s`` = host), NOTFOUND or TEMP;
        PERM when no such map is configured.
        """
        spec = self.config.maps.get(map_name)
        if spec is None:
            return perm("unknown map name")
        if spec.type == "domain":
            return self._domain_answer(spec.result, key)
        result = await self.resolve(key, spec.usermap)
        if result.status is Status.FOUND:
            return self._formatted(spec.name, spec.result, result.value)
        return result

    def query_now(self, map_name: str, key: str) -> LookupResult | None:
        """:meth:`query` without waiting: the answer if it needs no I/O, else None.

        The fast path of every protocol: a cache hit (or a file map, or a
        domain map) is answered in the same event-loop callback that read
        the request, without a task.
        """
        fresh = self.query_fresh(map_name, key)
        return None if fresh is None else fresh.result

    def query_fresh(self, map_name: str, key: str, count: bool = True) -> Fresh | None:
        """:meth:`query_now`, and how long the answer stays the answer (see :class:`Fresh`).

        Cache answers hold until the earliest cache entry behind them
        expires; replica answers until the replica changes; file-map
        answers may change at any moment; domain maps and domains outside
        ``domains`` until a reload.  :mod:`axpolicy.replay` keeps replies
        that long.  *count* False: not a client's lookup, not a cache hit
        in the metrics.
        """
        spec = self.config.maps.get(map_name)
        if spec is None:
            return None
        if spec.type == "domain":
            return Fresh(self._domain_answer(spec.result, key), math.inf)
        fresh = self.resolve_fresh(key, spec.usermap, count)
        if fresh is not None and fresh.result.status is Status.FOUND:
            # Built anew: NamedTuple._replace costs twice as much, on the fast path.
            return Fresh(self._formatted(spec.name, spec.result, fresh.result.value), fresh.until, fresh.watch,
                         fresh.version)
        return fresh

    def _domain_answer(self, template: str, key: str) -> LookupResult:
        """A ``type: domain`` map: FOUND for a domain in ``domains``; depends on the configuration only."""
        try:
            domain = normalize_domain(key)
        except AddressError:
            return NOTFOUND
        domains = self.config.domains or frozenset()
        return found(expand_template(template, "")) if domain in domains else NOTFOUND

    def _formatted(self, map_name: str, template: str, host: str) -> LookupResult:
        # Few distinct hosts: remember each map's answer for each host.
        answer = self._answers.get((map_name, host))
        if answer is None:
            answer = found(expand_template(template, host))
            if len(self._answers) < 10000:
                self._answers[(map_name, host)] = answer
        return answer

    def resolve_now(self, address: str, usermap: str | None = None) -> LookupResult | None:
        """:meth:`resolve` without waiting: FOUND or NOTFOUND if known now, else None."""
        fresh = self.resolve_fresh(address, usermap)
        return None if fresh is None else fresh.result

    def resolve_fresh(self, address: str, usermap: str | None = None, count: bool = True) -> Fresh | None:
        """:meth:`resolve_now`, and until when the answer cannot change (see :meth:`query_fresh`)."""
        name = usermap or self.config.default_usermap
        target = self.usermaps.get(name)
        if target is None:
            return None
        keys = _plan(address, self.config.recipient_delimiter, target.catchall, self.config.domains)
        if keys is _NOT_A_USER:
            return None   # rare; the slow path logs it
        until = math.inf
        watch: UserMap | None = None
        version = 0
        cached = target.cached      # read once per request
        if not cached:
            # Read before the answers: a change after this makes them stale.
            known = target.answers_version()
            if known is None:
                until = 0.0
            else:
                watch, version = target, known
        for key in keys:
            if cached:
                hit = self.cache.get_until(f"{name}\x00{key}", count_miss=False, count_hit=count)
                if hit is None:
                    return None
                result, expires = hit
                if expires < until:
                    until = expires
            else:
                now = target.lookup_now(key)
                if now is None:
                    return None
                result = now
            if result.status is not Status.NOTFOUND:
                return Fresh(result, until, watch, version)
        return Fresh(NOTFOUND, until, watch, version)

    async def resolve(self, address: str, usermap: str | None = None) -> LookupResult:
        """Which host holds *address*?  FOUND(host), NOTFOUND or TEMP.

        PERM only when *usermap* names no configured map.
        """
        name = usermap or self.config.default_usermap
        target = self.usermaps.get(name)
        if target is None:
            return perm("unknown user map")
        try:
            parsed = parse(address)
        except AddressError as exc:
            if address != "*":
                logger.info("not a routable user, answering not found: %s (%s)", printable(address), exc)
            return NOTFOUND
        if self.config.domains is not None and parsed.domain not in self.config.domains:
            return NOTFOUND
        for key in search_keys(parsed, self.config.recipient_delimiter, target.catchall):
            result = await self._lookup(target, key)
            if result.status is not Status.NOTFOUND:
                if result.status is Status.TEMP:
                    logger.warning("temporary failure for %s in %s: %s", printable(address), name, result.reason)
                return result
        return NOTFOUND

    async def _lookup(self, target: UserMap, key: str) -> LookupResult:
        if not target.cached:
            # In memory already (a file map): a cache would only delay
            # what a changed file says.
            return await target.lookup(key)
        # One string, not a tuple: 100,000 entries cost noticeably less.
        cache_key = f"{target.name}\x00{key}"
        cached = self.cache.get(cache_key)
        if cached is not None:
            return cached
        task = self._inflight.get(cache_key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(target, key, cache_key))
            self._inflight[cache_key] = task
            task.add_done_callback(lambda _: self._inflight.pop(cache_key, None))
        # shield: a client that goes away must not cancel the search that
        # other clients are waiting for.
        return await asyncio.shield(task)

    async def _fetch(self, target: UserMap, key: str, cache_key: str) -> LookupResult:
        try:
            result = await target.lookup(key)
        except Exception:  # noqa: BLE001 - shared by every waiting client: one TEMP, one traceback
            logger.exception("user map %s: unexpected error looking up %s", target.name, printable(key))
            result = temp("user map internal error")
        if result.status is Status.TEMP:
            stale = self.cache.get_stale(cache_key)
            if stale is not None:
                logger.warning("user map %s failed (%s); serving cached answer for %s",
                               target.name, result.reason, printable(key))
                return stale
            return result
        self.cache.put(cache_key, result)
        return result
