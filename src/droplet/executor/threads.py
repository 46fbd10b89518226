"""A small pool of worker threads for user functions written as plain ``def``.

Why not ``trio.to_thread.run_sync``: it pays for a capacity limiter, context
copying and a per-call thread-cache handoff, about twice the cost of a bare
queue handoff on a small VM (measured: 288 us against 139 us per round trip).
Every call of a sync function crosses here, so this is the executor's hottest
hop. Workers are started lazily up to ``max_threads``; jobs queue beyond that.

A job cannot be interrupted once a worker runs it (Python cannot stop a
thread), so cancelling the waiting task waits for the job to finish, but only
for ``grace`` seconds (:data:`SHUTDOWN_GRACE`): then the task stops waiting,
a warning names the function, and the thread is abandoned (it is a daemon
thread, and its late result is thrown away). That bounds how long a function
that never returns can delay the shutdown of its executor.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import outcome
import trio

__all__ = ["SHUTDOWN_GRACE", "WorkerThreads"]

log = logging.getLogger("droplet.executor")

#: Seconds a cancelled caller (a shutting-down executor) still waits for its
#: running job before abandoning the thread.
SHUTDOWN_GRACE = 5.0


class _Abandoned(Exception):
    pass


class WorkerThreads:
    def __init__(self, max_threads: int = 32, name: str = "droplet-worker",
                 grace: float | None = None) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, not {max_threads}")
        self._max = max_threads
        self._name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # workers waiting for a job
        self._pending = 0  # jobs queued, not yet taken by a worker
        self._lock = threading.Lock()
        self._closed = False
        #: finished jobs' tasks and results, waiting for the loop to take them.
        self._done: deque[tuple[trio.lowlevel.Task, outcome.Outcome[Any]]] = deque()
        self._drain_pending = False
        self.grace = SHUTDOWN_GRACE if grace is None else grace
        #: jobs whose caller stopped waiting after the grace period.
        self.abandoned = 0
        #: jobs of start() running now: id -> label.
        self._started: dict[int, str] = {}
        #: set by finish_started: the event to set (in the loop) when they are all done.
        self._all_done: tuple[trio.Event, trio.lowlevel.TrioToken] | None = None

    @property
    def threads(self) -> int:
        """Worker threads started and not yet exited."""
        return sum(1 for t in self._threads if t.is_alive())

    @property
    def max_threads(self) -> int:
        """The most worker threads this pool starts."""
        return self._max

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (no new jobs)."""
        return self._closed

    @property
    def busy(self) -> int:
        """Worker threads running a job now."""
        return max(0, self.threads - self._idle)

    @property
    def queued(self) -> int:
        """Jobs waiting for a free worker thread."""
        return max(0, self._pending)

    async def run(self, fn: Callable[..., Any], *args: Any, label: str = "") -> Any:
        """Run ``fn(*args)`` in a worker thread; return its result or raise its error.

        ``label`` names the job in the warning when it is abandoned.
        """
        if self._closed:
            raise RuntimeError("worker threads are shut down")
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        delivered = [False]
        once = threading.Lock()

        def deliver(result: outcome.Outcome[Any]) -> None:
            with once:  # the job's result or the abandonment, whichever comes first
                if delivered[0]:
                    return
                delivered[0] = True
            self._finished(token, task, result)

        self._queue((fn, args, deliver))

        async def abandon_after_grace() -> None:
            await trio.sleep(self.grace)
            deliver(outcome.Error(_Abandoned()))

        def abort(_: Any) -> trio.lowlevel.Abort:
            # The thread runs on; wait for it, but only for the grace period.
            trio.lowlevel.spawn_system_task(abandon_after_grace)
            return trio.lowlevel.Abort.FAILED

        try:
            return await trio.lowlevel.wait_task_rescheduled(abort)
        except _Abandoned:
            self.abandoned += 1
            log.warning("%s is still running %g s after its executor began shutting down; "
                        "abandoning its thread", label or getattr(fn, "__name__", fn), self.grace)
            await trio.lowlevel.checkpoint()  # raises the pending Cancelled
            raise RuntimeError("worker thread abandoned") from None

    def start(self, fn: Callable[..., Any], *args: Any, label: str = "") -> None:
        """Queue ``fn(*args)`` for a worker thread and return at once.

        Nobody waits for it: ``fn`` reports its own outcome (an executor's fast
        lane writes the reply itself) and must not raise; if it does, the error
        is logged. :meth:`finish_started` gives such jobs the same grace period
        at shutdown as :meth:`run` gives its callers; ``label`` names the job
        in the warning when it is abandoned.
        """
        if self._closed:
            raise RuntimeError("worker threads are shut down")
        self._queue((fn, args, label))

    async def finish_started(self) -> None:
        """At shutdown: wait up to ``grace`` seconds for the jobs of :meth:`start`
        that are queued or running, then abandon (and name) those still running.

        """
        done = trio.Event()
        with self._lock:
            if self._started:
                self._all_done = (done, trio.lowlevel.current_trio_token())
        if self._all_done is not None:
            with trio.move_on_after(self.grace):
                await done.wait()
        with self._lock:
            self._all_done = None
            left = list(self._started.values())
            self._started.clear()
        for label in left:
            self.abandoned += 1
            log.warning("%s is still running %g s after its executor began shutting down; "
                        "abandoning its thread", label, self.grace)

    def _queue(self, job: tuple[Any, ...]) -> None:
        """Queue a job, starting a worker when none is idle (up to ``max_threads``)."""
        with self._lock:
            self._pending += 1
            spawn = self._pending > self._idle and len(self._threads) < self._max
        if spawn:
            thread = threading.Thread(target=self._work, name=f"{self._name}-"
                                      f"{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()
        self._jobs.put(job)

    def _finished(self, token: trio.lowlevel.TrioToken, task: trio.lowlevel.Task,
                  result: outcome.Outcome[Any]) -> None:
        """Hand a result to the loop. Under load, results of many jobs share one
        wakeup of the loop (one ``run_sync_soon``, a write to its wakeup socket)."""
        with self._lock:
            self._done.append((task, result))
            if self._drain_pending:
                return
            self._drain_pending = True
        try:
            token.run_sync_soon(self._drain)
        except trio.RunFinishedError:
            with self._lock:
                self._drain_pending = False
            raise

    def _drain(self) -> None:
        """In the loop: wake every task whose job finished."""
        with self._lock:
            done = list(self._done)
            self._done.clear()
            self._drain_pending = False
        for task, result in done:
            trio.lowlevel.reschedule(task, result)

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            with self._lock:
                self._idle += 1
            job = jobs.get()
            with self._lock:
                self._idle -= 1
                if job is not None:
                    self._pending -= 1
            if job is None:
                return
            fn, args, deliver = job
            if type(deliver) is str:  # started with start(): nobody to hand the result to
                with self._lock:
                    self._started[id(job)] = deliver or getattr(fn, "__name__", repr(fn))
                try:
                    fn(*args)
                except BaseException:
                    log.exception("a worker thread's job failed")
                finally:
                    with self._lock:
                        self._started.pop(id(job), None)
                        waiter = None if self._started else self._all_done
                    if waiter is not None:
                        try:
                            waiter[1].run_sync_soon(waiter[0].set)
                        except trio.RunFinishedError:
                            pass
                del job, fn, args
                continue
            result = outcome.capture(fn, *args)
            del job, fn, args
            try:
                deliver(result)
            except trio.RunFinishedError:
                pass
            del result, deliver

    def close(self) -> None:
        """Let the workers exit once the queued jobs are done (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
