"""Where the time of one lookup goes: wall time and each server's CPU per lookup.

    sudo bench/run --help                      # the benchmark itself
    sudo .venv/bin/python bench/cpu.py         # this profile (after bench/run installed everything)

Starts a slapd with ``--users`` users (TLS too), an axpolicy over
``ldap://`` and one over ``ldaps://``, and postsrsd; runs ``postmap -q -``
with ``--keys`` keys against native ``ldap:``, each axpolicy with a cold
cache, axpolicy warm, and postsrsd; and prints, per lookup, the wall time
and the user and system CPU that axpolicy and slapd spent (from
``/proc/PID/stat``).  docs/benchmarks.rst uses it to say what limits the
cold and warm cases.  Every answer is checked.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import FILTER, host_of, stop_process, users_ldif  # noqa: E402

from tests.daemon import Axpolicy  # noqa: E402
from tests.slapd import BIND_DN, BIND_PW, PEOPLE, Slapd, free_port  # noqa: E402


def cpu(pid: int) -> tuple[float, float]:
    """(user, system) seconds of *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--keys", type=int, default=5000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="axpolicy-cpu-"))
    slapd = Slapd(work / "slapd", users_ldif(args.users), tls=True)
    slapd.start()
    servers: list[Axpolicy] = []
    srs: subprocess.Popen[bytes] | None = None
    try:
        def daemon(**ldap: object) -> Axpolicy:
            config = {"user": "root", "log": {"target": "stderr", "level": "warning"},
                      "usermaps": {"people": {"type": "ldap", "servers": [slapd.url], "bind_dn": BIND_DN,
                                              "bind_password": BIND_PW, "base": PEOPLE, "filter": FILTER,
                                              "host_attribute": "mailHost", "timeout": 3, **ldap}},
                      "recipient_delimiter": "+",
                      "cache": {"ttl": 3600, "negative_ttl": 3600, "stale_if_error": 3600, "max_entries": 200000},
                      "listen": [{"protocol": "socketmap", "address": f"inet:127.0.0.1:{free_port()}"}],
                      "maps": {"mailhost": {"usermap": "people", "result": "%s"}}}
            server = Axpolicy(work / f"axpolicy-{len(servers)}", config)
            server.start()
            servers.append(server)
            return server

        plain = daemon()
        ldaps = daemon(servers=[slapd.ldaps_url], ca_file=str(slapd.ca_file))
        secret = work / "postsrsd.secret"
        secret.write_text("x\n")
        srs_port = free_port()
        srs = subprocess.Popen(["postsrsd", "-s", str(secret), "-d", "example.com", "-l", "127.0.0.1", "-4",
                                "-f", str(srs_port), "-r", str(free_port()), "-u", "nobody"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        config_dir = work / "postmap"
        config_dir.mkdir()
        (config_dir / "main.cf").write_text("compatibility_level = 3.6\n")
        os.utime(config_dir / "main.cf", (time.time() - 10, time.time() - 10))
        native_cf = work / "ldap.cf"
        native_cf.write_text(f"server_host = {slapd.url}\nsearch_base = {PEOPLE}\nscope = sub\n"
                             f"query_filter = {FILTER}\nresult_attribute = mailHost\nbind = yes\n"
                             f"bind_dn = {BIND_DN}\nbind_pw = {BIND_PW}\nversion = 3\n")
        keys = [f"user{n}@example.com" for n in random.Random(1).sample(range(1, args.users + 1), args.keys)]
        data = "".join(k + "\n" for k in keys)
        native = f"ldap:{native_cf}"
        subprocess.run(["postmap", "-c", str(config_dir), "-q", "-", native], input=data, capture_output=True,
                       text=True)
        cases = [("native ldap:", native, None, host_of),
                 ("axpolicy cold", f"socketmap:{plain.address('socketmap')}:mailhost", plain, host_of),
                 ("axpolicy cold, ldaps://", f"socketmap:{ldaps.address('socketmap')}:mailhost", ldaps, host_of),
                 ("axpolicy warm", f"socketmap:{plain.address('socketmap')}:mailhost", plain, host_of),
                 ("postsrsd tcp:", f"tcp:127.0.0.1:{srs_port}", None, lambda k: k)]
        print(f"{args.keys} keys, {args.users} users; per lookup:")
        for label, table, server, expect in cases:
            watched = {"axpolicy": server.proc.pid if server and server.proc else None,
                       "slapd": slapd.proc.pid if slapd.proc else None}
            before = {name: cpu(pid) for name, pid in watched.items() if pid}
            started = time.perf_counter()
            proc = subprocess.run(["postmap", "-c", str(config_dir), "-q", "-", table], input=data,
                                  capture_output=True, text=True)
            wall = time.perf_counter() - started
            got = dict(line.split("\t", 1) for line in proc.stdout.splitlines())
            if got != {k: expect(k) for k in keys}:
                raise SystemExit(f"{label}: wrong answers")
            parts = [f"{label:26} {args.keys / wall:6.0f}/s  wall {wall / args.keys * 1e6:5.0f} us"]
            for name, (user0, system0) in before.items():
                user1, system1 = cpu(watched[name])  # type: ignore[arg-type]
                parts.append(f"{name} {(user1 - user0) / args.keys * 1e6:4.0f} us user "
                             f"+ {(system1 - system0) / args.keys * 1e6:4.0f} us system")
            print("  ".join(parts), flush=True)
    finally:
        if srs is not None:
            stop_process(srs)
        for server in servers:
            server.stop()
        slapd.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
