"""``axpolicy lookup`` against a real slapd: the three outcomes and their exit codes."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, axpolicy_cli, ldap_map
from tests.slapd import Slapd

Write = Callable[[dict[str, Any]], Path]


@pytest.fixture
def conf(slapd: Slapd, write_config: Write) -> Path:
    return write_config({"usermaps": {"people": ldap_map(slapd)}, "recipient_delimiter": "+"})


def test_found_prints_address_tab_host_and_exits_0(conf: Path) -> None:
    proc = axpolicy_cli("lookup", "-c", str(conf), "alice@example.com", "Bob+x@Example.COM")
    assert (proc.returncode, proc.stdout) == (0, "alice@example.com\t127.0.0.2\nBob+x@Example.COM\t127.0.0.3\n")


def test_not_found_prints_nothing_and_exits_1(conf: Path) -> None:
    proc = axpolicy_cli("lookup", "-c", str(conf), "nobody@example.com", "alice@example.com")
    assert (proc.returncode, proc.stdout) == (1, "alice@example.com\t127.0.0.2\n")
    assert "nobody" not in proc.stderr


def test_directory_down_exits_75_with_a_message(conf: Path, slapd: Slapd) -> None:
    slapd.stop()
    proc = axpolicy_cli("lookup", "-c", str(conf), "alice@example.com", "nobody@example.com")
    assert (proc.returncode, proc.stdout) == (75, "")
    assert "alice@example.com: temporary failure: user map unavailable" in proc.stderr


def test_directory_hung_exits_75(conf: Path, slapd: Slapd) -> None:
    slapd.pause()
    proc = axpolicy_cli("lookup", "-c", str(conf), "alice@example.com")
    assert proc.returncode == 75
    # Either the deadline or the connection's own receive timeout fires first.
    assert re.search(r"temporary failure: user map (timeout|unavailable)", proc.stderr)


def test_addresses_from_stdin(conf: Path) -> None:
    proc = axpolicy_cli("lookup", "-c", str(conf), "-", stdin="alice@example.com\n\ncarol@example.net\n")
    assert (proc.returncode, proc.stdout) == (0, "alice@example.com\t127.0.0.2\ncarol@example.net\t127.0.0.3\n")


def test_usermap_option_picks_the_map(slapd: Slapd, write_config: Write, tmp_path: Path) -> None:
    (tmp_path / "usermap").write_text("alice@example.com 127.0.0.9\n")
    conf = write_config({"usermaps": {"people": ldap_map(slapd),
                                      "static": {"type": "file", "path": str(tmp_path / "usermap")}}})
    assert axpolicy_cli("lookup", "-c", str(conf), "alice@example.com").stdout.endswith("\t127.0.0.2\n")
    proc = axpolicy_cli("lookup", "-c", str(conf), "--usermap", "static", "alice@example.com")
    assert proc.stdout == "alice@example.com\t127.0.0.9\n"
    bad = axpolicy_cli("lookup", "-c", str(conf), "--usermap", "nope", "alice@example.com")
    assert bad.returncode == 64 and "no user map named 'nope'" in bad.stderr


def test_the_bundled_example_runs_without_ldap() -> None:
    example = ROOT / "examples" / "axpolicy.yml"
    proc = axpolicy_cli("lookup", "-c", str(example), "alice@example.com", "someone@example.net")
    assert (proc.returncode, proc.stdout) == (0, "alice@example.com\t127.0.0.2\nsomeone@example.net\t127.0.0.3\n")


def test_a_broken_user_map_file_exits_78(write_config: Write, tmp_path: Path) -> None:
    (tmp_path / "usermap").write_text("garbage\n")
    conf = write_config({"usermaps": {"static": {"type": "file", "path": str(tmp_path / "usermap")}}})
    proc = axpolicy_cli("lookup", "-c", str(conf), "alice@example.com")
    assert proc.returncode == 78 and "usermap:1:" in proc.stderr
