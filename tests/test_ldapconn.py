"""The LDAP connection on the event loop: sessions the server ends, by idle timeout or by notice.

slapd closes idle sessions (``idletimeout``) silently: a real slapd shows
that the next lookup reconnects without a temporary failure.  slapd never
sends a Notice of Disconnection on demand, so a scripted peer on loopback
(answering a bind, then the notice) shows that one fails every operation
on that connection at once, and that the lookup is retried on a fresh
connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from axpolicy import config, ldapwire
from axpolicy.ldapconn import LdapConnectionError, endpoint, open_connection
from axpolicy.result import LookupResult, Status
from axpolicy.router import Router
from tests import slapd as slapd_module
from tests.conftest import ldap_map, run, seed_ldif
from tests.slapd import BIND_DN, BIND_PW, Slapd

NO_CACHE = {"ttl": 0, "negative_ttl": 0, "stale_if_error": 0, "max_entries": 0}


@pytest.fixture(scope="module")
def idle_slapd(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: Any) -> Iterator[Slapd]:
    monkeypatch_module.setattr(slapd_module, "_CONF", slapd_module._CONF.replace(
        "sizelimit 500\n", "sizelimit 500\nidletimeout 1\n"))
    server = Slapd(tmp_path_factory.mktemp("slapd-idle"), seed_ldif())
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def test_a_session_the_server_closed_when_idle_is_reopened_without_a_failure(idle_slapd: Slapd) -> None:
    async def go() -> list[LookupResult]:
        raw = {"usermaps": {"people": ldap_map(idle_slapd)}, "cache": NO_CACHE}
        router = Router.open(config.parse(raw, "/tmp/axpolicy-test.yml"))
        try:
            results = [await router.resolve("alice@example.com")]
            await asyncio.sleep(2.5)                          # slapd closes the idle session
            results.append(await router.resolve("bob@example.com"))
            return results
        finally:
            await router.close()
    assert run(go()) == [LookupResult(Status.FOUND, "127.0.0.2"), LookupResult(Status.FOUND, "127.0.0.3")]


class ScriptedServer:
    """Answers binds, and searches with one entry (mailHost 127.0.0.2), except: the first connection
    answers its first search, the second its second search, with a Notice of Disconnection."""

    def __init__(self) -> None:
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        searches = 0
        buffer = b""
        while True:
            data = await reader.read(65536)
            if not data:
                break
            buffer += data
            while (size := ldapwire.frame_length(buffer)) is not None and len(buffer) >= size:
                request, buffer = buffer[:size], buffer[size:]
                message_id, op = _request(request)
                searches += op == 0x63
                if op == 0x60:     # bind
                    writer.write(_message(message_id, 0x61, _result(0)))
                elif op == 0x63 and searches == number:
                    notice = _result(52, b"going away") + b"\x8a" + bytes((len(NOTICE),)) + NOTICE
                    writer.write(_message(0, 0x78, notice))
                    await writer.drain()
                    writer.close()
                    return
                elif op == 0x63:
                    entry = _octets(b"uid=alice,ou=people") + _seq(0x30, _seq(0x30, _octets(b"mailHost")
                                                                             + _seq(0x31, _octets(b"127.0.0.2"))))
                    writer.write(_message(message_id, 0x64, entry) + _message(message_id, 0x65, _result(0)))
        writer.close()


NOTICE = ldapwire.NOTICE_OF_DISCONNECTION_OID


def _seq(tag: int, value: bytes) -> bytes:
    return bytes((tag, len(value))) + value


def _octets(value: bytes) -> bytes:
    return _seq(0x04, value)


def _result(code: int, diagnostic: bytes = b"") -> bytes:
    return _seq(0x0A, bytes((code,))) + _octets(b"") + _octets(diagnostic)


def _message(message_id: int, op: int, body: bytes) -> bytes:
    return _seq(0x30, _seq(0x02, bytes((message_id,))) + _seq(op, body))


def _request(data: bytes) -> tuple[int, int]:
    """(message id, operation tag) of a short request."""
    head = 3 if data[1] & 0x80 else 2
    id_length = data[head + 1]
    message_id = int.from_bytes(data[head + 2:head + 2 + id_length], "big")
    return message_id, data[head + 2 + id_length]


def test_a_notice_of_disconnection_fails_the_connection_and_the_lookup_retries_on_a_fresh_one() -> None:
    async def go() -> tuple[str, LookupResult, int]:
        script = ScriptedServer()
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            conn = await open_connection(endpoint(f"ldap://127.0.0.1:{port}", False, None), BIND_DN, BIND_PW)
            with pytest.raises(LdapConnectionError) as info:
                await conn.operation(lambda mid: ldapwire.encode_search(mid, "", "base", b"\x87\x0bobjectClass",
                                                                        "1.1", 1, 1))
            raw = {"usermaps": {"people": ldap_map(servers=[f"ldap://127.0.0.1:{port}"])}, "cache": NO_CACHE}
            router = Router.open(config.parse(raw, "/tmp/axpolicy-test.yml"))
            try:
                first = await router.resolve("alice@example.com")          # connection 2, first search
                assert first == LookupResult(Status.FOUND, "127.0.0.2")
                result = await router.resolve("alice@example.com")         # its second: the notice
            finally:
                await router.close()
            return str(info.value), result, script.connections
        finally:
            server.close()
    why, result, connections = run(go())
    assert why == "notice of disconnection: 52 unavailable going away"
    assert result == LookupResult(Status.FOUND, "127.0.0.2")
    assert connections == 3          # the lookup that got the notice was answered on a fresh connection
