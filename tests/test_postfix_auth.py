"""SMTP AUTH through a real Postfix: the submission services of postfix/master.cf with main.cf.auth.

Postfix's smtpd asks axpolicy's dovecot_auth listener (the shipped
postfix/axpolicy.yml) on the unix socket inside its queue directory, over
STARTTLS on submission and TLS from the start on submissions.  Good
passwords get 235, every kind of bad one 535, and a directory that cannot
answer 454 4.7.0 -- never 535.  Port 25 offers no AUTH at all.
"""

from __future__ import annotations

import base64
import contextlib
import re
import smtplib
import ssl
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import shipped_config
from tests.daemon import Axpolicy
from tests.postfix import RECIPES, Postfix, Sinks, _free_port
from tests.slapd import Slapd, make_certificates

ALICE, ALICE_PW = "alice@example.com", "alice-Pa55word"


class AuthFrontend:
    def __init__(self, postfix: Postfix, axpolicy: Axpolicy, submission: int, submissions: int) -> None:
        self.postfix, self.axpolicy, self.submission, self.submissions = postfix, axpolicy, submission, submissions

    def session(self, wrapped: bool = False) -> smtplib.SMTP:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE   # a throw-away certificate
        if wrapped:
            session: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", self.submissions, timeout=60, context=context)
            session.ehlo("client.example")
            return session
        session = smtplib.SMTP("127.0.0.1", self.submission, timeout=60)
        session.ehlo("client.example")
        session.starttls(context=context)
        session.ehlo("client.example")
        return session


@pytest.fixture(scope="module")
def frontend(slapd_primary: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthFrontend]:
    workdir = tmp_path_factory.mktemp("postfix-auth")
    tls = workdir / "tls"
    tls.mkdir()
    make_certificates(tls)
    with contextlib.ExitStack() as stack:
        sinks = Sinks(workdir / "sinks")
        stack.callback(sinks.stop)
        postfix = Postfix(workdir / "postfix", "main.cf.auth",
                          {"/etc/postfix/frontend.pem": str(tls / "server.pem"),
                           "/etc/postfix/frontend.key": str(tls / "server.key")}, sink_port=sinks.port)
        submission, submissions = _free_port(), _free_port()
        services = (RECIPES / "master.cf").read_text()
        services = services[services.index("submission inet"):services.index("#\n# axpolicy is not started")]
        services = services.replace("submission inet", f"127.0.0.1:{submission} inet", 1)
        services = services.replace("submissions inet", f"127.0.0.1:{submissions} inet", 1)
        master = postfix.conf / "master.cf"
        master.write_text(master.read_text() + services)
        subprocess.run(["touch", "-d", "-10 seconds", str(master)], check=True)
        config = shipped_config(RECIPES / "axpolicy.yml", workdir, slapd_primary)
        config["auth"]["failure_delay"] = 0.1
        config["maps"]["senders"]["send_as"] = "axpolicySendAs"        # the test directory's attribute
        for listener in config["listen"]:
            listener["address"] = re.sub(r"inet:127\.0\.0\.1:\d+", f"inet:127.0.0.1:{_free_port()}",
                                         listener["address"].replace("/var/spool/postfix", str(postfix.spool)))
        axpolicy = Axpolicy(workdir / "axpolicy", config)
        stack.callback(axpolicy.stop)
        axpolicy.start()
        stack.callback(postfix.stop)
        postfix.start()
        yield AuthFrontend(postfix, axpolicy, submission, submissions)


def auth_plain(session: smtplib.SMTP, login: str, password: str, initial: bool = True) -> tuple[int, str]:
    token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    if initial:
        code, text = session.docmd("AUTH", f"PLAIN {token}")
    else:
        code, text = session.docmd("AUTH", "PLAIN")
        assert code == 334, (code, text)
        code, text = session.docmd(token)
    return code, text.decode(errors="replace")


def auth_login(session: smtplib.SMTP, login: str, password: str) -> tuple[int, str]:
    code, text = session.docmd("AUTH", "LOGIN")
    assert (code, text) == (334, b"VXNlcm5hbWU6"), (code, text)
    code, text = session.docmd(base64.b64encode(login.encode()).decode())
    assert code == 334, (code, text)
    code, text = session.docmd(base64.b64encode(password.encode()).decode())
    return code, text.decode(errors="replace")


@pytest.mark.parametrize("how", ["plain", "plain without initial response", "login", "submissions"])
def test_a_good_password_is_235(frontend: AuthFrontend, how: str) -> None:
    with frontend.session(wrapped=how == "submissions") as session:
        if how == "login":
            code, text = auth_login(session, ALICE, ALICE_PW)
        else:
            code, text = auth_plain(session, ALICE, ALICE_PW, initial=how != "plain without initial response")
        assert code == 235, text


def test_swaks_authenticates_over_starttls(frontend: AuthFrontend) -> None:
    proc = subprocess.run(["swaks", "--server", f"127.0.0.1:{frontend.submission}", "--tls", "--auth", "LOGIN",
                           "--auth-user", "bob@example.com", "--auth-password", "bob-Pa55word",
                           "--quit-after", "AUTH"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "235 2.7.0 Authentication successful" in proc.stdout


@pytest.mark.parametrize(("login", "password"), [
    (ALICE, "wrong-password"),
    ("nobody@example.com", ALICE_PW),
    (ALICE, ""),
    ("*)(mail=*", ALICE_PW),
])
def test_a_bad_login_is_535_whatever_the_reason(frontend: AuthFrontend, login: str, password: str) -> None:
    with frontend.session() as session:
        code, text = auth_plain(session, login, password)
    assert code == 535 and "5.7.8" in text, (code, text)


def test_an_authzid_that_differs_is_535(frontend: AuthFrontend) -> None:
    token = base64.b64encode(f"bob@example.com\0{ALICE}\0{ALICE_PW}".encode()).decode()
    with frontend.session() as session:
        code, text = session.docmd("AUTH", f"PLAIN {token}")
    assert code == 535, (code, text)


@pytest.mark.parametrize("outage", ["stop", "pause"])
def test_a_directory_that_cannot_answer_is_454_never_535(frontend: AuthFrontend, slapd: Slapd,
                                                         outage: str) -> None:
    getattr(slapd, outage)()
    try:
        with frontend.session() as session:
            code, text = auth_plain(session, "bob@example.com", "not-cached-" + outage)
    finally:
        slapd.restore()
    assert (code, text.split(" ", 1)[0]) == (454, "4.7.0"), (code, text)
    with frontend.session() as session:
        assert auth_plain(session, "bob@example.com", "bob-Pa55word")[0] == 235      # back when it is


def test_auth_is_offered_only_under_tls_on_submission_and_never_on_port_25(frontend: AuthFrontend) -> None:
    with smtplib.SMTP("127.0.0.1", frontend.submission, timeout=60) as plain:
        plain.ehlo("client.example")
        assert not plain.has_extn("auth")
    with frontend.session() as secured:
        assert "PLAIN" in secured.esmtp_features["auth"] and "LOGIN" in secured.esmtp_features["auth"]
    with smtplib.SMTP("127.0.0.1", frontend.postfix.port, timeout=60) as port25:
        port25.ehlo("client.example")
        assert not port25.has_extn("auth")


def test_the_password_is_in_no_log(frontend: AuthFrontend) -> None:
    with frontend.session() as session:
        auth_plain(session, ALICE, "Never-Logged-xyzzy")
    assert "xyzzy" not in frontend.axpolicy.log + frontend.postfix.maillog
    assert ALICE_PW not in frontend.axpolicy.log + frontend.postfix.maillog


def mail_from(session: smtplib.SMTP, sender: str) -> tuple[int, str]:
    """MAIL FROM and one RCPT (sender restrictions are applied at RCPT); the RCPT reply."""
    code, text = session.docmd("MAIL", f"FROM:<{sender}>")
    assert code == 250, (code, text)
    code, text = session.docmd("RCPT", "TO:<someone@elsewhere.example>")
    session.rset()
    return code, text.decode(errors="replace")


@pytest.mark.parametrize(("login", "password", "sender", "accepted"), [
    (ALICE, ALICE_PW, ALICE, True),                                  # her own address
    (ALICE, ALICE_PW, "alice.smith@example.com", True),              # her alias
    (ALICE, ALICE_PW, "Alice+News@Example.com", True),               # an extension of it
    (ALICE, ALICE_PW, "bob@example.com", False),                     # another user's
    (ALICE, ALICE_PW, "outsider@elsewhere.example", False),          # nobody's: not hers either
    ("bob@example.com", "bob-Pa55word", "alice@example.com", True),  # send-as (axpolicySendAs on Alice)
    ("bob@example.com", "bob-Pa55word", "bob@example.com", True),
])
def test_senders_are_checked_against_their_owners(frontend: AuthFrontend, login: str, password: str,
                                                  sender: str, accepted: bool) -> None:
    with frontend.session() as session:
        assert auth_plain(session, login, password)[0] == 235
        code, text = mail_from(session, sender)
    if accepted:
        assert code == 250, (code, text)
    else:
        assert code == 553 and "Sender address rejected: not owned by user" in text, (code, text)


def test_owners_the_directory_cannot_say_are_a_temporary_failure(frontend: AuthFrontend, slapd: Slapd) -> None:
    with frontend.session() as session:
        assert auth_plain(session, ALICE, ALICE_PW)[0] == 235          # verified: cached from here on
    with frontend.session() as session:
        slapd.stop()
        try:
            assert auth_plain(session, ALICE, ALICE_PW)[0] == 235      # the cached pair
            code, text = mail_from(session, ALICE)
        finally:
            slapd.restore()
    assert code == 451 and "4.3.0" in text, (code, text)
