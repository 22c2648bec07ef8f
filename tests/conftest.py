"""Shared fixtures: real slapd instances and configuration builders."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.slapd import BIND_DN, BIND_PW, DATA, PEOPLE, Slapd, numbered_users

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent

# Users user1..userN (and aliases 1..N) for MTA tests that use smtp-source.
NUMBERED_USERS = 20


def seed_ldif(whoami_host: str = "127.0.0.2") -> str:
    """The test directory; ``whoami@example.com`` tells the instances apart."""
    whoami = (f"dn: uid=whoami,{PEOPLE}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n"
              f"uid: whoami\ncn: Who Am I\nsn: I\nmail: whoami@example.com\nmailHost: {whoami_host}\n")
    return "\n".join([(DATA / "users.ldif").read_text(), numbered_users(NUMBERED_USERS), whoami])


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh event loop (no pytest-asyncio needed)."""
    return asyncio.run(coro)


def own_slapd(tmp_path_factory: pytest.TempPathFactory, name: str, **options: Any) -> Iterator[Slapd]:
    """A running slapd with the test directory, destroyed afterwards (for fixtures)."""
    server = Slapd(tmp_path_factory.mktemp(name), seed_ldif(), **options)
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def slapd_primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    yield from own_slapd(tmp_path_factory, "slapd-primary")


@pytest.fixture(scope="session")
def slapd_secondary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    server = Slapd(tmp_path_factory.mktemp("slapd-secondary"), seed_ldif(whoami_host="127.0.0.3"))
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def slapd_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """A directory that also listens on ldaps:// with a certificate from a private CA."""
    server = Slapd(tmp_path_factory.mktemp("slapd-tls"), seed_ldif(), tls=True)
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def slapd(slapd_primary: Slapd) -> Iterator[Slapd]:
    """The primary directory, healthy again after every test."""
    yield slapd_primary
    slapd_primary.restore()


@pytest.fixture
def slapd2(slapd_secondary: Slapd) -> Iterator[Slapd]:
    """The secondary directory (same data but whoami), healthy again after every test."""
    yield slapd_secondary
    slapd_secondary.restore()


def shipped_config(path: Path, workdir: Path, slapd: Slapd) -> dict[str, Any]:
    """A configuration shipped in postfix/ or exim/, pointed at the test directory.

    Every lookup asks the directory (no cache), so that answers served
    while it is down can only come from stale-if-error.
    """
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    secret = workdir / "ldap.secret"
    secret.write_text(BIND_PW + "\n")
    people = config["usermaps"]["people"]
    people["servers"] = [slapd.url]
    people["bind_password_file"] = str(secret)
    people["timeout"] = 1
    config["cache"]["ttl"] = 0
    config["cache"]["negative_ttl"] = 0
    config["user"] = "root"   # the tests own the files and sockets; test_operations.py drops privileges
    return config


def ldap_map(*servers: Slapd, **overrides: Any) -> dict[str, Any]:
    """An ldap user map section for *servers*, with test-friendly timings."""
    section: dict[str, Any] = {
        "type": "ldap",
        "servers": [s.url for s in servers],
        "bind_dn": BIND_DN,
        "bind_password": BIND_PW,
        "base": PEOPLE,
        "scope": "sub",
        "filter": "(|(mail=%s)(mailAlternateAddress=%s))",
        "host_attribute": "mailHost",
        "timeout": 1,
        "pool_size": 2,
        "failback_interval": 1,
    }
    section.update(overrides)
    return section


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    """Write a configuration mapping as YAML and return its path."""
    counter = iter(range(10**6))

    def write(data: dict[str, Any]) -> Path:
        path = tmp_path / f"axpolicy-{next(counter)}.yml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def axpolicy_cli(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the ``axpolicy`` command as a user would, from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "axpolicy", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def postmap_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A configuration directory for running Postfix's own clients (postmap -c DIR)."""
    directory = tmp_path_factory.mktemp("postmap")
    main_cf = directory / "main.cf"
    main_cf.write_text("compatibility_level = 3.6\n")
    # Postfix re-reads a main.cf whose mtime is the current second (about 2 s
    # per command); a backdated file avoids that.
    past = main_cf.stat().st_mtime - 10
    os.utime(main_cf, (past, past))
    return directory


def postmap(postmap_dir: Path, table: str, *keys: str) -> subprocess.CompletedProcess[str]:
    """``postmap -q KEY TABLE`` (one key) or ``postmap -q - TABLE`` (several), Postfix's own client."""
    if len(keys) == 1:
        return subprocess.run(["postmap", "-c", str(postmap_dir), "-q", keys[0], table],
                              capture_output=True, text=True, timeout=60)
    return subprocess.run(["postmap", "-c", str(postmap_dir), "-q", "-", table], input="".join(k + "\n" for k in keys),
                          capture_output=True, text=True, timeout=60)
