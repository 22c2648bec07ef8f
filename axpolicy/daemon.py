"""``axpolicy serve``: bind, run the listeners, stop cleanly.

DESCRIPTION
    Start-up order: the configuration is validated, the user maps are
    opened (a file map is read, LDAP secrets were read with the
    configuration), every listening socket is bound, and only then does the
    event loop start answering.  SIGTERM and SIGINT stop accepting, let
    requests in flight finish for ``SHUTDOWN_GRACE_SECONDS``, remove unix
    sockets and exit 0.

DIAGNOSTICS
    Exit 78 (EX_CONFIG) for a bad configuration or user-map file, 71
    (EX_OSERR) when a socket cannot be bound.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from axpolicy.config import Config, ListenConfig
from axpolicy.policy import PolicyService
from axpolicy.router import Router
from axpolicy.server import Listener, bind
from axpolicy.socketmap import SocketmapService
from axpolicy.tcptable import TcpTableService
from axpolicy.wire import Service

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0


def make_service(spec: ListenConfig, router: Router, config: Config) -> Service:
    """The protocol service for one listener."""
    if spec.protocol == "policy":
        return PolicyService(router, config.policy)
    if spec.protocol == "socketmap":
        return SocketmapService(router)
    if spec.protocol == "tcp_table":
        assert spec.map is not None  # guaranteed by config validation
        return TcpTableService(router, spec.map)
    from axpolicy.readsocket import ReadsocketService

    return ReadsocketService(router, spec.map)


def bind_all(config: Config) -> list[tuple[ListenConfig, socket.socket]]:
    """Bind every configured listener; on failure close what was bound."""
    bound: list[tuple[ListenConfig, socket.socket]] = []
    try:
        for spec in config.listen:
            bound.append((spec, bind(spec)))
    except OSError:
        for _, sock in bound:
            sock.close()
        raise
    return bound


async def run(config: Config, bound: list[tuple[ListenConfig, socket.socket]], router: Router) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    listeners = [Listener(spec, make_service(spec, router, config), sock) for spec, sock in bound]
    for listener in listeners:
        await listener.start()
    logger.info("axpolicy ready: %d listener(s)", len(listeners))
    await stop.wait()
    logger.info("stopping: finishing requests in flight")
    await asyncio.gather(*(listener.stop(SHUTDOWN_GRACE_SECONDS) for listener in listeners))
    await router.close()
    logger.info("stopped")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed, else the standard loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
