"""What an executor tells its scheduler every report period.

:class:`CallRecorder` (pure) counts calls, failures and latency buckets per
function between two reports; :func:`report_periodically` sends an
:class:`~droplet.protocol.messages.ExecutorReport` each period with the
executor's current load and those deltas (nothing is sent twice, so the
scheduler adds reports up). A report goes through the scheduler link's
outbox: when that is full the report is dropped, never waited for, and its
counts are lost (totals then undercount; the load catches up next period).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from ..errors import DropletError
from ..latency import BUCKETS, bucket_of
from ..protocol.messages import ExecutorReport

__all__ = ["REPORT_MAX_KEYS", "REPORT_MIN_SIZE", "CachedKeys", "CallRecorder", "Load",
           "report_periodically"]

#: Cached values at least this big are reported to the scheduler (placement).
REPORT_MIN_SIZE = 64 * 1024
#: Most cached keys reported (the largest); a report names at most twice as many.
REPORT_MAX_KEYS = 1024

log = logging.getLogger("droplet.executor")


@attrs.define
class _Counts:
    calls: int = 0
    failures: int = 0
    latency_us: int = 0
    buckets: list[int] = attrs.Factory(lambda: [0] * BUCKETS)


class CallRecorder:
    """Per-function call counts and latency buckets since the last :meth:`take`."""

    def __init__(self) -> None:
        self._counts: dict[str, _Counts] = {}

    def record(self, function: str, seconds: float, failed: bool) -> None:
        counts = self._counts.get(function)
        if counts is None:
            counts = self._counts[function] = _Counts()
        counts.calls += 1
        counts.failures += failed
        counts.latency_us += max(0, round(seconds * 1e6))
        counts.buckets[bucket_of(seconds)] += 1

    def merge(self, other: CallRecorder) -> None:
        """Add ``other``'s counts to these (``other`` is not used afterwards)."""
        for function, theirs in other._counts.items():
            mine = self._counts.get(function)
            if mine is None:
                self._counts[function] = theirs
                continue
            mine.calls += theirs.calls
            mine.failures += theirs.failures
            mine.latency_us += theirs.latency_us
            mine.buckets = [a + b for a, b in zip(mine.buckets, theirs.buckets, strict=True)]

    def take(self) -> tuple[list[str], list[int], list[int], list[int], list[int]]:
        """``(functions, calls, failures, latency buckets (flat), latency_us)``; resets."""
        counts, self._counts = self._counts, {}
        names = sorted(counts)
        return (names, [counts[n].calls for n in names], [counts[n].failures for n in names],
                [b for n in names for b in counts[n].buckets],
                [counts[n].latency_us for n in names])


@attrs.frozen
class Load:
    """An executor's current load and cache figures (cache hits/misses are totals)."""

    threads: int
    busy: int
    queued: int
    running: int
    cache_entries: int
    cache_bytes: int
    cache_hits: int
    cache_misses: int
    #: a total, like hits and misses.
    cache_evictions: int = 0
    #: ``key -> size`` of what the node caches (see REPORT_MIN_SIZE, REPORT_MAX_KEYS).
    cached: dict[str, int] = attrs.Factory(dict)


class CachedKeys:
    """The cached-keys summary as changes since the last report (pure)."""

    def __init__(self) -> None:
        self._sent: dict[str, int] = {}
        #: the next report carries the whole summary (first, or after a lost report).
        self.resync = True

    def changes(self, now: dict[str, int]) -> tuple[list[str], list[int], list[str], bool]:
        """``(keys, sizes, removed, full)`` to report for the summary ``now``."""
        full = self.resync
        if full:
            keys, removed = list(now), []
        else:
            keys = [k for k, size in now.items() if self._sent.get(k) != size]
            removed = [k for k in self._sent if k not in now]
        self._sent = dict(now)
        self.resync = False
        return keys, [now[k] for k in keys], removed, full


class _Reporter:
    def __init__(self, url: str, recorder: CallRecorder) -> None:
        self.url = url
        self.recorder = recorder
        self.cached = CachedKeys()
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def build(self, load: Load) -> ExecutorReport:
        names, calls, failures, latency, latency_us = self.recorder.take()
        hits = max(0, load.cache_hits - self._hits)
        misses = max(0, load.cache_misses - self._misses)
        evictions = max(0, load.cache_evictions - self._evictions)
        self._hits, self._misses = load.cache_hits, load.cache_misses
        self._evictions = load.cache_evictions
        keys, sizes, removed, full = self.cached.changes(load.cached)
        return ExecutorReport(self.url, load.threads, load.busy, load.queued, load.running,
                              load.cache_entries, load.cache_bytes, hits, misses, names,
                              calls, failures, latency, latency_us, evictions, keys, sizes,
                              removed, full)


async def report_periodically(url: str, recorder: CallRecorder, load: Callable[[], Load],
                              post: Callable[[ExecutorReport], None], interval: float) -> None:
    """Every ``interval`` seconds, post a report (until cancelled)."""
    if interval <= 0:
        raise ValueError(f"report interval must be positive, not {interval!r}")
    reporter = _Reporter(url, recorder)
    while True:
        await trio.sleep(interval)
        try:
            post(reporter.build(load()))
        except DropletError as exc:  # the scheduler is not reading; try next period
            log.debug("report to the scheduler dropped: %s", exc)
            reporter.cached.resync = True  # its changes are lost: send everything next
