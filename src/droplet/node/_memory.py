"""Keep freed memory warm in node processes: big values cost a copy, not page faults.

An executor rebuilds every big argument it receives (a 50 MiB ``bytes`` is
copied out of the received frame once). glibc serves allocations that big
with a fresh ``mmap`` and unmaps them when freed, so each call pays for
faulting in, zeroing and unmapping every page again: on a small VM that costs
several times the copy itself (about 130 ms instead of 17 ms for 50 MiB). A
node process therefore asks glibc to serve big allocations from its heap and
to keep up to :data:`RETAIN_BYTES` of freed memory for the next call.

It also asks for one malloc arena for all its threads. Without that, glibc
gives threads arenas of their own once several allocate at the same time (a
burst of concurrent calls does it), and an arena other than the main one grows
in heaps of at most 64 MiB that it unmaps as soon as they are empty: a 50 MiB
argument unpickled in a worker thread then got a fresh heap, faulted in page by
page, on every call from the burst on (12,800 page faults and about 130 ms of
CPU per call, the p99 tail of the big-argument rows run after the throughput
row). With the GIL, one arena costs next to no lock contention. Call
:func:`keep_freed_memory` before the process starts any thread: arenas that
exist already stay in use.

Only executor processes do this (``python -m droplet.node --role executor``,
which is also what an all-in-one node runs its executor workers as): their big
values live for one call, so the memory kept is reused call after call. The
store, which keeps values for long, and embedded clusters and clients, which
share their host process, leave the allocator alone. Set
``DROPLET_RETAIN_MEMORY`` to a number of bytes to change how much is kept, or
to ``0`` to leave glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["RETAIN_BYTES", "keep_freed_memory"]

#: Freed memory a node process keeps for later allocations (4 default-size frames).
RETAIN_BYTES = 256 * 1024 * 1024
ENV = "DROPLET_RETAIN_MEMORY"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Tune glibc's malloc as described above; False where there is nothing to tune."""
    value = (os.environ if environ is None else environ).get(ENV, "")
    try:
        retain = int(value) if value else RETAIN_BYTES
    except ValueError:
        raise ValueError(f"{ENV} must be a number of bytes, not {value!r}") from None
    if retain <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; musl has no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    retain = min(retain, 2**31 - 1)
    return (bool(mallopt(_M_ARENA_MAX, 1)) and bool(mallopt(_M_MMAP_MAX, 0))
            and bool(mallopt(_M_TRIM_THRESHOLD, retain)))
