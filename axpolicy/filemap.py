"""File user map: the Axigen-style local map, and the built-in default.

DESCRIPTION
    One entry a line, ``#`` starts a comment line, blank lines are skipped::

        alice@example.com        mail1.example.com   # exact address
        @example.net             mail2.example.com   # catch-all for a domain
        /^sales-[a-z]+@example\\.com$/  10.0.0.7      # regular expression

    Keys are normalised like every address (ASCII letters of the local part
    lowercased, other characters compared exactly; A-label domain), so
    ASCII case and IDNA form do not matter.  An exact key is tried first,
    then the regular expressions in file order (Python ``re`` syntax with
    ``re.ASCII``, matched case-insensitively for ASCII letters only against
    ``user@domain``: ``[a-z]`` and ``\\w`` never match ``ı``, ``ſ`` or the
    KELVIN SIGN; anchor them yourself with ``^`` and ``$``).  ``@domain``
    keys are exact only.

    The file is re-read when its modification time, size or inode changes
    (checked at most once a second, on lookup).  A file that became invalid
    or unreadable is reported and the previous contents stay in use.

LIMITS
    ``limits.FILEMAP_MAX_BYTES`` per file, ``FILEMAP_MAX_LINE_BYTES`` per line.
    Only a regular file is read (not a FIFO or a device).

    A host must be a DNS name, an IPv4 address or an IPv6 address without
    a zone (:func:`axpolicy.address.valid_host`).  An entry with any other
    host value is a temporary failure with a warning, as in an LDAP map:
    the file still loads (one bad line must not stop the routing of every
    other user), the line is reported at load and by ``check-config``,
    and mail for that entry waits instead of going to a guessed host.

DIAGNOSTICS
    FOUND or NOTFOUND; TEMP only for an entry with a bad host value.  :class:`FileMapError` names
    the file and line of the first problem and never quotes the file (it
    may be a file that was never meant to be a user map).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import time

from axpolicy import limits
from axpolicy.address import AddressError, normalize_domain, parse, valid_host
from axpolicy.config import FileMapConfig
from axpolicy.files import FileReadError, read_regular
from axpolicy.result import NOTFOUND, LookupResult, found, temp

logger = logging.getLogger(__name__)

_REGEX_LINE_RE = re.compile(r"/(?P<pattern>.+)/(?P<flags>\S*)\s+(?P<host>\S+)\Z")


class FileMapError(Exception):
    """The map file is unusable; the message names the file and line."""


# Stands for the host of an entry whose host value is invalid (followed by
# where it is); no valid host starts with NUL.
_BAD_HOST = "\x00"


@dataclasses.dataclass(frozen=True, slots=True)
class _Table:
    exact: dict[str, str]
    patterns: tuple[tuple[re.Pattern[str], str], ...]
    signature: tuple[int, int, int]
    problems: tuple[str, ...] = ()


def parse_table(text: str, origin: str) -> tuple[dict[str, str], tuple[tuple[re.Pattern[str], str], ...],
                                                 tuple[str, ...]]:
    """Parse map text: (exact keys, expressions, problems that make an entry a temporary failure).

    FileMapError, naming ``origin:line``, for anything else that is wrong.
    """
    exact: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    patterns: list[tuple[re.Pattern[str], str]] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{origin}:{number}"
        if len(line.encode("utf-8", "surrogatepass")) > limits.FILEMAP_MAX_LINE_BYTES:
            raise FileMapError(f"{where}: line too long")
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("/"):
            match = _REGEX_LINE_RE.match(line)
            if not match:
                raise FileMapError(f"{where}: expected /regex/ host")
            if match["flags"]:
                raise FileMapError(f"{where}: regex flags are not supported")
            try:
                pattern = re.compile(match["pattern"], re.IGNORECASE | re.ASCII)
            except re.error as exc:
                raise FileMapError(f"{where}: bad regular expression: {exc}") from None
            patterns.append((pattern, _host(match["host"], where, problems)))
            continue
        fields = line.split()
        if len(fields) != 2:
            raise FileMapError(f"{where}: expected 'address host', '@domain host' or '/regex/ host'")
        key_text, host_text = fields
        try:
            if key_text.startswith("@"):
                key = "@" + normalize_domain(key_text[1:])
            else:
                key = parse(key_text).key
        except AddressError as exc:
            raise FileMapError(f"{where}: the key cannot be a user: {exc}") from None
        if key in exact:
            raise FileMapError(f"{where}: duplicate key (first on line {first_seen[key]})")
        exact[key] = _host(host_text, where, problems)
        first_seen[key] = number
    return exact, tuple(patterns), tuple(problems)


def _host(text: str, where: str, problems: list[str]) -> str:
    if not valid_host(text):
        problems.append(f"{where}: the host is not a host name or IP address; the entry is a temporary failure")
        return _BAD_HOST + where
    return text.lower()


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def _read(path: str) -> _Table:
    try:
        data, stat = read_regular(path, limits.FILEMAP_MAX_BYTES)
    except FileReadError as exc:
        raise FileMapError(str(exc)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileMapError(f"{path}: not UTF-8 (byte {exc.start})") from None
    exact, patterns, problems = parse_table(text, path)
    return _Table(exact, patterns, _signature(stat), problems)


class FileUserMap:
    """Exact-key lookups in a local file (see module docstring)."""

    def __init__(self, cfg: FileMapConfig) -> None:
        self.name = cfg.name
        self.catchall = cfg.catchall
        self.cached = False
        self._path = cfg.path
        self._table = _read(cfg.path)  # FileMapError at start-up is fatal
        for problem in self._table.problems:
            logger.warning("usermap %s: %s", self.name, problem)
        self._checked = time.monotonic()
        self._reloading: asyncio.Lock | None = None

    @property
    def size(self) -> int:
        return len(self._table.exact) + len(self._table.patterns)

    async def lookup(self, key: str) -> LookupResult:
        """FOUND with the host, or NOTFOUND."""
        if time.monotonic() - self._checked >= limits.FILEMAP_CHECK_INTERVAL_SECONDS:
            await self._maybe_reload()
        return self._find(key)

    def lookup_now(self, key: str) -> LookupResult | None:
        """The answer without waiting, or None when the file is due for a change check."""
        if time.monotonic() - self._checked >= limits.FILEMAP_CHECK_INTERVAL_SECONDS:
            return None
        return self._find(key)

    @property
    def problems(self) -> tuple[str, ...]:
        """Entries of the loaded file that are temporary failures (bad host values), with file and line."""
        return self._table.problems

    def _find(self, key: str) -> LookupResult:
        table = self._table
        host = table.exact.get(key)
        if host is None and not key.startswith("@"):
            for pattern, pattern_host in table.patterns:
                if pattern.search(key):
                    host = pattern_host
                    break
        if host is None:
            return NOTFOUND
        if host.startswith(_BAD_HOST):
            logger.warning("usermap %s: %s: the host is not a host name or IP address; temporary failure",
                           self.name, host[len(_BAD_HOST):])
            return temp("user map entry has a bad host")
        return found(host)

    async def _maybe_reload(self) -> None:
        if self._reloading is None:
            self._reloading = asyncio.Lock()
        if self._reloading.locked():
            return  # another lookup is reloading; answer from the current table
        async with self._reloading:
            self._checked = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, self.reload_if_changed)

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed; keep the old table on any error."""
        try:
            signature = _signature(os.stat(self._path))
        except OSError as exc:
            logger.error("usermap %s: cannot stat %s (%s); keeping the loaded map",
                         self.name, self._path, exc.strerror)
            return False
        if signature == self._table.signature:
            return False
        try:
            table = _read(self._path)
        except Exception as exc:  # noqa: BLE001 - whatever goes wrong, the loaded map stays
            if isinstance(exc, FileMapError):
                logger.error("usermap %s: reload failed, keeping the loaded map: %s", self.name, exc)
            else:
                logger.exception("usermap %s: reload failed, keeping the loaded map", self.name)
            # Remember the bad version so the error is logged once per change.
            self._table = dataclasses.replace(self._table, signature=signature)
            return False
        self._table = table
        logger.info("usermap %s: reloaded %s (%d entries)", self.name, self._path, self.size)
        for problem in table.problems:
            logger.warning("usermap %s: %s", self.name, problem)
        return True

    def answers_version(self) -> int | None:
        """None: a changed file is noticed at lookup time only."""
        return None

    def start(self) -> None:
        """Nothing runs in the background: changes are noticed at lookup time."""

    async def close(self) -> None:
        """Nothing to release."""
