"""Ids from a per-process prefix and a counter (droplet.ids)."""

from __future__ import annotations

import os
import select
import signal
import sys
import threading

import pytest

from droplet import ids
from droplet.ids import unique_id


def test_ids_are_unique_across_threads() -> None:
    seen: list[list[str]] = []

    def draw() -> None:
        seen.append([unique_id() for _ in range(5000)])

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for batch in seen for i in batch]
    assert len(set(flat)) == len(flat) == 20000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in flat)


def _in_child(hold_lock: bool) -> str:
    """An id drawn in a forked child ('' if it did not answer within 10 s)."""
    read_end, write_end = os.pipe()
    if hold_lock:  # as if another thread were drawing the first prefix as we fork
        ids._lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: no pytest from here on
            try:
                os.write(write_end, unique_id().encode())
            finally:
                os._exit(0)
    finally:
        if hold_lock:
            ids._lock.release()
    os.close(write_end)
    try:
        ready = select.select([read_end], [], [], 10)[0]
        return os.read(read_end, 64).decode() if ready else ""
    finally:
        os.close(read_end)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_draws_its_own_prefix() -> None:
    mine = unique_id()
    child = _in_child(hold_lock=False)
    assert len(child) == 32
    assert child[:20] != mine[:20]  # not the parent's prefix (nor its counter's ids)
    assert unique_id()[:20] == mine[:20]


@pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_the_lock_is_held_does_not_hang() -> None:
    ids._new_prefix()  # this process's first id is still to be drawn
    child = _in_child(hold_lock=True)
    assert len(child) == 32
