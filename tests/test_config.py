"""Configuration: every mistake is refused with a message that names the key."""

from __future__ import annotations

import os
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
     "usermaps.people.bind_password_file: /nonexistent/secret: cannot read"),
    (ldap_with(ca_file="/nonexistent/ca.pem"), "usermaps.people.ca_file: no such file"),
    (ldap_with(colour="blue"), "usermaps.people.colour: unknown key"),
    (ldap_with(servers=["ldapi://relative%2Fsocket"]), "usermaps.people.servers[0]: expected ldapi://"),
    (ldap_with(servers=["ldapi://%2Frun%2Fldapi/dc=x"]), "usermaps.people.servers[0]: expected ldapi://"),
    (config_with(state_dir=5), "state_dir: expected a string"),
    ({"usermaps": {"f": {"type": "file"}}}, "usermaps.f.path: required"),
    ({"usermaps": {"bad name": {"type": "file", "path": "x"}}}, "usermaps.bad name: map names"),
    (config_with(domains="example.com"), "domains: expected a list"),
    (config_with(domains=["example.com", "exa mple.com"]), "domains[1]:"),
    (config_with(recipient_delimiter="@"), "recipient_delimiter: '@' cannot be a delimiter"),
    (config_with(recipient_delimiter=5), "recipient_delimiter: expected a string"),
    (config_with(cache={"ttl": -1}), "cache.ttl: must be between"),
    (config_with(cache={"size": 5}), "cache.size: unknown key"),
    (config_with(cache={"max_entries": "many"}), "cache.max_entries: expected a whole number"),
    (config_with(listen={"protocol": "policy"}), "listen: expected a list"),
    (config_with(listen=[{"protocol": "smtp", "address": "inet:127.0.0.1:1"}]), "listen[0].protocol: expected one of"),
    (config_with(listen=[{"protocol": "policy"}]), "listen[0].address: required"),
    (config_with(listen=[{"protocol": "policy", "address": "127.0.0.1:10040"}]), "listen[0].address: expected inet:"),
    (config_with(listen=[{"protocol": "policy", "address": "inet:127.0.0.1:99999"}]), "listen[0].address: port out"),
    (config_with(listen=[{"protocol": "policy", "address": "inet:::1:10040"}]), "listen[0].address: expected inet:"),
    (config_with(listen=[{"protocol": "policy", "address": "inet:127.0.0.1:1", "mode": "0660"}]),
     "listen[0].mode: only for unix"),
    (config_with(listen=[{"protocol": "policy", "address": "unix:/run/a.sock", "mode": 660}]),
     "listen[0].mode: expected an octal string"),
    (config_with(listen=[{"protocol": "policy", "address": "unix:/" + "x" * 120}]),
     "listen[0].address: unix socket path longer"),
    (config_with(listen=[{"protocol": "tcp_table", "address": "inet:127.0.0.1:1"}]), "listen[0].map: required"),
    (config_with(listen=[{"protocol": "tcp_table", "address": "inet:127.0.0.1:1", "map": "nope"}]),
     "listen[0].map: no map named 'nope'"),
    (config_with(listen=[{"protocol": "policy", "address": "inet:127.0.0.1:1", "map": "x"}]),
     "listen[0].map: only for tcp_table and readsocket"),
    (config_with(listen=[{"protocol": "policy", "address": "inet:127.0.0.1:1"},
                         {"protocol": "socketmap", "address": "inet:127.0.0.1:1"}]),
     "listen[1].address: same address as listen[0]"),
    (config_with(listen=[{"protocol": "policy", "address": "inet:127.0.0.1:1", "max_connections": 0}]),
     "listen[0].max_connections: must be between"),
    (config_with(maps={"t": {"usermap": "nope"}}), "maps.t.usermap: no user map named 'nope'"),
    (config_with(maps={"t": {"result": ""}}), "maps.t.result: must not be empty"),
    (config_with(maps={"t": {"result": "relay:[%h]"}}), "maps.t.result: unknown escape %h"),
    (config_with(maps={"t": {"result": "a\nb"}}), "maps.t.result: must not contain control characters"),
    (config_with(maps={"t": {"type": "hash"}}), "maps.t.type: expected address, domain or owner"),
    (config_with(maps={"d": {"type": "domain"}}), "maps.d.type: a domain map needs the top-level domains"),
    (config_with(maps={"t": {"usermap": "people", "color": 1}}), "maps.t.color: unknown key"),
    (config_with(policy={"mapped": ""}), "policy.mapped: must not be empty"),
    (config_with(policy={"mapped": "450"}), "policy.mapped: expected an action word"),
    (config_with(policy={"tempfail": "450"}), "policy.tempfail: expected an action word"),
    (config_with(policy={"unmapped": "OK"}), "policy.unmapped: 'OK' would let Postfix relay"),
    (config_with(policy={"tempfail": "relay now"}), "policy.tempfail: 'relay now' would let Postfix relay"),
    (config_with(policy={"unmapped": "REJECT %s"}), "policy.unmapped: only policy.mapped can use %s"),
    (config_with(policy={"usermap": "nope"}), "policy.usermap: no user map named 'nope'"),
]


@pytest.mark.parametrize(("raw", "message"), BAD, ids=[m.split(":")[0] + "-" + str(i) for i, (_, m) in enumerate(BAD)])
def test_invalid_configuration_names_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(raw, "/etc/axpolicy/axpolicy.yml")
    assert str(info.value).startswith(message)


def test_listeners_maps_and_policy_are_parsed() -> None:
    config = parse(config_with(
        domains=["example.com"],
        listen=[{"protocol": "policy", "address": "inet:127.0.0.1:10040"},
                {"protocol": "socketmap", "address": "unix:/var/spool/postfix/private/axpolicy", "mode": "0660",
                 "group": "postfix"},
                {"protocol": "tcp_table", "address": "inet:[::1]:10042", "map": "transport", "idle_timeout": 5}],
        maps={"transport": {"usermap": "people", "result": "relay:[%s]"}, "domain": {"type": "domain"}},
        policy={"mapped": "OK", "tempfail": "450 4.3.0 try later"}), "/etc/axpolicy/axpolicy.yml")
    policy, socketmap, tcp = config.listen
    assert (policy.family, policy.host, policy.port, policy.idle_timeout) == ("inet", "127.0.0.1", 10040, 330.0)
    assert (socketmap.family, socketmap.path, socketmap.mode, socketmap.group) == (
        "unix", "/var/spool/postfix/private/axpolicy", 0o660, "postfix")
    assert (tcp.host, tcp.map, tcp.idle_timeout) == ("::1", "transport", 5.0)
    assert config.maps["domain"].result == "OK"
    assert config.maps["transport"].usermap == "people"
    assert config.policy.tempfail == "450 4.3.0 try later"


def test_unreadable_and_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.yml"))
    bad = tmp_path / "bad.yml"
    bad.write_text("usermaps: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(str(bad))


def servable(config: dict[str, Any]) -> dict[str, Any]:
    """*config* with what serve (and so check-config) also needs: a listener and an account to drop to."""
    return {"listen": [{"protocol": "socketmap", "address": "inet:127.0.0.1:10041"}], "user": "nobody", **config}


def test_check_config_prints_the_effective_configuration_with_secrets_masked(
        write_config: Callable[[dict[str, Any]], Path]) -> None:
    path = write_config(servable(ldap_with(bind_dn="cn=axpolicy,dc=example,dc=com", bind_password="hunter2-secret")))
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


def readsocket_config(timeout: float, delimiter: str = "+") -> dict[str, Any]:
    return ldap_with(timeout=timeout) | {
        "recipient_delimiter": delimiter, "user": "nobody",
        "listen": [{"protocol": "readsocket", "address": "unix:/run/axpolicy/exim.sock"}],
        "maps": {"mailhost": {"usermap": "people", "result": "%s"}}}


def test_check_config_warns_when_lookups_can_outlast_exims_readsocket_timeout(
        write_config: Callable[[dict[str, Any]], Path]) -> None:
    slow = axpolicy_cli("check-config", "-c", str(write_config(readsocket_config(3))))
    assert slow.returncode == 0
    assert "warning: usermaps.people.timeout: 3s x 2 lookup(s) per address can exceed Exim's readsocket " \
           "timeout of 5s" in slow.stderr
    fine = axpolicy_cli("check-config", "-c", str(write_config(readsocket_config(2))))
    assert (fine.returncode, fine.stderr) == (0, "")
    no_delimiter = axpolicy_cli("check-config", "-c", str(write_config(readsocket_config(4, delimiter=""))))
    assert (no_delimiter.returncode, no_delimiter.stderr) == (0, "")


def test_the_shipped_configurations_are_valid_and_quiet(tmp_path: Path) -> None:
    from tests.conftest import ROOT
    secret = tmp_path / "ldap.secret"
    secret.write_text("x\n")
    for shipped in ("postfix/axpolicy.yml", "exim/axpolicy.yml", "examples/axpolicy.yml", "contrib/axpolicy.yml"):
        data = yaml.safe_load((ROOT / shipped).read_text())
        if data.get("user") == "axpolicy":
            data["user"], data["group"] = "nobody", "nogroup"   # no such account on test machines
        for usermap in data["usermaps"].values():
            if "bind_password_file" in usermap:
                usermap["bind_password_file"] = str(secret)
        path = tmp_path / shipped.replace("/", "-")
        path.write_text(yaml.safe_dump(data))
        if shipped.startswith("examples"):
            (tmp_path / "usermap").write_text((ROOT / "examples" / "usermap").read_text())
        proc = axpolicy_cli("check-config", "-c", str(path))
        assert (proc.returncode, proc.stderr) == (0, ""), shipped


# --------------------------------------------------------------------------
# check-config refuses what serve refuses, and never echoes a file


@pytest.mark.parametrize("kind", ["missing", "device", "fifo"])
def test_check_config_reads_the_user_map_files_as_serve_does(
        write_config: Callable[[dict[str, Any]], Path], tmp_path: Path, kind: str) -> None:
    path = tmp_path / "usermap"
    if kind == "device":
        path = Path("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    config = write_config(servable({"usermaps": {"local": {"type": "file", "path": str(path)}}}))
    for command in ("check-config", "serve"):
        proc = axpolicy_cli(command, "-c", str(config), timeout=20)      # a FIFO must not hang either
        assert proc.returncode == 78, (command, proc.stderr)
        assert str(path) in proc.stderr, (command, proc.stderr)
        assert "victim" not in proc.stderr


def test_check_config_warns_about_a_user_map_entry_with_a_bad_host(
        write_config: Callable[[dict[str, Any]], Path], tmp_path: Path) -> None:
    path = tmp_path / "usermap"
    path.write_text("alice@example.com 127.0.0.2\nbob@example.com ::1%x],[victim.test]\n")
    proc = axpolicy_cli("check-config", "-c", str(write_config(servable(
        {"usermaps": {"local": {"type": "file", "path": str(path)}}}))))
    assert proc.returncode == 0
    assert f"{path}:2: the host is not a host name or IP address; the entry is a temporary failure" in proc.stderr
    assert "victim" not in proc.stderr


@pytest.mark.parametrize(("config", "message"), [
    ({"listen": []}, "listen: no listeners configured"),
    ({"user": None}, "user: required when axpolicy is started as root"),
])
def test_check_config_refuses_a_configuration_serve_would_not_start(
        write_config: Callable[[dict[str, Any]], Path], tmp_path: Path, config: dict[str, Any], message: str) -> None:
    if os.geteuid() != 0 and config.get("user", "") is None:
        pytest.skip("only a root start needs user:")
    (tmp_path / "usermap").write_text("alice@example.com 127.0.0.2\n")
    raw = servable({"usermaps": {"local": {"type": "file", "path": str(tmp_path / "usermap")}}}) | config
    proc = axpolicy_cli("check-config", "-c", str(write_config({k: v for k, v in raw.items() if v is not None})))
    assert (proc.returncode, proc.stdout) == (78, "")
    assert message in proc.stderr


def test_a_fifo_as_the_configuration_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "axpolicy.yml"
    os.mkfifo(fifo)
    for command in ("check-config", "serve"):
        proc = axpolicy_cli(command, "-c", str(fifo), timeout=20)
        assert proc.returncode == 78
        assert f"{fifo}: not a regular file" in proc.stderr


SHADOW = "root:$y$j9T$5ecretSalt$h4shOfTheRootPassword:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n" \
         "Debian-exim:!:20790::::::\n"


@pytest.mark.parametrize("contents", [SHADOW, "root:x:0:0:root:/root:/bin/bash\n  - secret: [\n", "a: *h4sh\n"])
def test_errors_never_quote_a_file_that_is_not_a_configuration(tmp_path: Path, contents: str) -> None:
    """check-config -c pointed (by a typo or a link) at /etc/shadow must not print its lines."""
    target = tmp_path / "shadow"
    target.write_text(contents)
    link = tmp_path / "axpolicy.yml"
    link.symlink_to(target)
    proc = axpolicy_cli("check-config", "-c", str(link))
    assert proc.returncode == 78
    for word in ("h4sh", "5ecret", "Debian-exim", "20228", "secret", "/root"):
        assert word not in proc.stderr, proc.stderr
    assert "line" in proc.stderr, proc.stderr        # where, instead of what


def test_the_real_shadow_file_is_not_echoed(tmp_path: Path) -> None:
    shadow = Path("/etc/shadow")
    if not os.access(shadow, os.R_OK):
        pytest.skip("/etc/shadow is not readable here")
    link = tmp_path / "axpolicy.yml"
    link.symlink_to(shadow)
    proc = axpolicy_cli("check-config", "-c", str(link))
    assert proc.returncode == 78
    for line in shadow.read_text().splitlines():
        name, password = line.split(":")[:2]
        assert line not in proc.stderr and f"{name}:" not in proc.stderr, proc.stderr
        assert len(password) < 3 or password not in proc.stderr, proc.stderr


def test_a_secret_file_that_is_not_a_file_is_refused(write_config: Callable[[dict[str, Any]], Path]) -> None:
    proc = axpolicy_cli("check-config", "-c", str(write_config(servable(
        ldap_with(bind_dn="cn=x", bind_password_file="/dev/zero")))), timeout=20)
    assert proc.returncode == 78
    assert "usermaps.people.bind_password_file: /dev/zero: not a regular file" in proc.stderr


@pytest.mark.parametrize(("config", "message"), [
    (ldap_with() | {"maps": {"senders": {"type": "owner"}}}, "maps.senders.type: an owner map needs the auth section"),
    (ldap_with() | {"auth": {"usermap": "people"}, "maps": {"senders": {"type": "owner", "result": "x"}}},
     "maps.senders.result: an owner map answers"),
    (ldap_with() | {"maps": {"m": {"usermap": "people", "send_as": "x"}}}, "maps.m.send_as: only for owner maps"),
    (ldap_with() | {"auth": {}}, "auth.usermap: required"),
    (ldap_with() | {"auth": {"usermap": "people", "max_failures": 0}}, "auth.max_failures: must be between"),
    (ldap_with() | {"listen": [{"protocol": "dovecot_auth", "address": "inet:127.0.0.1:10044"}]},
     "listen[0].protocol: dovecot_auth needs the auth section"),
])
def test_auth_and_owner_maps_are_validated(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(config, "/etc/axpolicy/axpolicy.yml")
    assert str(info.value).startswith(message), str(info.value)
