"""The durable backend: the in-memory store, plus a log and snapshots in a data directory.

Every write that changes a key is appended to the log (as a CRC-32 framed
record, :mod:`~droplet.kvs.backends.wal`) before ``put`` returns, so the
service acknowledges nothing that is not in the log. Writes are committed in
groups: one writer task takes everything appended since its last batch and
writes it with one ``write`` (and, for ``fsync="always"``, one ``fsync``) in a
worker thread, while the next batch accumulates; every put of the batch is
acknowledged when that batch is safe. Reads are answered from memory at once.

``fsync`` is Redis's ``appendfsync``:

- ``always`` (default): the batch is written and fsynced before its puts are
  acknowledged. Nothing acknowledged is lost, even to a power cut.
- ``everysec``: the batch is written (to the OS) before acknowledgement and
  fsynced once a second. A crashed or killed node loses nothing; a power cut
  loses up to a second.
- ``no``: written before acknowledgement, fsynced when the OS decides (and at
  snapshots and shutdown).

When the log since the last snapshot has grown past ``compact_bytes`` and past
the snapshot's own size (so rewriting the snapshot costs at most as much as the
log it replaces, as Redis's ``auto-aof-rewrite-percentage 100``), the writer
switches to a new log segment and a worker thread writes every key's merged
value to a new snapshot (atomic rename), then deletes the segments it covers.

Call results (``__droplet/results/...`` keys, which expire after
``result_ttl`` anyway) are kept in memory only by default: a future that
outlives a crash of its node cannot be answered by the run that died with it,
and logging them would put a disk write on the path of every call.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from ...config import FSYNC_POLICIES
from ...errors import StorageError
from ..keys import RESULT_PREFIX
from ..store import Store
from .base import BackendStatistics, ChangeHandler, PutResult, StorageBackend
from .datadir import DataDir, Recovery, write_all, write_and_sync
from .wal import DELETE, PUT, encode_record

__all__ = ["DEFAULT_COMPACT_BYTES", "FSYNC_POLICIES", "DurableBackend"]

log = logging.getLogger("droplet.kvs.durable")

T = TypeVar("T")

#: log growth (bytes) that triggers writing a new snapshot
DEFAULT_COMPACT_BYTES = 64 * 1024 * 1024


class DurableBackend(StorageBackend):
    """Keys in memory, every acknowledged change in a log under ``data_dir``.

    Args:
        data_dir: the directory (created if missing; one node at a time).
        fsync: ``"always"``, ``"everysec"`` or ``"no"`` (see the module docstring).
        compact_bytes: log growth that triggers a snapshot.
        volatile_prefixes: keys kept in memory only (default: call results).
    """

    name = "durable"

    def __init__(self, data_dir: str | os.PathLike[str], *, fsync: str = "always",
                 compact_bytes: int = DEFAULT_COMPACT_BYTES,
                 volatile_prefixes: Sequence[str] = (RESULT_PREFIX,)) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        if compact_bytes <= 0:
            raise ValueError(f"compact_bytes must be positive, not {compact_bytes!r}")
        self.dir = DataDir(Path(data_dir).expanduser())
        self.fsync = fsync
        self.compact_bytes = compact_bytes
        self.store = Store()
        self._volatile = tuple(volatile_prefixes)
        self.recovery: Recovery | None = None
        # the log: records appended (numbered 1, 2, ...) and how many are safe
        self._pending: list[bytes] = []
        self._appended = 0
        self._durable = 0
        self._work = trio.Event()
        self._committed = trio.Event()
        self._failure: str | None = None
        self._fd = -1
        self._fd_lock = trio.Lock()  # the everysec fsync vs. segment switches
        # Threads of our own: a busy default pool (sync functions, other libraries)
        # must never hold up the log, nor the puts of functions waiting on it.
        self._threads = trio.CapacityLimiter(4)
        self._segment = 0
        self._unsynced = False
        self._log_bytes = 0  # in segments the snapshot does not cover
        self._compact_at = compact_bytes
        self._compacting = False
        #: set (and replaced) each time a compaction ends, written or failed
        self.compaction_finished = trio.Event()
        self._commits = 0
        self._snapshots = 0
        self._ready = False

    # ------------------------------------------------------------------ the seam

    def get_nowait(self, key: str) -> bytes | None:
        return self.store.get(key)

    async def get(self, key: str) -> bytes | None:
        return self.store.get(key)

    def put_nowait(self, key: str, data: bytes) -> PutResult:
        if key.startswith(self._volatile):
            return self.store.put(key, data)
        raise trio.WouldBlock

    async def put(self, key: str, data: bytes) -> PutResult:
        if key.startswith(self._volatile):
            return self.store.put(key, data)
        result, ticket = self.put_pending(key, data)
        await self._wait_durable(ticket)
        return result

    def put_pending(self, key: str, data: bytes) -> tuple[PutResult, int]:
        self._check_writable()
        record = encode_record(PUT, key, data)  # before merging: nothing may fail after
        result = self.store.put(key, data)  # bad input raises here, before the log
        if result[1] is not None:
            self._append(record)
        # Even a put that changed nothing waits: what it saw may not be safe yet.
        return result, self._appended

    async def wait_committed(self, ticket: int) -> int:
        await self._wait_durable(ticket)
        return self._durable

    def delete_nowait(self, key: str) -> bool:
        existed = self.store.delete(key)
        if existed and not key.startswith(self._volatile) and self._failure is None:
            self._append(encode_record(DELETE, key))
        return existed

    async def delete(self, key: str) -> bool:
        return self.delete_nowait(key)

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(backend=self.name, keys=len(self.store),
                                 logged=self._appended, commits=self._commits,
                                 snapshots=self._snapshots, log_bytes=self._log_bytes)

    async def run(self, changed: ChangeHandler, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Recover from the data directory, then write the log until cancelled."""
        started = time.monotonic()
        await self._in_thread(self.dir.lock)
        try:
            r, self._segment = await self._in_thread(self.dir.recover, self.store)
            self.recovery = r
            self._log_bytes = r.log_bytes  # a long replayed log is compacted at the first write
            self._compact_at = max(self.compact_bytes, r.snapshot_bytes)
            self._fd = await self._in_thread(self.dir.create_segment, self._segment)
            self._ready = True
            log.info("data directory %s: %d keys from the snapshot, %d log records from %d "
                     "segment(s) replayed in %.2f s; fsync=%s", self.dir.path, r.snapshot_keys,
                     r.replayed_records, r.segments, time.monotonic() - started, self.fsync)
            task_status.started()
            async with trio.open_nursery() as nursery:
                if self.fsync == "everysec":
                    nursery.start_soon(self._fsync_every_second)
                await self._write_log(nursery)
        finally:
            self._close()

    async def aclose(self) -> None:
        self._close()

    # ------------------------------------------------------------------ the log

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._threads)

    def _check_writable(self) -> None:
        if self._failure is not None:
            raise StorageError(self._failure)
        if not self._ready:
            raise StorageError("the durable store is not running (its run() task has not "
                               "started or has ended)")

    def _append(self, record: bytes) -> None:
        self._pending.append(record)
        self._appended += 1
        self._work.set()

    async def _wait_durable(self, seq: int) -> None:
        while self._durable < seq:
            if self._failure is not None:
                raise StorageError(self._failure)
            await self._committed.wait()

    def _commit(self, upto: int, nbytes: int) -> None:
        self._durable = upto
        self._log_bytes += nbytes
        self._commits += 1
        committed, self._committed = self._committed, trio.Event()
        committed.set()

    async def _write_log(self, nursery: trio.Nursery) -> None:
        """The writer: one batch in flight (in a thread) while the next accumulates."""
        sync = self.fsync == "always"
        while True:
            await self._work.wait()
            self._work = trio.Event()
            if not self._pending:
                continue
            batch, upto = b"".join(self._pending), self._appended
            self._pending.clear()
            # Deciding to compact here, with no await since taking the batch, makes the
            # snapshot exactly the state after this batch: later records go to the next
            # segment and replay on top of it in order.
            snapshot = None
            if self._log_bytes + len(batch) >= self._compact_at and not self._compacting:
                snapshot = self.store.copy()
            try:
                if sync:
                    try:
                        await self._in_thread(write_and_sync, self._fd, batch, True)
                    except trio.Cancelled:
                        # Cancelled before the thread ran (once it runs, it finishes):
                        # the batch goes back, for _close to write.
                        self._pending.insert(0, batch)
                        raise
                else:
                    write_all(self._fd, batch)  # to the OS only: quick, as Redis does
                    self._unsynced = True
                if snapshot is not None:
                    await self._switch_segment()
            except OSError as exc:
                self._fail(exc)
                return
            self._commit(upto, len(batch))
            if snapshot is not None:
                self._compacting = True
                nursery.start_soon(self._compact, snapshot, self._segment, self._log_bytes)

    async def _switch_segment(self) -> None:
        async with self._fd_lock:
            old = self._fd
            fd = await self._in_thread(self.dir.create_segment, self._segment + 1)
            if self.fsync != "always":
                await self._in_thread(os.fsync, old)  # the snapshot will rely on it
            os.close(old)
            self._fd = fd
            self._segment += 1
            self._unsynced = False

    async def _compact(self, snapshot: Store, next_segment: int, covered: int) -> None:
        volatile = self._volatile
        items = ((k, v) for k, v in snapshot.encodings() if not k.startswith(volatile))
        started = time.monotonic()
        try:
            size = await self._in_thread(self.dir.write_snapshot, next_segment, items)
        except OSError as exc:
            log.error("could not write a snapshot in %s (the log keeps growing; will retry "
                      "after another %d bytes): %s", self.dir.path, self.compact_bytes, exc)
            self._compact_at = self._log_bytes + self.compact_bytes
        else:
            self._snapshots += 1
            self._log_bytes -= covered
            self._compact_at = max(self.compact_bytes, size)
            log.info("snapshot of %d keys (%d bytes) written in %.2f s; log segments before "
                     "%d removed", len(snapshot), size, time.monotonic() - started,
                     next_segment)
        finally:
            self._compacting = False
            finished, self.compaction_finished = self.compaction_finished, trio.Event()
            finished.set()

    async def _fsync_every_second(self) -> None:
        while True:
            await trio.sleep(1.0)
            if not self._unsynced or self._failure is not None:
                continue
            async with self._fd_lock:
                self._unsynced = False
                try:
                    await self._in_thread(os.fsync, self._fd)
                except OSError as exc:
                    self._fail(exc)
                    return

    def _fail(self, exc: OSError) -> None:
        """A log write failed: refuse every write from now on rather than lose one."""
        self._failure = (f"the log in {self.dir.path} could not be written ({exc}); this "
                         "storage node refuses writes until it is restarted")
        log.error("%s", self._failure)
        self._pending.clear()
        committed, self._committed = self._committed, trio.Event()
        committed.set()  # waiters wake and raise

    def _close(self) -> None:
        """Flush what is pending (a graceful stop loses nothing), close, unlock. Idempotent."""
        self._ready = False
        if self._fd >= 0:
            try:
                if self._failure is None:
                    if self._pending:
                        write_all(self._fd, b"".join(self._pending))
                        self._pending.clear()
                    if self.fsync != "no":
                        os.fsync(self._fd)
            except OSError as exc:
                log.error("could not flush the log in %s on shutdown: %s", self.dir.path, exc)
            finally:
                os.close(self._fd)
                self._fd = -1
        self.dir.unlock()
