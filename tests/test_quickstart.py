"""The README's first command works: scripts/quickstart installs and serves the example."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.clients import SocketmapClient
from tests.conftest import ROOT, postmap


@pytest.mark.timeout(600)
def test_quickstart_installs_and_serves_the_example(postmap_dir: Path, tmp_path: Path) -> None:
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("run through scripts/test, which creates .venv")
    log = tmp_path / "quickstart.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["sh", str(ROOT / "scripts" / "quickstart")], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 540
        while True:
            try:
                client = SocketmapClient("inet:127.0.0.1:10041")
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        assert client.query("transport", "alice@example.com") == b"OK relay:[127.0.0.2]"
        client.close()
        found = postmap(postmap_dir, "socketmap:inet:127.0.0.1:10041:transport", "bob+news@example.com")
        assert (found.returncode, found.stdout) == (0, "relay:[127.0.0.3]\n")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
