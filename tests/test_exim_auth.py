"""SMTP AUTH and sender ownership through a real Exim 4.96 daemon: exim/auth.conf and exim/acl.conf.

exim4-daemon-light has no dovecot driver: the shipped plaintext
authenticators ask axpolicy's readsocket listener.  Over STARTTLS a good
password is 235, every bad one 535, a directory that cannot answer a
temporary 435 (Exim's fixed code for a deferred authentication; Postfix
says 454) -- never 535; AUTH is not offered without TLS.  An
authenticated client may send as its own addresses only.
"""

from __future__ import annotations

import base64
import contextlib
import os
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Axpolicy
from tests.exim import Exim, exim_binary
from tests.postfix import Sinks
from tests.slapd import Slapd, make_certificates
from tests.test_exim import axpolicy_config, socket_in

if exim_binary() is None:
    if os.environ.get("CI"):
        raise RuntimeError("exim4 is missing in CI: scripts/test must unpack it into .cache/exim")
    pytest.skip("no exim4 binary (run scripts/test to unpack one)", allow_module_level=True)

ALICE, ALICE_PW = "alice@example.com", "alice-Pa55word"


@pytest.fixture(scope="module")
def exim(slapd_primary: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exim]:
    workdir = tmp_path_factory.mktemp("exim-auth")
    socket_path = socket_in(workdir)
    tls = workdir / "tls"
    tls.mkdir()
    make_certificates(tls)
    for name in ("server.pem", "server.key"):
        os.chmod(tls / name, 0o644)                      # read by Exim as Debian-exim
    with contextlib.ExitStack() as stack:
        sinks = Sinks(workdir / "sinks")
        stack.callback(sinks.stop)
        config = axpolicy_config(workdir, slapd_primary, socket_path)
        config["auth"]["failure_delay"] = 0.1
        axpolicy = Axpolicy(workdir / "axpolicy", config)
        stack.callback(axpolicy.stop)
        axpolicy.start()
        server = Exim(workdir / "exim", str(socket_path), sinks.port, tls=(tls / "server.pem", tls / "server.key"),
                      authenticators=True)
        server.check()
        stack.callback(server.stop)
        server.start()
        yield server


def session(exim: Exim, port: int | None = None) -> smtplib.SMTP:
    """An SMTP session over STARTTLS on the submission port (or *port*)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    smtp = smtplib.SMTP("127.0.0.1", port or exim.submission_port, timeout=60)
    smtp.ehlo("client.example")
    smtp.starttls(context=context)
    smtp.ehlo("client.example")
    return smtp


def plain(smtp: smtplib.SMTP, login: str, password: str, authzid: str = "") -> tuple[int, str]:
    token = base64.b64encode(f"{authzid}\0{login}\0{password}".encode()).decode()
    code, text = smtp.docmd("AUTH", f"PLAIN {token}")
    return code, text.decode(errors="replace")


def test_auth_is_offered_only_under_tls_and_never_on_port_25(exim: Exim) -> None:
    with smtplib.SMTP("127.0.0.1", exim.submission_port, timeout=60) as smtp:
        smtp.ehlo("client.example")
        assert not smtp.has_extn("auth")
    with session(exim) as smtp:
        assert {"PLAIN", "LOGIN"} <= set(smtp.esmtp_features["auth"].split())
    with session(exim, port=exim.port) as smtp:              # the port standing for 25, even under TLS
        assert not smtp.has_extn("auth")


def test_plain_and_login_with_a_good_password_are_235(exim: Exim) -> None:
    with session(exim) as smtp:
        assert plain(smtp, ALICE, ALICE_PW)[0] == 235
    with session(exim) as smtp:                              # PLAIN without an initial response
        assert smtp.docmd("AUTH", "PLAIN")[0] == 334
        code, text = smtp.docmd(base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode())
        assert code == 235, text
    with session(exim) as smtp:
        code, text = smtp.docmd("AUTH", "LOGIN")
        assert code == 334, text
        smtp.docmd(base64.b64encode(b"bob@example.com").decode())
        code, text = smtp.docmd(base64.b64encode(b"bob-Pa55word").decode())
        assert code == 235, text


@pytest.mark.parametrize(("login", "password", "authzid"), [
    (ALICE, "wrong-password", ""),
    ("nobody@example.com", ALICE_PW, ""),
    (ALICE, "", ""),
    ("*)(mail=*", ALICE_PW, ""),
    (ALICE, ALICE_PW, "bob@example.com"),
])
def test_a_bad_login_is_535(exim: Exim, login: str, password: str, authzid: str) -> None:
    with session(exim) as smtp:
        code, text = plain(smtp, login, password, authzid)
    assert code == 535, (code, text)


@pytest.mark.parametrize("outage", ["stop", "pause"])
def test_a_directory_that_cannot_answer_is_a_temporary_failure(exim: Exim, slapd: Slapd, outage: str) -> None:
    getattr(slapd, outage)()
    try:
        with session(exim) as smtp:
            code, text = plain(smtp, "bob@example.com", "not-cached-" + outage)
    finally:
        slapd.restore()
    # Exim's own code for a deferred authentication (smtp_in.c), where Postfix says 454: temporary either way.
    assert (code, text.split(":")[0]) == (435, "Unable to authenticate at present"), (code, text)


@pytest.mark.parametrize(("sender", "accepted"), [
    (ALICE, True),
    ("alice.smith@example.com", True),            # her alias
    ("bob@example.com", False),                   # another user's
    ("outsider@elsewhere.example", False),        # nobody's
])
def test_an_authenticated_client_sends_only_as_its_own_addresses(exim: Exim, sender: str, accepted: bool) -> None:
    with session(exim) as smtp:
        assert plain(smtp, ALICE, ALICE_PW)[0] == 235
        assert smtp.docmd("MAIL", f"FROM:<{sender}>")[0] == 250
        code, text = smtp.docmd("RCPT", "TO:<bob@example.com>")
    if accepted:
        assert code == 250, (code, text)
    else:
        assert code == 550 and b"not owned by alice@example.com" in text, (code, text)


def test_no_password_in_the_logs(exim: Exim) -> None:
    with session(exim) as smtp:
        plain(smtp, ALICE, "Never-Logged-plugh")
    assert "plugh" not in exim.mainlog
    assert not Path(exim.workdir / "log" / "paniclog").exists() or "plugh" not in (
        exim.workdir / "log" / "paniclog").read_text()


def test_swaks_authenticates_over_starttls(exim: Exim) -> None:
    proc = subprocess.run(["swaks", "--server", f"127.0.0.1:{exim.submission_port}", "--tls", "--auth", "PLAIN",
                           "--auth-user", ALICE, "--auth-password", ALICE_PW, "--quit-after", "AUTH"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "235 Authentication succeeded" in proc.stdout
