"""Router: from a recipient address to FOUND(host), NOTFOUND or TEMP.

DESCRIPTION
    Every protocol module asks the router, through one call,
    :meth:`Router.query`, which returns the answer and how long it stays
    the answer (:class:`Answer`) -- at once when no I/O is needed, as an
    awaitable otherwise -- and the router asks a user map.  For one
    address it

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
from collections.abc import Awaitable, Mapping
from typing import NamedTuple

from axpolicy.address import AddressError, normalize_domain, parse, search_keys
from axpolicy.authn import Authenticator
from axpolicy.cache import LookupCache
from axpolicy.config import Config, LdapMapConfig, MapConfig, expand_template
from axpolicy.ldapmap import LdapUserMap
from axpolicy.log import printable
from axpolicy.result import NOTFOUND, LookupResult, Status, found, perm, temp
from axpolicy.usermap import UserMap, open_usermap

logger = logging.getLogger(__name__)


_NOT_A_USER: tuple[str, ...] = ("",)   # marker: parse() refused the address


class Answer(NamedTuple):
    """An answer, and how long it stays the answer.

    It holds until ``until`` (the cache's clock) and, when ``watch`` is a
    user map, only while ``watch.answers_version()`` still returns
    ``version``.  ``until`` 0 means it may change at any moment (a file
    map, a temporary failure, an answer served stale).
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

    def __init__(self, config: Config, usermaps: Mapping[str, UserMap], cache: LookupCache,
                 authenticator: Authenticator | None = None) -> None:
        self.config = config
        self.usermaps = dict(usermaps)
        self.cache = cache
        self.authenticator = authenticator   # SMTP AUTH, when the configuration has auth:
        self._inflight: dict[str, asyncio.Future[LookupResult]] = {}
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
        authenticator = None
        if config.auth is not None:
            name = config.auth.usermap
            if (previous is not None and previous.authenticator is not None and previous.config.auth == config.auth
                    and previous.usermaps.get(name) is usermaps[name]):
                authenticator = previous.authenticator   # keeps its throttling and cache
            else:
                usermap, map_cfg = usermaps[name], config.usermaps[name]
                if isinstance(usermap, LdapUserMap) and isinstance(map_cfg, LdapMapConfig):  # config checked it
                    authenticator = Authenticator(config.auth, usermap, map_cfg)
        return cls(config, usermaps, cache, authenticator)

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

    def query(self, spec: MapConfig, key: str, count: bool = True) -> Answer | Awaitable[Answer]:
        """The one way to ask: the answer to *key* in the map *spec*, and how long it stays the answer.

        An :class:`Answer` at once when no I/O is needed (a cache hit, a
        replica, a file map, a domain map, an address that can never be a
        user): protocols reply in the same event-loop callback that read
        the request.  Otherwise an awaitable that gives the Answer once a
        user map has answered.  FOUND carries the map's ``result`` with
        ``%s`` = host; NOTFOUND; TEMP.  *count* False: not a client's
        lookup (no cache hit counted in the metrics).
        """
        if spec.type == "domain":
            return Answer(self._domain_answer(spec.result, key), math.inf)
        if spec.type == "owner":
            return self._owners(spec, key)
        now = self._known(key, spec, count)
        if now is not None:
            return now
        return self._ask(spec, key)

    async def resolve(self, address: str, usermap: str | None = None) -> LookupResult:
        """:meth:`query` for the host itself in *usermap* (default: the first), for the CLI and tests."""
        spec = MapConfig(name="", usermap=usermap or self.config.default_usermap)
        answer = self.query(spec, address)
        return (answer if isinstance(answer, Answer) else await answer).result

    def _domain_answer(self, template: str, key: str) -> LookupResult:
        """A ``type: domain`` map: FOUND for a domain in ``domains``; depends on the configuration only."""
        try:
            domain = normalize_domain(key)
        except AddressError:
            return NOTFOUND
        domains = self.config.domains or frozenset()
        return found(expand_template(template, "")) if domain in domains else NOTFOUND

    def _formatted(self, spec: MapConfig, answer: Answer) -> Answer:
        """*answer* with a FOUND host put into the map's ``result``."""
        if answer.result.status is not Status.FOUND or spec.result == "%s":
            return answer
        # Few distinct hosts: remember each map's answer for each host.
        host = answer.result.value
        result = self._answers.get((spec.name, host))
        if result is None:
            result = found(expand_template(spec.result, host))
            if len(self._answers) < 10000:
                self._answers[(spec.name, host)] = result
        # Built anew: NamedTuple._replace costs twice as much, on the fast path.
        return Answer(result, answer.until, answer.watch, answer.version)

    def _known(self, address: str, spec: MapConfig, count: bool) -> Answer | None:
        """The answer if it needs no I/O, else None (see :class:`Answer` for how long it holds)."""
        name = spec.usermap
        target = self.usermaps.get(name)
        if target is None:
            return Answer(perm("unknown user map"), 0.0)
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
                return self._formatted(spec, Answer(result, until, watch, version))
        return Answer(NOTFOUND, until, watch, version)

    async def _ask(self, spec: MapConfig, address: str) -> Answer:
        """The slow path of :meth:`query`: ask the user map, then say how long the answer holds."""
        answer = self._formatted(spec, Answer(await self._resolve(address, spec.usermap), 0.0))
        # Right after the lookup that filled the cache, the fast path knows
        # the same answer and how long it holds.  A stale or TEMP answer is
        # not fresh there, and one that changed meanwhile differs: both hold
        # for no time at all.
        known = self._known(address, spec, count=False)
        return known if known is not None and known.result == answer.result else answer

    async def _owners(self, spec: MapConfig, address: str) -> Answer:
        """An owner map: the logins that may send as *address* (``smtpd_sender_login_maps``).

        The routing search order without catch-alls (``user+ext@dom``,
        ``user@dom``): an extension belongs to the address's owner, and a
        catch-all entry owns no particular address.  Answers are cached as
        lookups are; they hold for no time in the reply memo.
        """
        target = self.usermaps.get(spec.usermap)
        if not isinstance(target, LdapUserMap) or self.config.auth is None:
            return Answer(perm("owner map without an LDAP user map"), 0.0)   # prevented by config validation
        try:
            parsed = parse(address)
        except AddressError:
            return Answer(NOTFOUND, 0.0)
        if self.config.domains is not None and parsed.domain not in self.config.domains:
            return Answer(NOTFOUND, 0.0)
        for key in search_keys(parsed, self.config.recipient_delimiter, catchall=False):
            cache_key = f"{spec.name}\x00owner\x00{key}"
            result = self.cache.get(cache_key)
            if result is None:
                result = await target.owners(key, self.config.auth.login_attribute, spec.send_as)
                if result.status is Status.TEMP:
                    logger.warning("temporary failure for the owners of %s in %s: %s", printable(address),
                                   spec.name, result.reason)
                    return Answer(result, 0.0)
                self.cache.put(cache_key, result)
            if result.status is not Status.NOTFOUND:
                return Answer(result, 0.0)
        return Answer(NOTFOUND, 0.0)

    async def _resolve(self, address: str, name: str) -> LookupResult:
        """Which host holds *address* in the user map *name*?  FOUND(host), NOTFOUND or TEMP."""
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
        shared = self._inflight.get(cache_key)
        if shared is not None:
            # Another request is asking already.  shield: this waiter going
            # away must not cancel the answer the others wait for.
            return await asyncio.shield(shared)
        # The first request asks in its own task (no task of its own for
        # the lookup: a cold lookup is latency-bound); requests for the same
        # key meanwhile wait for its answer.  Servers do not cancel the
        # answers of a client that went away (axpolicy/server.py), so this
        # is cancelled only at shutdown: the others then get a TEMP.
        shared = asyncio.get_running_loop().create_future()
        self._inflight[cache_key] = shared
        result = temp("user map lookup abandoned")
        try:
            result = await self._fetch(target, key, cache_key)
            return result
        finally:
            del self._inflight[cache_key]
            shared.set_result(result)

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
