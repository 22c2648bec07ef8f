"""Request counters and latency histograms: plain Python, always on, cheap.

The hot path only increments integers here; :mod:`axpolicy.metrics` turns
them into Prometheus metrics when (and only when) a scrape asks.
"""

from __future__ import annotations

import bisect
import collections

from axpolicy.result import Status

# Seconds; from a cache hit (well under a millisecond) to an LDAP timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

OUTCOME = {Status.FOUND: "found", Status.NOTFOUND: "notfound", Status.TEMP: "temp", Status.PERM: "perm"}


class Histogram:
    """Cumulative-on-read bucket counts, like a Prometheus histogram."""

    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


class Stats:
    """Requests by (protocol, map, outcome) and latency by protocol."""

    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.latency: dict[str, Histogram] = collections.defaultdict(Histogram)

    def record(self, protocol: str, map_name: str, outcome: str, seconds: float) -> None:
        self.requests[(protocol, map_name, outcome)] += 1
        self.latency[protocol].observe(seconds)


STATS = Stats()
