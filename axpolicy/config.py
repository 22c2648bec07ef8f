"""Configuration: one YAML file, validated completely at load.

DESCRIPTION
    :func:`load` reads the file with ``yaml.safe_load`` and turns it into
    frozen dataclasses.  Every key is known: an unknown key, a wrong type or
    a bad value raises :class:`ConfigError` whose message starts with the
    dotted path of the key (``usermaps.people.timeout: ...``), so that an
    operator can fix the file without reading code.

    Relative paths in the file are taken relative to the file's directory,
    so a configuration and its user-map file can be copied together.

    Secrets (``bind_password_file``) are read here, at load time, which is
    before the daemon drops privileges, through a :class:`Secrets` that
    remembers them: a reload after the drop keeps a secret whose file the
    unprivileged process cannot read, when its path did not change.

SECURITY
    :func:`effective` masks secrets; nothing else in axpolicy prints them.
"""

from __future__ import annotations

import dataclasses
import grp
import hashlib
import json
import os
import pwd
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import yaml

from axpolicy import limits
from axpolicy.address import AddressError, normalize_domain
from axpolicy.files import FileReadError, read_regular

DEFAULT_PATH = "/etc/axpolicy/axpolicy.yml"
DEFAULT_STATE_DIR = "/var/lib/axpolicy"
MASK = "********"
DEFAULT_FILTER = "(mail=%s)"

Scope = Literal["base", "one", "sub"]


class ConfigError(Exception):
    """The configuration is unusable; the message names the key."""


@dataclasses.dataclass(frozen=True, slots=True)
class LdapMapConfig:
    """An LDAP user map (see README.rst, "usermaps")."""

    name: str
    servers: tuple[str, ...]
    base: str
    start_tls: bool = False
    ca_file: str | None = None
    bind_dn: str | None = None
    bind_password: str | None = dataclasses.field(default=None, repr=False)
    bind_password_file: str | None = None
    scope: Scope = "sub"
    filter: str = DEFAULT_FILTER
    host_attribute: str = "mailHost"
    timeout: float = 3.0
    connect_timeout: float = 1.0
    pool_size: int = 4
    queue_size: int = 4096
    catchall: bool = False
    failback_interval: float = 30.0
    replica: bool = False
    state_dir: str = ""                  # the top-level state_dir, for a replica (not a key of the map)
    type: Literal["ldap"] = "ldap"

    @property
    def store_path(self) -> str:
        """The replica's store file."""
        return os.path.join(self.state_dir, f"{self.name}.mdb")


@dataclasses.dataclass(frozen=True, slots=True)
class FileMapConfig:
    """A file user map: ``address host``, ``@domain host``, ``/regex/ host``."""

    name: str
    path: str
    type: Literal["file"] = "file"

    @property
    def catchall(self) -> bool:
        return True


UserMapConfig = LdapMapConfig | FileMapConfig


@dataclasses.dataclass(frozen=True, slots=True)
class CacheConfig:
    """Lookup cache; all times in seconds, 0 disables that part."""

    ttl: float = 300.0
    negative_ttl: float = 60.0
    stale_if_error: float = 3600.0
    max_entries: int = 100000


Protocol = Literal["policy", "socketmap", "tcp_table", "readsocket", "dovecot_auth"]
PROTOCOLS: tuple[Protocol, ...] = ("policy", "socketmap", "tcp_table", "readsocket", "dovecot_auth")

# Server-side idle timeouts, each longer than the client's own idle limit so
# that the client, not axpolicy, closes idle connections (a server-side
# close costs Postfix a retry delay): smtpd_policy_service_max_idle 300s,
# socketmap idle 10s and TTL 100s; dict_tcp never closes an idle connection
# and Exim's readsocket opens one connection per request.
# Postfix keeps one dovecot auth connection per smtpd process, idle between
# SMTP sessions for as long as the process lives.
DEFAULT_IDLE_TIMEOUT: dict[str, float] = {"policy": 330.0, "socketmap": 110.0, "tcp_table": 3600.0,
                                          "dovecot_auth": 3600.0,
                                          "readsocket": 10.0}


@dataclasses.dataclass(frozen=True, slots=True)
class ListenConfig:
    """One listening socket and the protocol spoken on it."""

    protocol: Protocol
    address: str                 # as written, for messages
    family: Literal["inet", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""
    mode: int | None = None      # unix only
    owner: str | None = None     # unix only
    group: str | None = None     # unix only
    map: str | None = None       # tcp_table and readsocket default map
    max_connections: int = 1000
    idle_timeout: float = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class MapConfig:
    """A lookup table served over socketmap, tcp_table or readsocket.

    ``type: address`` answers ``result`` with ``%s`` replaced by the host
    from ``usermap``; ``type: domain`` answers ``result`` for the domains in
    the top-level ``domains`` list.
    """

    name: str
    type: Literal["address", "domain", "owner"] = "address"
    usermap: str = ""
    result: str = "%s"
    send_as: str | None = None       # owner maps: attribute naming extra logins that may send as the entry

@dataclasses.dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Answers of the Postfix policy service at ``protocol_state=RCPT``."""

    usermap: str = ""
    mapped: str = "OK"
    unmapped: str = "DUNNO"
    tempfail: str = "DEFER_IF_PERMIT 4.3.0 User map temporarily unavailable"


@dataclasses.dataclass(frozen=True, slots=True)
class AuthConfig:
    """SMTP AUTH from an LDAP user map (README.rst, "SMTP AUTH")."""

    usermap: str
    login_filter: str | None = None      # default: the user map's filter
    login_attribute: str = "mail"
    cache_ttl: float = 60.0
    failure_delay: float = 2.0
    max_failures: int = 10
    failure_window: float = 600.0


@dataclasses.dataclass(frozen=True, slots=True)
class LogConfig:
    """Where log lines go: syslog (facility mail, ident axpolicy) or stderr."""

    target: Literal["syslog", "stderr"] = "stderr"
    level: Literal["debug", "info", "warning", "error"] = "info"
    syslog_socket: str = "/dev/log"


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus and health endpoint; off when ``listen`` is None."""

    listen: str | None = None
    host: str = ""
    port: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    path: str
    usermaps: Mapping[str, UserMapConfig]
    domains: frozenset[str] | None = None
    recipient_delimiter: str = ""
    cache: CacheConfig = CacheConfig()
    listen: tuple[ListenConfig, ...] = ()
    maps: Mapping[str, MapConfig] = dataclasses.field(default_factory=dict)
    policy: PolicyConfig = PolicyConfig()
    user: str | None = None
    group: str | None = None
    pidfile: str | None = None
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    auth: AuthConfig | None = None
    state_dir: str = DEFAULT_STATE_DIR

    @property
    def default_usermap(self) -> str:
        """The user map used when none is named: the first in the file."""
        return next(iter(self.usermaps))


class Secrets:
    """The secret files read so far (path -> contents), kept for reloads after the privilege drop."""

    def __init__(self) -> None:
        self._known: dict[str, str] = {}
        self.kept: list[str] = []     # what read() fell back on since the caller last looked

    def read(self, path: str, key: str) -> str:
        """The one-line secret in *path* (ConfigError naming *key*), or the one read before from there."""
        try:
            data, _ = read_regular(path, limits.SECRET_MAX_BYTES)
        except FileReadError as exc:
            if path in self._known:
                self.kept.append(f"{key}: {exc}; keeping the secret read from it before")
                return self._known[path]
            raise _fail(key, str(exc)) from None
        try:
            # One line; a trailing newline is not part of the password.
            secret = data.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise _fail(key, f"{path}: not UTF-8 text") from None
        self._known[path] = secret
        return secret


# --------------------------------------------------------------------------
# Validation helpers.  Each takes the dotted path of the value it checks so
# that every message can name the key.


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, f"expected a mapping, got {_kind(value)}")
    for key in value:
        if not isinstance(key, str):
            raise _fail(path, f"keys must be strings, got {_kind(key)}")
    return value


# What a key of this configuration looks like; anything else is not named in
# a message (it may be a line of a file that is not a configuration).
_KEY_LIKE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


def _known(section: Mapping[str, Any], allowed: set[str], path: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        name = unknown[0] if _KEY_LIKE_RE.match(unknown[0]) else "(a key that is not a configuration key)"
        line = section.lines.get(unknown[0]) if isinstance(section, _Mapping) else None
        where = f" on line {line}" if line is not None else ""
        raise _fail(f"{path}.{name}" if path else name,
                    f"unknown key{where} (allowed: {', '.join(sorted(allowed))})")


class _Mapping(dict[Any, Any]):
    """A YAML mapping that remembers the line of each key, for messages."""

    lines: dict[Any, int]


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` whose mappings are :class:`_Mapping`."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Mapping:
    mapping = _Mapping(loader.construct_mapping(node))
    mapping.lines = {}
    for key_node, _ in node.value:
        try:
            mapping.lines[loader.construct_object(key_node)] = key_node.start_mark.line + 1
        except TypeError:
            pass   # an unhashable key: refused later by _mapping
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# Quoted text in a YAML error message, other than token names such as
# '<stream end>' and single characters: it may come from the file.
_QUOTED_RE = re.compile(r"'(?!<)[^']{2,}'")


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _str(value: Any, path: str, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"expected a string, got {_kind(value)}")
    if not empty and not value.strip():
        raise _fail(path, "must not be empty")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected true or false, got {_kind(value)}")
    return value


def _number(value: Any, path: str, *, minimum: float, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, f"expected a number, got {_kind(value)}")
    if not minimum <= value <= maximum:
        raise _fail(path, f"must be between {minimum:g} and {maximum:g}, got {value:g}")
    return float(value)


def _int(value: Any, path: str, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"expected a whole number, got {_kind(value)}")
    if not minimum <= value <= maximum:
        raise _fail(path, f"must be between {minimum} and {maximum}, got {value}")
    return value


def _path(value: Any, path: str, base_dir: str) -> str:
    text = _str(value, path)
    return os.path.normpath(os.path.join(base_dir, text))


# --------------------------------------------------------------------------
# Sections.

_LDAP_KEYS = {f.name for f in dataclasses.fields(LdapMapConfig)} - {"name"}
_FILE_KEYS = {f.name for f in dataclasses.fields(FileMapConfig)} - {"name"}
_FILTER_ESCAPE_RE = re.compile(r"%(.)", re.DOTALL)


def check_filter(template: str, path: str) -> None:
    """Reject a filter template with unknown ``%`` escapes or bad syntax."""
    for match in _FILTER_ESCAPE_RE.finditer(template):
        if match.group(1) not in "sud%":
            raise _fail(path, f"unknown escape %{match.group(1)} (use %s, %u, %d or %%)")
    if template.endswith("%") and not template.endswith("%%"):
        raise _fail(path, "lone % at the end (write %% for a literal %)")
    if "%s" not in template and "%u" not in template:
        raise _fail(path, "must contain %s or %u, or every address would match")
    from axpolicy.ldapwire import LdapWireError, compile_filter

    try:
        compile_filter(template)
    except LdapWireError as exc:
        raise _fail(path, f"is not a valid LDAP filter (RFC 4515): {exc}") from None


def check_replica_filter(template: str, path: str) -> None:
    """A replica can only stand in for filters that test the whole key for equality."""
    from axpolicy.ldapwire import LdapWireError, compile_filter

    try:
        compile_filter(template).replica_plan()
    except LdapWireError as exc:
        raise _fail(path, f"the filter cannot be replicated: {exc}; use per-key searches (replica: false) "
                          "or a filter like (|(mail=%s)(mailAlternateAddress=%s))") from None


def _ldap_map(name: str, raw: dict[str, Any], path: str, base_dir: str, secrets: Secrets) -> LdapMapConfig:
    _known(raw, _LDAP_KEYS, path)
    servers_raw = raw.get("servers")
    if isinstance(servers_raw, str):
        servers_raw = [servers_raw]
    if not isinstance(servers_raw, list) or not servers_raw:
        raise _fail(f"{path}.servers", "expected a non-empty list of ldap://, ldaps:// or ldapi:// URLs")
    servers = []
    for index, item in enumerate(servers_raw):
        url = _str(item, f"{path}.servers[{index}]")
        parts = urlsplit(url)
        if parts.scheme == "ldapi":
            socket_path = unquote(parts.netloc)
            if (socket_path and not socket_path.startswith("/")) or parts.path not in ("", "/") or parts.query:
                raise _fail(f"{path}.servers[{index}]", "expected ldapi:// or ldapi://%2Fpath%2Fto%2Fsocket, "
                                                        f"got {url!r}")
            servers.append(url)
            continue
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
            raise _fail(f"{path}.servers[{index}]", f"expected ldap://host[:port] or ldaps://..., got {url!r}")
        try:
            _ = parts.port  # raises ValueError for a bad port
        except ValueError:
            raise _fail(f"{path}.servers[{index}]", f"bad port in {url!r}") from None
        if parts.path not in ("", "/") or parts.query:
            raise _fail(f"{path}.servers[{index}]", "only scheme, host and port are allowed")
        servers.append(url)
    if "base" not in raw:
        raise _fail(f"{path}.base", "required")
    fields: dict[str, Any] = {"name": name, "servers": tuple(servers),
                              "base": _str(raw["base"], f"{path}.base", empty=True)}
    for key in ("start_tls", "catchall", "replica"):
        if key in raw:
            fields[key] = _bool(raw[key], f"{path}.{key}")
    if raw.get("ca_file") is not None:
        fields["ca_file"] = _path(raw["ca_file"], f"{path}.ca_file", base_dir)
        if not os.path.isfile(fields["ca_file"]):
            raise _fail(f"{path}.ca_file", f"no such file: {fields['ca_file']}")
    if raw.get("bind_dn") is not None:
        fields["bind_dn"] = _str(raw["bind_dn"], f"{path}.bind_dn")
    if raw.get("bind_password") is not None and raw.get("bind_password_file") is not None:
        raise _fail(f"{path}.bind_password", "give bind_password or bind_password_file, not both")
    if raw.get("bind_password") is not None:
        fields["bind_password"] = _str(raw["bind_password"], f"{path}.bind_password", empty=True)
    if raw.get("bind_password_file") is not None:
        secret_path = _path(raw["bind_password_file"], f"{path}.bind_password_file", base_dir)
        fields["bind_password_file"] = secret_path
        fields["bind_password"] = secrets.read(secret_path, f"{path}.bind_password_file")
    if fields.get("bind_password") is not None and fields.get("bind_dn") is None:
        raise _fail(f"{path}.bind_dn", "required when a bind password is given")
    if "scope" in raw:
        scope = _str(raw["scope"], f"{path}.scope")
        if scope not in ("base", "one", "sub"):
            raise _fail(f"{path}.scope", f"expected base, one or sub, got {scope!r}")
        fields["scope"] = scope
    if "filter" in raw:
        fields["filter"] = _str(raw["filter"], f"{path}.filter")
    check_filter(fields.get("filter", DEFAULT_FILTER), f"{path}.filter")
    if fields.get("replica"):
        check_replica_filter(fields.get("filter", DEFAULT_FILTER), f"{path}.replica")
    if "host_attribute" in raw:
        attr = _str(raw["host_attribute"], f"{path}.host_attribute")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+", attr):
            raise _fail(f"{path}.host_attribute", f"not an attribute name: {attr!r}")
        fields["host_attribute"] = attr
    if "timeout" in raw:
        fields["timeout"] = _number(raw["timeout"], f"{path}.timeout", minimum=0.05, maximum=300)
    if "connect_timeout" in raw:
        fields["connect_timeout"] = _number(raw["connect_timeout"], f"{path}.connect_timeout", minimum=0.05,
                                            maximum=300)
    if "failback_interval" in raw:
        fields["failback_interval"] = _number(raw["failback_interval"], f"{path}.failback_interval",
                                              minimum=0, maximum=86400)
    if "pool_size" in raw:
        fields["pool_size"] = _int(raw["pool_size"], f"{path}.pool_size", minimum=1, maximum=64)
    if "queue_size" in raw:
        fields["queue_size"] = _int(raw["queue_size"], f"{path}.queue_size", minimum=1, maximum=1000000)
    return LdapMapConfig(**fields)


def _file_map(name: str, raw: dict[str, Any], path: str, base_dir: str) -> FileMapConfig:
    _known(raw, _FILE_KEYS, path)
    if "path" not in raw:
        raise _fail(f"{path}.path", "required")
    return FileMapConfig(name=name, path=_path(raw["path"], f"{path}.path", base_dir))


def _named_section(name: str, raw: Any, path: str) -> dict[str, Any]:
    """One entry of ``usermaps`` or ``maps``: a safe name and a mapping."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise _fail(path, "map names may use letters, digits, '_', '.' and '-'")
    return _mapping(raw, path)


def _usermaps(value: Any, base_dir: str, secrets: Secrets) -> dict[str, UserMapConfig]:
    raw_maps = _mapping(value, "usermaps")
    if not raw_maps:
        raise _fail("usermaps", "at least one user map is required")
    maps: dict[str, UserMapConfig] = {}
    for name, raw in raw_maps.items():
        path = f"usermaps.{name}"
        raw = _named_section(name, raw, path)
        kind = raw.get("type")
        if kind == "ldap":
            maps[name] = _ldap_map(name, raw, path, base_dir, secrets)
        elif kind == "file":
            maps[name] = _file_map(name, raw, path, base_dir)
        else:
            raise _fail(f"{path}.type", f"expected ldap or file, got {kind!r}")
    return maps


def _cache(value: Any) -> CacheConfig:
    raw = _mapping(value, "cache")
    _known(raw, {f.name for f in dataclasses.fields(CacheConfig)}, "cache")
    fields: dict[str, Any] = {}
    for key in ("ttl", "negative_ttl", "stale_if_error"):
        if key in raw:
            fields[key] = _number(raw[key], f"cache.{key}", minimum=0, maximum=30 * 86400)
    if "max_entries" in raw:
        fields["max_entries"] = _int(raw["max_entries"], "cache.max_entries", minimum=0, maximum=10**8)
    return CacheConfig(**fields)


def _domains(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _fail("domains", f"expected a list of domains, got {_kind(value)}")
    domains = set()
    for index, item in enumerate(value):
        text = _str(item, f"domains[{index}]")
        try:
            domains.add(normalize_domain(text))
        except AddressError as exc:
            raise _fail(f"domains[{index}]", f"{text!r}: {exc}") from None
    return frozenset(domains)


def _delimiter(value: Any) -> str:
    text = _str(value, "recipient_delimiter", empty=True)
    for ch in text:
        if ch.isspace() or not ch.isprintable() or ch in '@%!"\\':
            raise _fail("recipient_delimiter", f"{ch!r} cannot be a delimiter")
    return text


_INET_RE = re.compile(r"inet:(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[^:\[\]]+)):(?P<port>[0-9]{1,5})\Z")
_LISTEN_KEYS = {"protocol", "address", "mode", "owner", "group", "map", "max_connections", "idle_timeout"}


def _listen(value: Any, base_dir: str, maps: Mapping[str, MapConfig]) -> tuple[ListenConfig, ...]:
    if not isinstance(value, list):
        raise _fail("listen", f"expected a list of listeners, got {_kind(value)}")
    listeners: list[ListenConfig] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(value):
        path = f"listen[{index}]"
        raw = _mapping(item, path)
        _known(raw, _LISTEN_KEYS, path)
        protocol = raw.get("protocol")
        if protocol not in PROTOCOLS:
            raise _fail(f"{path}.protocol", f"expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if "address" not in raw:
            raise _fail(f"{path}.address", "required")
        address = _str(raw["address"], f"{path}.address")
        fields: dict[str, Any] = {"protocol": protocol, "address": address,
                                  "idle_timeout": DEFAULT_IDLE_TIMEOUT[protocol]}
        if address.startswith("unix:"):
            fields["family"] = "unix"
            fields["path"] = _path(address[len("unix:"):], f"{path}.address", base_dir)
            if len(fields["path"].encode()) > 107:
                raise _fail(f"{path}.address", "unix socket path longer than 107 bytes")
            if "mode" in raw:
                mode = raw["mode"]
                if not isinstance(mode, str) or not re.fullmatch(r"0?[0-7]{3}", mode):
                    raise _fail(f"{path}.mode", f"expected an octal string such as \"0660\", got {mode!r}")
                fields["mode"] = int(mode, 8)
            for key in ("owner", "group"):
                if key in raw:
                    fields[key] = _str(raw[key], f"{path}.{key}")
        elif address.startswith("inet:"):
            match = _INET_RE.match(address)
            if not match:
                raise _fail(f"{path}.address", f"expected inet:HOST:PORT or inet:[IPv6]:PORT, got {address!r}")
            port = int(match["port"])
            if not 1 <= port <= 65535:
                raise _fail(f"{path}.address", f"port out of range in {address!r}")
            fields.update(family="inet", host=match["v6"] or match["v4"], port=port)
            for key in ("mode", "owner", "group"):
                if key in raw:
                    raise _fail(f"{path}.{key}", "only for unix: addresses")
        else:
            raise _fail(f"{path}.address", f"expected inet:HOST:PORT or unix:/path, got {address!r}")
        if "map" in raw:
            if protocol not in ("tcp_table", "readsocket"):
                raise _fail(f"{path}.map", "only for tcp_table and readsocket listeners")
            name = _str(raw["map"], f"{path}.map")
            if name not in maps:
                raise _fail(f"{path}.map", f"no map named {name!r} under maps")
            fields["map"] = name
        elif protocol == "tcp_table":
            raise _fail(f"{path}.map", "required: a tcp_table listener serves exactly one map")
        if "max_connections" in raw:
            fields["max_connections"] = _int(raw["max_connections"], f"{path}.max_connections",
                                             minimum=1, maximum=100000)
        if "idle_timeout" in raw:
            fields["idle_timeout"] = _number(raw["idle_timeout"], f"{path}.idle_timeout", minimum=0.1, maximum=86400)
        where = fields.get("path") or f"{fields['host']}:{fields['port']}"
        if where in seen:
            raise _fail(f"{path}.address", f"same address as listen[{seen[where]}]")
        seen[where] = index
        listeners.append(ListenConfig(**fields))
    return tuple(listeners)


_RESULT_ESCAPE_RE = re.compile(r"%(.?)", re.DOTALL)


def check_template(template: str, path: str, *, host_allowed: bool = True) -> None:
    """A result or action template: printable text, ``%s`` (host) and ``%%`` only."""
    if not template.strip():
        raise _fail(path, "must not be empty (an empty answer means something else to Postfix)")
    if not template.isprintable():
        raise _fail(path, "must not contain control characters or line breaks")
    for match in _RESULT_ESCAPE_RE.finditer(template):
        if match.group(1) == "%" or (match.group(1) == "s" and host_allowed):
            continue
        raise _fail(path, f"unknown escape %{match.group(1)} (use %s for the host, %% for %)")


def expand_template(template: str, host: str) -> str:
    """Replace ``%s`` by *host* and ``%%`` by ``%`` (template already checked)."""
    return _RESULT_ESCAPE_RE.sub(lambda m: host if m.group(1) == "s" else "%", template)


def _maps(value: Any, usermaps: Mapping[str, UserMapConfig], domains: frozenset[str] | None) -> dict[str, MapConfig]:
    raw_maps = _mapping(value, "maps")
    maps: dict[str, MapConfig] = {}
    for name, raw in raw_maps.items():
        path = f"maps.{name}"
        raw = _named_section(name, raw, path)
        if name == "AUTH":
            raise _fail(path, "the name AUTH is reserved for SMTP AUTH requests on readsocket listeners")
        _known(raw, {"type", "usermap", "result", "send_as"}, path)
        kind = raw.get("type", "address")
        if kind not in ("address", "domain", "owner"):
            raise _fail(f"{path}.type", f"expected address, domain or owner, got {kind!r}")
        fields: dict[str, Any] = {"name": name, "type": kind}
        if "send_as" in raw and kind != "owner":
            raise _fail(f"{path}.send_as", "only for owner maps")
        if kind == "owner":
            fields["usermap"] = _usermap_name(raw.get("usermap"), usermaps, f"{path}.usermap")
            if not isinstance(usermaps[fields["usermap"]], LdapMapConfig):
                raise _fail(f"{path}.usermap", "an owner map needs an LDAP user map")
            if "result" in raw:
                raise _fail(f"{path}.result", "an owner map answers the owners' logins")
            if raw.get("send_as") is not None:
                attr = _str(raw["send_as"], f"{path}.send_as")
                if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+", attr):
                    raise _fail(f"{path}.send_as", f"not an attribute name: {attr!r}")
                fields["send_as"] = attr
        elif kind == "domain":
            if "usermap" in raw:
                raise _fail(f"{path}.usermap", "a domain map answers from the top-level domains list")
            if domains is None:
                raise _fail(f"{path}.type", "a domain map needs the top-level domains list")
            fields["result"] = _str(raw.get("result", "OK"), f"{path}.result")
            check_template(fields["result"], f"{path}.result", host_allowed=False)
        else:
            fields["usermap"] = _usermap_name(raw.get("usermap"), usermaps, f"{path}.usermap")
            fields["result"] = _str(raw.get("result", "%s"), f"{path}.result")
            check_template(fields["result"], f"{path}.result")
        maps[name] = MapConfig(**fields)
    return maps


def _usermap_name(value: Any, usermaps: Mapping[str, UserMapConfig], path: str) -> str:
    if value is None:
        return next(iter(usermaps))
    name = _str(value, path)
    if name not in usermaps:
        raise _fail(path, f"no user map named {name!r} (configured: {', '.join(usermaps)})")
    return name


# Actions that permit: never an answer for an address we could not map.
_PERMIT_ACTIONS = {"OK", "RELAY", "PERMIT", "DISCARD"}
_ACTION_RE = re.compile(r"(?:[A-Za-z_]+(?:\s.*)?|[45][0-9][0-9]\s+\S.*)\Z", re.DOTALL)


def _action(value: Any, path: str) -> str:
    """A policy action: a word, or a 4xx/5xx code followed by text.

    Postfix reads an empty action and a bare number as OK (open relay), so
    both are refused here.
    """
    text = _str(value, path).strip()
    check_template(text, path)
    if not _ACTION_RE.match(text):
        raise _fail(path, f"expected an action word (OK, DUNNO, DEFER_IF_PERMIT text, ...) or a 4xx/5xx "
                          f"code with text, got {text!r}")
    return text


def _policy(value: Any, usermaps: Mapping[str, UserMapConfig]) -> PolicyConfig:
    raw = _mapping(value, "policy")
    _known(raw, {"usermap", "mapped", "unmapped", "tempfail"}, "policy")
    fields: dict[str, Any] = {"usermap": _usermap_name(raw.get("usermap"), usermaps, "policy.usermap")}
    for key in ("mapped", "unmapped", "tempfail"):
        if key in raw:
            fields[key] = _action(raw[key], f"policy.{key}")
    for key in ("unmapped", "tempfail"):
        text = fields.get(key, "")
        if "%s" in text:
            raise _fail(f"policy.{key}", "only policy.mapped can use %s: this answer has no host")
        if text.split(" ", 1)[0].upper() in _PERMIT_ACTIONS:
            raise _fail(f"policy.{key}", f"{text!r} would let Postfix relay for addresses that are not users")
    return PolicyConfig(**fields)


def _account(value: Any, path: str, kind: Literal["user", "group"]) -> str | None:
    if value is None:
        return None
    name = _str(value, path)
    try:
        if kind == "user":
            pwd.getpwnam(name)
        else:
            grp.getgrnam(name)
    except KeyError:
        raise _fail(path, f"no such {kind} on this system: {name!r}") from None
    return name


def _log(value: Any, base_dir: str) -> LogConfig:
    raw = _mapping(value, "log")
    _known(raw, {"target", "level", "syslog_socket"}, "log")
    fields: dict[str, Any] = {}
    if "target" in raw:
        if raw["target"] not in ("syslog", "stderr"):
            raise _fail("log.target", f"expected syslog or stderr, got {raw['target']!r}")
        fields["target"] = raw["target"]
    if "level" in raw:
        if raw["level"] not in ("debug", "info", "warning", "error"):
            raise _fail("log.level", f"expected debug, info, warning or error, got {raw['level']!r}")
        fields["level"] = raw["level"]
    if "syslog_socket" in raw:
        fields["syslog_socket"] = _path(raw["syslog_socket"], "log.syslog_socket", base_dir)
    return LogConfig(**fields)


_HOSTPORT_RE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[^:\[\]]+)):(?P<port>[0-9]{1,5})\Z")


def _metrics(value: Any) -> MetricsConfig:
    raw = _mapping(value, "metrics")
    _known(raw, {"listen"}, "metrics")
    if raw.get("listen") is None:
        return MetricsConfig()
    text = _str(raw["listen"], "metrics.listen")
    match = _HOSTPORT_RE.match(text)
    if not match or not 1 <= int(match["port"]) <= 65535:
        raise _fail("metrics.listen", f"expected HOST:PORT or [IPv6]:PORT, got {text!r}")
    return MetricsConfig(listen=text, host=match["v6"] or match["v4"], port=int(match["port"]))


def _auth(value: Any, usermaps: Mapping[str, UserMapConfig]) -> AuthConfig | None:
    if value is None:
        return None
    raw = _mapping(value, "auth")
    _known(raw, {f.name for f in dataclasses.fields(AuthConfig)}, "auth")
    if "usermap" not in raw:
        raise _fail("auth.usermap", "required: the LDAP user map whose entries may log in")
    name = _usermap_name(raw["usermap"], usermaps, "auth.usermap")
    if not isinstance(usermaps[name], LdapMapConfig):
        raise _fail("auth.usermap", f"{name!r} is not an LDAP user map: only a directory can check passwords")
    fields: dict[str, Any] = {"usermap": name}
    if raw.get("login_filter") is not None:
        fields["login_filter"] = _str(raw["login_filter"], "auth.login_filter")
        check_filter(fields["login_filter"], "auth.login_filter")
    if "login_attribute" in raw:
        attr = _str(raw["login_attribute"], "auth.login_attribute")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+", attr):
            raise _fail("auth.login_attribute", f"not an attribute name: {attr!r}")
        fields["login_attribute"] = attr
    for key, maximum in (("cache_ttl", 86400.0), ("failure_delay", 60.0), ("failure_window", 86400.0)):
        if key in raw:
            fields[key] = _number(raw[key], f"auth.{key}", minimum=0, maximum=maximum)
    if "max_failures" in raw:
        fields["max_failures"] = _int(raw["max_failures"], "auth.max_failures", minimum=1,
                                      maximum=limits.AUTH_MAX_FAILURES_KEPT)
    return AuthConfig(**fields)


_TOP_KEYS = {"usermaps", "domains", "recipient_delimiter", "cache", "listen", "maps", "policy", "state_dir",
             "user", "group", "pidfile", "log", "metrics", "auth"}


def parse(raw: Any, path: str, secrets: Secrets | None = None) -> Config:
    """Validate the parsed YAML document *raw* that was read from *path*."""
    top = _mapping(raw if raw is not None else {}, "(top level)")
    _known(top, _TOP_KEYS, "")
    if "usermaps" not in top:
        raise _fail("usermaps", "required")
    base_dir = os.path.dirname(os.path.abspath(path))
    state_dir = _path(top.get("state_dir", DEFAULT_STATE_DIR), "state_dir", base_dir)
    usermaps = _usermaps(top["usermaps"], base_dir, secrets if secrets is not None else Secrets())
    usermaps = {name: dataclasses.replace(cfg, state_dir=state_dir)
                if isinstance(cfg, LdapMapConfig) and cfg.replica else cfg for name, cfg in usermaps.items()}
    domains = _domains(top.get("domains"))
    maps = _maps(top.get("maps", {}), usermaps, domains)
    auth = _auth(top.get("auth"), usermaps)
    listen = _listen(top.get("listen", []), base_dir, maps)
    for name, spec in maps.items():
        if spec.type == "owner" and auth is None:
            raise _fail(f"maps.{name}.type", "an owner map needs the auth section (its login_attribute names "
                                             "the logins)")
    for index, listener in enumerate(listen):
        if listener.protocol == "dovecot_auth" and auth is None:
            raise _fail(f"listen[{index}].protocol", "dovecot_auth needs the auth section (which user map "
                                                     "checks passwords)")
    return Config(
        path=os.path.abspath(path),
        usermaps=usermaps,
        domains=domains,
        recipient_delimiter=_delimiter(top.get("recipient_delimiter", "")),
        cache=_cache(top.get("cache", {})),
        listen=listen,
        maps=maps,
        policy=_policy(top.get("policy", {}), usermaps),
        user=_account(top.get("user"), "user", "user"),
        group=_account(top.get("group"), "group", "group"),
        pidfile=_path(top["pidfile"], "pidfile", base_dir) if top.get("pidfile") is not None else None,
        log=_log(top.get("log", {}), base_dir),
        metrics=_metrics(top.get("metrics", {})),
        auth=auth,
        state_dir=state_dir,
    )


def load(path: str, secrets: Secrets | None = None) -> Config:
    """Read and validate the configuration file at *path*.

    Messages never quote the file: ``-c`` may name a file that is not a
    configuration at all (a typo, a link to ``/etc/shadow``).  YAML errors
    give the problem with a line and column; unknown keys are named only
    when they look like keys.
    """
    try:
        data, _ = read_regular(path, limits.CONFIG_MAX_BYTES)
        raw = yaml.load(data.decode("utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except FileReadError as exc:
        raise ConfigError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = _QUOTED_RE.sub("'...'", exc.problem or exc.context or "syntax error")
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML") from None
    return parse(raw, path, secrets)


def warnings(config: Config) -> list[str]:
    """Settings that work but probably not as intended; each names the key."""
    found: list[str] = []
    readsocket_maps: set[str] = set()
    for listener in config.listen:
        if listener.protocol == "readsocket":
            readsocket_maps.update([listener.map] if listener.map else config.maps)
        if listener.protocol == "policy" and listener.idle_timeout < limits.POSTFIX_POLICY_MAX_IDLE_SECONDS:
            found.append(f"listen ({listener.address}).idle_timeout: {listener.idle_timeout:g}s is shorter than "
                         f"Postfix's smtpd_policy_service_max_idle (300s); each reconnect costs a retry delay")
    budget = limits.EXIM_READSOCKET_TIMEOUT_SECONDS - limits.EXIM_READSOCKET_MARGIN_SECONDS
    for name in sorted({config.maps[m].usermap for m in readsocket_maps if config.maps[m].type == "address"}):
        usermap = config.usermaps[name]
        if not isinstance(usermap, LdapMapConfig):
            continue
        lookups = 1 + bool(config.recipient_delimiter) + usermap.catchall
        if usermap.timeout * lookups > budget:
            found.append(f"usermaps.{name}.timeout: {usermap.timeout:g}s x {lookups} lookup(s) per address can "
                         f"exceed Exim's readsocket timeout of {limits.EXIM_READSOCKET_TIMEOUT_SECONDS:g}s; "
                         f"keep it under {budget / lookups:g}s or raise AXPOLICY_TIMEOUT in Exim")
    return found


def digest(config: Config) -> str:
    """SHA-256 of the effective configuration, secrets included (never printed).

    Two front-ends with the same digest answer every lookup the same way
    (given the same directory and user-map files).
    """
    canonical = json.dumps(effective(config, mask_secrets=False), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def effective(config: Config, mask_secrets: bool = True) -> dict[str, Any]:
    """The configuration as plain data with defaults filled in, secrets masked."""
    maps: dict[str, Any] = {}
    for name, usermap in config.usermaps.items():
        data = {f.name: getattr(usermap, f.name) for f in dataclasses.fields(usermap)
                if f.name not in ("name", "state_dir")}
        if isinstance(usermap, LdapMapConfig):
            data["servers"] = list(usermap.servers)
            if usermap.bind_password is not None and mask_secrets:
                data["bind_password"] = MASK
        maps[name] = data
    return {
        "usermaps": maps,
        "domains": sorted(config.domains) if config.domains is not None else None,
        "recipient_delimiter": config.recipient_delimiter,
        "cache": dataclasses.asdict(config.cache),
        "listen": [_listener_data(listener) for listener in config.listen],
        "maps": {name: {k: v for k, v in dataclasses.asdict(m).items() if k != "name" and v != ""}
                 for name, m in config.maps.items()},
        "policy": dataclasses.asdict(config.policy),
        "user": config.user,
        "group": config.group,
        "pidfile": config.pidfile,
        "log": dataclasses.asdict(config.log),
        "metrics": {"listen": config.metrics.listen},
        "auth": dataclasses.asdict(config.auth) if config.auth is not None else None,
        "state_dir": config.state_dir,
    }


def _listener_data(listener: ListenConfig) -> dict[str, Any]:
    data: dict[str, Any] = {"protocol": listener.protocol, "address": listener.address}
    if listener.family == "unix":
        data["path"] = listener.path
        if listener.mode is not None:
            data["mode"] = f"{listener.mode:04o}"
        data.update({k: getattr(listener, k) for k in ("owner", "group") if getattr(listener, k)})
    if listener.map:
        data["map"] = listener.map
    data["max_connections"] = listener.max_connections
    data["idle_timeout"] = listener.idle_timeout
    return data
