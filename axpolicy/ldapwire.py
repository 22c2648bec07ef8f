"""The LDAP operations axpolicy uses, on the wire (RFC 4511, BER): encode requests, decode answers.

DESCRIPTION
    ldap3 builds every request through pyasn1, which costs about 0.9 ms of
    CPU per search on the test machine, three times what slapd needs to
    answer it (measured with cProfile over 2,000 searches, see
    docs/benchmarks.rst).  axpolicy needs a handful of operations (simple
    bind, StartTLS, search, abandon, unbind), so it encodes them here
    directly and decodes what can come back; :mod:`axpolicy.ldapconn`
    speaks them on the event loop.  ldap3 is the reference these encoders
    are tested against byte for byte (tests/test_ldapwire.py).

    The filter template from the configuration is parsed once
    (:func:`compile_filter`) into a tree whose assertion values may be
    placeholders; each search fills them with the raw key parts.  Values
    travel as BER OCTET STRINGs, so a key can never change the structure of
    a filter, whatever characters it holds: escaping is not needed on this
    path at all.

PROTOCOL
    BindRequest [APPLICATION 0] (simple) and BindResponse [APPLICATION 1];
    UnbindRequest [APPLICATION 2]; AbandonRequest [APPLICATION 16];
    ExtendedRequest [APPLICATION 23] (StartTLS, RFC 4511 4.14) and
    ExtendedResponse [APPLICATION 24], which with message id 0 is a Notice
    of Disconnection; SearchRequest [APPLICATION 3]; SearchResultEntry
    [APPLICATION 4], SearchResultReference [APPLICATION 19],
    SearchResultDone [APPLICATION 5].  Definite lengths only (RFC 4511 section 5.1).
    For the replica (:mod:`axpolicy.ldapsync`): the RFC 4533 Sync Request
    control on a search, the Sync State control on entries and the Sync
    Info message (IntermediateResponse [APPLICATION 25]).

DIAGNOSTICS
    :class:`LdapWireError` for anything that does not decode; callers treat
    it as a broken connection.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

SCOPE = {"base": 0, "one": 1, "sub": 2}
RESULT_SUCCESS = 0
START_TLS_OID = b"1.3.6.1.4.1.1466.20037"
NOTICE_OF_DISCONNECTION_OID = b"1.3.6.1.4.1.1466.20036"

# RFC 4511 appendix A: the names of the result codes a log line may show.
RESULT_NAMES = {
    1: "operationsError", 2: "protocolError", 3: "timeLimitExceeded", 4: "sizeLimitExceeded",
    7: "authMethodNotSupported", 8: "strongerAuthRequired", 10: "referral", 11: "adminLimitExceeded",
    12: "unavailableCriticalExtension", 13: "confidentialityRequired", 32: "noSuchObject",
    34: "invalidDNSyntax", 48: "inappropriateAuthentication", 49: "invalidCredentials",
    50: "insufficientAccessRights", 51: "busy", 52: "unavailable", 53: "unwillingToPerform", 80: "other",
}


def result_name(code: int) -> str:
    """``49 invalidCredentials`` for a log line."""
    return f"{code} {RESULT_NAMES.get(code, 'result')}"


class LdapWireError(ValueError):
    """Bytes that are not the LDAP this module expects."""


# --------------------------------------------------------------------------
# BER encoding


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag,)) + _length(len(value)) + value


def _integer(tag: int, n: int) -> bytes:
    return _tlv(tag, n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True))


def _octets(value: bytes) -> bytes:
    return _tlv(0x04, value)


# --------------------------------------------------------------------------
# Filters (RFC 4515 string form -> BER), parsed once per template

Part = bytes | str   # literal bytes, or the name of a placeholder ("s", "u", "d")


@dataclasses.dataclass(frozen=True, slots=True)
class _Node:
    tag: int                                  # BER context tag of the filter choice
    children: tuple[_Node, ...] = ()
    attribute: bytes = b""
    value: tuple[Part, ...] = ()              # equality, >=, <=, ~=
    substrings: tuple[tuple[int, tuple[Part, ...]], ...] = ()


_AND, _OR, _NOT, _EQUAL, _SUBSTRINGS, _GE, _LE, _PRESENT, _APPROX = 0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0x87, 0xA8
_ITEM_RE = re.compile(rb"([A-Za-z0-9][A-Za-z0-9.;-]*)(~=|>=|<=|=)(.*)\Z", re.DOTALL)
_ESCAPE_RE = re.compile(rb"\\([0-9A-Fa-f]{2})")
_PLACEHOLDER_RE = re.compile(rb"%([sud])")


class FilterTemplate:
    """A compiled filter; :meth:`encode` fills the placeholders."""

    def __init__(self, template: str) -> None:
        text = template.replace("%%", "\x00PERCENT\x00").encode("utf-8")
        node, end = _parse(text, 0)
        if end != len(text):
            raise LdapWireError("trailing text after the filter")
        self._root = node

    def encode(self, values: Mapping[str, bytes]) -> bytes:
        return _encode(self._root, values)

    def replica_plan(self) -> tuple[tuple[str, ...], bytes]:
        """(key attributes, filter for the whole set) for a replica, or LdapWireError.

        A replica can stand in for per-key searches only when the filter
        is an equality test of the whole key against one or more
        attributes, optionally ANDed with tests that do not depend on the
        key: ``(mail=%s)``, ``(|(mail=%s)(mailAlternateAddress=%s))``,
        ``(&(objectClass=inetOrgPerson)(mail=%s))``.  The replica then
        holds every entry that has one of the key attributes and passes
        the fixed tests, indexed by those attributes' values.
        """
        node = self._root
        fixed: tuple[_Node, ...] = ()
        if node.tag == _AND:
            keyed = [child for child in node.children if _has_placeholder(child)]
            if len(keyed) != 1:
                raise LdapWireError("an AND filter needs exactly one part that uses the key")
            node = keyed[0]
            fixed = tuple(child for child in self._root.children if child is not node)
        items = node.children if node.tag == _OR else (node,)
        attributes = []
        for item in items:
            if item.tag != _EQUAL or item.value != ("s",):
                raise LdapWireError("only (attribute=%s) tests of the whole key can be replicated")
            attributes.append(item.attribute.decode("ascii"))
        present = tuple(_Node(_PRESENT, attribute=a.encode("ascii")) for a in attributes)
        wanted = present[0] if len(present) == 1 else _Node(_OR, present)
        whole = _Node(_AND, fixed + (wanted,)) if fixed else wanted
        return tuple(attributes), _encode(whole, {})


def _has_placeholder(node: _Node) -> bool:
    if node.children:
        return any(_has_placeholder(child) for child in node.children)
    parts = node.value + tuple(part for _, pieces in node.substrings for part in pieces)
    return any(isinstance(part, str) for part in parts)


def compile_filter(template: str) -> FilterTemplate:
    """Parse an axpolicy filter template (``%s``, ``%u``, ``%d``, ``%%``)."""
    return FilterTemplate(template)


def _parse(text: bytes, pos: int) -> tuple[_Node, int]:
    if text[pos:pos + 1] != b"(":
        raise LdapWireError("expected '('")
    pos += 1
    op = text[pos:pos + 1]
    if op in (b"&", b"|", b"!"):
        pos += 1
        children = []
        while text[pos:pos + 1] == b"(":
            child, pos = _parse(text, pos)
            children.append(child)
        if not children or (op == b"!" and len(children) != 1):
            raise LdapWireError("bad filter list")
        if text[pos:pos + 1] != b")":
            raise LdapWireError("expected ')'")
        return _Node({b"&": _AND, b"|": _OR, b"!": _NOT}[op], tuple(children)), pos + 1
    end = text.find(b")", pos)
    if end < 0:
        raise LdapWireError("unterminated filter item")
    match = _ITEM_RE.match(text[pos:end])
    if not match:
        raise LdapWireError("bad filter item")
    attribute, operator, raw = match.groups()
    if operator == b"=" and raw == b"*":
        return _Node(_PRESENT, attribute=attribute), end + 1
    if operator == b"=" and b"*" in raw:
        pieces = raw.split(b"*")
        subs: list[tuple[int, tuple[Part, ...]]] = []
        for index, piece in enumerate(pieces):
            if not piece:
                continue
            kind = 0x80 if index == 0 else (0x82 if index == len(pieces) - 1 else 0x81)
            subs.append((kind, _value(piece)))
        return _Node(_SUBSTRINGS, attribute=attribute, substrings=tuple(subs)), end + 1
    tag = {b"=": _EQUAL, b">=": _GE, b"<=": _LE, b"~=": _APPROX}[operator]
    return _Node(tag, attribute=attribute, value=_value(raw)), end + 1


def _value(raw: bytes) -> tuple[Part, ...]:
    """Split an assertion value into literal bytes and placeholders."""
    parts: list[Part] = []
    for index, chunk in enumerate(_PLACEHOLDER_RE.split(raw)):
        if index % 2:
            parts.append(chunk.decode())
        elif chunk:
            literal = _ESCAPE_RE.sub(lambda m: bytes((int(m.group(1), 16),)), chunk)
            parts.append(literal.replace(b"\x00PERCENT\x00", b"%"))
    return tuple(parts)


def _fill(parts: tuple[Part, ...], values: Mapping[str, bytes]) -> bytes:
    return b"".join(part if isinstance(part, bytes) else values[part] for part in parts)


def _encode(node: _Node, values: Mapping[str, bytes]) -> bytes:
    if node.tag in (_AND, _OR, _NOT):
        return _tlv(node.tag, b"".join(_encode(child, values) for child in node.children))
    if node.tag == _PRESENT:
        return _tlv(_PRESENT, node.attribute)
    if node.tag == _SUBSTRINGS:
        subs = b"".join(_tlv(kind, _fill(parts, values)) for kind, parts in node.substrings)
        return _tlv(_SUBSTRINGS, _octets(node.attribute) + _tlv(0x30, subs))
    return _tlv(node.tag, _octets(node.attribute) + _octets(_fill(node.value, values)))


def _message(message_id: int, operation: bytes) -> bytes:
    return _tlv(0x30, _integer(0x02, message_id) + operation)


def encode_bind(message_id: int, dn: str, password: str) -> bytes:
    """A simple BindRequest, LDAP version 3 (an empty *dn* and *password* bind anonymously)."""
    return _message(message_id, _tlv(0x60, _integer(0x02, 3) + _octets(dn.encode("utf-8"))
                                     + _tlv(0x80, password.encode("utf-8"))))


def encode_start_tls(message_id: int) -> bytes:
    """The StartTLS ExtendedRequest."""
    return _message(message_id, _tlv(0x77, _tlv(0x80, START_TLS_OID)))


def encode_abandon(message_id: int, abandoned: int) -> bytes:
    """Ask the server to stop working on *abandoned* (no answer comes)."""
    return _message(message_id, _integer(0x50, abandoned))


def encode_unbind(message_id: int) -> bytes:
    """The UnbindRequest that ends a session politely."""
    return _message(message_id, b"\x42\x00")


class SearchTemplate:
    """The parts of a SearchRequest that never change for one user map, encoded once."""

    def __init__(self, base: str, scope: str, attribute: str | tuple[str, ...], size_limit: int,
                 time_limit: int) -> None:
        self._head = (_octets(base.encode("utf-8")) + _integer(0x0A, SCOPE[scope]) + _integer(0x0A, 0)
                      + _integer(0x02, size_limit) + _integer(0x02, time_limit) + _tlv(0x01, b"\x00"))
        attributes = (attribute,) if isinstance(attribute, str) else attribute
        self._tail = _tlv(0x30, b"".join(_octets(a.encode("ascii")) for a in attributes))

    def encode(self, message_id: int, filter_ber: bytes) -> bytes:
        """A complete LDAPMessage carrying one SearchRequest."""
        return _tlv(0x30, _integer(0x02, message_id) + _tlv(0x63, self._head + filter_ber + self._tail))


def encode_search(message_id: int, base: str, scope: str, filter_ber: bytes, attribute: str,
                  size_limit: int, time_limit: int) -> bytes:
    """A complete LDAPMessage carrying one SearchRequest (see SearchTemplate)."""
    return SearchTemplate(base, scope, attribute, size_limit, time_limit).encode(message_id, filter_ber)


SYNC_REQUEST_OID = b"1.3.6.1.4.1.4203.1.9.1.1"
SYNC_STATE_OID = b"1.3.6.1.4.1.4203.1.9.1.2"
SYNC_INFO_OID = b"1.3.6.1.4.1.4203.1.9.1.4"
REFRESH_AND_PERSIST = 3
# RFC 4533 2.5.3: the provider cannot resume from the consumer's cookie.
E_SYNC_REFRESH_REQUIRED = 4096


def encode_sync_search(message_id: int, base: str, scope: str, filter_ber: bytes,
                       attributes: tuple[str, ...], cookie: bytes | None = None) -> bytes:
    """A refreshAndPersist content synchronization search (RFC 4533), no limits.

    Without a cookie the server sends every entry, then a Sync Info
    message that ends the refresh, then each change as it happens.  With
    one, the refresh holds only what changed since the cookie (and, in a
    present phase, the UUIDs of the entries that did not).
    """
    request = (_octets(base.encode("utf-8")) + _integer(0x0A, SCOPE[scope]) + _integer(0x0A, 0)
               + _integer(0x02, 0) + _integer(0x02, 0) + _tlv(0x01, b"\x00") + filter_ber
               + _tlv(0x30, b"".join(_octets(a.encode("ascii")) for a in attributes)))
    control_value = _tlv(0x30, _integer(0x0A, REFRESH_AND_PERSIST) + (_octets(cookie) if cookie else b""))
    control = _tlv(0x30, _octets(SYNC_REQUEST_OID) + _tlv(0x01, b"\xff") + _octets(control_value))
    return _tlv(0x30, _integer(0x02, message_id) + _tlv(0x63, request) + _tlv(0xA0, control))


# --------------------------------------------------------------------------
# BER decoding of the answers


@dataclasses.dataclass(slots=True)
class Message:
    """One decoded LDAPMessage: what a search can get back."""

    message_id: int
    kind: str       # "entry", "reference", "done" (search), "bind", "extended", "intermediate", "other"
    dn: bytes = b""
    attributes: dict[bytes, list[bytes]] = dataclasses.field(default_factory=dict)
    result_code: int = -1
    diagnostic: bytes = b""
    controls: dict[bytes, bytes] = dataclasses.field(default_factory=dict)   # OID -> value
    name: bytes = b""                           # Intermediate/ExtendedResponse name and value
    value: bytes = b""


def _read_tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the element at *pos*."""
    if pos + 2 > end:
        raise LdapWireError("truncated element")
    tag = data[pos]
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise LdapWireError("bad length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > end:
        raise LdapWireError("element overruns its container")
    return tag, pos, pos + length


def frame_length(buffer: bytes | bytearray) -> int | None:
    """Total size of the first LDAPMessage in *buffer*, or None if its header is incomplete."""
    if len(buffer) < 2:
        return None
    if buffer[0] != 0x30:
        raise LdapWireError("not an LDAPMessage")
    first = buffer[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 4:
        raise LdapWireError("bad message length")
    if len(buffer) < 2 + count:
        return None
    return 2 + count + int.from_bytes(buffer[2:2 + count], "big")


def decode_message(data: bytes) -> Message:
    """Decode one complete LDAPMessage."""
    tag, start, end = _read_tlv(data, 0, len(data))
    if tag != 0x30:
        raise LdapWireError("not an LDAPMessage")
    tag, value, pos = _read_tlv(data, start, end)
    if tag != 0x02:
        raise LdapWireError("missing message id")
    message_id = int.from_bytes(data[value:pos], "big", signed=True)
    op, op_start, op_end = _read_tlv(data, pos, end)
    if op == 0x64:
        message = _entry(message_id, data, op_start, op_end)
    elif op == 0x65:
        message = _result(message_id, data, op_start, op_end)
    elif op == 0x61:
        message = _result(message_id, data, op_start, op_end, "bind")
    elif op == 0x78:
        message = _result(message_id, data, op_start, op_end, "extended")
    elif op == 0x73:
        message = Message(message_id, "reference")
    elif op == 0x79:
        message = _intermediate(message_id, data, op_start, op_end)
    else:
        return Message(message_id, "other")
    if op_end < end:
        _controls(message, data, op_end, end)
    return message


def _controls(message: Message, data: bytes, pos: int, end: int) -> None:
    tag, pos, end = _read_tlv(data, pos, end)
    if tag != 0xA0:
        raise LdapWireError("unexpected element after the operation")
    while pos < end:
        tag, c_pos, c_end = _read_tlv(data, pos, end)
        tag, oid_start, oid_end = _read_tlv(data, c_pos, c_end)
        value = b""
        inner = oid_end
        while inner < c_end:
            tag, v_start, v_end = _read_tlv(data, inner, c_end)
            if tag == 0x04:
                value = data[v_start:v_end]
            inner = v_end
        message.controls[data[oid_start:oid_end]] = value
        pos = c_end


def _intermediate(message_id: int, data: bytes, pos: int, end: int) -> Message:
    return _name_and_value(Message(message_id, "intermediate"), data, pos, end, 0x80, 0x81)


def _name_and_value(message: Message, data: bytes, pos: int, end: int, name_tag: int, value_tag: int) -> Message:
    """Fill the optional responseName and responseValue of *message* from the elements in *data*."""
    while pos < end:
        tag, v_start, v_end = _read_tlv(data, pos, end)
        if tag == name_tag:
            message.name = data[v_start:v_end]
        elif tag == value_tag:
            message.value = data[v_start:v_end]
        pos = v_end
    return message


def decode_sync_state(value: bytes) -> tuple[int, bytes, bytes | None]:
    """(state, entryUUID, cookie) from a Sync State control: present 0, add 1, modify 2, delete 3."""
    tag, pos, end = _read_tlv(value, 0, len(value))
    tag, s_start, s_end = _read_tlv(value, pos, end)
    if tag != 0x0A:
        raise LdapWireError("bad sync state")
    tag, u_start, u_end = _read_tlv(value, s_end, end)
    if tag != 0x04:
        raise LdapWireError("bad sync state uuid")
    cookie = None
    if u_end < end:
        tag, c_start, c_end = _read_tlv(value, u_end, end)
        if tag == 0x04:
            cookie = value[c_start:c_end]
    return int.from_bytes(value[s_start:s_end], "big"), value[u_start:u_end], cookie


@dataclasses.dataclass(frozen=True, slots=True)
class SyncInfo:
    """A Sync Info message: which kind, whether the refresh is done, UUIDs of a syncIdSet."""

    kind: int                         # 0 newcookie, 1 refreshDelete, 2 refreshPresent, 3 syncIdSet
    refresh_done: bool = True
    refresh_deletes: bool = False
    uuids: tuple[bytes, ...] = ()
    cookie: bytes | None = None


def decode_sync_info(value: bytes) -> SyncInfo:
    tag, pos, end = _read_tlv(value, 0, len(value))
    kind = tag & 0x1F
    if tag == 0x80:
        return SyncInfo(0, cookie=value[pos:end])
    if tag not in (0xA1, 0xA2, 0xA3):
        raise LdapWireError("unknown sync info")
    refresh_done, refresh_deletes, uuids = True, False, []
    cookie = None
    while pos < end:
        inner, v_start, v_end = _read_tlv(value, pos, end)
        if inner == 0x04:
            cookie = value[v_start:v_end]
        elif inner == 0x01:
            flag = value[v_start:v_end] != b"\x00"
            if kind == 3:
                refresh_deletes = flag
            else:
                refresh_done = flag
        elif inner == 0x31:
            item = v_start
            while item < v_end:
                _, u_start, u_end = _read_tlv(value, item, v_end)
                uuids.append(value[u_start:u_end])
                item = u_end
        pos = v_end
    return SyncInfo(kind, refresh_done, refresh_deletes, tuple(uuids), cookie)


def _entry(message_id: int, data: bytes, pos: int, end: int) -> Message:
    tag, dn_start, dn_end = _read_tlv(data, pos, end)
    message = Message(message_id, "entry", dn=data[dn_start:dn_end])
    tag, pos, attrs_end = _read_tlv(data, dn_end, end)
    while pos < attrs_end:
        tag, attr_start, attr_end = _read_tlv(data, pos, attrs_end)
        tag, name_start, name_end = _read_tlv(data, attr_start, attr_end)
        tag, vals_pos, vals_end = _read_tlv(data, name_end, attr_end)
        values = []
        while vals_pos < vals_end:
            tag, v_start, v_end = _read_tlv(data, vals_pos, vals_end)
            values.append(data[v_start:v_end])
            vals_pos = v_end
        message.attributes[data[name_start:name_end]] = values
        pos = attr_end
    return message


def _result(message_id: int, data: bytes, pos: int, end: int, kind: str = "done") -> Message:
    """An LDAPResult (SearchResultDone, BindResponse, ExtendedResponse and its responseName)."""
    tag, code_start, code_end = _read_tlv(data, pos, end)
    if tag != 0x0A:
        raise LdapWireError("missing result code")
    tag, dn_start, dn_end = _read_tlv(data, code_end, end)
    tag, diag_start, diag_end = _read_tlv(data, dn_end, end)
    message = Message(message_id, kind, result_code=int.from_bytes(data[code_start:code_end], "big"),
                      diagnostic=data[diag_start:diag_end])
    # Then referral [3], serverSaslCreds [7], responseName [10], responseValue [11].
    return _name_and_value(message, data, diag_end, end, 0x8A, 0x8B)
