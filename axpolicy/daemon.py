"""``axpolicy serve``: start-up, privileges, reload, shutdown.

DESCRIPTION
    Start-up order, each step before the next:

    1. load and validate the configuration (the bind password file is read
       here, while still root);
    2. open the user maps (a file map is read);
    3. take the pidfile lock (a second instance stops here);
    4. bind every listener and the metrics socket (ports below 1024 and
       sockets under /var/spool/postfix may need root);
    5. with ``--daemon``, detach (python-daemon's DaemonContext: fork,
       setsid, umask 022, working directory /, the sockets and the pidfile
       preserved) and write the daemon's pid;
    6. import everything the daemon may import later and make the event
       loop (uvloop) and its thread pool (:func:`preload`): after the drop
       the interpreter's own files may be unreadable;
    7. drop to ``user``/``group``;
    8. start the event loop and answer.

    Secrets are kept from step 1: a reload reuses a secret whose file the
    unprivileged process can no longer read, as long as its path is the
    same (and says so in the log).

    Started as root, axpolicy refuses to keep running as root unless the
    configuration says ``user: root``.

SIGNALS
    SIGHUP   reload the configuration: a valid file is applied without
             dropping established connections or requests in flight
             (listeners added, removed or updated; user maps with an
             unchanged configuration keep their connections; the cache is
             kept unless user maps, domains, delimiter or cache settings
             changed); an invalid one is logged and the running
             configuration stays.  ``user``, ``group``, ``pidfile`` and
             ``metrics`` take effect at the next restart.
    SIGTERM  stop accepting, let requests in flight finish for up to
    SIGINT   SHUTDOWN_GRACE_SECONDS, remove unix sockets and the pidfile,
             exit 0.  A second signal ends the wait at once.

DIAGNOSTICS
    Exit status 0 after a clean stop; 78 (EX_CONFIG) for a bad
    configuration, a bad user-map file or a refused root start; 71
    (EX_OSERR) when a socket cannot be bound, the pidfile is locked by
    another instance or privileges cannot be dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import importlib.util
import logging
import os
import pwd
import resource
import signal
import socket
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from axpolicy import log, statedir
from axpolicy.config import Config, ConfigError, ListenConfig, Secrets, digest, load, warnings
from axpolicy.dovecot import DovecotAuthService
from axpolicy.filemap import FileMapError
from axpolicy.pidfile import PidFile, check_pidfile
from axpolicy.policy import PolicyService
from axpolicy.readsocket import ReadsocketService
from axpolicy.router import Router
from axpolicy.server import Listener, bind
from axpolicy.socketmap import SocketmapService
from axpolicy.tcptable import TcpTableService
from axpolicy.wire import Service

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0
# How long an old router stays open after a reload for requests in flight.
RELOAD_GRACE_SECONDS = 30.0

EXIT_OK = 0
EXIT_OSERR = os.EX_OSERR
EXIT_CONFIG = os.EX_CONFIG


class StartupError(Exception):
    """Start-up cannot continue; ``code`` is the exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def make_service(spec: ListenConfig, router: Router, config: Config) -> Service:
    """The protocol service for one listener."""
    if spec.protocol == "policy":
        return PolicyService(router, config.policy)
    if spec.protocol == "socketmap":
        return SocketmapService(router)
    if spec.protocol == "dovecot_auth":
        if router.authenticator is None:
            raise ConfigError("dovecot_auth listener without auth")  # prevented by config validation
        return DovecotAuthService(router.authenticator)
    if spec.protocol == "tcp_table":
        if spec.map is None:
            raise ConfigError("tcp_table listener without map")  # prevented by config validation
        return TcpTableService(router, spec.map)
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


def drop_privileges(user: str | None, group: str | None) -> None:
    """Become *user* (and *group*, else the user's primary group) for good."""
    if user is None:
        return
    account = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group is not None else account.pw_gid
    if os.geteuid() != 0:
        # Only root can switch users; anyone else already runs unprivileged.
        if os.geteuid() != account.pw_uid:
            logger.warning("user: %s ignored: not started as root, running as uid %d", user, os.geteuid())
        return
    os.initgroups(user, gid)
    os.setgid(gid)
    os.setuid(account.pw_uid)
    if account.pw_uid != 0:
        with contextlib.suppress(PermissionError):
            os.setuid(0)
            raise PermissionError(1, "privileges could be regained after dropping them")
    logger.info("privileges dropped: now uid %d, gid %d", os.getuid(), os.getgid())


def raise_file_limit() -> None:
    """Allow as many descriptors as the hard limit permits (up to 65536).

    Every client connection is a descriptor; a soft limit of 1024 (the
    Linux default) would cap connections well below max_connections.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed, else the standard loop (said in the log either way)."""
    if importlib.util.find_spec("uvloop") is None:
        logger.info("uvloop is not installed; using asyncio's own event loop")
        return asyncio.new_event_loop()
    try:
        import uvloop
    except Exception as exc:  # noqa: BLE001 - installed but broken: say so, run without it
        logger.warning("uvloop is installed but cannot be imported (%s); using asyncio's own event loop", exc)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def preload(config: Config) -> asyncio.AbstractEventLoop:
    """Import now, as root, everything the daemon may import later, and make its event loop.

    After the privilege drop the process may no longer be able to read its
    own Python: pyenv's and CI's interpreters live under a 0700 home, and a
    lazy import there fails (``No module named 'concurrent.futures.thread'``
    from the first ``run_in_executor``).  So every module a lookup, a
    reload or the metrics endpoint may need is imported here, the loop
    (uvloop) is made here, and so is its default executor.
    """
    import concurrent.futures.thread  # noqa: F401 - run_in_executor's executor, imported lazily by asyncio

    import axpolicy.filemap  # noqa: F401 - a reload may add a map of either type
    import axpolicy.ldapmap  # noqa: F401 - and with it lmdb, for replicas
    with contextlib.suppress(ImportError):
        importlib.import_module("lmdb._envid")   # lmdb.open imports it on first use
    if importlib.util.find_spec("prometheus_client") is not None:
        import axpolicy.metrics  # noqa: F401
    loop = new_event_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(thread_name_prefix="axpolicy"))
    return loop


def listening_address(spec: ListenConfig, sock: socket.socket | None = None) -> tuple[str, Any]:
    """Where *spec* listens, resolved (``localhost`` and ``127.0.0.1`` are one address); OSError.

    With *sock* (a bound listener), the address it is really bound to.
    Reloads match listeners by this, never by how the address is written.
    """
    if spec.family == "unix":
        return ("unix", os.path.realpath(spec.path))
    if sock is not None:
        return ("inet", tuple(sock.getsockname()[:2]))
    family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(spec.host, spec.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot resolve {spec.address}: {exc.strerror}") from None
    return ("inet", tuple(infos[0][4][:2]))


@dataclass
class _Prepared:
    config: Config
    router: Router
    bound: list[tuple[ListenConfig, socket.socket]]
    metrics_sock: socket.socket | None
    pidfile: PidFile | None
    secrets: Secrets


class Daemon:
    """The running server: listeners, router, metrics, signals."""

    def __init__(self, config_path: str, prepared: _Prepared) -> None:
        self.config_path = config_path
        self.config = prepared.config
        self.router = prepared.router
        self.digest = digest(prepared.config)
        self.listeners = [Listener(spec, make_service(spec, prepared.router, prepared.config), sock)
                          for spec, sock in prepared.bound]
        self._metrics_sock = prepared.metrics_sock
        self._secrets = prepared.secrets
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reloading = False
        self._background: set[asyncio.Task[Any]] = set()

    def state(self) -> tuple[Router, list[Listener], str]:
        return self.router, self.listeners, self.digest

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, reloading on SIGHUP."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        self.router.start()
        for listener in self.listeners:
            await listener.start()
        metrics = None
        if self._metrics_sock is not None:
            from axpolicy.metrics import MetricsServer

            metrics = MetricsServer(self.state)
            await metrics.start(self._metrics_sock)
        logger.info("axpolicy ready: %d listener(s), configuration %s, digest %s", len(self.listeners),
                    self.config_path, self.digest[:12])
        await self._stop.wait()
        logger.info("stopping: finishing requests in flight (up to %gs)", SHUTDOWN_GRACE_SECONDS)
        await asyncio.gather(*(listener.stop(SHUTDOWN_GRACE_SECONDS, self._force) for listener in self.listeners))
        if metrics is not None:
            await metrics.stop()
        background = list(self._background)
        for task in background:
            task.cancel()
        # A retiring router closes its user maps (replicas) as it is cancelled.
        await asyncio.gather(*background, return_exceptions=True)
        await self.router.close()
        logger.info("stopped")

    def _on_stop(self, signum: int) -> None:
        if self._stop.is_set():
            logger.warning("%s again: stopping now", signal.Signals(signum).name)
            self._force.set()
        self._stop.set()

    def _on_reload(self) -> None:
        if self._reloading or self._stop.is_set():
            logger.warning("SIGHUP ignored: a reload or shutdown is in progress")
            return
        self._spawn(self.reload())

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload(self) -> bool:
        """Apply the configuration file again; False (and logged) when it is invalid."""
        self._reloading = True
        try:
            return await self._reload()
        finally:
            self._reloading = False

    async def _reload(self) -> bool:
        try:
            new = load(self.config_path, self._secrets)
        except ConfigError as exc:
            logger.error("reload failed, keeping the running configuration: %s", exc)
            return False
        finally:
            for note in self._secrets.kept:
                logger.warning("reload: %s", note)
            self._secrets.kept.clear()
        for key in ("user", "group", "pidfile", "metrics"):
            if getattr(new, key) != getattr(self.config, key):
                logger.warning("reload: %s changed; it takes effect at the next restart", key)
        try:
            router = Router.open(new, previous=self.router)
        except FileMapError as exc:
            logger.error("reload failed, keeping the running configuration: %s", exc)
            return False
        plan = await self._plan_listeners(new, router)
        if plan is None:
            return False
        router.start()
        if new.log != self.config.log:
            log.configure(new.log, stderr_ok=sys.stderr is not None and not sys.stderr.closed)
        for warning in warnings(new):
            logger.warning("%s", warning)
        listeners: list[Listener] = []
        kept: set[int] = set()
        for spec, old, sock in plan:
            service = make_service(spec, router, new)
            if sock is None:
                if old is not None:   # always: a plan step without a socket keeps a listener
                    old.update(spec, service)
                    listeners.append(old)
                    kept.add(id(old))
                continue
            if old is not None:
                # The address changes protocol: the new listener took over
                # the socket; the old one finishes its requests elsewhere.
                self._spawn(old.stop(SHUTDOWN_GRACE_SECONDS, self._force, unlink=False))
                kept.add(id(old))
            listener = Listener(spec, service, sock)
            await listener.start()
            listeners.append(listener)
        for removed in self.listeners:
            if id(removed) not in kept:
                self._spawn(removed.stop(SHUTDOWN_GRACE_SECONDS, self._force))
        previous = self.router
        self.listeners, self.router, self.config, self.digest = listeners, router, new, digest(new)
        self._spawn(self._retire(previous, router))
        logger.info("reloaded %s: %d listener(s), digest %s, cache %s", self.config_path, len(listeners),
                    self.digest[:12], "kept" if router.cache is previous.cache else "emptied")
        return True

    async def _plan_listeners(self, new: Config, router: Router
                              ) -> list[tuple[ListenConfig, Listener | None, socket.socket | None]] | None:
        """What serves each new listener: a running one (same address, same protocol), the socket of
        one whose protocol changes, or a socket bound now.  None (logged, nothing changed) when an
        address cannot be resolved or bound: a reload applies whole or not at all, so that a port
        never stops answering because its new spelling could not be bound.
        """
        running: dict[tuple[str, Any], Listener] = {}
        for listener in self.listeners:
            with contextlib.suppress(OSError):
                running[listening_address(listener.spec, listener.sock)] = listener
        plan: list[tuple[ListenConfig, Listener | None, socket.socket | None]] = []
        fresh: list[socket.socket] = []
        try:
            for spec in new.listen:
                old = running.pop(listening_address(spec), None)
                if old is not None and old.spec.protocol == spec.protocol:
                    plan.append((spec, old, None))
                    continue
                sock = old.sock.dup() if old is not None else bind(spec)
                fresh.append(sock)
                plan.append((spec, old, sock))
        except OSError as exc:
            for sock in fresh:
                sock.close()
            await router.close(keep=self.router)
            logger.error("reload failed, keeping the running configuration and every listener: %s",
                         exc.strerror or exc)
            return None
        return plan

    async def _retire(self, old: Router, new: Router) -> None:
        try:
            await asyncio.sleep(RELOAD_GRACE_SECONDS)
        finally:
            await old.close(keep=new)


def check(config: Config, pidfile_path: str | None = None) -> Router:
    """Everything ``serve`` refuses before it binds, and the router it would serve (StartupError).

    ``check-config`` runs exactly this, so that it refuses what ``serve``
    refuses: no listeners, a root start without ``user``, metrics without
    prometheus-client, a pidfile that is not a regular file, a user-map
    file that cannot be read (missing, a FIFO, a device, invalid).
    """
    if not config.listen:
        raise StartupError(EXIT_CONFIG, "listen: no listeners configured, nothing to serve")
    if os.geteuid() == 0 and config.user is None:
        raise StartupError(EXIT_CONFIG, "user: required when axpolicy is started as root (it drops to this "
                                        "user after binding; write user: root to run as root on purpose)")
    if config.metrics.listen is not None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise StartupError(EXIT_CONFIG, "metrics.listen: prometheus-client is not installed "
                                            "(pip install 'axpolicy[metrics]')") from None
    path = pidfile_path or config.pidfile
    if path is not None:
        try:
            check_pidfile(path)
        except OSError as exc:
            raise StartupError(EXIT_CONFIG, f"pidfile: {exc.strerror or exc}") from None
    state_problem = statedir.problem(config)
    if state_problem is not None:
        raise StartupError(EXIT_CONFIG, state_problem)
    try:
        return Router.open(config)
    except FileMapError as exc:
        raise StartupError(EXIT_CONFIG, str(exc)) from None


def _prepare(config_path: str, pidfile_path: str | None) -> _Prepared:
    secrets = Secrets()
    try:
        config = load(config_path, secrets)
    except ConfigError as exc:
        raise StartupError(EXIT_CONFIG, str(exc)) from None
    log.configure(config.log)
    raise_file_limit()
    for warning in warnings(config):
        logger.warning("%s", warning)
    if config.user == "root":
        logger.warning("user: root: axpolicy will answer as root")
    router = check(config, pidfile_path)
    try:
        statedir.prepare(config)
    except OSError as exc:
        raise StartupError(EXIT_CONFIG, f"state_dir: {config.state_dir}: {exc.strerror or exc}") from None
    pidfile = None
    path = pidfile_path or config.pidfile
    if path is not None:
        pidfile = PidFile(path)
        try:
            pidfile.acquire()
        except OSError as exc:
            raise StartupError(EXIT_OSERR, f"pidfile {path}: {exc.strerror or exc}") from None
    try:
        bound = bind_all(config)
        metrics_sock = None
        if config.metrics.listen is not None:
            from axpolicy.metrics import bind as bind_metrics

            metrics_sock = bind_metrics(config.metrics.host, config.metrics.port)
    except OSError as exc:
        if pidfile is not None:
            pidfile.release()
        raise StartupError(EXIT_OSERR, str(exc.strerror or exc)) from None
    return _Prepared(config, router, bound, metrics_sock, pidfile, secrets)


def serve(config_path: str, *, daemonize: bool = False, pidfile_path: str | None = None) -> int:
    """Run ``axpolicy serve``; returns the exit status."""
    try:
        prepared = _prepare(config_path, pidfile_path)
    except StartupError as exc:
        print(f"axpolicy: {exc}", file=sys.stderr)
        return exc.code
    pidfile = prepared.pidfile
    if daemonize:
        import daemon as python_daemon

        keep = [sock.fileno() for _, sock in prepared.bound]
        if prepared.metrics_sock is not None:
            keep.append(prepared.metrics_sock.fileno())
        if pidfile is not None and pidfile.fd is not None:
            keep.append(pidfile.fd)
        context = python_daemon.DaemonContext(working_directory="/", umask=0o022, detach_process=True,
                                              files_preserve=keep, prevent_core=True, signal_map={})
        context.open()
        log.configure(prepared.config.log, stderr_ok=False)
    try:
        if pidfile is not None:
            pidfile.write(os.getpid())
        loop = preload(prepared.config)
        try:
            drop_privileges(prepared.config.user, prepared.config.group)
        except (OSError, KeyError) as exc:
            logger.critical("cannot drop privileges: %s", exc)
            loop.close()
            return EXIT_OSERR
        try:
            server = loop.run_until_complete(_make_daemon(config_path, prepared))
            loop.run_until_complete(server.run())
        finally:
            loop.close()
    finally:
        if pidfile is not None:
            pidfile.release()
    return EXIT_OK


async def _make_daemon(config_path: str, prepared: _Prepared) -> Daemon:
    # Created inside the running loop: the daemon's events belong to it.
    return Daemon(config_path, prepared)
