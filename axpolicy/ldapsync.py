"""Replica: a live in-memory copy of an LDAP user map (RFC 4533 refreshAndPersist).

DESCRIPTION
    A per-key search costs a round trip to the directory for every key
    that is not cached: new users, and every key of a dictionary attack.
    With ``replica: true`` an LDAP user map also keeps a copy of just the
    part of the directory it needs (the key attributes and the host
    attribute of every entry that the filter could match) and answers from
    memory, the way an OpenLDAP consumer would, but without a database.

    One task on the event loop holds one connection of the map's own kind
    (:mod:`axpolicy.ldapconn`: the same servers, TLS, bind and failover
    order as the searches): it sends a content synchronization search in
    refreshAndPersist mode without a cookie, so the server first sends
    every entry (the refresh), then a Sync Info message, then each change
    as it happens (the persist phase).  The refresh is built off to the
    side and installed in one step; each change is applied as it arrives.
    Everything runs on the event loop, so lookups never see a half-applied
    change and nothing needs a lock.

    The replica is *authoritative only while healthy*: it answers from the
    moment its refresh completes until the connection breaks, the server
    ends the search, or the server stops answering the liveness probe (a
    root DSE search after ``REPLICA_PROBE_SECONDS`` of silence, which must
    be answered within the map's ``timeout``).  Outside that time
    :attr:`Replica.ready` is False and the user map falls back to per-key
    searches, which fail over and answer TEMP when the directory cannot
    answer: a replica never turns "the directory is down" into NOTFOUND.
    Each reconnection does a full refresh (no cookie is kept): simple,
    and a few seconds of searches for a large directory.

    Matching: the key is compared with the values of the key attributes
    case-insensitively with insignificant spaces folded, which is how
    ``mail`` (caseIgnoreIA5Match) and ``uid`` (caseIgnoreMatch) compare.

PROTOCOL
    RFC 4533; OpenLDAP's ``syncprov`` overlay provides it.  The bind
    identity needs read access to the key attributes and the host
    attribute, and no size limit (``limits dn.exact=... size=unlimited``).
    A server without syncprov ends the search with
    unavailableCriticalExtension; the map then keeps to per-key searches
    and tries again later.

DIAGNOSTICS
    Logged: refresh complete (entries, seconds), session lost (why),
    connection failures.  Counters for /metrics: ``entries``,
    ``refreshes``, ``updates``, ``losses``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

from axpolicy import ldapwire, limits
from axpolicy.address import ascii_lower
from axpolicy.ldapconn import LdapConnection, LdapConnectionError
from axpolicy.log import printable
from axpolicy.result import NOTFOUND, LookupResult

logger = logging.getLogger(__name__)

_DELETE = 3


class Record(NamedTuple):
    """What the replica keeps of one entry."""

    dn: bytes
    keys: tuple[str, ...]
    hosts: tuple[bytes, ...]


# (entries under one key, the key, whether to log problems) -> the answer
# for that key, by the user map's own rules.
Evaluate = Callable[[list[Record], str, bool], LookupResult]
# Opens an authenticated connection: (the connection, its server's URL).
Connect = Callable[[], Awaitable[tuple[LdapConnection, str]]]


def fold(value: str) -> str:
    """The form in which keys and attribute values are compared (ASCII case folding only, as addresses)."""
    return ascii_lower(" ".join(value.split()))


class _Table:
    """Entries by entryUUID, and the answer for every key they hold."""

    def __init__(self, evaluate: Evaluate) -> None:
        self.records: dict[bytes, Record] = {}
        # Key -> the UUID of the one entry that holds it (nearly always),
        # or a tuple of UUIDs: a set per key would double the memory.
        self.by_key: dict[str, bytes | tuple[bytes, ...]] = {}
        self.answers: dict[str, LookupResult] = {}
        self._evaluate = evaluate

    def put(self, uuid: bytes, record: Record | None) -> set[str]:
        """Add, replace (record) or delete (None) one entry; the keys whose answer may change."""
        touched: set[str] = set()
        by_key = self.by_key
        old = self.records.pop(uuid, None)
        if old is not None:
            for key in old.keys:
                touched.add(key)
                rest = tuple(u for u in _holders(by_key.get(key)) if u != uuid)
                if not rest:
                    by_key.pop(key, None)
                else:
                    by_key[key] = rest[0] if len(rest) == 1 else rest
        if record is not None:
            self.records[uuid] = record
            for key in record.keys:
                touched.add(key)
                held = by_key.get(key)
                by_key[key] = uuid if held is None else (*_holders(held), uuid)
        return touched

    def settle(self, keys: Iterable[str], log: bool = True) -> None:
        """Compute the answer again for *keys*."""
        for key in keys:
            held = self.by_key.get(key)
            if held is not None:
                self.answers[key] = self._evaluate([self.records[u] for u in _holders(held)], key, log)
            else:
                self.answers.pop(key, None)


def _holders(held: bytes | tuple[bytes, ...] | None) -> tuple[bytes, ...]:
    if held is None:
        return ()
    return (held,) if isinstance(held, bytes) else held


class Replica:
    """See the module docstring; everything happens on the event loop."""

    def __init__(self, name: str, request: Callable[[int], bytes], key_attributes: tuple[str, ...],
                 host_attribute: str, connect: Connect, evaluate: Evaluate, timeout: float) -> None:
        self.name = name
        self.ready = False
        self.version = 0              # changes with every change of any answer (and of ready)
        self.refreshes = 0
        self.updates = 0
        self.losses = 0
        self._request = request
        self._key_attributes = {a.lower().encode("ascii") for a in key_attributes}
        self._host_attribute = host_attribute.lower().encode("ascii")
        self._connect = connect
        self._evaluate = evaluate
        self._timeout = timeout
        self._table = _Table(evaluate)
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def entries(self) -> int:
        return len(self._table.records)

    def answer(self, key: str) -> LookupResult | None:
        """The replica's answer, or None when it is not ready (search instead)."""
        if not self.ready:
            return None
        if not key.isascii():
            return NOTFOUND   # as a search: never asked (LdapUserMap.lookup)
        answers = self._table.answers
        answer = answers.get(key)
        if answer is None:
            # The router's keys are already folded; others (the CLI, tests) may not be.
            folded = fold(key)
            answer = answers.get(folded, NOTFOUND) if folded != key else NOTFOUND
        return answer

    def start(self) -> None:
        """Start replicating (idempotent); must be called on the event loop."""
        if self._task is None and not self._stopping:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop replicating and close the connection."""
        self._stopping = True
        self._set_ready(False)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.version += 1

    async def _run(self) -> None:
        backoff = limits.REPLICA_RETRY_MIN_SECONDS
        while not self._stopping:
            try:
                conn, url = await self._connect()
            except LdapConnectionError as exc:
                logger.warning("usermap %s: replica cannot connect (%s); using searches", self.name,
                               printable(str(exc)))
            else:
                refreshes = self.refreshes
                try:
                    await self._session(conn, url)
                except (LdapConnectionError, ldapwire.LdapWireError) as exc:
                    if not self._stopping:
                        logger.warning("usermap %s: replica session with %s lost (%s); using searches",
                                       self.name, url, printable(str(exc) or exc.__class__.__name__))
                except Exception:  # noqa: BLE001 - a bug must not end replication for good
                    logger.exception("usermap %s: replica session with %s failed; using searches", self.name, url)
                finally:
                    self._lost()
                    conn.close()
                if self.refreshes != refreshes:
                    backoff = limits.REPLICA_RETRY_MIN_SECONDS   # it was healthy: try again soon
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, limits.REPLICA_RETRY_MAX_SECONDS)

    def _lost(self) -> None:
        self.losses += 1
        self._set_ready(False)      # at once: searches take over now

    async def _session(self, conn: LdapConnection, url: str) -> None:
        """Run one sync session until it breaks (an exception) or the server ends it."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        building: _Table | None = _Table(self._evaluate)
        ended: asyncio.Future[str] = loop.create_future()
        heard = [loop.time()]

        def on_message(message: ldapwire.Message) -> bool:
            nonlocal building
            heard[0] = loop.time()
            if message.kind == "entry":
                uuid, record = self._change(message)
                if building is not None:
                    building.put(uuid, record)
                else:
                    self._apply([(uuid, record)])
            elif message.kind == "intermediate" and message.name == ldapwire.SYNC_INFO_OID:
                info = ldapwire.decode_sync_info(message.value)
                if info.kind == 3 and info.refresh_deletes:
                    changes: list[tuple[bytes, Record | None]] = [(uuid, None) for uuid in info.uuids]
                    if building is not None:
                        for uuid, _ in changes:
                            building.put(uuid, None)
                    else:
                        self._apply(changes)
                elif info.kind in (1, 2) and info.refresh_done and building is not None:
                    building.settle(list(building.by_key), log=False)
                    self._install(building, loop.time() - started)
                    building = None
            elif message.kind == "done":
                why = printable(message.diagnostic.decode("utf-8", "replace"))
                if message.result_code == 12:
                    why = f"the server does not support content synchronization (syncprov): {why}"
                if not ended.done():
                    ended.set_result(f"result {ldapwire.result_name(message.result_code)} {why}".rstrip())
                return True
            elif message.kind == "reference":
                raise ldapwire.LdapWireError("referral in the replica search")
            return False

        conn.stream(self._request, on_message)
        closed = asyncio.ensure_future(conn.wait_closed())
        try:
            while True:
                silent = loop.time() - heard[0]
                wait = max(0.0, limits.REPLICA_PROBE_SECONDS - silent)
                await asyncio.wait((ended, closed), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if ended.done():
                    logger.warning("usermap %s: %s ended the replica search: %s; using searches", self.name, url,
                                   ended.result())
                    return
                if closed.done():
                    raise LdapConnectionError(conn.error or "connection closed")
                if loop.time() - heard[0] >= limits.REPLICA_PROBE_SECONDS:
                    await self._probe(conn)
                    heard[0] = loop.time()
        finally:
            closed.cancel()

    async def _probe(self, conn: LdapConnection) -> None:
        """A root DSE search that must be answered within the map's timeout (LdapConnectionError)."""
        try:
            async with asyncio.timeout(self._timeout):
                await conn.operation(lambda message_id: ldapwire.encode_search(
                    message_id, "", "base", _PROBE_FILTER, "1.1", 1, max(1, int(self._timeout))))
        except TimeoutError:
            raise LdapConnectionError(f"no answer to the liveness probe within {self._timeout:g}s") from None

    def _install(self, table: _Table, seconds: float) -> None:
        if self._stopping:
            return
        self._table = table
        self._set_ready(True)
        self.refreshes += 1
        logger.info("usermap %s: replica ready, %d entries (refresh took %.2fs)", self.name,
                    len(table.records), seconds)

    def _apply(self, changes: list[tuple[bytes, Record | None]]) -> None:
        table = self._table
        touched: set[str] = set()
        for uuid, record in changes:
            touched |= table.put(uuid, record)
        table.settle(touched)
        self.version += 1
        self.updates += len(changes)

    def _change(self, message: ldapwire.Message) -> tuple[bytes, Record | None]:
        state_value = message.controls.get(ldapwire.SYNC_STATE_OID)
        if state_value is None:
            raise ldapwire.LdapWireError("entry without a sync state")
        state, uuid = ldapwire.decode_sync_state(state_value)
        if state == _DELETE:
            return uuid, None
        keys: list[str] = []
        hosts: list[bytes] = []
        for name, values in message.attributes.items():
            lowered = name.lower()
            if lowered in self._key_attributes:
                keys.extend(fold(v.decode("utf-8", "replace")) for v in values)
            if lowered == self._host_attribute:
                hosts.extend(values)
        return uuid, Record(message.dn, tuple(dict.fromkeys(keys)), tuple(hosts))


_PROBE_FILTER = ldapwire.compile_filter("(objectClass=*)").encode({})
