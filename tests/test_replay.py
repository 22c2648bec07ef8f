"""Replayed replies (axpolicy/replay.py): the same answer the router would give, never for longer.

A replayed reply skips the router, so these tests pin down that it can
only exist while the cache entries behind it are fresh, that answers
which can change at any moment are never kept, and, end to end through
Postfix's own client, that a changed directory shows once the TTL has
passed, exactly as without the memo.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from axpolicy import config, limits
from axpolicy.replay import ReplyMemo
from axpolicy.result import NOTFOUND, found
from axpolicy.router import Answer, Router
from axpolicy.stats import STATS
from tests.conftest import ldap_map, own_slapd, postmap
from tests.daemon import Axpolicy
from tests.slapd import PEOPLE, Slapd, free_port
from tests.test_cache import make


def test_a_reply_is_replayed_only_until_its_answer_expires() -> None:
    cache, clock = make()
    memo = ReplyMemo("socketmap", cache)
    memo.put(b"req", b"reply", Answer(found("x"), clock.now + 10), "transport", "found")
    before = STATS.requests[("socketmap", "transport", "found")]
    assert memo.get(b"req") == b"reply"
    assert STATS.requests[("socketmap", "transport", "found")] == before + 1
    assert cache.hits == 1                          # counted as the cache hit it stands for
    clock.now += 10
    assert memo.get(b"req") is None
    assert len(memo) == 0


def test_answers_that_can_change_at_any_moment_are_not_kept() -> None:
    cache, clock = make()
    memo = ReplyMemo("socketmap", cache)
    memo.put(b"req", b"reply", Answer(found("x"), 0.0), "files", "found")
    memo.put(b"old", b"reply", Answer(found("x"), clock.now), "files", "found")
    assert (memo.get(b"req"), memo.get(b"old"), len(memo)) == (None, None, 0)


def test_an_answer_watched_for_changes_is_replayed_only_while_nothing_changed() -> None:
    cache, clock = make()
    memo = ReplyMemo("socketmap", cache)
    watched = Watched()
    memo.put(b"req", b"reply", Answer(found("x"), math.inf, watched, watched.version), "people", "found")  # type: ignore[arg-type]
    assert memo.get(b"req") == b"reply"
    watched.version += 1
    assert memo.get(b"req") is None


class Watched:
    """A user map's change counter, as a replica keeps it."""

    version = 7

    def answers_version(self) -> int:
        return self.version


def test_the_memo_is_bounded_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "REPLY_MEMO_ENTRIES", 3)
    cache, clock = make()
    memo = ReplyMemo("tcp_table", cache)
    for n in range(5):
        memo.put(b"%d" % n, b"r", Answer(found("x"), clock.now + 1), "m", "found")
    assert len(memo) == 3
    assert memo.get(b"0") is None and memo.get(b"4") == b"r"


def make_router(tmp_path: Path) -> Router:
    (tmp_path / "users").write_text("carol@example.com 127.0.0.3\n")
    raw = {
        "usermaps": {"people": ldap_map(servers=["ldap://127.0.0.1:9"]),
                     "files": {"type": "file", "path": str(tmp_path / "users")}},
        "domains": ["example.com"],
        "recipient_delimiter": "+",
        "cache": {"ttl": 300, "negative_ttl": 60},
        "maps": {"transport": {"usermap": "people", "result": "relay:[%s]"},
                 "files": {"usermap": "files", "result": "%s"},
                 "domain": {"type": "domain", "result": "OK"}},
    }
    return Router.open(config.parse(raw, str(tmp_path / "axpolicy.yml")))


def test_the_router_says_how_long_each_answer_holds(tmp_path: Path) -> None:
    router = make_router(tmp_path)
    maps = router.config.maps
    now = router.cache.clock()
    router.cache.put("people\x00alice+tag@example.com", NOTFOUND)      # fresh for negative_ttl
    router.cache.put("people\x00alice@example.com", found("127.0.0.2"))  # fresh for ttl
    answer = router.query(maps["transport"], "alice+tag@example.com")
    assert isinstance(answer, Answer) and answer.result == found("relay:[127.0.0.2]")
    assert answer.until == pytest.approx(now + 60, abs=30)     # the earlier of the two
    assert answer.watch is None
    pending = router.query(maps["transport"], "bob@example.com")       # not cached: needs I/O
    assert not isinstance(pending, Answer)
    pending.close()  # type: ignore[attr-defined]   # a coroutine, never awaited here
    assert router.query(maps["transport"], "bob@example.org") == Answer(NOTFOUND, math.inf)   # outside domains
    assert router.query(maps["domain"], "Example.COM") == Answer(found("OK"), math.inf)
    assert router.query(maps["files"], "carol@example.com") == Answer(found("127.0.0.3"), 0.0)  # file may change


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """A directory of its own: this module changes entries."""
    yield from own_slapd(tmp_path_factory, "slapd-replay")


def wait_for(check: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the new answer never showed"
        time.sleep(0.1)


def test_a_changed_directory_shows_through_postfix_once_the_ttl_has_passed(
        directory: Slapd, postmap_dir: Path, tmp_path: Path) -> None:
    server = Axpolicy(tmp_path / "axpolicy", {
        "usermaps": {"people": ldap_map(directory)},
        "cache": {"ttl": 1, "negative_ttl": 1, "stale_if_error": 0},
        "listen": [{"protocol": "socketmap", "address": f"inet:127.0.0.1:{free_port()}"},
                   {"protocol": "tcp_table", "address": f"inet:127.0.0.1:{free_port()}", "map": "transport"}],
        "maps": {"transport": {"usermap": "people", "result": "relay:[%s]"}},
    })
    server.start()
    tables = [f"socketmap:{server.address('socketmap')}:transport",
              f"tcp:{server.address('tcp_table')[len('inet:'):]}"]

    def answers(key: str) -> list[str]:
        # Several keys per postmap run: the later ones are replayed.
        return [postmap(postmap_dir, table, key, key, key).stdout for table in tables]

    try:
        assert answers("bob@example.com") == ["bob@example.com\trelay:[127.0.0.3]\n" * 3] * 2
        assert answers("newcomer@example.com") == [""] * 2
        directory.modify(f"dn: uid=bob,{PEOPLE}\nchangetype: modify\nreplace: mailHost\nmailHost: 127.0.0.2\n")
        directory.modify(f"dn: uid=newcomer,{PEOPLE}\nchangetype: add\nobjectClass: inetOrgPerson\n"
                         "objectClass: inetLocalMailRecipient\nuid: newcomer\ncn: n\nsn: n\n"
                         "mail: newcomer@example.com\nmailHost: 127.0.0.3\n")
        wait_for(lambda: answers("bob@example.com") == ["bob@example.com\trelay:[127.0.0.2]\n" * 3] * 2)
        wait_for(lambda: answers("newcomer@example.com") == ["newcomer@example.com\trelay:[127.0.0.3]\n" * 3] * 2)
    finally:
        assert server.stop() == 0, server.log
