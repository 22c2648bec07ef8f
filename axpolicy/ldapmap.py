"""LDAP user map: per-key searches on the event loop, failover, and the replica.

DESCRIPTION
    One exact key (``user@domain`` or ``@domain``) becomes one LDAP search.
    Every search runs on the event loop through :mod:`axpolicy.ldapconn`,
    for ``ldap://``, ``ldaps://`` and StartTLS alike: each configured server
    has up to ``pool_size`` long-lived connections, and searches are
    multiplexed over them by message id (at most
    ``limits.LDAP_MAX_OUTSTANDING`` at once on one connection).  No thread
    is involved.  At most ``queue_size`` lookups wait for the directory at
    once; beyond that a lookup fails at once with TEMP (overload must not
    turn into unbounded memory or latency).

    One deadline per lookup: ``timeout`` seconds from the moment it is
    asked.  Servers are tried in the configured order, skipping those that
    failed recently, and the time left is shared equally among the
    servers still to try: with two servers and ``timeout: 3``, the first
    gets 1.5 s; if it refuses, resets or hangs, the second gets what is
    left.  Connecting (TCP, TLS, bind) is bounded by ``connect_timeout``
    as well.  A server that fails is skipped for ``failback_interval``
    seconds; one that hangs also has its connections closed, so that every
    lookup in flight on it fails over at once instead of waiting for its
    own deadline.  When ``failback_interval`` has passed, new lookups go
    back to the preferred server.  A reused connection that breaks (a
    server restart, an idle timeout on the server side) is retried once on
    a fresh connection to the same server, as Postfix's dict_sockmap does,
    to make server restarts transparent.

PROTOCOL
    RFC 4511 search: ``base``, ``scope``, the configured filter with ``%s``
    (whole key), ``%u`` (local part), ``%d`` (domain) filled in, one
    attribute (``host_attribute``).

DIAGNOSTICS
    FOUND     one or more entries, all with the same single host value.
    NOTFOUND  the search succeeded with no entries, or the entries lack
              the host attribute (logged as a warning).
    TEMP      connect, TLS or bind failure, no answer within the deadline,
              broken connection, any non-success result (including
              noSuchObject for a missing base, size and time limits), a
              referral, entries that disagree (ambiguous), several host
              values, or a host value that is not a host name or IP
              address.

SECURITY
    Key parts travel as BER OCTET STRING assertion values inside a filter
    structure compiled once from the configuration: no character of a key
    can change the filter (RFC 4515 escaping is a property of the string
    form, which this path never builds).  Keys with control characters are
    refused before any search: slapd cuts an assertion value short at a
    NUL, so ``alice@example.com<NUL>`` would otherwise match alice.
    The bind password is never logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

from axpolicy import ldapwire, limits
from axpolicy.address import valid_host
from axpolicy.config import LdapMapConfig
from axpolicy.ldapconn import Endpoint, LdapConnection, LdapConnectionError, endpoint, open_connection
from axpolicy.ldapsync import Record, Replica
from axpolicy.log import printable as _printable
from axpolicy.result import NOTFOUND, LookupResult, found, temp

logger = logging.getLogger(__name__)

# Result codes for answers the server cut short (RFC 4511 appendix A).
_INCOMPLETE = {3, 4, 10, 11}   # timeLimitExceeded, sizeLimitExceeded, referral, adminLimitExceeded
_INVALID_CREDENTIALS = 49

T = TypeVar("T")


class _Server:
    """One configured server: its connections and its failure state."""

    def __init__(self, index: int, url: str, cfg: LdapMapConfig) -> None:
        self.index = index
        self.url = url
        self.endpoint: Endpoint = endpoint(url, cfg.start_tls, cfg.ca_file)
        self.down_until = 0.0
        self.connections: list[LdapConnection] = []
        self.binders: list[LdapConnection] = []   # idle connections for user binds (SMTP AUTH)
        self.opening: asyncio.Future[LdapConnection] | None = None
        self.capacity = asyncio.Event()   # set whenever a search on this server ends

    def usable(self) -> list[LdapConnection]:
        self.connections = [c for c in self.connections if c.usable]
        return self.connections

    def close(self) -> None:
        for conn in (*self.connections, *self.binders):
            conn.close()
        self.connections = []
        self.binders = []
        self.capacity.set()       # waiters look again (and find nothing)


class LdapUserMap:
    """Exact-key lookups against an LDAP directory (see module docstring)."""

    def __init__(self, cfg: LdapMapConfig) -> None:
        self.name = cfg.name
        self.catchall = cfg.catchall
        self._cfg = cfg
        self._servers = [_Server(i, url, cfg) for i, url in enumerate(cfg.servers)]
        self._filter = ldapwire.compile_filter(cfg.filter)
        self._request = ldapwire.SearchTemplate(cfg.base, cfg.scope, cfg.host_attribute, limits.LDAP_SIZE_LIMIT,
                                                max(1, math.ceil(cfg.timeout)))
        self._pending = 0
        self._closed = False
        # Read by the metrics endpoint.
        self.searches: dict[str, int] = {url: 0 for url in cfg.servers}
        self.errors: dict[str, int] = {url: 0 for url in cfg.servers}
        self.failovers: dict[str, int] = {url: 0 for url in cfg.servers}  # times marked down
        self.overloaded = 0
        self._found_hosts: dict[str, LookupResult] = {}
        self.replica: Replica | None = None
        if cfg.replica:
            key_attributes, sync_filter = self._filter.replica_plan()
            attributes = (*key_attributes, cfg.host_attribute)

            def sync_request(message_id: int, cookie: bytes | None) -> bytes:
                return ldapwire.encode_sync_search(message_id, cfg.base, cfg.scope, sync_filter, attributes, cookie)

            # State written for other settings is discarded (replicastore).
            settings: dict[str, object] = {"servers": sorted(cfg.servers), "base": cfg.base, "scope": cfg.scope,
                                           "filter": cfg.filter, "attributes": list(attributes)}
            self.replica = Replica(cfg.name, sync_request, key_attributes, cfg.host_attribute, self._replica_connect,
                                   self._evaluate, cfg.timeout, cfg.store_path, settings)

    @property
    def cached(self) -> bool:
        """Answers are worth caching unless a healthy replica answers from its store."""
        return self.replica is None or not self.replica.ready

    def start(self) -> None:
        """Start the replica, if configured (on the event loop; idempotent)."""
        if self.replica is not None and not self._closed:
            self.replica.start()

    async def lookup(self, key: str) -> LookupResult:
        """Search for one exact key; FOUND, NOTFOUND or TEMP (never a guess)."""
        if self._closed:
            return temp("user map closed")
        if self.replica is not None:
            self.replica.start()
            answer = self.replica.answer(key)
            if answer is not None:
                return answer
        if self._pending >= self._cfg.queue_size:
            self.overloaded += 1
            logger.warning("usermap %s: %d lookups pending, refusing more", self.name, self._pending)
            return temp("user map overloaded")
        if not key.isprintable() or not key.isascii():
            # slapd cuts an escaped NUL short and then matches the prefix
            # ("alice@example.com\\00" finds alice): refuse control
            # characters here too, not only in the router.  Non-ASCII local
            # parts are refused because the directory's own matching rules
            # fold Unicode (caseIgnoreMatch, as on uid and cn, finds "s" for
            # U+017F LONG S): the answer would be another user's.
            logger.info("usermap %s: key with control or non-ASCII characters, not found: %s", self.name,
                        _printable(key))
            return NOTFOUND
        local, _, domain = key.rpartition("@")
        values = {"s": key.encode("utf-8"), "u": local.encode("utf-8"), "d": domain.encode("utf-8")}
        search_filter = self._filter.encode(values)
        self._pending += 1
        try:
            return await self._search(key, search_filter)
        finally:
            self._pending -= 1

    async def _search(self, key: str, search_filter: bytes) -> LookupResult:
        """One search within ``timeout``, failing over (see module docstring)."""
        answer = await self.failover(key, lambda server: self._search_on(
            server, lambda message_id: self._request.encode(message_id, search_filter)))
        if isinstance(answer, LookupResult):
            return answer
        server, messages = answer
        return self._conclude(server, key, messages)

    async def search(self, key: str, encode: Callable[[int], bytes]) -> list[ldapwire.Message] | LookupResult:
        """Any search (``encode(message_id)``) on the service account's connections, within ``timeout``
        and failing over as a lookup does: the messages that answer it, or a TEMP result."""
        answer = await self.failover(key, lambda server: self._search_on(server, encode))
        return answer if isinstance(answer, LookupResult) else answer[1]

    async def owners(self, key: str, login_attribute: str, send_as: str | None) -> LookupResult:
        """Who may send as *key*: FOUND with the logins (``login_attribute``, and ``send_as`` values)
        of every entry the key names, separated by ", "; NOTFOUND when no entry owns it; TEMP."""
        if not key.isprintable() or not key.isascii():
            return NOTFOUND     # as in lookup(): never asked
        local, _, domain = key.rpartition("@")
        search_filter = self._filter.encode({"s": key.encode("utf-8"), "u": local.encode("utf-8"),
                                             "d": domain.encode("utf-8")})
        wanted = (login_attribute, send_as) if send_as else (login_attribute,)
        template = ldapwire.SearchTemplate(self._cfg.base, self._cfg.scope, wanted, limits.LDAP_SIZE_LIMIT,
                                           max(1, math.ceil(self._cfg.timeout)))
        messages = await self.search(key, lambda message_id: template.encode(message_id, search_filter))
        if isinstance(messages, LookupResult):
            return messages
        done = messages[-1]
        if done.result_code != ldapwire.RESULT_SUCCESS or any(m.kind == "reference" for m in messages):
            logger.warning("usermap %s: owner search for %s ended with %s", self.name, _printable(key),
                           ldapwire.result_name(done.result_code))
            return temp("user map search failed")
        names = {a.lower().encode("ascii") for a in wanted}
        logins: dict[str, None] = {}
        for entry in messages:
            for name, values in entry.attributes.items() if entry.kind == "entry" else ():
                if name.lower() not in names:
                    continue
                for raw in values:
                    login = raw.decode("utf-8", "replace")
                    if login.isprintable() and login and not any(c.isspace() or c == "," for c in login):
                        logins[login] = None
                    else:
                        logger.warning("usermap %s: %s of %s is not a login; ignored", self.name,
                                       name.decode("ascii", "replace"), _printable(entry.dn))
        return found(", ".join(logins)) if logins else NOTFOUND

    async def bind_as(self, dn: bytes, password: str) -> bool | LookupResult:
        """Whether *password* binds as *dn* (True, False for invalidCredentials) or a TEMP result.

        User binds run on connections of their own (anonymous until the
        bind), never on the service account's, so that those never change
        identity; within ``timeout``, failing over as a lookup does.
        """
        answer = await self.failover(dn.decode("utf-8", "replace"), lambda server: self._bind_on(server, dn, password))
        if isinstance(answer, LookupResult):
            return answer
        server, done = answer
        if done.result_code == ldapwire.RESULT_SUCCESS:
            return True
        if done.result_code == _INVALID_CREDENTIALS:
            return False
        self.errors[server.url] += 1
        logger.warning("usermap %s: bind as %s on %s ended with result %s", self.name,
                       _printable(dn), server.url, ldapwire.result_name(done.result_code))
        return temp("user map bind failed")

    async def failover(self, what: str, attempt: Callable[[_Server], Awaitable[T]]) -> tuple[_Server, T] | LookupResult:
        """Run *attempt* on the servers in order within ``timeout`` (see module docstring), or TEMP."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._cfg.timeout
        candidates = self._candidates()
        timed_out = False
        last_error = "no server"
        for position, server in enumerate(candidates):
            remaining = deadline - loop.time()
            if remaining <= 0:
                timed_out = True
                break
            budget = remaining / (len(candidates) - position)
            try:
                async with asyncio.timeout(budget):
                    return server, await attempt(server)
            except TimeoutError:
                timed_out = True
                last_error = f"no answer within {budget:.3g}s"
                self._mark_down(server, last_error, hung=True)
            except LdapConnectionError as exc:
                timed_out = False
                last_error = str(exc)
                self._mark_down(server, last_error)
        if timed_out:
            logger.warning("usermap %s: no answer within %gs for %s", self.name, self._cfg.timeout,
                           _printable(what))
            return temp("user map timeout")
        logger.warning("usermap %s: no server could answer (last: %s)", self.name, _printable(last_error))
        return temp("user map unavailable")

    async def _search_on(self, server: _Server, encode: Callable[[int], bytes]) -> list[ldapwire.Message]:
        """The messages that answer one search on *server* (LdapConnectionError, TimeoutError)."""
        for attempt in (1, 2):
            conn, reused = await self._connection(server)
            self.searches[server.url] += 1
            try:
                return await conn.operation(encode)
            except LdapConnectionError:
                if attempt == 1 and reused and server.down_until <= asyncio.get_running_loop().time():
                    # Most likely a restart or a server-side idle close:
                    # once more on a fresh connection to the same server.
                    continue
                raise
            finally:
                server.capacity.set()
        raise LdapConnectionError("retry failed")   # not reached

    async def _bind_on(self, server: _Server, dn: bytes, password: str) -> ldapwire.Message:
        """One user bind on a bind connection of *server* (LdapConnectionError, TimeoutError)."""
        for attempt in (1, 2):
            reused = bool(server.binders)
            conn = server.binders.pop() if reused else await self._connect(server, anonymous=True)
            try:
                done = (await conn.operation(lambda message_id: ldapwire.encode_bind(
                    message_id, dn.decode("utf-8", "surrogateescape"), password)))[-1]
            except LdapConnectionError:
                conn.close()
                if attempt == 1 and reused and server.down_until <= asyncio.get_running_loop().time():
                    continue
                raise
            except BaseException:
                conn.close()      # cancelled mid-bind: the connection's state is unknown
                raise
            if len(server.binders) < self._cfg.pool_size and conn.usable:
                server.binders.append(conn)
            else:
                conn.close()
            return done
        raise LdapConnectionError("retry failed")   # not reached

    async def _connection(self, server: _Server) -> tuple[LdapConnection, bool]:
        """A connection to *server* with room for one more search, and whether it was open already."""
        while True:
            usable = server.usable()
            best = min(usable, key=lambda c: c.outstanding, default=None)
            if best is not None and best.outstanding < limits.LDAP_MAX_OUTSTANDING:
                if best.outstanding > 0 and len(usable) < self._cfg.pool_size and server.opening is None:
                    self._open(server)     # busy: grow the pool in the background
                return best, True
            if len(usable) < self._cfg.pool_size:
                opening = server.opening if server.opening is not None else self._open(server)
                return await asyncio.shield(opening), False
            server.capacity.clear()
            await server.capacity.wait()

    def _open(self, server: _Server) -> asyncio.Future[LdapConnection]:
        """Open one more connection to *server*, shared by every lookup that waits for it."""
        task = asyncio.ensure_future(self._connect(server))
        server.opening = task

        def opened(done: asyncio.Future[LdapConnection]) -> None:
            server.opening = None
            if not done.cancelled() and done.exception() is None:
                server.connections.append(done.result())
            server.capacity.set()

        task.add_done_callback(opened)
        return task

    async def _connect(self, server: _Server, anonymous: bool = False) -> LdapConnection:
        """Connect, secure and bind (as the service account unless *anonymous*) within
        ``connect_timeout`` (LdapConnectionError)."""
        cfg = self._cfg
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                return await open_connection(server.endpoint, None if anonymous else cfg.bind_dn, cfg.bind_password)
        except TimeoutError:
            raise LdapConnectionError(f"connect: no answer within {cfg.connect_timeout:g}s") from None

    def _candidates(self) -> list[_Server]:
        """Servers in order of preference, skipping those that failed recently."""
        now = asyncio.get_running_loop().time()
        usable = [s for s in self._servers if s.down_until <= now]
        # All failed recently: try them all anyway rather than answer TEMP
        # without asking; refused connects are cheap.
        return usable or list(self._servers)

    def _mark_down(self, server: _Server, why: str, hung: bool = False) -> None:
        now = asyncio.get_running_loop().time()
        self.errors[server.url] += 1
        if server.down_until <= now:
            self.failovers[server.url] += 1
            logger.warning("usermap %s: server %s failed (%s), failing over", self.name, server.url,
                           _printable(why))
        server.down_until = now + self._cfg.failback_interval
        if hung:
            # Every search in flight there would wait for its own deadline:
            # break them now, so that they fail over at once.
            server.close()

    def _conclude(self, server: _Server, key: str, messages: list[ldapwire.Message]) -> LookupResult:
        """The outcome of a complete search answer."""
        done = messages[-1]
        if any(m.kind == "reference" for m in messages):
            logger.warning("usermap %s: referral returned for %s", self.name, _printable(key))
            return temp("user map returned a referral")
        if done.result_code != ldapwire.RESULT_SUCCESS:
            # The server answered, but not completely (sizeLimitExceeded,
            # timeLimitExceeded, referral, noSuchObject for a missing base,
            # busy, ...): never "not found".
            self.errors[server.url] += 1
            logger.warning("usermap %s: search for %s on %s ended with result %s %s", self.name,
                           _printable(key), server.url, ldapwire.result_name(done.result_code),
                           _printable(done.diagnostic))
            return temp("user map search failed" if done.result_code not in _INCOMPLETE
                        else "user map search incomplete")
        wanted = self._cfg.host_attribute.lower().encode("ascii")
        records = [Record(entry.dn, (), tuple(v for name, vals in entry.attributes.items() if name.lower() == wanted
                                              for v in vals)) for entry in messages if entry.kind == "entry"]
        return self._evaluate(records, key)

    def answers_version(self) -> int | None:
        """The replica's change counter (the map is only uncached while a replica answers)."""
        return None if self.replica is None else self.replica.version

    def lookup_now(self, key: str) -> LookupResult | None:
        """The replica's answer while it is healthy; otherwise None (the router's cache is the fast path)."""
        if self.replica is None:
            return None
        return self.replica.answer(key)

    async def close(self) -> None:
        """Stop the replica and unbind every connection."""
        self._closed = True
        if self.replica is not None:
            await self.replica.stop()
        for server in self._servers:
            if server.opening is not None:
                server.opening.cancel()
            server.close()

    def _evaluate(self, entries: list[Record], key: str, log: bool = True) -> LookupResult:
        """The answer for the entries that match *key* (a search's, or the replica's)."""
        hosts: set[str] = set()
        for entry in entries:
            for raw in entry.hosts:
                try:
                    hosts.add(raw.decode("utf-8").strip().lower())
                except UnicodeDecodeError:
                    if log:
                        logger.warning("usermap %s: %s of %s is not UTF-8", self.name,
                                       self._cfg.host_attribute, _printable(entry.dn))
                    return temp("user map entry has a bad host")
            if not entry.hosts and log:
                logger.warning("usermap %s: %s has no %s; treated as not found", self.name,
                               _printable(entry.dn), self._cfg.host_attribute)
        if not hosts:
            return NOTFOUND
        if len(hosts) > 1:
            if log:
                logger.warning("usermap %s: %d entries disagree on the host for %s", self.name, len(entries),
                               _printable(key))
            return temp("user map entry is ambiguous")
        host = hosts.pop()
        if not valid_host(host):
            if log:
                logger.warning("usermap %s: host value %s is not a host name or address", self.name,
                               _printable(host))
            return temp("user map entry has a bad host")
        return self._found(host)

    def _found(self, host: str) -> LookupResult:
        """One shared FOUND result per host: a replica holds one per key."""
        result = self._found_hosts.get(host)
        if result is None:
            result = found(host)
            if len(self._found_hosts) < 10000:
                self._found_hosts[host] = result
        return result

    async def _replica_connect(self) -> tuple[LdapConnection, str]:
        """An authenticated connection for the replica, to the first server that takes it."""
        last_error = "no server"
        for server in self._candidates():
            try:
                return await self._connect(server), server.url
            except LdapConnectionError as exc:
                last_error = str(exc)
                self._mark_down(server, last_error)
        raise LdapConnectionError(last_error)
