"""Address parsing: decide whether a key can be a user, and in what form.

DESCRIPTION
    The MTA hands axpolicy a full recipient address.  Before any user map is
    asked, :func:`parse` turns it into one canonical form or refuses it:

    * the domain is lowercased and converted to its IDNA A-label form
      (``bücher.example`` and ``xn--bcher-kva.example`` are the same
      domain);
    * ASCII letters in the local part are lowercased; every other
      character is kept exactly as given.  Local parts are formally
      case-sensitive but every directory we target matches ``mail``
      case-insensitively (``caseIgnoreIA5Match``) and Postfix casefolds
      keys for smtpd lookups; one rule for all maps keeps the answers
      identical across protocols.  Unicode case folding is never applied:
      ``str.lower()`` turns U+212A KELVIN SIGN into ``k``, so
      ``\u212aate@example.com`` would be found as ``kate@example.com``.
      In a domain label, IDNA's own mapping is applied, but a non-ASCII
      character that would map onto ASCII is refused.

    :func:`search_keys` then gives the Postfix search order for table
    lookups: ``user+ext@domain``, ``user@domain``, ``@domain``.

SECURITY
    An address that carries sender-specified routing can never be a user,
    whatever the directory holds, because a "found" answer for it could
    make the front-end relay to a third party.  Refused: ``%``, ``!``,
    quotes and backslashes (quoted local parts), more than one ``@``,
    source routes (``@a,@b:u@d``), address literals, empty local part or
    domain, a trailing dot, control characters and white space, a leading
    dot or ``/`` ``|`` in the local part (Exim's pipe and file forms),
    over-long parts, and the bare key ``*`` that Postfix uses to probe
    transport maps.

DIAGNOSTICS
    :class:`AddressError` with a short reason that never echoes the input.
"""

from __future__ import annotations

import dataclasses
import encodings.idna
import ipaddress
import re

from axpolicy import limits

# Characters that never appear in the local part of a user we route.
# '@' '%' '!' are routing operators (Postfix resolve.c, Exim percent hack),
# quotes and backslash introduce quoted forms, '/' and '|' are Exim's file
# and pipe deliveries, the rest are RFC 5322 specials that need quoting.
_LOCAL_FORBIDDEN = frozenset('@%!"\\/|()<>[],;:')

# One A-label: letters, digits, hyphen; not starting or ending with hyphen.
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")

# A host value from a user map: it ends up in a transport nexthop and in
# every protocol's reply, so it must be a plain DNS name (LDH labels, which
# covers dotted-quad IPv4) or an IPv6 address without a zone, nothing that
# could carry a port, a second host, a line break or transport syntax.
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]{2,45}\Z")
_HOSTNAME_RE = re.compile(r"(?=.{1,255}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")

# Local parts that Postfix never splits at the recipient delimiter
# (global/split_addr.c).
_NEVER_SPLIT = frozenset({"postmaster", "mailer-daemon", "double-bounce"})


# ASCII-only case folding (see DESCRIPTION).
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """*text* with ASCII letters lowercased and every other character kept."""
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


class AddressError(ValueError):
    """The key can never be a user; ``str(exc)`` is a reason without input."""


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    """A recipient in canonical form: lowercase local part, A-label domain."""

    local: str
    domain: str

    @property
    def key(self) -> str:
        return f"{self.local}@{self.domain}"


def normalize_domain(text: str) -> str:
    """Return *text* as a lowercase A-label domain or raise AddressError.

    Both U-labels and A-labels are accepted; A-labels are decoded once to
    prove that they are valid punycode.
    """
    if not text:
        raise AddressError("empty domain")
    if len(text.encode("utf-8", "surrogatepass")) > limits.MAX_DOMAIN_BYTES:
        raise AddressError("domain too long")
    if text.startswith("[") or text.endswith("."):
        raise AddressError("address literal or trailing dot")
    labels = []
    for label in text.split("."):
        labels.append(_normalize_label(label))
    domain = ".".join(labels)
    if len(domain) > limits.MAX_DOMAIN_BYTES:
        raise AddressError("domain too long")
    return domain


def _normalize_label(label: str) -> str:
    if not label:
        raise AddressError("empty domain label")
    if not label.isascii():
        try:
            ascii_label = encodings.idna.ToASCII(label).decode("ascii")
            # Nameprep silently drops or maps some characters (zero-width
            # space, ß, KELVIN SIGN to k): a domain that is not what it
            # looks like is refused.  Only case differences are allowed,
            # and only where a non-ASCII letter stays non-ASCII.
            if encodings.idna.ToUnicode(ascii_label) != label.lower() or not ascii_label.startswith("xn--") \
                    or any(not ch.isascii() and ch.lower().isascii() for ch in label):
                raise AddressError("domain changes under IDNA mapping")
        except UnicodeError:
            raise AddressError("invalid internationalised domain") from None
        label = ascii_label
    label = label.lower()
    if not _LABEL_RE.match(label):
        raise AddressError("invalid domain label")
    if label.startswith("xn--"):
        # Round-trip to prove the punycode is valid and canonical.
        try:
            if encodings.idna.ToASCII(encodings.idna.ToUnicode(label)).decode() != label:
                raise AddressError("non-canonical A-label")
        except UnicodeError:
            raise AddressError("invalid A-label") from None
    return label


def _check_local(local: str) -> str:
    if not local:
        raise AddressError("empty local part")
    if len(local.encode("utf-8", "surrogatepass")) > limits.MAX_LOCAL_PART_BYTES:
        raise AddressError("local part too long")
    if local.startswith("."):
        raise AddressError("local part starts with a dot")
    for ch in local:
        if ch in _LOCAL_FORBIDDEN:
            raise AddressError("routing or quoting character in local part")
        if ch.isspace() or not ch.isprintable():
            raise AddressError("control character or white space")
    return ascii_lower(local)


# The everyday address, already in a form the full checks would accept as
# is once lowercased: ASCII, allowed local-part characters (printable, no
# white space, nothing in _LOCAL_FORBIDDEN, no leading dot), a domain of
# valid labels without a trailing dot.  Matching it is a fraction of the
# cost of the checks; anything else (non-ASCII, A-labels, oddities) takes
# the full path.  tests/test_address.py checks that both always agree.
_SIMPLE_LOCAL = "".join(sorted(re.escape(chr(c)) for c in range(0x21, 0x7F)
                               if chr(c) not in _LOCAL_FORBIDDEN and chr(c) != "."))
_SIMPLE_RE = re.compile(rf"([{_SIMPLE_LOCAL}][{_SIMPLE_LOCAL}.]*)@((?:[a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?\.)*"
                        rf"[a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?)\Z")


def parse(text: str) -> Address:
    """Parse one recipient key into canonical form.

    Raises AddressError for anything that can never be a routable user.
    """
    if text.isascii() and len(text) <= limits.MAX_ADDRESS_BYTES:
        lowered = text.lower()
        match = _SIMPLE_RE.match(lowered)
        if match is not None and "xn--" not in lowered:
            local, domain = match.groups()
            if len(local) <= limits.MAX_LOCAL_PART_BYTES and len(domain) <= limits.MAX_DOMAIN_BYTES:
                return Address(local, domain)
    return parse_fully(text)


def parse_fully(text: str) -> Address:
    """:func:`parse` through every check, for every input."""
    if len(text.encode("utf-8", "surrogatepass")) > limits.MAX_ADDRESS_BYTES:
        raise AddressError("address too long")
    if text == "*":
        raise AddressError("wildcard probe key")
    if text.count("@") != 1:
        raise AddressError("address must have exactly one '@'")
    local, _, domain = text.partition("@")
    return Address(_check_local(local), normalize_domain(domain))


def split_extension(local: str, delimiters: str) -> str | None:
    """Return *local* without its extension, or None when it has none.

    Postfix rules (global/split_addr.c): split at the first character that
    is in the delimiter set; never split the special local parts; never
    leave an empty local part; with '-' as a delimiter, ``owner-*`` and
    ``*-request`` are not split (owner_request_special = yes).
    """
    if not delimiters or local in _NEVER_SPLIT:
        return None
    if "-" in delimiters and (local.startswith("owner-") or local.endswith("-request")):
        return None
    for index, ch in enumerate(local):
        if ch in delimiters:
            return local[:index] if index > 0 else None
    return None


def search_keys(address: Address, delimiters: str, catchall: bool) -> list[str]:
    """Keys to try in order: ``user+ext@dom``, ``user@dom``, ``@dom``."""
    keys = [address.key]
    base = split_extension(address.local, delimiters)
    if base is not None:
        keys.append(f"{base}@{address.domain}")
    if catchall:
        keys.append(f"@{address.domain}")
    return keys


def valid_host(value: str) -> bool:
    """True for a DNS host name (LDH labels), an IPv4 address or an IPv6 address without a zone.

    ``ipaddress.IPv6Address`` alone is not enough: it accepts a scope id,
    ``::1%`` followed by anything (line breaks, ``]``, ``,``, ``:port``).
    """
    if _HOSTNAME_RE.match(value):
        return True
    if not _IPV6_RE.match(value):
        return False
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True
