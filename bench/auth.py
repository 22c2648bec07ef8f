"""SMTP AUTH: axpolicy's dovecot_auth listener against Dovecot's own auth service, on the same slapd.

    sudo .venv/bin/python bench/auth.py [--users N] [--auths N] [--repeat N]

Installs nothing itself: ``dovecot-core`` and ``dovecot-ldap`` must be
installed (``bench/run`` installs them).  Builds a slapd whose users have
passwords, starts axpolicy (``auth:`` with ``cache_ttl: 60``) and a private
Dovecot whose only service is ``auth`` (``passdb ldap`` with ``auth_bind =
yes`` and the same filter, ``auth_cache_size`` on), both on unix sockets,
and runs the same Dovecot-protocol client -- the requests Postfix's smtpd
sends -- against each, taking turns:

* cold: ``--auths`` different users, each asked for the first time
  (search + bind on the directory for both servers);
* cached: the same users and passwords again (both answer from their
  cache);

each over 1 connection (one smtpd) and over 8 connections at once.  Every
answer must be OK for the right user.  Prints authentications per second
and the ratio axpolicy / Dovecot; medians of ``--repeat`` rounds (each
round on fresh daemons).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import Axpolicy  # noqa: E402
from tests.slapd import BIND_DN, BIND_PW, DATA, PEOPLE, Slapd  # noqa: E402

FILTER = "(|(mail=%s)(uid=%s))"


def users_ldif(count: int) -> str:
    """The test directory (base entries, the service account) plus users with passwords."""
    return (DATA / "users.ldif").read_text() + "\n" + "\n".join(
        f"dn: uid=user{n},{PEOPLE}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n"
        f"uid: user{n}\ncn: User {n}\nsn: {n}\nmail: user{n}@example.com\nmailHost: 127.0.0.2\n"
        f"userPassword: pw-{n}-secret\n" for n in range(1, count + 1))


DOVECOT_CONF = """\
base_dir = {work}/run
state_dir = {work}/state
log_path = {work}/dovecot.log
protocols =
ssl = no
auth_mechanisms = plain login
disable_plaintext_auth = no
auth_cache_size = 64M
auth_cache_ttl = 1 hour
auth_cache_negative_ttl = 0
default_internal_user = nobody
default_internal_group = nogroup
default_login_user = nobody
passdb {{
  driver = ldap
  args = {work}/dovecot-ldap.conf.ext
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent allow_all_users=yes
}}
service auth {{
  unix_listener auth-client {{
    path = {work}/auth-client
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
"""

DOVECOT_LDAP = """\
uris = {url}
dn = {bind_dn}
dnpass = {bind_pw}
auth_bind = yes
base = {base}
scope = subtree
pass_filter = (|(mail=%u)(uid=%u))
pass_attrs = mail=user
"""


async def run_client(path: str, users: list[int], connections: int) -> float:
    """Authenticate every user once, split over *connections*; returns authentications per second."""
    async def one(batch: list[int]) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        while (await reader.readline()).rstrip(b"\n") != b"DONE":
            pass
        writer.write(b"VERSION\t1\t0\nCPID\t%d\n" % os.getpid())
        for request_id, n in enumerate(batch, start=1):
            token = base64.b64encode(f"\0user{n}@example.com\0pw-{n}-secret".encode())
            writer.write(b"AUTH\t%d\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=127.0.0.1\tresp=%s\n"
                         % (request_id, token))
            reply = (await reader.readline()).rstrip(b"\n").split(b"\t")
            if reply[:2] != [b"OK", b"%d" % request_id] or b"user=user%d@example.com" % n not in reply:
                raise SystemExit(f"wrong answer for user{n}: {reply!r}")
        writer.close()

    batches = [users[i::connections] for i in range(connections)]
    started = time.perf_counter()
    await asyncio.gather(*(one(batch) for batch in batches))
    return len(users) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--auths", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("dovecot") is None:
        print("bench/auth.py: dovecot is not installed (apt-get install dovecot-core dovecot-ldap)",
              file=sys.stderr)
        return 77
    work = Path(tempfile.mkdtemp(prefix="axpolicy-auth-"))
    work.chmod(0o755)
    slapd = Slapd(work / "slapd", users_ldif(args.users))
    slapd.start()
    results: dict[str, list[float]] = {}
    try:
        for round_number in range(args.repeat):
            rdir = work / f"round{round_number}"
            for sub in ("run", "state"):
                (rdir / sub).mkdir(parents=True)
            shutil.chown(rdir / "run", "root")
            (rdir / "dovecot-ldap.conf.ext").write_text(DOVECOT_LDAP.format(
                url=slapd.url, bind_dn=BIND_DN, bind_pw=BIND_PW, base=PEOPLE))
            (rdir / "dovecot.conf").write_text(DOVECOT_CONF.format(work=rdir))
            dovecot = subprocess.Popen(["dovecot", "-F", "-c", str(rdir / "dovecot.conf")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            socket_path = str(rdir / "auth-client")
            ax_path = str(rdir / "axpolicy-auth")
            axpolicy = Axpolicy(rdir / "axpolicy", {
                "usermaps": {"people": {"type": "ldap", "servers": [slapd.url], "bind_dn": BIND_DN,
                                        "bind_password": BIND_PW, "base": PEOPLE, "filter": FILTER,
                                        "host_attribute": "mailHost", "timeout": 3}},
                "auth": {"usermap": "people", "login_attribute": "mail", "cache_ttl": 3600},
                "listen": [{"protocol": "dovecot_auth", "address": f"unix:{ax_path}", "mode": "0666"}],
                "log": {"target": "stderr", "level": "warning"}})
            axpolicy.start()
            try:
                deadline = time.monotonic() + 20
                while not os.path.exists(socket_path):
                    if time.monotonic() > deadline or dovecot.poll() is not None:
                        raise SystemExit(f"dovecot did not start: {(rdir / 'dovecot.log').read_text()[-2000:]}")
                    time.sleep(0.05)
                first = round_number * args.auths * 2
                for connections in (1, 8):
                    users = list(range(first + 1, first + args.auths + 1))
                    first += args.auths
                    # Who goes first alternates: the second finds slapd's entry cache warm.
                    servers = [("axpolicy", ax_path), ("dovecot", socket_path)]
                    for phase in ("cold", "cached"):
                        for label, path in servers if round_number % 2 == 0 else servers[::-1]:
                            rate = asyncio.run(run_client(path, users, connections))
                            results.setdefault(f"{phase}, {connections} connection(s): {label}", []).append(rate)
            finally:
                axpolicy.stop()
                dovecot.terminate()
                dovecot.wait()
    finally:
        slapd.destroy()
        shutil.rmtree(work, ignore_errors=True)
    print(f"SMTP AUTH, {args.auths} authentications per case, {args.users} users, median of {args.repeat}")
    for phase in ("cold", "cached"):
        for connections in (1, 8):
            ours = statistics.median(results[f"{phase}, {connections} connection(s): axpolicy"])
            theirs = statistics.median(results[f"{phase}, {connections} connection(s): dovecot"])
            print(f"{phase:6} {connections} connection(s): axpolicy {ours:8.0f}/s  dovecot {theirs:8.0f}/s  "
                  f"ratio {ours / theirs:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
