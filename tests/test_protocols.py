"""The listeners as Postfix and Exim see them: every outcome in each protocol's own words.

The Postfix tables are also read with ``postmap -q``, Postfix's own client,
so a codec bug on our side cannot cancel itself out in our test client.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clients import LineClient, SocketmapClient, rcpt_policy, readsocket
from tests.conftest import ldap_map, postmap
from tests.daemon import Axpolicy, connect
from tests.slapd import Slapd, free_port

IDLE = 2.0


def listeners(tmp: Path) -> list[dict[str, Any]]:
    return [
        {"protocol": "policy", "address": f"inet:127.0.0.1:{free_port()}", "idle_timeout": IDLE},
        {"protocol": "socketmap", "address": f"inet:127.0.0.1:{free_port()}", "idle_timeout": IDLE},
        {"protocol": "socketmap", "address": f"unix:{tmp}/socketmap.sock", "mode": "0666"},
        {"protocol": "tcp_table", "address": f"inet:127.0.0.1:{free_port()}", "map": "transport",
         "idle_timeout": IDLE},
        {"protocol": "readsocket", "address": f"inet:127.0.0.1:{free_port()}", "idle_timeout": IDLE},
        {"protocol": "socketmap", "address": f"inet:[::1]:{free_port()}"},
    ]


@pytest.fixture(scope="module")
def axpolicy(slapd_primary: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Axpolicy]:
    tmp = tmp_path_factory.mktemp("axpolicy-protocols")
    config = {
        "usermaps": {"people": ldap_map(slapd_primary, timeout=1)},
        "domains": ["example.com", "example.net", "bücher.example"],
        "recipient_delimiter": "+",
        # No cache: a stopped slapd must show as a temporary failure at once.
        "cache": {"ttl": 0, "negative_ttl": 0, "stale_if_error": 0, "max_entries": 0},
        "listen": listeners(tmp),
        "maps": {
            "transport": {"usermap": "people", "result": "relay:[%s]"},
            "mailhost": {"usermap": "people", "result": "%s"},
            "recipient": {"usermap": "people", "result": "OK"},
            "domain": {"type": "domain", "result": "OK"},
            "spaced": {"usermap": "people", "result": "a value with spaces%%"},
        },
        "policy": {"usermap": "people"},
    }
    server = Axpolicy(tmp, config)
    server.start()
    yield server
    assert server.stop() == 0, server.log


def assert_still_serving(axpolicy: Axpolicy) -> None:
    """Whatever happened before, a new client is answered correctly on every protocol."""
    client = SocketmapClient(axpolicy.address("socketmap"))
    assert client.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"
    client.close()
    line = LineClient(axpolicy.address("tcp_table"))
    assert line.tcp_get(b"bob@example.com") == b"200 relay:[127.0.0.3]\n"
    line.close()
    policy = LineClient(axpolicy.address("policy"))
    assert policy.policy(rcpt_policy("alice@example.com")) == b"action=OK\n\n"
    policy.close()
    assert readsocket(axpolicy.address("readsocket"), b"mailhost alice@example.com") == b"OK 127.0.0.2"


# --------------------------------------------------------------------------
# socketmap


@pytest.mark.parametrize(("name", "key", "reply"), [
    ("transport", "alice@example.com", b"OK relay:[127.0.0.2]"),
    ("transport", "Alice+Lists@EXAMPLE.com", b"OK relay:[127.0.0.2]"),
    ("mailhost", "jose@bücher.example", b"OK 127.0.0.3"),
    ("recipient", "bob@example.com", b"OK OK"),
    ("domain", "Example.NET", b"OK OK"),
    ("spaced", "bob@example.com", b"OK a value with spaces%"),
    ("transport", "nobody@example.com", b"NOTFOUND "),
    ("transport", "alice@example.org", b"NOTFOUND "),          # outside domains
    ("transport", "*", b"NOTFOUND "),                          # Postfix's wildcard probe
    ("transport", "alice%evil.example@example.com", b"NOTFOUND "),
    ("transport", '"alice@evil"@example.com', b"NOTFOUND "),
    ("transport", "", b"NOTFOUND "),
    ("domain", "elsewhere.example", b"NOTFOUND "),
    ("transport", "twin@example.com", b"TEMP user map entry is ambiguous"),
    ("nosuchmap", "alice@example.com", b"PERM unknown map name"),
])
def test_socketmap_answers(axpolicy: Axpolicy, name: str, key: str, reply: bytes) -> None:
    client = SocketmapClient(axpolicy.address("socketmap"))
    assert client.query(name, key) == reply
    client.close()


def test_socketmap_over_unix_and_ipv6(axpolicy: Axpolicy) -> None:
    for address in (axpolicy.address("socketmap", 1), axpolicy.address("socketmap", 2)):
        client = SocketmapClient(address)
        assert client.query("transport", "bob@example.com") == b"OK relay:[127.0.0.3]"
        client.close()


def test_socketmap_key_that_is_not_utf8_is_not_found(axpolicy: Axpolicy) -> None:
    client = SocketmapClient(axpolicy.address("socketmap"))
    assert client.query("transport", b"al\xffce@example.com") == b"NOTFOUND "
    client.close()


def test_socketmap_directory_down_is_temp(axpolicy: Axpolicy, slapd: Slapd) -> None:
    slapd.stop()
    client = SocketmapClient(axpolicy.address("socketmap"))
    assert client.query("transport", "alice@example.com") == b"TEMP user map unavailable"
    assert client.query("transport", "*") == b"NOTFOUND "      # no directory needed
    assert client.query("domain", "example.com") == b"OK OK"
    client.close()


@pytest.mark.parametrize(("key", "stdout"), [
    ("alice@example.com", "relay:[127.0.0.2]\n"),
    ("Bob+Tag@Example.Com", "relay:[127.0.0.3]\n"),
])
def test_postmap_socketmap_found(axpolicy: Axpolicy, postmap_dir: Path, key: str, stdout: str) -> None:
    proc = postmap(postmap_dir, f"socketmap:{axpolicy.address('socketmap')}:transport", key)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, stdout, "")


def test_postmap_socketmap_not_found_is_silent(axpolicy: Axpolicy, postmap_dir: Path) -> None:
    proc = postmap(postmap_dir, f"socketmap:{axpolicy.address('socketmap')}:transport", "nobody@example.com")
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "")


def test_postmap_socketmap_temp_is_a_temporary_error(
        axpolicy: Axpolicy, postmap_dir: Path, slapd: Slapd) -> None:
    slapd.stop()
    proc = postmap(postmap_dir, f"socketmap:{axpolicy.address('socketmap')}:transport", "alice@example.com")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert "socketmap server temporary error: user map unavailable" in proc.stderr


def test_postmap_socketmap_unknown_map_is_a_permanent_error(axpolicy: Axpolicy, postmap_dir: Path) -> None:
    proc = postmap(postmap_dir, f"socketmap:{axpolicy.address('socketmap')}:nosuchmap", "alice@example.com")
    assert proc.returncode == 1
    assert "socketmap server permanent error: unknown map name" in proc.stderr


def test_postmap_socketmap_over_a_unix_socket_and_many_keys(axpolicy: Axpolicy, postmap_dir: Path) -> None:
    proc = postmap(postmap_dir, f"socketmap:{axpolicy.address('socketmap', 1)}:mailhost",
                   "alice@example.com", "nobody@example.com", "user4@example.com", "carol@example.net")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "alice@example.com\t127.0.0.2\nuser4@example.com\t127.0.0.3\ncarol@example.net\t127.0.0.3\n"


def test_socketmap_replies_keep_request_order_and_do_not_wait_for_other_clients(
        axpolicy: Axpolicy, slapd: Slapd) -> None:
    """A hung directory delays only the requests that need it, never another client."""
    slow = SocketmapClient(axpolicy.address("socketmap"))
    slapd.pause()
    # Pipelined on one connection: a directory lookup, then one that needs none.
    slow.send("transport", "alice@example.com")
    slow.send("domain", "example.com")
    other = SocketmapClient(axpolicy.address("socketmap"))
    assert other.query("domain", "example.net") == b"OK OK"     # answered while the first waits
    assert slow.read() == b"TEMP user map timeout"
    assert slow.read() == b"OK OK"
    slow.close()
    other.close()


def ns(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


@pytest.mark.parametrize(("garbage", "reply"), [
    (b"99999999:", ns(b"PERM request too large")),
    (b"20000:" + b"x" * 100, ns(b"PERM request too large")),
    (b"abc:def,", ns(b"PERM malformed netstring")),
    (b"5:hello;", ns(b"PERM malformed netstring")),
    (b"\x00\xff\xfe\x80garbage", ns(b"PERM malformed netstring")),
    (b"10:nospacekey,", ns(b"PERM malformed request")),
])
def test_socketmap_bad_frames_get_perm_and_close(axpolicy: Axpolicy, garbage: bytes, reply: bytes) -> None:
    sock = connect(axpolicy.address("socketmap"))
    sock.sendall(garbage)
    data = b""
    sock.settimeout(10)
    while reply not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data.startswith(reply), data
    if b"malformed request" not in reply:
        assert sock.recv(4096) == b""     # closed after the reply
    sock.close()
    assert_still_serving(axpolicy)


# --------------------------------------------------------------------------
# tcp_table


@pytest.mark.parametrize(("request_line", "reply"), [
    (b"get alice@example.com", b"200 relay:[127.0.0.2]\n"),
    (b"get Bob%2BX@Example.COM", b"200 relay:[127.0.0.3]\n"),       # %XX decoding
    (b"get jose@b%C3%BCcher.example", b"200 relay:[127.0.0.3]\n"),
    (b"get nobody@example.com", b"500 not%20found\n"),
    (b"get *", b"500 not%20found\n"),
    (b"get alice%25evil@example.com", b"500 not%20found\n"),        # a real '%' in the key
    (b"get twin@example.com", b"400 user%20map%20entry%20is%20ambiguous\n"),
    (b"put alice@example.com x", b"400 unsupported%20request\n"),
    (b"GET alice@example.com", b"400 unsupported%20request\n"),
    (b"get alice%zz@example.com", b"400 malformed%20key\n"),
    (b"get al%FFce@example.com", b"500 not%20found\n"),              # not UTF-8
    (b"get alice@example.com\r", b"200 relay:[127.0.0.2]\n"),        # CR tolerated, never echoed
])
def test_tcp_table_answers(axpolicy: Axpolicy, request_line: bytes, reply: bytes) -> None:
    client = LineClient(axpolicy.address("tcp_table"))
    client.send(request_line + b"\n")
    assert client.readline() == reply
    client.close()


def test_tcp_table_directory_down_is_400(axpolicy: Axpolicy, slapd: Slapd) -> None:
    slapd.stop()
    client = LineClient(axpolicy.address("tcp_table"))
    assert client.tcp_get(b"alice@example.com") == b"400 user%20map%20unavailable\n"
    client.close()


def test_postmap_tcp_gives_the_same_answers_as_axpolicy_lookup(axpolicy: Axpolicy, postmap_dir: Path) -> None:
    table = f"tcp:{axpolicy.address('tcp_table')[len('inet:'):]}"
    found = postmap(postmap_dir, table, "Alice@Example.com")
    assert (found.returncode, found.stdout, found.stderr) == (0, "relay:[127.0.0.2]\n", "")
    missing = postmap(postmap_dir, table, "nobody@example.com")
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, "", "")


def test_postmap_tcp_temp_is_an_error(axpolicy: Axpolicy, postmap_dir: Path, slapd: Slapd) -> None:
    slapd.stop()
    table = f"tcp:{axpolicy.address('tcp_table')[len('inet:'):]}"
    proc = postmap(postmap_dir, table, "alice@example.com")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert "query error" in proc.stderr, proc.stderr


def test_tcp_table_overlong_line_gets_400_and_close(axpolicy: Axpolicy) -> None:
    sock = connect(axpolicy.address("tcp_table"))
    sock.sendall(b"get " + b"a" * 40000)
    assert sock.makefile("rb").readline() == b"400 request%20too%20long\n"
    assert sock.recv(10) == b""
    sock.close()
    assert_still_serving(axpolicy)


# --------------------------------------------------------------------------
# policy


@pytest.mark.parametrize(("recipient", "state", "reply"), [
    ("alice@example.com", "RCPT", b"action=OK\n\n"),
    ("ALICE+news@Example.COM", "RCPT", b"action=OK\n\n"),
    ("nobody@example.com", "RCPT", b"action=DUNNO\n\n"),
    ("victim@elsewhere.example", "RCPT", b"action=DUNNO\n\n"),
    ("alice%elsewhere.example@example.com", "RCPT", b"action=DUNNO\n\n"),
    ("elsewhere.example!alice@example.com", "RCPT", b"action=DUNNO\n\n"),
    ("alice@example.com@elsewhere.example", "RCPT", b"action=DUNNO\n\n"),
    ("alice@example.com.", "RCPT", b"action=DUNNO\n\n"),
    ("twin@example.com", "RCPT", b"action=DEFER_IF_PERMIT 4.3.0 User map temporarily unavailable\n\n"),
    ("", "RCPT", b"action=DUNNO\n\n"),
    ("alice@example.com", "MAIL", b"action=DUNNO\n\n"),
    ("alice@example.com", "DATA", b"action=DUNNO\n\n"),
    ("alice@example.com", "rcpt", b"action=OK\n\n"),
])
def test_policy_answers(axpolicy: Axpolicy, recipient: str, state: str, reply: bytes) -> None:
    client = LineClient(axpolicy.address("policy"))
    assert client.policy(rcpt_policy(recipient, state)) == reply
    client.close()


def test_policy_directory_down_defers(axpolicy: Axpolicy, slapd: Slapd) -> None:
    slapd.stop()
    client = LineClient(axpolicy.address("policy"))
    assert client.policy(rcpt_policy("alice@example.com")) == \
        b"action=DEFER_IF_PERMIT 4.3.0 User map temporarily unavailable\n\n"
    # Outside the configured domains: no directory needed, so still DUNNO.
    assert client.policy(rcpt_policy("victim@elsewhere.example")) == b"action=DUNNO\n\n"
    client.close()


def test_policy_connection_is_persistent(axpolicy: Axpolicy) -> None:
    client = LineClient(axpolicy.address("policy"))
    for _ in range(3):
        assert client.policy(rcpt_policy("bob@example.com")) == b"action=OK\n\n"
    client.close()


def test_policy_crlf_is_not_the_protocol(axpolicy: Axpolicy) -> None:
    """Postfix sends LF only; with CRLF the "\\r" line is not an attribute: no reply, closed."""
    sock = connect(axpolicy.address("policy"))
    sock.sendall(b"request=smtpd_access_policy\r\nprotocol_state=RCPT\r\nrecipient=bob@example.com\r\n\r\n")
    sock.settimeout(10)
    assert sock.recv(100) == b""
    sock.close()


@pytest.mark.parametrize("request_bytes", [
    b"request=something_else\nprotocol_state=RCPT\nrecipient=alice@example.com\n\n",
    b"protocol_state=RCPT\nrecipient=alice@example.com\n\n",
    b"this line has no equals sign\n\n",
    b"\n",
    b"request=smtpd_access_policy\n" + b"x=" + b"y" * 10000 + b"\n\n",
    b"request=smtpd_access_policy\n" + b"".join(b"a%d=b\n" % i for i in range(300)) + b"\n",
])
def test_policy_protocol_violations_close_without_a_reply(axpolicy: Axpolicy, request_bytes: bytes) -> None:
    sock = connect(axpolicy.address("policy"))
    sock.sendall(request_bytes)
    sock.settimeout(10)
    assert sock.recv(4096) == b""    # no reply at all: Postfix then applies its default_action
    sock.close()
    assert_still_serving(axpolicy)


# --------------------------------------------------------------------------
# readsocket (Exim)


@pytest.mark.parametrize(("request_bytes", "shutdown", "reply"), [
    (b"mailhost alice@example.com", True, b"OK 127.0.0.2"),
    (b"mailhost alice@example.com\n", False, b"OK 127.0.0.2"),       # shutdown=no
    (b"mailhost nobody@example.com", True, b"NOTFOUND"),
    (b"mailhost twin@example.com", True, b"TEMP user map entry is ambiguous"),
    (b"nosuchmap alice@example.com", True, b"PERM unknown map name"),
    (b"", True, b"PERM malformed request"),
])
def test_readsocket_answers_then_closes(axpolicy: Axpolicy, request_bytes: bytes, shutdown: bool,
                                        reply: bytes) -> None:
    assert readsocket(axpolicy.address("readsocket"), request_bytes, shutdown) == reply


# --------------------------------------------------------------------------
# hostile clients


def test_a_stalled_half_request_is_closed_and_others_are_served(axpolicy: Axpolicy) -> None:
    stalled = [connect(axpolicy.address(p)) for p in ("socketmap", "tcp_table", "policy", "readsocket")]
    stalled[0].sendall(b"30:transport ali")
    stalled[1].sendall(b"get ali")
    stalled[2].sendall(b"request=smtpd_access_policy\nprotocol_state=RC")
    stalled[3].sendall(b"mailhost ali")
    assert_still_serving(axpolicy)        # while they stall
    for sock in stalled:
        sock.settimeout(IDLE * 5)
        assert sock.recv(100) == b""      # closed by the server after idle_timeout
        sock.close()


def test_hundreds_of_idle_connections_do_not_stop_service(axpolicy: Axpolicy) -> None:
    idle = [connect(axpolicy.address(p)) for p in ("socketmap", "tcp_table", "policy") for _ in range(100)]
    try:
        assert_still_serving(axpolicy)
    finally:
        for sock in idle:
            sock.close()


def test_clients_that_disconnect_mid_request_cost_nothing(axpolicy: Axpolicy, slapd: Slapd) -> None:
    for _ in range(20):
        sock = connect(axpolicy.address("socketmap"))
        sock.sendall(b"27:transport alice@example.com,")
        sock.close()                       # gone before the answer
        sock = connect(axpolicy.address("policy"))
        sock.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=bob@example.com\n\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()                       # reset
    assert_still_serving(axpolicy)
    assert "Traceback" not in axpolicy.log


def test_random_garbage_on_every_listener(axpolicy: Axpolicy) -> None:
    import random
    rng = random.Random(1234)
    for protocol in ("socketmap", "tcp_table", "policy", "readsocket"):
        for _ in range(10):
            sock = connect(axpolicy.address(protocol))
            sock.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(IDLE * 5)
            while sock.recv(4096):
                pass
            sock.close()
    assert_still_serving(axpolicy)
    assert "Traceback" not in axpolicy.log


def test_many_clients_at_once_each_get_their_own_answers(axpolicy: Axpolicy) -> None:
    errors: list[str] = []

    def worker(n: int) -> None:
        client = SocketmapClient(axpolicy.address("socketmap"))
        for i in range(20):
            user = (n + i) % 20 + 1
            expected = b"OK relay:[127.0.0.2]" if user % 2 else b"OK relay:[127.0.0.3]"
            reply = client.query("transport", f"user{user}@example.com")
            if reply != expected:
                errors.append(f"user{user}: {reply!r}")
        client.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


def test_idle_connections_are_closed_after_idle_timeout(axpolicy: Axpolicy) -> None:
    client = SocketmapClient(axpolicy.address("socketmap"))
    assert client.query("domain", "example.com") == b"OK OK"
    client.sock.settimeout(IDLE * 5)
    assert client.sock.recv(10) == b""      # the server closed it; no timeout on our side
    client.close()
