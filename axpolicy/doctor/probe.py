"""Live SMTP probe: try the classic open-relay vectors against a front-end, never sending mail.

DESCRIPTION
    One session per sender (a foreign one, a hosted-domain one, the null
    sender): EHLO, MAIL FROM, one RCPT TO per vector, RSET; then QUIT.
    DATA is never sent, so nothing is ever delivered.  Foreign names are
    under ``.invalid`` (RFC 2606): they cannot exist.  An accepted (2xx)
    vector is an error carrying its transcript line.  ``--probe-recipient``
    must be accepted: it shows the probe reached a working front-end.

    Run it from a client outside ``mynetworks`` (and not authenticated):
    trusted clients may relay by design.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

from axpolicy.doctor.findings import Finding, error, unreachable, warning

FOREIGN = "axpolicy-doctor.invalid"
TIMEOUT_SECONDS = 30.0


def vectors(hosted: str | None) -> list[tuple[str, str]]:
    """(name, RCPT TO argument) for every open-relay vector; routed ones through *hosted*."""
    found = [
        ("foreign domain", f"<relaytest@{FOREIGN}>"),
        ("foreign domain, upper case", f"<RELAYTEST@{FOREIGN.upper()}>"),
        ("foreign domain, trailing dot", f"<relaytest@{FOREIGN}.>"),
        ("address literal", "<relaytest@[192.0.2.1]>"),
        ("IPv6 address literal", "<relaytest@[IPv6:2001:db8::1]>"),
        ("percent hack", f"<relaytest%{FOREIGN}>"),
        ("bang path", f"<{FOREIGN}!relaytest>"),
        ("quoted local part with @", f'<"relaytest@{FOREIGN}">'),
        ("no angle brackets", f"relaytest@{FOREIGN}"),
    ]
    if hosted:
        found += [
            ("percent hack via a hosted domain", f"<relaytest%{FOREIGN}@{hosted}>"),
            ("bang path via a hosted domain", f"<{FOREIGN}!relaytest@{hosted}>"),
            ("source route", f"<@{hosted}:relaytest@{FOREIGN}>"),
            ("source route, two hops", f"<@{hosted},@{FOREIGN}:relaytest@{FOREIGN}>"),
            ("quoted local part with @ via a hosted domain", f'<"relaytest@{FOREIGN}"@{hosted}>'),
            ("several @", f"<relaytest@{FOREIGN}@{hosted}>"),
            ("hosted domain as a suffix", f"<relaytest@{hosted}.{FOREIGN}>"),
            ("address literal with percent hack", f"<relaytest%{FOREIGN}@[192.0.2.1]>"),
        ]
    return found


def senders(hosted: str | None) -> list[str]:
    return [f"<probe@{FOREIGN}>", *([f"<postmaster@{hosted}>"] if hosted else []), "<>"]


def check(target: str, hosted: str | None, recipient: str | None) -> list[Finding]:
    """Findings of a probe of *target* (HOST:PORT, [IPv6]:PORT)."""
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return [error("probe.target", target, "expected HOST:PORT (or [IPv6]:PORT)", "e.g. --probe mx1.example:25")]
    try:
        return list(_probe(host, int(port), target, hosted, recipient))
    except (OSError, smtplib.SMTPException) as exc:
        return [unreachable("probe.unreachable", target, f"the SMTP probe could not complete: {exc}",
                            "run it again when the front-end answers; check the address and any firewall")]


def _session(host: str, port: int) -> smtplib.SMTP:
    smtp = smtplib.SMTP(host, port, local_hostname="doctor.axpolicy.invalid", timeout=TIMEOUT_SECONDS)
    code, _ = smtp.ehlo()
    if code != 250:
        smtp.helo()
    return smtp


def _probe(host: str, port: int, target: str, hosted: str | None, recipient: str | None) -> Iterator[Finding]:
    """One session per sender, so that MTAs' error limits (Postfix: 20 per session) are not reached.

    A server that still hangs up is reconnected and the probe goes on with
    the next vector.
    """
    for sender in senders(hosted):
        pending = vectors(hosted) + ([("probe recipient", f"<{recipient}>")] if recipient and sender != "<>" else [])
        reconnects = 0
        while pending:
            smtp = _session(host, port)
            try:
                code, text = smtp.docmd(f"MAIL FROM:{sender}")
                if code != 250:
                    yield warning("probe.mail-refused", target,
                                  f"MAIL FROM:{sender} got {code} {_text(text)}: the vectors were not tried with it",
                                  "fine if the front-end refuses forged senders of its own domains on port 25; "
                                  "otherwise check why it refuses this sender")
                    pending = []
                while pending:
                    name, argument = pending[0]
                    code, text = smtp.docmd(f"RCPT TO:{argument}")
                    pending.pop(0)
                    yield from _verdict(target, sender, name, argument, code, text)
                smtp.rset()
                smtp.quit()
            except smtplib.SMTPServerDisconnected:
                reconnects += 1
                if reconnects > len(vectors(hosted)):
                    raise
            finally:
                smtp.close()


def _verdict(target: str, sender: str, name: str, argument: str, code: int, text: bytes) -> Iterator[Finding]:
    accepted = 200 <= code < 300
    if name == "probe recipient" and not accepted:
        yield error("probe.recipient-refused", target,
                    f"--probe-recipient with MAIL FROM:{sender}: RCPT TO:{argument} -> {code} {_text(text)}; "
                    f"the front-end does not accept mail for a user it hosts",
                    "check the user map, the daemon and the MTA's log")
    elif name != "probe recipient" and accepted:
        yield error("probe.open-relay", target,
                    f"{name} accepted with MAIL FROM:{sender}: RCPT TO:{argument} -> {code} {_text(text)}",
                    "refuse it before anything can permit it: reject_unauth_destination first in "
                    "smtpd_relay_restrictions (Postfix), the standard relay ACL (Exim); then run "
                    "axpolicy doctor on the configuration")


def _text(text: bytes) -> str:
    return text.decode("utf-8", "replace").replace("\n", " ")[:200]

