"""A private OpenLDAP server for tests, after python-ldap's slapdtest.

Each instance lives in its own temporary directory, listens on a free
loopback port, is loaded with ``slapadd`` from an LDIF before it starts,
and can be stopped, killed, paused (SIGSTOP: a hung server) and resumed
with the same data.  slapd runs in the foreground (``-d 0``) so the PID we
hold is slapd's own.  Environment overrides: ``SLAPD``, ``SLAPADD``,
``LDAP_SCHEMA_DIR``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

DATA = Path(__file__).parent / "data"
SLAPD = os.environ.get("SLAPD", "/usr/sbin/slapd")
SLAPADD = os.environ.get("SLAPADD", "/usr/sbin/slapadd")
SCHEMA_DIR = Path(os.environ.get("LDAP_SCHEMA_DIR", "/etc/ldap/schema"))
MODULE_DIR = "/usr/lib/ldap"

SUFFIX = "dc=example,dc=com"
ROOT_DN = "cn=admin,dc=example,dc=com"
ROOT_PW = "root-secret"
BIND_DN = "cn=axpolicy,ou=services,dc=example,dc=com"
BIND_PW = "axpolicy-secret"
PEOPLE = "ou=people,dc=example,dc=com"

_CONF = """\
{server_id}include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
include {schema}/misc.schema
include {data}/axpolicy-test.schema
pidfile {run}/slapd.pid
argsfile {run}/slapd.args
modulepath {modules}
moduleload back_mdb
moduleload syncprov
sizelimit 500
database mdb
maxsize 17179869184
suffix "{suffix}"
rootdn "{rootdn}"
rootpw {rootpw}
directory {run}/db
index objectClass eq
index mail,mailAlternateAddress,uid eq
index mailHost pres,eq
index entryUUID,entryCSN eq
limits dn.exact="{binddn}" size=unlimited time=unlimited
{syncrepl}{syncprov}{access}access to attrs=userPassword
  by anonymous auth
  by * none
access to *
  by * read
"""


def _stopped(pid: int) -> bool:
    """Whether every thread of *pid* is in the stopped state."""
    tasks = Path(f"/proc/{pid}/task")
    try:
        return all((task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for task in tasks.iterdir())
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (callers retry on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def numbered_users(count: int, domain: str = "example.com") -> str:
    """LDIF for users ``user1`` .. ``userN``, alternating between back-ends.

    Each also has the numeric alias ``N@domain`` that ``smtp-source -N``
    produces.  Odd numbers live on 127.0.0.2, even ones on 127.0.0.3.
    """
    chunks = []
    for n in range(1, count + 1):
        host = "127.0.0.2" if n % 2 else "127.0.0.3"
        chunks.append(
            f"dn: uid=user{n},{PEOPLE}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n"
            f"objectClass: mailAlternateRecipient\nuid: user{n}\ncn: User {n}\nsn: {n}\n"
            f"mail: user{n}@{domain}\nmailAlternateAddress: {n}@{domain}\nmailHost: {host}\n")
    return "\n".join(chunks)


def make_certificates(workdir: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1; returns the CA file."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=workdir)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=axpolicy test CA",
            "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
            "-out", "server.csr")
    (workdir / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")
    return workdir / "ca.pem"


class Slapd:
    """One private slapd; see the module docstring."""

    def __init__(self, workdir: Path, ldif: str, port: int | None = None, tls: bool = False,
                 syncprov: bool = True, access: str = "", sessionlog: int = 0, server_id: int = 0,
                 providers: tuple[str, ...] = (), ldapi: bool = False) -> None:
        """*sessionlog*: syncprov-sessionlog (a resume gets deletions as a list, not a present phase).

        *providers* (URLs): replicate from each, as the root DN; with a
        *server_id*, as one provider of a multi-provider group, otherwise
        as a consumer.  *ldapi*: also listen on a unix socket (ldapi_url).
        """
        self.workdir = workdir
        self.port = port or free_port()
        self.tls_port = free_port() if tls else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "db").mkdir(exist_ok=True)
        self.conf = workdir / "slapd.conf"
        syncprov_conf = ("overlay syncprov\n" + (f"syncprov-sessionlog {sessionlog}\n" if sessionlog else "")
                         if syncprov else "")
        syncrepl = "".join(
            f'syncrepl rid={rid:03d} provider={url} bindmethod=simple binddn="{ROOT_DN}" credentials={ROOT_PW}\n'
            f'  searchbase="{SUFFIX}" type=refreshAndPersist retry="1 +" timeout=3\n'
            for rid, url in enumerate(providers, 1))
        if providers and server_id:
            syncrepl += "multiprovider on\n"
        self.ldapi_path = workdir / "ldapi" if ldapi else None
        conf = _CONF.format(schema=SCHEMA_DIR, data=DATA, run=workdir, modules=MODULE_DIR,
                            suffix=SUFFIX, rootdn=ROOT_DN, rootpw=ROOT_PW, binddn=BIND_DN,
                            syncprov=syncprov_conf, access=access, syncrepl=syncrepl,
                            server_id=f"serverID {server_id}\n" if server_id else "")
        if tls:
            self.ca_file = make_certificates(workdir)
            conf = (f"TLSCACertificateFile {workdir}/ca.pem\nTLSCertificateFile {workdir}/server.pem\n"
                    f"TLSCertificateKeyFile {workdir}/server.key\n") + conf
        self.conf.write_text(conf)
        ldif_path = workdir / "seed.ldif"
        ldif_path.write_text(ldif)
        if ldif.strip():   # a second provider starts empty and replicates everything
            subprocess.run([SLAPADD, "-q", "-f", str(self.conf), "-l", str(ldif_path)], check=True,
                           capture_output=True, env=self._env())

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    @property
    def ldapi_url(self) -> str:
        assert self.ldapi_path is not None
        return "ldapi://" + quote(str(self.ldapi_path), safe="")

    def _listen(self) -> str:
        urls = f"{self.url}/"
        if self.tls_port is not None:
            urls += f" {self.ldaps_url}/"
        if self.ldapi_path is not None:
            urls += f" {self.ldapi_url}/"
        return urls

    @staticmethod
    def _env() -> dict[str, str]:
        # Keep the host's ldap.conf out of every client and server we run.
        return {**os.environ, "LDAPNOINIT": "1"}

    def start(self, deadline_seconds: float = 10.0) -> None:
        """Start slapd and wait until it accepts connections."""
        if self.running:
            return
        for _ in range(5):
            log = open(self.workdir / "slapd.log", "ab")
            self.proc = subprocess.Popen(
                [SLAPD, "-d", "0", "-h", self._listen(), "-f", str(self.conf)],
                stdout=log, stderr=subprocess.STDOUT, env=self._env())
            log.close()
            if self._wait_ready(deadline_seconds):
                return
            self.proc.kill()
            self.proc.wait()
            self.port = free_port()  # probably lost a race for the port
            if self.tls_port is not None:
                self.tls_port = free_port()
        raise RuntimeError(f"slapd did not start; see {self.workdir / 'slapd.log'}")

    def _wait_ready(self, deadline_seconds: float) -> bool:
        deadline = time.monotonic() + deadline_seconds
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop slapd cleanly (SIGTERM) and wait for it."""
        if self.proc is None:
            return
        self.resume()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Crash slapd (SIGKILL)."""
        if self.proc is not None:
            self.resume()
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """Hang slapd: connections are accepted by the kernel, never answered."""
        if self.running and not self._paused:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)
            self._paused = True
            # The signal is delivered asynchronously: a request sent right
            # after send_signal() could still be answered.  Wait until every
            # thread is stopped.
            deadline = time.monotonic() + 5
            while not _stopped(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.001)

    def resume(self) -> None:
        if self._paused and self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
        self._paused = False

    def restore(self) -> None:
        """Back to a healthy, running server (test teardown)."""
        self.resume()
        self.start()

    def modify(self, ldif: str) -> None:
        """Apply an LDIF change as the root DN (ldapmodify)."""
        subprocess.run(["ldapmodify", "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PW],
                       input=ldif.encode(), check=True, capture_output=True, env=self._env())

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
