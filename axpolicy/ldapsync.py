"""Replica: a live, persistent copy of an LDAP user map (RFC 4533 refreshAndPersist).

DESCRIPTION
    A per-key search costs a round trip to the directory for every key
    that is not cached: new users, and every key of a dictionary attack.
    With ``replica: true`` an LDAP user map also keeps a copy of just the
    part of the directory it needs (the key attributes and the host
    attribute of every entry that the filter could match) and answers from
    it, the way an OpenLDAP consumer would.  The copy lives on disk in
    ``state_dir`` (:mod:`axpolicy.replicastore`, LMDB) with the sync cookie,
    so that a restart or a reconnect resumes instead of copying everything
    again.

    One task on the event loop holds one connection of the map's own kind
    (:mod:`axpolicy.ldapconn`: the same servers, TLS, bind and failover
    order as the searches) and sends a content synchronization search in
    refreshAndPersist mode:

    - without a cookie when the store holds nothing complete: the server
      sends every entry (a full refresh), into an emptied store;
    - with the stored cookie otherwise: the server sends what changed since
      (a resume), deletions as UUIDs (refreshDeletes) or as the UUIDs of
      every entry still there (a present phase: the others are deleted).

    Then the server sends each change as it happens (the persist phase).
    Writes go to the store in order, in one worker thread, so that a
    refresh of millions of entries never blocks the event loop; lookups
    read the last committed state on the loop.  The cookie is stored with
    the change it came with, and the newest CSN is kept per provider
    (:mod:`axpolicy.synccookie`).  During a refresh or resume the cookie is
    written only when it completes, in the same transaction that marks the
    store complete: a crash before that resumes from the old cookie again.

    A cookie the server refuses (e-syncRefreshRequired, unwillingToPerform
    "consumer state is newer", protocolError) empties the store and starts
    a full refresh at once.

    The replica is *authoritative only while healthy*: it answers from the
    moment its refresh or resume completes until the connection breaks, the
    server ends the search, or the server stops answering the liveness
    probe (a root DSE search after ``REPLICA_PROBE_SECONDS`` of silence,
    which must be answered within the map's ``timeout``).  Outside that
    time :attr:`Replica.ready` is False and the user map falls back to
    per-key searches, which fail over and answer TEMP when the directory
    cannot answer: a replica never answers from state the server has not
    confirmed, and never turns "the directory is down" into NOTFOUND.

    Matching: the key is compared with the values of the key attributes
    case-insensitively with insignificant spaces folded, which is how
    ``mail`` (caseIgnoreIA5Match) and ``uid`` (caseIgnoreMatch) compare.

PROTOCOL
    RFC 4533; OpenLDAP's ``syncprov`` overlay provides it (with
    ``syncprov-sessionlog``, a resume gets deletions as a list instead of a
    present phase).  The bind identity needs read access to the key
    attributes and the host attribute, and no size limit (``limits
    dn.exact=... size=unlimited``).  A server without syncprov ends the
    search with unavailableCriticalExtension; the map then keeps to per-key
    searches and tries again later.

DIAGNOSTICS
    Logged: refresh and resume complete (entries, seconds), a discarded
    store (why), a refused cookie, session lost (why), connection
    failures.  Counters for /metrics: ``entries``, ``refreshes``,
    ``resumes``, ``updates``, ``losses``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import lmdb

from axpolicy import ldapwire, limits, synccookie
from axpolicy.address import ascii_lower
from axpolicy.ldapconn import LdapConnection, LdapConnectionError
from axpolicy.log import printable
from axpolicy.replicastore import ReplicaStore, StoreError, Writer, host_ids
from axpolicy.result import NOTFOUND, LookupResult

logger = logging.getLogger(__name__)

_PRESENT, _ADD, _MODIFY, _DELETE = 0, 1, 2, 3
# RFC 4533 results that mean "this cookie cannot be resumed from".
_REFUSED = {ldapwire.E_SYNC_REFRESH_REQUIRED, 53, 2}   # e-syncRefreshRequired, unwillingToPerform, protocolError
ANSWER_CACHE_ENTRIES = 10000


class Record(NamedTuple):
    """One entry's host values, as the user map's rules evaluate them."""

    dn: bytes
    keys: tuple[str, ...]
    hosts: tuple[bytes, ...]


# (entries under one key, the key, whether to log problems) -> the answer
# for that key, by the user map's own rules.
Evaluate = Callable[[list[Record], str, bool], LookupResult]
# Opens an authenticated connection: (the connection, its server's URL).
Connect = Callable[[], Awaitable[tuple[LdapConnection, str]]]
# (message id, cookie or None) -> the sync search request.
Request = Callable[[int, bytes | None], bytes]


def fold(value: str) -> str:
    """The form in which keys and attribute values are compared (ASCII case folding only, as addresses)."""
    return ascii_lower(" ".join(value.split()))


@dataclasses.dataclass
class _Op:
    """One step for the store, applied in order in the writer thread."""

    kind: str                        # put, delete, present, cookie, clear, sweep, done
    uuid: bytes = b""
    keys: tuple[str, ...] = ()
    hosts: tuple[bytes, ...] = ()
    uuids: tuple[bytes, ...] = ()
    cookie: bytes | None = None


class _Owned:
    """The store file of one map belongs to one replica at a time.

    In this process (a reload starts a new replica before the old one has
    stopped) an asyncio lock per path; across processes (two daemons given
    the same state_dir) an flock on ``<path>.owner``.
    """

    _locks: dict[str, asyncio.Lock] = {}

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = self._locks.setdefault(path, asyncio.Lock())
        self._fd = -1

    async def acquire(self) -> None:
        await self.lock.acquire()
        try:
            try:
                os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)   # serve made it already
                fd = os.open(self.path + ".owner", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StoreError(f"{self.path}.owner: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise StoreError(f"{self.path} is in use by another axpolicy process") from None
            self._fd = fd
        except BaseException:
            self.lock.release()
            raise

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.lock.release()


class Replica:
    """See the module docstring; state changes happen on the event loop, writes in one worker thread."""

    def __init__(self, name: str, request: Request, key_attributes: tuple[str, ...], host_attribute: str,
                 connect: Connect, evaluate: Evaluate, timeout: float, store_path: str,
                 settings: dict[str, object]) -> None:
        self.name = name
        self.ready = False
        self.version = 0              # changes with every change of any answer (and of ready)
        self.refreshes = 0            # complete refreshes
        self.resumes = 0              # sessions resumed from the stored cookie
        self.updates = 0
        self.losses = 0
        self.store_path = store_path
        self._settings = settings
        self._request = request
        self._key_attributes = {a.lower().encode("ascii") for a in key_attributes}
        self._host_attribute = host_attribute.lower().encode("ascii")
        self._connect = connect
        self._evaluate = evaluate
        self._timeout = timeout
        self._store: ReplicaStore | None = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._answers: dict[bytes, LookupResult] = {}
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def entries(self) -> int:
        return self._store.entries if self._store is not None else 0

    def answer(self, key: str) -> LookupResult | None:
        """The replica's answer, or None when it is not ready (search instead)."""
        if not self.ready or self._store is None:
            return None
        if not key.isascii():
            return NOTFOUND   # as a search: never asked (LdapUserMap.lookup)
        store = self._store
        held = store.holders(key)
        if held is None:
            # The router's keys are already folded; others (the CLI, tests) may not be.
            folded = fold(key)
            held = store.holders(folded) if folded != key else None
            if held is None:
                return NOTFOUND
        answer = self._answers.get(held)
        if answer is None:
            records = [Record(b"", (), store.host(host_id)) for host_id in host_ids(held)]
            answer = self._evaluate(records, key, False)
            if len(self._answers) < ANSWER_CACHE_ENTRIES:
                self._answers[held] = answer
        return answer

    def start(self) -> None:
        """Start replicating (idempotent); must be called on the event loop."""
        if self._task is None and not self._stopping:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop replicating, close the connection and the store."""
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
        owner = _Owned(self.store_path)
        backoff = limits.REPLICA_RETRY_MIN_SECONDS
        try:
            while not self._stopping:
                try:
                    await self._open(owner)
                except StoreError as exc:
                    logger.error("usermap %s: replica store unusable (%s); using searches", self.name, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, limits.REPLICA_RETRY_MAX_SECONDS)
                    continue
                break
            while not self._stopping:
                try:
                    conn, url = await self._connect()
                except LdapConnectionError as exc:
                    logger.warning("usermap %s: replica cannot connect (%s); using searches", self.name,
                                   printable(str(exc)))
                else:
                    completed = self.refreshes + self.resumes
                    refused = False
                    try:
                        refused = await self._session(conn, url)
                    except (LdapConnectionError, ldapwire.LdapWireError) as exc:
                        if not self._stopping:
                            logger.warning("usermap %s: replica session with %s lost (%s); using searches",
                                           self.name, url, printable(str(exc) or exc.__class__.__name__))
                    except StoreError as exc:
                        logger.error("usermap %s: replica store failed (%s); using searches", self.name, exc)
                    except Exception:  # noqa: BLE001 - a bug must not end replication for good
                        logger.exception("usermap %s: replica session with %s failed; using searches",
                                         self.name, url)
                    finally:
                        self._lost()
                        conn.close()
                    if refused:
                        continue      # a full refresh, at once
                    if self.refreshes + self.resumes != completed:
                        backoff = limits.REPLICA_RETRY_MIN_SECONDS   # it was healthy: try again soon
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, limits.REPLICA_RETRY_MAX_SECONDS)
        finally:
            self._close()
            owner.release()

    async def _open(self, owner: _Owned) -> None:
        await owner.acquire()
        try:
            loop = asyncio.get_running_loop()
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"replica-{self.name}")
            self._store = await loop.run_in_executor(self._writer, ReplicaStore, self.store_path, self._settings)
        except BaseException:
            self._close()
            owner.release()
            raise
        if self._store.discarded:
            logger.warning("usermap %s: replica store %s %s; discarded", self.name, self.store_path,
                           self._store.discarded)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def _lost(self) -> None:
        self.losses += 1
        self._set_ready(False)      # at once: searches take over now

    async def _session(self, conn: LdapConnection, url: str) -> bool:
        """Run one sync session until it breaks (an exception) or the server ends it; True: cookie refused."""
        store = self._store
        assert store is not None
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        cookie = store.cookie if store.complete else None
        session = _Session(resuming=cookie is not None)
        queue: list[_Op] = [] if cookie is not None else [_Op("clear")]
        wake = asyncio.Event()
        ended: asyncio.Future[tuple[int, str]] = loop.create_future()
        heard = [loop.time()]

        paused = False
        weight = [0]       # changes waiting, a present phase's UUIDs at 1/32 each (16 bytes, not an entry)

        def push(op: _Op) -> None:
            nonlocal paused
            queue.append(op)
            weight[0] += _weight(op)
            wake.set()
            if weight[0] >= 4 * limits.REPLICA_WRITE_BATCH and not paused:
                # The writer is behind (a full refresh): let the server wait, not our memory.
                conn.pause_reading()
                paused = True

        def on_message(message: ldapwire.Message) -> bool:
            heard[0] = loop.time()
            if message.kind == "entry":
                self._entry(message, session, push)
            elif message.kind == "intermediate" and message.name == ldapwire.SYNC_INFO_OID:
                self._info(ldapwire.decode_sync_info(message.value), session, push)
            elif message.kind == "done":
                why = printable(message.diagnostic.decode("utf-8", "replace"))
                if message.result_code == 12:
                    why = f"the server does not support content synchronization (syncprov): {why}"
                if not ended.done():
                    ended.set_result((message.result_code, why))
                return True
            elif message.kind == "reference":
                raise ldapwire.LdapWireError("referral in the replica search")
            return False

        async def drain() -> None:
            nonlocal paused
            while True:
                await wake.wait()
                wake.clear()
                size = taken = 0
                while taken < len(queue) and size < limits.REPLICA_WRITE_BATCH:
                    size += _weight(queue[taken])
                    taken += 1
                batch = queue[:taken]
                del queue[:taken]
                weight[0] -= size
                if queue:
                    wake.set()
                done = await self._apply(batch)
                if paused and weight[0] < limits.REPLICA_WRITE_BATCH:
                    paused = False
                    heard[0] = loop.time()      # silent because we did not read: not the server's fault
                    conn.resume_reading()
                if done is not None:
                    self._completed(session, done, time.monotonic() - started)
                    if not session.resuming:
                        await self._rebuild()

        conn.stream(lambda message_id: self._request(message_id, cookie), on_message)
        if queue:
            wake.set()
        closed = asyncio.ensure_future(conn.wait_closed())
        writer = asyncio.ensure_future(drain())
        try:
            while True:
                silent = loop.time() - heard[0]
                wait = max(0.0, limits.REPLICA_PROBE_SECONDS - silent)
                await asyncio.wait((ended, closed, writer), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if writer.done():
                    writer.result()       # a store error ends the session
                if ended.done():
                    code, why = ended.result()
                    if cookie is not None and not session.done and code in _REFUSED:
                        logger.warning("usermap %s: %s refused the stored cookie (%s %s); full refresh",
                                       self.name, url, ldapwire.result_name(code), why)
                        await self._apply([_Op("clear")])
                        return True
                    logger.warning("usermap %s: %s ended the replica search: result %s %s; using searches",
                                   self.name, url, ldapwire.result_name(code), why)
                    return False
                if closed.done():
                    raise LdapConnectionError(conn.error or "connection closed")
                if loop.time() - heard[0] >= limits.REPLICA_PROBE_SECONDS:
                    await self._probe(conn)
                    heard[0] = loop.time()
        finally:
            closed.cancel()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreError):
                await writer

    def _entry(self, message: ldapwire.Message, session: _Session, push: Callable[[_Op], None]) -> None:
        state_value = message.controls.get(ldapwire.SYNC_STATE_OID)
        if state_value is None:
            raise ldapwire.LdapWireError("entry without a sync state")
        state, uuid, cookie = ldapwire.decode_sync_state(state_value)
        if state == _DELETE:
            push(_Op("delete", uuid))
        elif state == _PRESENT:
            if session.resuming:
                push(_Op("present", uuids=(uuid,)))
        else:
            keys, hosts = self._record(message)
            push(_Op("put", uuid, keys, hosts))
            if session.resuming and not session.done:
                push(_Op("present", uuids=(uuid,)))
        self._cookie(cookie, session, push)

    def _info(self, info: ldapwire.SyncInfo, session: _Session, push: Callable[[_Op], None]) -> None:
        if info.kind == 3:
            if info.refresh_deletes:
                for uuid in info.uuids:
                    push(_Op("delete", uuid))
            elif session.resuming:
                push(_Op("present", uuids=info.uuids))
        elif info.kind == 2 and session.resuming and not session.done:
            # The end of a present phase: what was not reported present is gone.
            push(_Op("sweep"))
        self._cookie(info.cookie, session, push)
        if info.kind in (1, 2) and info.refresh_done and not session.done:
            session.done = True
            push(_Op("done", cookie=synccookie.encode(session.csns)))

    def _cookie(self, cookie: bytes | None, session: _Session, push: Callable[[_Op], None]) -> None:
        if cookie is None:
            return
        if session.done:
            push(_Op("cookie", cookie=cookie))     # persist phase: stored with the change
        else:
            session.csns = synccookie.merge(session.csns, cookie)   # stored when the refresh completes

    def _record(self, message: ldapwire.Message) -> tuple[tuple[str, ...], tuple[bytes, ...]]:
        keys: list[str] = []
        hosts: list[bytes] = []
        for name, values in message.attributes.items():
            lowered = name.lower()
            if lowered in self._key_attributes:
                keys.extend(fold(v.decode("utf-8", "replace")) for v in values)
            if lowered == self._host_attribute:
                hosts.extend(values)
        keys_t, hosts_t = tuple(dict.fromkeys(keys)), tuple(hosts)
        # Problems are logged once, here, not at every lookup.
        self._evaluate([Record(message.dn, keys_t, hosts_t)], keys_t[0] if keys_t else "", True)
        return keys_t, hosts_t

    async def _apply(self, batch: list[_Op]) -> _Op | None:
        """Write *batch* in the writer thread; the "done" step it held, if any."""
        store, writer = self._store, self._writer
        assert store is not None and writer is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                done = await loop.run_in_executor(writer, _write, store, batch)
                break
            except lmdb.MapFullError:
                size = store.grow()      # the writer is idle and the reader dropped: safe here
                logger.info("usermap %s: replica store map grown to %d KiB", self.name, size // 1024)
        store.committed()
        self._answers.clear()
        changes = sum(op.kind in ("put", "delete") for op in batch)
        if self.ready:
            self.updates += changes
        self.version += 1
        return done

    def _completed(self, session: _Session, done: _Op, seconds: float) -> None:
        if self._stopping:
            return
        if session.resuming:
            self.resumes += 1
            logger.info("usermap %s: replica resumed from its cookie, %d entries (%.2fs)", self.name,
                        self.entries, seconds)
        else:
            self.refreshes += 1
            logger.info("usermap %s: replica ready, %d entries (refresh took %.2fs)", self.name,
                        self.entries, seconds)
        self._set_ready(True)

    async def _rebuild(self) -> None:
        """Rewrite the store in key order after a full refresh (worker thread; the swap on the loop)."""
        store, writer = self._store, self._writer
        assert store is not None and writer is not None
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        rebuilt = await loop.run_in_executor(writer, store.rebuild)
        store.swap(rebuilt)
        self._answers.clear()
        self.version += 1
        logger.info("usermap %s: replica store rewritten in key order, %d bytes (%.2fs)", self.name,
                    store.size_bytes(), time.monotonic() - started)

    async def _probe(self, conn: LdapConnection) -> None:
        """A root DSE search that must be answered within the map's timeout (LdapConnectionError)."""
        try:
            async with asyncio.timeout(self._timeout):
                await conn.operation(lambda message_id: ldapwire.encode_search(
                    message_id, "", "base", _PROBE_FILTER, "1.1", 1, max(1, int(self._timeout))))
        except TimeoutError:
            raise LdapConnectionError(f"no answer to the liveness probe within {self._timeout:g}s") from None


def _weight(op: _Op) -> int:
    """What *op* costs in a write batch: a change 1, a present phase's UUID 1/32.

    A present phase reports every UUID still there: a million at a million
    entries.  Written 2,000 to a transaction, their random order dirties
    most pages of the marks each time (11 s at 1M); 64,000 to a
    transaction take a few seconds, for a few MiB waiting in memory.
    """
    return 1 + len(op.uuids) // 32


@dataclasses.dataclass
class _Session:
    resuming: bool
    done: bool = False                                   # the refresh (or resume) completed
    csns: dict[str, str] = dataclasses.field(default_factory=dict)


def _write(store: ReplicaStore, batch: list[_Op]) -> _Op | None:
    """Apply *batch* in one transaction (in the writer thread); the "done" step, if any."""
    done = None
    with store.write() as tx:
        for op in batch:
            _step(tx, op)
            if op.kind == "done":
                done = op
    return done


def _step(tx: Writer, op: _Op) -> None:
    if op.kind == "put":
        tx.put(op.uuid, op.keys, op.hosts)
    elif op.kind == "delete":
        tx.delete(op.uuid)
    elif op.kind == "present":
        tx.mark_present(op.uuids)
    elif op.kind == "sweep":
        tx.sweep()
    elif op.kind == "cookie":
        tx.cookie(op.cookie)
    elif op.kind == "clear":
        tx.clear()
    elif op.kind == "done":
        tx.forget_marks()
        tx.cookie(op.cookie)
        tx.complete()


_PROBE_FILTER = ldapwire.compile_filter("(objectClass=*)").encode({})
