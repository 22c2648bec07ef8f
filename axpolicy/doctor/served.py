"""What an axpolicy configuration serves: listeners, maps and worst-case answer times.

The MTA checks ask this module whether an endpoint named in the MTA's
configuration (a socket path, a host and port, a map name) is one that the
axpolicy configuration given with ``-c`` answers, and how long axpolicy may
take to answer, so that an MTA-side timeout can be compared with it.
"""

from __future__ import annotations

import ipaddress
import os
import socket

from axpolicy.config import Config, LdapMapConfig, ListenConfig


def _addresses(host: str) -> set[str]:
    """The IP addresses *host* names (itself when it is one); empty when it resolves to nothing."""
    host = host.strip("[]")
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return set()


class Served:
    """The listeners and maps of one axpolicy configuration."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def unix(self, path: str) -> ListenConfig | None:
        """The listener bound to the unix socket *path*, if any."""
        wanted = os.path.normpath(path)
        for listener in self.config.listen:
            if listener.family == "unix" and os.path.normpath(listener.path) == wanted:
                return listener
        return None

    def inet(self, host: str, port: int) -> ListenConfig | None:
        """The listener that a client connecting to *host*:*port* reaches, if any."""
        wanted = _addresses(host)
        for listener in self.config.listen:
            if listener.family != "inet" or listener.port != port:
                continue
            if listener.host in ("", "0.0.0.0", "::") or wanted & _addresses(listener.host):
                return listener
        return None

    def serves_map(self, listener: ListenConfig, name: str) -> bool:
        """Whether a request for map *name* on *listener* is answered (not refused as unknown)."""
        if name == "AUTH":
            return listener.protocol == "readsocket" and self.config.auth is not None
        return name in self.config.maps

    def deadline(self, usermap: str) -> float:
        """Seconds axpolicy may take, at worst, to answer one address from *usermap*.

        A key is looked up as given, then without its extension, then as the
        domain catch-all: each lookup has the user map's own deadline.
        """
        cfg = self.config.usermaps.get(usermap)
        if not isinstance(cfg, LdapMapConfig):
            return 0.0
        return cfg.timeout * (1 + bool(self.config.recipient_delimiter) + cfg.catchall)

    def map_deadline(self, name: str) -> float:
        """:meth:`deadline` for a map name (``AUTH``: a search and a bind, or the failure delay)."""
        if name == "AUTH":
            auth = self.config.auth
            if auth is None:
                return 0.0
            cfg = self.config.usermaps.get(auth.usermap)
            timeout = cfg.timeout if isinstance(cfg, LdapMapConfig) else 0.0
            return max(2 * timeout, auth.failure_delay)
        spec = self.config.maps.get(name)
        return self.deadline(spec.usermap) if spec is not None and spec.usermap else 0.0

    def policy_deadline(self) -> float:
        return self.deadline(self.config.policy.usermap) if self.config.policy.usermap else 0.0
