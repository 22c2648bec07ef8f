"""``axpolicy doctor``: every finding from a broken configuration, none from what ships.

Offline checks read real Postfix configuration directories through
``postconf -c DIR`` and Exim files built like the Exim tests build theirs;
directory checks bind to real slapd instances; the live probe talks to
running private Postfix front-ends; ``--peers`` reads running daemons'
metrics.  A configuration directory is the shipped recipe plus the one
mistake under test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from axpolicy.config import load
from axpolicy.doctor import exim as exim_checks
from axpolicy.doctor import postfix as postfix_checks
from axpolicy.doctor.findings import Finding, error, exit_status, unreachable, warning
from axpolicy.doctor.served import Served
from tests.conftest import axpolicy_cli, ldap_map, seed_ldif, shipped_config
from tests.daemon import Axpolicy
from tests.exim import FRAGMENTS, Exim
from tests.postfix import RECIPES
from tests.slapd import BIND_DN, Slapd, free_port

HERE_SHIPPED = ["main.cf.recipe-a", "main.cf.recipe-b"]


# --- helpers ---------------------------------------------------------------

def postfix_dir(directory: Path, recipe: str = "main.cf.recipe-a", main: str = "",
                master: dict[str, str] | None = None) -> Path:
    """A Postfix configuration directory: the shipped recipe, main.cf.auth and master.cf, plus *main*."""
    directory.mkdir(parents=True, exist_ok=True)
    text = ("compatibility_level = 3.6\n" + (RECIPES / recipe).read_text() + (RECIPES / "main.cf.auth").read_text()
            + main)
    (directory / "main.cf").write_text(text)
    master_text = (RECIPES / "master.cf").read_text()
    for old, new in (master or {}).items():
        assert old in master_text, old
        master_text = master_text.replace(old, new)
    (directory / "master.cf").write_text(master_text)
    past = time.time() - 10
    for name in ("main.cf", "master.cf"):
        os.utime(directory / name, (past, past))
    return directory


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def postfix_served(slapd_primary: Slapd, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Served]:
    """postfix/axpolicy.yml as shipped (socket paths too), pointed at the test directory."""
    workdir = tmp_path_factory.mktemp("doctor-postfix")
    path = write_yaml(workdir / "axpolicy.yml", shipped_config(RECIPES / "axpolicy.yml", workdir, slapd_primary))
    return path, Served(load(str(path)))


def ids(findings: list[Finding]) -> list[str]:
    return [f.id for f in findings]


def postfix_findings(tmp_path: Path, served: Served, **kwargs: Any) -> list[Finding]:
    return postfix_checks.check(str(postfix_dir(tmp_path / "pf", **kwargs)), served)


def doctor(*args: str) -> tuple[int, list[dict[str, str]]]:
    proc = axpolicy_cli("doctor", "--json", *args, timeout=300)
    assert proc.stdout.startswith("["), (proc.stdout, proc.stderr)
    return proc.returncode, json.loads(proc.stdout)


# --- exit status -------------------------------------------------------------

def test_exit_status_orders_errors_before_unreachable_before_warnings() -> None:
    e = error("x.e", "w", "m", "f")
    w = warning("x.w", "w", "m", "f")
    u = unreachable("x.u", "w", "m", "f")
    assert exit_status([]) == 0
    assert exit_status([w]) == 1
    assert exit_status([w, e, u]) == 2
    assert exit_status([u]) == 75
    assert exit_status([u, w]) == 1         # something else was wrong: the warning counts


# --- the shipped configurations are clean ------------------------------------

@pytest.mark.parametrize("recipe", HERE_SHIPPED)
def test_shipped_postfix_recipes_trigger_nothing(recipe: str, postfix_served: tuple[Path, Served],
                                                 tmp_path: Path) -> None:
    config_path, _ = postfix_served
    rc, found = doctor("-c", str(config_path), "--postfix-config", str(postfix_dir(tmp_path / "pf", recipe)))
    assert (rc, found) == (0, [])


def test_shipped_exim_fragments_trigger_nothing(slapd_primary: Slapd, tmp_path: Path) -> None:
    config = shipped_config(FRAGMENTS / "axpolicy.yml", tmp_path, slapd_primary)
    config["listen"][0]["address"] = f"unix:{tmp_path}/exim.sock"
    config_path = write_yaml(tmp_path / "axpolicy.yml", config)
    exim = Exim(tmp_path / "exim", f"{tmp_path}/exim.sock", sink_port=25, authenticators=True)
    rc, found = doctor("-c", str(config_path), "--exim-config", str(exim.config))
    assert (rc, found) == (0, [])


# --- Postfix: the relay decision ---------------------------------------------

@pytest.mark.parametrize("restrictions, culprit", [
    ("check_policy_service inet:127.0.0.1:10040, reject_unauth_destination", "check_policy_service"),
    ("permit_mynetworks, permit, reject_unauth_destination", "permit"),
    ("check_recipient_access hash:/etc/postfix/rcpt, reject_unauth_destination", "check_recipient_access"),
    ("permit_dnswl_client list.dnswl.invalid, reject_unauth_destination", "permit_dnswl_client"),
    ("permit_tls_all_clientcerts, reject_unauth_destination", "permit_tls_all_clientcerts"),
])
def test_anything_that_can_permit_before_reject_unauth_destination_is_an_open_relay(
        restrictions: str, culprit: str, postfix_served: tuple[Path, Served], tmp_path: Path) -> None:
    found = postfix_findings(tmp_path, postfix_served[1], main=f"smtpd_relay_restrictions = {restrictions}\n")
    relay = [f for f in found if f.id == "postfix.relay-order"]
    assert len(relay) == 1 and relay[0].severity == "error", found
    assert culprit in relay[0].message and "smtp/inet" in relay[0].message
    assert relay[0].where.endswith("smtpd_relay_restrictions") and "/main.cf:" in relay[0].where


def test_sasl_that_accepts_anonymous_logins_opens_the_relay(postfix_served: tuple[Path, Served],
                                                            tmp_path: Path) -> None:
    found = postfix_findings(tmp_path, postfix_served[1],
                             master={"-o smtpd_sasl_auth_enable=yes\n        -o smtpd_tls_auth_only=yes":
                                     "-o smtpd_sasl_auth_enable=yes\n        -o smtpd_tls_auth_only=yes\n"
                                     "        -o smtpd_relay_restrictions=permit_sasl_authenticated,"
                                     "reject_unauth_destination\n        -o smtpd_sasl_security_options="})
    relay = [f for f in found if f.id == "postfix.relay-order"]
    assert len(relay) == 1 and "submission/inet" in relay[0].message and "anonymous" in relay[0].message
    assert "master.cf" in relay[0].where and "-o smtpd_relay_restrictions" in relay[0].where


def test_an_empty_relay_list_makes_the_recipient_list_the_relay_decision(postfix_served: tuple[Path, Served],
                                                                        tmp_path: Path) -> None:
    found = postfix_findings(tmp_path, postfix_served[1], main=(
        "compatibility_level = 2\nsmtpd_relay_restrictions =\n"
        "smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:10040, reject_unauth_destination\n"))
    assert ids(found) == ["postfix.relay-order"]
    assert "smtpd_recipient_restrictions" in found[0].message


def test_a_relay_list_without_any_refusal_is_an_error(postfix_served: tuple[Path, Served], tmp_path: Path) -> None:
    found = postfix_findings(tmp_path, postfix_served[1],
                             main="smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated\n")
    assert ids(found) == ["postfix.relay-missing"]


def test_a_public_mynetworks_with_permit_mynetworks_is_an_open_relay(postfix_served: tuple[Path, Served],
                                                                     tmp_path: Path) -> None:
    found = postfix_findings(tmp_path, postfix_served[1],
                             main="mynetworks = 127.0.0.0/8 [::1]/128 10.0.0.0/8 198.51.100.7 0.0.0.0/0\n")
    wide = [f for f in found if f.id == "postfix.mynetworks-wide"]
    assert [w.severity for w in wide] == ["error"]
    assert "0.0.0.0/0" in wide[0].message
    assert ids(found) == ["postfix.mynetworks-wide"]


# --- Postfix: maps and sockets -------------------------------------------------

def test_a_map_name_axpolicy_does_not_serve(postfix_served: tuple[Path, Served], tmp_path: Path) -> None:
    found = postfix_findings(tmp_path, postfix_served[1],
                             main="transport_maps = socketmap:unix:private/axpolicy:transports\n")
    assert ids(found) == ["postfix.map-unserved"]
    assert "'transports'" in found[0].message and found[0].severity == "error"


def test_an_axpolicy_socket_that_is_not_in_the_configuration(postfix_served: tuple[Path, Served],
                                                             tmp_path: Path) -> None:
    found = postfix_findings(tmp_path, postfix_served[1],
                             main="relay_recipient_maps = socketmap:unix:private/axpolicy-old:recipient\n")
    assert ids(found) == ["postfix.map-unserved"]


def test_a_socket_of_another_protocol(postfix_served: tuple[Path, Served], tmp_path: Path) -> None:
    found = postfix_findings(tmp_path, postfix_served[1], main="smtpd_sasl_path = private/axpolicy\n",
                             recipe="main.cf.recipe-b")
    assert ids(found) == ["postfix.map-protocol"]
    assert "socketmap listener" in found[0].message and "dovecot_auth" in found[0].message


def test_a_policy_service_nothing_listens_on(postfix_served: tuple[Path, Served], tmp_path: Path) -> None:
    port = free_port()
    found = postfix_findings(tmp_path, postfix_served[1], main=(
        "smtpd_recipient_restrictions = reject_unauth_destination, "
        f"check_policy_service inet:127.0.0.1:{port}\n"))
    assert ids(found) == ["postfix.socket-unserved"]


def test_an_absolute_socket_path_in_a_chrooted_smtpd(postfix_served: tuple[Path, Served], tmp_path: Path) -> None:
    absolute = "transport_maps = socketmap:unix:/var/spool/postfix/private/axpolicy:transport\n"
    found = postfix_findings(tmp_path, postfix_served[1], main=absolute)
    assert ids(found) == ["postfix.chroot-socket"]
    # Unchrooted, the same absolute path is right.
    unchrooted = postfix_findings(tmp_path, postfix_served[1], main=absolute,
                                  master={"smtp      inet  n       -       y": "smtp      inet  n       -       n",
                                          "submission inet n       -       y": "submission inet n       -       n",
                                          "submissions inet n      -       y": "submissions inet n      -       n"})
    assert unchrooted == []


def test_no_smtpd_on_port_25(postfix_served: tuple[Path, Served], tmp_path: Path) -> None:
    found = postfix_findings(tmp_path, postfix_served[1], master={"smtp      inet": "2525      inet"})
    assert ids(found) == ["postfix.no-smtpd-25"]
    assert found[0].severity == "error"


def test_a_different_recipient_delimiter(postfix_served: tuple[Path, Served], tmp_path: Path) -> None:
    found = postfix_findings(tmp_path, postfix_served[1], main="recipient_delimiter = -\n")
    assert ids(found) == ["postfix.delimiter"] and found[0].severity == "warning"


def test_a_policy_timeout_shorter_than_the_user_map_deadline(postfix_served: tuple[Path, Served],
                                                             tmp_path: Path) -> None:
    # The shipped map: timeout 1 s (the test's), delimiter "+": two lookups -> 2 s.
    found = postfix_findings(tmp_path, postfix_served[1], main=(
        "smtpd_recipient_restrictions = check_policy_service { inet:127.0.0.1:10040, timeout=1s }\n"))
    assert ids(found) == ["postfix.timeout"]
    assert "1s" in found[0].message and "2s" in found[0].message


def test_permit_sasl_authenticated_before_the_sender_login_check(postfix_served: tuple[Path, Served],
                                                                 tmp_path: Path) -> None:
    tail = "\n        -o smtpd_recipient_restrictions=\nsubmissions"
    found = postfix_findings(tmp_path, postfix_served[1], master={
        "-o smtpd_sender_restrictions=reject_sender_login_mismatch" + tail:
            "-o smtpd_sender_restrictions=permit_sasl_authenticated,reject_sender_login_mismatch" + tail})
    assert ids(found) == ["postfix.sasl-before-login-mismatch"]
    assert "submission/inet" in found[0].message


def test_auth_offered_without_tls(postfix_served: tuple[Path, Served], tmp_path: Path) -> None:
    indent = "\n        "
    found = postfix_findings(tmp_path, postfix_served[1], master={
        f"-o smtpd_tls_security_level=encrypt{indent}-o smtpd_sasl_auth_enable=yes{indent}-o smtpd_tls_auth_only=yes":
            "-o smtpd_sasl_auth_enable=yes"})
    assert ids(found) == ["postfix.auth-without-tls"]


def test_more_postfix_processes_than_max_connections(postfix_served: tuple[Path, Served], tmp_path: Path) -> None:
    found = postfix_findings(tmp_path, postfix_served[1], main="default_process_limit = 400\n")
    assert set(ids(found)) == {"postfix.process-limit"}
    assert any("1200" in f.message for f in found)


def test_an_unreadable_postfix_directory(postfix_served: tuple[Path, Served], tmp_path: Path) -> None:
    found = postfix_checks.check(str(tmp_path / "missing"), postfix_served[1])
    assert ids(found) == ["postfix.unreadable"]


# --- Exim ------------------------------------------------------------------

@pytest.fixture
def exim_case(slapd_primary: Slapd, tmp_path: Path) -> tuple[Exim, Served]:
    config = shipped_config(FRAGMENTS / "axpolicy.yml", tmp_path, slapd_primary)
    config["listen"][0]["address"] = f"unix:{tmp_path}/exim.sock"
    served = Served(load(str(write_yaml(tmp_path / "axpolicy.yml", config))))
    return Exim(tmp_path / "exim", f"{tmp_path}/exim.sock", sink_port=25, authenticators=True), served


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


DEBIAN_EXIM = Path(__file__).resolve().parent.parent / ".cache" / "exim"
UPDATE_CONF = """\
dc_eximconfig_configtype='internet'
dc_other_hostnames=''
dc_local_interfaces='127.0.0.1'
dc_relay_domains='example.com : example.net'
dc_relay_nets=''
dc_smarthost=''
dc_minimaldns='false'
dc_use_split_config='true'
dc_hide_mailname=''
dc_mailname_in_oh='true'
dc_localdelivery='mail_spool'
"""


def debian_split_config(workdir: Path, router: str = "175_axpolicy", acl_file: str | None = None) -> Path:
    """Debian's split configuration with the exim/ fragments where exim/README.rst puts them, generated
    by Debian's own update-exim4.conf (from the unpacked exim4-config)."""
    confdir = workdir / "exim4"
    shutil.copytree(DEBIAN_EXIM / "etc" / "exim4", confdir)
    (confdir / "update-exim4.conf.conf").write_text(UPDATE_CONF)
    shutil.copy(FRAGMENTS / "main.conf", confdir / "conf.d" / "main" / "00_axpolicy")
    shutil.copy(FRAGMENTS / "router.conf", confdir / "conf.d" / "router" / router)
    acl_dir = confdir / "conf.d" / "acl"
    if acl_file is not None:
        shutil.copy(FRAGMENTS / "acl.conf", acl_dir / acl_file)
    else:   # pasted before "accept hosts = +relay_from_hosts", as the README says
        check_rcpt = acl_dir / "30_exim4-config_check_rcpt"
        anchor = "  accept\n    hosts = +relay_from_hosts\n"
        text = check_rcpt.read_text()
        assert text.count(anchor) == 1
        check_rcpt.write_text(text.replace(anchor, (FRAGMENTS / "acl.conf").read_text() + "\n" + anchor))
    output = workdir / "config.autogenerated"
    proc = subprocess.run(["sh", str(DEBIAN_EXIM / "usr" / "sbin" / "update-exim4.conf"), "-d", str(confdir),
                           "-o", str(output)], capture_output=True, text=True, timeout=60)
    assert output.exists(), proc.stderr
    return output


def test_debian_split_configuration_with_the_fragments_in_place_is_clean(exim_case: tuple[Exim, Served],
                                                                         tmp_path: Path) -> None:
    _, served = exim_case
    shipped = Served(dataclasses.replace(served.config, listen=tuple(
        dataclasses.replace(listener, path="/run/axpolicy/exim.sock") for listener in served.config.listen)))
    assert exim_checks.check(str(debian_split_config(tmp_path / "good")), shipped) == []
    # The router file named so that it sorts after 200_exim4-config_primary (dnslookup).
    found = exim_checks.check(str(debian_split_config(tmp_path / "late", "250_axpolicy")), shipped)
    assert ids(found) == ["exim.router-order"] and "dnslookup_relay_to_domains" in found[0].message
    # The ACL statements as a file of their own: inside acl_local_deny_exceptions.
    found = exim_checks.check(str(debian_split_config(tmp_path / "acl", acl_file="25_axpolicy")), shipped)
    assert ids(found) == ["exim.acl-placement"] and "acl_local_deny_exceptions" in found[0].message


def test_exim_routers_after_dnslookup(exim_case: tuple[Exim, Served]) -> None:
    exim, served = exim_case
    edit(exim.config, "begin routers\n", "begin routers\ndnslookup:\n  driver = dnslookup\n"
                                         "  domains = ! +local_domains\n  transport = remote_smtp\n")
    found = exim_checks.check(str(exim.config), served)
    assert ids(found) == ["exim.router-order"] and found[0].severity == "error"
    assert "axpolicy_lookup" in found[0].message


def test_exim_relay_to_domains_wider_than_axpolicy(exim_case: tuple[Exim, Served]) -> None:
    exim, served = exim_case
    edit(exim.config, "relay_to_domains = example.com : example.net",
         "relay_to_domains = example.com : example.net : example.org")
    found = exim_checks.check(str(exim.config), served)
    assert ids(found) == ["exim.relay-domains-wider"] and found[0].severity == "warning"
    edit(exim.config, "example.net : example.org", "*")
    found = exim_checks.check(str(exim.config), served)
    assert ids(found) == ["exim.relay-domains-wider"] and found[0].severity == "error"


def test_exim_readsocket_timeout_shorter_than_the_deadline(exim_case: tuple[Exim, Served]) -> None:
    exim, served = exim_case
    edit(exim.config, "AXPOLICY_TIMEOUT = 5s", "AXPOLICY_TIMEOUT = 1s")
    found = exim_checks.check(str(exim.config), served)
    assert set(ids(found)) == {"exim.timeout"}
    assert any("'mailhost'" in f.message for f in found) and any("'AUTH'" in f.message for f in found)


def test_exim_socket_and_map_that_axpolicy_does_not_serve(exim_case: tuple[Exim, Served], tmp_path: Path) -> None:
    exim, served = exim_case
    edit(exim.config, f"AXPOLICY_SOCKET = {tmp_path}/exim.sock", "AXPOLICY_SOCKET = /run/axpolicy/other.sock")
    found = exim_checks.check(str(exim.config), served)
    assert set(ids(found)) == {"exim.socket-unserved"} and found[0].severity == "error"
    edit(exim.config, "AXPOLICY_SOCKET = /run/axpolicy/other.sock", f"AXPOLICY_SOCKET = {tmp_path}/exim.sock")
    edit(exim.config, "{mailhost $local_part@$domain}", "{mailhosts $local_part@$domain}")
    found = exim_checks.check(str(exim.config), served)
    assert set(ids(found)) == {"exim.map-unserved"}
    assert "'mailhosts'" in found[0].message


def test_exim_includes_and_macros_are_followed(exim_case: tuple[Exim, Served], tmp_path: Path) -> None:
    exim, served = exim_case
    main = tmp_path / "main-macros.conf"
    main.write_text("AXPOLICY_TIMEOUT = \\\n  1s\n")
    edit(exim.config, "AXPOLICY_TIMEOUT = 5s", f".include {main}")
    assert set(ids(exim_checks.check(str(exim.config), served))) == {"exim.timeout"}


# --- the directory -------------------------------------------------------------

@pytest.fixture(scope="module")
def slapd_hiding(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """A directory whose ACL hides mailHost from axpolicy's bind DN, and without syncprov."""
    server = Slapd(tmp_path_factory.mktemp("slapd-hiding"), seed_ldif(), syncprov=False,
                   access=f'access to attrs=mailHost\n  by dn.exact="{BIND_DN}" none\n  by * read\n')
    server.start()
    yield server
    server.destroy()


def directory_doctor(tmp_path: Path, *args: str, servers: list[Slapd], extra_servers: tuple[str, ...] = (),
                     **overrides: Any) -> tuple[int, list[dict[str, str]]]:
    """The doctor with an LDAP user map on *servers* (and an empty Exim file, so /etc/postfix is not read)."""
    usermap = ldap_map(*servers, **overrides)
    usermap["servers"] += list(extra_servers)
    config = {"usermaps": {"people": usermap}, "domains": ["example.com", "example.net"]}
    return doctor("-c", str(write_yaml(tmp_path / "axpolicy.yml", config)), "--exim-config", "/dev/null", *args)


def test_a_healthy_directory_with_a_sample_address(slapd: Slapd, tmp_path: Path) -> None:
    assert directory_doctor(tmp_path, servers=[slapd], replica=True) == (0, [])
    assert directory_doctor(tmp_path, "--probe-recipient", "bob@example.com", servers=[slapd]) == (0, [])


def test_a_directory_that_refuses_the_bind(slapd: Slapd, tmp_path: Path) -> None:
    rc, found = directory_doctor(tmp_path, servers=[slapd], bind_password="wrong")
    assert rc == 2 and [f["id"] for f in found] == ["directory.bind"]
    assert slapd.url in found[0]["where"] and "invalidCredentials" in found[0]["message"]


def test_a_server_that_is_down(slapd: Slapd, tmp_path: Path) -> None:
    down = f"ldap://127.0.0.1:{free_port()}"
    rc, found = directory_doctor(tmp_path, servers=[slapd], extra_servers=(down,))
    assert rc == 2 and [f["id"] for f in found] == ["directory.bind"] and down in found[0]["where"]


def test_a_base_that_does_not_exist(slapd: Slapd, tmp_path: Path) -> None:
    rc, found = directory_doctor(tmp_path, servers=[slapd], base="ou=nobody,dc=example,dc=com")
    assert rc == 2 and [f["id"] for f in found] == ["directory.base"]


def test_a_probe_recipient_the_directory_does_not_hold(slapd: Slapd, tmp_path: Path) -> None:
    rc, found = directory_doctor(tmp_path, "--probe-recipient", "nobody@example.com", servers=[slapd])
    assert rc == 2 and [f["id"] for f in found] == ["directory.sample"]


def test_an_acl_that_hides_the_host_attribute(slapd_hiding: Slapd, tmp_path: Path) -> None:
    rc, found = directory_doctor(tmp_path, servers=[slapd_hiding])
    assert rc == 2 and [f["id"] for f in found] == ["directory.host-attribute-hidden"]


def test_a_replica_without_the_replication_control(slapd_hiding: Slapd, tmp_path: Path) -> None:
    rc, found = directory_doctor(tmp_path, servers=[slapd_hiding], replica=True, host_attribute="uid")
    assert rc == 1 and [f["id"] for f in found] == ["directory.replica-unsupported"]


# --- the live probe --------------------------------------------------------------

@pytest.mark.parametrize("recipe", HERE_SHIPPED)
def test_the_probe_finds_no_relay_on_the_recipes(recipe: str, slapd: Slapd, tmp_path: Path) -> None:
    from tests.test_postfix import running_frontend

    substitutions = {"inet:127.0.0.1:10040": "inet:127.0.0.1:{policy_port}"} if recipe.endswith("a") else {}
    frontends = running_frontend(recipe, tmp_path, slapd, substitutions)
    running = next(frontends)
    try:
        rc, found = doctor("--exim-config", "/dev/null", "--probe", f"127.0.0.1:{running.postfix.port}",
                           "--probe-recipient", "alice@example.com")
        assert (rc, found) == (0, [])
        if recipe.endswith("b"):
            # A probe recipient the front-end refuses: the probe did not show a working front-end.
            rc, found = doctor("--exim-config", "/dev/null", "--probe", f"127.0.0.1:{running.postfix.port}",
                               "--probe-recipient", "nobody@example.com")
            assert rc == 2 and {f["id"] for f in found} == {"probe.recipient-refused"}
            assert "550" in found[0]["message"]
    finally:
        frontends.close()


def test_the_probe_finds_the_open_relay(slapd: Slapd, tmp_path: Path) -> None:
    from tests.test_postfix import running_frontend

    # The classic mistake: the front-end's own network range trusted.
    frontends = running_frontend("main.cf.recipe-b", tmp_path, slapd,
                                 {"recipient_delimiter = +": "recipient_delimiter = +\nmynetworks = 127.0.0.0/8"})
    running = next(frontends)
    try:
        rc, found = doctor("--exim-config", "/dev/null", "--probe", f"127.0.0.1:{running.postfix.port}",
                           "--probe-recipient", "alice@example.com")
        assert rc == 2
        relayed = [f["message"] for f in found if f["id"] == "probe.open-relay"]
        assert any(m.startswith("foreign domain accepted") for m in relayed), found
        assert any("RCPT TO:<relaytest@axpolicy-doctor.invalid> -> 250" in m for m in relayed)
        assert {f["id"] for f in found} == {"probe.open-relay"}
    finally:
        frontends.close()


def test_a_probe_target_that_is_not_host_and_port() -> None:
    rc, found = doctor("--exim-config", "/dev/null", "--probe", "mx1.example.com")
    assert rc == 2 and [f["id"] for f in found] == ["probe.target"]


def test_an_unreadable_exim_file(tmp_path: Path) -> None:
    rc, found = doctor("--exim-config", str(tmp_path / "missing.conf"))
    assert rc == 2 and [f["id"] for f in found] == ["exim.unreadable"]


def test_a_probe_that_cannot_connect_is_a_retry(tmp_path: Path) -> None:
    rc, found = doctor("--exim-config", "/dev/null", "--probe", f"127.0.0.1:{free_port()}")
    assert rc == 75 and [f["id"] for f in found] == ["probe.unreachable"]


# --- the cluster -----------------------------------------------------------------

def test_peers_with_another_configuration_are_named(tmp_path: Path) -> None:
    usermap = tmp_path / "usermap"
    usermap.write_text("alice@example.com 127.0.0.2\n")

    def config(ttl: int) -> dict[str, Any]:
        return {"usermaps": {"people": {"type": "file", "path": str(usermap)}},
                "cache": {"ttl": ttl}, "metrics": {"listen": f"127.0.0.1:{free_port()}"},
                "listen": [{"protocol": "socketmap", "address": f"unix:{tmp_path}/s{ttl}.sock"}],
                "maps": {"transport": {"usermap": "people"}}}

    with contextlib.ExitStack() as stack:
        daemons = [Axpolicy(tmp_path / f"fe{ttl}", config(ttl)) for ttl in (300, 60)]
        for daemon in daemons:
            stack.callback(daemon.stop)
            daemon.start()
        urls = [f"http://{d.config['metrics']['listen']}/metrics" for d in daemons]
        own = str(daemons[0].config_path)
        rc, found = doctor("--exim-config", "/dev/null", "-c", own, "--peers", *urls)
        assert rc == 2 and [(f["id"], f["where"]) for f in found] == [("cluster.drift", urls[1])]
        assert urls[1] in found[0]["message"] and "digest" in found[0]["message"]
        # Not a metrics page, and not a URL at all.
        health = urls[0].replace("/metrics", "/health")
        rc, found = doctor("--exim-config", "/dev/null", "-c", own, "--peers", health, "mx2.example.com:9100")
        assert rc == 2 and [f["id"] for f in found] == ["cluster.peer-unknown", "cluster.peer-url"]
        daemons[1].stop()
        rc, found = doctor("--exim-config", "/dev/null", "-c", own, "--peers", *urls)
        assert rc == 75 and [f["id"] for f in found] == ["cluster.peer-unreachable"]


def test_every_finding_identifier_is_documented_and_tested() -> None:
    root = Path(__file__).resolve().parent.parent
    source = "".join(path.read_text() for path in (root / "axpolicy" / "doctor").glob("*.py"))
    identifiers = set(re.findall(r'(?:error|warning|unreachable)\(\s*"([a-z]+\.[a-z0-9-]+)"', source))
    assert len(identifiers) >= 30
    readme = (root / "README.rst").read_text()
    assert {i for i in identifiers if f"``{i}``" not in readme} == set()
    # ... and each one is produced by a test of this file.
    assert {i for i in identifiers if f'"{i}"' not in Path(__file__).read_text()} == set()


def test_a_refused_probe_sender_is_a_warning(slapd: Slapd, tmp_path: Path) -> None:
    from tests.test_postfix import running_frontend

    # Senders of the hosted domains that the user map does not know are refused at MAIL FROM.
    frontends = running_frontend("main.cf.recipe-b", tmp_path, slapd, {"recipient_delimiter = +": (
        "recipient_delimiter = +\nsmtpd_delay_reject = no\nsmtpd_sender_restrictions = reject_unlisted_sender")})
    running = next(frontends)
    try:
        rc, found = doctor("--exim-config", "/dev/null", "--probe", f"127.0.0.1:{running.postfix.port}",
                           "--probe-recipient", "alice@example.com")
        assert rc == 1 and [(f["id"], f["severity"]) for f in found] == [("probe.mail-refused", "warning")]
        assert "MAIL FROM:<postmaster@example.com>" in found[0]["message"]
    finally:
        frontends.close()
