"""Fixed-bucket latency histograms. Pure code: no I/O.

Executors count each function's call latencies into the same fixed buckets
(:data:`LATENCY_BOUNDS`), so a report is a handful of integers whatever the
call rate, histograms from many executors add up bucket by bucket, and the
scheduler derives p50/p99 from the sum (:func:`quantile`). The price is
resolution: a quantile is known to within its bucket.

>>> counts = [0] * BUCKETS
>>> for seconds in (0.0004, 0.0004, 0.003, 0.2):
...     counts[bucket_of(seconds)] += 1
>>> quantile(counts, 0.5)
0.0005
>>> quantile(counts, 0.99)
0.25
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

__all__ = ["BUCKETS", "LATENCY_BOUNDS", "bucket_of", "quantile"]

#: Upper bounds (seconds) of the latency buckets; a last bucket holds the rest.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
#: Buckets per histogram: one per bound plus the overflow bucket.
BUCKETS = len(LATENCY_BOUNDS) + 1


def bucket_of(seconds: float) -> int:
    """The index of the bucket holding a latency of ``seconds``."""
    return bisect.bisect_left(LATENCY_BOUNDS, seconds)


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (None for no samples).

    The overflow bucket reports ``inf``: the latency was above the last bound.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be in [0, 1], not {q!r}")
    total = sum(counts)
    if total == 0:
        return None
    rank = max(1, -(-int(q * total * 1_000_000) // 1_000_000))  # ceil without float drift
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else float("inf")
    return float("inf")
