"""A private Postfix instance and smtp-sink back-ends for end-to-end tests.

Postfix runs from its own ``config_directory`` with its own queue and data
directories (``postfix -c DIR start``), smtpd on a free loopback port, DNS
off, and every default route pointed at a loopback sink so that a mis-route
shows up in a sink instead of leaving the machine.  The recipe under test
is appended to ``main.cf`` from ``postfix/`` with only ports and paths
substituted.
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

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "postfix"

_BASE_MAIN_CF = """\
# --- test harness (not part of the recipe) ---
compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = frontend.test
mydomain = frontend.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# The test client (127.0.0.1) must not be trusted.
mynetworks = 127.0.0.254/32
disable_dns_lookups = yes
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
maillog_file = {workdir}/maillog
maillog_file_prefixes = {workdir}
# Anything not routed by the user map lands in the catch-all sink.
default_transport = smtp:[127.0.0.4]:{sink_port}
relay_transport = relay:[127.0.0.4]:{sink_port}
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
biff = no
smtpd_banner = $myhostname ESMTP
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_connect_timeout = 5s
delay_warning_time = 0
# --- recipe ---
"""


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _backdate(path: Path) -> None:
    # Postfix re-reads a main.cf whose mtime is the current second.
    past = time.time() - 10
    os.utime(path, (past, past))


def send_message(session: smtplib.SMTP, recipients: tuple[str, ...]) -> list[tuple[int, str]]:
    """RCPT each recipient in an open session after MAIL FROM; DATA if one was accepted; the RCPT replies."""
    replies = []
    for recipient in recipients:
        code, text = session.docmd(f"RCPT TO:<{recipient}>")
        replies.append((code, text.decode(errors="replace")))
    if any(code == 250 for code, _ in replies):
        code, text = session.data(b"Subject: axpolicy test\r\n\r\nHello.\r\n")
        assert code == 250, (code, text)
    return replies


def open_path(path: Path) -> None:
    """Let unprivileged daemons (postfix, nobody) traverse to *path*.

    pytest's temporary directories are mode 0700; Postfix's master opens its
    lock file as the postfix user.
    """
    for directory in [path, *path.parents]:
        if directory == Path("/") or directory.stat().st_mode & 0o005 == 0o005:
            continue
        directory.chmod(directory.stat().st_mode | 0o055)


class Sinks:
    """smtp-sink on 127.0.0.2, .3 (back-ends) and .4 (catch-all), one port."""

    HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.chown(workdir, "nobody")
        open_path(workdir)
        self.port = self._common_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        for host in self.HOSTS:
            self.procs.append(subprocess.Popen(
                ["smtp-sink", "-u", "nobody", "-D", str(self.dump(host)), f"{host}:{self.port}", "64"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        for host in self.HOSTS:
            while True:
                try:
                    socket.create_connection((host, self.port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"smtp-sink on {host}:{self.port} did not start") from None
                    time.sleep(0.05)

    @staticmethod
    def _common_port() -> int:
        for _ in range(50):
            port = _free_port("127.0.0.2")
            try:
                for host in Sinks.HOSTS[1:]:
                    with socket.socket() as sock:
                        sock.bind((host, port))
                return port
            except OSError:
                continue
        raise RuntimeError("no common free port on 127.0.0.2-4")

    def dump(self, host: str) -> Path:
        return self.workdir / f"{host}.dump"

    def recipients(self, host: str) -> list[str]:
        """Recipients (as received) of every message delivered to *host*."""
        path = self.dump(host)
        text = path.read_text(errors="replace") if path.exists() else ""
        return re.findall(r"^X-Rcpt-Args: <([^>]*)>", text, re.MULTILINE)

    def wait_for(self, host: str, recipient: str, timeout: float = 60.0) -> None:
        """Wait until *recipient* arrived at *host* (no timing is asserted)."""
        deadline = time.monotonic() + timeout
        while recipient not in self.recipients(host):
            if time.monotonic() > deadline:
                raise AssertionError(f"{recipient} never reached {host}; got {self.everything()}")
            time.sleep(0.1)

    def everything(self) -> dict[str, list[str]]:
        return {host: self.recipients(host) for host in self.HOSTS}

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Postfix:
    """One private Postfix instance running a recipe from ``postfix/``."""

    def __init__(self, workdir: Path, recipe: str, substitutions: dict[str, str], sink_port: int) -> None:
        self.workdir = workdir
        self.conf = workdir / "etc"
        self.spool = workdir / "spool"
        self.data = workdir / "data"
        for directory in (self.conf, self.spool, self.data):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data, "postfix")
        open_path(workdir)
        self.port = _free_port()
        recipe_text = (RECIPES / recipe).read_text()
        for old, new in substitutions.items():
            if old not in recipe_text:
                raise ValueError(f"{recipe} no longer contains {old!r}; update the test substitutions")
            recipe_text = recipe_text.replace(old, new)
        self.recipe_text = recipe_text
        main_cf = self.conf / "main.cf"
        main_cf.write_text(_BASE_MAIN_CF.format(spool=self.spool, data=self.data, workdir=workdir,
                                                sink_port=sink_port) + recipe_text)
        master = (Path("/etc/postfix/master.cf").read_text()
                  if Path("/etc/postfix/master.cf").exists() else (RECIPES / "master.cf").read_text())
        # The one change: smtpd listens on a loopback test port, not 25.
        master = re.sub(r"^smtp\s+inet\s", f"127.0.0.1:{self.port} inet ", master, count=1, flags=re.MULTILINE)
        (self.conf / "master.cf").write_text(master)
        for name in ("main.cf", "master.cf"):
            _backdate(self.conf / name)
        # axpolicy's socket lives here; Postfix wants the directory as its own.
        private = self.spool / "private"
        private.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(private, "postfix")

    @property
    def maillog(self) -> str:
        path = self.workdir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postfix", "-c", str(self.conf), *args], capture_output=True, text=True,
                              timeout=60)

    def start(self) -> None:
        proc = self.postfix("start")
        if proc.returncode != 0:
            raise RuntimeError(f"postfix start failed: {proc.stderr}\n{self.maillog}")
        deadline = time.monotonic() + 20
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as smtp:
                    smtp.noop()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"smtpd not answering:\n{self.maillog}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.postfix("stop")
        pid_file = self.spool / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while pid_file.exists() and time.monotonic() < deadline:
            try:
                os.kill(int(pid_file.read_text().split()[0]), 0)
            except (OSError, ValueError):
                break
            time.sleep(0.1)

    def flush(self) -> None:
        self.postfix("flush")

    def smtp(self) -> smtplib.SMTP:
        """An SMTP session from an untrusted client, after EHLO and MAIL FROM."""
        session = smtplib.SMTP("127.0.0.1", self.port, timeout=60)
        session.ehlo("client.example")
        code, text = session.docmd("MAIL FROM:<sender@elsewhere.example>")
        assert code == 250, (code, text)
        return session

    def raw_session(self, mail_from: str, rcpt_args: list[str]) -> list[tuple[int, str]]:
        """One session from an untrusted client with MAIL FROM and RCPT TO arguments exactly as given."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as session:
            session.ehlo("client.example")
            code, text = session.docmd(f"MAIL FROM:{mail_from}")
            assert code == 250, (code, text)
            replies = []
            for arg in rcpt_args:
                # Raw UTF-8 on the wire: smtplib's docmd() only sends ASCII.
                session.send(f"RCPT TO:{arg}\r\n".encode())
                code, text = session.getreply()
                replies.append((code, text.decode(errors="replace")))
            return replies

    def rcpt(self, recipient: str) -> tuple[int, str]:
        """``RCPT TO:<recipient>`` in a fresh session; returns the reply."""
        with self.smtp() as session:
            code, text = session.docmd(f"RCPT TO:<{recipient}>")
            return code, text.decode(errors="replace")

    def send(self, *recipients: str) -> list[tuple[int, str]]:
        """One message to *recipients*; returns each RCPT reply (DATA only if one was accepted)."""
        with self.smtp() as session:
            return send_message(session, recipients)
