"""SMTP AUTH through the Dovecot auth protocol, against a real slapd.

The client here speaks the protocol as Postfix's smtpd does (one
persistent connection, increasing request ids, the handshake first);
tests/test_postfix_auth.py drives the same listener through a real
Postfix with swaks.  Every outcome: OK with the canonical login, FAIL for
every kind of wrong input alike, and a closed connection (Postfix's 454)
when the directory cannot answer.
"""

from __future__ import annotations

import base64
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ldap_map
from tests.daemon import Axpolicy, connect
from tests.slapd import Slapd, free_port

ALICE, ALICE_PW = "alice@example.com", "alice-Pa55word"


def auth_config(slapd: Slapd, **auth: Any) -> dict[str, Any]:
    return {
        "usermaps": {"people": ldap_map(slapd, timeout=1)},
        "auth": {"usermap": "people", "failure_delay": 0.1, "max_failures": 3, "failure_window": 600,
                 "cache_ttl": 60, **auth},
        "listen": [{"protocol": "dovecot_auth", "address": f"inet:127.0.0.1:{free_port()}"}],
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }


@pytest.fixture
def server(slapd: Slapd, tmp_path: Any) -> Iterator[Axpolicy]:
    daemon = Axpolicy(tmp_path, auth_config(slapd))
    daemon.start()
    yield daemon
    assert daemon.stop() == 0, daemon.log


class AuthClient:
    """Postfix's side of the protocol: handshake, then AUTH/CONT lines with increasing ids."""

    def __init__(self, address: str) -> None:
        self.sock = connect(address)
        self.file = self.sock.makefile("rb")
        self.next_id = 1
        self.greeting = []
        while (line := self.readline()) != "DONE":
            self.greeting.append(line)
        self.sock.sendall(b"VERSION\t1\t0\nCPID\t4242\n")

    def readline(self) -> str:
        line = self.file.readline()
        if not line:
            raise ConnectionError("closed by the server")
        return line.decode().rstrip("\n")

    def send(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        return self.readline()

    def auth(self, mech: str, initial: bytes | None = None, rip: str = "192.0.2.7") -> tuple[int, str]:
        request_id = self.next_id
        self.next_id += 1
        line = f"AUTH\t{request_id}\t{mech}\tservice=smtp\tnologin\tlip=127.0.0.1\trip={rip}"
        if initial is not None:
            line += "\tresp=" + (base64.b64encode(initial).decode() or "=")
        return request_id, self.send(line)

    def cont(self, request_id: int, data: bytes) -> str:
        return self.send(f"CONT\t{request_id}\t{base64.b64encode(data).decode()}")

    def plain(self, login: str, password: str, authzid: str = "", rip: str = "192.0.2.7") -> str:
        return self.auth("PLAIN", f"{authzid}\0{login}\0{password}".encode(), rip)[1]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def searches(server: Axpolicy) -> float:
    with urllib.request.urlopen(f"http://{server.config['metrics']['listen']}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("axpolicy_ldap_searches_total"))


def test_the_handshake_comes_first_with_mechanisms_before_spid(server: Axpolicy) -> None:
    client = AuthClient(server.address("dovecot_auth"))
    kinds = [line.split("\t")[0] for line in client.greeting]
    assert client.greeting[0] == "VERSION\t1\t2"
    assert client.greeting[1:3] == ["MECH\tPLAIN\tplaintext", "MECH\tLOGIN\tplaintext"]
    assert kinds[3:] == ["SPID", "CUID", "COOKIE"]
    client.close()


def test_plain_and_login_with_and_without_initial_response(server: Axpolicy) -> None:
    client = AuthClient(server.address("dovecot_auth"))
    assert client.plain("Alice@Example.com", ALICE_PW) == f"OK\t1\tuser={ALICE}"       # canonical login
    request_id, reply = client.auth("PLAIN")
    assert reply == f"CONT\t{request_id}\t"                                             # empty challenge
    assert client.cont(request_id, f"\0{ALICE}\0{ALICE_PW}".encode()) == f"OK\t{request_id}\tuser={ALICE}"
    request_id, reply = client.auth("LOGIN")
    assert reply == f"CONT\t{request_id}\tVXNlcm5hbWU6"                                 # "Username:"
    assert client.cont(request_id, b"bob@example.com") == f"CONT\t{request_id}\tUGFzc3dvcmQ6"
    assert client.cont(request_id, b"bob-Pa55word") == f"OK\t{request_id}\tuser=bob@example.com"
    request_id, reply = client.auth("LOGIN", b"bob@example.com")                      # username up front
    assert reply == f"CONT\t{request_id}\tUGFzc3dvcmQ6"
    assert client.cont(request_id, b"bob-Pa55word") == f"OK\t{request_id}\tuser=bob@example.com"
    client.close()


@pytest.mark.parametrize(("login", "password", "authzid"), [
    (ALICE, "wrong-password", ""),
    ("nobody@example.com", ALICE_PW, ""),                 # unknown login
    (ALICE, "", ""),                                       # empty password: an unauthenticated bind "succeeds"
    (ALICE, ALICE_PW, "bob@example.com"),                 # authzid differs from authcid
    ("*", ALICE_PW, ""),                                   # filter metacharacters
    ("alice@example.com)(mail=*", ALICE_PW, ""),
    ("alice@example.com\x01", ALICE_PW, ""),               # control character
    (ALICE, ALICE_PW + "\x00x", ""),                       # NUL: not PLAIN's three fields
])
def test_every_failure_gets_the_same_answer(server: Axpolicy, login: str, password: str, authzid: str) -> None:
    client = AuthClient(server.address("dovecot_auth"))
    assert client.plain(login, password, authzid, rip="192.0.2.50") == "FAIL\t1"
    assert client.plain(ALICE, ALICE_PW, rip="192.0.2.51") == f"OK\t2\tuser={ALICE}"   # still serving
    client.close()


def test_an_ambiguous_login_is_a_temporary_failure_never_a_guess(server: Axpolicy) -> None:
    client = AuthClient(server.address("dovecot_auth"))
    with pytest.raises(ConnectionError):                   # closed: Postfix answers 454 4.7.0
        client.plain("twin@example.com", "whatever")
    client.close()


@pytest.mark.parametrize("outage", ["stop", "pause"])
def test_a_directory_that_cannot_answer_closes_the_connection(
        server: Axpolicy, slapd: Slapd, outage: str) -> None:
    client = AuthClient(server.address("dovecot_auth"))
    getattr(slapd, outage)()
    with pytest.raises(ConnectionError):
        client.plain("bob@example.com", "bob-Pa55word")
    client.close()
    slapd.restore()
    again = AuthClient(server.address("dovecot_auth"))
    assert again.plain("bob@example.com", "bob-Pa55word") == "OK\t1\tuser=bob@example.com"
    again.close()


def test_a_verified_pair_is_cached_and_a_failure_drops_it(server: Axpolicy, slapd: Slapd) -> None:
    client = AuthClient(server.address("dovecot_auth"))
    assert client.plain(ALICE, ALICE_PW) == f"OK\t1\tuser={ALICE}"
    before = searches(server)
    assert client.plain(ALICE, ALICE_PW) == f"OK\t2\tuser={ALICE}"
    assert searches(server) == before                      # from the cache
    assert client.plain(ALICE, "wrong-password") == "FAIL\t3"
    assert client.plain(ALICE, ALICE_PW) == f"OK\t4\tuser={ALICE}"
    assert searches(server) > before + 1                   # asked again after the failure
    client.close()


def test_a_client_with_too_many_failures_is_refused_without_asking_the_directory(server: Axpolicy) -> None:
    client = AuthClient(server.address("dovecot_auth"))
    for _ in range(3):
        assert client.plain(ALICE, "guess", rip="198.51.100.9").startswith("FAIL")
    before = searches(server)
    assert client.plain(ALICE, ALICE_PW, rip="198.51.100.9").startswith("FAIL")    # even the right one
    assert searches(server) == before
    assert client.plain("bob@example.com", "bob-Pa55word", rip="198.51.100.10").startswith("OK")  # others not
    client.close()


def test_one_password_sprayed_over_many_logins_is_refused_without_asking_the_directory(
        server: Axpolicy) -> None:
    client = AuthClient(server.address("dovecot_auth"))
    for n, login in enumerate(["alice@example.com", "bob@example.com", "user1@example.com"]):
        assert client.plain(login, "Summer2026!", rip=f"203.0.113.{n}").startswith("FAIL")
    before = searches(server)
    assert client.plain("user2@example.com", "Summer2026!", rip="203.0.113.99").startswith("FAIL")
    assert searches(server) == before
    client.close()


def test_outcomes_are_counted(server: Axpolicy, slapd: Slapd) -> None:
    client = AuthClient(server.address("dovecot_auth"))
    client.plain(ALICE, ALICE_PW)
    client.plain(ALICE, "wrong")
    slapd.stop()
    with pytest.raises(ConnectionError):
        client.plain("bob@example.com", "bob-Pa55word")
    client.close()
    with urllib.request.urlopen(f"http://{server.config['metrics']['listen']}/metrics", timeout=10) as response:
        text = response.read().decode()
    for outcome in ("ok", "fail", "temp"):
        assert f'axpolicy_auth_total{{outcome="{outcome}"}} 1.0' in text


def test_passwords_never_reach_the_log(server: Axpolicy) -> None:
    client = AuthClient(server.address("dovecot_auth"))
    client.plain(ALICE, ALICE_PW)
    client.plain(ALICE, "Wrong-Secret-xyzzy")
    request_id, _ = client.auth("LOGIN")
    client.cont(request_id, ALICE.encode())
    client.cont(request_id, b"Another-Secret-plugh")
    client.close()
    server.stop()
    for secret in (ALICE_PW, "xyzzy", "plugh", base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()):
        assert secret not in server.log


def test_garbage_closes_only_that_connection(server: Axpolicy) -> None:
    bad = AuthClient(server.address("dovecot_auth"))
    with pytest.raises(ConnectionError):
        bad.send("HELLO\tthere")
    bad.close()
    raw = connect(server.address("dovecot_auth"))
    raw.sendall(b"x" * 20000)
    raw.settimeout(10)
    while raw.recv(65536):
        pass                                               # the greeting, then closed
    raw.close()
    good = AuthClient(server.address("dovecot_auth"))
    assert good.plain(ALICE, ALICE_PW) == f"OK\t1\tuser={ALICE}"
    good.close()
