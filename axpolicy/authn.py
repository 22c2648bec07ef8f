"""SMTP AUTH: check a login and password against the LDAP user map.

DESCRIPTION
    :meth:`Authenticator.verify` answers one authentication with one of
    three outcomes, as every part of axpolicy does:

    OK    the password binds as the one entry the login names; the reply
          carries the entry's ``login_attribute`` (the canonical login);
    FAIL  a wrong password, an unknown login, input refused before any
          search, or a throttled client -- all alike, after the same
          ``failure_delay`` counted from the request, so that the answer
          and its timing do not tell which;
    TEMP  the directory is down, hung or ambiguous (never FAIL).

    Steps, in the user map's connector (its servers, TLS, failover and
    deadline): a search with the service account for the entry
    (``login_filter``, default the map's filter; ``%s`` login, ``%u`` and
    ``%d`` its parts), then a simple bind as that entry's DN with the
    password, on connections used for user binds only.

SECURITY
    Refused without asking the directory: an empty password (RFC 4513
    5.1.2: an unauthenticated bind "succeeds"), a NUL or control character
    in the login or password, a login over 320 bytes or a password over
    1024, and an authorization identity that differs from the login.
    Passwords are never logged and never kept in clear: ``cache_ttl``
    keeps a verified pair as a keyed BLAKE2b digest (per-process random
    key), and any failure with that login drops it.

    Throttling, without reaching LDAP: more than ``max_failures`` failures
    from one client address within ``failure_window`` make every further
    attempt from it fail at once; and one password that fails for more
    than ``max_failures`` different logins within the window (a password
    sprayed over many accounts) fails at once for every login.  Both are
    remembered as counts of timestamps, the password only as a keyed
    digest.

LIMITS
    ``AUTH_MAX_LOGIN_BYTES``, ``AUTH_MAX_PASSWORD_BYTES``; at most
    ``AUTH_MAX_TRACKED`` client addresses and passwords are tracked (the
    oldest are forgotten first), and ``AUTH_MAX_CACHED`` verified pairs.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import hashlib
import hmac
import logging
import math
import os
import time
from collections.abc import Callable

from axpolicy import ldapwire, limits
from axpolicy.config import AuthConfig, LdapMapConfig
from axpolicy.ldapmap import LdapUserMap
from axpolicy.log import printable
from axpolicy.result import LookupResult

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    OK = "ok"
    FAIL = "fail"
    TEMP = "temp"


@dataclasses.dataclass(frozen=True, slots=True)
class AuthResult:
    """One answer; ``login`` is the canonical login for OK."""

    outcome: Outcome
    login: str = ""
    why: str = ""         # for the log only; never sent to a client


def _refusal(login: str, password: str, authzid: str) -> str | None:
    """Why the attempt fails without asking the directory, or None."""
    if not password:
        return "empty password"
    if authzid and authzid != login:
        return "authorization identity differs from the login"
    if not login:
        return "empty login"
    if not (login.isprintable() and password.isprintable()):
        return "control character in the login or password"
    if len(login.encode("utf-8", "surrogateescape")) > limits.AUTH_MAX_LOGIN_BYTES:
        return "login too long"
    if len(password.encode("utf-8", "surrogateescape")) > limits.AUTH_MAX_PASSWORD_BYTES:
        return "password too long"
    return None


class _Window:
    """Failure times per key within a window, for at most AUTH_MAX_TRACKED keys."""

    def __init__(self, window: float, clock: Callable[[], float]) -> None:
        self._window = window
        self._clock = clock
        self._times: collections.OrderedDict[object, collections.deque[float]] = collections.OrderedDict()

    def count(self, key: object) -> int:
        times = self._times.get(key)
        if times is None:
            return 0
        horizon = self._clock() - self._window
        while times and times[0] <= horizon:
            times.popleft()
        return len(times)

    def add(self, key: object) -> None:
        times = self._times.pop(key, None) or collections.deque(maxlen=limits.AUTH_MAX_FAILURES_KEPT)
        times.append(self._clock())
        self._times[key] = times
        while len(self._times) > limits.AUTH_MAX_TRACKED:
            self._times.popitem(last=False)


class Authenticator:
    """See the module docstring."""

    def __init__(self, cfg: AuthConfig, usermap: LdapUserMap, map_cfg: LdapMapConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        self._usermap = usermap
        self._clock = clock
        self._filter = ldapwire.compile_filter(cfg.login_filter or map_cfg.filter)
        self._request = ldapwire.SearchTemplate(map_cfg.base, map_cfg.scope, cfg.login_attribute,
                                                limits.LDAP_SIZE_LIMIT, max(1, math.ceil(map_cfg.timeout)))
        self._key = os.urandom(32)
        self._cache: collections.OrderedDict[str, tuple[bytes, float, str]] = collections.OrderedDict()
        self._by_client = _Window(cfg.failure_window, clock)
        self._by_password = _Window(cfg.failure_window, clock)   # one entry per login it failed for
        self._by_pair = _Window(cfg.failure_window, clock)
        # Counted for /metrics.
        self.outcomes: collections.Counter[str] = collections.Counter()

    def _digest(self, *parts: str) -> bytes:
        data = b"\x00".join(p.encode("utf-8", "surrogateescape") for p in parts)
        return hashlib.blake2b(data, key=self._key, digest_size=32).digest()

    def verify_now(self, login: str, password: str, authzid: str = "", client: str = "") -> AuthResult | None:
        """OK at once for a pair verified within ``cache_ttl`` (no LDAP, no delay), else None."""
        if _refusal(login, password, authzid) is not None or self._throttled(client, password):
            return None
        canonical = self._cached(login, password)
        if canonical is None:
            return None
        self.outcomes["ok"] += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("auth: %s logged in from %s (cached)", printable(canonical), printable(client))
        return AuthResult(Outcome.OK, canonical)

    def _cached(self, login: str, password: str) -> str | None:
        """The canonical login if this pair was verified within ``cache_ttl``."""
        cached = self._cache.get(login)
        if cached is None:
            return None
        digest, expires, canonical = cached
        if expires <= self._clock() or not hmac.compare_digest(digest, self._digest("pair", login, password)):
            return None
        return canonical

    def _throttled(self, client: str, password: str) -> str | None:
        """Why attempts from *client* or with *password* fail at once now, or None."""
        if client and self._by_client.count(client) >= self._cfg.max_failures:
            return "too many failures from this client"
        if self._by_password.count(self._digest("password", password)) >= self._cfg.max_failures:
            return "this password failed for too many logins"
        return None

    async def verify(self, login: str, password: str, authzid: str = "", client: str = "") -> AuthResult:
        """OK, FAIL or TEMP for one attempt (see the module docstring)."""
        started = self._clock()
        result = await self._verify(login, password, authzid, client)
        self.outcomes[result.outcome.value] += 1
        if result.outcome is Outcome.FAIL:
            self._failed(login, password, client)
            logger.info("auth: failed for %s from %s: %s", printable(login), printable(client), result.why)
            delay = started + self._cfg.failure_delay - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
        elif result.outcome is Outcome.TEMP:
            logger.warning("auth: temporary failure for %s from %s: %s", printable(login), printable(client),
                           result.why)
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug("auth: %s logged in from %s", printable(result.login), printable(client))
        return result

    async def _verify(self, login: str, password: str, authzid: str, client: str) -> AuthResult:
        refusal = _refusal(login, password, authzid)
        if refusal is not None:
            return AuthResult(Outcome.FAIL, why=refusal)
        throttled = self._throttled(client, password)
        if throttled is not None:
            return AuthResult(Outcome.FAIL, why=throttled)
        cached = self._cached(login, password)
        if cached is not None:
            return AuthResult(Outcome.OK, cached)
        entry = await self._find(login)
        if not isinstance(entry, tuple):
            return entry
        dn, canonical = entry
        bound = await self._usermap.bind_as(dn, password)
        if isinstance(bound, LookupResult):
            return AuthResult(Outcome.TEMP, why=bound.reason)
        if not bound:
            return AuthResult(Outcome.FAIL, why="wrong password")
        if self._cfg.cache_ttl > 0:
            self._cache.pop(login, None)
            self._cache[login] = (self._digest("pair", login, password), self._clock() + self._cfg.cache_ttl,
                                  canonical)
            while len(self._cache) > limits.AUTH_MAX_CACHED:
                self._cache.popitem(last=False)
        return AuthResult(Outcome.OK, canonical)

    async def _find(self, login: str) -> tuple[bytes, str] | AuthResult:
        """(DN, canonical login) of the one entry *login* names, or the FAIL or TEMP to answer."""
        local, _, domain = login.rpartition("@") if "@" in login else (login, "", "")
        values = {"s": login.encode("utf-8"), "u": local.encode("utf-8"), "d": domain.encode("utf-8")}
        search_filter = self._filter.encode(values)
        messages = await self._usermap.search(login, lambda message_id: self._request.encode(message_id,
                                                                                            search_filter))
        if isinstance(messages, LookupResult):
            return AuthResult(Outcome.TEMP, why=messages.reason)
        done = messages[-1]
        entries = [m for m in messages if m.kind == "entry"]
        if done.result_code != ldapwire.RESULT_SUCCESS or any(m.kind == "reference" for m in messages):
            return AuthResult(Outcome.TEMP, why=f"login search ended with {ldapwire.result_name(done.result_code)}")
        if not entries:
            return AuthResult(Outcome.FAIL, why="unknown login")
        if len(entries) > 1:
            return AuthResult(Outcome.TEMP, why=f"{len(entries)} entries match the login")
        entry = entries[0]
        wanted = self._cfg.login_attribute.lower().encode("ascii")
        names = [v for name, values in entry.attributes.items() if name.lower() == wanted for v in values]
        if not names:
            logger.warning("auth: %s has no %s; it cannot log in", printable(entry.dn), self._cfg.login_attribute)
            return AuthResult(Outcome.FAIL, why=f"entry without {self._cfg.login_attribute}")
        try:
            canonical = names[0].decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(Outcome.FAIL, why=f"{self._cfg.login_attribute} is not UTF-8")
        if not canonical.isprintable() or "\t" in canonical:
            return AuthResult(Outcome.FAIL, why=f"{self._cfg.login_attribute} holds control characters")
        return entry.dn, canonical

    def _failed(self, login: str, password: str, client: str) -> None:
        self._cache.pop(login, None)
        if client:
            self._by_client.add(client)
        if password:
            pair = self._digest("failed pair", login, password)
            if self._by_pair.count(pair) == 0:     # a login not yet counted for this password
                self._by_password.add(self._digest("password", password))
            self._by_pair.add(pair)
