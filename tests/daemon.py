"""Run ``axpolicy serve`` as a subprocess, as an operator would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    """A client socket for an ``inet:host:port`` or ``unix:/path`` listener address."""
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address[len("unix:"):])
        return sock
    host, _, port = address[len("inet:"):].rpartition(":")
    host = host.strip("[]")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    return sock


class Axpolicy:
    """One ``axpolicy serve`` process with its own configuration file."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.config_path = workdir / "axpolicy.yml"
        self.log_path = workdir / "axpolicy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.python_flags: list[str] = []     # e.g. ["-X", "importtime"]
        self.write_config(config)

    def write_config(self, config: dict[str, Any]) -> None:
        # The tests run as root; they say so explicitly unless a test is
        # about dropping privileges.
        config.setdefault("user", "root")
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def address(self, protocol: str, index: int = 0) -> str:
        """The address of the *index*-th listener speaking *protocol*."""
        found = [item["address"] for item in self.config["listen"] if item["protocol"] == protocol]
        return str(found[index])

    def start(self, *extra: str, deadline_seconds: float = 20.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, *self.python_flags, "-m", "axpolicy", "serve", "-c",
                                      str(self.config_path), *extra],
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + deadline_seconds
        pending = [item["address"] for item in self.config.get("listen", [])]
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"axpolicy exited with {self.proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"axpolicy listeners not ready:\n{self.log}")
            try:
                connect(pending[0], timeout=1).close()
                pending.pop(0)
            except OSError:
                time.sleep(0.05)
        # Sockets accept (kernel backlog) before the event loop runs; signals
        # are handled only once it says so.
        log = self.config.get("log", {})
        if log.get("target", "stderr") == "stderr" and log.get("level", "info") in ("debug", "info"):
            while "axpolicy ready" not in self.log:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"axpolicy did not get ready:\n{self.log}")
                time.sleep(0.02)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code
