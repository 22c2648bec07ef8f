"""The LDAP codec: byte-identical to ldap3's encoder, strict decoder, keys cannot change filters."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ldap3.operation.search import compile_filter as ldap3_compile
from ldap3.operation.search import parse_filter
from ldap3.utils.conv import escape_filter_chars
from pyasn1.codec.ber import encoder

from axpolicy.ldapwire import (
    SYNC_STATE_OID,
    LdapWireError,
    SyncInfo,
    compile_filter,
    decode_message,
    decode_sync_info,
    decode_sync_state,
    encode_abandon,
    encode_bind,
    encode_search,
    encode_start_tls,
    encode_sync_search,
    encode_unbind,
    frame_length,
)

TEMPLATES = [
    "(mail=%s)",
    "(|(mail=%s)(mailAlternateAddress=%s))",
    "(&(objectClass=inetOrgPerson)(|(mail=%u@%d)(uid=%u)))",
    "(&(mail=%s)(!(mailHost=*))(cn=ab*c*d)(x>=5)(y<=\\2a)(z~=q))",
    "(&(mail=%s)(description=100%%))",
]


def ldap3_ber(template: str, values: dict[str, str]) -> bytes:
    text = template.replace("%%", "\x00")
    for name, value in values.items():
        text = text.replace("%" + name, escape_filter_chars(value))
    text = text.replace("\x00", "%")
    return bytes(encoder.encode(ldap3_compile(parse_filter(text, None, False, False, None, False).elements[0])))


@pytest.mark.parametrize("template", TEMPLATES)
@settings(max_examples=50)
# White space is left out: ldap3's string parser drops leading blanks from
# values (our encoder keeps every byte; parse() refuses blanks anyway).
@given(local=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Zs", "Cc")), min_size=1, max_size=12),
       domain=st.from_regex(r"[a-z]{1,8}\.[a-z]{2,4}", fullmatch=True))
def test_filters_encode_exactly_like_ldap3(template: str, local: str, domain: str) -> None:
    values = {"s": f"{local}@{domain}", "u": local, "d": domain}
    ours = compile_filter(template).encode({k: v.encode() for k, v in values.items()})
    assert ours == ldap3_ber(template, values)


@pytest.mark.parametrize("bad", ["mail=%s", "(mail=%s", "(|(mail=%s)", "(!(a=1)(b=2))", "(&)", "((mail=%s))",
                                 "(mail=%s))", "(=x)"])
def test_bad_filters_are_refused(bad: str) -> None:
    with pytest.raises(LdapWireError):
        compile_filter(bad)


def test_a_key_is_one_value_whatever_it_contains() -> None:
    """'*', parentheses and backslashes stay inside one OCTET STRING: no substring, no new clause."""
    template = compile_filter("(mail=%s)")
    ber = template.encode({"s": b"*)(uid=*"})
    assert ber == b"\xa3\x10\x04\x04mail\x04\x08*)(uid=*"   # equalityMatch, value verbatim


def test_search_request_encoding() -> None:
    request = encode_search(7, "ou=people,dc=example,dc=com", "sub",
                            compile_filter("(mail=%s)").encode({"s": b"a@b.c"}), "mailHost", 16, 3)
    assert request[0] == 0x30 and frame_length(request) == len(request)
    assert b"ou=people,dc=example,dc=com" in request and request.endswith(b"\x30\x0a\x04\x08mailHost")


def _message(message_id: int, op: bytes) -> bytes:
    body = bytes((0x02, 1, message_id)) + op
    return bytes((0x30, len(body))) + body


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag, len(value))) + value


def test_decoding_entries_results_and_references() -> None:
    entry = _message(9, _tlv(0x64, _tlv(0x04, b"uid=a,dc=x") + _tlv(0x30, _tlv(0x30, _tlv(0x04, b"mailHost")
                                                                          + _tlv(0x31, _tlv(0x04, b"h1"))))))
    message = decode_message(entry)
    assert (message.message_id, message.kind, message.dn) == (9, "entry", b"uid=a,dc=x")
    assert message.attributes == {b"mailHost": [b"h1"]}
    done = _message(9, _tlv(0x65, _tlv(0x0A, b"\x20") + _tlv(0x04, b"") + _tlv(0x04, b"no such object")))
    assert (decode_message(done).kind, decode_message(done).result_code) == ("done", 32)
    reference = _message(9, _tlv(0x73, _tlv(0x04, b"ldap://elsewhere/")))
    assert decode_message(reference).kind == "reference"


@pytest.mark.parametrize("garbage", [
    b"", b"\x30", b"\x31\x00", b"\x30\x05\x02\x01\x01", b"\x30\x85\x01\x02\x03\x04\x05",
    b"\x30\x03\x04\x01a", b"\x30\x06\x02\x01\x01\x65\x01\x0a"])
def test_malformed_answers_raise(garbage: bytes) -> None:
    with pytest.raises(LdapWireError):
        decode_message(garbage)


@settings(max_examples=2000)
@given(st.binary(max_size=200))
def test_decoder_only_ever_raises_its_own_error(data: bytes) -> None:
    try:
        decode_message(data)
    except LdapWireError:
        pass
    try:
        frame_length(data)
    except LdapWireError:
        pass


# --------------------------------------------------------------------------
# The replica's part: which filters it can stand in for, and what it asks


@pytest.mark.parametrize(("template", "attributes", "whole"), [
    ("(mail=%s)", ("mail",), "(mail=*)"),
    ("(|(mail=%s)(mailAlternateAddress=%s))", ("mail", "mailAlternateAddress"),
     "(|(mail=*)(mailAlternateAddress=*))"),
    ("(&(objectClass=inetOrgPerson)(!(accountStatus=disabled))(mail=%s))", ("mail",),
     "(&(objectClass=inetOrgPerson)(!(accountStatus=disabled))(mail=*))"),
])
def test_replica_plan_keeps_the_fixed_tests_and_asks_for_every_key_holder(
        template: str, attributes: tuple[str, ...], whole: str) -> None:
    assert compile_filter(template).replica_plan() == (attributes, ldap3_ber(whole, {}))


@pytest.mark.parametrize("template", [
    "(uid=%u)", "(mail=%u@%d)", "(mail=x%s)", "(mail=%s*)", "(&(mail=%s)(uid=%s))", "(!(mail=%s))",
    "(|(mail=%s)(uid=fixed))", "(mail>=%s)",
])
def test_replica_plan_refuses_filters_it_cannot_evaluate_in_memory(template: str) -> None:
    with pytest.raises(LdapWireError):
        compile_filter(template).replica_plan()


def tlv(tag: int, value: bytes) -> bytes:
    """Short-form BER element (test values stay under 128 bytes)."""
    assert len(value) < 128
    return bytes((tag, len(value))) + value


def test_sync_search_carries_a_critical_refresh_and_persist_control() -> None:
    request = encode_sync_search(1000, "ou=people,dc=example,dc=com", "sub", ldap3_ber("(mail=*)", {}),
                                 ("mail", "mailHost"))
    mode = tlv(0x30, tlv(0x0A, b"\x03"))                       # refreshAndPersist, no cookie
    control = tlv(0x30, tlv(0x04, b"1.3.6.1.4.1.4203.1.9.1.1") + tlv(0x01, b"\xff") + tlv(0x04, mode))
    assert request.endswith(tlv(0xA0, control))
    assert frame_length(request) == len(request)
    resumed = encode_sync_search(1000, "ou=people,dc=example,dc=com", "sub", ldap3_ber("(mail=*)", {}),
                                 ("mail", "mailHost"), cookie=b"rid=000,csn=x")
    mode = tlv(0x30, tlv(0x0A, b"\x03") + tlv(0x04, b"rid=000,csn=x"))
    control = tlv(0x30, tlv(0x04, b"1.3.6.1.4.1.4203.1.9.1.1") + tlv(0x01, b"\xff") + tlv(0x04, mode))
    assert resumed.endswith(tlv(0xA0, control))


def test_sync_state_and_sync_info_decode() -> None:
    uuid = bytes(range(16))
    state = tlv(0x30, tlv(0x0A, b"\x03") + tlv(0x04, uuid))      # delete
    control = tlv(0x30, tlv(0x04, SYNC_STATE_OID) + tlv(0x04, state))
    entry = tlv(0x30, tlv(0x02, b"\x07") + tlv(0x64, tlv(0x04, b"dn") + tlv(0x30, b"")) + tlv(0xA0, control))
    message = decode_message(entry)
    assert (message.kind, message.dn) == ("entry", b"dn")
    assert decode_sync_state(message.controls[SYNC_STATE_OID]) == (3, uuid, None)
    with_cookie = tlv(0x30, tlv(0x0A, b"\x01") + tlv(0x04, uuid) + tlv(0x04, b"rid=000,csn=1"))
    assert decode_sync_state(with_cookie) == (1, uuid, b"rid=000,csn=1")
    assert decode_sync_info(tlv(0xA2, tlv(0x01, b"\xff"))) == SyncInfo(2, refresh_done=True)
    assert decode_sync_info(tlv(0xA1, tlv(0x04, b"c") + tlv(0x01, b"\x00"))) == SyncInfo(
        1, refresh_done=False, cookie=b"c")
    assert decode_sync_info(tlv(0x80, b"rid=000,csn=2")) == SyncInfo(0, cookie=b"rid=000,csn=2")
    assert decode_sync_info(tlv(0xA1, b"")) == SyncInfo(1, refresh_done=True)
    assert decode_sync_info(tlv(0xA3, tlv(0x01, b"\xff") + tlv(0x31, tlv(0x04, uuid)))) == SyncInfo(
        3, refresh_deletes=True, uuids=(uuid,))


def ldap3_message(message_id: int, operation: str, value: Any) -> bytes:
    """ldap3's own encoding of one LDAPMessage: the reference for ours."""
    from ldap3.protocol.rfc4511 import LDAPMessage, MessageID, ProtocolOp
    from pyasn1.codec.ber import encoder

    message = LDAPMessage()
    message["messageID"] = MessageID(message_id)
    op = ProtocolOp()
    op.setComponentByName(operation, value)
    message["protocolOp"] = op
    return bytes(encoder.encode(message))


# ldap3 insists on a name and a password for a simple bind and applies
# SASLprep to the password (we send it as given): compare where both apply.
PRINTABLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)


@settings(max_examples=200)
@given(st.integers(1, 2**31 - 1), PRINTABLE, PRINTABLE)
def test_session_operations_encode_exactly_like_ldap3(message_id: int, dn: str, password: str) -> None:
    from ldap3 import SIMPLE
    from ldap3.operation.abandon import abandon_operation
    from ldap3.operation.bind import bind_operation
    from ldap3.operation.extended import extended_operation
    from ldap3.operation.unbind import unbind_operation

    assert encode_bind(message_id, dn, password) == ldap3_message(
        message_id, "bindRequest", bind_operation(3, SIMPLE, dn, password))
    assert encode_start_tls(message_id) == ldap3_message(
        message_id, "extendedReq", extended_operation("1.3.6.1.4.1.1466.20037"))
    assert encode_abandon(message_id, message_id // 2 + 1) == ldap3_message(
        message_id, "abandonRequest", abandon_operation(message_id // 2 + 1))
    assert encode_unbind(message_id) == ldap3_message(message_id, "unbindRequest", unbind_operation())


def test_bind_and_extended_responses_and_the_notice_of_disconnection_decode() -> None:
    result = tlv(0x0A, b"\x31") + tlv(0x04, b"") + tlv(0x04, b"bad")
    bind = decode_message(tlv(0x30, tlv(0x02, b"\x01") + tlv(0x61, result)))
    assert (bind.kind, bind.result_code, bind.diagnostic) == ("bind", 49, b"bad")
    notice = decode_message(tlv(0x30, tlv(0x02, b"\x00") + tlv(0x78, tlv(0x0A, b"\x34") + tlv(0x04, b"")
                                                             + tlv(0x04, b"") + tlv(0x8A, NOTICE))))
    assert (notice.message_id, notice.kind, notice.result_code, notice.name) == (0, "extended", 52, NOTICE)


NOTICE = b"1.3.6.1.4.1.1466.20036"
