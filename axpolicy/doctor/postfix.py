"""Postfix checks: read the configuration as Postfix does, find relays and mis-wired maps.

DESCRIPTION
    The configuration is read with Postfix's own ``postconf -c DIR``: every
    parameter's effective value with ``$name`` expanded (``-x``), the
    services of master.cf (``-M``) and their ``-o`` overrides (``-P``).
    Nothing is parsed from main.cf except the line a parameter is on, for
    the finding's *where*.  Each smtpd service is checked with its own
    effective values (main.cf, then its ``-o`` overrides), because the
    submission ports usually differ from port 25.

    The relay decision is the list ``smtpd_relay_restrictions`` or, when it
    is empty, ``smtpd_recipient_restrictions``.  Walking it in order, any
    restriction that can answer "permit" for a foreign recipient before
    ``reject_unauth_destination`` (or ``defer_unauth_destination``, or a
    plain ``reject``/``defer``) opens a relay: ``permit``, a policy service,
    an access table, a DNS allow-list, any client certificate, or SASL
    that accepts anonymous logins.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import subprocess
from collections.abc import Iterator

from axpolicy.config import ListenConfig
from axpolicy.doctor.findings import Finding, error, warning
from axpolicy.doctor.served import Served

DEFAULT_DIRECTORY = "/etc/postfix"

RESTRICTION_LISTS = ("smtpd_client_restrictions", "smtpd_helo_restrictions", "smtpd_sender_restrictions",
                     "smtpd_relay_restrictions", "smtpd_recipient_restrictions", "smtpd_data_restrictions",
                     "smtpd_end_of_data_restrictions", "smtpd_etrn_restrictions")
# Tables axpolicy may be asked through (README.rst, the Postfix recipes).
AXPOLICY_TABLES = ("transport_maps", "relay_domains", "relay_recipient_maps", "smtpd_sender_login_maps")
GUARDS = frozenset({"reject_unauth_destination", "defer_unauth_destination", "reject", "defer"})
SAFE_PERMITS = frozenset({"permit_mynetworks", "permit_sasl_authenticated", "permit_auth_destination",
                          "permit_tls_clientcerts", "permit_inet_interfaces"})
# Restrictions that take the next element as their argument.
_WITH_ARGUMENT = re.compile(r"\A(check_\w+|reject_rbl_client|reject_rhsbl_\w+|permit_dnswl_client|"
                            r"permit_rhswl_client|reject_dnsbl_\w+)\Z")
LOGIN_MISMATCH = frozenset({"reject_sender_login_mismatch", "reject_authenticated_sender_login_mismatch",
                            "reject_known_sender_login_mismatch", "reject_unauthenticated_sender_login_mismatch"})
_SEPARATORS = ", \t\r\n"
_TIME = re.compile(r"\A(\d+)([smhdw]?)\Z")
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class PostfixReadError(Exception):
    """postconf could not read the configuration directory."""


@dataclasses.dataclass(frozen=True)
class Service:
    """One master.cf entry."""

    name: str
    type: str
    chroot: str
    maxproc: str
    command: str

    @property
    def label(self) -> str:
        return f"{self.name}/{self.type}"


def tokens(value: str) -> list[str]:
    """Split a Postfix list on commas and whitespace, keeping ``{ ... }`` groups whole."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] in _SEPARATORS:
            i += 1
            continue
        if value[i] == "{":
            depth, j = 0, i
            while j < len(value):
                depth += {"{": 1, "}": -1}.get(value[j], 0)
                if depth == 0:
                    break
                j += 1
            out.append(value[i:j + 1])
            i = j + 1
            continue
        j = i
        while j < len(value) and value[j] not in _SEPARATORS and value[j] != "{":
            j += 1
        out.append(value[i:j])
        i = j
    return out


def restrictions(value: str) -> list[tuple[str, str]]:
    """A restriction list as (restriction, argument) pairs; the argument is '' when it takes none."""
    items = tokens(value)
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(items):
        name = items[i]
        if _WITH_ARGUMENT.match(name) and i + 1 < len(items):
            out.append((name, items[i + 1]))
            i += 2
        else:
            out.append((name, ""))
            i += 1
    return out


def _ungroup(argument: str) -> tuple[str, dict[str, str]]:
    """``{ endpoint, name=value, ... }`` (or a bare endpoint) as the endpoint and its options."""
    if not argument.startswith("{"):
        return argument, {}
    parts = tokens(argument[1:-1])
    options: dict[str, str] = {}
    for part in parts[1:]:
        if part.startswith("{"):
            part = part[1:-1].strip()
        name, _, value = part.partition("=")
        options[name.strip()] = value.strip()
    return (parts[0] if parts else ""), options


def seconds(value: str) -> float | None:
    """A Postfix time value (``10s``, ``2m``, ``100``) in seconds; None when it is not one."""
    match = _TIME.match(value.strip())
    return float(int(match[1]) * _TIME_UNITS[match[2]]) if match else None


class PostfixConfig:
    """One Postfix configuration directory, as postconf reads it."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.params = self._pairs(self._postconf("-x"))
        self.explicit = set(self._pairs(self._postconf("-n")))
        self.services: list[Service] = []
        for line in self._postconf("-M").splitlines():
            fields = line.split()
            if len(fields) >= 8:
                self.services.append(Service(fields[0], fields[1], fields[4], fields[6], fields[7]))
        self.overrides: dict[str, dict[str, str]] = {}
        for key, value in self._pairs(self._postconf("-P", "-x")).items():
            name, kind, param = key.split("/", 2)
            self.overrides.setdefault(f"{name}/{kind}", {})[param] = value
        self._main_lines = self._lines("main.cf", re.compile(r"\A([A-Za-z0-9_]+)\s*="))
        self._master_lines = self._lines("master.cf", re.compile(r"\A(\S+\s+\S+)\s"))

    def _postconf(self, *args: str) -> str:
        try:
            proc = subprocess.run(["postconf", "-c", self.directory, *args], capture_output=True, text=True,
                                  timeout=60, env={**os.environ, "LC_ALL": "C"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostfixReadError(f"cannot run postconf: {exc}") from None
        if proc.returncode != 0:
            fatal = [line for line in proc.stderr.splitlines() if "fatal" in line] or proc.stderr.splitlines()
            raise PostfixReadError((fatal or ["postconf failed"])[-1])
        return proc.stdout

    @staticmethod
    def _pairs(text: str) -> dict[str, str]:
        pairs: dict[str, str] = {}
        for line in text.splitlines():
            name, sep, value = line.partition(" = ")
            if sep:
                pairs[name.strip()] = value.strip()
            elif line.endswith(" ="):
                pairs[line[:-2].strip()] = ""
        return pairs

    def _lines(self, name: str, pattern: re.Pattern[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        try:
            with open(os.path.join(self.directory, name), encoding="utf-8", errors="replace") as file:
                for number, line in enumerate(file, 1):
                    match = pattern.match(line)
                    if match:
                        found[" ".join(match[1].split())] = number
        except OSError:
            pass
        return found

    def smtpd_services(self) -> list[Service]:
        return [s for s in self.services if s.command == "smtpd"]

    def value(self, param: str, service: Service | None = None) -> str:
        """The effective value of *param* for *service* (its ``-o`` override, else main.cf)."""
        if service is not None and param in self.overrides.get(service.label, {}):
            return self.overrides[service.label][param]
        return self.params.get(param, "")

    def where(self, param: str, service: Service | None = None) -> str:
        """Where *param*'s value for *service* comes from: master.cf -o, main.cf:LINE, or the default."""
        if service is not None and param in self.overrides.get(service.label, {}):
            line = self._master_lines.get(f"{service.name} {service.type}")
            at = f":{line}" if line else ""
            return f"{self.directory}/master.cf{at} {service.label} -o {param}"
        if param in self.explicit:
            line = self._main_lines.get(param)
            at = f":{line}" if line else ""
            return f"{self.directory}/main.cf{at} {param}"
        return f"{self.directory}/main.cf {param} (default)"

    def service_where(self, service: Service) -> str:
        line = self._master_lines.get(f"{service.name} {service.type}")
        return f"{self.directory}/master.cf{f':{line}' if line else ''} {service.label}"

    def yes(self, param: str, service: Service | None = None) -> bool:
        return self.value(param, service).lower() in ("yes", "true", "1")

    def relay_list(self, service: Service) -> str:
        """The list Postfix decides relaying with: smtpd_relay_restrictions, or the recipient list if it is empty."""
        if tokens(self.value("smtpd_relay_restrictions", service)):
            return "smtpd_relay_restrictions"
        return "smtpd_recipient_restrictions"

    def chrooted(self) -> bool:
        """Whether the processes that open axpolicy's sockets (smtpd, trivial-rewrite) run chrooted."""
        return any(s.chroot == "y" for s in self.services if s.command in ("smtpd", "trivial-rewrite"))


def check(directory: str, served: Served | None) -> list[Finding]:
    """Every Postfix finding for the configuration in *directory*."""
    try:
        pf = PostfixConfig(directory)
    except PostfixReadError as exc:
        return [error("postfix.unreadable", directory, f"postconf cannot read this configuration: {exc}",
                      "point --postfix-config at the directory holding main.cf and master.cf")]
    findings = [*_relay(pf), *_mynetworks(pf), *_port25(pf), *_sasl(pf)]
    if served is not None:
        findings += [*_endpoints(pf, served), *_delimiter(pf, served)]
    return findings


def _relay(pf: PostfixConfig) -> Iterator[Finding]:
    for service in pf.smtpd_services():
        param = pf.relay_list(service)
        where = pf.where(param, service)
        sasl = pf.yes("smtpd_sasl_auth_enable", service)
        anonymous = sasl and "noanonymous" not in tokens(pf.value("smtpd_sasl_security_options", service))
        guarded = False
        for name, argument in restrictions(pf.value(param, service)):
            if name in GUARDS:
                guarded = True
                break
            opener = _opener(pf, name, anonymous)
            if opener:
                yield error("postfix.relay-order", where,
                            f"{service.label}: {name}{' ' + argument if argument else ''} comes before "
                            f"reject_unauth_destination in {param}; {opener}, so this front-end relays",
                            f"move {name} after reject_unauth_destination (or into smtpd_recipient_restrictions, "
                            f"evaluated after the relay decision)")
            elif name == "permit_mx_backup":
                yield warning("postfix.relay-order", where,
                              f"{service.label}: permit_mx_backup before reject_unauth_destination relays for any "
                              f"domain whose MX record names this host", "remove permit_mx_backup")
        if not guarded:
            yield error("postfix.relay-missing", where,
                        f"{service.label}: {param} has no reject_unauth_destination (nor defer_unauth_destination "
                        f"or reject): nothing refuses foreign recipients",
                        "end the list with reject_unauth_destination")


def _opener(pf: PostfixConfig, name: str, anonymous: bool) -> str:
    """Why *name* can permit a foreign recipient ('' when it cannot)."""
    if name == "permit":
        return "permit accepts every recipient"
    if name == "check_policy_service":
        return "a policy service's OK permits the recipient, foreign or not"
    if name.startswith("check_") and name.endswith("_access"):
        return f"an OK from the {name} table permits the recipient, foreign or not"
    if name == "permit_sasl_authenticated" and anonymous:
        return "smtpd_sasl_security_options allows anonymous logins, and anyone can log in"
    if name == "permit_tls_all_clientcerts":
        return "any client certificate that verifies permits relaying"
    if name.startswith("permit_") and name not in SAFE_PERMITS and name != "permit_mx_backup":
        return f"{name} permits clients that are not yours"
    if name in pf.params.get("smtpd_restriction_classes", "").replace(",", " ").split():
        return f"the restriction class {name} may permit"
    return ""


def _mynetworks(pf: PostfixConfig) -> Iterator[Finding]:
    trusting = [s.label for s in pf.smtpd_services()
                if _before_guard(pf.value(pf.relay_list(s), s), "permit_mynetworks")]
    if not trusting:
        return
    for entry in tokens(pf.params.get("mynetworks", "")):
        if entry.startswith("!") or (":" in entry and "/" not in entry and not entry.startswith("[")):
            continue  # a negation or a lookup table: not an address range
        try:
            network = ipaddress.ip_network(entry.replace("[", "").replace("]", ""), strict=False)
        except ValueError:
            continue
        if network.num_addresses > 1 and not (network.is_private or network.is_loopback or network.is_link_local):
            yield error("postfix.mynetworks-wide", pf.where("mynetworks"),
                        f"mynetworks contains {entry}, which is not a private or loopback network, and "
                        f"permit_mynetworks comes before reject_unauth_destination ({', '.join(trusting)}): "
                        f"every client in it may relay",
                        "list only your own hosts and private networks in mynetworks")


def _before_guard(value: str, wanted: str) -> bool:
    for name, _ in restrictions(value):
        if name in GUARDS:
            return False
        if name == wanted:
            return True
    return False


def _port25(pf: PostfixConfig) -> Iterator[Finding]:
    for service in pf.services:
        if service.type == "inet" and service.command in ("smtpd", "postscreen") \
                and service.name.rpartition(":")[2] in ("smtp", "25"):
            return
    yield error("postfix.no-smtpd-25", f"{pf.directory}/master.cf",
                "no smtpd (or postscreen) service listens on port 25: the front-end takes no mail",
                "add 'smtp inet n - y - - smtpd' to master.cf")


def _sasl(pf: PostfixConfig) -> Iterator[Finding]:
    for service in pf.smtpd_services():
        if not pf.yes("smtpd_sasl_auth_enable", service):
            continue
        tls = (pf.yes("smtpd_tls_auth_only", service) or pf.yes("smtpd_tls_wrappermode", service)
               or pf.yes("smtpd_enforce_tls", service) or pf.value("smtpd_tls_security_level", service) == "encrypt")
        if not tls:
            yield warning("postfix.auth-without-tls", pf.where("smtpd_sasl_auth_enable", service),
                          f"{service.label} offers AUTH before TLS: passwords cross the network in clear",
                          f"set -o smtpd_tls_auth_only=yes (or smtpd_tls_security_level=encrypt) on {service.label}")
        for param in RESTRICTION_LISTS:
            seen_permit = False
            for name, _ in restrictions(pf.value(param, service)):
                if name == "permit_sasl_authenticated":
                    seen_permit = True
                elif name in LOGIN_MISMATCH and seen_permit:
                    yield warning("postfix.sasl-before-login-mismatch", pf.where(param, service),
                                  f"{service.label}: permit_sasl_authenticated comes before {name} in {param}: "
                                  f"an authenticated client may send as anyone",
                                  f"put {name} before permit_sasl_authenticated")
                    break


@dataclasses.dataclass(frozen=True)
class _Endpoint:
    """A socket Postfix is told to ask: what asks it, where, and in which protocol."""

    protocol: str          # socketmap, tcp_table, policy, dovecot_auth
    family: str            # unix or inet
    address: str           # path as written, or host
    port: int
    map: str               # socketmap name ('' otherwise)
    where: str
    what: str              # the text in the configuration
    timeout: float | None = None
    smtpd_only: bool = True


def _table_endpoints(value: str, where: str, smtpd_only: bool) -> Iterator[_Endpoint]:
    for table in tokens(value):
        if table.startswith("proxy:"):
            table = table[len("proxy:"):]
        if table.startswith("socketmap:unix:"):
            path, _, name = table[len("socketmap:unix:"):].rpartition(":")
            yield _Endpoint("socketmap", "unix", path, 0, name, where, table, smtpd_only=smtpd_only)
        elif table.startswith("socketmap:inet:"):
            rest, _, name = table[len("socketmap:inet:"):].rpartition(":")
            host, _, port = rest.rpartition(":")
            if port.isdigit():
                yield _Endpoint("socketmap", "inet", host, int(port), name, where, table, smtpd_only=smtpd_only)
        elif table.startswith("tcp:"):
            host, _, port = table[len("tcp:"):].rpartition(":")
            if port.isdigit():
                yield _Endpoint("tcp_table", "inet", host, int(port), "", where, table, smtpd_only=smtpd_only)


def _policy_endpoint(argument: str, where: str, default_timeout: float | None) -> _Endpoint | None:
    target, options = _ungroup(argument)
    timeout = seconds(options["timeout"]) if "timeout" in options else default_timeout
    if target.startswith("inet:"):
        host, _, port = target[len("inet:"):].rpartition(":")
        return _Endpoint("policy", "inet", host, int(port), "", where, target, timeout) if port.isdigit() else None
    if target.startswith("unix:"):
        return _Endpoint("policy", "unix", target[len("unix:"):], 0, "", where, target, timeout)
    if target and ":" not in target:
        return _Endpoint("policy", "unix", f"private/{target}", 0, "", where, target, timeout)
    host, _, port = target.rpartition(":")  # host:port
    return _Endpoint("policy", "inet", host, int(port), "", where, target, timeout) if port.isdigit() else None


def endpoints(pf: PostfixConfig) -> list[_Endpoint]:
    """Every socket the configuration tells Postfix to ask, once per place it is named."""
    found: list[_Endpoint] = []
    for param in AXPOLICY_TABLES:
        found += _table_endpoints(pf.params.get(param, ""), pf.where(param), param != "transport_maps")
    default_timeout = seconds(pf.params.get("smtpd_policy_service_timeout", "100s"))
    seen: set[tuple[str, str]] = set()
    for service in pf.smtpd_services():
        for param in RESTRICTION_LISTS:
            where = pf.where(param, service)
            if (where, param) in seen:
                continue
            seen.add((where, param))
            for name, argument in restrictions(pf.value(param, service)):
                if name == "check_policy_service":
                    endpoint = _policy_endpoint(argument, where, default_timeout)
                    if endpoint is not None:
                        found.append(endpoint)
                elif name.startswith("check_"):
                    found += _table_endpoints(argument, where, True)
        if pf.yes("smtpd_sasl_auth_enable", service) and pf.value("smtpd_sasl_type", service) == "dovecot":
            path = pf.value("smtpd_sasl_path", service)
            where = pf.where("smtpd_sasl_path", service)
            if path.startswith("inet:"):
                host, _, port = path[len("inet:"):].rpartition(":")
                if port.isdigit():
                    found.append(_Endpoint("dovecot_auth", "inet", host, int(port), "", where, path))
            else:
                found.append(_Endpoint("dovecot_auth", "unix", path.removeprefix("unix:"), 0, "", where, path))
    unique: dict[tuple[str, str, str, int, str, str], _Endpoint] = {}
    for endpoint in found:
        unique.setdefault((endpoint.protocol, endpoint.family, endpoint.address, endpoint.port, endpoint.map,
                           endpoint.where), endpoint)
    return list(unique.values())


def _endpoints(pf: PostfixConfig, served: Served) -> Iterator[Finding]:
    queue = pf.params.get("queue_directory", "/var/spool/postfix")
    chrooted = pf.chrooted()
    clients = sum(_maxproc(pf, s) for s in pf.smtpd_services())
    reached: dict[str, tuple[ListenConfig, str]] = {}
    rewrite = False
    for endpoint in endpoints(pf):
        if endpoint.family == "unix":
            written = endpoint.address
            path = os.path.join(queue, written.lstrip("/")) if chrooted or not os.path.isabs(written) else written
            listener = served.unix(path)
            if chrooted and os.path.isabs(written) and listener is None:
                if served.unix(written) is not None or not written.startswith(queue.rstrip("/") + "/"):
                    yield error("postfix.chroot-socket", endpoint.where,
                                f"{endpoint.what}: smtpd runs chrooted in {queue}, where {written} is "
                                f"{path}; the socket cannot be reached and every lookup fails",
                                f"put axpolicy's socket under {queue} and name it relative to it "
                                f"(e.g. private/axpolicy)")
                    continue
            shown = path
        else:
            listener = served.inet(endpoint.address, endpoint.port)
            shown = f"{endpoint.address}:{endpoint.port}"
        if listener is None:
            if "axpolicy" in endpoint.what:
                yield error("postfix.map-unserved", endpoint.where,
                            f"{endpoint.what}: no axpolicy listener is at {shown} "
                            f"({served.config.path} does not serve it); every lookup fails",
                            "make the address match a 'listen' entry of the axpolicy configuration")
            elif not _listening(endpoint.family, shown if endpoint.family == "unix" else endpoint.address,
                                endpoint.port):
                yield error("postfix.socket-unserved", endpoint.where,
                            f"{endpoint.what}: nothing listens at {shown}; every lookup fails",
                            "start the service, or remove it from the configuration")
            continue
        if listener.protocol != endpoint.protocol:
            yield error("postfix.map-protocol", endpoint.where,
                        f"{endpoint.what}: {shown} is axpolicy's {listener.protocol} listener, but Postfix "
                        f"speaks {endpoint.protocol} to it; every lookup fails",
                        f"point it at axpolicy's {endpoint.protocol} listener, or add one")
            continue
        name = endpoint.map or (listener.map or "")
        if endpoint.protocol in ("socketmap", "tcp_table") and not served.serves_map(listener, name):
            yield error("postfix.map-unserved", endpoint.where,
                        f"{endpoint.what}: axpolicy serves no map named {name!r} "
                        f"(maps: {', '.join(served.config.maps) or 'none'}); every lookup fails",
                        "use a map name from the 'maps' section, or add the map")
        if endpoint.protocol == "policy" and endpoint.timeout is not None \
                and endpoint.timeout < served.policy_deadline():
            yield warning("postfix.timeout", endpoint.where,
                          f"{endpoint.what}: Postfix waits {endpoint.timeout:g}s, but axpolicy may take "
                          f"{served.policy_deadline():g}s to answer (user-map timeout x lookups per address)",
                          f"raise the policy timeout above {served.policy_deadline():g}s, or lower the "
                          f"user map's timeout")
        reached.setdefault(listener.address, (listener, endpoint.where))
        if not endpoint.smtpd_only:
            rewrite = True
    for listener, where in reached.values():
        needed = clients + (sum(_maxproc(pf, s) for s in pf.services if s.command == "trivial-rewrite")
                            if rewrite else 0)
        if needed > listener.max_connections:
            yield warning("postfix.process-limit", where,
                          f"up to {needed} Postfix processes may each hold a connection to {listener.address}, "
                          f"more than its max_connections ({listener.max_connections}): idle ones are closed "
                          f"and reopened, busy ones refused",
                          f"raise max_connections of {listener.address} to {needed}, or lower the Postfix "
                          f"process limits")


def _maxproc(pf: PostfixConfig, service: Service) -> int:
    value = service.maxproc if service.maxproc != "-" else pf.params.get("default_process_limit", "100")
    return int(value) if value.isdigit() else 100


def _listening(family: str, address: str, port: int) -> bool:
    kind = socket.AF_UNIX if family == "unix" else socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(kind, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(address if family == "unix" else (address.strip("[]"), port))
        return True
    except OSError:
        return False


def _delimiter(pf: PostfixConfig, served: Served) -> Iterator[Finding]:
    theirs = pf.params.get("recipient_delimiter", "")
    ours = served.config.recipient_delimiter
    if theirs != ours:
        yield warning("postfix.delimiter", pf.where("recipient_delimiter"),
                      f"Postfix's recipient_delimiter is {theirs!r}, axpolicy's is {ours!r}: "
                      f"addresses with an extension are routed differently by the two",
                      f"set the same delimiter in both (axpolicy: recipient_delimiter: {theirs!r})")
