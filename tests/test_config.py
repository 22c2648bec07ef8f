"""Configuration: every mistake is refused with a message that names the key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from axpolicy.config import ConfigError, LdapMapConfig, load, parse
from tests.conftest import axpolicy_cli

LDAP = {"type": "ldap", "servers": ["ldap://127.0.0.1:3389"], "base": "dc=example,dc=com"}


def config_with(**top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"usermaps": {"people": dict(LDAP)}}
    data.update(top)
    return data


def ldap_with(**keys: Any) -> dict[str, Any]:
    section = dict(LDAP)
    section.update(keys)
    return {"usermaps": {"people": section}}


def test_the_documented_example_loads_with_its_defaults(tmp_path: Path) -> None:
    secret = tmp_path / "ldap.secret"
    secret.write_text("s3cret\n")
    (tmp_path / "usermap").write_text("alice@example.com 127.0.0.2\n")
    path = tmp_path / "axpolicy.yml"
    path.write_text(f"""
usermaps:
  people:
    type: ldap
    servers: ["ldap://127.0.0.1:3389", "ldap://127.0.0.1:3390"]
    start_tls: false
    ca_file: null
    bind_dn: "cn=axpolicy,dc=example,dc=com"
    bind_password_file: {secret}
    base: "ou=people,dc=example,dc=com"
    scope: sub
    filter: "(|(mail=%s)(mailAlternateAddress=%s))"
    host_attribute: mailHost
    timeout: 3
    pool_size: 4
  static:
    type: file
    path: usermap
domains: [example.com, Example.NET, bücher.example]
recipient_delimiter: "+"
cache: {{ttl: 300, negative_ttl: 60, stale_if_error: 3600, max_entries: 100000}}
""")
    config = load(str(path))
    people = config.usermaps["people"]
    assert isinstance(people, LdapMapConfig)
    assert people.bind_password == "s3cret"  # trailing newline is not part of it
    assert people.servers == ("ldap://127.0.0.1:3389", "ldap://127.0.0.1:3390")
    assert config.usermaps["static"].path == str(tmp_path / "usermap")  # type: ignore[union-attr]
    assert config.domains == {"example.com", "example.net", "xn--bcher-kva.example"}
    assert config.default_usermap == "people"
    assert config.cache.stale_if_error == 3600


BAD = [
    (config_with(extra=1), "extra: unknown key"),
    ({}, "usermaps: required"),
    ({"usermaps": {}}, "usermaps: at least one"),
    ({"usermaps": []}, "usermaps: expected a mapping"),
    ({"usermaps": {"p": {"type": "sql"}}}, "usermaps.p.type: expected ldap or file"),
    (ldap_with(timeout="3"), "usermaps.people.timeout: expected a number"),
    (ldap_with(timeout=0), "usermaps.people.timeout: must be between"),
    (ldap_with(pool_size=0), "usermaps.people.pool_size: must be between"),
    (ldap_with(pool_size=2.5), "usermaps.people.pool_size: expected a whole number"),
    (ldap_with(start_tls="yes"), "usermaps.people.start_tls: expected true or false"),
    (ldap_with(servers=[]), "usermaps.people.servers: expected a non-empty list"),
    (ldap_with(servers=["http://x"]), "usermaps.people.servers[0]: expected ldap://"),
    (ldap_with(servers=["ldap://x:99999"]), "usermaps.people.servers[0]: bad port"),
    (ldap_with(scope="subtree"), "usermaps.people.scope: expected base, one or sub"),
    (ldap_with(filter="(mail=%x)"), "usermaps.people.filter: unknown escape %x"),
    (ldap_with(filter="(mail=%s"), "usermaps.people.filter: is not a valid LDAP filter"),
    (ldap_with(filter="(objectClass=*)"), "usermaps.people.filter: must contain %s or %u"),
    (ldap_with(host_attribute="mail host"), "usermaps.people.host_attribute: not an attribute name"),
    (ldap_with(bind_password="x"), "usermaps.people.bind_dn: required when a bind password"),
    (ldap_with(bind_dn="cn=x", bind_password="x", bind_password_file="/x"),
     "usermaps.people.bind_password: give bind_password or bind_password_file"),
    (ldap_with(bind_dn="cn=x", bind_password_file="/nonexistent/secret"),
     "usermaps.people.bind_password_file: cannot read"),
    (ldap_with(ca_file="/nonexistent/ca.pem"), "usermaps.people.ca_file: no such file"),
    (ldap_with(colour="blue"), "usermaps.people.colour: unknown key"),
    ({"usermaps": {"f": {"type": "file"}}}, "usermaps.f.path: required"),
    ({"usermaps": {"bad name": {"type": "file", "path": "x"}}}, "usermaps.bad name: map names"),
    (config_with(domains="example.com"), "domains: expected a list"),
    (config_with(domains=["example.com", "exa mple.com"]), "domains[1]:"),
    (config_with(recipient_delimiter="@"), "recipient_delimiter: '@' cannot be a delimiter"),
    (config_with(recipient_delimiter=5), "recipient_delimiter: expected a string"),
    (config_with(cache={"ttl": -1}), "cache.ttl: must be between"),
    (config_with(cache={"size": 5}), "cache.size: unknown key"),
    (config_with(cache={"max_entries": "many"}), "cache.max_entries: expected a whole number"),
]


@pytest.mark.parametrize(("raw", "message"), BAD, ids=[m.split(":")[0] + "-" + str(i) for i, (_, m) in enumerate(BAD)])
def test_invalid_configuration_names_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(raw, "/etc/axpolicy/axpolicy.yml")
    assert str(info.value).startswith(message)


def test_unreadable_and_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.yml"))
    bad = tmp_path / "bad.yml"
    bad.write_text("usermaps: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(str(bad))


def test_check_config_prints_the_effective_configuration_with_secrets_masked(
        write_config: Callable[[dict[str, Any]], Path]) -> None:
    path = write_config(ldap_with(bind_dn="cn=axpolicy,dc=example,dc=com", bind_password="hunter2-secret"))
    proc = axpolicy_cli("check-config", "-c", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "hunter2-secret" not in proc.stdout + proc.stderr
    shown = yaml.safe_load(proc.stdout)
    people = shown["usermaps"]["people"]
    assert people["bind_password"] == "********"
    assert people["timeout"] == 3.0 and people["pool_size"] == 4  # defaults are shown
    assert shown["cache"]["ttl"] == 300.0


def test_check_config_exits_78_naming_the_key(write_config: Callable[[dict[str, Any]], Path]) -> None:
    proc = axpolicy_cli("check-config", "-c", str(write_config(ldap_with(timeout="soon"))))
    assert proc.returncode == 78
    assert "usermaps.people.timeout" in proc.stderr
    assert proc.stdout == ""


def test_config_defaults_to_etc_axpolicy(tmp_path: Path) -> None:
    proc = axpolicy_cli("check-config")
    if Path("/etc/axpolicy/axpolicy.yml").exists():
        pytest.skip("a system configuration exists on this machine")
    assert proc.returncode == 78
    assert "/etc/axpolicy/axpolicy.yml" in proc.stderr


def test_usage_errors_exit_64() -> None:
    assert axpolicy_cli("lookup").returncode == 64
    assert axpolicy_cli("no-such-command").returncode == 64
