"""Many front-ends on OpenLDAP multi-provider replication.

Two slapd providers replicate each other (syncprov and syncrepl, serverIDs
1 and 2); two axpolicy front-ends each keep a replica, one synced from
each provider, with the other provider second in ``servers``.  A change on
either provider reaches both front-ends; a front-end whose provider dies
fails over to the other and keeps answering; a front-end that was down
applies, when it returns, what changed meanwhile; and the stored cookie
keeps one CSN per provider.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ldap3
import lmdb
import pytest

from tests.clients import SocketmapClient
from tests.conftest import ldap_map, seed_ldif
from tests.daemon import Axpolicy
from tests.slapd import PEOPLE, ROOT_DN, ROOT_PW, Slapd, free_port
from tests.test_replica import user_ldif

UIDS = itertools.count(1)


def eventually(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def holds(server: Slapd, uid: str) -> bool:
    with contextlib.suppress(ldap3.core.exceptions.LDAPException):
        conn = ldap3.Connection(ldap3.Server(server.url, connect_timeout=2), ROOT_DN, ROOT_PW, auto_bind=True)
        try:
            return bool(conn.search(PEOPLE, f"(uid={uid})", attributes=["1.1"]))
        finally:
            conn.unbind()
    return False


@pytest.fixture(scope="module")
def providers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Slapd, Slapd]]:
    ports = free_port(), free_port()
    urls = tuple(f"ldap://127.0.0.1:{port}" for port in ports)
    first = Slapd(tmp_path_factory.mktemp("provider1"), seed_ldif(), port=ports[0], server_id=1,
                  providers=(urls[1],), sessionlog=1000)
    second = Slapd(tmp_path_factory.mktemp("provider2"), "", port=ports[1], server_id=2,
                   providers=(urls[0],), sessionlog=1000)
    try:
        first.start()
        second.start()
        eventually(lambda: holds(second, "alice"), 60)     # the second provider copied the first
        yield first, second
    finally:
        first.destroy()
        second.destroy()


class Frontend:
    """One axpolicy front-end with a replica, synced from *servers* in order."""

    def __init__(self, workdir: Path, servers: list[Slapd]) -> None:
        self.state = workdir / "state"
        people = ldap_map(*servers, replica=True)
        self.config: dict[str, Any] = {
            "usermaps": {"people": people},
            "listen": [{"protocol": "socketmap", "address": f"inet:127.0.0.1:{free_port()}"}],
            "maps": {"transport": {"usermap": "people"}},
            "cache": {"ttl": 0, "negative_ttl": 0, "stale_if_error": 0, "max_entries": 0},
            "state_dir": str(self.state)}
        self.daemon = Axpolicy(workdir, self.config)

    def completed(self) -> int:
        """Refreshes and resumes so far (the log is kept across restarts)."""
        return self.daemon.log.count("replica ready") + self.daemon.log.count("replica resumed")

    def start(self) -> None:
        before = self.completed()
        self.daemon.start()
        eventually(lambda: self.completed() > before)

    def ask(self, address: str) -> bytes:
        client = SocketmapClient(self.daemon.address("socketmap"))
        try:
            return client.query("transport", address)
        finally:
            client.close()

    def csns(self) -> dict[str, str]:
        env = lmdb.open(str(self.state / "people.mdb"), subdir=False, max_dbs=8, readonly=True, lock=False)
        try:
            with env.begin() as txn:
                raw = txn.get(b"csns", b"{}", db=env.open_db(b"meta", txn=txn, create=False))
                return dict(json.loads(bytes(raw)))
        finally:
            env.close()


@pytest.fixture
def frontends(providers: tuple[Slapd, Slapd], tmp_path: Path) -> Iterator[tuple[Frontend, Frontend]]:
    first, second = providers
    pair = Frontend(tmp_path / "fe1", [first, second]), Frontend(tmp_path / "fe2", [second, first])
    try:
        for frontend in pair:
            frontend.start()
        yield pair
    finally:
        for frontend in pair:
            frontend.daemon.stop()
        for provider in providers:
            provider.restore()


def answers(frontends: tuple[Frontend, ...], address: str, expected: bytes) -> Callable[[], bool]:
    return lambda: all(frontend.ask(address) == expected for frontend in frontends)


def test_a_change_on_either_provider_reaches_both_front_ends(providers: tuple[Slapd, Slapd],
                                                             frontends: tuple[Frontend, Frontend]) -> None:
    first, second = providers
    uid = f"multi{next(UIDS)}"
    first.modify(user_ldif(uid, "127.0.0.2"))
    eventually(answers(frontends, f"{uid}@example.com", b"OK 127.0.0.2"))
    second.modify(f"dn: uid={uid},{PEOPLE}\nchangetype: modify\nreplace: mailHost\nmailHost: 127.0.0.3\n")
    eventually(answers(frontends, f"{uid}@example.com", b"OK 127.0.0.3"))
    second.modify(f"dn: uid={uid},{PEOPLE}\nchangetype: delete\n")
    eventually(answers(frontends, f"{uid}@example.com", b"NOTFOUND "))
    # Each stored cookie keeps the newest CSN of both providers, not just the last one's.
    for frontend in frontends:
        assert set(frontend.csns()) == {"001", "002"}


def test_a_front_end_whose_provider_dies_fails_over_and_keeps_answering(
        providers: tuple[Slapd, Slapd], frontends: tuple[Frontend, Frontend]) -> None:
    first, second = providers
    fe1, _ = frontends
    first.kill()
    # Its replica moves to the second provider and resumes there from the same cookie.
    eventually(lambda: "replica resumed" in fe1.daemon.log, 60)
    uid = f"multi{next(UIDS)}"
    second.modify(user_ldif(uid, "127.0.0.3"))
    eventually(answers(frontends, f"{uid}@example.com", b"OK 127.0.0.3"))
    assert fe1.ask("alice@example.com") == b"OK 127.0.0.2"


def test_changes_made_while_a_front_end_was_down_are_applied_when_it_returns(
        providers: tuple[Slapd, Slapd], frontends: tuple[Frontend, Frontend]) -> None:
    first, second = providers
    fe1, fe2 = frontends
    gone, moved = f"multi{next(UIDS)}", f"multi{next(UIDS)}"
    first.modify(user_ldif(gone, "127.0.0.2") + "\n" + user_ldif(moved, "127.0.0.2"))
    eventually(answers(frontends, f"{moved}@example.com", b"OK 127.0.0.2"))
    assert fe2.daemon.stop() == 0
    first.modify(f"dn: uid={gone},{PEOPLE}\nchangetype: delete\n")
    second.modify(f"dn: uid={moved},{PEOPLE}\nchangetype: modify\nreplace: mailHost\nmailHost: 127.0.0.3\n")
    eventually(answers((fe1,), f"{moved}@example.com", b"OK 127.0.0.3"))
    resumed = fe2.daemon.log.count("replica resumed")
    fe2.start()
    assert fe2.daemon.log.count("replica resumed") == resumed + 1
    assert fe2.ask(f"{gone}@example.com") == b"NOTFOUND "
    assert fe2.ask(f"{moved}@example.com") == b"OK 127.0.0.3"
