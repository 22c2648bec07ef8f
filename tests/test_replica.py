"""The replica (``replica: true``): answers from memory, exactly what a search would say, only while healthy.

A real slapd with the syncprov overlay feeds it (RFC 4533); a second one
without syncprov shows the fallback.  The replica must give the same
answer as a per-key search for every key, follow changes, and never
answer from memory when it cannot know that memory is current: then
the map searches, and a directory that is down means TEMP, never
NOTFOUND.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from axpolicy import config
from axpolicy.ldapmap import LdapUserMap
from axpolicy.result import NOTFOUND, LookupResult, Status
from tests.clients import SocketmapClient
from tests.conftest import ldap_map, own_slapd, postmap, run
from tests.daemon import Axpolicy
from tests.slapd import PEOPLE, Slapd, free_port

KEYS = [
    "alice@example.com", "alice.smith@example.com", "asmith@example.net", "bob@example.com",
    "frank.miller@example.com", "jose@xn--bcher-kva.example", "plus+tag@example.com", "st*r@example.com",
    "shared@example.com", "twin@example.com", "badhost@example.com", "7@example.com", "user20@example.com",
    "@example.org", "@example.com", "nobody@example.com", "alice@example.co", "*@example.com",
    "whoami@example.com", "user21@example.com", "dave@example.com", "erin@example.com", "carol@example.net",
    "oscar@example.com", "Alice@Example.com", "zonebreak@example.com", "zonehop@example.com", "six@example.com",
    "a\u017fmith@example.net", "fran\u212a.miller@example.com",
]


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """A directory of its own: these tests add, change and delete entries."""
    yield from own_slapd(tmp_path_factory, "slapd-replica")


@pytest.fixture
def slapd_r(directory: Slapd) -> Iterator[Slapd]:
    yield directory
    directory.restore()


@pytest.fixture(scope="module")
def no_syncprov(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    yield from own_slapd(tmp_path_factory, "slapd-nosync", syncprov=False)


def make_map(*servers: Slapd, state_dir: Path | None = None, **overrides: Any) -> LdapUserMap:
    """A replicated map; its store in *state_dir* (default: a new, empty one)."""
    raw = {"usermaps": {"people": ldap_map(*servers, **{"replica": True, **overrides})},
           "state_dir": str(state_dir or tempfile.mkdtemp(prefix="axpolicy-state-"))}
    cfg = config.parse(raw, "/tmp/axpolicy-test.yml").usermaps["people"]
    assert isinstance(cfg, config.LdapMapConfig)
    return LdapUserMap(cfg)


async def eventually(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    """Wait for *condition*; generous, because tests never assert timings."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


def ready(usermap: LdapUserMap) -> Callable[[], bool]:
    return lambda: usermap.replica is not None and usermap.replica.ready


def user_ldif(uid: str, host: str, *extra: str) -> str:
    lines = [f"dn: uid={uid},{PEOPLE}", "changetype: add", "objectClass: inetOrgPerson",
             "objectClass: inetLocalMailRecipient", "objectClass: mailAlternateRecipient", f"uid: {uid}",
             f"cn: {uid}", f"sn: {uid}", f"mail: {uid}@example.com", f"mailHost: {host}", *extra]
    return "\n".join(lines) + "\n"


def test_replica_gives_the_same_answer_as_a_search_for_every_key(slapd_r: Slapd) -> None:
    async def go() -> tuple[list[LookupResult], list[LookupResult | None]]:
        searched = make_map(slapd_r, replica=False)
        replicated = make_map(slapd_r)
        try:
            expected = [await searched.lookup(key) for key in KEYS]
            replicated.start()
            await eventually(ready(replicated))
            assert not replicated.cached      # memory is current: no cache needed
            return expected, [replicated.lookup_now(key) for key in KEYS]
        finally:
            await searched.close()
            await replicated.close()

    expected, answered = run(go())
    assert answered == expected
    assert {r.status for r in expected} == {Status.FOUND, Status.NOTFOUND, Status.TEMP}


def test_before_its_refresh_completes_the_map_searches(slapd_r: Slapd) -> None:
    async def go() -> tuple[LookupResult | None, bool, LookupResult]:
        usermap = make_map(slapd_r)
        try:
            # Not started: nothing in memory, so no answer without I/O, and
            # the router's cache applies.
            return usermap.lookup_now("alice@example.com"), usermap.cached, await usermap.lookup("bob@example.com")
        finally:
            await usermap.close()

    now, cached, searched = run(go())
    assert (now, cached) == (None, True)
    assert (searched.status, searched.value) == (Status.FOUND, "127.0.0.3")


def test_replica_follows_adds_changes_and_deletes(slapd_r: Slapd) -> None:
    def host_of(usermap: LdapUserMap, key: str) -> Callable[[], bool]:
        return lambda: (usermap.lookup_now(key) or NOTFOUND).value == expected[key]

    expected: dict[str, str] = {}

    async def go() -> None:
        usermap = make_map(slapd_r)
        usermap.start()
        try:
            await eventually(ready(usermap))
            assert usermap.lookup_now("newbie@example.com") == NOTFOUND
            slapd_r.modify(user_ldif("newbie", "127.0.0.2", "mailAlternateAddress: nbz@example.com"))
            expected.update({"newbie@example.com": "127.0.0.2", "nbz@example.com": "127.0.0.2"})
            await eventually(host_of(usermap, "newbie@example.com"))
            await eventually(host_of(usermap, "nbz@example.com"))
            slapd_r.modify(f"dn: uid=newbie,{PEOPLE}\nchangetype: modify\nreplace: mailHost\nmailHost: 127.0.0.3\n"
                           "-\ndelete: mailAlternateAddress\n")
            expected.update({"newbie@example.com": "127.0.0.3", "nbz@example.com": ""})
            await eventually(host_of(usermap, "newbie@example.com"))
            await eventually(lambda: usermap.lookup_now("nbz@example.com") == NOTFOUND)
            # A second entry claiming the same address makes it ambiguous.
            slapd_r.modify(user_ldif("newbie2", "127.0.0.2", "mailAlternateAddress: newbie@example.com"))
            await eventually(lambda: (usermap.lookup_now("newbie@example.com") or NOTFOUND).status is Status.TEMP)
            slapd_r.modify(f"dn: uid=newbie2,{PEOPLE}\nchangetype: delete\n")
            slapd_r.modify(f"dn: uid=newbie,{PEOPLE}\nchangetype: delete\n")
            await eventually(lambda: usermap.lookup_now("newbie@example.com") == NOTFOUND)
            await eventually(lambda: usermap.lookup_now("newbie2@example.com") == NOTFOUND)
            assert usermap.replica is not None and usermap.replica.updates >= 5
        finally:
            await usermap.close()

    run(go())


def test_directory_down_means_searches_and_temp_never_notfound(slapd_r: Slapd) -> None:
    async def go() -> list[LookupResult | None]:
        usermap = make_map(slapd_r)
        usermap.start()
        try:
            await eventually(ready(usermap))
            slapd_r.kill()
            await eventually(lambda: not ready(usermap)())
            answers: list[LookupResult | None] = [usermap.lookup_now("nobody@example.com")]
            answers.append(await usermap.lookup("nobody@example.com"))
            answers.append(await usermap.lookup("alice@example.com"))
            slapd_r.start()
            await eventually(ready(usermap))   # and it comes back by itself
            answers.append(usermap.lookup_now("alice@example.com"))
            return answers
        finally:
            await usermap.close()

    now, unknown, known, back = run(go())
    assert now is None
    assert unknown.status is Status.TEMP and known.status is Status.TEMP
    assert back is not None and back.value == "127.0.0.2"


def test_a_hung_directory_is_noticed_by_the_liveness_probe(slapd_r: Slapd) -> None:
    async def go() -> LookupResult:
        usermap = make_map(slapd_r)
        usermap.start()
        try:
            await eventually(ready(usermap))
            slapd_r.pause()
            await eventually(lambda: not ready(usermap)())
            return await usermap.lookup("nobody@example.com")
        finally:
            slapd_r.resume()
            await usermap.close()

    assert run(go()).status is Status.TEMP


def test_replica_fails_over_to_the_next_server(slapd_r: Slapd, slapd2: Slapd) -> None:
    async def go() -> LookupResult | None:
        usermap = make_map(slapd_r, slapd2)
        usermap.start()
        try:
            await eventually(ready(usermap))
            assert usermap.lookup_now("whoami@example.com") == (await usermap.lookup("whoami@example.com"))
            slapd_r.kill()
            await eventually(lambda: (usermap.lookup_now("whoami@example.com") or NOTFOUND).value == "127.0.0.3")
            return usermap.lookup_now("alice@example.com")
        finally:
            await usermap.close()

    answer = run(go())
    assert answer is not None and answer.value == "127.0.0.2"


@pytest.mark.parametrize("tls", ["ldaps", "start_tls"])
def test_replica_over_tls(slapd_tls: Slapd, tls: str) -> None:
    settings: dict[str, Any] = {"ca_file": str(slapd_tls.ca_file)}
    if tls == "ldaps":
        settings["servers"] = [slapd_tls.ldaps_url]
    else:
        settings["start_tls"] = True

    async def go() -> LookupResult | None:
        usermap = make_map(slapd_tls, **settings)
        usermap.start()
        try:
            await eventually(ready(usermap))
            return usermap.lookup_now("bob@example.com")
        finally:
            await usermap.close()

    answer = run(go())
    assert answer is not None and answer.value == "127.0.0.3"


def test_a_server_without_syncprov_is_searched_per_key(no_syncprov: Slapd, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> tuple[LookupResult, LookupResult, bool]:
        usermap = make_map(no_syncprov)
        usermap.start()
        try:
            await eventually(lambda: "syncprov" in caplog.text)
            return (await usermap.lookup("alice@example.com"), await usermap.lookup("nobody@example.com"),
                    usermap.cached)
        finally:
            await usermap.close()

    alice, nobody, cached = run(go())
    assert (alice.value, nobody, cached) == ("127.0.0.2", NOTFOUND, True)


def test_replica_needs_a_filter_it_can_evaluate() -> None:
    raw = {"usermaps": {"people": {"type": "ldap", "servers": ["ldap://127.0.0.1:1"], "base": PEOPLE,
                                   "filter": "(uid=%u)", "replica": True}}}
    with pytest.raises(config.ConfigError, match=r"^usermaps\.people\.replica: the filter cannot be replicated"):
        config.parse(raw, "/tmp/x.yml")
    raw["usermaps"]["people"]["filter"] = "(&(objectClass=inetOrgPerson)(|(mail=%s)(mailAlternateAddress=%s)))"
    assert config.parse(raw, "/tmp/x.yml").usermaps["people"]


def test_through_postfix_found_notfound_temp_and_a_new_user(
        slapd_r: Slapd, postmap_dir: Path, tmp_path: Path) -> None:
    metrics_port = free_port()
    server = Axpolicy(tmp_path / "axpolicy", {
        "usermaps": {"people": ldap_map(slapd_r, replica=True)},
        "listen": [{"protocol": "socketmap", "address": f"inet:127.0.0.1:{free_port()}"}],
        "maps": {"transport": {"usermap": "people", "result": "relay:[%s]"}},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "state_dir": str(tmp_path / "state"),
    })
    server.start()

    def metrics() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    table = f"socketmap:{server.address('socketmap')}:transport"
    try:
        deadline = time.monotonic() + 20
        while "replica ready" not in server.log and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "replica ready" in server.log
        assert 'axpolicy_replica_ready{usermap="people"} 1.0' in metrics()
        # Asked again and again: replayed (axpolicy/replay.py) -- and yet
        # every change below shows, and nothing outlives the session.
        for _ in range(3):
            assert postmap(postmap_dir, table, "alice@example.com").stdout == "relay:[127.0.0.2]\n"
            assert postmap(postmap_dir, table, "quentin@example.com").returncode == 1
        slapd_r.modify(user_ldif("quentin", "127.0.0.3"))
        while postmap(postmap_dir, table, "quentin@example.com").stdout != "relay:[127.0.0.3]\n":
            assert time.monotonic() < deadline + 20
            time.sleep(0.05)
        slapd_r.modify(f"dn: uid=quentin,{PEOPLE}\nchangetype: delete\n")
        slapd_r.kill()
        while 'axpolicy_replica_ready{usermap="people"} 0.0' not in metrics():
            assert time.monotonic() < deadline + 40
            time.sleep(0.05)
        for key in ("nobody@example.com", "alice@example.com"):
            proc = postmap(postmap_dir, table, key)
            assert (proc.returncode, proc.stdout) == (1, ""), key
            assert "socketmap server temporary error" in proc.stderr
    finally:
        assert server.stop() == 0, server.log


def test_a_reload_that_changes_the_map_starts_a_new_replica_and_keeps_answering(
        slapd_r: Slapd, tmp_path: Path) -> None:
    config: dict[str, Any] = {
        "usermaps": {"people": ldap_map(slapd_r, replica=True)},
        "listen": [{"protocol": "socketmap", "address": f"inet:127.0.0.1:{free_port()}"}],
        "maps": {"transport": {"usermap": "people", "result": "relay:[%s]"}},
        "state_dir": str(tmp_path / "state"),
    }
    server = Axpolicy(tmp_path / "axpolicy", config)
    server.start()
    try:
        deadline = time.monotonic() + 20
        while server.log.count("replica ready") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.write_config({**config, "usermaps": {"people": ldap_map(slapd_r, replica=True, timeout=2)}})
        server.signal(signal.SIGHUP)
        # The new replica takes over the old one's store and resumes from its cookie.
        while server.log.count("replica resumed") < 1:
            assert time.monotonic() < deadline + 20
            time.sleep(0.05)
        client = SocketmapClient(server.address("socketmap"))
        assert client.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"
        assert client.query("transport", "nobody@example.com") == b"NOTFOUND "
        client.close()
    finally:
        assert server.stop() == 0, server.log
    assert "Traceback" not in server.log
