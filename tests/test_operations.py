"""axpolicy as a long-running daemon: privileges, daemon mode, reload, shutdown, logs, metrics."""

from __future__ import annotations

import grp
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.clients import LineClient, SocketmapClient, rcpt_policy
from tests.conftest import ROOT, axpolicy_cli, ldap_map
from tests.daemon import Axpolicy, connect
from tests.postfix import open_path
from tests.slapd import Slapd, free_port

NOBODY = pwd.getpwnam("nobody")


def base_config(slapd: Slapd, tmp: Path, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "usermaps": {"people": ldap_map(slapd, timeout=1)},
        "recipient_delimiter": "+",
        "cache": {"ttl": 0, "negative_ttl": 0, "stale_if_error": 0, "max_entries": 0},
        "listen": [{"protocol": "socketmap", "address": f"inet:127.0.0.1:{free_port()}"},
                   {"protocol": "policy", "address": f"inet:127.0.0.1:{free_port()}"},
                   {"protocol": "socketmap", "address": f"unix:{tmp}/axpolicy.sock", "mode": "0666"}],
        "maps": {"transport": {"usermap": "people", "result": "relay:[%s]"}},
    }
    config.update(extra)
    return config


def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def ids(pid: int) -> tuple[list[int], list[int]]:
    status = Path(f"/proc/{pid}/status").read_text()
    uids = [int(v) for v in re.search(r"^Uid:\s+(.*)$", status, re.MULTILINE).group(1).split()]  # type: ignore[union-attr]
    gids = [int(v) for v in re.search(r"^Gid:\s+(.*)$", status, re.MULTILINE).group(1).split()]  # type: ignore[union-attr]
    return uids, gids


# --------------------------------------------------------------------------
# privileges


def test_started_as_root_without_a_user_it_refuses(slapd: Slapd, tmp_path: Path) -> None:
    path = tmp_path / "axpolicy.yml"
    path.write_text(yaml.safe_dump(base_config(slapd, tmp_path)))     # no user: key
    proc = axpolicy_cli("serve", "-c", str(path), timeout=30)
    assert proc.returncode == 78
    assert "user: required when axpolicy is started as root" in proc.stderr


def test_privileges_are_dropped_after_binding(slapd: Slapd, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    server = Axpolicy(tmp_path, base_config(slapd, tmp_path, user="nobody", group="nogroup"))
    server.start()
    try:
        assert server.proc is not None
        uids, gids = ids(server.proc.pid)
        assert uids == [NOBODY.pw_uid] * 4
        assert gids == [grp.getgrnam("nogroup").gr_gid] * 4
        groups = re.search(r"^Groups:\s*(.*)$", Path(f"/proc/{server.proc.pid}/status").read_text(), re.MULTILINE)
        assert groups is not None and "0" not in groups.group(1).split()   # root's groups are gone too
        # The unix socket was created by root before the drop and still serves.
        client = SocketmapClient(f"unix:{tmp_path}/axpolicy.sock")
        assert client.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"
        client.close()
    finally:
        assert server.stop() == 0, server.log


# --------------------------------------------------------------------------
# daemon mode and pidfile


def syslog_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    os.chmod(path, 0o666)
    sock.settimeout(0.2)
    return sock


def drain(sock: socket.socket) -> list[str]:
    lines = []
    while True:
        try:
            lines.append(sock.recv(65536).decode(errors="replace"))
        except (TimeoutError, BlockingIOError):
            return lines


@pytest.fixture
def syslog(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "syslog.sock"
    sock = syslog_socket(path)
    yield path, sock
    sock.close()


def test_daemon_mode_pidfile_second_instance_and_sigterm(
        slapd: Slapd, tmp_path: Path, syslog: tuple[Path, socket.socket]) -> None:
    tmp_path.chmod(0o755)
    log_path, log_sock = syslog
    # Like systemd's RuntimeDirectory: owned by the user the daemon becomes,
    # so that it can remove its pidfile and socket when it stops.
    run = tmp_path / "run"
    run.mkdir()
    os.chown(run, NOBODY.pw_uid, NOBODY.pw_gid)
    open_path(run)
    pidfile = run / "axpolicy.pid"
    server = Axpolicy(tmp_path, base_config(slapd, run, user="nobody",
                                            log={"target": "syslog", "syslog_socket": str(log_path)}))
    started = axpolicy_cli("serve", "--daemon", "--pidfile", str(pidfile), "-c", str(server.config_path))
    assert started.returncode == 0, started.stderr        # the parent returns once detached
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip().isdigit())
    pid = int(pidfile.read_text())
    try:
        wait_until(lambda: _answers(server.address("socketmap")))
        assert ids(pid)[0] == [NOBODY.pw_uid] * 4           # answering only after the drop
        assert os.getsid(pid) != os.getsid(0)               # detached: a session of its own
        # A second instance with the same pidfile refuses, clearly.
        other = Axpolicy(tmp_path / "second", base_config(slapd, tmp_path / "second", user="nobody"))
        second = axpolicy_cli("serve", "--daemon", "--pidfile", str(pidfile), "-c", str(other.config_path))
        assert second.returncode == 71
        assert f"another axpolicy (pid {pid}) holds {pidfile}" in second.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid))
    logs = "\n".join(drain(log_sock))
    assert not (run / "axpolicy.sock").exists(), logs
    assert not pidfile.exists()
    assert re.search(rf"<2[0-7]>axpolicy\[{pid}\]: INFO: axpolicy ready", logs), logs   # facility mail
    assert "stopped" in logs


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return "zombie"


def _answers(address: str) -> bool:
    try:
        client = SocketmapClient(address)
    except OSError:
        return False
    try:
        return client.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"
    finally:
        client.close()


def test_pidfile_from_the_configuration_is_written_and_removed(slapd: Slapd, tmp_path: Path) -> None:
    pidfile = tmp_path / "run.pid"
    server = Axpolicy(tmp_path, base_config(slapd, tmp_path, pidfile=str(pidfile)))
    server.start()
    assert server.proc is not None
    assert pidfile.read_text() == f"{server.proc.pid}\n"
    assert server.stop() == 0
    assert not pidfile.exists()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_a_pidfile_that_is_a_link_or_not_a_file_is_refused_and_its_target_untouched(
        slapd: Slapd, tmp_path: Path, kind: str) -> None:
    """Planted in a directory others can write, a link would make root truncate any file."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pidfile = tmp_path / "run.pid"
    if kind == "symlink":
        pidfile.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, pidfile)
    else:
        os.mkfifo(pidfile)
    config = tmp_path / "axpolicy.yml"
    config.write_text(yaml.safe_dump(base_config(slapd, tmp_path, user="root", pidfile=str(pidfile))))
    for command in ("check-config", "serve"):
        proc = axpolicy_cli(command, "-c", str(config), timeout=30)
        assert proc.returncode == 78, proc.stderr
        assert f"pidfile: {pidfile}" in proc.stderr, proc.stderr
        assert "refusing" in proc.stderr, proc.stderr
    assert victim.read_text() == "precious\n"


def test_the_pidfile_is_opened_without_following_links(tmp_path: Path) -> None:
    """The check before binding and the open itself are separate steps: the open refuses on its own."""
    from axpolicy.pidfile import PidFile

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "run.pid").symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        PidFile(str(tmp_path / "run.pid")).acquire()
    assert victim.read_text() == "precious\n"


# --------------------------------------------------------------------------
# listening sockets


def test_listening_sockets_have_the_projects_backlog(slapd: Slapd, tmp_path: Path) -> None:
    """asyncio would call listen(100) again on a socket it is given."""
    from axpolicy import limits

    server = Axpolicy(tmp_path, base_config(slapd, tmp_path))
    server.start()
    try:
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        port = server.address("socketmap").rsplit(":", 1)[1]
        shown = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True)
        backlog = int(shown.stdout.split()[2])      # State Recv-Q Send-Q: Send-Q is the backlog
        assert backlog == min(limits.LISTEN_BACKLOG, somaxconn), shown.stdout
        unix = subprocess.run(["ss", "-lxH", "src", f"{tmp_path}/axpolicy.sock"], capture_output=True, text=True,
                              check=True)
        assert int(unix.stdout.split()[3]) == min(limits.LISTEN_BACKLOG, somaxconn), unix.stdout
    finally:
        assert server.stop() == 0, server.log


# --------------------------------------------------------------------------
# syslog


def test_syslog_gets_temporary_failures_with_facility_mail(
        slapd: Slapd, tmp_path: Path, syslog: tuple[Path, socket.socket]) -> None:
    log_path, log_sock = syslog
    server = Axpolicy(tmp_path, base_config(slapd, tmp_path, log={"target": "syslog", "level": "info",
                                                                  "syslog_socket": str(log_path)}))
    server.start()
    try:
        slapd.stop()
        client = SocketmapClient(server.address("socketmap"))
        assert client.query("transport", "alice@example.com") == b"TEMP user map unavailable"
        assert client.query("transport", "evil\x01@example.com") == b"NOTFOUND "
        client.close()
        time.sleep(0.2)
        lines = drain(log_sock)
    finally:
        server.stop()
    text = "\n".join(lines)
    # <20> = facility mail (2) * 8 + warning (4)
    assert re.search(r"<20>axpolicy\[\d+\]: WARNING: temporary failure for alice@example.com in people", text), text
    assert "\x01" not in text and "evil\\x01@example.com" in text      # peer text made printable
    assert "axpolicy-secret" not in text


# --------------------------------------------------------------------------
# reload


def test_sighup_applies_a_valid_configuration_without_dropping_connections(slapd: Slapd, tmp_path: Path) -> None:
    config = base_config(slapd, tmp_path)
    readsocket_address = f"inet:127.0.0.1:{free_port()}"
    config["listen"].append({"protocol": "readsocket", "address": readsocket_address})
    server = Axpolicy(tmp_path, config)
    server.start()
    try:
        policy = LineClient(server.address("policy"))
        sockmap = SocketmapClient(server.address("socketmap"))
        assert policy.policy(rcpt_policy("alice@example.com")) == b"action=OK\n\n"
        assert sockmap.query("transport", "bob@example.com") == b"OK relay:[127.0.0.3]"
        new = dict(config)
        tcp_address = f"inet:127.0.0.1:{free_port()}"
        new["listen"] = [*config["listen"][:3], {"protocol": "tcp_table", "address": tcp_address, "map": "transport"}]
        new["policy"] = {"mapped": "OK delivered to %s"}
        new["maps"] = {"transport": {"usermap": "people", "result": "smtp:[%s]"}}
        server.write_config(new)
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in server.log)
        # The same connections, now answered with the new configuration.
        assert policy.policy(rcpt_policy("alice@example.com")) == b"action=OK delivered to 127.0.0.2\n\n"
        assert sockmap.query("transport", "bob@example.com") == b"OK smtp:[127.0.0.3]"
        tcp = LineClient(tcp_address)                                  # added
        assert tcp.tcp_get(b"alice@example.com") == b"200 smtp:[127.0.0.2]\n"
        tcp.close()
        wait_until(lambda: not _connects(readsocket_address))         # removed
        assert "cache kept" in server.log
        policy.close()
        sockmap.close()
    finally:
        assert server.stop() == 0, server.log


def _connects(address: str) -> bool:
    try:
        connect(address, timeout=1).close()
    except OSError:
        return False
    return True


def test_sighup_matches_listeners_by_address_not_by_spelling(slapd: Slapd, tmp_path: Path) -> None:
    """127.0.0.1:P written as localhost:P is the same listener: kept, connections and all."""
    config = base_config(slapd, tmp_path)
    server = Axpolicy(tmp_path, config)
    server.start()
    try:
        address = server.address("socketmap")
        client = SocketmapClient(address)
        assert client.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"
        new = dict(config)
        new["listen"] = [dict(config["listen"][0], address=address.replace("127.0.0.1", "localhost")),
                         *config["listen"][1:]]
        server.write_config(new)
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in server.log)
        assert "reload failed" not in server.log and "stopped listening" not in server.log, server.log
        assert client.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"   # same connection
        assert _answers(address)
        client.close()
    finally:
        assert server.stop() == 0, server.log


def test_sighup_whose_new_listener_cannot_bind_changes_nothing(slapd: Slapd, tmp_path: Path) -> None:
    config = base_config(slapd, tmp_path)
    server = Axpolicy(tmp_path, config)
    server.start()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    try:
        dropped = server.address("socketmap")
        taken = f"inet:127.0.0.1:{squatter.getsockname()[1]}"
        new = dict(config)
        new["listen"] = [*config["listen"][1:], {"protocol": "tcp_table", "address": taken, "map": "transport"}]
        new["maps"] = {"transport": {"usermap": "people", "result": "smtp:[%s]"}}
        server.write_config(new)
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in server.log)
        assert "keeping the running configuration and every listener" in server.log
        assert "Address already in use" in server.log
        # The listener the new file dropped still answers, with the old answers.
        assert _answers(dropped)
        assert "stopped listening" not in server.log and "reloaded" not in server.log
    finally:
        squatter.close()
        assert server.stop() == 0, server.log


def test_sighup_with_an_invalid_configuration_keeps_the_running_one(slapd: Slapd, tmp_path: Path) -> None:
    server = Axpolicy(tmp_path, base_config(slapd, tmp_path))
    server.start()
    try:
        client = SocketmapClient(server.address("socketmap"))
        assert client.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"
        good = server.config_path.read_text()
        server.config_path.write_text(good.replace("usermaps:", "usermapz:"))
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reload failed, keeping the running configuration" in server.log)
        assert "usermapz: unknown key" in server.log
        assert client.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"
        assert _answers(server.address("socketmap"))                # new connections too
        client.close()
    finally:
        assert server.stop() == 0, server.log


# --------------------------------------------------------------------------
# shutdown


def test_sigterm_finishes_requests_in_flight(slapd: Slapd, tmp_path: Path) -> None:
    server = Axpolicy(tmp_path, base_config(slapd, tmp_path))
    server.start()
    client = SocketmapClient(server.address("socketmap"))
    assert client.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"
    slapd.pause()
    client.send("transport", "bob@example.com")       # in flight: the directory hangs
    time.sleep(0.2)
    server.signal(signal.SIGTERM)
    assert client.read() == b"TEMP user map timeout"  # answered, not dropped
    client.close()
    assert server.stop() == 0, server.log
    assert not (tmp_path / "axpolicy.sock").exists()  # unix socket removed
    assert "stopped" in server.log


def test_sigterm_stops_an_idle_daemon_at_once_with_status_0(slapd: Slapd, tmp_path: Path) -> None:
    server = Axpolicy(tmp_path, base_config(slapd, tmp_path))
    server.start()
    idle = [LineClient(server.address("policy")) for _ in range(10)]
    for client in idle:   # established and served once, then idle
        assert client.policy(rcpt_policy("alice@example.com", state="CONNECT")) == b"action=DUNNO\n\n"
    assert server.stop() == 0
    for client in idle:
        assert client.readline() == b""    # closed by the server
        client.close()


# --------------------------------------------------------------------------
# metrics, health, digest


def scrape(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in metrics")


def test_metrics_count_the_traffic_they_saw(slapd: Slapd, tmp_path: Path) -> None:
    port = free_port()
    config = base_config(slapd, tmp_path, metrics={"listen": f"127.0.0.1:{port}"})
    config["cache"] = {"ttl": 300, "negative_ttl": 60, "stale_if_error": 3600, "max_entries": 1000}
    server = Axpolicy(tmp_path, config)
    server.start()
    try:
        client = SocketmapClient(server.address("socketmap"))
        for _ in range(3):
            assert client.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"
        for _ in range(2):
            assert client.query("transport", "nobody@example.com") == b"NOTFOUND "
        assert client.query("transport", "twin@example.com") == b"TEMP user map entry is ambiguous"
        policy = LineClient(server.address("policy"))
        policy.policy(rcpt_policy("bob@example.com"))
        status, text = scrape(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert metric(text, "axpolicy_requests_total", protocol="socketmap", map="transport", outcome="found") == 3
        assert metric(text, "axpolicy_requests_total", protocol="socketmap", map="transport", outcome="notfound") == 2
        assert metric(text, "axpolicy_requests_total", protocol="socketmap", map="transport", outcome="temp") == 1
        assert metric(text, "axpolicy_requests_total", protocol="policy", map="policy", outcome="found") == 1
        assert metric(text, "axpolicy_request_duration_seconds_count", protocol="socketmap") == 6
        assert metric(text, "axpolicy_cache_hits_total") == 3          # alice twice, nobody once
        # alice, nobody, twin and bob (policy): one search each
        assert metric(text, "axpolicy_ldap_searches_total", usermap="people", server=slapd.url) == 4
        assert metric(text, "axpolicy_connections", protocol="socketmap",
                      listener=server.address("socketmap")) == 1
        digest = axpolicy_cli("check-config", "--digest", "-c", str(server.config_path)).stdout.strip()
        assert metric(text, "axpolicy_config_info", digest=digest) == 1
        assert scrape(f"http://127.0.0.1:{port}/health") == (200, "people: ok\n")
        slapd.stop()
        status, body = scrape(f"http://127.0.0.1:{port}/health")
        assert (status, body) == (503, "people: temporary failure: user map unavailable\n")
        assert client.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"   # cached
        _, text = scrape(f"http://127.0.0.1:{port}/metrics")
        assert metric(text, "axpolicy_ldap_errors_total", usermap="people", server=slapd.url) >= 1
        assert scrape(f"http://127.0.0.1:{port}/other")[0] == 404
        client.close()
        policy.close()
    finally:
        assert server.stop() == 0, server.log


def test_digest_is_the_same_for_the_same_configuration_and_never_shows_secrets(
        slapd: Slapd, tmp_path: Path) -> None:
    one = Axpolicy(tmp_path / "one", base_config(slapd, tmp_path))
    two = Axpolicy(tmp_path / "two", base_config(slapd, tmp_path))
    two.write_config({**one.config})
    first = axpolicy_cli("check-config", "--digest", "-c", str(one.config_path))
    second = axpolicy_cli("check-config", "--digest", "-c", str(two.config_path))
    assert first.returncode == 0 and re.fullmatch(r"[0-9a-f]{64}\n", first.stdout)
    assert first.stdout == second.stdout                 # other file, same configuration
    changed = {**one.config, "usermaps": {"people": ldap_map(slapd, timeout=1, bind_password="other-secret")}}
    two.write_config(changed)
    third = axpolicy_cli("check-config", "--digest", "-c", str(two.config_path))
    assert third.stdout != first.stdout                  # the secret counts ...
    assert "other-secret" not in third.stdout + third.stderr   # ... but is never shown


def test_systemd_unit_is_hardened_and_names_the_real_command() -> None:
    unit = (ROOT / "contrib" / "axpolicy.service").read_text()
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                    "ExecReload=/bin/kill -HUP $MAINPID", "RuntimeDirectory=axpolicy"):
        assert setting in unit
    exec_start = re.search(r"^ExecStart=(\S+) (.*)$", unit, re.MULTILINE)
    assert exec_start is not None and exec_start.group(2).startswith("serve")
    proc = subprocess.run([sys.executable, "-m", "axpolicy", "serve", "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "--daemon" in proc.stdout and "--pidfile" in proc.stdout
