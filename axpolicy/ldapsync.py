"""Replica: a live in-memory copy of an LDAP user map (RFC 4533 refreshAndPersist).

DESCRIPTION
    A per-key search costs a round trip to the directory for every key
    that is not cached: new users, and every key of a dictionary attack.
    With ``replica: true`` an LDAP user map also keeps a copy of just the
    part of the directory it needs (the key attributes and the host
    attribute of every entry that the filter could match) and answers from
    memory, the way an OpenLDAP consumer would, but without a database.

    One thread per map holds one connection: it sends a content
    synchronization search in refreshAndPersist mode without a cookie, so
    the server first sends every entry (the refresh), then a Sync Info
    message, then each change as it happens (the persist phase).  The
    refresh is built off to the side and installed in one step on the
    event loop; each change is applied on the event loop too, so lookups
    never see a half-applied change and need no lock.

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
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from axpolicy import ldapwire, limits
from axpolicy.address import ascii_lower
from axpolicy.log import printable
from axpolicy.result import NOTFOUND, LookupResult

logger = logging.getLogger(__name__)

_SYNC_ID = 1000
_PROBE_ID = 1001
_DELETE = 3


class Record(NamedTuple):
    """What the replica keeps of one entry."""

    dn: bytes
    keys: tuple[str, ...]
    hosts: tuple[bytes, ...]


# (entries under one key, the key, whether to log problems) -> the answer
# for that key, by the user map's own rules.
Evaluate = Callable[[list[Record], str, bool], LookupResult]
# Opens an authenticated connection: (socket, close it, server URL).
Connect = Callable[[], tuple[socket.socket, Callable[[], None], str]]


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
    """See the module docstring; lookups and changes happen on the event loop."""

    def __init__(self, name: str, request: bytes, key_attributes: tuple[str, ...], host_attribute: str,
                 connect: Connect, evaluate: Evaluate, timeout: float) -> None:
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
        self._refreshes_sent = 0      # thread side
        self._generation = 0          # bumped whenever a session ends: late updates are dropped
        self._state = threading.Lock()  # guards ready, version and _generation together
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

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
        """Start the sync thread (idempotent); must be called on the event loop."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"replica-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the sync thread and wait for it (blocking: call from a worker thread)."""
        with self._state:
            self._stopping.set()
            self.ready = False
            self.version += 1
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------
    # Event-loop side

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:   # the loop is closed: we are shutting down
            self._stopping.set()

    def _install(self, generation: int, table: _Table, seconds: float) -> None:
        with self._state:
            # Under the lock: the thread may be declaring this session lost
            # right now, and a lost session must never end up ready.
            if generation != self._generation or self._stopping.is_set():
                return
            self._table = table
            self.ready = True
            self.version += 1
        self.refreshes += 1
        logger.info("usermap %s: replica ready, %d entries (refresh took %.2fs)", self.name,
                    len(table.records), seconds)

    def _apply(self, generation: int, changes: list[tuple[bytes, Record | None]]) -> None:
        if generation != self._generation:
            return
        table = self._table
        touched: set[str] = set()
        for uuid, record in changes:
            touched |= table.put(uuid, record)
        table.settle(touched)
        with self._state:
            self.version += 1
        self.updates += len(changes)

    # ------------------------------------------------------------------
    # Thread side

    def _run(self) -> None:
        backoff = limits.REPLICA_RETRY_MIN_SECONDS
        while not self._stopping.is_set():
            try:
                sock, close, url = self._connect()
            except Exception as exc:  # noqa: BLE001 - any failure: searches carry on, retry later
                logger.warning("usermap %s: replica cannot connect (%s); using searches", self.name,
                               printable(str(exc)))
            else:
                self._sock = sock
                refreshes = self._refreshes_sent
                try:
                    self._session(sock, url)
                except (OSError, ldapwire.LdapWireError) as exc:
                    if not self._stopping.is_set():
                        logger.warning("usermap %s: replica session with %s lost (%s); using searches",
                                       self.name, url, printable(str(exc) or exc.__class__.__name__))
                except Exception:  # noqa: BLE001 - a bug must not end replication for good
                    logger.exception("usermap %s: replica session with %s failed; using searches", self.name, url)
                finally:
                    self._lost()
                    self._sock = None
                    close()
                if self._refreshes_sent != refreshes:
                    backoff = limits.REPLICA_RETRY_MIN_SECONDS   # it was healthy: try again soon
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, limits.REPLICA_RETRY_MAX_SECONDS)

    def _lost(self) -> None:
        with self._state:
            self.ready = False      # at once, from this thread: searches take over now
            self._generation += 1
            self.version += 1
        self.losses += 1

    def _session(self, sock: socket.socket, url: str) -> None:
        """Run one sync session until it breaks (an exception) or the server ends it."""
        generation = self._generation
        started = time.monotonic()
        table: _Table | None = _Table(self._evaluate)
        probe_sent = False
        buffer = bytearray()
        sock.settimeout(limits.REPLICA_PROBE_SECONDS)
        sock.sendall(self._request)
        while not self._stopping.is_set():
            try:
                chunk = sock.recv(262144)
            except TimeoutError:
                if probe_sent:
                    raise OSError(f"no answer to the liveness probe within {self._timeout:g}s") from None
                sock.sendall(ldapwire.encode_search(_PROBE_ID, "", "base", _PROBE_FILTER, "1.1", 1,
                                                    max(1, int(self._timeout))))
                probe_sent = True
                sock.settimeout(self._timeout)
                continue
            if not chunk:
                raise OSError("connection closed by the server")
            buffer += chunk
            changes: list[tuple[bytes, Record | None]] = []
            while True:
                size = ldapwire.frame_length(buffer)
                if size is None or len(buffer) < size:
                    break
                if size > limits.LDAP_MAX_RESPONSE_BYTES:
                    raise ldapwire.LdapWireError("message too large")
                message = ldapwire.decode_message(bytes(buffer[:size]))
                del buffer[:size]
                if message.message_id == _PROBE_ID:
                    if message.kind == "done":
                        probe_sent = False
                        sock.settimeout(limits.REPLICA_PROBE_SECONDS)
                    continue
                if message.message_id != _SYNC_ID:
                    raise ldapwire.LdapWireError(f"unexpected message id {message.message_id}")
                if message.kind == "entry":
                    change = self._change(message)
                    if table is not None:
                        table.put(*change)
                    else:
                        changes.append(change)
                elif message.kind == "intermediate" and message.name == ldapwire.SYNC_INFO_OID:
                    info = ldapwire.decode_sync_info(message.value)
                    if info.kind == 3 and info.refresh_deletes:
                        for uuid in info.uuids:
                            if table is not None:
                                table.put(uuid, None)
                            else:
                                changes.append((uuid, None))
                    elif info.kind in (1, 2) and info.refresh_done and table is not None:
                        table.settle(list(table.by_key), log=False)
                        self._post(self._install, generation, table, time.monotonic() - started)
                        self._refreshes_sent += 1
                        table = None
                elif message.kind == "done":
                    why = printable(message.diagnostic.decode("utf-8", "replace"))
                    if message.result_code == 12:
                        why = f"the server does not support content synchronization (syncprov): {why}"
                    logger.warning("usermap %s: %s ended the replica search: result %d %s; using searches",
                                   self.name, url, message.result_code, why)
                    return
                elif message.kind == "reference":
                    raise ldapwire.LdapWireError("referral in the replica search")
            if changes:
                self._post(self._apply, generation, changes)

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
