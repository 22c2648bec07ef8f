"""A bug below a protocol is a temporary failure, never a closed connection.

The fault is injected on purpose (the user map raises for one key); the
rest is real: a bound socket, the server, every protocol's service and a
raw client.  Each protocol must answer its own "temporary failure" word,
log one traceback, and keep serving the same connection.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from axpolicy import config
from axpolicy.daemon import make_service
from axpolicy.result import LookupResult
from axpolicy.router import Router
from axpolicy.server import Listener, bind
from tests.conftest import run
from tests.slapd import free_port

BOOM = "boom@example.com"

DEFER = b"action=DEFER_IF_PERMIT 4.3.0 User map temporarily unavailable\n\n"
# (protocol, first request (raises), second request, its reply, the temporary-failure reply
#  from the server's boundary, and from the router's shared fetch)
CASES = [
    ("socketmap", b"26:transport boom@example.com,", b"27:transport alice@example.com,",
     b"20:OK relay:[127.0.0.2],", b"19:TEMP internal error,", b"28:TEMP user map internal error,"),
    ("tcp_table", b"get boom@example.com\n", b"get alice@example.com\n",
     b"200 relay:[127.0.0.2]\n", b"400 internal%20error\n", b"400 user%20map%20internal%20error\n"),
    ("policy", b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=boom@example.com\n\n",
     b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=alice@example.com\n\n",
     b"action=OK\n\n", DEFER, DEFER),
]


def router_with_a_bug(tmp_path: Path, protocol: str, cached: bool) -> tuple[Router, Any]:
    usermap = tmp_path / "usermap"
    usermap.write_text("alice@example.com 127.0.0.2\nboom@example.com 127.0.0.3\n")
    listen = {"protocol": protocol, "address": f"inet:127.0.0.1:{free_port()}"}
    if protocol in ("tcp_table", "readsocket"):
        listen["map"] = "transport"
    cfg = config.parse({"usermaps": {"local": {"type": "file", "path": str(usermap)}},
                        "listen": [listen], "maps": {"transport": {"usermap": "local", "result": "relay:[%s]"}}},
                       str(tmp_path / "axpolicy.yml"))
    router = Router.open(cfg)
    target = router.usermaps["local"]
    original = target.lookup

    async def lookup(key: str) -> LookupResult:
        if key == BOOM:
            await asyncio.sleep(0)            # as after a request sent: others can wait for it
            raise RuntimeError("a bug below the protocol")
        return await original(key)

    target.lookup = lookup  # type: ignore[method-assign]
    target.lookup_now = lambda key: None  # type: ignore[method-assign]   # every request takes the slow path
    if cached:
        target.cached = True  # type: ignore[misc]   # through the router's shared in-flight fetch
    return router, cfg


async def exchange(cfg: Any, router: Router, requests: list[bytes], replies: int) -> list[bytes]:
    spec = cfg.listen[0]
    listener = Listener(spec, make_service(spec, router, cfg), bind(spec))
    await listener.start()
    try:
        answers = []
        reader, writer = await asyncio.open_connection(spec.host, spec.port)
        for request in requests:
            writer.write(request)
            answers.append(await asyncio.wait_for(reader.read(4096), 10))
        writer.close()
        return answers[:replies]
    finally:
        await listener.stop(0)


@pytest.mark.parametrize("cached", [False, True], ids=["map", "shared fetch"])
@pytest.mark.parametrize(("protocol", "boom", "fine", "reply", "server_temp", "router_temp"), CASES,
                         ids=[c[0] for c in CASES])
def test_an_unexpected_exception_is_a_temporary_failure_and_the_connection_stays_open(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, cached: bool, protocol: str, boom: bytes, fine: bytes,
        reply: bytes, server_temp: bytes, router_temp: bytes) -> None:
    caplog.set_level(logging.ERROR)
    router, cfg = router_with_a_bug(tmp_path, protocol, cached)
    tempfail = router_temp if cached else server_temp
    answers = run(exchange(cfg, router, [boom, fine, boom], 3))
    assert answers == [tempfail, reply, tempfail]         # the same connection, still in step
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 2                            # one per failed request
    assert "a bug below the protocol" in caplog.text


def test_readsocket_answers_temp_for_an_unexpected_exception(tmp_path: Path) -> None:
    router, cfg = router_with_a_bug(tmp_path, "readsocket", cached=False)
    spec = cfg.listen[0]

    async def go() -> list[bytes]:
        listener = Listener(spec, make_service(spec, router, cfg), bind(spec))
        await listener.start()
        try:
            answers = []
            for request in (b"transport boom@example.com\n", b"transport alice@example.com\n"):
                reader, writer = await asyncio.open_connection(spec.host, spec.port)
                writer.write(request)
                answers.append(await asyncio.wait_for(reader.read(), 10))
                writer.close()
            return answers
        finally:
            await listener.stop(0)

    assert run(go()) == [b"TEMP internal error", b"OK relay:[127.0.0.2]"]


def test_waiters_of_a_shared_lookup_all_get_a_temporary_failure_with_one_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    router, _ = router_with_a_bug(tmp_path, "socketmap", cached=True)

    async def go() -> list[LookupResult]:
        return list(await asyncio.gather(*(router.resolve(BOOM) for _ in range(5))))

    results = run(go())
    assert {r.reason for r in results} == {"user map internal error"}
    assert len([r for r in caplog.records if r.exc_info]) == 1
