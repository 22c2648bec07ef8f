"""The protocol parsers and encoders on their own (sans-I/O): framing, limits, traps.

Every framer is fed the same bytes whole, in small pieces and one byte at a
time, and must give the same requests; hypothesis feeds them garbage, which
may only ever raise FrameError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from axpolicy import limits, netstring
from axpolicy.policy import _Framer as PolicyFramer
from axpolicy.readsocket import _Framer as ReadsocketFramer
from axpolicy.readsocket import reply_body
from axpolicy.result import NOTFOUND, LookupResult, Status, found, perm, temp
from axpolicy.socketmap import _Framer as SocketmapFramer
from axpolicy.socketmap import reply_payload
from axpolicy.tcptable import QuoteError, quote, reply_line, unquote
from axpolicy.tcptable import _Framer as TcpFramer
from axpolicy.wire import FrameError

CHUNKS = [4096, 128, 16, 1]


def feed_in_chunks(framer: Any, data: bytes, size: int) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(data), size):
        out.extend(framer.feed(data[start:start + size]))
    return out


@pytest.mark.parametrize("size", CHUNKS)
def test_netstrings_split_anywhere(size: int) -> None:
    data = b"19:transport alice@a.b,0:,5:x y z," * 3
    assert feed_in_chunks(netstring.Decoder(100), data, size) == [b"transport alice@a.b", b"", b"x y z"] * 3


def test_netstring_encode() -> None:
    assert netstring.encode(b"OK relay:[127.0.0.2]") == b"20:OK relay:[127.0.0.2],"
    assert netstring.encode(b"") == b"0:,"


@pytest.mark.parametrize(("data", "error"), [
    (b"101:", netstring.NetstringTooLong),
    (b"99999", netstring.NetstringTooLong),        # refused before the colon arrives
    (b"x:", netstring.NetstringMalformed),
    (b" 5:hello,", netstring.NetstringMalformed),
    (b"-1:", netstring.NetstringMalformed),
    (b"5:hello!", netstring.NetstringMalformed),
    (b"\xff", netstring.NetstringMalformed),
])
def test_netstring_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        netstring.Decoder(100).feed(data)


def test_socketmap_replies() -> None:
    assert reply_payload(found("relay:[127.0.0.2]")) == b"OK relay:[127.0.0.2]"
    assert reply_payload(NOTFOUND) == b"NOTFOUND "              # the space is required
    assert reply_payload(found("")) == b"NOTFOUND "             # never an empty OK
    assert reply_payload(temp("user map unavailable")) == b"TEMP user map unavailable"
    assert reply_payload(perm("unknown map name")) == b"PERM unknown map name"
    assert reply_payload(found("x" * limits.SOCKETMAP_MAX_REPLY_BYTES)).startswith(b"TEMP ")


def test_socketmap_framer_limits_map_to_perm_replies() -> None:
    with pytest.raises(FrameError) as info:
        SocketmapFramer().feed(b"%d:" % (limits.SOCKETMAP_MAX_REQUEST_BYTES + 1))
    assert info.value.reply == b"22:PERM request too large,"
    with pytest.raises(FrameError) as info:
        SocketmapFramer().feed(b"abc")
    assert info.value.reply == b"24:PERM malformed netstring,"


@pytest.mark.parametrize(("raw", "quoted"), [
    (b"alice@example.com", b"alice@example.com"),
    (b"A Key%x", b"A%20Key%25x"),
    ("ünï".encode(), b"%C3%BCn%C3%AF"),
    (b"tab\there\r\n", b"tab%09here%0D%0A"),
    (b"\x00", b"%00"),
])
def test_tcp_table_hex_quoting_matches_postfix(raw: bytes, quoted: bytes) -> None:
    assert quote(raw) == quoted
    assert unquote(quoted) == raw
    assert unquote(quoted.replace(b"%C3%BC", b"%c3%bc")) == raw    # either case of hex digits


@pytest.mark.parametrize("bad", [b"%", b"%4", b"%zz", b"a%g1", b"%%"])
def test_tcp_table_malformed_escapes(bad: bytes) -> None:
    with pytest.raises(QuoteError):
        unquote(bad)


@given(st.binary(max_size=200))
def test_tcp_table_quoting_round_trips_and_stays_on_one_line(data: bytes) -> None:
    quoted = quote(data)
    assert unquote(quoted) == data
    assert not set(quoted) & {0x20, 0x0A, 0x0D, 0x00} and quoted.isascii()


def test_tcp_table_replies() -> None:
    assert reply_line(found("relay:[127.0.0.2]")) == b"200 relay:[127.0.0.2]\n"
    assert reply_line(found("a value")) == b"200 a%20value\n"
    assert reply_line(NOTFOUND) == b"500 not%20found\n"
    assert reply_line(found("")) == b"500 not%20found\n"
    assert reply_line(temp("down")) == b"400 down\n"
    assert reply_line(perm("unknown map name")) == b"400 unknown%20map%20name\n"   # no permanent code exists
    long = reply_line(found("x" * 4093))
    assert long == b"400 reply%20too%20long\n"
    assert len(reply_line(found("x" * 4091))) == 4096                # the limit includes the LF


@pytest.mark.parametrize("size", CHUNKS)
def test_tcp_table_lines_split_anywhere(size: int) -> None:
    data = b"get a@b.c\nget x%20y\r\nput k v\n"
    assert feed_in_chunks(TcpFramer(), data, size) == [b"get a@b.c", b"get x%20y", b"put k v"]


REQUEST = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=alice@example.com\n"
           b"unknown_future_attribute=1\nrecipient=bob@example.com\n\n")


@pytest.mark.parametrize("size", CHUNKS)
def test_policy_requests_split_anywhere(size: int) -> None:
    requests = feed_in_chunks(PolicyFramer(), REQUEST * 2, size)
    assert len(requests) == 2
    # Unknown attributes are kept and ignored; a repeated one: the last wins.
    assert requests[0]["recipient"] == "bob@example.com"
    assert requests[0]["unknown_future_attribute"] == "1"


@pytest.mark.parametrize("data", [
    b"\n",
    b"no equals sign\n",
    b"=value\n",
    b"a=" + b"b" * limits.POLICY_MAX_LINE_BYTES + b"\n",
    b"a=" + b"b" * (limits.POLICY_MAX_LINE_BYTES + 10),           # no newline yet, already too long
    b"".join(b"a%d=b\n" % i for i in range(limits.POLICY_MAX_ATTRIBUTES + 1)),
])
def test_policy_framing_errors_close_without_reply(data: bytes) -> None:
    with pytest.raises(FrameError) as info:
        PolicyFramer().feed(data)
    assert info.value.reply is None


@pytest.mark.parametrize("data", [
    b"no equals sign\n\n",
    b"=value\n\n",
    b"a=b\n=c\n\n",
    b"a=" + b"b" * limits.POLICY_MAX_LINE_BYTES + b"x\n\n",
    b"".join(b"a%d=b\n" % i for i in range(limits.POLICY_MAX_ATTRIBUTES + 1)) + b"\n",
])
def test_whole_bad_requests_in_one_read_are_refused_too(data: bytes) -> None:
    with pytest.raises(FrameError):
        PolicyFramer().feed(data)


def parse_policy(data: bytes, size: int) -> list[dict[str, str]] | str:
    try:
        return feed_in_chunks(PolicyFramer(), data, size)
    except FrameError:
        return "FrameError"


@settings(max_examples=300)
@given(st.lists(st.tuples(st.binary(max_size=12).filter(lambda b: b"\n" not in b),
                          st.sampled_from([b"=", b"", b"=="]),
                          st.binary(max_size=20).filter(lambda b: b"\n" not in b)), max_size=8))
def test_a_request_read_whole_parses_exactly_as_one_read_line_by_line(
        lines: list[tuple[bytes, bytes, bytes]]) -> None:
    data = b"".join(name + sep + value + b"\n" for name, sep, value in lines) + b"\n"
    assert parse_policy(data, len(data)) == parse_policy(data, 1)


def test_readsocket_request_ends_at_newline_or_half_close() -> None:
    framer = ReadsocketFramer()
    assert framer.feed(b"mailhost al") == []
    assert framer.eof() == [b"mailhost al"]
    framer = ReadsocketFramer()
    assert framer.feed(b"mailhost alice@example.com\nignored") == [b"mailhost alice@example.com"]
    assert framer.eof() == []


def test_readsocket_replies_have_no_trailing_newline() -> None:
    assert reply_body(found("127.0.0.2")) == b"OK 127.0.0.2"
    assert reply_body(NOTFOUND) == b"NOTFOUND"
    assert reply_body(found("")) == b"NOTFOUND"
    assert reply_body(temp("user map unavailable")) == b"TEMP user map unavailable"
    assert reply_body(LookupResult(Status.PERM, reason="unknown map name")) == b"PERM unknown map name"


FRAMERS: list[Callable[[], Any]] = [SocketmapFramer, TcpFramer, PolicyFramer, ReadsocketFramer]


@settings(max_examples=300)
@given(st.sampled_from(FRAMERS), st.lists(st.binary(max_size=300), max_size=20))
def test_framers_only_ever_raise_frame_errors(make: Callable[[], Any], chunks: list[bytes]) -> None:
    framer = make()
    try:
        for chunk in chunks:
            framer.feed(chunk)
        framer.eof()
    except FrameError:
        pass


def test_sync_cookies_keep_the_newest_csn_of_each_provider() -> None:
    from axpolicy import synccookie

    one = "20261203100000.000000Z#000000#001#000000"
    two_old, two_new = "20261203090000.000000Z#000000#002#000000", "20261203110000.000000Z#000000#002#000000"
    stored = synccookie.merge({}, f"rid=000,sid=001,csn={one};{two_old}".encode())
    assert stored == {"001": one, "002": two_old}
    # A change on provider 2 comes with a cookie holding only its own CSN.
    stored = synccookie.merge(stored, f"rid=000,sid=002,csn={two_new}".encode())
    assert stored == {"001": one, "002": two_new}
    # An older CSN never replaces a newer one; garbage is ignored.
    assert synccookie.merge(stored, f"rid=000,csn={two_old};garbage".encode()) == stored
    assert synccookie.encode(stored) == f"rid=000,csn={one};{two_new}".encode()
    assert synccookie.encode({}) is None
