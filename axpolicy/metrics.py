"""Prometheus metrics and a health URL, served over HTTP by the daemon.

DESCRIPTION
    Off unless ``metrics.listen`` is configured.  ``GET /metrics`` returns
    the Prometheus text format; ``GET /health`` asks every user map a probe
    question (``axpolicy-health-probe@health.invalid``, bypassing the
    cache) and answers 200 when each could answer (found or not found), 503
    when one had a temporary failure.  Nothing else is served.

    Values are read from plain counters at scrape time (:mod:`axpolicy.stats`,
    the cache, the LDAP maps, the listeners), so the request path never
    touches prometheus_client.

METRICS
    axpolicy_requests_total{protocol,map,outcome}
    axpolicy_request_duration_seconds{protocol} (histogram)
    axpolicy_cache_hits_total, axpolicy_cache_misses_total,
    axpolicy_cache_stale_answers_total, axpolicy_cache_entries
    axpolicy_ldap_searches_total{usermap,server}
    axpolicy_ldap_errors_total{usermap,server}
    axpolicy_ldap_failovers_total{usermap,server}  (times a server was skipped)
    axpolicy_ldap_overloaded_total{usermap}
    axpolicy_replica_ready{usermap}  (1 while the replica answers)
    axpolicy_replica_entries{usermap}
    axpolicy_replica_refreshes_total{usermap}, axpolicy_replica_updates_total{usermap},
    axpolicy_replica_losses_total{usermap}
    axpolicy_connections{listener,protocol}  (open now)
    axpolicy_connections_evicted_total{listener,protocol}  (idle ones closed to admit new ones)
    axpolicy_connections_refused_total{listener,protocol}  (at max_connections with every one busy)
    axpolicy_auth_total{outcome}  (SMTP AUTH: ok, fail, temp)
    axpolicy_internal_errors_total{listener,protocol}  (requests answered "temporary failure" for a bug)
    axpolicy_protocol_errors_total{listener,protocol}
    axpolicy_config_info{digest,version}  (always 1)

LIMITS
    Requests are read with a 4 KiB limit and a 5 s deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from axpolicy import __version__
from axpolicy.ldapmap import LdapUserMap
from axpolicy.result import Status
from axpolicy.stats import LATENCY_BUCKETS, STATS

if TYPE_CHECKING:
    from axpolicy.router import Router
    from axpolicy.server import Listener

logger = logging.getLogger(__name__)

HEALTH_PROBE = "axpolicy-health-probe@health.invalid"
_MAX_REQUEST_BYTES = 4096
_REQUEST_TIMEOUT_SECONDS = 5.0


class _Collector:
    """Builds every metric family from the daemon's live objects."""

    def __init__(self, state: Callable[[], tuple[Router, list[Listener], str]]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        router, listeners, digest = self._state()
        requests = CounterMetricFamily("axpolicy_requests", "Requests answered", labels=["protocol", "map", "outcome"])
        for (protocol, map_name, outcome), count in sorted(STATS.requests.items()):
            requests.add_metric([protocol, map_name, outcome], count)
        yield requests
        latency = HistogramMetricFamily("axpolicy_request_duration_seconds", "Time to answer a request",
                                        labels=["protocol"])
        for protocol, histogram in sorted(STATS.latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), histogram.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric([protocol], buckets, histogram.total)
        yield latency
        cache = router.cache
        yield CounterMetricFamily("axpolicy_cache_hits", "Fresh cache answers", value=cache.hits)
        yield CounterMetricFamily("axpolicy_cache_misses", "Lookups not answered from the cache", value=cache.misses)
        yield CounterMetricFamily("axpolicy_cache_stale_answers", "Stale answers served while a user map failed",
                                  value=cache.stale)
        yield GaugeMetricFamily("axpolicy_cache_entries", "Entries in the cache", value=len(cache))
        searches = CounterMetricFamily("axpolicy_ldap_searches", "LDAP searches sent", labels=["usermap", "server"])
        errors = CounterMetricFamily("axpolicy_ldap_errors", "LDAP failures", labels=["usermap", "server"])
        failovers = CounterMetricFamily("axpolicy_ldap_failovers", "Times a server was marked down and skipped",
                                        labels=["usermap", "server"])
        overloaded = CounterMetricFamily("axpolicy_ldap_overloaded", "Lookups refused because the queue was full",
                                         labels=["usermap"])
        for name, usermap in sorted(router.usermaps.items()):
            if not isinstance(usermap, LdapUserMap):
                continue
            for server in usermap.searches:
                searches.add_metric([name, server], usermap.searches[server])
                errors.add_metric([name, server], usermap.errors[server])
                failovers.add_metric([name, server], usermap.failovers[server])
            overloaded.add_metric([name], usermap.overloaded)
        yield from (searches, errors, failovers, overloaded)
        yield from self._replicas(router)
        if router.authenticator is not None:
            auth = CounterMetricFamily("axpolicy_auth", "SMTP AUTH attempts answered", labels=["outcome"])
            for outcome in ("ok", "fail", "temp"):
                auth.add_metric([outcome], router.authenticator.outcomes[outcome])
            yield auth
        connections = GaugeMetricFamily("axpolicy_connections", "Open client connections",
                                        labels=["listener", "protocol"])
        protocol_errors = CounterMetricFamily("axpolicy_protocol_errors", "Connections closed for protocol errors",
                                              labels=["listener", "protocol"])
        evicted = CounterMetricFamily("axpolicy_connections_evicted",
                                      "Idle connections closed at max_connections to admit new ones",
                                      labels=["listener", "protocol"])
        refused = CounterMetricFamily("axpolicy_connections_refused",
                                      "Connections refused at max_connections with every connection busy",
                                      labels=["listener", "protocol"])
        internal = CounterMetricFamily("axpolicy_internal_errors",
                                       "Requests answered with a temporary failure because of an unexpected error",
                                       labels=["listener", "protocol"])
        for listener in listeners:
            labels = [listener.spec.address, listener.spec.protocol]
            internal.add_metric(labels, listener.internal_errors)
            connections.add_metric(labels, len(listener.connections))
            protocol_errors.add_metric(labels, listener.protocol_errors)
            evicted.add_metric(labels, listener.evicted)
            refused.add_metric(labels, listener.refused)
        yield from (connections, protocol_errors, evicted, refused, internal)
        info = GaugeMetricFamily("axpolicy_config_info", "Digest of the effective configuration, and the version",
                                 labels=["digest", "version"])
        info.add_metric([digest, __version__], 1)
        yield info


    @staticmethod
    def _replicas(router: Router) -> Iterator[Metric]:
        ready = GaugeMetricFamily("axpolicy_replica_ready", "1 while the replica answers lookups", labels=["usermap"])
        entries = GaugeMetricFamily("axpolicy_replica_entries", "Entries in the replica", labels=["usermap"])
        refreshes = CounterMetricFamily("axpolicy_replica_refreshes", "Complete refreshes", labels=["usermap"])
        resumes = CounterMetricFamily("axpolicy_replica_resumes", "Sessions resumed from the stored cookie",
                                      labels=["usermap"])
        updates = CounterMetricFamily("axpolicy_replica_updates", "Changes applied", labels=["usermap"])
        losses = CounterMetricFamily("axpolicy_replica_losses", "Sync sessions lost", labels=["usermap"])
        for name, usermap in sorted(router.usermaps.items()):
            replica = usermap.replica if isinstance(usermap, LdapUserMap) else None
            if replica is None:
                continue
            ready.add_metric([name], 1 if replica.ready else 0)
            entries.add_metric([name], replica.entries)
            refreshes.add_metric([name], replica.refreshes)
            resumes.add_metric([name], replica.resumes)
            updates.add_metric([name], replica.updates)
            losses.add_metric([name], replica.losses)
        yield from (ready, entries, refreshes, resumes, updates, losses)


class MetricsServer:
    """A minimal HTTP/1.0 server for /metrics and /health."""

    def __init__(self, state: Callable[[], tuple[Router, list[Listener], str]]) -> None:
        self._state = state
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(state))
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._handle, sock=sock, limit=_MAX_REQUEST_BYTES)
        logger.info("metrics on http://%s/metrics", _address(sock))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_SECONDS):
                request = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = request.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method != b"GET":
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path == b"/metrics":
                status, body, kind = "200 OK", generate_latest(self._registry), "text/plain; version=0.0.4"
            elif path == b"/health":
                status, body, kind = await self._health()
            else:
                status, body, kind = "404 Not Found", b"try /metrics or /health\n", "text/plain"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _health(self) -> tuple[str, bytes, str]:
        router, _, _ = self._state()
        lines, healthy = [], True
        for name, usermap in router.usermaps.items():
            result = await usermap.lookup(HEALTH_PROBE)
            if result.status is Status.TEMP:
                healthy = False
                lines.append(f"{name}: temporary failure: {result.reason}")
            else:
                lines.append(f"{name}: ok")
        status = "200 OK" if healthy else "503 Service Unavailable"
        return status, ("\n".join(lines) + "\n").encode(), "text/plain"


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """The metrics listening socket, opened before privileges are dropped."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on metrics {host}:{port}: {exc.strerror}") from None
    return sock
