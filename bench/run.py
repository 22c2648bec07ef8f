"""axpolicy benchmarks: every case side by side, in one run, with real clients.

    sudo bench/run [--users N] [--keys N] [--repeat N] [--quick] [CASE ...]
    sudo bench/run --users 1000000 scale      # the replica at a million entries

Sets up its own slapd (``--users`` users like the tests'), axpolicy, the
servers it is compared with (Postfix's native ``ldap:`` table, postsrsd,
postfwd), runs each case ``--repeat`` times and prints medians and the ratio
to the baseline measured in the same run.  Every answer is checked: a
benchmark that got a wrong answer fails instead of reporting a number.
Results also go to bench/results/latest.json.  See bench/README.rst.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemon import Axpolicy, connect  # noqa: E402
from tests.postfix import Postfix, Sinks, open_path  # noqa: E402
from tests.slapd import BIND_DN, BIND_PW, DATA, PEOPLE, Slapd, free_port, numbered_users  # noqa: E402

FILTER = "(|(mail=%s)(mailAlternateAddress=%s))"


def users_ldif(count: int) -> str:
    """The test directory plus ``count`` users on alternating back-ends (as in the tests)."""
    return (DATA / "users.ldif").read_text() + "\n" + numbered_users(count)


def host_of(key: str) -> str:
    n = int(re.match(r"(?:user)?(\d+)@", key).group(1))  # type: ignore[union-attr]
    return "127.0.0.2" if n % 2 else "127.0.0.3"


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.results: dict[str, Any] = {}
        self.stack = contextlib.ExitStack()
        rng = random.Random(42)
        every = [f"user{n}@example.com" for n in range(1, args.users + 1)] + \
                [f"{n}@example.com" for n in range(1, args.users + 1)]
        rng.shuffle(every)
        self.keys = every[: args.keys]                      # distinct, drawn from the directory
        self.unknown_round = 0
        self.postmap_dir = workdir / "postmap"
        self.postmap_dir.mkdir()
        (self.postmap_dir / "main.cf").write_text("compatibility_level = 3.6\n")
        past = time.time() - 10
        os.utime(self.postmap_dir / "main.cf", (past, past))

    # -- servers ------------------------------------------------------------

    def start(self) -> None:
        print(f"setting up: slapd with {self.args.users} users ...", flush=True)
        self.slapd = Slapd(self.workdir / "slapd", users_ldif(self.args.users), tls=True,
                           sessionlog=self.args.sessionlog)
        self.slapd.start()
        self.stack.callback(self.slapd.destroy)
        ldap_cf = self.workdir / "ldap-mailhost.cf"
        ldap_cf.write_text(f"server_host = {self.slapd.url}\nsearch_base = {PEOPLE}\nscope = sub\n"
                           f"query_filter = {FILTER}\nresult_attribute = mailHost\nbind = yes\n"
                           f"bind_dn = {BIND_DN}\nbind_pw = {BIND_PW}\nversion = 3\n")
        self.native = f"ldap:{ldap_cf}"
        self.axpolicy = self._axpolicy()
        self.replica = self._axpolicy(replica=True)
        # The same map over TLS: ldaps:// and StartTLS (one code path for all three).
        tls = {"ca_file": str(self.slapd.ca_file)}
        self.ldaps = self._axpolicy(ldap={**tls, "servers": [self.slapd.ldaps_url]})
        self.starttls = self._axpolicy(ldap={**tls, "start_tls": True})
        secret = self.workdir / "postsrsd.secret"
        secret.write_text("benchmark-secret\n")
        self.postsrsd_port = free_port()
        proc = subprocess.Popen(["postsrsd", "-s", str(secret), "-d", "example.com", "-l", "127.0.0.1", "-4",
                                 "-f", str(self.postsrsd_port), "-r", str(free_port()), "-u", "nobody"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.stack.callback(stop_process, proc)
        wait_port(self.postsrsd_port)

    def _axpolicy(self, cache: dict[str, Any] | None = None, replica: bool = False,
                  ldap: dict[str, Any] | None = None, state_dir: Path | None = None) -> Axpolicy:
        workdir = self.workdir / f"axpolicy-{time.monotonic_ns()}"
        config = {
            "state_dir": str(state_dir or workdir / "state"),
            "user": "root",
            "log": {"target": "stderr", "level": "info"},
            "usermaps": {"people": {"type": "ldap", "servers": [self.slapd.url], "bind_dn": BIND_DN,
                                    "bind_password": BIND_PW, "base": PEOPLE, "filter": FILTER,
                                    "host_attribute": "mailHost", "timeout": 3, "pool_size": 4,
                                    "replica": replica, **(ldap or {})}},
            "recipient_delimiter": "+",
            "cache": cache or {"ttl": 3600, "negative_ttl": 3600, "stale_if_error": 3600, "max_entries": 200000},
            "listen": [{"protocol": "socketmap", "address": f"inet:127.0.0.1:{free_port()}"},
                       {"protocol": "tcp_table", "address": f"inet:127.0.0.1:{free_port()}", "map": "mailhost"},
                       {"protocol": "policy", "address": f"inet:127.0.0.1:{free_port()}"}],
            "maps": {"mailhost": {"usermap": "people", "result": "%s"},
                     "transport": {"usermap": "people", "result": "relay:[%s]"}},
        }
        server = Axpolicy(workdir, config)
        server.start()
        self.stack.callback(server.stop)
        if replica:
            wait_replica(server, 1)
        return server

    def restart_axpolicy(self, server: Axpolicy | None = None) -> None:
        server = server or self.axpolicy
        server.stop()
        server.start()

    def restart_replica(self) -> None:
        """A fresh daemon whose replica has completed a full refresh: nothing is cached, nothing kept."""
        done = self.replica.log.count("replica ready")
        self.replica.stop()
        shutil.rmtree(self.replica.config["state_dir"], ignore_errors=True)
        self.replica.start()
        wait_replica(self.replica, done + 1)

    # -- clients ------------------------------------------------------------

    def postmap(self, table: str, keys: list[str]) -> tuple[float, str]:
        data = "".join(k + "\n" for k in keys).encode()
        started = time.perf_counter()
        proc = subprocess.run(["postmap", "-c", str(self.postmap_dir), "-q", "-", table], input=data,
                              capture_output=True, timeout=600)
        elapsed = time.perf_counter() - started
        if proc.returncode not in (0, 1) or proc.stderr:
            raise RuntimeError(f"postmap {table}: rc {proc.returncode}: {proc.stderr.decode()[:300]}")
        return elapsed, proc.stdout.decode()

    def check(self, label: str, keys: list[str], output: str, expect: Callable[[str], str | None]) -> None:
        got = dict(line.split("\t", 1) for line in output.splitlines())
        wanted = {k: v for k in keys if (v := expect(k)) is not None}
        if got != wanted:
            wrong = [(k, got.get(k), wanted.get(k)) for k in set(got) | set(wanted) if got.get(k) != wanted.get(k)]
            raise RuntimeError(f"{label}: {len(wrong)} wrong answers, e.g. {wrong[:3]}")

    def socketmap(self, name: str = "mailhost") -> str:
        return f"socketmap:{self.axpolicy.address('socketmap')}:{name}"

    def tcp(self) -> str:
        return f"tcp:{self.axpolicy.address('tcp_table')[len('inet:'):]}"

    def unknown_keys(self) -> list[str]:
        self.unknown_round += 1
        return [f"nobody{self.unknown_round}x{i}@example.com" for i in range(len(self.keys))]

    # -- cases --------------------------------------------------------------

    def sequential(self) -> None:
        keys = self.keys
        replica = f"socketmap:{self.replica.address('socketmap')}:mailhost"
        # (label, table, keys, expected answer, what to do first).  Every
        # round runs every case once, in this order, so that the machine's
        # drift touches all of them alike: "cold" restarts axpolicy and asks
        # 20,000 keys it has never seen; the next passes ask them again (cache
        # hits; the replies are replayed, axpolicy/replay.py); tcp then asks
        # the same keys, new to its listener but cached.
        cases: list[tuple[str, str, Callable[[], list[str]], Callable[[str], str | None],
                          Callable[[], None] | None]] = [
            ("native ldap: (found)", self.native, lambda: keys, host_of, None),
            ("native ldap: (unknown keys)", self.native, self.unknown_keys, lambda k: None, None),
            ("axpolicy socketmap: cold cache", self.socketmap(), lambda: keys, host_of, self.restart_axpolicy),
            ("axpolicy socketmap: cold cache, ldaps://", f"socketmap:{self.ldaps.address('socketmap')}:mailhost",
             lambda: keys, host_of, lambda: self.restart_axpolicy(self.ldaps)),
            ("axpolicy socketmap: cold cache, StartTLS",
             f"socketmap:{self.starttls.address('socketmap')}:mailhost", lambda: keys, host_of,
             lambda: self.restart_axpolicy(self.starttls)),
            ("axpolicy socketmap: warm (asked once before)", self.socketmap(), lambda: keys, host_of, None),
            ("axpolicy socketmap: warm (asked twice before)", self.socketmap(), lambda: keys, host_of, None),
            ("axpolicy tcp: warm (new to this listener)", self.tcp(), lambda: keys, host_of, None),
            ("axpolicy tcp: warm (asked before)", self.tcp(), lambda: keys, host_of, None),
            ("axpolicy socketmap: unknown keys", self.socketmap(), self.unknown_keys, lambda k: None, None),
            ("axpolicy socketmap + replica: new keys", replica, lambda: keys, host_of, self.restart_replica),
            ("axpolicy socketmap + replica: asked before", replica, lambda: keys, host_of, None),
            ("axpolicy socketmap + replica: unknown keys", replica, self.unknown_keys, lambda k: None,
             self.restart_replica),
            # postsrsd answers keys in its own domain unchanged (200).
            ("postsrsd tcp: (protocol floor)", f"tcp:127.0.0.1:{self.postsrsd_port}", lambda: keys, lambda k: k,
             None),
        ]
        rates: dict[str, list[float]] = {label: [] for label, *_ in cases}
        print("case 1: sequential lookups with postmap -q - ...", flush=True)
        self.postmap(self.native, keys)      # slapd reads its entries into memory: fair to all
        for _ in range(self.args.repeat):
            for label, table, keys_for, expect, before in cases:
                if before:
                    before()
                batch = keys_for()
                seconds, output = self.postmap(table, batch)
                self.check(label, batch, output, expect)
                rates[label].append(len(batch) / seconds)
        base = statistics.median(rates["native ldap: (found)"])
        floor = statistics.median(rates["postsrsd tcp: (protocol floor)"])
        rows = []
        for label, values in rates.items():
            median = statistics.median(values)
            rows.append({"case": label, "lookups_per_second": round(median),
                         "vs_native_ldap": round(median / base, 2), "vs_postsrsd": round(median / floor, 2),
                         "runs": [round(v) for v in values]})
        self.results["sequential"] = rows

    def concurrency(self) -> None:
        print("case 2: 1, 8 and 32 postmap clients at once ...", flush=True)
        self.postmap(self.socketmap(), self.keys)     # warm
        rows = []
        for clients in (1, 8, 32):
            row: dict[str, Any] = {"clients": clients}
            for label, table in (("native ldap:", self.native), ("axpolicy socketmap (warm)", self.socketmap()),
                                 ("postsrsd", f"tcp:127.0.0.1:{self.postsrsd_port}")):
                rates = []
                for _ in range(self.args.repeat):
                    chunks = [self.keys[i::clients] for i in range(clients)]
                    started = time.perf_counter()
                    with ThreadPoolExecutor(clients) as pool:
                        outputs = list(pool.map(lambda c, t=table: self.postmap(t, c)[1], chunks))
                    elapsed = time.perf_counter() - started
                    if label != "postsrsd":
                        for chunk, output in zip(chunks, outputs, strict=True):
                            self.check(label, chunk, output, host_of)
                    rates.append(len(self.keys) / elapsed)
                row[label] = round(statistics.median(rates))
            row["axpolicy vs native"] = round(row["axpolicy socketmap (warm)"] / row["native ldap:"], 2)
            row["axpolicy vs postsrsd"] = round(row["axpolicy socketmap (warm)"] / row["postsrsd"], 2)
            rows.append(row)
        self.results["concurrency"] = rows

    def policy(self) -> None:
        print("case 3: policy delegation, 1-64 persistent connections ...", flush=True)
        port = free_port()
        rules = self.workdir / "postfwd.cf"
        rules.write_text("id=R001; action=DUNNO\n")
        subprocess.run(["postfwd2", "--nodns", "--perfmon", "-u", "nobody", "-g", "nogroup", "--file", str(rules),
                        "--server_socket", f"tcp:127.0.0.1:{port}", "--cache_socket", f"tcp:127.0.0.1:{free_port()}",
                        "--pidfile", str(self.workdir / "postfwd.pid"), "--min_servers", "8",
                        "--max_servers", "80"], check=True, capture_output=True)
        self.stack.callback(lambda: subprocess.run(["pkill", "-f", f"tcp:127.0.0.1:{port}"], check=False))
        wait_port(port)
        ax_host, ax_port = self.axpolicy.address("policy")[len("inet:"):].rsplit(":", 1)
        addresses = self.keys[:500]
        load(ax_host, int(ax_port), 4, 1.0, addresses)            # warm the cache
        rows = []
        for connections in (1, 8, 32, 64):
            row: dict[str, Any] = {"connections": connections}
            for label, host, p in (("postfwd", "127.0.0.1", port), ("axpolicy", ax_host, int(ax_port))):
                runs = [load(host, p, connections, self.args.seconds, addresses) for _ in range(self.args.repeat)]
                for run in runs:
                    for line in run["replies"]:
                        address, reply = line.split("\t")
                        want = "action=DUNNO" if label == "postfwd" else "action=OK"
                        if reply != want:
                            raise RuntimeError(f"policy {label}: {address} got {reply!r}")
                best = sorted(runs, key=lambda r: r["requests_per_second"])[len(runs) // 2]
                row[f"{label} req/s"] = round(best["requests_per_second"])
                row[f"{label} p50 ms"] = round(best["p50_ms"], 2)
                row[f"{label} p99 ms"] = round(best["p99_ms"], 2)
            row["axpolicy vs postfwd"] = round(row["axpolicy req/s"] / row["postfwd req/s"], 2)
            rows.append(row)
        self.results["policy"] = rows

    def end_to_end(self) -> None:
        print("case 4: smtp-source -> Postfix front-end -> smtp-sink ...", flush=True)
        variants = ("native ldap:", "axpolicy recipe A")
        rates: dict[tuple[str, int], list[float]] = {}
        sent = dict.fromkeys(variants, 0)
        with contextlib.ExitStack() as stack:
            frontends = {variant: stack.enter_context(self._frontend(variant)) for variant in variants}
            for variant in variants:       # warm up: processes started, caches filled; not counted
                postfix, sinks = frontends[variant]
                self._send(postfix.port, 4, WARM_UP_MESSAGES)
                sent[variant] += WARM_UP_MESSAGES
                self._check_delivery(sinks, variant, sent[variant])
            for concurrency in (1, 4, 16):
                # Both front-ends run side by side and take turns, so that
                # the machine's drift during the case touches both alike;
                # each run starts once the last one's mail is delivered.
                for _ in range(self.args.repeat):
                    for variant in variants:
                        postfix, sinks = frontends[variant]
                        rates.setdefault((variant, concurrency), []).append(self._send(postfix.port, concurrency))
                        sent[variant] += self.args.messages
                        self._check_delivery(sinks, variant, sent[variant])
        rows = []
        for variant in variants:
            for concurrency in (1, 4, 16):
                median = statistics.median(rates[(variant, concurrency)])
                native = statistics.median(rates[("native ldap:", concurrency)])
                rows.append({"front-end": variant, "concurrency": concurrency,
                             "messages_per_second": round(median, 1), "vs native": round(median / native, 2),
                             "runs": [round(r) for r in rates[(variant, concurrency)]]})
        self.results["end_to_end"] = rows

    def _send(self, port: int, concurrency: int, count: int | None = None) -> float:
        """One smtp-source run; messages accepted per second."""
        count = count or self.args.messages
        started = time.perf_counter()
        command = ["smtp-source", "-c", "-s", str(concurrency), "-m", str(count), "-l", "512",
                   "-f", "sender@elsewhere.example", "-t", "1@example.com", "-N", f"127.0.0.1:{port}"]
        proc = subprocess.run(command, capture_output=True, timeout=600)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"smtp-source: {proc.stderr.decode()[:300]}")
        return float(count / elapsed)

    @contextlib.contextmanager
    def _frontend(self, variant: str) -> Iterator[tuple[Postfix, Sinks]]:
        workdir = self.workdir / variant.replace(" ", "-").replace(":", "")
        with contextlib.ExitStack() as stack:
            sinks = Sinks(workdir / "sinks")
            stack.callback(sinks.stop)
            if variant == "native ldap:":
                transport = workdir / "ldap-transport.cf"
                workdir.mkdir(exist_ok=True)
                transport.write_text(Path(self.native[len("ldap:"):]).read_text()
                                     + f"result_format = relay:[%s]:{sinks.port}\n")
                open_path(transport)
                transport.chmod(0o644)
                postfix = Postfix(workdir / "postfix", "main.cf.recipe-a", {
                    "transport_maps = socketmap:unix:private/axpolicy:transport": f"transport_maps = ldap:{transport}",
                    "check_policy_service { inet:127.0.0.1:10040, timeout=10s,": "check_policy_service { "
                    "inet:127.0.0.1:9, timeout=10s,"}, sink_port=sinks.port)
                # The native variant has no policy service: accept what the
                # transport table can route, like recipe A does.
                main_cf = postfix.conf / "main.cf"
                text = re.sub(r"smtpd_recipient_restrictions =\n(    .*\n)+", "smtpd_recipient_restrictions =\n",
                              main_cf.read_text())
                main_cf.write_text(text)
                past = time.time() - 10
                os.utime(main_cf, (past, past))
            else:
                policy_port = free_port()
                postfix = Postfix(workdir / "postfix", "main.cf.recipe-a",
                                  {"inet:127.0.0.1:10040": f"inet:127.0.0.1:{policy_port}"}, sink_port=sinks.port)
                config = dict(self.axpolicy.config)
                config["listen"] = [{"protocol": "policy", "address": f"inet:127.0.0.1:{policy_port}"},
                                    {"protocol": "socketmap", "address": f"unix:{postfix.spool}/private/axpolicy",
                                     "mode": "0660", "group": "postfix"}]
                config["maps"] = {"transport": {"usermap": "people", "result": f"relay:[%s]:{sinks.port}"}}
                server = Axpolicy(workdir / "axpolicy", config)
                server.start()
                stack.callback(server.stop)
            stack.callback(postfix.stop)
            postfix.start()
            yield postfix, sinks

    def _check_delivery(self, sinks: Sinks, variant: str, expected: int) -> None:
        """*expected* messages reached the back-end of 1@example.com (127.0.0.2), and nothing went elsewhere."""
        deadline = time.monotonic() + 600
        while len(sinks.recipients("127.0.0.2")) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant}: only {len(sinks.recipients('127.0.0.2'))} of {expected} delivered")
            time.sleep(0.2)
        stray = sinks.recipients("127.0.0.3") + sinks.recipients("127.0.0.4")
        if stray:
            raise RuntimeError(f"{variant}: {len(stray)} messages went to the wrong back-end")

    def footprint(self) -> None:
        print("case 5: footprint ...", flush=True)
        starts = []
        template = self._axpolicy()
        template.stop()
        for _ in range(self.args.repeat):
            # The daemon as an operator starts it, polled every 2 ms until it
            # answers a real lookup (LDAP connect and bind included).
            started = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "axpolicy", "serve", "-c", str(template.config_path)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
            try:
                deadline = time.monotonic() + 60
                while not _answers(template.address("socketmap")):
                    if time.monotonic() > deadline:
                        raise RuntimeError("axpolicy did not answer within 60 s")
                    time.sleep(0.002)
                starts.append(time.perf_counter() - started)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        server = self._axpolicy()
        rss_idle = rss_kib(server)
        entries = min(100000, 2 * self.args.users)
        every = [f"user{n}@example.com" for n in range(1, self.args.users + 1)] + \
                [f"{n}@example.com" for n in range(1, self.args.users + 1)]
        batch = every[:entries]
        _, output = self.postmap(f"socketmap:{server.address('socketmap')}:mailhost", batch)
        self.check("footprint", batch, output, host_of)
        rss_cache = rss_kib(server)
        # Asked again, every key leaves a replayable reply (up to the limit).
        self.postmap(f"socketmap:{server.address('socketmap')}:mailhost", batch)
        self.restart_replica()
        refresh = re.findall(r"replica ready, (\d+) entries \(refresh took ([0-9.]+)s\)", self.replica.log)[-1]
        self.results["footprint"] = {
            "start_to_first_answer_seconds": round(statistics.median(starts), 3),
            "rss_idle_mib": round(rss_idle / 1024, 1),
            "cached_entries": entries,
            "rss_with_cache_mib": round(rss_cache / 1024, 1),
            "rss_with_cache_and_replies_mib": round(rss_kib(server) / 1024, 1),
            "replica_entries": int(refresh[0]),
            "replica_refresh_seconds": float(refresh[1]),
            "rss_with_replica_mib": round(rss_kib(self.replica) / 1024, 1),
        }

    def scale(self) -> None:
        """The replica at --users entries: first refresh, memory, restart with resume, lookups vs native ldap:."""
        print(f"case 6: scale ({self.args.users} users) ...", flush=True)
        base = self._axpolicy()
        rss_base = rss_status(base)
        base.stop()
        state = self.workdir / "scale-state"
        server = self._axpolicy(replica=True, state_dir=state)
        entries, refresh = re.findall(r"replica ready, (\d+) entries \(refresh took ([0-9.]+)s\)", server.log)[-1]
        entries_n = int(entries)
        deadline = time.monotonic() + 600
        while "replica store rewritten" not in server.log:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no store rewrite:\n{server.log[-2000:]}")
            time.sleep(0.05)
        rss_refresh = rss_status(server)
        rewrite = float(re.findall(r"replica store rewritten in key order, \d+ bytes \(([0-9.]+)s\)",
                                   server.log)[-1])
        table = f"socketmap:{server.address('socketmap')}:mailhost"
        times_replica, times_native = [], []
        for _ in range(self.args.repeat):
            seconds, output = self.postmap(table, self.keys)
            self.check("scale replica", self.keys, output, host_of)
            times_replica.append(seconds)
            seconds, output = self.postmap(self.native, self.keys)
            self.check("scale native", self.keys, output, host_of)
            times_native.append(seconds)
        rss_lookups = rss_status(server)
        store = state / "people.mdb"
        disk = os.stat(store).st_blocks * 512
        resumes = [restart_until_resumed(server) for _ in range(self.args.repeat)]
        rss_resumed = rss_status(server)
        # A change while it is down: with syncprov-sessionlog the resume gets it and nothing
        # else; without (--sessionlog 0) it is a present phase, the UUIDs of every entry still there.
        change = f"dn: uid=user1,{PEOPLE}\nchangetype: modify\nreplace: mailHost\nmailHost: 127.0.0.2\n"
        present_phase = restart_until_resumed(server, lambda: self.slapd.modify(change))

        def per_entry(rss: dict[str, int]) -> dict[str, float]:
            return {k: round((rss[k] - rss_base[k]) * 1024 / entries_n, 1) for k in rss}

        replica_rate = len(self.keys) / statistics.median(times_replica)
        native_rate = len(self.keys) / statistics.median(times_native)
        self.results["scale"] = {
            "entries": entries_n,
            "first_refresh_seconds": float(refresh),
            "store_rewrite_seconds": rewrite,
            "bytes_per_entry_after_refresh_and_rewrite": per_entry(rss_refresh),
            "bytes_per_entry_after_lookups": per_entry(rss_lookups),
            "bytes_per_entry_after_resume": per_entry(rss_resumed),
            "store_file_bytes_per_entry_on_disk": round(disk / entries_n, 1),
            "restart_to_ready_with_resume_seconds": round(statistics.median(resumes), 2),
            "restart_to_ready_after_a_change_seconds": round(present_phase, 2),
            "syncprov_sessionlog": self.args.sessionlog,
            "lookups_per_second_replica": round(replica_rate),
            "lookups_per_second_native_ldap": round(native_rate),
            "replica_vs_native": round(replica_rate / native_rate, 2),
        }

    def run(self) -> None:
        self.start()
        try:
            for case in self.args.cases:
                getattr(self, case)()
        finally:
            self.stack.close()


def _answers(address: str) -> bool:
    try:
        sock = connect(address, timeout=5)
    except OSError:
        return False
    try:
        payload = b"mailhost user1@example.com"
        sock.sendall(b"%d:%s," % (len(payload), payload))
        return sock.recv(100) == b"12:OK 127.0.0.2,"
    except OSError:
        return False
    finally:
        sock.close()


WARM_UP_MESSAGES = 50


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait()


def wait_replica(server: Axpolicy, times: int, timeout: float = 300) -> None:
    """Until the daemon's log says its replica completed its *times*-th refresh."""
    deadline = time.monotonic() + timeout
    while server.log.count("replica ready") < times:
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica not ready:\n{server.log[-2000:]}")
        time.sleep(0.05)


def restart_until_resumed(server: Axpolicy, while_down: Callable[[], None] | None = None,
                          timeout: float = 600) -> float:
    """Stop the daemon, run *while_down*, start it: seconds until its replica resumed from its cookie."""
    done = server.log.count("replica resumed")
    server.stop()
    if while_down is not None:
        while_down()
    started = time.perf_counter()
    server.start()
    deadline = time.monotonic() + timeout
    while server.log.count("replica resumed") <= done:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no resume:\n{server.log[-2000:]}")
        time.sleep(0.005)
    return time.perf_counter() - started


def rss_status(server: Axpolicy) -> dict[str, int]:
    """VmRSS, RssAnon (private) and RssFile (mapped files: the replica's store) in KiB."""
    assert server.proc is not None
    found = {}
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            found[name] = int(value.split()[0])
    return found


def rss_kib(server: Axpolicy) -> int:
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(f"inet:127.0.0.1:{port}", timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def load(host: str, port: int, connections: int, seconds: float, addresses: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "policyload.py"), host, str(port), str(connections),
                           str(seconds), *addresses], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"policyload: {proc.stderr[-500:]}")
    return dict(json.loads(proc.stdout))


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    def version(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": str(os.cpu_count()), "cpu": cpu,
            "python": platform.python_version(), "postfix": version("postconf", "-d", "-h", "mail_version"),
            "slapd": version("dpkg-query", "-W", "-f", "${Version}", "slapd"),
            "postsrsd": version("dpkg-query", "-W", "-f", "${Version}", "postsrsd"),
            "postfwd": version("dpkg-query", "-W", "-f", "${Version}", "postfwd")}


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    columns = [c for c in rows[0] if c not in ("runs", "replies")]
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=50000, help="users in the directory (default 50000)")
    parser.add_argument("--keys", type=int, default=20000, help="keys per postmap run (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each policy load run")
    parser.add_argument("--messages", type=int, default=1000, help="messages per end-to-end run")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each (a smoke test)")
    parser.add_argument("--sessionlog", type=int, default=100000,
                        help="slapd's syncprov-sessionlog (0: none, resumes use a present phase)")
    parser.add_argument("cases", nargs="*", default=["sequential", "concurrency", "policy", "end_to_end", "footprint"])
    args = parser.parse_args()
    if args.quick:
        args.users, args.keys, args.repeat, args.seconds, args.messages = 2000, 2000, 1, 1.0, 30
    if os.geteuid() != 0:
        print("bench/run: run as root (it starts private slapd, Postfix and smtp-sink)", file=sys.stderr)
        return 77
    workdir = Path(tempfile.mkdtemp(prefix="axpolicy-bench-"))
    bench = Bench(args, workdir)
    try:
        bench.run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {"machine": machine(), "settings": vars(args), **bench.results}
    print(f"\naxpolicy benchmarks, {results['machine']['date']}, {results['machine']['cores']} cores, "
          f"{results['machine']['cpu']}")
    for section in ("sequential", "concurrency", "policy", "end_to_end"):
        if section in results:
            print_table(section, results[section])
    for section in ("footprint", "scale"):
        if section in results:
            print(f"\n{section}\n" + "\n".join(f"{k}: {v}" for k, v in results[section].items()))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
