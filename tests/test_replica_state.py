"""The replica's state on disk: resume from the cookie, deletions while down, refused cookies, kill -9.

Each test keeps a replica's store in its own ``state_dir`` and stops and
starts replicas (in process, or as daemons it kills) against a real slapd
with syncprov: once without a session log, so that a resume is a present
phase (the UUIDs of every entry still there), once with
``syncprov-sessionlog``, so that deletions come as a list.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import pwd
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
import yaml

from axpolicy import config
from axpolicy.ldapmap import LdapUserMap
from axpolicy.result import NOTFOUND, Status, found
from tests.clients import SocketmapClient
from tests.conftest import axpolicy_cli, ldap_map, own_slapd, run, seed_ldif
from tests.daemon import Axpolicy
from tests.postfix import open_path
from tests.proxy import StallingProxy
from tests.slapd import PEOPLE, Slapd, free_port
from tests.test_multiprovider import holds
from tests.test_replica import eventually, make_map, ready, user_ldif

UIDS = itertools.count(1)


@pytest.fixture(scope="module", params=[0, 1000], ids=["present-phase", "sessionlog"])
def provider(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    yield from own_slapd(tmp_path_factory, f"slapd-state-{request.param}", sessionlog=request.param)


@pytest.fixture
def directory(provider: Slapd) -> Iterator[Slapd]:
    yield provider
    provider.restore()


def users(directory: Slapd, host: str, count: int) -> list[str]:
    """Add *count* new users on *host*; their uids."""
    uids = [f"state{next(UIDS)}" for _ in range(count)]
    directory.modify("\n".join(user_ldif(uid, host) for uid in uids))
    return uids


def address(uid: str) -> str:
    return f"{uid}@example.com"


async def started(usermap: LdapUserMap) -> LdapUserMap:
    usermap.start()
    await eventually(ready(usermap))
    return usermap


def test_a_restart_resumes_from_the_cookie_and_applies_what_changed_meanwhile(directory: Slapd,
                                                                              tmp_path: Path) -> None:
    keep, gone, moved = users(directory, "127.0.0.2", 3)

    async def first() -> None:
        usermap = await started(make_map(directory, state_dir=tmp_path))
        assert usermap.replica is not None and (usermap.replica.refreshes, usermap.replica.resumes) == (1, 0)
        assert usermap.lookup_now(address(gone)) == found("127.0.0.2")
        await usermap.close()

    run(first())
    # While no replica runs: a delete, a move to another back-end, a new user.
    directory.modify(f"dn: uid={gone},{PEOPLE}\nchangetype: delete\n")
    directory.modify(f"dn: uid={moved},{PEOPLE}\nchangetype: modify\nreplace: mailHost\nmailHost: 127.0.0.3\n")
    (new,) = users(directory, "127.0.0.3", 1)

    async def second() -> None:
        usermap = make_map(directory, state_dir=tmp_path)
        usermap.start()
        # Until the resume completes the stored state is stale: searches answer.
        assert usermap.lookup_now(address(gone)) is None
        assert (await usermap.lookup(address(gone))).status is Status.NOTFOUND
        await eventually(ready(usermap))
        assert usermap.replica is not None and (usermap.replica.refreshes, usermap.replica.resumes) == (0, 1)
        assert usermap.lookup_now(address(keep)) == found("127.0.0.2")
        assert usermap.lookup_now(address(gone)) == NOTFOUND
        assert usermap.lookup_now(address(moved)) == found("127.0.0.3")
        assert usermap.lookup_now(address(new)) == found("127.0.0.3")
        assert usermap.lookup_now("alice@example.com") == found("127.0.0.2")
        # And the persist phase goes on from there.
        directory.modify(f"dn: uid={keep},{PEOPLE}\nchangetype: delete\n")
        await eventually(lambda: usermap.lookup_now(address(keep)) == NOTFOUND)
        await usermap.close()

    run(second())


def test_a_reconnect_resumes_too(directory: Slapd, tmp_path: Path) -> None:
    (gone,) = users(directory, "127.0.0.2", 1)

    async def go() -> None:
        usermap = await started(make_map(directory, state_dir=tmp_path))
        directory.stop()
        await eventually(lambda: not ready(usermap)())
        directory.start()
        directory.modify(f"dn: uid={gone},{PEOPLE}\nchangetype: delete\n")
        await eventually(ready(usermap), 40)
        assert usermap.replica is not None and usermap.replica.resumes == 1
        assert usermap.lookup_now(address(gone)) == NOTFOUND
        await usermap.close()

    run(go())


def set_stored_csns(store: Path, csns: dict[str, str]) -> None:
    env = lmdb.open(str(store), subdir=False, max_dbs=8)
    try:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"csns", json.dumps(csns).encode(), db=meta)
    finally:
        env.close()


def test_a_refused_cookie_means_a_full_refresh_and_never_stale_answers(
        directory: Slapd, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (gone,) = users(directory, "127.0.0.2", 1)

    async def first() -> None:
        await (await started(make_map(directory, state_dir=tmp_path))).close()

    run(first())
    directory.modify(f"dn: uid={gone},{PEOPLE}\nchangetype: delete\n")
    # A cookie from the future: "consumer state is newer than provider".
    set_stored_csns(tmp_path / "people.mdb", {"000": "20991231235959.999999Z#000000#000#000000"})

    async def second() -> None:
        usermap = make_map(directory, state_dir=tmp_path)
        usermap.start()
        deleted, existing = [], []
        while not ready(usermap)():
            deleted.append(await usermap.lookup(address(gone)))
            existing.append(await usermap.lookup("alice@example.com"))
            await asyncio.sleep(0.001)
        assert usermap.replica is not None and (usermap.replica.refreshes, usermap.replica.resumes) == (1, 0)
        # Searched meanwhile: never the stale state, never "not found" for a user who exists.
        assert deleted and {a.status for a in deleted} == {Status.NOTFOUND}
        assert set(existing) == {found("127.0.0.2")}
        assert usermap.lookup_now(address(gone)) == NOTFOUND
        assert usermap.lookup_now("alice@example.com") == found("127.0.0.2")
        await usermap.close()

    with caplog.at_level(logging.WARNING, "axpolicy.ldapsync"):
        run(second())
    assert "refused the stored cookie" in caplog.text and "unwillingToPerform" in caplog.text


def test_state_written_for_other_settings_is_discarded(directory: Slapd, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        await (await started(make_map(directory, state_dir=tmp_path))).close()
        with caplog.at_level(logging.WARNING, "axpolicy.ldapsync"):
            usermap = await started(make_map(directory, state_dir=tmp_path, filter="(mail=%s)"))
        assert usermap.replica is not None and (usermap.replica.refreshes, usermap.replica.resumes) == (1, 0)
        assert usermap.lookup_now("asmith@example.net") == NOTFOUND    # an alternate address: not in (mail=%s)
        await usermap.close()

    run(go())
    assert "written for other map settings; discarded" in caplog.text


# --- kill -9 ---------------------------------------------------------------------

BIG = 3000


@pytest.fixture(scope="module")
def big_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """A few thousand entries, so that a refresh takes several write transactions."""
    people = "\n".join(
        f"dn: uid=big{n},{PEOPLE}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n"
        f"uid: big{n}\ncn: Big {n}\nsn: {n}\nmail: big{n}@example.net\n"
        f"mailHost: {'127.0.0.2' if n % 2 else '127.0.0.3'}\n" for n in range(1, BIG + 1))
    server = Slapd(tmp_path_factory.mktemp("slapd-big"), seed_ldif() + "\n" + people)
    server.start()
    yield server
    server.destroy()


def daemon_config(directory: Slapd, state: Path, url: str | None = None) -> dict[str, Any]:
    people = ldap_map(directory, replica=True)
    if url is not None:
        people["servers"] = [url]
    return {"usermaps": {"people": people},
            "listen": [{"protocol": "socketmap", "address": f"inet:127.0.0.1:{free_port()}"}],
            "maps": {"transport": {"usermap": "people"}},
            "cache": {"ttl": 0, "negative_ttl": 0, "stale_if_error": 0, "max_entries": 0},
            "state_dir": str(state)}


def expected_host(n: int, moved: set[int]) -> bytes:
    host = "127.0.0.2" if n % 2 else "127.0.0.3"
    if n in moved:
        host = "127.0.0.4"
    return f"OK {host}".encode()


def stored_flag(store: Path) -> bytes | None:
    env = lmdb.open(str(store), subdir=False, max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            value = txn.get(b"complete", db=env.open_db(b"meta", txn=txn, create=False))
            return None if value is None else bytes(value)
    finally:
        env.close()


def wait_for_log(server: Axpolicy, *lines: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not any(line in server.log for line in lines):
        assert time.monotonic() < deadline, server.log
        time.sleep(0.05)


def check_answers(server: Axpolicy, moved: set[int]) -> None:
    client = SocketmapClient(server.address("socketmap"))
    for n in [*sorted(moved), *range(1, BIG + 1, 97), BIG]:
        assert client.query("transport", f"big{n}@example.net") == expected_host(n, moved), n
    assert client.query("transport", "alice@example.com") == b"OK 127.0.0.2"
    assert client.query("transport", "nobody@example.net") == b"NOTFOUND "
    client.close()


def test_kill_9_in_the_middle_of_a_refresh_leaves_a_store_that_is_discarded(big_directory: Slapd,
                                                                            tmp_path: Path) -> None:
    state = tmp_path / "state"
    # The directory's answer is cut after 100 kB (of about 450): a refresh
    # stuck half-way, its first batches written.
    proxy = StallingProxy(big_directory.port, budget=100_000)
    try:
        server = Axpolicy(tmp_path / "cut", daemon_config(big_directory, state, proxy.url))
        server.start()
        assert proxy.stalled.wait(30)
        time.sleep(0.5)                                   # the writer commits what arrived
        server.signal(signal.SIGKILL)
        server.stop()
        assert stored_flag(state / "people.mdb") == b"0"
        proxy.budget = 10**12                             # the same server (settings), whole answers now
        server = Axpolicy(tmp_path / "after", daemon_config(big_directory, state, proxy.url))
        server.start()
        try:
            wait_for_log(server, "replica ready", "replica resumed")
            assert "left incomplete; discarded" in server.log and "replica ready" in server.log
            check_answers(server, set())
        finally:
            assert server.stop() == 0, server.log
    finally:
        proxy.close()


def test_kill_9_at_any_moment_never_leaves_a_store_that_answers_wrongly(big_directory: Slapd,
                                                                        tmp_path: Path) -> None:
    state = tmp_path / "state"
    moved: set[int] = set()
    for round_, delay in enumerate((0.0, 0.05, 0.1, 0.2, 0.4, 0.8)):
        server = Axpolicy(tmp_path / f"run{round_}", daemon_config(big_directory, state))
        server.start()
        # Changes while it runs (refresh, rebuild or persist-phase writes), then kill -9.
        for n in range(30 * round_ + 1, 30 * round_ + 11):
            big_directory.modify(f"dn: uid=big{n},{PEOPLE}\nchangetype: modify\nreplace: mailHost\n"
                                 f"mailHost: 127.0.0.4\n")
            moved.add(n)
        time.sleep(delay)
        server.signal(signal.SIGKILL)
        server.stop()
    server = Axpolicy(tmp_path / "final", daemon_config(big_directory, state))
    server.start()
    try:
        wait_for_log(server, "replica ready", "replica resumed")
        check_answers(server, moved)
    finally:
        assert server.stop() == 0, server.log
    assert "Traceback" not in server.log


# --- state_dir belongs to the daemon's user -------------------------------------------

def state_config(directory: Slapd, state: Path, tmp_path: Path) -> Path:
    config = {**daemon_config(directory, state), "user": "nobody", "group": "nogroup"}
    path = tmp_path / "axpolicy.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_check_config_refuses_a_state_dir_the_daemon_user_cannot_write(directory: Slapd, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)                               # root's
    proc = axpolicy_cli("check-config", "-c", str(state_config(directory, state, tmp_path)))
    assert proc.returncode == 78
    assert f"state_dir: {state} is not writable by nobody" in proc.stderr
    shutil.chown(state, "nobody", "nogroup")
    (state / "people.mdb").write_bytes(b"")               # a store file left by a root run
    proc = axpolicy_cli("check-config", "-c", str(state_config(directory, state, tmp_path)))
    assert proc.returncode == 78 and f"{state}/people.mdb is not writable by nobody" in proc.stderr
    shutil.chown(state / "people.mdb", "nobody", "nogroup")
    proc = axpolicy_cli("check-config", "-c", str(state_config(directory, state, tmp_path)))
    assert proc.returncode == 0, proc.stderr


def test_serve_creates_the_state_dir_for_the_daemon_user(directory: Slapd, tmp_path: Path) -> None:
    open_path(tmp_path)
    state = tmp_path / "new" / "state"
    (tmp_path / "new").mkdir()
    config = {**daemon_config(directory, state), "user": "nobody", "group": "nogroup"}
    server = Axpolicy(tmp_path / "daemon", config)
    open_path(tmp_path / "daemon")
    server.start()
    try:
        wait_for_log(server, "replica ready")
        info = state.stat()
        assert (info.st_uid, info.st_mode & 0o777) == (pwd.getpwnam("nobody").pw_uid, 0o700)
        store = (state / "people.mdb").stat()
        assert (store.st_uid, store.st_mode & 0o777) == (info.st_uid, 0o600)
    finally:
        assert server.stop() == 0, server.log


# --- a local consumer slapd over ldapi:// ------------------------------------------------

def test_a_front_end_can_sync_from_a_local_consumer_over_ldapi(directory: Slapd, tmp_path: Path) -> None:
    """The layout of docs/scaling.rst: providers -> a consumer slapd on each front-end -> axpolicy."""
    consumer = Slapd(tmp_path / "consumer", "", providers=(directory.url,), ldapi=True, sessionlog=1000)
    consumer.start()
    try:
        (uid,) = users(directory, "127.0.0.3", 1)
        raw_map = {**ldap_map(consumer, replica=True), "servers": [consumer.ldapi_url]}
        cfg = config.parse({"usermaps": {"people": raw_map}, "state_dir": str(tmp_path / "state")},
                           str(tmp_path / "axpolicy.yml")).usermaps["people"]
        assert isinstance(cfg, config.LdapMapConfig)

        async def sync() -> None:
            usermap = LdapUserMap(cfg)
            # A search over ldapi, once the consumer has its first copy.
            await eventually(lambda: holds(consumer, uid))
            assert (await usermap.lookup("alice@example.com")) == found("127.0.0.2")
            await started(usermap)
            await eventually(lambda: usermap.lookup_now(address(uid)) == found("127.0.0.3"))
            directory.modify(f"dn: uid={uid},{PEOPLE}\nchangetype: delete\n")      # on the provider
            await eventually(lambda: usermap.lookup_now(address(uid)) == NOTFOUND)
            await usermap.close()

        run(sync())
    finally:
        consumer.destroy()


def test_a_store_that_outgrows_its_map_is_grown_and_written_again(
        big_directory: Slapd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from axpolicy import replicastore

    monkeypatch.setattr(replicastore, "MAP_SIZE_MIN", 256 * 1024)    # 64 pages: full within the refresh

    async def go() -> None:
        usermap = await started(make_map(big_directory, state_dir=tmp_path))
        for n in (11, 12, BIG // 2, BIG):     # never moved by the kill -9 tests
            assert usermap.lookup_now(f"big{n}@example.net") == found("127.0.0.2" if n % 2 else "127.0.0.3")
        assert usermap.replica is not None and usermap.replica.entries > BIG
        await eventually(lambda: "replica store rewritten" in caplog.text)
        await usermap.close()

    with caplog.at_level(logging.INFO, "axpolicy.ldapsync"):
        run(go())
    assert "replica store map grown" in caplog.text
    assert "replica store rewritten in key order" in caplog.text and "failed" not in caplog.text
