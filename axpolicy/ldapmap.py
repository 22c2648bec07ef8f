"""LDAP user map: the only module that imports ldap3.

DESCRIPTION
    One exact key (``user@domain`` or ``@domain``) becomes one LDAP search.
    The map owns ``pool_size`` connection slots; a search takes a slot for
    itself, so there is exactly one search in flight per connection, and
    nothing ever blocks the event loop:

    * on an established plain (``ldap://``) connection the search is sent
      and read on the event loop with non-blocking socket calls;
    * connecting, binding, failing over and every search on a TLS
      connection (``ldaps://``, StartTLS) run in a pool of ``pool_size``
      worker threads with ldap3's synchronous client.

    The thread hand-off alone cost more than slapd's answer to a search
    (docs/benchmarks.rst), hence the first path for the common case.  At
    most ``queue_size`` further lookups wait for a worker; beyond that a
    lookup fails at once with TEMP (overload must not turn into unbounded
    memory or latency).

    Failover: servers are tried in the configured order.  A server that
    fails (connect error, timeout, broken connection) is skipped for
    ``failback_interval`` seconds; when that time has passed, the next
    lookup on each connection tries it again and moves back to it.  A
    connection that breaks quickly after being reused (a server restart,
    an idle timeout on the server side) is retried once on a fresh
    connection to the same server, as Postfix's dict_sockmap does, to make
    server restarts transparent.

PROTOCOL
    RFC 4511 search: ``base``, ``scope``, the configured filter with ``%s``
    (whole key), ``%u`` (local part), ``%d`` (domain) filled in, one
    attribute (``host_attribute``).  ldap3 opens, secures and binds each
    connection; the searches themselves are encoded and decoded by
    :mod:`axpolicy.ldapwire` on that connection's socket, because ldap3's
    pyasn1 encoder costs more CPU per search than slapd takes to answer
    (docs/benchmarks.rst).

DIAGNOSTICS
    FOUND     one or more entries, all with the same single host value.
    NOTFOUND  the search succeeded with no entries, or the entries lack
              the host attribute (logged as a warning).
    TEMP      connect or bind failure, timeout, broken connection, any
              non-success result (including noSuchObject for a missing
              base, size and time limits), a referral, entries that
              disagree (ambiguous), several host values, or a host value
              that is not a host name or IP address.

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
import concurrent.futures
import functools
import logging
import math
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable

import ldap3
from ldap3.core import exceptions as ldap_errors

from axpolicy import ldapwire, limits
from axpolicy.address import valid_host
from axpolicy.config import LdapMapConfig
from axpolicy.ldapsync import Record, Replica
from axpolicy.log import printable as _printable
from axpolicy.result import NOTFOUND, LookupResult, found, temp

logger = logging.getLogger(__name__)

class _Server:
    """One configured server and its failure state (guarded by the map's lock)."""

    def __init__(self, index: int, url: str, cfg: LdapMapConfig) -> None:
        self.index = index
        self.url = url
        self.tls = None
        if url.startswith("ldaps://") or cfg.start_tls:
            self.tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=cfg.ca_file)
        self.connect_timeout = cfg.timeout
        self.down_until = 0.0

    def new(self) -> ldap3.Server:
        """A fresh ldap3 Server for each connection.

        ldap3 remembers failed addresses inside a Server object and then
        refuses to try them again ("invalid server address") for minutes;
        our own failover state is the only one that should decide.
        """
        return ldap3.Server(self.url, get_info=ldap3.NONE, connect_timeout=self.connect_timeout, tls=self.tls)


class _Slot:
    """A worker's connection: at most one search at a time uses it."""

    def __init__(self) -> None:
        self.conn: ldap3.Connection | None = None
        self.server: _Server | None = None
        # Our own message ids start high: ldap3 used the low ones to bind.
        self.message_id = 1000

    def drop(self) -> None:
        conn, self.conn, self.server = self.conn, None, None
        if conn is not None:
            _unbind(conn)


def _unbind(conn: ldap3.Connection) -> None:
    try:
        conn.unbind()
    except Exception:  # noqa: BLE001 - closing a broken socket may fail any way
        pass


# Result codes for answers the server cut short (RFC 4511 appendix A).
_INCOMPLETE = {3, 4, 10, 11}   # timeLimitExceeded, sizeLimitExceeded, referral, adminLimitExceeded


class _Answer:
    """Collects the messages that answer one search, from bytes in any chunks."""

    def __init__(self, message_id: int) -> None:
        self.message_id = message_id
        self.entries: list[ldapwire.Message] = []
        self.referral = False
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> tuple[int, bytes] | None:
        """(result code, diagnostic) once SearchResultDone arrived, else None."""
        buffer = self._buffer
        buffer += chunk
        if len(buffer) > limits.LDAP_MAX_RESPONSE_BYTES:
            raise ldapwire.LdapWireError("response too large")
        while True:
            size = ldapwire.frame_length(buffer)
            if size is None or len(buffer) < size:
                return None
            message = ldapwire.decode_message(bytes(buffer[:size]))
            del buffer[:size]
            if message.message_id != self.message_id:
                # A Notice of Disconnection (id 0) or a stray answer: the
                # connection can no longer be trusted.
                raise ldapwire.LdapWireError(f"unexpected message id {message.message_id}")
            if message.kind == "entry":
                self.entries.append(message)
            elif message.kind == "reference":
                self.referral = True
            elif message.kind == "done":
                if buffer:
                    raise ldapwire.LdapWireError("data after the search result")
                return message.result_code, message.diagnostic
            else:
                raise ldapwire.LdapWireError("unexpected operation in a search answer")


class _Failure(Exception):
    """A server-level failure: try the next server."""


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
        self._lock = threading.Lock()
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._all_slots = [_Slot() for _ in range(cfg.pool_size)]
        for slot in self._all_slots:
            self._slots.put(slot)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=cfg.pool_size, thread_name_prefix=f"ldap-{cfg.name}")
        self._pending = 0
        self._closed = False
        # Read by the metrics endpoint; written under self._lock.
        self.searches: dict[str, int] = {url: 0 for url in cfg.servers}
        self.errors: dict[str, int] = {url: 0 for url in cfg.servers}
        self.failovers: dict[str, int] = {url: 0 for url in cfg.servers}  # times marked down
        self.overloaded = 0
        self._found_hosts: dict[str, LookupResult] = {}
        self.replica: Replica | None = None
        if cfg.replica:
            key_attributes, sync_filter = self._filter.replica_plan()
            request = ldapwire.encode_sync_search(1000, cfg.base, cfg.scope, sync_filter,
                                                  (*key_attributes, cfg.host_attribute))
            self.replica = Replica(cfg.name, request, key_attributes, cfg.host_attribute, self._replica_connect,
                                   self._evaluate, cfg.timeout)

    @property
    def cached(self) -> bool:
        """Answers are worth caching unless a healthy replica answers from memory."""
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
        if self._pending >= self._cfg.pool_size + self._cfg.queue_size:
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
        slot = self._free_slot()
        if slot is not None and self._ready(slot):
            result = await self._search_on_loop(slot, key, search_filter)
            if result is not None:
                return result
            slot = None
        deadline = time.monotonic() + self._cfg.timeout
        loop = asyncio.get_running_loop()
        self._pending += 1
        # A slot taken above that is not ready goes with the request, so
        # that the worker connects exactly that one.
        future = self._executor.submit(self._search, key, search_filter, deadline, slot)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._done))
        if slot is not None:
            # A request cancelled before a worker ran it must not take the
            # slot with it.
            taken = slot
            future.add_done_callback(lambda f: self._slots.put(taken) if f.cancelled() else None)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self._cfg.timeout)
        except TimeoutError:
            logger.warning("usermap %s: no answer within %gs", self.name, self._cfg.timeout)
            return temp("user map timeout")

    def _free_slot(self) -> _Slot | None:
        """A free slot, taken, or None when all are busy."""
        try:
            return self._slots.get_nowait()
        except queue.Empty:
            return None

    def _ready(self, slot: _Slot) -> bool:
        """Whether the slot's connection can be used from the event loop.

        Ready means: connected, not TLS (an SSL socket cannot be driven
        from the loop), and on the server that failover prefers now.
        Anything else goes through a worker thread, which connects, binds
        and fails over.
        """
        conn = slot.conn
        sock = conn.socket if conn is not None else None
        return sock is not None and not isinstance(sock, ssl.SSLSocket) and slot.server is self._candidates()[0]

    async def _search_on_loop(self, slot: _Slot, key: str, search_filter: bytes) -> LookupResult | None:
        """One search on an established plain connection, without a thread.

        Searches that only need an open connection are the common case; a
        thread hand-off per search cost more than slapd's answer
        (docs/benchmarks.rst).  Returns None when the connection broke, so
        that the caller retries through the thread path (reconnect,
        failover); a timeout is a TEMP and marks the server down.
        """
        server, conn = slot.server, slot.conn
        if server is None or conn is None:
            self._slots.put(slot)
            return None
        sock = conn.socket
        loop = asyncio.get_running_loop()
        self._pending += 1
        try:
            with self._lock:
                self.searches[server.url] += 1
            slot.message_id = slot.message_id % 0x7FFFFFFF + 1
            answer = _Answer(slot.message_id)
            request = self._request.encode(slot.message_id, search_filter)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(self._cfg.timeout):
                    await loop.sock_sendall(sock, request)
                    done = None
                    while done is None:
                        chunk = await loop.sock_recv(sock, 65536)
                        if not chunk:
                            raise OSError("connection closed by the server")
                        done = answer.feed(chunk)
            finally:
                if slot.conn is not None and sock.fileno() >= 0:
                    sock.settimeout(max(1, math.ceil(self._cfg.timeout)))
        except TimeoutError:
            slot.drop()
            self._slots.put(slot)
            self._mark_down(server, "search timed out")
            logger.warning("usermap %s: no answer within %gs", self.name, self._cfg.timeout)
            return temp("user map timeout")
        except (OSError, ldapwire.LdapWireError) as exc:
            slot.drop()
            self._slots.put(slot)
            logger.info("usermap %s: connection to %s broke (%s); reconnecting", self.name, server.url,
                        _describe(exc))
            return None
        finally:
            self._pending -= 1
        result = self._conclude(slot, server, key, done, answer)
        self._slots.put(slot)
        return result

    def answers_version(self) -> int | None:
        """The replica's change counter (the map is only uncached while a replica answers)."""
        return None if self.replica is None else self.replica.version

    def lookup_now(self, key: str) -> LookupResult | None:
        """The replica's answer while it is healthy; otherwise None (the router's cache is the fast path)."""
        if self.replica is None:
            return None
        return self.replica.answer(key)

    def _done(self) -> None:
        self._pending -= 1

    async def close(self) -> None:
        """Stop the workers and unbind every connection."""
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        if self.replica is not None:
            self.replica.stop()
        self._executor.shutdown(wait=True, cancel_futures=True)
        for slot in self._all_slots:
            slot.drop()

    # ------------------------------------------------------------------
    # Worker side: everything below runs in a pool thread.

    def _search(self, key: str, search_filter: bytes, deadline: float, slot: _Slot | None = None) -> LookupResult:
        if time.monotonic() >= deadline:
            if slot is not None:
                self._slots.put(slot)
            return temp("user map timeout")  # the caller has already given up
        if slot is None:
            slot = self._slots.get()
        try:
            return self._search_with_failover(slot, key, search_filter)
        except Exception:  # noqa: BLE001 - a bug must become TEMP, never NOTFOUND
            logger.exception("usermap %s: unexpected error", self.name)
            slot.drop()
            return temp("user map internal error")
        finally:
            self._slots.put(slot)

    def _candidates(self) -> list[_Server]:
        """Servers in order of preference, skipping those that failed recently."""
        now = time.monotonic()
        with self._lock:
            usable = [s for s in self._servers if s.down_until <= now]
        # All failed recently: try them all anyway rather than answer TEMP
        # without asking; refused connects are cheap.
        return usable or list(self._servers)

    def _mark_down(self, server: _Server, why: str) -> None:
        with self._lock:
            server.down_until = time.monotonic() + self._cfg.failback_interval
            self.errors[server.url] += 1
            self.failovers[server.url] += 1
        logger.warning("usermap %s: server %s failed (%s), failing over", self.name, server.url, why)

    def _search_with_failover(self, slot: _Slot, key: str, search_filter: bytes) -> LookupResult:
        candidates = self._candidates()
        if slot.server is not None and slot.server is not candidates[0]:
            # A preferred server is usable again (fail back), or ours is
            # marked down: reconnect in order of preference.
            slot.drop()
        last_error = "no server"
        for server in candidates:
            try:
                return self._search_on(slot, server, key, search_filter)
            except _Failure as exc:
                last_error = str(exc)
                slot.drop()
                self._mark_down(server, last_error)
        logger.warning("usermap %s: no server could answer (last: %s)", self.name, last_error)
        return temp("user map unavailable")

    def _connect(self, server: _Server) -> ldap3.Connection:
        cfg = self._cfg
        conn = ldap3.Connection(
            server.new(), user=cfg.bind_dn, password=cfg.bind_password,
            client_strategy=ldap3.SYNC, auto_bind=ldap3.AUTO_BIND_NONE,
            # ldap3 packs this into SO_RCVTIMEO as whole seconds; the exact
            # deadline is enforced by lookup() on the event loop side.
            receive_timeout=max(1, math.ceil(cfg.timeout)), raise_exceptions=True, read_only=True,
            check_names=False, auto_referrals=False, auto_escape=False, auto_encode=False)
        try:
            conn.open()
            if cfg.start_tls:
                conn.start_tls()
            conn.bind()
        except ldap_errors.LDAPException as exc:
            try:
                conn.unbind()
            except Exception:  # noqa: BLE001
                pass
            raise _Failure(f"connect/bind: {_describe(exc)}") from None
        return conn

    def _search_on(self, slot: _Slot, server: _Server, key: str, search_filter: bytes) -> LookupResult:
        reused = slot.conn is not None
        for attempt in (1, 2):
            if slot.conn is None:
                slot.conn, slot.server = self._connect(server), server
            started = time.monotonic()
            with self._lock:
                self.searches[server.url] += 1
            try:
                done, answer = self._run_search(slot, search_filter)
            except (OSError, ldapwire.LdapWireError) as exc:
                slot.drop()
                quick = time.monotonic() - started < self._cfg.timeout / 2
                if attempt == 1 and reused and quick:
                    # Most likely a restart or a server-side idle close:
                    # retry once on a fresh connection to the same server.
                    continue
                raise _Failure(f"search: {_describe(exc)}") from None
            return self._conclude(slot, server, key, done, answer)
        raise _Failure("search: retry failed")  # not reached

    def _conclude(self, slot: _Slot, server: _Server, key: str, done: tuple[int, bytes],
                  answer: _Answer) -> LookupResult:
        """The outcome of a complete search answer (either path)."""
        code, diagnostic = done
        if answer.referral:
            logger.warning("usermap %s: referral returned for %s", self.name, _printable(key))
            return temp("user map returned a referral")
        if code != ldapwire.RESULT_SUCCESS:
            # The server answered, but not completely (sizeLimitExceeded,
            # timeLimitExceeded, referral, noSuchObject for a missing base,
            # busy, ...): never "not found".
            slot.drop()
            with self._lock:
                self.errors[server.url] += 1
            logger.warning("usermap %s: search for %s on %s ended with result %d %s", self.name,
                           _printable(key), server.url, code, _printable(diagnostic))
            return temp("user map search failed" if code not in _INCOMPLETE else "user map search incomplete")
        wanted = self._cfg.host_attribute.lower().encode("ascii")
        records = [Record(entry.dn, (), tuple(v for name, vals in entry.attributes.items() if name.lower() == wanted
                                              for v in vals)) for entry in answer.entries]
        return self._evaluate(records, key)

    def _run_search(self, slot: _Slot, search_filter: bytes) -> tuple[tuple[int, bytes], _Answer]:
        """Send one SearchRequest on the slot's blocking socket; collect its answers (OSError on trouble)."""
        conn = slot.conn
        sock = conn.socket if conn is not None else None
        if sock is None:
            raise OSError("connection is not open")
        slot.message_id = slot.message_id % 0x7FFFFFFF + 1
        answer = _Answer(slot.message_id)
        sock.sendall(self._request.encode(slot.message_id, search_filter))
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("connection closed by the server")
            done = answer.feed(chunk)
            if done is not None:
                return done, answer

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

    def _replica_connect(self) -> tuple[socket.socket, Callable[[], None], str]:
        """An authenticated connection for the replica, to the first server that takes it (worker thread)."""
        last_error = "no server"
        for server in self._candidates():
            try:
                conn = self._connect(server)
            except _Failure as exc:
                last_error = str(exc)
                self._mark_down(server, last_error)
                continue
            return conn.socket, functools.partial(_unbind, conn), server.url
        raise OSError(last_error)


def _describe(exc: Exception) -> str:
    """A short description of an ldap3 error (ldap3 never puts passwords in them)."""
    return _printable(f"{exc.__class__.__name__}: {exc}")

