"""Directory checks for each LDAP user map: bind, base, a sample address, ACLs, replication.

DESCRIPTION
    One-off reads with ldap3 (the daemon itself speaks LDAP through
    axpolicy.ldapconn; ldap3 is the independent second opinion here), on
    every server of the map, with the map's own bind DN, TLS settings and
    timeouts.  The sample address is then resolved by axpolicy's own router,
    the code path the MTA's lookups take, and must be found.
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
from collections.abc import Iterator

import ldap3
from ldap3.core.exceptions import LDAPException

from axpolicy.config import Config, LdapMapConfig
from axpolicy.doctor.findings import Finding, error, warning
from axpolicy.result import Status

SYNC_REQUEST_OID = "1.3.6.1.4.1.4203.1.9.1.1"
# SyncRequestValue ::= SEQUENCE { mode ENUMERATED { refreshOnly (1) } }
SYNC_REFRESH_ONLY = bytes.fromhex("3003 0a01 01".replace(" ", ""))
SAMPLE_ENTRIES = 20
_KEY_ATTRIBUTE = re.compile(r"\(([A-Za-z][A-Za-z0-9-]*)=%s\)")


def _connection(cfg: LdapMapConfig, url: str) -> ldap3.Connection:
    tls = ldap3.Tls(ca_certs_file=cfg.ca_file, validate=ssl.CERT_REQUIRED) \
        if url.startswith("ldaps://") or cfg.start_tls else None
    # ldap3 packs socket timeouts as whole seconds.
    server = ldap3.Server(url, connect_timeout=math.ceil(cfg.connect_timeout), tls=tls, get_info=ldap3.NONE)
    return ldap3.Connection(server, user=cfg.bind_dn, password=cfg.bind_password,
                            receive_timeout=math.ceil(cfg.timeout),
                            raise_exceptions=False, auto_bind=ldap3.AUTO_BIND_NONE)


def _describe(conn: ldap3.Connection) -> str:
    result = conn.result or {}
    text = result.get("description", "no answer")
    message = result.get("message")
    return f"{text} ({message})" if message else str(text)


def check(config: Config, recipient: str | None) -> list[Finding]:
    """Every directory finding for the LDAP user maps of *config*.

    Each map's own sample is the first entry it holds (in ``domains``);
    *recipient* (``--probe-recipient``) must be found by at least one map.
    """
    findings: list[Finding] = []
    for name, cfg in config.usermaps.items():
        if isinstance(cfg, LdapMapConfig):
            findings += _check_map(config, name, cfg)
    if recipient is not None and config.usermaps:
        outcomes = [_resolve(config, name, recipient) for name in config.usermaps]
        if not any(status is Status.FOUND for status, _ in outcomes):
            temp = [detail for status, detail in outcomes if status is Status.TEMP]
            how = f"gets a temporary failure ({temp[0]})" if temp else "is not found"
            findings.append(error("directory.sample", f"{config.path}: usermaps",
                                  f"--probe-recipient {recipient} {how} through axpolicy's user maps",
                                  "check the address, and the maps' base, filter and servers"))
    return findings


def _check_map(config: Config, name: str, cfg: LdapMapConfig) -> Iterator[Finding]:
    where = f"{config.path}: usermaps.{name}"
    working: ldap3.Connection | None = None
    for url in cfg.servers:
        conn = _connection(cfg, url)
        try:
            if cfg.start_tls and not url.startswith("ldaps://"):
                conn.open()
                conn.start_tls()
            if not conn.bind():
                yield error("directory.bind", f"{where}.servers {url}",
                            f"cannot bind to {url} as {cfg.bind_dn or 'anonymous'}: {_describe(conn)}; "
                            f"lookups on this server fail", "check the server, bind_dn and its password")
                conn.unbind()
                continue
        except (LDAPException, OSError, ssl.SSLError) as exc:
            yield error("directory.bind", f"{where}.servers {url}", f"cannot reach {url}: {exc}",
                        "check that the server runs and the URL, TLS settings and ca_file are right")
            continue
        if working is None:
            working = conn
        else:
            conn.unbind()
    if working is None:
        return
    try:
        yield from _check_content(config, name, cfg, working, where)
    finally:
        working.unbind()


def _check_content(config: Config, name: str, cfg: LdapMapConfig, conn: ldap3.Connection,
                   where: str) -> Iterator[Finding]:
    conn.search(cfg.base, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["1.1"])
    if conn.result.get("result") != 0:
        yield error("directory.base", f"{where}.base", f"base {cfg.base!r} cannot be read: {_describe(conn)}; "
                    f"every lookup fails", "set base to an entry that exists and the bind DN may read")
        return
    if cfg.replica:
        # slapd refuses a sync request that dereferences aliases (protocolError).
        conn.search(cfg.base, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["1.1"], size_limit=1,
                    dereference_aliases=ldap3.DEREF_NEVER, controls=[(SYNC_REQUEST_OID, True, SYNC_REFRESH_ONLY)])
        if conn.result.get("result") not in (0, 4):  # success or sizeLimitExceeded
            yield warning("directory.replica-unsupported", f"{where}.replica",
                          f"replica: true, but the directory refuses content synchronisation: "
                          f"{_describe(conn)}; every lookup is a search",
                          "enable the syncprov overlay on the provider (README.rst, 'Replica')")
    key = (_KEY_ATTRIBUTE.findall(cfg.filter) or ["mail"])[0]
    presence = re.sub(r"%[sud]", "*", cfg.filter)
    scope = {"base": ldap3.BASE, "one": ldap3.LEVEL, "sub": ldap3.SUBTREE}[cfg.scope]
    conn.search(cfg.base, presence, search_scope=scope, attributes=[key, cfg.host_attribute],
                size_limit=SAMPLE_ENTRIES)
    entries = conn.entries
    if not entries:
        yield warning("directory.sample", f"{where}.filter",
                      f"no entry under {cfg.base!r} matches {presence}: every user is 'not found'",
                      "check base, scope and filter")
        return
    hosts = [e for e in entries if cfg.host_attribute in e.entry_attributes and e[cfg.host_attribute].values]
    if not hosts:
        yield error("directory.host-attribute-hidden", f"{where}.host_attribute",
                    f"{len(entries)} entries match, none shows {cfg.host_attribute} to {cfg.bind_dn or 'anonymous'}: "
                    f"an ACL hides it (or the attribute name is wrong), so every user is 'not found'",
                    f"give the bind DN read access to {cfg.host_attribute} (slapd: olcAccess), or fix "
                    f"host_attribute")
        return
    domains = config.domains
    samples = [str(v) for e in hosts if key in e.entry_attributes for v in e[key].values
               if "@" in str(v) and (domains is None or str(v).rpartition("@")[2].lower() in domains)]
    if not samples:
        return
    status, detail = _resolve(config, name, samples[0])
    if status is Status.NOTFOUND:
        yield error("directory.sample", f"{where}.filter",
                    f"the sample address {samples[0]} (the first entry found) is not found through axpolicy",
                    "check filter, scope and base")
    elif status is Status.TEMP:
        yield error("directory.sample", where,
                    f"the sample address {samples[0]} gets a temporary failure through axpolicy: {detail}",
                    "check the servers, timeouts and the daemon's log")


def _resolve(config: Config, name: str, address: str) -> tuple[Status, str]:
    """*address* through axpolicy's own router and user map *name*: the MTA's code path."""
    from axpolicy.router import Router

    async def ask() -> tuple[Status, str]:
        router = Router.open(config)
        try:
            result = await router.resolve(address, name)
            return result.status, result.value or result.reason or ""
        finally:
            await router.close()

    return asyncio.run(ask())
