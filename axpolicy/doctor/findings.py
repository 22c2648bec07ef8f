"""A doctor's finding, and how a list of them becomes an exit status.

Every check returns findings; none of them prints or exits.  An identifier
(``postfix.relay-order``) is stable across releases: scripts and the README
name it.  ``unreachable`` marks a finding that says a probe or peer could
not be asked, which is a reason to retry (exit 75), not a verdict.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Literal

Severity = Literal["error", "warning"]

EXIT_CLEAN = 0
EXIT_WARNINGS = 1
EXIT_ERRORS = 2
EXIT_UNREACHABLE = os.EX_TEMPFAIL  # 75


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing wrong: what, where, and how to fix it."""

    id: str
    severity: Severity
    where: str
    message: str
    fix: str
    unreachable: bool = False

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "severity": self.severity, "where": self.where, "message": self.message,
                "fix": self.fix}

    def text(self) -> str:
        return f"{self.severity}: {self.id}: {self.where}: {self.message}\n    fix: {self.fix}"


def error(id: str, where: str, message: str, fix: str) -> Finding:
    return Finding(id, "error", where, message, fix)


def warning(id: str, where: str, message: str, fix: str) -> Finding:
    return Finding(id, "warning", where, message, fix)


def unreachable(id: str, where: str, message: str, fix: str) -> Finding:
    """A probe or peer that could not be asked (exit 75 when nothing else is wrong)."""
    return Finding(id, "warning", where, message, fix, unreachable=True)


def exit_status(findings: Iterable[Finding]) -> int:
    """0 nothing, 1 warnings only, 2 any error, 75 only unreachable probes or peers."""
    found = list(findings)
    if any(f.severity == "error" for f in found):
        return EXIT_ERRORS
    if found and all(f.unreachable for f in found):
        return EXIT_UNREACHABLE
    return EXIT_WARNINGS if found else EXIT_CLEAN
