"""User maps: the interface every map implements, and the factory.

A user map answers one *exact* key (``user@domain`` or ``@domain``) with
FOUND(host), NOTFOUND or TEMP.  The search order, the cache and address
checks live in :mod:`axpolicy.router`; maps do not know about them.
"""

from __future__ import annotations

from typing import Protocol

from axpolicy.config import FileMapConfig, UserMapConfig
from axpolicy.result import LookupResult


class UserMap(Protocol):
    """What the router needs from a user map."""

    name: str
    catchall: bool  # whether ``@domain`` keys are worth asking

    @property
    def cached(self) -> bool:
        """Whether the router's cache should keep its answers (may change while running)."""
        ...

    def start(self) -> None:
        """Start background work (a replica); called on the event loop, idempotent."""
        ...

    async def lookup(self, key: str) -> LookupResult:
        """Answer one exact key: FOUND, NOTFOUND or TEMP."""
        ...

    def answers_version(self) -> int | None:
        """For maps not cached: a number that changes whenever an answer of
        :meth:`lookup_now` may change, or None when changes go unnoticed
        until the next lookup (then answers are never replayed)."""
        ...

    def lookup_now(self, key: str) -> LookupResult | None:
        """The answer if it needs no I/O, else None (maps that are cached: always None)."""
        ...

    async def close(self) -> None:
        """Release connections and background tasks."""
        ...


def open_usermap(cfg: UserMapConfig) -> UserMap:
    """Build the user map described by *cfg* (FileMapError for a bad file)."""
    if isinstance(cfg, FileMapConfig):
        from axpolicy.filemap import FileUserMap

        return FileUserMap(cfg)
    from axpolicy.ldapmap import LdapUserMap

    return LdapUserMap(cfg)
