"""End to end through a real Exim 4.96: the fragments in ``exim/`` as shipped.

``exim -bt`` runs the routers (with their readsocket calls), ``exim -bh``
runs SMTP sessions through the ACLs, and an Exim daemon delivers to
smtp-sink back-ends on 127.0.0.2 and 127.0.0.3.  axpolicy runs
``exim/axpolicy.yml`` with the test slapd, on a unix socket with the
recipe's own mode and group (ACLs run as Debian-exim).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import shipped_config
from tests.daemon import Axpolicy
from tests.exim import FRAGMENTS, Exim, exim_binary
from tests.postfix import Sinks, open_path
from tests.slapd import Slapd
from tests.vectors import OPEN_RELAY_RCPTS, SENDERS

if exim_binary() is None:
    if os.environ.get("CI"):
        raise RuntimeError("exim4 is missing in CI: scripts/test must unpack it into .cache/exim")
    pytest.skip("no exim4 binary (run scripts/test to unpack one)", allow_module_level=True)


@dataclasses.dataclass
class Frontend:
    exim: Exim
    axpolicy: Axpolicy
    sinks: Sinks


def socket_in(workdir: Path) -> Path:
    """Where axpolicy's readsocket listener goes: a directory Exim (Debian-exim) can reach."""
    open_path(workdir)
    socket_path = workdir / "run" / "exim.sock"
    socket_path.parent.mkdir()
    open_path(socket_path.parent)
    return socket_path


def axpolicy_config(workdir: Path, slapd: Slapd, socket_path: Path) -> dict[str, Any]:
    """exim/axpolicy.yml with the test's servers and socket path."""
    config = shipped_config(FRAGMENTS / "axpolicy.yml", workdir, slapd)
    for listener in config["listen"]:
        listener["address"] = listener["address"].replace("/run/axpolicy/exim.sock", str(socket_path))
    return config


@pytest.fixture(scope="module")
def frontend(slapd_primary: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Frontend]:
    workdir = tmp_path_factory.mktemp("exim")
    socket_path = socket_in(workdir)
    with contextlib.ExitStack() as stack:
        sinks = Sinks(workdir / "sinks")
        stack.callback(sinks.stop)
        axpolicy = Axpolicy(workdir / "axpolicy", axpolicy_config(workdir, slapd_primary, socket_path))
        stack.callback(axpolicy.stop)
        axpolicy.start()
        exim = Exim(workdir / "exim", str(socket_path), sinks.port)
        stack.callback(exim.stop)
        exim.check()
        yield Frontend(exim, axpolicy, sinks)


@pytest.mark.parametrize(("address", "host"), [
    ("alice@example.com", "127.0.0.2"),
    ("alice+lists@example.com", "127.0.0.2"),
    ("Bob+News@Example.COM", "127.0.0.3"),
    ("ALICE@EXAMPLE.COM", "127.0.0.2"),
    ("asmith@example.net", "127.0.0.2"),
    ("six@example.com", "::1"),                     # an IPv6 back-end: colons are no list separators
])
def test_bt_routes_mapped_recipients_to_their_back_end(frontend: Frontend, address: str, host: str) -> None:
    proc = frontend.exim.route(address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "router = axpolicy, transport = remote_smtp" in proc.stdout
    assert f"host {host} [{host}]" in proc.stdout


@pytest.mark.parametrize("address", ["nobody@example.com", "twin2x@example.net"])
def test_bt_unmapped_recipients_go_to_the_normal_router(frontend: Frontend, address: str) -> None:
    proc = frontend.exim.route(address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "router = fallback" in proc.stdout


def test_bt_defers_when_the_directory_is_down(frontend: Frontend, slapd: Slapd) -> None:
    slapd.stop()
    proc = frontend.exim.route("user11@example.com")        # never looked up: nothing cached
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cannot be resolved at this time" in proc.stdout
    assert "user map temporarily unavailable" in proc.stdout


def test_bt_defers_when_the_directory_is_ambiguous(frontend: Frontend) -> None:
    proc = frontend.exim.route("twin@example.com")
    assert proc.returncode == 1, proc.stdout + proc.stderr


def test_bt_defers_when_axpolicy_is_unreachable(frontend: Frontend) -> None:
    frontend.axpolicy.stop()
    try:
        proc = frontend.exim.route("bob@example.com")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "cannot be resolved at this time" in proc.stdout
    finally:
        frontend.axpolicy.start()


def test_bh_accepts_mapped_and_refuses_foreign_recipients(frontend: Frontend) -> None:
    replies = frontend.exim.session("alice@example.com", "Bob+News@Example.COM", "victim@elsewhere.example",
                                    "victim@example.com.elsewhere.example")
    assert [code for code, _ in replies] == [250, 250, 550, 550], replies
    assert replies[2][1] == "relay not permitted"


@pytest.mark.parametrize("recipient", [
    "alice%elsewhere.example@example.com",
    "victim%elsewhere.example@example.com",
    "elsewhere.example!alice@example.com",
    '"alice@elsewhere.example"@example.com',
    '"victim%elsewhere.example"@example.com',
    "alice@elsewhere.example@example.com",
    "@example.com:victim@elsewhere.example",
    "victim@[192.0.2.99]",
    "elsewhere.example!victim",
    "|/bin/sh@example.com",
    "/etc/passwd@example.com",
    ".alice@example.com",
])
def test_bh_never_accepts_routing_tricks(frontend: Frontend, recipient: str) -> None:
    [(code, text)] = frontend.exim.session(recipient)
    assert code >= 500, (recipient, code, text)


def test_bh_defers_when_the_user_map_is_down(frontend: Frontend, slapd: Slapd) -> None:
    slapd.stop()
    [(code, text)] = frontend.exim.session("user13@example.com")
    assert (code, text) == (451, "4.3.0 User map temporarily unavailable")


def test_bh_defers_when_axpolicy_is_unreachable(frontend: Frontend) -> None:
    frontend.axpolicy.stop()
    try:
        [(code, text)] = frontend.exim.session("alice@example.com")
        assert (code, text) == (451, "4.3.0 User map temporarily unavailable")
    finally:
        frontend.axpolicy.start()


def test_daemon_delivers_mapped_recipients_to_their_back_end(frontend: Frontend) -> None:
    frontend.exim.start()
    try:
        replies = frontend.exim.send("alice@example.com", "Bob+News@Example.COM", "user5@example.com",
                                     "nobody@example.com")
        assert [code for code, _ in replies] == [250, 250, 250, 250], replies
        frontend.sinks.wait_for("127.0.0.2", "alice@example.com")
        frontend.sinks.wait_for("127.0.0.3", "Bob+News@Example.COM")
        frontend.sinks.wait_for("127.0.0.2", "user5@example.com")
        # Unmapped users of a hosted domain follow normal routing (here the
        # stand-in for dnslookup), never a user back-end.
        frontend.sinks.wait_for("127.0.0.4", "nobody@example.com")
        everything = frontend.sinks.everything()
        assert "alice@example.com" not in everything["127.0.0.3"] + everything["127.0.0.4"]
    finally:
        frontend.exim.stop()


@pytest.mark.parametrize("sender", SENDERS)
def test_classic_open_relay_vectors_are_all_refused(frontend: Frontend, sender: str) -> None:
    """Every vector refused (5xx) in one session, while a mapped user is still accepted."""
    replies = frontend.exim.raw_session(sender, [*OPEN_RELAY_RCPTS, "<alice@example.com>"])
    accepted = [(arg, reply) for arg, reply in zip(OPEN_RELAY_RCPTS, replies, strict=False) if reply[0] < 500]
    assert accepted == []
    assert replies[-1][0] == 250, replies[-1]
