"""Result lifetimes on the client: which call results can still be read.

A call's result lives in the KVS under its future's ``obj_id`` while
something can still read it, as with Ray's reference counting: while its
future lives in this client. When a future is garbage-collected its key is
queued here, and the client tells the store in batches (one
:class:`~droplet.protocol.messages.KvsForget` per batch, on its next send or
after :data:`FLUSH_DELAY`). The store's ``result_ttl`` remains as the
backstop for clients that vanish without saying so.

A call sent straight to an executor is answered to this client alone and
never stored unless its ``obj_id`` is read (the client then stores it): its
future releases nothing.

Handing out ``future.obj_id`` *pins* the result: the key may be read by
anyone (``get_object``, a :class:`~droplet.DropletReference`), so it is kept
until the connection closes, and released with the connection's last batch.

Queueing must be safe from a finalizer, which may run in any thread, at any
bytecode, even while that thread holds one of our locks: so it only appends
to a :class:`collections.deque` (atomic) and never takes a lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

__all__ = ["FLUSH_DELAY", "MAX_BATCH", "Releases"]

#: Seconds a released key may wait for the next send before a timer sends it.
FLUSH_DELAY = 0.2
#: Keys per KvsForget message (a batch well under any frame limit).
MAX_BATCH = 4096


class Releases:
    """Result keys to release, and the keys pinned until the connection closes."""

    def __init__(self) -> None:
        self._queue: deque[str] = deque()
        self._pinned: set[str] = set()
        #: called (without locks) after a key is queued: e.g. to wake a flusher.
        self.on_release: Callable[[], None] | None = None

    def release(self, key: str) -> None:
        """Queue ``key`` (its future was collected). Safe in a finalizer."""
        self._queue.append(key)
        callback = self.on_release
        if callback is not None:
            try:
                callback()
            except Exception:  # a finalizer must never raise (the loop may be gone)
                pass

    def pin(self, key: str) -> None:
        """``key`` was handed out: keep it until the connection closes."""
        self._pinned.add(key)

    def __len__(self) -> int:
        return len(self._queue)

    def take(self, limit: int = MAX_BATCH) -> list[str]:
        """Up to ``limit`` queued keys, removed from the queue."""
        out: list[str] = []
        queue = self._queue
        while len(out) < limit:
            try:
                out.append(queue.popleft())
            except IndexError:
                break
        return out

    def take_all(self) -> list[str]:
        """Every queued and pinned key (the connection is closing)."""
        keys = self.take(len(self._queue) + 1)
        keys.extend(self._pinned)
        self._pinned.clear()
        return keys
