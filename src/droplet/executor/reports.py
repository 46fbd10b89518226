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

__all__ = ["CallRecorder", "Load", "report_periodically"]

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
    cache_evictions: int = 0


class _Reporter:
    def __init__(self, url: str, recorder: CallRecorder) -> None:
        self.url = url
        self.recorder = recorder
        self._hits = 0
        self._misses = 0

    def build(self, load: Load) -> ExecutorReport:
        names, calls, failures, latency, latency_us = self.recorder.take()
        hits = max(0, load.cache_hits - self._hits)
        misses = max(0, load.cache_misses - self._misses)
        self._hits, self._misses = load.cache_hits, load.cache_misses
        return ExecutorReport(self.url, load.threads, load.busy, load.queued, load.running,
                              load.cache_entries, load.cache_bytes, hits, misses, names,
                              calls, failures, latency, latency_us)


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
