"""The durable store's data directory: blocking file operations, run in worker threads.

Layout of a data directory::

    LOCK              held (flock) by the node using the directory; holds its pid
    snapshot          every key's merged value, as of the start of one log segment
    log.00000042      append-only log segments, replayed in order on top of it
    log.00000007.damaged-1234   bytes cut from a damaged log tail, kept for inspection

Replacing the snapshot is atomic (write ``snapshot.tmp``, fsync, rename, fsync
the directory), so at every instant the directory holds a snapshot plus the
segments that follow it, and a crash at any point recovers the same state.
The encodings are in :mod:`droplet.kvs.backends.wal`; this module only moves
bytes between them and the disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import attrs

from ...errors import DropletError, StorageError
from ..store import Store
from .wal import DELETE, LOG_MAGIC, LogDamage, decode_log, decode_snapshot, encode_snapshot

__all__ = ["DataDir", "Recovery"]

log = logging.getLogger("droplet.kvs.durable")

_SEGMENT = re.compile(r"^log\.(\d{8,})$")


@attrs.frozen
class Recovery:
    """What a start found in the data directory."""

    snapshot_keys: int
    snapshot_bytes: int
    replayed_records: int
    segments: int
    #: (segment file name, damage) for every damaged log tail that was cut
    damaged: list[tuple[str, LogDamage]]
    log_bytes: int


def _private(path: Path) -> BinaryIO:
    """``path`` opened for writing (replaced if it exists), readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    return os.fdopen(fd, "wb", buffering=1 << 20)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DataDir:
    """One node's data directory; every method blocks (call it from a worker thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd = -1

    def segment_path(self, number: int) -> Path:
        return self.path / f"log.{number:08d}"

    @property
    def snapshot_path(self) -> Path:
        return self.path / "snapshot"

    def lock(self) -> None:
        """Create the directory and take it for this process (another node gets StorageError)."""
        import fcntl  # POSIX only: imported here so that importing Droplet works anywhere
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot use data directory {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StorageError(
                f"data directory {self.path} is in use by another Droplet node (pid "
                f"{holder}); stop that node, or give this one its own --data-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def segments(self) -> list[int]:
        numbers = []
        for entry in os.listdir(self.path):
            match = _SEGMENT.match(entry)
            if match:
                numbers.append(int(match.group(1)))
        return sorted(numbers)

    def recover(self, store: Store) -> tuple[Recovery, int]:
        """Load snapshot and log into ``store``; cut damaged tails. Returns the next segment."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / "snapshot.tmp").unlink()  # a compaction the crash interrupted
        first = 1
        snapshot_keys = snapshot_bytes = 0
        if self.snapshot_path.exists():
            try:
                data = self.snapshot_path.read_bytes()
                snapshot_bytes = len(data)
                first, items = decode_snapshot(data)
                del data
                for key, value in items:
                    store.put(key, value)
            except DropletError as exc:
                raise StorageError(
                    f"the snapshot {self.snapshot_path} is damaged ({exc}); restore it from "
                    "a backup, or move it aside to start from the log segments alone "
                    "(keys written before it was taken are then lost)") from exc
            snapshot_keys = len(items)
        replayed = 0
        damaged: list[tuple[str, LogDamage]] = []
        log_bytes = 0
        segments = self.segments()
        for number in segments:
            path = self.segment_path(number)
            if number < first:  # already in the snapshot: a compaction's leftover
                path.unlink()
                continue
            data = path.read_bytes()
            replay = decode_log(data)
            for record in replay.records:
                try:
                    if record.op == DELETE:
                        store.delete(record.key)
                    else:
                        store.put(record.key, record.data)
                except DropletError as exc:  # checksummed, so written that way: a bug
                    raise StorageError(f"{path}: a logged write of {record.key!r} does not "
                                       f"apply: {exc}") from exc
            replayed += len(replay.records)
            log_bytes += replay.good_bytes
            if replay.damage is not None:
                self._cut(path, data, replay.damage)
                damaged.append((path.name, replay.damage))
        next_segment = max([first - 1, *segments]) + 1
        live = [n for n in segments if n >= first]
        recovery = Recovery(snapshot_keys, snapshot_bytes, replayed, len(live), damaged, log_bytes)
        return recovery, next_segment

    def _cut(self, path: Path, data: bytes, damage: LogDamage) -> None:
        """Keep the damaged bytes beside the log for inspection, then truncate it."""
        kept = path.with_name(f"{path.name}.damaged-{damage.offset}")
        with _private(kept) as f:
            f.write(data[damage.offset:])
        with open(path, "r+b") as f:
            f.truncate(damage.offset)
            f.flush()
            os.fsync(f.fileno())
        level = logging.ERROR if damage.records_after else logging.WARNING
        log.log(level, "log %s: %s; cut there, the dropped bytes are kept in %s",
                path, damage.describe(), kept.name)

    def create_segment(self, number: int) -> int:
        """A new, empty log segment, durable in the directory; returns its open descriptor."""
        fd = os.open(self.segment_path(number),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.write(fd, LOG_MAGIC)
            os.fsync(fd)
            _fsync_dir(self.path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write_snapshot(self, next_segment: int, items: Iterable[tuple[str, bytes]]) -> int:
        """Replace the snapshot atomically, then drop the segments it covers. Returns bytes."""
        tmp = self.path / "snapshot.tmp"
        size = 0
        try:
            with _private(tmp) as f:
                for chunk in encode_snapshot(next_segment, items):
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.snapshot_path)
            _fsync_dir(self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        for number in self.segments():
            if number < next_segment:
                self.segment_path(number).unlink()
        return size


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is out (a write may be partial)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_and_sync(fd: int, data: bytes, sync: bool) -> None:
    write_all(fd, data)
    if sync:
        os.fsync(fd)
