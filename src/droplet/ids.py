"""Unique ids for calls and runs, without a system call each.

``uuid.uuid4()`` reads 16 bytes from the kernel per id; on the call path (a
result key per call in the client, a run id per call in the scheduler) that
was a measurable share of a no-op call on a busy machine. Instead each process
draws one random 128-bit prefix (again after a fork) and counts.
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
_pid = -1
_prefix = ""
_counter = itertools.count()


def unique_id() -> str:
    """32 hex digits, unique across processes and calls (thread-safe)."""
    global _pid, _prefix, _counter
    if _pid != os.getpid():  # first use, or a forked child: a prefix of its own
        with _lock:
            if _pid != os.getpid():
                _prefix = os.urandom(10).hex()
                _counter = itertools.count()
                _pid = os.getpid()
    # next() on itertools.count is atomic under the GIL
    return f"{_prefix}{next(_counter):012x}"
