"""The replica's store: address-to-host data and the sync cookie, in LMDB, on disk.

DESCRIPTION
    One LMDB environment per replicated user map, the file
    ``state_dir/<map>.mdb`` (and its lock file ``<map>.mdb-lock``):
    the storage engine of OpenLDAP's own back-mdb, memory-mapped (lookups
    read the page cache, not Python objects) and crash-safe (a transaction
    is all or nothing, so kill -9 at any moment leaves the last committed
    state).  Named databases:

    ``keys``     hash of a folded key -> the host ids of the entries holding
                 it (one varint each; two or more only for a shared key)
    ``entries``  entryUUID -> the entry's host id, then the hashes of its keys
    ``hosts``    host id -> the entry's host values; ``hostids`` the reverse
    ``present``  UUIDs reported present in a resume's present phase
    ``meta``     format, settings digest, hash key, ``complete`` flag and the
                 newest CSN per provider (synccookie)

    Keys are stored as a 12-byte keyed BLAKE2b hash (the key is random per
    store), not as text: an entry costs about 100 bytes however long its
    addresses are.  Two different keys share a hash with a probability
    of about 2^-96 per pair; the hash key stops anyone from making that
    happen on purpose.

    The store answers only when ``complete``: set in the same transaction
    that writes the cookie at the end of a refresh.  A store written for
    other settings (servers, base, scope, filter, attributes), of another
    format, or left incomplete by a crash is emptied when opened.

    A full refresh inserts keys in hash order, which is random: B-tree
    pages end up about 70 % full and half the file is pages freed by
    copy-on-write.  :meth:`ReplicaStore.rebuild` then writes the live data
    in key order into a new file (full pages, no free ones) in a worker
    thread, and :meth:`ReplicaStore.swap` renames it over the old one, an
    atomic step: after a crash the store is the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence

import lmdb

from axpolicy import synccookie

FORMAT = b"axpolicy-replica-1"
KEY_HASH_BYTES = 12
# With writemap, LMDB sizes the (sparse) file to the map: start at 1 GiB,
# or twice what the file holds, and double when a write finds it full.
MAP_SIZE_MIN = 1024**3
HOST_CACHE_ENTRIES = 10000
NO_HOST = 0
DATABASES = (b"meta", b"keys", b"entries", b"hosts", b"hostids", b"present")
REBUILD_SUFFIX = ".rebuild"
LOCK_SUFFIX = "-lock"


class StoreError(Exception):
    """The store cannot be opened or written (a full disk, a permission)."""


def _environment(path: str, at_least: int = 0) -> lmdb.Environment:
    """An LMDB file: writes go straight to the shared mapping (no private dirty copies).

    Measured at a million entries (bench/run --users 1000000 scale): with
    writemap the daemon keeps 6 bytes per entry of private memory and its
    first refresh took 56-63 s; without, 24 bytes and 68 s (LMDB keeps the
    dirty-page buffers of its largest transaction).  The price is a sparse
    file as large as the map.
    """
    map_size = max(MAP_SIZE_MIN, 2 * at_least)
    env = lmdb.open(path, map_size=map_size, subdir=False, max_dbs=len(DATABASES), metasync=False, mode=0o600,
                    readahead=False, meminit=False, writemap=True)
    used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if 2 * used > map_size:
        env.set_mapsize(max(map_size, 4 * used))
    return env


def _remove(path: str) -> None:
    for name in (path, path + LOCK_SUFFIX):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def _varints(values: Iterable[int]) -> bytes:
    out = bytearray()
    for value in values:
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def host_ids(value: bytes) -> list[int]:
    """The host ids in a ``keys`` value (or at the start of an ``entries`` value)."""
    out: list[int] = []
    current = shift = 0
    for byte in value:
        current |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
        else:
            out.append(current)
            current = shift = 0
    return out


def _split_entry(value: bytes) -> tuple[int, list[bytes]]:
    """(host id, key hashes) of an ``entries`` value."""
    end = 0
    while value[end] & 0x80:
        end += 1
    host = host_ids(value[:end + 1])[0]
    rest = value[end + 1:]
    return host, [rest[i:i + KEY_HASH_BYTES] for i in range(0, len(rest), KEY_HASH_BYTES)]


class ReplicaStore:
    """One replicated user map's data on disk; every method runs on the event loop's thread."""

    def __init__(self, path: str, settings: dict[str, object]) -> None:
        self.path = path
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest().encode()
        _remove(path + REBUILD_SUFFIX)      # a rebuild that a crash interrupted
        self._open()
        env = self._env
        self.discarded = ""
        with env.begin(write=True) as txn:
            meta = {k: txn.get(k, db=self._meta) for k in (b"format", b"settings", b"complete", b"salt")}
            if meta[b"format"] != FORMAT:
                self.discarded = "of another format" if meta[b"format"] else ""
            elif meta[b"settings"] != digest:
                self.discarded = "written for other map settings"
            elif meta[b"complete"] != b"1":
                self.discarded = "left incomplete"
            if self.discarded or meta[b"format"] != FORMAT:
                self._clear(txn)
                txn.put(b"format", FORMAT, db=self._meta)
                txn.put(b"settings", digest, db=self._meta)
                txn.put(b"salt", secrets.token_bytes(16), db=self._meta)
                txn.put(b"complete", b"0", db=self._meta)
            salt = txn.get(b"salt", db=self._meta)
            self.complete = txn.get(b"complete", db=self._meta) == b"1"
            self.csns: dict[str, str] = json.loads(txn.get(b"csns", b"{}", db=self._meta))
        self._salt = bytes(salt or b"")
        self._host_cache: dict[int, tuple[bytes, ...]] = {}
        self._reader: lmdb.Transaction | None = None
        self.version = 0

    def _open(self) -> None:
        try:
            self._env = _environment(self.path)
            env = self._env
            self._meta, self._keys, self._entries, self._hosts, self._host_ids, self._present = (
                env.open_db(name) for name in DATABASES)
        except (lmdb.Error, OSError) as exc:
            raise StoreError(f"{self.path}: {exc}") from None

    # -- compaction ---------------------------------------------------------------

    def live_bytes(self) -> int:
        """Bytes in the pages the data uses (the file also holds free pages)."""
        with self._env.begin() as txn:
            pages = 0
            for db in (self._meta, self._keys, self._entries, self._hosts, self._host_ids, self._present):
                stat = txn.stat(db)
                pages += stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        return int(pages * self._env.stat()["psize"])

    def rebuild(self) -> str:
        """Copy the data in key order into a new file; its path (in a worker thread: no write may run meanwhile)."""
        target = self.path + REBUILD_SUFFIX
        _remove(target)
        out = _environment(target, at_least=self.size_bytes())
        try:
            with self._env.begin() as source, out.begin(write=True) as txn:
                for name, db in zip(DATABASES, (self._meta, self._keys, self._entries, self._hosts,
                                                self._host_ids, self._present), strict=True):
                    items = source.cursor(db=db).iternext()
                    txn.cursor(db=out.open_db(name, txn=txn)).putmulti(items, append=True)
            out.sync(True)
        finally:
            out.close()
        return target

    def swap(self, rebuilt: str) -> None:
        """Put the file :meth:`rebuild` wrote in place of this one (on the readers' thread; atomic on disk)."""
        self._drop_reader()
        self._env.close()
        os.replace(rebuilt, self.path)
        _remove(rebuilt + LOCK_SUFFIX)
        self._open()
        self.version += 1

    # -- reading --------------------------------------------------------------

    def key_hash(self, key: str) -> bytes:
        return hashlib.blake2b(key.encode("utf-8"), digest_size=KEY_HASH_BYTES, key=self._salt).digest()

    def holders(self, key: str) -> bytes | None:
        """The host ids (varints) of the entries that hold *key* (already folded), or None."""
        reader = self._reader
        if reader is None:
            reader = self._reader = self._env.begin(db=self._keys)
        value = reader.get(self.key_hash(key))
        return None if value is None else bytes(value)

    def host(self, host_id: int) -> tuple[bytes, ...]:
        """The host values of *host_id* (empty: the entries have none)."""
        if host_id == NO_HOST:
            return ()
        cached = self._host_cache.get(host_id)
        if cached is not None:
            return cached
        with self._env.begin(db=self._hosts) as txn:
            raw = txn.get(_varints([host_id]))
        values = tuple(raw.split(b"\x00")) if raw is not None else (b"\xff",)
        if len(self._host_cache) < HOST_CACHE_ENTRIES:
            self._host_cache[host_id] = values
        return values

    @property
    def entries(self) -> int:
        with self._env.begin() as txn:
            return int(txn.stat(self._entries)["entries"])

    @property
    def cookie(self) -> bytes | None:
        return synccookie.encode(self.csns)

    def size_bytes(self) -> int:
        info = self._env.info()
        stat = self._env.stat()
        return int((info["last_pgno"] + 1) * stat["psize"])

    # -- writing --------------------------------------------------------------

    def write(self) -> Writer:
        """One write transaction (a context manager; the writer thread's); readers see it on exit.

        lmdb.MapFullError from it means: call :meth:`grow`, then write again.
        """
        return Writer(self, self._env.begin(write=True))

    def committed(self) -> None:
        """After a write, on the readers' thread: the next lookup reads the new state."""
        self._drop_reader()
        self.version += 1

    def grow(self) -> int:
        """Double the map (on the readers' thread, while no write runs); the new size."""
        self._drop_reader()
        size = 2 * int(self._env.info()["map_size"])
        self._env.set_mapsize(size)
        return size

    def _drop_reader(self) -> None:
        if self._reader is not None:
            self._reader.abort()
            self._reader = None

    def _clear(self, txn: lmdb.Transaction) -> None:
        for db in (self._keys, self._entries, self._hosts, self._host_ids, self._present):
            txn.drop(db, delete=False)
        txn.delete(b"csns", db=self._meta)
        txn.put(b"complete", b"0", db=self._meta)

    def close(self) -> None:
        self._drop_reader()
        self._env.close()


class Writer:
    """A write transaction on a :class:`ReplicaStore`."""

    def __init__(self, store: ReplicaStore, txn: lmdb.Transaction) -> None:
        self._store = store
        self._txn = txn
        self._csns = dict(store.csns)
        self._complete = store.complete
        self.touched: set[bytes] = set()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        store = self._store
        if kind is not None:
            self._txn.abort()
            return
        try:
            self._txn.commit()
        except lmdb.MapFullError:
            raise
        except lmdb.Error as exc:
            raise StoreError(f"{store.path}: {exc}") from None
        store.csns = self._csns
        store.complete = self._complete

    def put(self, uuid: bytes, keys: Sequence[str], hosts: tuple[bytes, ...]) -> None:
        """Add or replace the entry *uuid*: its (folded) keys and its host values."""
        self.delete(uuid)
        store, txn = self._store, self._txn
        host_id = self._host_id(hosts)
        hashes = list(dict.fromkeys(store.key_hash(key) for key in keys))
        for key_hash in hashes:
            held = txn.get(key_hash, db=store._keys)
            ids = host_ids(bytes(held)) if held is not None else []
            ids.append(host_id)
            txn.put(key_hash, _varints(sorted(ids)), db=store._keys)
        txn.put(uuid, _varints([host_id]) + b"".join(hashes), db=store._entries)
        self.touched.update(hashes)

    def delete(self, uuid: bytes) -> bool:
        """Remove the entry *uuid* and its keys; False when it was not there."""
        store, txn = self._store, self._txn
        old = txn.pop(uuid, db=store._entries)
        if old is None:
            return False
        host_id, hashes = _split_entry(bytes(old))
        for key_hash in hashes:
            held = txn.get(key_hash, db=store._keys)
            ids = host_ids(bytes(held)) if held is not None else []
            if host_id in ids:
                ids.remove(host_id)
            if ids:
                txn.put(key_hash, _varints(ids), db=store._keys)
            else:
                txn.delete(key_hash, db=store._keys)
        self.touched.update(hashes)
        return True

    def _host_id(self, hosts: tuple[bytes, ...]) -> int:
        if not hosts:
            return NO_HOST
        store, txn = self._store, self._txn
        value = b"\x00".join(sorted(set(hosts)))
        found = txn.get(value, db=store._host_ids)
        if found is not None:
            return host_ids(bytes(found))[0]
        next_id = int(txn.get(b"nexthost", b"1", db=store._meta))
        txn.put(b"nexthost", str(next_id + 1).encode(), db=store._meta)
        txn.put(value, _varints([next_id]), db=store._host_ids)
        txn.put(_varints([next_id]), value, db=store._hosts)
        return next_id

    def mark_present(self, uuids: Iterable[bytes]) -> None:
        """Remember *uuids* as present (a resume's present phase)."""
        store, txn = self._store, self._txn
        for uuid in uuids:
            txn.put(uuid, b"", db=store._present)

    def sweep(self) -> int:
        """Delete every entry not marked present, then forget the marks; how many were deleted."""
        store, txn = self._store, self._txn
        gone = list(_unmarked(txn.cursor(db=store._entries), txn.cursor(db=store._present)))
        for uuid in gone:
            self.delete(uuid)
        txn.drop(store._present, delete=False)
        return len(gone)

    def forget_marks(self) -> None:
        self._txn.drop(self._store._present, delete=False)

    def clear(self) -> None:
        """Empty the store (a full refresh follows); it answers nothing until complete again."""
        self._store._clear(self._txn)
        self._store._host_cache.clear()
        self._csns = {}
        self._complete = False

    def cookie(self, cookie: bytes | None) -> None:
        """Merge the CSNs of *cookie* into the stored ones."""
        merged = synccookie.merge(self._csns, cookie)
        if merged != self._csns:
            self._csns = merged
            self._txn.put(b"csns", json.dumps(merged, sort_keys=True).encode(), db=self._store._meta)

    def complete(self, done: bool = True) -> None:
        self._complete = done
        self._txn.put(b"complete", b"1" if done else b"0", db=self._store._meta)


def _unmarked(entries: lmdb.Cursor, present: lmdb.Cursor) -> Iterator[bytes]:
    """UUIDs in *entries* and not in *present*: a merge of two sorted cursors."""
    marks = (bytes(key) for key in present.iternext(keys=True, values=False))
    mark = next(marks, None)
    for key in entries.iternext(keys=True, values=False):
        uuid = bytes(key)
        while mark is not None and mark < uuid:
            mark = next(marks, None)
        if mark != uuid:
            yield uuid
