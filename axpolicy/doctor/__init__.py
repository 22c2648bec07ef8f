"""``axpolicy doctor``: find the open relay, the mis-wired map and the drifted front-end.

DESCRIPTION
    Offline checks read the MTA's configuration and compare it with the
    axpolicy configuration (``-c``): postfix.py and exim.py.  Directory
    checks bind to each LDAP user map's servers: directory.py.  Live checks
    talk to running servers: an SMTP probe with the open-relay vectors
    (probe.py) and the metrics of other front-ends (peers.py).  Each check
    returns :class:`~axpolicy.doctor.findings.Finding` objects; this module
    only decides which checks run and how the result is printed.

EXIT STATUS
    0 nothing found, 1 warnings only, 2 at least one error, 75 a probe or
    peer could not be reached and nothing else was wrong (findings.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import TextIO

from axpolicy.config import Config
from axpolicy.doctor import findings as _findings
from axpolicy.doctor.findings import Finding
from axpolicy.doctor.served import Served


@dataclasses.dataclass(frozen=True)
class Options:
    """What to check; None means "not asked for"."""

    config: Config | None
    postfix_config: str | None = None
    exim_config: str | None = None
    probe: str | None = None
    probe_recipient: str | None = None
    peers: tuple[str, ...] = ()


def run(options: Options) -> list[Finding]:
    """Every check the options ask for, in a fixed order."""
    from axpolicy.config import digest
    from axpolicy.doctor import directory, exim, peers, postfix, probe

    served = Served(options.config) if options.config is not None else None
    found: list[Finding] = []
    if options.postfix_config is not None:
        found += postfix.check(options.postfix_config, served)
    if options.exim_config is not None:
        found += exim.check(options.exim_config, served)
    if options.config is not None:
        found += directory.check(options.config, options.probe_recipient)
    if options.probe is not None:
        hosted = _hosted_domain(options)
        found += probe.check(options.probe, hosted, options.probe_recipient)
    if options.peers and options.config is not None:
        found += peers.check(list(options.peers), digest(options.config))
    return found


def _hosted_domain(options: Options) -> str | None:
    """A domain the front-end hosts, for the routed vectors: the probe recipient's, else axpolicy's first."""
    if options.probe_recipient and "@" in options.probe_recipient:
        return options.probe_recipient.rpartition("@")[2]
    if options.config is not None and options.config.domains:
        return sorted(options.config.domains)[0]
    return None


def default_postfix_config() -> str | None:
    """/etc/postfix when it holds a main.cf (the directory postconf reads by default)."""
    from axpolicy.doctor.postfix import DEFAULT_DIRECTORY

    return DEFAULT_DIRECTORY if os.path.exists(os.path.join(DEFAULT_DIRECTORY, "main.cf")) else None


def report(found: list[Finding], as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print the findings; return the exit status."""
    if as_json:
        json.dump([f.as_dict() for f in found], out, indent=2)
        out.write("\n")
    else:
        for finding in found:
            print(finding.text(), file=out)
        errors = sum(f.severity == "error" for f in found)
        warnings = len(found) - errors
        print(f"axpolicy doctor: {errors} error(s), {warnings} warning(s)" if found
              else "axpolicy doctor: nothing found", file=out)
    return _findings.exit_status(found)
