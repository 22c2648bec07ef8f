"""Host values from the directory can never change the shape of a reply.

A red-team pass found ``mailHost`` values that hide text in an IPv6 zone id
(``::1%`` followed by a line break and ``action=OK``, or by ``],[victim]``):
they passed the host check and went into every protocol's reply.  Here each
hostile value is asked on every protocol, with a policy ``mapped`` action
that embeds the host (``FILTER smtp:[%s]``), and must come back as that
protocol's temporary failure; a plain IPv6 back-end is still found.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from axpolicy import policy, readsocket, socketmap, tcptable
from axpolicy.result import found
from tests.clients import LineClient, SocketmapClient, rcpt_policy
from tests.clients import readsocket as readsocket_request
from tests.conftest import ldap_map, postmap
from tests.daemon import Axpolicy
from tests.slapd import Slapd, free_port

HOSTILE = ["zonebreak@example.com", "zonehop@example.com", "badhost@example.com"]


@pytest.fixture(scope="module")
def axpolicy(slapd_primary: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Axpolicy]:
    tmp = tmp_path_factory.mktemp("axpolicy-hostile")
    config = {
        "usermaps": {"people": ldap_map(slapd_primary)},
        "listen": [
            {"protocol": "policy", "address": f"inet:127.0.0.1:{free_port()}"},
            {"protocol": "socketmap", "address": f"inet:127.0.0.1:{free_port()}"},
            {"protocol": "tcp_table", "address": f"inet:127.0.0.1:{free_port()}", "map": "transport"},
            {"protocol": "readsocket", "address": f"inet:127.0.0.1:{free_port()}"},
        ],
        "maps": {"transport": {"usermap": "people", "result": "relay:[%s]"},
                 "mailhost": {"usermap": "people", "result": "%s"}},
        "policy": {"mapped": "FILTER smtp:[%s]"},
    }
    server = Axpolicy(tmp, config)
    server.start()
    yield server
    assert server.stop() == 0, server.log


@pytest.mark.parametrize("address", HOSTILE)
def test_a_hostile_host_is_a_temporary_failure_on_every_protocol(axpolicy: Axpolicy, address: str) -> None:
    client = SocketmapClient(axpolicy.address("socketmap"))
    assert client.query("transport", address) == b"TEMP user map entry has a bad host"
    assert client.query("mailhost", address) == b"TEMP user map entry has a bad host"
    client.close()
    line = LineClient(axpolicy.address("tcp_table"))
    assert line.tcp_get(address.encode()) == b"400 user%20map%20entry%20has%20a%20bad%20host\n"
    line.close()
    conversation = LineClient(axpolicy.address("policy"))
    assert conversation.policy(rcpt_policy(address)) == \
        b"action=DEFER_IF_PERMIT 4.3.0 User map temporarily unavailable\n\n"
    # The stream is still in step: the next request gets its own answer.
    assert conversation.policy(rcpt_policy("alice@example.com")) == b"action=FILTER smtp:[127.0.0.2]\n\n"
    conversation.close()
    assert readsocket_request(axpolicy.address("readsocket"), f"mailhost {address}".encode()) == \
        b"TEMP user map entry has a bad host"


@pytest.mark.parametrize("address", HOSTILE)
def test_postfix_sees_a_hostile_host_as_a_temporary_error(
        axpolicy: Axpolicy, postmap_dir: Path, address: str) -> None:
    for table in (f"socketmap:{axpolicy.address('socketmap')}:transport", f"tcp:{axpolicy.address('tcp_table')[5:]}"):
        proc = postmap(postmap_dir, table, address)
        assert (proc.returncode, proc.stdout) == (1, ""), table
        assert "error" in proc.stderr, table


def test_an_ipv6_back_end_without_a_zone_is_found(axpolicy: Axpolicy) -> None:
    client = SocketmapClient(axpolicy.address("socketmap"))
    assert client.query("transport", "six@example.com") == b"OK relay:[::1]"
    client.close()
    assert "host value ::1%\\n\\naction=ok is not" in axpolicy.log   # warned, made printable


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\x00b", "a\u2028b", "a\x85b", "a\tb", "a\x7fb"])
def test_no_encoder_ever_sends_a_control_or_separator_character(value: str) -> None:
    """The last guard, below the host check: whatever a map or template produced."""
    result = found(value)
    assert socketmap.encode_reply(result) == b"26:TEMP user map value unsafe,"
    assert tcptable.reply_line(result) == b"400 user%20map%20value%20unsafe\n"
    assert readsocket.reply_body(result) == b"TEMP user map value unsafe"
    service = policy.PolicyService(None, policy.PolicyConfig(usermap="people", mapped="FILTER smtp:[%s]"))  # type: ignore[arg-type]
    assert service._reply(result, 0.0) == b"action=DEFER_IF_PERMIT 4.3.0 User map temporarily unavailable\n\n"
