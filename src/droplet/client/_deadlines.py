"""Waiting for results with a timeout, without a cancel scope per wait.

``with trio.move_on_after(t): await event.wait()`` costs two cancel-scope
transitions per wait (about a tenth of an embedded call's CPU). A client's
futures instead park their waiting task here: the result's arrival wakes it
(:meth:`Deadlines.wake`), and one watcher task per client, asleep until the
earliest deadline, wakes those whose time ran out. With calls of one timeout
each new deadline comes after the earlier ones, so the watcher sleeps on
undisturbed; entries whose wait ended are dropped lazily (and the heap is
rebuilt when they outnumber the live ones), so it stays small.

Deadlines are on Trio's clock (``trio.current_time``), so a
``MockClock`` drives them as it drives ``move_on_after``.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import trio

__all__ = ["Deadlines", "Waiter"]

#: The heap is rebuilt when it holds more than this many entries and more than
#: twice as many as are still waiting.
COMPACT_AFTER = 64


class Waiter:
    """One parked task; ``task`` is None once it was woken (or cancelled)."""

    __slots__ = ("task",)

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task: trio.lowlevel.Task | None = task


class Deadlines:
    """Parks tasks until woken or their deadline; the watcher runs in ``nursery``."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._heap: list[tuple[float, int, Waiter]] = []
        self._seq = 0
        self._live = 0
        self._until = math.inf  # when the watcher wakes next
        self._kick: trio.Event | None = None  # set: the watcher must look again
        self._started = False
        self.closed = False

    async def park(self, waiters: list[Waiter], timeout: float) -> None:
        """Wait until :meth:`wake` wakes the waiter appended to ``waiters``, or for
        ``timeout`` seconds; the caller then looks at what it waited for."""
        task = trio.lowlevel.current_task()
        waiter = Waiter(task)
        waiters.append(waiter)
        deadline = trio.current_time() + timeout
        if not self._started:
            self._start()
        if self.closed:  # no watcher: wait as the plain way would
            with trio.move_on_at(deadline):
                await trio.lowlevel.wait_task_rescheduled(self._abort_for(waiter))
            return
        self._seq += 1
        self._live += 1
        heap = self._heap
        heapq.heappush(heap, (deadline, self._seq, waiter))
        if len(heap) > COMPACT_AFTER and len(heap) > 2 * self._live:
            self._heap = [entry for entry in heap if entry[2].task is not None]
            heapq.heapify(self._heap)
        if deadline < self._until and self._kick is not None:
            self._kick.set()
        await trio.lowlevel.wait_task_rescheduled(self._abort_for(waiter))

    def _abort_for(self, waiter: Waiter) -> Any:
        def abort(_: Any) -> trio.lowlevel.Abort:
            if waiter.task is not None:
                waiter.task = None
                self._live -= 1
            return trio.lowlevel.Abort.SUCCEEDED
        return abort

    def wake(self, waiters: list[Waiter]) -> None:
        """Wake every task parked on ``waiters`` (in the event loop)."""
        for waiter in waiters:
            task = waiter.task
            if task is not None:
                waiter.task = None
                self._live -= 1
                trio.lowlevel.reschedule(task)
        waiters.clear()

    def _start(self) -> None:
        self._started = True
        try:
            self._nursery.start_soon(self._watch)
        except RuntimeError:  # the client's nursery is closing: no watcher
            self.closed = True

    def close(self) -> None:
        """Stop the watcher (the client is closing); tasks still parked are woken,
        and later waits time out with a cancel scope of their own."""
        self.closed = True
        if self._kick is not None:
            self._kick.set()

    async def _watch(self) -> None:
        try:
            while not self.closed:
                now = trio.current_time()
                heap = self._heap
                while heap and (heap[0][0] <= now or heap[0][2].task is None):
                    _, _, waiter = heapq.heappop(heap)
                    task = waiter.task
                    if task is not None:  # its time ran out
                        waiter.task = None
                        self._live -= 1
                        trio.lowlevel.reschedule(task)
                self._until = heap[0][0] if heap else math.inf
                self._kick = kick = trio.Event()
                with trio.move_on_at(self._until):
                    await kick.wait()
        finally:
            self.closed = True
            self._kick = None
            for _, _, waiter in self._heap:  # never leave a task parked
                task = waiter.task
                if task is not None:
                    waiter.task = None
                    trio.lowlevel.reschedule(task)
            self._heap = []
            self._live = 0
