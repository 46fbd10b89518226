"""The storage backend interface: where a KVS node keeps its lattices.

:class:`~droplet.kvs.service.KvsService` speaks Droplet's protocol (waiting
reads, subscriptions, pinned versions, result expiry); a backend only stores
lattices and merges writes into them. Backends:

- :class:`~droplet.kvs.backends.memory.MemoryBackend`: a dict in this process;
- :class:`~droplet.kvs.backends.durable.DurableBackend`: the same, plus an
  append-only log and snapshots in a data directory;
- a Redis backend, where several storage nodes front one Redis deployment.

Every method that may wait has a ``_nowait`` twin: a backend that can answer
at once (from memory) answers there, and the service then spends no task
switch on the operation; otherwise the twin raises :class:`trio.WouldBlock` and
the service awaits the async method. This is the contract:

- ``put`` merges like a lattice join, atomically per key: concurrent puts of
  the same key through any number of storage nodes end in the join of all of
  them. It returns ``(type_name, new_encoding)``, ``new_encoding`` being the
  key's canonical encoding after the merge, or None when the merge changed
  nothing. When ``put`` returns the write is as safe as the backend promises
  (for the durable backend: in its log), so the service may acknowledge it.
- ``put`` raises :class:`~droplet.errors.ProtocolError` for bytes that are not
  a lattice encoding and :class:`~droplet.errors.LatticeTypeError` when the key
  holds another lattice type; nothing is stored then.
- Changes made by *other* storage nodes (a shared Redis) are reported through
  the ``changed`` callback given to :meth:`StorageBackend.run`, so the service
  can answer waiting reads and push ``KvsUpdate`` to subscribed caches.
  Changes made through this backend's own ``put`` are *not* reported there.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import ClassVar

import attrs
import trio

__all__ = ["BackendStatistics", "ChangeHandler", "PutResult", "StorageBackend"]

#: ``(type_name, new_encoding or None when nothing changed)``
PutResult = tuple[str, bytes | None]

#: Called with ``(key, new_encoding)`` for a change made elsewhere.
ChangeHandler = Callable[[str, bytes], Awaitable[None]]


@attrs.frozen
class BackendStatistics:
    """What a backend holds and has done; fields a backend cannot know cheaply are None."""

    backend: str
    keys: int | None
    #: records appended to a log since start (durable backends)
    logged: int = 0
    #: fsyncs (or log writes, for fsync="no") since start: logged/commits is the batch size
    commits: int = 0
    #: snapshots written since start
    snapshots: int = 0
    #: bytes in the log since the last snapshot
    log_bytes: int = 0


class StorageBackend(abc.ABC):
    """Where a storage node keeps its lattices (see the module docstring for the contract)."""

    #: a short name for statistics and logs ("memory", "durable", "redis")
    name: ClassVar[str]
    #: every operation waits on the network (Redis): the service then serves each get
    #: and put in a task of its own, so one connection's requests overlap (merges
    #: commute, so the order in which they complete does not matter)
    concurrent: ClassVar[bool] = False

    def get_nowait(self, key: str) -> bytes | None:
        """The encoded lattice at ``key`` (None if absent), or :class:`trio.WouldBlock`."""
        raise trio.WouldBlock

    def put_nowait(self, key: str, data: bytes) -> PutResult:
        """Merge at once and return as :meth:`put` does, or raise :class:`trio.WouldBlock`
        (before changing anything) when the merge needs waiting."""
        raise trio.WouldBlock

    def put_pending(self, key: str, data: bytes) -> tuple[PutResult, int]:
        """Merge now, in memory, and return ``(result, ticket)``: the write is safe once
        :meth:`wait_committed` says the ticket is. Raises :class:`trio.WouldBlock`
        (before changing anything) when the backend cannot merge at once.

        The durable backend's fast path: the service answers the put later, so
        a connection's next puts are merged while this one's log write is in
        flight, and they share its fsync (group commit).
        """
        raise trio.WouldBlock

    async def wait_committed(self, ticket: int) -> int:
        """Wait until the write of ``ticket`` (from :meth:`put_pending`) is safe; return
        the highest ticket that is safe now (every lower one is too).

        Raises:
            StorageError: the writes could not be made safe (they must not be
                acknowledged).
        """
        raise NotImplementedError(f"{type(self).__name__} has no put_pending")

    def delete_nowait(self, key: str) -> bool:
        """Delete at once (True if the key existed), or raise :class:`trio.WouldBlock`."""
        raise trio.WouldBlock

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The encoded lattice at ``key``, or None."""

    @abc.abstractmethod
    async def put(self, key: str, data: bytes) -> PutResult:
        """Merge the encoded lattice ``data`` into ``key``; see the module docstring."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove ``key`` (used for expired call results); True if it existed."""

    @abc.abstractmethod
    def statistics(self) -> BackendStatistics:
        """A frozen record of what the backend holds (for status output and benchmarks)."""

    async def run(self, changed: ChangeHandler, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Do the backend's background work until cancelled (log writer, pub/sub listener).

        Started with ``await nursery.start(backend.run, changed)`` before the
        first request; ``task_status.started()`` means the backend is ready to
        serve (a durable backend has replayed its log by then). ``changed`` is
        awaited for each change another storage node made. The default does
        nothing: a backend without background work need not be run.
        """
        task_status.started()

    async def aclose(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the backend holds (connections, files). Idempotent."""
