"""Shared-memory segments: how a node's cache hands large values to its worker processes.

The node cache writes a large cached value once into a file under ``/dev/shm``
(memory, not disk) and tells workers its name; each worker maps it read-only,
so the value crosses no socket and exists once per node however many workers
read it. A segment is unlinked when its entry is evicted or replaced and when
the node exits; a worker that still maps it keeps a valid view (POSIX unlink
semantics) until it lets go. Workers never own segments, so a worker killed by
SIGKILL leaks nothing; segments of a node killed by SIGKILL are removed by the
next node that starts on the machine (:meth:`SegmentStore.sweep`: their names
carry the dead process's id).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SEGMENT_PREFIX", "SegmentStore", "map_segment", "segment_dir"]

log = logging.getLogger("droplet.executor")

SEGMENT_PREFIX = "droplet-"
_NAME = re.compile(r"droplet-(\d+)-[0-9a-f]{8}-\d+")


def segment_dir() -> Path:
    """Where segments live: ``/dev/shm`` when there is one, else the temporary directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class SegmentStore:
    """The segments of one node cache (created, unlinked, all removed on :meth:`close`)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or segment_dir()
        self._prefix = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"
        self._next = 0
        self._live: dict[str, int] = {}  # name -> size
        self.created = 0
        self.sweep()

    def __len__(self) -> int:
        return len(self._live)

    @property
    def total_bytes(self) -> int:
        return sum(self._live.values())

    def create(self, data: bytes | memoryview) -> str:
        """Write ``data`` into a new segment; returns its name (for :func:`map_segment`)."""
        return self.create_parts([data])

    def create_parts(self, parts: Sequence[bytes | memoryview]) -> str:
        """Write ``parts`` one after the other into a new segment; returns its name."""
        self._next += 1
        name = f"{self._prefix}{self._next}"
        path = self.directory / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                size = 0
                for part in parts:
                    view = memoryview(part).cast("B")
                    size += len(view)
                    while view:
                        written = f.write(view)
                        view = view[written or 0:]
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._live[name] = size
        self.created += 1
        return name

    def size_of(self, name: str) -> int:
        """The bytes segment ``name`` holds (KeyError if it is not one of ours)."""
        return self._live[name]

    def unlink(self, name: str) -> None:
        if self._live.pop(name, None) is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / name)

    def close(self) -> None:
        """Remove every segment of this store (the node is going away)."""
        for name in list(self._live):
            self.unlink(name)

    def sweep(self) -> int:
        """Remove segments left by node processes that no longer exist; returns how many."""
        removed = 0
        try:
            names = os.listdir(self.directory)
        except OSError:
            return 0
        for name in names:
            match = _NAME.fullmatch(name)
            if match is None or _alive(int(match.group(1))):
                continue
            with contextlib.suppress(OSError):
                os.unlink(self.directory / name)
                removed += 1
        if removed:
            log.info("removed %d shared-memory segment(s) left by exited nodes", removed)
        return removed


def map_segment(name: str, size: int, directory: Path | None = None) -> mmap.mmap:
    """Map segment ``name`` read-only (a worker's side). ValueError for a bad name or size."""
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"{name!r} is not a Droplet shared-memory segment name")
    path = (directory or segment_dir()) / name
    fd = os.open(path, os.O_RDONLY)
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ValueError(f"segment {name} holds {actual} bytes, not {size}")
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
