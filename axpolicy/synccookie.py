"""RFC 4533 sync cookies as OpenLDAP writes them, merged per provider.

An OpenLDAP cookie reads ``rid=000,sid=001,csn=CSN1;CSN2``: one change
sequence number (CSN) per provider, each naming its provider (serverID) in
its third ``#`` field: ``20261203221913.230744Z#000000#001#000000``.

With several providers, the cookie that comes with a change made on one of
them holds only that provider's CSN.  Stored as it is, it would make the
next resume look like a consumer that lost track of the other providers
(syncprov answers such a cookie with a full present refresh).  So the
replica keeps the newest CSN per provider and sends them all.
"""

from __future__ import annotations

import re

_CSN = re.compile(r"\A\d{14}\.\d{6}Z#[0-9a-f]{6}#[0-9a-f]{3}#[0-9a-f]{6}\Z")
MAX_COOKIE_BYTES = 4096


def csns(cookie: bytes | None) -> dict[str, str]:
    """The CSNs of *cookie* by serverID; malformed ones are left out."""
    found: dict[str, str] = {}
    if not cookie or len(cookie) > MAX_COOKIE_BYTES:
        return found
    text = cookie.decode("ascii", "replace")
    for field in text.split(","):
        name, _, value = field.partition("=")
        if name.strip() != "csn":
            continue
        for csn in value.split(";"):
            if _CSN.match(csn):
                sid = csn.split("#")[2]
                if csn > found.get(sid, ""):
                    found[sid] = csn
    return found


def merge(stored: dict[str, str], cookie: bytes | None) -> dict[str, str]:
    """*stored* updated with the newer CSNs of *cookie* (a new mapping)."""
    merged = dict(stored)
    for sid, csn in csns(cookie).items():
        if csn > merged.get(sid, ""):
            merged[sid] = csn
    return merged


def encode(state: dict[str, str], rid: int = 0) -> bytes | None:
    """The cookie to resume from, or None when there is no state."""
    if not state:
        return None
    return f"rid={rid:03d},csn={';'.join(state[sid] for sid in sorted(state))}".encode("ascii")
