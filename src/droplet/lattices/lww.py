"""Last-writer-wins registers and the timestamps that order them.

An LWW register keeps the write with the greatest ``(timestamp, writer)``
pair. The writer id breaks timestamp ties between processes; the value bytes
break the last possible tie (one writer reusing a timestamp), so the winner
never depends on which operand ``merge`` was called on.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Any, ClassVar, final

from .base import Lattice, value_key

__all__ = ["WRITER_ID", "LWWLattice", "next_timestamp"]

WRITER_ID: str = secrets.token_hex(8)
"""This process's default LWW writer id: random, so two processes never share one.

A forked child gets a fresh id (see :func:`os.register_at_fork` below), because
parent and child would otherwise stamp different writes with the same pair.
Code that must follow that refresh reads ``droplet.lattices.lww.WRITER_ID``
rather than a copy imported at startup.
"""

_lock = threading.Lock()
_last = 0


def next_timestamp() -> int:
    """A nanosecond timestamp greater than every one this process returned before.

    Wall-clock time alone can repeat (coarse clocks) or step backwards (NTP),
    which would let a later put lose to an earlier one from the same process.
    Taking ``max(time.time_ns(), last + 1)`` keeps call order while staying
    close to real time, like a hybrid logical clock without the remote part.
    Thread-safe.
    """
    global _last
    with _lock:
        now = time.time_ns()
        _last = now if now > _last else _last + 1
        return _last


def _after_fork_in_child() -> None:
    global WRITER_ID, _lock
    WRITER_ID = secrets.token_hex(8)
    # Another thread may have held the lock at fork time; it never releases here.
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@final
class LWWLattice(Lattice):
    """A register whose merge keeps the write with the greatest timestamp.

    Args:
        timestamp: an int, by convention nanoseconds from :func:`next_timestamp`.
        value: the user value (``bytes`` in raw mode, see ``droplet.lattices.codec``).
        writer: who wrote it; orders writes that share a timestamp.
    """

    __slots__ = ("_timestamp", "_value", "_writer")

    type_name: ClassVar[str] = "LWW"

    def __init__(self, timestamp: int, value: Any, writer: str = "") -> None:
        if isinstance(timestamp, bool) or not isinstance(timestamp, int):
            raise TypeError(f"LWW timestamp must be an int, not {type(timestamp).__name__}")
        if not isinstance(writer, str):
            raise TypeError(f"LWW writer must be a str, not {type(writer).__name__}")
        self._timestamp = int(timestamp)
        self._value = value
        self._writer = str(writer)

    @classmethod
    def now(cls, value: Any, writer: str | None = None) -> LWWLattice:
        """An LWW stamped with :func:`next_timestamp` and this process's :data:`WRITER_ID`.

        Two calls in one process order in call order, so the later put wins.
        """
        return cls(next_timestamp(), value, WRITER_ID if writer is None else writer)

    @property
    def timestamp(self) -> int:
        return self._timestamp

    @property
    def writer(self) -> str:
        return self._writer

    @property
    def value(self) -> Any:
        return self._value

    def reveal(self) -> Any:
        """The value of the winning write."""
        return self._value

    def merge(self, other: LWWLattice) -> LWWLattice:
        self._check_mergeable(other)
        winner = self if _wins(self, other) else other
        return LWWLattice(winner._timestamp, winner._value, winner._writer)

    def __eq__(self, other: object) -> bool:
        if type(other) is not LWWLattice:
            return NotImplemented
        return (self._timestamp, self._writer, self._value) == (
            other._timestamp,
            other._writer,
            other._value,
        )

    def __hash__(self) -> int:
        return hash((LWWLattice, self._timestamp, self._writer, self._value))

    def __repr__(self) -> str:
        return f"LWWLattice({self._timestamp!r}, {self._value!r}, writer={self._writer!r})"


def _wins(a: LWWLattice, b: LWWLattice) -> bool:
    """Whether ``a`` wins over (or ties with) ``b``.

    Compares ``(timestamp, writer)`` first and pickles values only on a full
    tie, so the common merge never serializes anything.
    """
    if a.timestamp != b.timestamp:
        return a.timestamp > b.timestamp
    if a.writer != b.writer:
        return a.writer > b.writer
    return value_key(a.value) >= value_key(b.value)
