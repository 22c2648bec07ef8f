"""Listeners: sockets, connections, limits; the same for every protocol.

DESCRIPTION
    :func:`bind` opens a listening socket for one ``listen`` entry (done
    before privileges are dropped).  :class:`Listener` serves it: each
    accepted connection gets a :class:`Connection` (an asyncio Protocol)
    that feeds received bytes to the protocol's framer, starts one
    ``answer`` task per request and writes the replies strictly in request
    order.  A slow lookup on one connection never delays another; on one
    connection, later requests are answered as soon as the earlier ones are.

LIMITS
    ``max_connections`` per listener: at the limit, a new connection is
    admitted by closing the connection that has been idle the longest
    (nothing in flight, no request half-read), so that idle clients (a
    large Postfix process limit, one misbehaving local client) can never
    lock fresh ones out; only when every connection is busy is the new one
    closed at once, with a warning; ``PIPELINE_DEPTH`` requests in flight per connection (then
    reading pauses); ``idle_timeout`` per listener for connections with
    nothing in flight, and the same time for a request that is still
    incomplete (slowloris).  A client that does not read its replies stops
    being read from (write buffer limits).

DIAGNOSTICS
    Framing errors and limit hits are logged as warnings with the peer;
    idle closes at debug level.  This is the one place where an unexpected
    exception while answering (a bug below a protocol) becomes the
    protocol's temporary failure: it is logged once with its traceback,
    the client gets socketmap ``TEMP``, tcp_table ``400``, policy's
    ``tempfail`` action or readsocket ``TEMP``, and the connection stays
    open.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import grp
import logging
import os
import pwd
import socket
import stat
from typing import Any, cast

from axpolicy import limits
from axpolicy.config import ListenConfig
from axpolicy.wire import FrameError, Service

logger = logging.getLogger(__name__)


def bind(spec: ListenConfig) -> socket.socket:
    """Open the listening socket for *spec* (OSError with a clear message)."""
    if spec.family == "inet":
        family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((spec.host, spec.port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {spec.address}: {exc.strerror}") from None
    else:
        sock = _bind_unix(spec)
    sock.listen(limits.LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _bind_unix(spec: ListenConfig) -> socket.socket:
    path = spec.path
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise OSError(17, f"cannot listen on {spec.address}: exists and is not a socket")
        # A socket file: refuse if somebody still answers on it, else it is
        # left over from a crash and can go.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise OSError(98, f"cannot listen on {spec.address}: another process is listening")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if spec.mode is not None:
            os.chmod(path, spec.mode)
        if spec.owner is not None or spec.group is not None:
            uid = pwd.getpwnam(spec.owner).pw_uid if spec.owner is not None else -1
            gid = grp.getgrnam(spec.group).gr_gid if spec.group is not None else -1
            os.chown(path, uid, gid)
    except KeyError as exc:
        sock.close()
        raise OSError(22, f"cannot listen on {spec.address}: no such user or group {exc}") from None
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {spec.address}: {exc.strerror}") from None
    return sock


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}"
    return "unix"


class Connection(asyncio.Protocol):
    """One client connection (see module docstring)."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._framer = listener.service.framer()
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._queue: collections.deque[asyncio.Future[bytes | None]] = collections.deque()
        self._last_activity = self._loop.time()
        self._partial_since: float | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._eof = False
        self._final_reply: bytes | None = None
        self._closing = False
        self.peer = "?"

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # stream sockets only
        self.peer = _peer(transport)
        if not self._listener.admit(self):
            self._closing = True
            self._transport.abort()
            return
        self._transport.set_write_buffer_limits(high=256 * 1024)
        greeting = self._listener.service.greeting()
        if greeting is not None:
            self._transport.write(greeting)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._listener.forget(self)
        # Answers still being looked up are not cancelled: another client
        # may be waiting for the same lookup (the router runs it in the
        # task of the request that asked first).  They end within the user
        # map's deadline and their replies are dropped (_flush).
        self._queue.clear()

    def data_received(self, data: bytes) -> None:
        if self._closing or self._eof:
            return
        self._last_activity = now = self._loop.time()
        framer = self._framer
        # Nothing owed and no request half-read (_partial_since mirrors
        # framer.partial after every read, without the call).
        at_boundary = not self._queue and self._partial_since is None
        if at_boundary and self._transport is not None:
            # Fastest path: the same whole request was answered recently and
            # the answer cannot have changed (axpolicy/replay.py).
            reply = self._listener.service.replay(data)
            if reply is not None:
                self._transport.write(reply)
                return
        try:
            requests = framer.feed(data)
        except FrameError as exc:
            self._protocol_error(exc)
            return
        whole = data if at_boundary and len(requests) == 1 and not framer.partial else None
        for request in requests:
            self._submit(request, whole)
        if framer.partial:
            if self._partial_since is None:
                self._partial_since = now
        else:
            self._partial_since = None
        if len(self._queue) >= limits.PIPELINE_DEPTH and not self._reading_paused and self._transport:
            self._transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool:
        if self._eof:
            return True
        self._eof = True
        try:
            requests = self._framer.eof()
        except FrameError as exc:
            self._protocol_error(exc)
            return True
        for request in requests:
            self._submit(request)
        self._flush()
        # Keep the transport open until every reply is written.
        return True

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._transport is not None and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._maybe_resume_reading()

    # -- requests and replies ----------------------------------------------

    @property
    def _service(self) -> Service:
        # Read at each use: a reload swaps the listener's service (same
        # protocol, new router) under established connections.
        return self._listener.service

    def _submit(self, request: Any, whole: bytes | None = None) -> None:
        service = self._service
        try:
            reply = service.answer(request, whole)
        except Exception as exc:  # noqa: BLE001 - a bug must become a temporary failure
            reply = self._internal_error(exc)
        if reply is None or isinstance(reply, bytes):
            if not self._queue and self._transport is not None:
                # Fast path: nothing owed before this request and the answer
                # is known without I/O (a cache hit): reply in this callback.
                if reply is None:
                    self.close()
                    return
                self._transport.write(reply)
                if service.close_after_reply:
                    self.close()
                return
            ready: asyncio.Future[bytes | None] = self._loop.create_future()
            ready.set_result(reply)
            self._queue.append(ready)
            ready.add_done_callback(self._flush)
            return
        task = asyncio.ensure_future(reply)
        self._queue.append(task)
        task.add_done_callback(self._flush)

    def _flush(self, _: object = None) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        while self._queue and self._queue[0].done():
            task = self._queue.popleft()
            if task.cancelled():
                continue
            error = task.exception()
            reply = task.result() if error is None else self._internal_error(error)
            if reply is None:
                self.close()
                return
            transport.write(reply)
            self._last_activity = self._loop.time()
            if self._service.close_after_reply:
                self.close()
                return
        if self._eof and not self._queue:
            if self._final_reply is not None:
                transport.write(self._final_reply)
            self.close()
            return
        self._maybe_resume_reading()

    def _internal_error(self, error: BaseException) -> bytes | None:
        """The temporary-failure reply for a request whose answer raised *error* (logged once)."""
        logger.error("%s from %s: unexpected error while answering; answering temporary failure",
                     self._service.protocol, self.peer, exc_info=error)
        self._listener.internal_errors += 1
        return self._service.tempfail_reply

    def _maybe_resume_reading(self) -> None:
        if (self._reading_paused and not self._writing_paused and not self._eof
                and len(self._queue) < limits.PIPELINE_DEPTH // 2 and self._transport is not None):
            self._transport.resume_reading()
            self._reading_paused = False

    def _protocol_error(self, exc: FrameError) -> None:
        logger.warning("%s from %s: %s; closing", self._service.protocol, self.peer, exc)
        self._listener.protocol_errors += 1
        # Nothing more is read; replies already owed go out first, in
        # order, then this one, then the connection closes.
        self._final_reply = exc.reply
        self._eof = True
        if self._transport is not None and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True
        self._flush()

    def close(self) -> None:
        """Close after whatever has been written (not waiting for pending answers)."""
        if not self._closing and self._transport is not None:
            self._closing = True
            self._transport.close()

    def sweep(self, now: float, idle_timeout: float) -> None:
        """Close the connection if it has been idle or stalled too long."""
        if self._closing:
            return
        if self._partial_since is not None and now - self._partial_since > idle_timeout:
            logger.warning("%s from %s: request incomplete after %gs; closing",
                           self._service.protocol, self.peer, idle_timeout)
            self._listener.protocol_errors += 1
            self.close()
        elif not self._queue and self._partial_since is None and now - self._last_activity > idle_timeout:
            logger.debug("%s from %s: idle for %gs; closing", self._service.protocol, self.peer, idle_timeout)
            self.close()

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing in flight and no request half-read: closing it loses nothing."""
        return not self._queue and self._partial_since is None and not self._closing

    @property
    def last_activity(self) -> float:
        return self._last_activity


class Listener:
    """Serves one listening socket with one protocol service."""

    def __init__(self, spec: ListenConfig, service: Service, sock: socket.socket) -> None:
        self.spec = spec
        self.service = service
        self.sock = sock
        # Insertion-ordered: among connections idle since the same moment,
        # the oldest is closed first.
        self.connections: dict[Connection, None] = {}
        self.protocol_errors = 0
        self.refused = 0
        self.evicted = 0
        self.internal_errors = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def admit(self, connection: Connection) -> bool:
        """Take *connection* in; at the limit, close the longest idle one for it, or refuse it."""
        if len(self.connections) >= self.spec.max_connections:
            idle = [c for c in self.connections if c.idle]
            if not idle:
                self.refused += 1
                logger.warning("%s on %s: %d connections, all busy; refusing %s", self.spec.protocol,
                               self.spec.address, len(self.connections), connection.peer)
                return False
            oldest = min(idle, key=lambda c: c.last_activity)
            self.evicted += 1
            logger.info("%s on %s: %d connections; closing the longest idle (%s) for %s", self.spec.protocol,
                        self.spec.address, len(self.connections), oldest.peer, connection.peer)
            self.forget(oldest)
            oldest.close()
        self.connections[connection] = None
        return True

    def forget(self, connection: Connection) -> None:
        self.connections.pop(connection, None)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # asyncio calls listen() again on a socket it is given, with its
        # own default of 100 unless told otherwise.
        if self.spec.family == "unix":
            self._server = await loop.create_unix_server(lambda: Connection(self), sock=self.sock,
                                                         backlog=limits.LISTEN_BACKLOG)
        else:
            self._server = await loop.create_server(lambda: Connection(self), sock=self.sock,
                                                    backlog=limits.LISTEN_BACKLOG)
        self._sweeper = asyncio.create_task(self._sweep())
        logger.info("listening on %s (%s)", self.spec.address, self.spec.protocol)

    def update(self, spec: ListenConfig, service: Service) -> None:
        """Take a reloaded configuration for the same address and protocol."""
        self.spec = spec
        self.service = service

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(limits.SWEEP_INTERVAL_SECONDS, self.spec.idle_timeout / 4))
            now = loop.time()
            for connection in list(self.connections):
                connection.sweep(now, self.spec.idle_timeout)

    async def stop(self, grace: float, force: asyncio.Event | None = None, unlink: bool = True) -> None:
        """Stop accepting; let requests in flight finish for up to *grace* seconds; close.

        Setting *force* ends the wait at once.  *unlink* False keeps a unix
        socket's file: another listener took the socket over.
        """
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            if force is not None and force.is_set():
                break
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.close()
        if self.spec.family == "unix" and unlink:
            # After a privilege drop this may fail; the next start replaces
            # the stale socket.
            with contextlib.suppress(OSError):
                os.unlink(self.spec.path)
        logger.info("stopped listening on %s", self.spec.address)
