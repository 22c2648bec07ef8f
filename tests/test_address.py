"""Address handling: what can be a user, in which canonical form, and the search order."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from axpolicy.address import Address, AddressError, parse, parse_fully, search_keys, split_extension, valid_host

CANONICAL = [
    ("alice@example.com", "alice@example.com"),
    ("Alice@EXAMPLE.COM", "alice@example.com"),
    ("User+Ext@Example.Com", "user+ext@example.com"),
    ("jose@bücher.example", "jose@xn--bcher-kva.example"),
    ("jose@BÜCHER.example", "jose@xn--bcher-kva.example"),
    ("jose@xn--bcher-kva.example", "jose@xn--bcher-kva.example"),
    ("jose@XN--BCHER-KVA.EXAMPLE", "jose@xn--bcher-kva.example"),
    ("ÜSER9@relay.example", "Üser9@relay.example"),       # ASCII folded, the rest kept exactly
    ("fran\u212a.Miller@example.com", "fran\u212a.miller@example.com"),  # KELVIN SIGN is not "k"
    ("\u0130nci@example.com", "\u0130nci@example.com"),   # dotted capital I is not "i"
    ("st*r@example.com", "st*r@example.com"),
    ("o'hara@example.com", "o'hara@example.com"),
    ("a.b-c_d=e@sub.example.com", "a.b-c_d=e@sub.example.com"),
    ("user@localhost", "user@localhost"),
]


@pytest.mark.parametrize(("text", "key"), CANONICAL)
def test_addresses_are_canonicalised(text: str, key: str) -> None:
    assert parse(text).key == key


NEVER_USERS = [
    ("*", "the transport-map wildcard probe"),
    ("", "empty"),
    ("@example.com", "empty local part"),
    ("alice@", "empty domain"),
    ("alice", "no domain"),
    ("victim%target.example@example.com", "percent hack"),
    ("victim%target.example", "percent hack without domain"),
    ("target.example!victim@example.com", "bang path"),
    ("target.example!victim", "bang path without domain"),
    ('"victim@target.example"@example.com', "quoted local part with @"),
    ('"victim%target.example"@example.com', "quoted local part with %"),
    ('"john doe"@example.com', "quoted local part"),
    ("victim@target.example@example.com", "two @"),
    ("@example.com:victim@target.example", "source route"),
    ("@a.example,@b.example:victim@target.example", "source route list"),
    ("victim@[192.0.2.99]", "address literal"),
    ("victim@[IPv6:2001:db8::99]", "IPv6 address literal"),
    ("alice@example.com.", "trailing dot"),
    ("alice@example..com", "empty label"),
    ("alice@-example.com", "label starting with hyphen"),
    ("alice@exa_mple.com", "underscore in domain"),
    ("al ice@example.com", "space"),
    ("alice\x00@example.com", "NUL"),
    ("alice\r\n@example.com", "CR LF"),
    ("alice\t@example.com", "tab"),
    ("alice\x7f@example.com", "DEL"),
    ("alice@exam\u200bple.com", "zero-width space in domain"),
    ("alice@straße.example", "domain that IDNA 2003 maps to another"),
    ("alice@exampl\u212a.com", "KELVIN SIGN that IDNA maps onto ASCII k"),
    ("alice@\u212a\u00fc.example", "KELVIN SIGN beside a letter that stays non-ASCII"),
    ("|/bin/sh@example.com", "Exim pipe"),
    ("/etc/passwd@example.com", "Exim file"),
    (".alice@example.com", "leading dot"),
    ("alice)(mail=*@example.com", "filter metacharacters"),
    ("alice\\2a@example.com", "backslash"),
    ("a" * 65 + "@example.com", "local part over 64 octets"),
    ("a@" + ".".join(["b" * 63] * 4) + ".com", "domain over 255 octets"),
    ("a@" + "b" * 64 + ".com", "label over 63 octets"),
    ("x@xn--zz.example", "invalid punycode"),
    ("alice@ex\udcffample.com", "lone surrogate (non-UTF-8 byte)"),
]


@pytest.mark.parametrize(("text", "why"), NEVER_USERS, ids=[w for _, w in NEVER_USERS])
def test_addresses_that_can_never_be_users(text: str, why: str) -> None:
    with pytest.raises(AddressError):
        parse(text)


def test_over_320_bytes_is_never_a_user() -> None:
    # 64-octet local part, but a multi-byte domain pushes the total over.
    with pytest.raises(AddressError):
        parse("a" * 64 + "@" + "ü" * 200 + ".example")


def test_errors_do_not_echo_the_input() -> None:
    with pytest.raises(AddressError) as info:
        parse("secret%stuff@example.com")
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(("local", "delimiters", "base"), [
    ("user+ext", "+", "user"),
    ("user+ext+more", "+", "user"),
    ("user-ext+more", "+-", "user"),
    ("user", "+", None),
    ("+ext", "+", None),               # never an empty local part
    ("user+ext", "", None),
    ("postmaster+x", "+", "postmaster"),
    ("postmaster", "+", None),
    ("mailer-daemon", "-", None),       # special local parts are never split
    ("mailer-daemon", "-", None),
    ("owner-list", "-", None),          # owner_request_special
    ("list-request", "-", None),
    ("list-foo", "-", "list"),
])
def test_extension_split_follows_postfix(local: str, delimiters: str, base: str | None) -> None:
    assert split_extension(local, delimiters) == base


def test_search_order_is_full_key_then_base_then_domain() -> None:
    address = parse("User+Ext@Example.com")
    assert search_keys(address, "+", catchall=True) == [
        "user+ext@example.com", "user@example.com", "@example.com"]
    assert search_keys(address, "+", catchall=False) == ["user+ext@example.com", "user@example.com"]
    assert search_keys(parse("user@example.com"), "+", catchall=False) == ["user@example.com"]


@pytest.mark.parametrize(("host", "ok"), [
    ("127.0.0.2", True), ("mail1.example.com", True), ("::1", True), ("2001:db8::5", True),
    ("[127.0.0.2]", False), ("127.0.0.2:25", False), ("host name", False), ("a,b", False),
    ("smtp:host", False), ("", False), ("-host", False), ("host.", False),
    # An IPv6 zone id can carry anything (red-team finding).
    ("::1%\n\naction=OK", False), ("::1%x],[victim.test]", False), ("::1%eth0", False), ("fe80::1%25", False),
    ("::1\n", False), ("127.0.0.2\r", False), ("host\x00", False), ("a" * 256, False),
])
def test_host_values_must_be_plain_names_or_addresses(host: str, ok: bool) -> None:
    assert valid_host(host) is ok


ROUTING = st.sampled_from("%!@\"\\")


@settings(max_examples=300)
@given(st.text(max_size=30), ROUTING, st.text(max_size=30), st.text(max_size=20))
def test_any_routing_character_in_the_local_part_is_refused(pre: str, op: str, post: str, domain: str) -> None:
    with pytest.raises(AddressError):
        parse(f"{pre}{op}{post}@{domain}")


@settings(max_examples=500)
@given(st.text(max_size=80))
def test_whatever_parses_has_one_at_and_only_safe_characters(text: str) -> None:
    try:
        address = parse(text)
    except AddressError:
        return
    assert address.key.count("@") == 1
    assert not set(address.key) & set("%!\"\\()*[] \r\n\x00") - {"*"}
    assert address.domain.isascii() and address.domain == address.domain.lower()
    assert parse(address.key) == address  # canonical form is a fixed point


@settings(max_examples=500)
@given(st.text(max_size=40))
def test_only_ascii_letters_are_case_folded(local: str) -> None:
    try:
        address = parse(f"{local}@example.com")
    except AddressError:
        return
    for given_char, kept in zip(local, address.local, strict=True):
        assert kept == (given_char.lower() if given_char.isascii() else given_char)


def outcome(parser: Callable[[str], Address], text: str) -> Address | str:
    try:
        return parser(text)
    except AddressError:
        return "refused"


ADDRESS_LIKE = st.text(alphabet=st.sampled_from("aZ09.-+_@%!\"/|*[]:;,éXN ßx\t") | st.characters(), max_size=40)


@settings(max_examples=2000)
@given(st.one_of(ADDRESS_LIKE,
                 st.builds("{}@{}".format, ADDRESS_LIKE, ADDRESS_LIKE),
                 st.builds("{}@{}.{}".format, st.from_regex(r"[A-Za-z0-9.+_=-]{0,70}", fullmatch=True),
                           st.from_regex(r"[A-Za-z0-9-]{0,70}", fullmatch=True),
                           st.from_regex(r"(xn--)?[A-Za-z0-9-]{0,64}\.?", fullmatch=True))))
def test_the_quick_path_for_everyday_addresses_agrees_with_every_check(text: str) -> None:
    assert outcome(parse, text) == outcome(parse_fully, text)
