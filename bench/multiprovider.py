"""How fast a change reaches every front-end of a multi-provider cluster.

    sudo .venv/bin/python bench/multiprovider.py [--changes N]

Two slapd providers replicating each other (serverIDs 1 and 2, syncprov
and syncrepl, as in tests/test_multiprovider.py) and two axpolicy daemons,
each with a replica synced from one provider.  Each change (an add, then a
modification of the host, alternating between the providers) is timed
from the moment ``ldapmodify`` returns until both front-ends answer the
new value over their socketmap listeners (polled every millisecond).
Prints the median, 90th percentile and maximum per kind of change.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.clients import SocketmapClient  # noqa: E402
from tests.conftest import seed_ldif  # noqa: E402
from tests.slapd import PEOPLE, Slapd, free_port  # noqa: E402
from tests.test_multiprovider import Frontend, eventually, holds  # noqa: E402
from tests.test_replica import user_ldif  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=50, help="changes of each kind (default 50)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="axpolicy-multiprovider-"))
    ports = free_port(), free_port()
    urls = tuple(f"ldap://127.0.0.1:{port}" for port in ports)
    first = Slapd(workdir / "p1", seed_ldif(), port=ports[0], server_id=1, providers=(urls[1],), sessionlog=1000)
    second = Slapd(workdir / "p2", "", port=ports[1], server_id=2, providers=(urls[0],), sessionlog=1000)
    frontends: list[Frontend] = []
    try:
        first.start()
        second.start()
        eventually(lambda: holds(second, "alice"), 60)
        frontends = [Frontend(workdir / "fe1", [first, second]), Frontend(workdir / "fe2", [second, first])]
        for frontend in frontends:
            frontend.start()
        clients = [SocketmapClient(f.daemon.address("socketmap")) for f in frontends]
        timings: dict[str, list[float]] = {"add": [], "modify": []}
        for n in range(args.changes):
            provider = (first, second)[n % 2]
            uid = f"bench{n}"
            for kind, ldif, expected in (
                    ("add", user_ldif(uid, "127.0.0.2"), b"OK 127.0.0.2"),
                    ("modify", f"dn: uid={uid},{PEOPLE}\nchangetype: modify\nreplace: mailHost\n"
                               f"mailHost: 127.0.0.3\n", b"OK 127.0.0.3")):
                provider.modify(ldif)
                started = time.perf_counter()
                waiting = list(clients)
                while waiting:
                    waiting = [c for c in waiting if c.query("transport", f"{uid}@example.com") != expected]
                    if waiting:
                        if time.perf_counter() - started > 30:
                            raise RuntimeError(f"{kind} of {uid} did not arrive")
                        time.sleep(0.001)
                timings[kind].append(time.perf_counter() - started)
        for client in clients:
            client.close()
        print(f"{args.changes} changes of each kind, alternating between the two providers; "
              f"seconds until both front-ends answer the new value:")
        for kind, values in timings.items():
            values.sort()
            print(f"  {kind:7} median {statistics.median(values) * 1000:.1f} ms, "
                  f"p90 {values[int(0.9 * (len(values) - 1))] * 1000:.1f} ms, max {values[-1] * 1000:.1f} ms")
    finally:
        for frontend in frontends:
            frontend.daemon.stop()
        first.destroy()
        second.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
