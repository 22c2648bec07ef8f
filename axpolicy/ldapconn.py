"""One LDAP client connection on the event loop: connect, TLS, bind, multiplexed operations.

DESCRIPTION
    Every LDAP operation axpolicy performs, for per-key searches and for the
    replica alike, goes through :class:`LdapConnection`, an asyncio Protocol
    on one TCP connection:

    * :func:`open_connection` connects (``ldap://``, ``ldaps://``, or
      ``ldapi://`` for a local slapd's unix socket), runs
      StartTLS when configured (``loop.start_tls`` on the same transport),
      and binds (simple, or anonymously), all within one deadline;
    * :meth:`LdapConnection.operation` sends one request and collects the
      messages that answer it, matched by message id, so that many
      searches share one connection at once (multiplexing) and no thread is
      ever involved;
    * :meth:`LdapConnection.stream` registers a handler for a request whose
      answers keep coming (the replica's persistent search);
    * a Notice of Disconnection, a reset or a closed connection fails every
      operation in flight at once with :class:`LdapConnectionError`, so
      that callers can fail over without waiting for their deadline.

    Why the hot path is the project's own code: ldap3 encodes each request
    through pyasn1 (0.9 ms of CPU per search, three times what slapd needs
    to answer it) and its asynchronous strategies run a thread per
    connection; a thread hand-off alone cost more than a search
    (docs/benchmarks.rst).  The operations used here are few and simple,
    and :mod:`axpolicy.ldapwire` encodes them byte for byte as ldap3 does
    (tests/test_ldapwire.py).

SECURITY
    TLS verifies the server certificate and its host name against
    ``ca_file`` (or the system's CAs); there is no plain-text fallback.
    The bind password is never logged; a failed bind logs the result code
    and the server's diagnostic text, made printable.

LIMITS
    ``limits.LDAP_MAX_RESPONSE_BYTES`` per message (a larger one breaks the
    connection); ``limits.LDAP_MAX_OUTSTANDING`` operations per connection
    (the caller keeps to it; slapd closes an anonymous session with more
    than ``conn_max_pending`` = 100).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from axpolicy import ldapwire, limits
from axpolicy.log import printable

logger = logging.getLogger(__name__)

# Return True when the operation is complete (its handler is then removed).
Handler = Callable[[ldapwire.Message], bool]


class LdapConnectionError(Exception):
    """The connection or the session cannot be used: connect, TLS, bind, reset, Notice of Disconnection."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One configured server: where it is and how to secure the connection."""

    url: str
    host: str
    port: int
    ssl_context: ssl.SSLContext | None      # ldaps:// or StartTLS
    start_tls: bool
    path: str = ""                          # ldapi://: the unix socket


DEFAULT_LDAPI_PATH = "/var/run/slapd/ldapi"   # Debian's slapd


def ldapi_path(url: str) -> str:
    """The socket of an ``ldapi://`` URL (its host part, percent-encoded; empty: Debian's default)."""
    return unquote(urlsplit(url).netloc) or DEFAULT_LDAPI_PATH


def endpoint(url: str, start_tls: bool, ca_file: str | None) -> Endpoint:
    """The :class:`Endpoint` for a configured ``ldap://``, ``ldaps://`` or ``ldapi://`` URL.

    ``start_tls`` applies to ``ldap://`` servers only: a unix socket is
    local, and ``ldaps://`` is TLS already.
    """
    parts = urlsplit(url)
    if parts.scheme == "ldapi":
        return Endpoint(url, "", 0, None, False, ldapi_path(url))
    ldaps = parts.scheme == "ldaps"
    context = None
    if ldaps or start_tls:
        context = ssl.create_default_context(cafile=ca_file)   # CERT_REQUIRED, host name checked
    return Endpoint(url, parts.hostname or "", parts.port or (636 if ldaps else 389), context,
                    start_tls and not ldaps)


@dataclass(slots=True)
class _Pending:
    handler: Handler
    future: asyncio.Future[None] | None = None
    messages: list[ldapwire.Message] = field(default_factory=list)


class LdapConnection(asyncio.Protocol):
    """See the module docstring."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: str | None = None

    # -- state ---------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self._transport is not None and not self._closed.done()

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    # -- asyncio callbacks -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        try:
            while True:
                size = ldapwire.frame_length(buffer)
                if size is None or len(buffer) < size:
                    if size is not None and size > limits.LDAP_MAX_RESPONSE_BYTES:
                        raise ldapwire.LdapWireError("message too large")
                    return
                message = ldapwire.decode_message(bytes(buffer[:size]))
                del buffer[:size]
                self._dispatch(message)
        except ldapwire.LdapWireError as exc:
            self._fail(f"undecodable answer: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost ({exc})" if exc is not None else "connection closed by the server")

    # -- operations ------------------------------------------------------------

    def _allocate(self) -> int:
        self._next_id = self._next_id % 0x7FFFFFFE + 1
        while self._next_id in self._pending:
            self._next_id = self._next_id % 0x7FFFFFFE + 1
        return self._next_id

    def stream(self, encode: Callable[[int], bytes], handler: Handler) -> int:
        """Send the request ``encode(message_id)``; *handler* gets every answer until it returns True."""
        if not self.usable or self._transport is None:
            raise LdapConnectionError(self.error or "connection not open")
        message_id = self._allocate()
        self._pending[message_id] = _Pending(handler)
        self._transport.write(encode(message_id))
        return message_id

    async def operation(self, encode: Callable[[int], bytes]) -> list[ldapwire.Message]:
        """Send one request and return every message that answers it, the final result last.

        LdapConnectionError when the connection breaks meanwhile.  If the
        caller is cancelled (a deadline), the request is abandoned.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        collected: list[ldapwire.Message] = []

        def handler(message: ldapwire.Message) -> bool:
            collected.append(message)
            if message.kind in ("done", "bind", "extended"):
                if not future.done():
                    future.set_result(None)
                return True
            return False

        message_id = self.stream(encode, handler)
        self._pending[message_id].future = future
        try:
            await future
        except asyncio.CancelledError:
            self.abandon(message_id)
            raise
        return collected

    def pause_reading(self) -> None:
        """Stop reading from the server (back-pressure: its answers wait in the socket buffers)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def abandon(self, message_id: int) -> None:
        """Stop waiting for *message_id* and ask the server to drop it (late answers are ignored)."""
        if self._pending.pop(message_id, None) is not None and self.usable and self._transport is not None:
            self._transport.write(ldapwire.encode_abandon(self._allocate(), message_id))

    def close(self) -> None:
        """Unbind and close; operations in flight fail."""
        if self._transport is not None and not self._transport.is_closing():
            with contextlib.suppress(Exception):   # the transport may be half gone already
                self._transport.write(ldapwire.encode_unbind(self._allocate()))
            self._transport.close()
        self._fail("connection closed")

    def _dispatch(self, message: ldapwire.Message) -> None:
        if message.message_id == 0:
            # RFC 4511 4.4.1: the server is about to close the connection.
            why = printable(message.diagnostic.decode("utf-8", "replace"))
            self._fail(f"notice of disconnection: {ldapwire.result_name(message.result_code)} {why}".rstrip())
            if self._transport is not None:
                self._transport.close()
            return
        pending = self._pending.get(message.message_id)
        if pending is None:
            return   # the answer to an operation we abandoned
        if pending.handler(message):
            self._pending.pop(message.message_id, None)

    def _fail(self, why: str) -> None:
        if self._closed.done():
            return
        self.error = why
        self._closed.set_result(None)
        pending, self._pending = self._pending, {}
        error = LdapConnectionError(why)
        # A stream's owner learns it from wait_closed().
        for item in pending.values():
            if item.future is not None and not item.future.done():
                item.future.set_exception(error)

    def set_transport(self, transport: asyncio.Transport) -> None:
        """The TLS transport that replaces the plain one after StartTLS."""
        self._transport = transport


async def open_connection(point: Endpoint, bind_dn: str | None, password: str | None,
                          what: str = "") -> LdapConnection:
    """Connect, secure and bind (LdapConnectionError naming the step); the caller bounds the time."""
    loop = asyncio.get_running_loop()
    ldaps = point.ssl_context is not None and not point.start_tls
    try:
        if point.path:
            transport, conn = await loop.create_unix_connection(lambda: LdapConnection(point), point.path)
        else:
            transport, conn = await loop.create_connection(
                lambda: LdapConnection(point), point.host, point.port,
                ssl=point.ssl_context if ldaps else None, server_hostname=point.host if ldaps else None)
    except ssl.SSLError as exc:
        raise LdapConnectionError(f"TLS: {exc.reason or exc}") from None
    except OSError as exc:
        raise LdapConnectionError(f"connect: {exc.strerror or exc}") from None
    try:
        if point.start_tls and point.ssl_context is not None:
            answer = (await conn.operation(ldapwire.encode_start_tls))[-1]
            if answer.result_code != ldapwire.RESULT_SUCCESS:
                raise LdapConnectionError(f"StartTLS refused: {_result(answer)}")
            try:
                secured = await loop.start_tls(transport, conn, point.ssl_context, server_hostname=point.host)
            except (ssl.SSLError, OSError) as exc:
                raise LdapConnectionError(f"StartTLS: {getattr(exc, 'reason', None) or exc}") from None
            if secured is None:
                raise LdapConnectionError("StartTLS: the connection closed")
            conn.set_transport(secured)
        if bind_dn is not None:
            answer = (await conn.operation(lambda mid: ldapwire.encode_bind(mid, bind_dn, password or "")))[-1]
            if answer.kind != "bind" or answer.result_code != ldapwire.RESULT_SUCCESS:
                raise LdapConnectionError(f"bind as {printable(bind_dn)} failed: {_result(answer)}")
    except BaseException:
        conn.close()
        raise
    return conn


def _result(message: ldapwire.Message) -> str:
    diagnostic = printable(message.diagnostic.decode("utf-8", "replace"))
    return f"{ldapwire.result_name(message.result_code)} {diagnostic}".rstrip()
