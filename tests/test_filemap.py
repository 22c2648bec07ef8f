"""The file user map: format, lookups in Postfix order, and reload on change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from axpolicy import config
from axpolicy.config import FileMapConfig
from axpolicy.filemap import FileMapError, FileUserMap, parse_table
from axpolicy.result import LookupResult, Status, found, temp
from axpolicy.router import Router
from tests.conftest import run

MAP = """\
# comment
alice@example.com        127.0.0.2
Bob@EXAMPLE.com          127.0.0.3
jose@bücher.example      127.0.0.3

/^sales-[a-z]+@example\\.com$/   127.0.0.2
@example.net             127.0.0.3
"""


def router_for(path: Path, **top: object) -> Router:
    return Router.open(config.parse({"usermaps": {"local": {"type": "file", "path": str(path)}},
                                     "recipient_delimiter": "+", **top}, str(path.parent / "c.yml")))


@pytest.fixture
def mapfile(tmp_path: Path) -> Path:
    path = tmp_path / "usermap"
    path.write_text(MAP)
    return path


@pytest.mark.parametrize(("address", "host"), [
    ("alice@example.com", "127.0.0.2"),
    ("ALICE@Example.Com", "127.0.0.2"),
    ("alice+news@example.com", "127.0.0.2"),      # extension stripped
    ("bob@example.com", "127.0.0.3"),             # entry keys are canonicalised too
    ("jose@xn--bcher-kva.example", "127.0.0.3"),  # A-label query, U-label entry
    ("sales-east@example.com", "127.0.0.2"),      # regular expression
    ("anyone@example.net", "127.0.0.3"),          # catch-all
    ("anyone+x@EXAMPLE.NET", "127.0.0.3"),
])
def test_found(mapfile: Path, address: str, host: str) -> None:
    async def go() -> None:
        router = router_for(mapfile)
        result = await router.resolve(address)
        assert (result.status, result.value) == (Status.FOUND, host)
    run(go())


@pytest.mark.parametrize("address", [
    "carol@example.com", "sales-1@example.com", "sales-east@example.com.evil", "alice@example.org",
    "alice%evil.example@example.com", "*", "victim%target.example@example.net",
])
def test_not_found(mapfile: Path, address: str) -> None:
    async def go() -> None:
        assert (await router_for(mapfile).resolve(address)).status is Status.NOTFOUND
    run(go())


def test_domains_limits_which_addresses_are_looked_up(mapfile: Path) -> None:
    async def go() -> None:
        router = router_for(mapfile, domains=["example.com"])
        assert (await router.resolve("alice@example.com")).status is Status.FOUND
        assert (await router.resolve("anyone@example.net")).status is Status.NOTFOUND
    run(go())


@pytest.mark.parametrize(("text", "message"), [
    ("alice@example.com\n", ":1: expected 'address host'"),
    ("alice@example.com 127.0.0.2 extra\n", ":1: expected"),
    ("# ok\nalice%x@example.com 127.0.0.2\n", ":2: the key cannot be a user"),
    ("/unclosed[/ 127.0.0.2\n", ":1: bad regular expression"),
    ("/x/i 127.0.0.2\n", ":1: regex flags are not supported"),
    ("a@example.com h1\nA@Example.com h2\n", ":2: duplicate key (first on line 1)"),
    ("@exa mple.com h1\n", ":1: expected"),
    ("@example.com. h1\n", ":1: the key cannot be a user"),
])
def test_bad_files_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(FileMapError) as info:
        parse_table(text, "usermap")
    assert message in str(info.value)
    # Never the file's text: the path may name a file that is not a user map.
    assert not {"alice", "127.0.0.2", "victim", "h1", "h2"} & set(str(info.value).replace(":", " ").split())


@pytest.mark.parametrize("address", [
    "\u017fales-east@example.com",     # LONG S: [a-z] with re.IGNORECASE matches it in Unicode mode
    "sales-\u0131nfo@example.com",    # dotless i
    "sales-\u212aey@example.com",     # KELVIN SIGN
])
def test_regular_expressions_fold_ascii_only(mapfile: Path, address: str) -> None:
    async def go() -> None:
        router = router_for(mapfile)
        assert (await router.resolve(address)).status is Status.NOTFOUND
        assert (await router.resolve(address.replace("\u017f", "s").replace("\u0131", "i")
                                      .replace("\u212a", "k"))).status is Status.FOUND
    run(go())


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_only_a_regular_file_is_read(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "usermap"
    if kind == "fifo":
        os.mkfifo(path)        # open() without O_NONBLOCK would hang here
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path.mkdir()
    with pytest.raises(FileMapError, match=f"{path}: not a regular file"):
        FileUserMap(FileMapConfig(name="local", path=str(path)))


@pytest.mark.parametrize("host", ["[127.0.0.2]", "::1%x],[victim.test]", "127.0.0.2:25", "relay:host"])
def test_an_entry_with_a_bad_host_is_a_temporary_failure_and_the_rest_still_routes(
        tmp_path: Path, host: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "usermap"
    path.write_text(f"alice@example.com 127.0.0.2\nbad@example.com {host}\n/^worse-.*@example\\.com$/ {host}\n")
    usermap = FileUserMap(FileMapConfig(name="local", path=str(path)))
    assert usermap.problems == (f"{path}:2: the host is not a host name or IP address; the entry is a "
                                f"temporary failure", f"{path}:3: the host is not a host name or IP address; "
                                f"the entry is a temporary failure")
    assert f"{path}:2: the host is not a host name" in caplog.text        # said at load

    async def go() -> list[LookupResult]:
        return [await usermap.lookup(k) for k in ("alice@example.com", "bad@example.com", "worse-x@example.com")]
    assert run(go()) == [found("127.0.0.2"), temp("user map entry has a bad host"),
                         temp("user map entry has a bad host")]
    assert host not in caplog.text                                       # where, never what


def test_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "usermap"
    path.write_bytes(b"al\xffce@example.com 127.0.0.2\n")
    with pytest.raises(FileMapError, match="not UTF-8"):
        FileUserMap(FileMapConfig(name="local", path=str(path)))


def test_missing_file_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(FileMapError, match="cannot read"):
        FileUserMap(FileMapConfig(name="local", path=str(tmp_path / "nope")))


def _touch_later(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))


def test_reloaded_when_the_file_changes(mapfile: Path) -> None:
    usermap = FileUserMap(FileMapConfig(name="local", path=str(mapfile)))
    mapfile.write_text(MAP + "carol@example.com 127.0.0.2\n")
    _touch_later(mapfile)
    assert usermap.reload_if_changed() is True

    async def go() -> None:
        assert (await usermap.lookup("carol@example.com")).value == "127.0.0.2"
    run(go())
    assert usermap.reload_if_changed() is False  # unchanged: nothing to do


def test_an_invalid_new_file_keeps_the_old_map(mapfile: Path, caplog: pytest.LogCaptureFixture) -> None:
    usermap = FileUserMap(FileMapConfig(name="local", path=str(mapfile)))
    mapfile.write_text("this is not a map line at all\n")
    _touch_later(mapfile)
    assert usermap.reload_if_changed() is False
    assert "reload failed, keeping the loaded map" in caplog.text

    async def go() -> None:
        assert (await usermap.lookup("alice@example.com")).value == "127.0.0.2"
    run(go())
    mapfile.unlink()
    assert usermap.reload_if_changed() is False
    assert "cannot stat" in caplog.text


def test_lookups_notice_a_changed_file_by_themselves(mapfile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("axpolicy.limits.FILEMAP_CHECK_INTERVAL_SECONDS", 0.0)

    async def go() -> None:
        usermap = FileUserMap(FileMapConfig(name="local", path=str(mapfile)))
        assert (await usermap.lookup("zoe@example.com")).status is Status.NOTFOUND
        mapfile.write_text(MAP + "zoe@example.com 127.0.0.3\n")
        _touch_later(mapfile)
        assert (await usermap.lookup("zoe@example.com")).value == "127.0.0.3"
    run(go())
