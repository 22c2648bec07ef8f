"""End to end through a real Postfix: the recipes in ``postfix/`` as shipped.

For each recipe a private Postfix runs the recipe's ``main.cf`` with only
ports and paths substituted, axpolicy runs ``postfix/axpolicy.yml`` pointed at
the test slapd, and smtp-sink back-ends on 127.0.0.2 and 127.0.0.3 record what
they receive (127.0.0.4 catches anything routed by Postfix's defaults).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import axpolicy_cli, postmap, shipped_config
from tests.daemon import Axpolicy
from tests.postfix import RECIPES, Postfix, Sinks
from tests.slapd import Slapd, free_port
from tests.vectors import OPEN_RELAY_RCPTS, SENDERS


@dataclasses.dataclass
class Frontend:
    recipe: str
    postfix: Postfix
    axpolicy: Axpolicy
    sinks: Sinks
    workdir: Path


def axpolicy_config(workdir: Path, slapd: Slapd, policy_port: int, spool: Path, sink_port: int) -> dict[str, Any]:
    """postfix/axpolicy.yml with the test's servers, ports and paths."""
    config = shipped_config(RECIPES / "axpolicy.yml", workdir, slapd)
    # Sinks listen on a test port instead of 25.
    config["maps"]["transport"]["result"] = f"relay:[%s]:{sink_port}"
    for listener in config["listen"]:
        listener["address"] = (listener["address"]
                               .replace("inet:127.0.0.1:10040", f"inet:127.0.0.1:{policy_port}")
                               .replace("/var/spool/postfix", str(spool)))
    return config


@pytest.fixture(scope="module", params=["main.cf.recipe-a", "main.cf.recipe-b"], ids=["recipe-a", "recipe-b"])
def frontend(request: pytest.FixtureRequest, slapd_primary: Slapd,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Frontend]:
    workdir = tmp_path_factory.mktemp(request.param.replace(".", "-"))
    substitutions = {"inet:127.0.0.1:10040": "inet:127.0.0.1:{policy_port}"} \
        if request.param.endswith("recipe-a") else {}
    yield from running_frontend(request.param, workdir, slapd_primary, substitutions)


def running_frontend(recipe: str, workdir: Path, slapd: Slapd, substitutions: dict[str, str]) -> Iterator[Frontend]:
    """Sinks, axpolicy and Postfix for *recipe*; everything started is stopped, even on a failed start."""
    with contextlib.ExitStack() as stack:
        sinks = Sinks(workdir / "sinks")
        stack.callback(sinks.stop)
        policy_port = free_port()
        postfix = Postfix(workdir / "postfix", recipe,
                          {old: new.format(policy_port=policy_port) for old, new in substitutions.items()},
                          sink_port=sinks.port)
        axpolicy = Axpolicy(workdir / "axpolicy",
                            axpolicy_config(workdir, slapd, policy_port, postfix.spool, sinks.port))
        stack.callback(axpolicy.stop)
        axpolicy.start()
        stack.callback(postfix.stop)
        postfix.start()
        yield Frontend(recipe, postfix, axpolicy, sinks, workdir)


MAPPED = [
    ("alice@example.com", "127.0.0.2"),
    ("Bob+News@Example.COM", "127.0.0.3"),          # extension and upper case
    ("USER3@EXAMPLE.COM", "127.0.0.2"),
    ("asmith@example.net", "127.0.0.2"),            # alternate address, second domain
    ("user4+x@example.com", "127.0.0.3"),
]


def test_mapped_recipients_are_accepted_and_reach_their_back_end(frontend: Frontend) -> None:
    replies = frontend.postfix.send(*(address for address, _ in MAPPED))
    assert [code for code, _ in replies] == [250] * len(MAPPED), replies
    for address, host in MAPPED:
        frontend.sinks.wait_for(host, address)
    everything = frontend.sinks.everything()
    for address, host in MAPPED:
        for other in Sinks.HOSTS:
            if other != host:
                assert address not in everything[other]


@pytest.mark.parametrize("recipient", [
    "victim@elsewhere.example",
    "victim@ELSEWHERE.EXAMPLE",
    "victim@elsewhere.example.",
    "victim@evilexample.com",
    "victim@example.com.elsewhere.example",
])
def test_unmapped_foreign_recipients_get_relay_access_denied(frontend: Frontend, recipient: str) -> None:
    code, text = frontend.postfix.rcpt(recipient)
    assert code == 554 and "Relay access denied" in text, (code, text)


@pytest.mark.parametrize("recipient", [
    "alice%elsewhere.example@example.com",
    "victim%elsewhere.example@example.com",
    "elsewhere.example!alice@example.com",
    "elsewhere.example!victim@example.com",
    '"alice@elsewhere.example"@example.com',
    '"victim%elsewhere.example"@example.com',
    "alice@elsewhere.example@example.com",
    "@example.com:victim@elsewhere.example",
    "@example.com,@elsewhere.example:victim@elsewhere.example",
    "victim%elsewhere.example@[127.0.0.1]",
    "victim@[192.0.2.99]",
    "victim@[IPv6:2001:db8::99]",
    "elsewhere.example!victim",
    "victim%elsewhere.example",
])
def test_routing_tricks_are_never_accepted(frontend: Frontend, recipient: str) -> None:
    code, text = frontend.postfix.rcpt(recipient)
    assert code >= 400, (recipient, code, text)


def test_unmapped_recipient_of_a_hosted_domain(frontend: Frontend) -> None:
    if frontend.recipe.endswith("recipe-b"):
        code, text = frontend.postfix.rcpt("nobody@example.com")
        assert code == 550 and "User unknown in relay recipient table" in text, (code, text)
    else:
        # Recipe A leaves unmapped users to Postfix's rules: here they go to
        # relay_transport (the catch-all sink), never to a user back-end.
        assert frontend.postfix.send("nobody@example.com") == [(250, "2.1.5 Ok")]
        frontend.sinks.wait_for("127.0.0.4", "nobody@example.com")


def test_directory_down_defers_and_serves_what_it_knew(frontend: Frontend, slapd: Slapd) -> None:
    # carol is looked up once while the directory is up ...
    assert frontend.postfix.rcpt("carol@example.net")[0] == 250
    slapd.stop()
    # ... so she is still accepted from the stale cache; user17 never was
    # looked up and must be deferred at RCPT: never 5xx, never accepted.
    stale = frontend.postfix.send("carol@example.net")
    assert stale[0][0] == 250, stale
    code, text = frontend.postfix.rcpt("user17@example.com")
    assert 400 <= code < 500, (code, text)
    frontend.sinks.wait_for("127.0.0.3", "carol@example.net")
    assert "serving cached answer for carol@example.net" in frontend.axpolicy.log


def test_axpolicy_down_is_a_4xx_not_a_bounce(frontend: Frontend) -> None:
    frontend.axpolicy.stop()
    try:
        code, text = frontend.postfix.rcpt("user15@example.com")
        assert 400 <= code < 500, (code, text)
    finally:
        frontend.axpolicy.start()
    # smtpd caches address resolution per process, failures included, so
    # the recovery is shown with an address that was not resolved while
    # axpolicy was down.
    reply = frontend.postfix.rcpt("user16@example.com")
    assert reply[0] == 250, reply


def test_postmap_through_the_recipe_socket_agrees_with_axpolicy_lookup(
        frontend: Frontend, postmap_dir: Path) -> None:
    socket_path = frontend.postfix.spool / "private" / "axpolicy"
    keys = ["alice@example.com", "Bob+News@Example.COM", "nobody@example.com", "asmith@example.net", "*",
            "alice%elsewhere.example@example.com"]
    looked_up = axpolicy_cli("lookup", "-c", str(frontend.axpolicy.config_path), *keys)
    via_postfix = postmap(postmap_dir, f"socketmap:unix:{socket_path}:transport", *keys)
    expected = {line.split("\t")[0]: line.split("\t")[1] for line in looked_up.stdout.splitlines()}
    got = {line.split("\t")[0]: line.split("\t")[1] for line in via_postfix.stdout.splitlines()}
    port = frontend.sinks.port
    assert got == {k: f"relay:[{v}]:{port}" for k, v in expected.items()}
    assert set(got) == {"alice@example.com", "Bob+News@Example.COM", "asmith@example.net"}


@pytest.fixture(scope="module")
def policy_only(slapd_primary: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Frontend]:
    """Recipe A's policy service alone (its transport_maps line removed).

    With the transport map in place, a directory failure already shows at
    address resolution; this proves the policy service's own three answers
    through smtpd.
    """
    workdir = tmp_path_factory.mktemp("recipe-a-policy-only")
    yield from running_frontend("main.cf.recipe-a", workdir, slapd_primary, {
        "inet:127.0.0.1:10040": "inet:127.0.0.1:{policy_port}",
        "transport_maps = socketmap:unix:private/axpolicy:transport": ""})


def test_policy_service_answers_through_smtpd(policy_only: Frontend, slapd: Slapd) -> None:
    assert policy_only.postfix.rcpt("alice@example.com")[0] == 250                 # OK
    assert policy_only.postfix.rcpt("victim@elsewhere.example")[0] == 554          # never asked
    assert policy_only.postfix.rcpt("nobody@example.com")[0] == 250                # DUNNO: Postfix decides
    code, text = policy_only.postfix.rcpt("twin@example.com")                      # ambiguous: TEMP
    assert (code, text) == (450, "4.3.0 <twin@example.com>: Recipient address rejected: "
                                 "User map temporarily unavailable")
    slapd.stop()
    code, text = policy_only.postfix.rcpt("user19@example.com")
    assert (code, text) == (450, "4.3.0 <user19@example.com>: Recipient address rejected: "
                                 "User map temporarily unavailable")


@pytest.mark.parametrize("sender", SENDERS)
def test_classic_open_relay_vectors_are_all_refused(frontend: Frontend, sender: str) -> None:
    """Every vector refused (5xx) in one session, while a mapped user is still accepted."""
    replies = frontend.postfix.raw_session(sender, [*OPEN_RELAY_RCPTS, "<alice@example.com>"])
    accepted = [(arg, reply) for arg, reply in zip(OPEN_RELAY_RCPTS, replies, strict=False) if reply[0] < 500]
    assert accepted == []
    assert replies[-1][0] == 250, replies[-1]
