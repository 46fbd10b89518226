"""What the scheduler knows of its executors' work: their reports, added up. Pure code.

Executors send an :class:`~droplet.protocol.messages.ExecutorReport` every
report period (:data:`REPORT_INTERVAL` by default): their current load, and
what happened since the previous report (calls, failures, latency buckets,
cache hits and misses). :class:`ClusterView` keeps the latest load of each
executor and the running totals per function, and builds the
:class:`~droplet.status.ClusterStatus` that ``conn.status()`` returns. Time is
passed in (``now``), so it is tested without a clock or an event loop.

Memory stays bounded: per function a fixed number of latency buckets and at
most one rate sample per report period within :data:`RATE_WINDOW`; at most
:data:`MAX_FUNCTIONS` functions are tracked (registrations are bounded by the
scheduler's registry anyway).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container

import attrs

from ..latency import BUCKETS, quantile
from ..protocol.messages import ExecutorReport
from ..status import ClusterStatus, ExecutorStatus, FunctionStatus

__all__ = ["MAX_FUNCTIONS", "RATE_WINDOW", "REPORT_INTERVAL", "ClusterView"]

#: Seconds between two reports of an executor (``--report-interval``).
REPORT_INTERVAL = 1.0
#: Seconds over which calls per second are measured.
RATE_WINDOW = 10.0
#: Functions whose statistics are kept; reports of others are not counted.
MAX_FUNCTIONS = 10_000
#: Cached keys remembered per executor (reports add and remove them).
MAX_CACHED_KEYS = 4096


@attrs.define
class _Load:
    url: str
    threads: int = 0
    busy: int = 0
    queued: int = 0
    running: int = 0
    cache_entries: int = 0
    cache_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
    #: ``key -> bytes`` its node caches (large values only; see ExecutorReport).
    cached: dict[str, int] = attrs.Factory(dict)
    last_report: float | None = None


@attrs.define
class _FunctionTotals:
    calls: int = 0
    failures: int = 0
    latency_us: int = 0
    buckets: list[int] = attrs.Factory(lambda: [0] * BUCKETS)
    #: (report time, calls in that report), oldest first, within the rate window.
    recent: deque[tuple[float, int]] = attrs.Factory(deque)


class ClusterView:
    """The executors' reports, aggregated."""

    def __init__(self, *, rate_window: float = RATE_WINDOW,
                 max_functions: int = MAX_FUNCTIONS) -> None:
        if rate_window <= 0:
            raise ValueError(f"rate_window must be positive, not {rate_window!r}")
        self.rate_window = rate_window
        self.max_functions = max_functions
        self._executors: dict[str, _Load] = {}
        self._functions: dict[str, _FunctionTotals] = {}
        #: function statistics not kept because max_functions was reached.
        self.dropped = 0
        #: cache hits and misses of executors that have left (totals stay cumulative).
        self.departed_hits = 0
        self.departed_misses = 0

    def __len__(self) -> int:
        return len(self._executors)

    def join(self, url: str, threads: int = 0) -> None:
        """An executor joined (it shows, idle, until its first report)."""
        self._executors[url] = _Load(url, threads=threads)

    def running(self, url: str) -> int:
        """Functions executor ``url`` ran at its last report (0 for none or unknown)."""
        load = self._executors.get(url)
        return load.running if load is not None else 0

    def loads(self) -> dict[str, int]:
        """Each executor's last reported load: busy threads plus queued calls."""
        return {url: load.busy + load.queued for url, load in self._executors.items()}

    def load(self, url: str) -> tuple[int, int, dict[str, int]]:
        """``(threads, queued, cached)`` of an executor as last reported (zeros if unknown)."""
        load = self._executors.get(url)
        if load is None:
            return 0, 0, {}
        return load.threads, load.queued, load.cached

    def leave(self, url: str) -> None:
        """An executor left: its load goes; what it ran stays in the totals."""
        load = self._executors.pop(url, None)
        if load is not None:
            self.departed_hits += load.cache_hits
            self.departed_misses += load.cache_misses

    def report(self, report: ExecutorReport, now: float,
               known: Container[str] | None = None) -> bool:
        """Apply one report; False (and nothing changes) for an executor not joined.

        ``known``: the registered function names; others are not counted (an
        executor runs only registered functions, so they can only be junk).
        """
        load = self._executors.get(report.url)
        if load is None:
            return False
        load.threads = report.threads
        load.busy = report.busy
        load.queued = report.queued
        load.running = report.running
        load.cache_entries = report.cache_entries
        load.cache_bytes = report.cache_bytes
        load.cache_hits += report.cache_hits
        load.cache_misses += report.cache_misses
        load.cache_evictions += report.cache_evictions
        if report.cache_full:
            load.cached = {}
        for key in report.uncached_keys:
            load.cached.pop(key, None)
        for key, size in zip(report.cached_keys, report.cached_sizes, strict=True):
            if key in load.cached or len(load.cached) < MAX_CACHED_KEYS:
                load.cached[key] = size
        load.last_report = now
        for i, name in enumerate(report.functions):
            totals = self._functions.get(name)
            if totals is None:
                if (known is not None and name not in known
                        or len(self._functions) >= self.max_functions):
                    self.dropped += 1
                    continue
                totals = self._functions[name] = _FunctionTotals()
            calls = report.calls[i]
            totals.calls += calls
            totals.failures += report.failures[i]
            totals.latency_us += report.latency_us[i]
            for b, n in enumerate(report.latency[i * BUCKETS:(i + 1) * BUCKETS]):
                totals.buckets[b] += n
            if calls:
                totals.recent.append((now, calls))
            self._expire(totals, now)
        return True

    def _expire(self, totals: _FunctionTotals, now: float) -> None:
        cutoff = now - self.rate_window
        while totals.recent and totals.recent[0][0] <= cutoff:
            totals.recent.popleft()

    def function_status(self, name: str, now: float) -> FunctionStatus:
        totals = self._functions.get(name)
        if totals is None:
            return FunctionStatus(name, latency_buckets=(0,) * BUCKETS)
        self._expire(totals, now)
        rate = sum(n for _, n in totals.recent) / self.rate_window
        return FunctionStatus(
            name, totals.calls, totals.failures, rate, quantile(totals.buckets, 0.5),
            quantile(totals.buckets, 0.99), totals.latency_us / 1e6, tuple(totals.buckets))

    def status(self, scheduler: str, functions: list[str], dags: list[str],
               now: float) -> ClusterStatus:
        """The cluster's status: ``functions`` and ``dags`` are the registered names."""
        executors = tuple(
            ExecutorStatus(e.url, e.threads, e.busy, e.queued, e.running, e.cache_entries,
                           e.cache_bytes, e.cache_hits, e.cache_misses,
                           None if e.last_report is None else max(0.0, now - e.last_report),
                           e.cache_evictions)
            for e in sorted(self._executors.values(), key=lambda e: e.url))
        return ClusterStatus(
            scheduler, executors,
            tuple(self.function_status(name, now) for name in sorted(functions)),
            tuple(sorted(dags)), self.rate_window)
