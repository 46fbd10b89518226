"""Unique ids for calls and runs, without a system call each.

``uuid.uuid4()`` reads 16 bytes from the kernel per id; on the call path (a
result key per call in the client, a run id per call in the scheduler) that
was a measurable share of a no-op call on a busy machine. Instead each process
draws one random 80-bit prefix (again in a forked child, through
:func:`os.register_at_fork`) and counts.
The ids stay unguessable to anyone who does not know the prefix, like uuid4's.

>>> a, b = unique_id(), unique_id()
>>> a != b and len(a) == len(b) == 32
True
"""

from __future__ import annotations

import itertools
import os
import threading

__all__ = ["unique_id"]

_lock = threading.Lock()
_prefix = ""
_counter = itertools.count()


def _new_prefix() -> None:
    """A fresh prefix and count (first use, and in a forked child)."""
    global _prefix, _counter, _lock
    _lock = threading.Lock()  # a child may inherit it held by a thread it lacks
    _prefix = ""
    _counter = itertools.count()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_prefix)


def unique_id() -> str:
    """32 hex digits, unique across processes and calls (thread-safe)."""
    global _prefix
    prefix = _prefix
    if not prefix:  # first use here (or since a fork)
        with _lock:
            if not _prefix:
                _prefix = os.urandom(10).hex()
            prefix = _prefix
    # next() on itertools.count is atomic under the GIL
    return f"{prefix}{next(_counter):012x}"
