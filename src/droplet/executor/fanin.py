"""Fan-in bookkeeping: a function with several upstream inputs runs once all arrived.

Pure state, no I/O: the executor feeds each upstream result in with
:meth:`FanIn.add` and runs the function when it returns the complete inputs.
The table is bounded twice over, so runs whose other inputs never come (a lost
executor, a hostile peer) cannot grow it without end:

- by age: an entry older than ``ttl`` seconds is dropped (checked on every
  ``add``, oldest first, so the cost is amortised O(1));
- by size: past ``max_entries`` the oldest entry is dropped.

Dropped entries are counted (``dropped``) for :meth:`statistics`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["DEFAULT_MAX_ENTRIES", "DEFAULT_TTL", "FanIn"]

#: Seconds a partial fan-in waits for its other inputs.
DEFAULT_TTL = 600.0
#: Partial fan-ins kept at most (each holds its inputs' values).
DEFAULT_MAX_ENTRIES = 100_000

V = TypeVar("V")


class FanIn(Generic[V]):
    """Partial inputs by ``(run_id, function)``, in arrival order of the first input."""

    def __init__(self, *, ttl: float = DEFAULT_TTL,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, dict[str, V]]] = OrderedDict()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, run_id: str, function: str, source: str, value: V,
            upstream: list[str], now: float) -> list[V] | None:
        """Record ``source``'s value; the inputs in ``upstream`` order once complete."""
        self.expire(now)
        key = (run_id, function)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
                self.dropped += 1
            entry = self._entries[key] = (now, {})
        got = entry[1]
        got[source] = value
        if all(src in got for src in upstream):
            del self._entries[key]
            return [got[src] for src in upstream]
        return None

    def expire(self, now: float) -> int:
        """Drop entries older than ``ttl``; how many were dropped."""
        cutoff = now - self.ttl
        entries = self._entries
        n = 0
        while entries:
            started, _ = next(iter(entries.values()))
            if started >= cutoff:
                break
            entries.popitem(last=False)
            n += 1
        self.dropped += n
        return n
