"""A private Exim 4.96 for end-to-end tests, built from the ``exim/`` fragments.

Exim conflicts with the installed Postfix as a Debian package, so
``scripts/test`` unpacks ``exim4-daemon-light`` into ``.cache/exim`` (``EXIM``
overrides the binary).  Each instance gets its own configuration file, run
with ``-C`` as root: the harness main section, ACL frame and fallback
router below, with the fragments from ``exim/`` pasted in where the Debian
configuration would have them (only the socket path substituted).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

from tests.postfix import open_path, send_message

ROOT = Path(__file__).resolve().parent.parent
FRAGMENTS = ROOT / "exim"
UNPACKED = ROOT / ".cache" / "exim" / "usr" / "sbin" / "exim4"


def exim_binary() -> str | None:
    for candidate in (os.environ.get("EXIM"), str(UNPACKED), "/usr/sbin/exim4"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


_CONFIG = """\
# --- test harness: main section -------------------------------------------
exim_path = {exim}
primary_hostname = frontend.test
qualify_domain = frontend.test
domainlist local_domains = frontend.test
domainlist relay_to_domains = example.com : example.net
# The test client (127.0.0.1) must not be trusted.
hostlist relay_from_hosts = 127.0.0.254
spool_directory = {workdir}/spool
log_file_path = {workdir}/log/%slog
pid_file_path = {workdir}/exim.pid
exim_user = Debian-exim
exim_group = Debian-exim
never_users =
acl_smtp_rcpt = acl_check_rcpt
daemon_smtp_ports = {port}
local_interfaces = <; 127.0.0.1
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
smtp_accept_max = 50
# One session tries every open-relay vector; most are syntax errors.
smtp_max_synprot_errors = 1000
queue_run_max = 5
# --- exim/main.conf -------------------------------------------------------
{main}
begin acl

acl_check_rcpt:
  accept
    hosts = :
# --- exim/acl.conf --------------------------------------------------------
{acl}
# --- test harness: the standard relay checks (as in Debian's ACL) ---------
  accept
    hosts = +relay_from_hosts
  require
    message = relay not permitted
    domains = +local_domains : +relay_to_domains
  require
    verify = recipient
  accept

begin routers
# --- exim/router.conf -----------------------------------------------------
{router}
# --- test harness: stand-in for dnslookup, to the catch-all sink ----------
fallback:
  driver = manualroute
  domains = ! +local_domains
  route_list = * 127.0.0.4
  transport = remote_smtp

begin transports

remote_smtp:
  driver = smtp
  port = {sink_port}

begin retry
*  *  F,1h,1m
"""


class Exim:
    """One private Exim configuration, for -bt, -bh and a daemon."""

    def __init__(self, workdir: Path, socket_spec: str, sink_port: int, tls: tuple[Path, Path] | None = None,
                 authenticators: bool = False) -> None:
        exim = exim_binary()
        if exim is None:
            raise RuntimeError("no exim4 binary: run scripts/test, which unpacks it into .cache/exim")
        self.exim = exim
        self.workdir = workdir
        for sub in ("spool", "log"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
            shutil.chown(workdir / sub, "Debian-exim", "Debian-exim")
        open_path(workdir)
        self.port = _free_port()
        main = (FRAGMENTS / "main.conf").read_text()
        production_socket = "AXPOLICY_SOCKET = /run/axpolicy/exim.sock"
        if production_socket not in main:
            raise ValueError("exim/main.conf changed; update the test substitution")
        main = main.replace(production_socket, f"AXPOLICY_SOCKET = {socket_spec}")
        # A second port stands for submission (AXPOLICY_AUTH_PORTS); the first for port 25.
        self.submission_port = _free_port()
        if "AXPOLICY_AUTH_PORTS = 587 : 465" not in main:
            raise ValueError("exim/main.conf changed; update the test substitution")
        main = main.replace("AXPOLICY_AUTH_PORTS = 587 : 465", f"AXPOLICY_AUTH_PORTS = {self.submission_port}")
        self.config = workdir / "exim.conf"
        text = _CONFIG.format(exim=exim, workdir=workdir, port=self.port, sink_port=sink_port, main=main,
                              acl=(FRAGMENTS / "acl.conf").read_text(), router=(FRAGMENTS / "router.conf").read_text())
        if tls is not None:
            certificate, key = tls
            text = text.replace("tls_advertise_hosts =\n", f"tls_advertise_hosts = *\ntls_certificate = {certificate}\n"
                                                              f"tls_privatekey = {key}\n")
        if authenticators:
            text += "\nbegin authenticators\n# --- exim/auth.conf ---\n" + (FRAGMENTS / "auth.conf").read_text()
        self.config.write_text(text)
        self.daemon: subprocess.Popen[bytes] | None = None

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.exim, "-C", str(self.config), *args], input=stdin, capture_output=True,
                              text=True, timeout=120)

    def check(self) -> None:
        """Exim parses the configuration (-bV)."""
        proc = self.run("-bV")
        if proc.returncode != 0:
            raise RuntimeError(f"exim -bV failed:\n{proc.stdout}\n{proc.stderr}")

    def route(self, address: str) -> subprocess.CompletedProcess[str]:
        """``exim -bt``: rc 0 routed, 1 deferred, 2 failed."""
        return self.run("-bt", address)

    def session(self, *recipients: str, sender: str = "sender@elsewhere.example") -> list[tuple[int, str]]:
        """An ``exim -bh`` SMTP session from an untrusted client; one reply per RCPT."""
        return self.raw_session(f"<{sender}>", [f"<{r}>" for r in recipients])

    def raw_session(self, mail_from: str, rcpt_args: list[str]) -> list[tuple[int, str]]:
        """Like session(), with the MAIL FROM and RCPT TO arguments exactly as given."""
        commands = ["EHLO client.example", f"MAIL FROM:{mail_from}"]
        commands += [f"RCPT TO:{arg}" for arg in rcpt_args] + ["QUIT"]
        proc = self.run("-bh", "192.0.2.7", stdin="".join(c + "\r\n" for c in commands))
        replies = _final_replies(proc.stdout)
        # greeting, EHLO, MAIL, then one per RCPT
        if len(replies) < 3 + len(rcpt_args) or replies[2][0] != 250:
            raise AssertionError(f"unexpected -bh transcript:\n{proc.stdout}\n{proc.stderr}")
        return replies[3:3 + len(rcpt_args)]

    def start(self) -> None:
        self.daemon = subprocess.Popen([self.exim, "-C", str(self.config), "-bdf", "-q2s", "-oX",
                                        f"{self.port}:{self.submission_port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as smtp:
                    smtp.noop()
                return
            except OSError:
                if self.daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"exim daemon did not start:\n{self.mainlog}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(20)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
            self.daemon = None

    @property
    def mainlog(self) -> str:
        path = self.workdir / "log" / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""

    def send(self, *recipients: str) -> list[tuple[int, str]]:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as session:
            session.ehlo("client.example")
            session.docmd("MAIL FROM:<sender@elsewhere.example>")
            return send_message(session, recipients)


def _final_replies(transcript: str) -> list[tuple[int, str]]:
    """The last line of each SMTP reply in an -bh transcript."""
    replies = []
    for line in transcript.splitlines():
        match = re.match(r"^(\d{3}) (.*)$", line)
        if match:
            replies.append((int(match.group(1)), match.group(2)))
    return replies


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
