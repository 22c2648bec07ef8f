"""Resilience and security of the whole daemon: faults, overload, hostile clients, injection.

Everything here runs against ``axpolicy serve`` as a subprocess with real
slapd servers that are killed, restarted and paused while clients keep
asking.  No test asserts a wall-clock time; bounds are on counts.
"""

from __future__ import annotations

import os
import random
import resource
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clients import LineClient, SocketmapClient, rcpt_policy, readsocket
from tests.conftest import ldap_map
from tests.daemon import Axpolicy, connect
from tests.slapd import Slapd, free_port
from tests.vectors import NEVER_FOUND_KEYS, NON_UTF8_KEYS

MAPPED = {f"user{n}@example.com": ("127.0.0.2" if n % 2 else "127.0.0.3") for n in range(1, 21)}


def config(*servers: Slapd, cache: dict[str, Any] | None = None, **ldap: Any) -> dict[str, Any]:
    return {
        "usermaps": {"people": ldap_map(*servers, **{"timeout": 1, "failback_interval": 1, **ldap})},
        "domains": ["example.com", "example.net"],
        "recipient_delimiter": "+",
        "cache": cache or {"ttl": 0, "negative_ttl": 0, "stale_if_error": 0, "max_entries": 0},
        "listen": [
            {"protocol": "socketmap", "address": f"inet:127.0.0.1:{free_port()}"},
            {"protocol": "tcp_table", "address": f"inet:127.0.0.1:{free_port()}", "map": "transport"},
            {"protocol": "policy", "address": f"inet:127.0.0.1:{free_port()}"},
            {"protocol": "readsocket", "address": f"inet:127.0.0.1:{free_port()}"},
        ],
        "maps": {"transport": {"usermap": "people", "result": "relay:[%s]"},
                 "mailhost": {"usermap": "people", "result": "%s"}},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[Axpolicy] = []

    def make(cfg: dict[str, Any]) -> Axpolicy:
        server = Axpolicy(tmp_path / f"axpolicy-{len(servers)}", cfg)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        assert server.stop() == 0, server.log


def metrics(server: Axpolicy) -> str:
    with urllib.request.urlopen(f"http://{server.config['metrics']['listen']}/metrics", timeout=10) as response:
        return str(response.read().decode())


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Load:
    """Clients on persistent socketmap connections asking for mapped users until stopped."""

    def __init__(self, address: str, clients: int) -> None:
        self.address = address
        self.results: list[tuple[float, str, bytes]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        client = SocketmapClient(self.address)
        try:
            while not self._stop.is_set():
                address = rng.choice(list(MAPPED))
                try:
                    reply = client.query("mailhost", address)
                except OSError:
                    client = SocketmapClient(self.address)
                    continue
                with self._lock:
                    self.results.append((time.monotonic(), address, reply))
        finally:
            client.close()

    def snapshot(self) -> int:
        with self._lock:
            return len(self.results)


def test_failover_under_load_never_says_not_found(make_server: Any, slapd: Slapd, slapd2: Slapd) -> None:
    server = make_server(config(slapd, slapd2))
    with Load(server.address("socketmap"), clients=8) as load:
        time.sleep(1)
        killed_at = time.monotonic()
        slapd.kill()
        time.sleep(1.5)
        slapd.start()
        time.sleep(2.5)                       # failback_interval (1 s) has passed
        before_end = load.snapshot()
        time.sleep(1)
    results = load.results
    assert len(results) > 100
    wrong = [(a, r) for _, a, r in results if r not in (b"OK " + MAPPED[a].encode(), b"TEMP user map unavailable",
                                                         b"TEMP user map timeout")]
    assert wrong == []                        # never NOTFOUND, never a wrong host
    temps = [t for t, _, r in results if r.startswith(b"TEMP")]
    assert len(temps) <= 8 * 2                # at most a couple per connection, at the switch
    assert all(t >= killed_at for t in temps)
    # Traffic is back on the first server: its search counter grew at the end.
    text = metrics(server)
    first = [line for line in text.splitlines()
             if line.startswith("axpolicy_ldap_searches_total") and slapd.url in line]
    assert first and float(first[0].rsplit(" ", 1)[1]) > 0
    assert len(results) > before_end
    client = SocketmapClient(server.address("socketmap"))
    assert client.query("mailhost", "whoami@example.com") == b"OK 127.0.0.2"   # only the first has .2
    client.close()


@pytest.mark.parametrize("fault", ["stop", "pause"])
def test_directory_outage_serves_the_cache_and_fails_the_rest_fast(
        make_server: Any, slapd: Slapd, slapd2: Slapd, fault: str) -> None:
    cache = {"ttl": 0, "negative_ttl": 0, "stale_if_error": 3600, "max_entries": 1000}
    server = make_server(config(slapd, slapd2, cache=cache, timeout=0.5, pool_size=2, queue_size=8))
    client = SocketmapClient(server.address("socketmap"))
    assert client.query("mailhost", "user1@example.com") == b"OK 127.0.0.2"     # cached now
    assert client.query("mailhost", "nobody@example.com") == b"NOTFOUND "
    for directory in (slapd, slapd2):
        directory.stop() if fault == "stop" else directory.pause()
    try:
        assert client.query("mailhost", "user1@example.com") == b"OK 127.0.0.2"   # stale-if-error
        assert client.query("mailhost", "nobody@example.com") == b"NOTFOUND "
        assert client.query("mailhost", "user2@example.com").startswith(b"TEMP ")
        # A burst of uncached lookups: answered (TEMP), none left hanging.
        replies = _burst(server.address("socketmap"), [f"user{n}+{i}@example.com" for n in range(3, 21)
                                                       for i in range(5)])
        assert all(reply.startswith(b"TEMP ") for reply in replies), Counter(replies)
        rss_during = rss_kib(server.proc.pid)
    finally:
        for directory in (slapd, slapd2):
            directory.restore()
    # Recovery without restarting axpolicy.
    deadline = time.monotonic() + 30
    while client.query("mailhost", "user3@example.com") != b"OK 127.0.0.2":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    client.close()
    assert rss_during < 200 * 1024


def _burst(address: str, keys: list[str]) -> list[bytes]:
    replies: list[bytes] = []
    lock = threading.Lock()

    def ask(key: str) -> None:
        client = SocketmapClient(address)
        try:
            reply = client.query("mailhost", key)
        finally:
            client.close()
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=ask, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(replies) == len(keys)
    return replies


def test_overload_gives_fast_temporary_failures_not_a_queue(make_server: Any, slapd: Slapd) -> None:
    server = make_server(config(slapd, pool_size=1, queue_size=2, timeout=1))
    slapd.pause()
    try:
        replies = _burst(server.address("socketmap"), [f"user{n}@example.com" for n in range(1, 21)])
    finally:
        slapd.resume()
    counts = Counter(replies)
    assert counts[b"TEMP user map overloaded"] >= 15, counts
    assert all(reply.startswith(b"TEMP user map ") for reply in counts), counts
    assert "axpolicy_ldap_overloaded_total{usermap=\"people\"}" in metrics(server)


def test_at_the_connection_limit_idle_clients_make_room_and_busy_ones_do_not(
        make_server: Any, slapd: Slapd) -> None:
    cfg = config(slapd)
    cfg["listen"][2]["max_connections"] = 3          # policy
    server = make_server(cfg)
    address = server.address("policy")
    half = b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=user1@example.com\n"
    busy = [connect(address) for _ in range(3)]
    try:
        for sock in busy:
            sock.sendall(half)                       # a request half-read: busy
        time.sleep(0.3)
        late = connect(address)
        late.settimeout(10)
        assert late.recv(10) == b""                  # every connection busy: refused
        late.close()
        busy[0].sendall(b"\n")                       # finishes its request: idle once answered
        busy[0].settimeout(10)
        assert busy[0].recv(100) == b"action=OK\n\n"
        fresh = LineClient(address)                  # admitted: busy[0] makes room
        assert fresh.policy(rcpt_policy("user2@example.com")) == b"action=OK\n\n"
        fresh.close()
        assert busy[0].recv(10) == b""
        text = metrics(server)
        assert f'axpolicy_connections_refused_total{{listener="{address}",protocol="policy"}} 1.0' in text
        assert f'axpolicy_connections_evicted_total{{listener="{address}",protocol="policy"}} 1.0' in text
    finally:
        for sock in busy:
            sock.close()


def test_connection_limit_bounds_memory_and_others_are_still_served(
        make_server: Any, slapd: Slapd) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 5000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    cfg = config(slapd)
    cfg["listen"][2]["max_connections"] = 1500       # policy
    server = make_server(cfg)
    rss_before = rss_kib(server.proc.pid)
    sockets = []
    try:
        for _ in range(3000):
            sockets.append(connect(server.address("policy")))
        # Beyond the cap, each new connection costs the one idle the longest.
        for sock in sockets[:1500]:
            sock.settimeout(10)
            try:
                assert sock.recv(10) == b""
            except ConnectionError:
                pass
        # Half-open and slow clients among those left.
        for sock in sockets[1500:1600]:
            sock.sendall(b"request=smtpd_access_policy\nprotocol_state=RC")
        time.sleep(1)
        for sock in sockets[1500:]:
            sock.settimeout(0)
            with pytest.raises(BlockingIOError):
                sock.recv(10)                        # still open: nothing to read
        rss_loaded = rss_kib(server.proc.pid)
        policy = LineClient(server.address("tcp_table"))
        assert policy.tcp_get(b"user1@example.com") == b"200 relay:[127.0.0.2]\n"
        policy.close()
    finally:
        for sock in sockets:
            sock.close()
    assert rss_loaded - rss_before < 64 * 1024       # 1,500 open connections: well under 64 MiB
    after = LineClient(server.address("policy"))
    assert after.policy(rcpt_policy("user2@example.com")) == b"action=OK\n\n"
    after.close()
    # The connections are forgotten once closed: nothing accumulates.
    deadline = time.monotonic() + 30
    while True:
        line = next(x for x in metrics(server).splitlines()
                    if x.startswith("axpolicy_connections{") and server.address("policy") in x)
        if float(line.rsplit(" ", 1)[1]) == 0:
            break
        assert time.monotonic() < deadline, line
        time.sleep(0.1)
    assert "Traceback" not in server.log


def _expect_everywhere_not_found(server: Axpolicy, key: str | bytes) -> None:
    raw = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
    sockmap = SocketmapClient(server.address("socketmap"))
    assert sockmap.query("transport", raw) == b"NOTFOUND ", key
    sockmap.close()
    tcp = LineClient(server.address("tcp_table"))
    quoted = b"".join(bytes((b,)) if 0x21 <= b < 0x7F and b != 0x25 else b"%%%02X" % b for b in raw)
    assert tcp.tcp_get(quoted) == b"500 not%20found\n", key
    tcp.close()
    assert readsocket(server.address("readsocket"), b"mailhost " + raw.replace(b"\n", b" ")) in (
        b"NOTFOUND", b"PERM malformed request"), key
    if b"\n" not in raw:
        policy = LineClient(server.address("policy"))
        reply = policy.policy({**rcpt_policy(""), "recipient": raw.decode("utf-8", "surrogateescape")})
        assert reply == b"action=DUNNO\n\n", key
        policy.close()


@pytest.mark.parametrize("key", NEVER_FOUND_KEYS + NON_UTF8_KEYS,
                         ids=[repr(k)[:40] for k in NEVER_FOUND_KEYS + NON_UTF8_KEYS])
def test_tricks_and_injection_are_never_found_on_any_protocol(
        axpolicy_everything: Axpolicy, key: str | bytes) -> None:
    _expect_everywhere_not_found(axpolicy_everything, key)


@pytest.fixture(scope="module")
def axpolicy_everything(slapd_primary: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Axpolicy]:
    server = Axpolicy(tmp_path_factory.mktemp("everything"), config(slapd_primary))
    server.start()
    yield server
    assert server.stop() == 0, server.log


def test_the_vectors_own_mapped_users_are_found_on_every_protocol(axpolicy_everything: Axpolicy) -> None:
    """The same server answers real users, so the not-found results above are not an outage."""
    server = axpolicy_everything
    sockmap = SocketmapClient(server.address("socketmap"))
    assert sockmap.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"
    assert sockmap.query("transport", "st*r@example.com") == b"OK relay:[127.0.0.2]"
    sockmap.close()
    policy = LineClient(server.address("policy"))
    assert policy.policy(rcpt_policy("alice@example.com")) == b"action=OK\n\n"
    policy.close()
    assert readsocket(server.address("readsocket"), b"mailhost alice@example.com") == b"OK 127.0.0.2"


def test_disconnects_resets_and_garbage_under_load_cost_nothing(
        axpolicy_everything: Axpolicy) -> None:
    server = axpolicy_everything
    rng = random.Random(7)
    with Load(server.address("socketmap"), clients=4) as load:
        for _ in range(200):
            protocol = rng.choice(["socketmap", "tcp_table", "policy", "readsocket"])
            sock = connect(server.address(protocol))
            action = rng.randrange(4)
            if action == 0:
                sock.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
            elif action == 1:
                sock.sendall(b"27:mailhost alice@example.com,")
            elif action == 2:
                sock.sendall(b"get user1@example.com\n")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
    good = [r for _, a, r in load.results if r == b"OK " + MAPPED[a].encode()]
    assert len(good) == len(load.results) > 0
    assert "Traceback" not in server.log
    assert os.path.exists(f"/proc/{server.proc.pid}")
