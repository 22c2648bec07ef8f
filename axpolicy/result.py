"""The three outcomes of a user-map lookup (plus PERM for protocol misuse).

DIAGNOSTICS
    FOUND     the directory holds the key; ``value`` is the host.
    NOTFOUND  a search succeeded and matched nothing, or the key can never
              be a user (routing tricks, malformed, foreign domain).
    TEMP      anything else: the directory could not answer.  ``reason``
              says why in wire-safe text.
    PERM      only for requests that are wrong in themselves (an unknown
              map name); never produced by a user map.
"""

from __future__ import annotations

import dataclasses
import enum


class Status(enum.Enum):
    """Outcome of one lookup."""

    FOUND = "found"
    NOTFOUND = "notfound"
    TEMP = "temp"
    PERM = "perm"


@dataclasses.dataclass(frozen=True, slots=True)
class LookupResult:
    """One outcome; ``value`` for FOUND, ``reason`` (wire-safe) otherwise."""

    status: Status
    value: str = ""
    reason: str = ""

    @property
    def found(self) -> bool:
        return self.status is Status.FOUND


NOTFOUND = LookupResult(Status.NOTFOUND)


def found(value: str) -> LookupResult:
    """A FOUND result carrying *value*."""
    return LookupResult(Status.FOUND, value=value)


def temp(reason: str) -> LookupResult:
    """A TEMP result; *reason* must not contain peer-supplied text."""
    return LookupResult(Status.TEMP, reason=reason)


def perm(reason: str) -> LookupResult:
    """A PERM result; *reason* must not contain peer-supplied text."""
    return LookupResult(Status.PERM, reason=reason)
