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
import os
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import outcome
import trio

from ..held_replies import HeldReplies, hold_replies

__all__ = ["SHUTDOWN_GRACE", "WorkerThreads"]

log = logging.getLogger("droplet.executor")

#: Seconds a cancelled caller (a shutting-down executor) still waits for its
#: running job before abandoning the thread.
SHUTDOWN_GRACE = 5.0


#: Seconds the standby worker waits, while jobs are queued behind busy workers,
#: for one of them to finish a job before it takes a queued job itself. Under
#: load a worker runs queued jobs back to back (no thread switch between them);
#: a job that blocks (a sleep, I/O) gets company after this long, one more
#: worker per period while the queue makes no progress.
HELP_AFTER = 0.002


class _Abandoned(Exception):
    pass


class _Wake:
    """A worker's wakeup: a pipe on POSIX, whose write lets go of the GIL (so the
    woken worker need not wait for the waker to let go of it), else a lock."""

    __slots__ = ("_lock", "_r", "_w")

    def __init__(self) -> None:
        if os.name == "posix":
            self._r, self._w = os.pipe()
            self._lock: threading.Lock | None = None
        else:
            self._r = self._w = -1
            self._lock = threading.Lock()
            self._lock.acquire()

    def set(self) -> None:
        if self._lock is not None:
            try:
                self._lock.release()
            except RuntimeError:  # set already
                pass
        else:
            os.write(self._w, b"!")

    def wait(self, timeout: float | None = None) -> bool:
        if self._lock is not None:
            return self._lock.acquire(timeout=-1 if timeout is None else timeout)
        if timeout is not None and not select.select([self._r], [], [], timeout)[0]:
            return False
        os.read(self._r, 1)
        return True

    def close(self) -> None:
        if self._lock is None:
            os.close(self._r)
            os.close(self._w)


class _Worker:
    """One worker thread; parked (or standing by) on its own lock, so the waker
    chooses which one wakes (the most recently parked)."""

    __slots__ = ("freed", "held", "thread", "wake")

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        #: replies its jobs wrote while more jobs were queued (written in batches).
        self.held = HeldReplies()
        #: its job called about_done(): counted free already.
        self.freed = False
        self.wake = _Wake()


class WorkerThreads:
    def __init__(self, max_threads: int = 32, name: str = "droplet-worker",
                 grace: float | None = None) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, not {max_threads}")
        self._max = max_threads
        self._name = name
        self._jobs: deque[tuple[Any, ...]] = deque()
        self._lock = threading.Lock()
        #: every worker started and not exited; parked ones (last parked last).
        self._workers: list[_Worker] = []
        self._parked: list[_Worker] = []
        #: workers not parked (nor standby); of them, those between jobs (each
        #: looks at the queue before parking) and those running one.
        self._awake = 0
        self._free = 0
        self._busy = 0
        #: the worker that takes a queued job if the busy ones make no progress.
        self._standby: _Worker | None = None
        self._done_count = 0  # jobs done (the standby's measure of progress)
        self._local = threading.local()  # .worker: the _Worker of this thread
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
        return sum(1 for w in list(self._workers) if w.thread is not None and w.thread.is_alive())

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
        return self._busy

    @property
    def queued(self) -> int:
        """Jobs waiting for a free worker thread."""
        return len(self._jobs)

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

    def about_done(self) -> None:
        """Called by a job in its worker thread when all that is left is quick
        (say, writing its reply): the worker counts as free from now on, so a job
        queued meanwhile (the caller's next call, often) waits for it rather
        than waking another worker. A no-op outside a worker thread."""
        w = getattr(self._local, "worker", None)
        if w is None or w.freed:
            return
        with self._lock:
            w.freed = True
            self._busy -= 1
            self._free += 1

    def _queue(self, job: tuple[Any, ...]) -> None:
        """Queue a job; wake (or start) a worker only when no awake worker will take it.

        A worker between jobs looks at the queue before it parks, so a job queued
        then costs no wakeup at all; when every awake worker is running a job, a
        standby is named (see :data:`HELP_AFTER`) instead of waking another worker
        per job: under load one worker runs the jobs back to back, which is what
        the GIL allows anyway, with no thread switch between them.
        """
        with self._lock:
            self._jobs.append(job)
            if self._free:
                return
            if self._awake and self._standby is not None:
                return
            wake = self._call_locked(standby=self._awake > 0)
        if wake is not None:
            self._rouse(wake)

    def _call_locked(self, *, standby: bool) -> _Worker | None:
        """With the lock held: the parked worker (the most recently parked: its
        stack is warm) to wake as a worker (or as the standby), or a new one;
        None when all ``max_threads`` are busy already."""
        if self._parked:
            w = self._parked.pop()
        elif len(self._workers) < self._max:
            w = _Worker()
            self._workers.append(w)
        else:
            return None
        if standby:
            self._standby = w
        else:
            self._awake += 1
            self._free += 1
        return w

    def _rouse(self, w: _Worker) -> None:
        """Wake ``w`` (parked), or start its thread (new)."""
        if w.thread is None:
            w.thread = threading.Thread(target=self._work, args=(w,), name=f"{self._name}-"
                                        f"{len(self._workers) - 1}", daemon=True)
            w.thread.start()
        else:
            w.wake.set()

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

    def _work(self, w: _Worker) -> None:
        lock, jobs = self._lock, self._jobs
        seen = -1  # jobs finished when this worker, as the standby, last looked
        self._local.worker = w
        lock.acquire()
        while True:
            if self._standby is w:  # see HELP_AFTER
                held = [o.held for o in self._workers if o.held]
                if (jobs or held) and self._done_count == seen:  # no progress: help
                    lock.release()
                    for replies in held:  # earlier calls' replies go now
                        replies.flush()
                    lock.acquire()
                    if self._standby is not w:
                        continue
                    if not jobs:
                        seen = self._done_count
                        continue
                    self._standby = None
                    self._awake += 1
                    self._free += 1
                elif (jobs or held) and not self._closed:
                    seen = self._done_count
                    lock.release()
                    w.wake.wait(HELP_AFTER)
                    lock.acquire()
                    continue
                else:
                    self._standby = None
                    if self._closed:
                        break
                    seen = -1
                    self._parked.append(w)
                    lock.release()
                    w.wake.wait()
                    lock.acquire()
                    continue
            # awake, between jobs (counted in _free)
            if jobs:
                job = jobs.popleft()
                self._free -= 1
                self._busy += 1
                more = bool(jobs)
                if more and not self._free and self._standby is None:
                    helper = self._call_locked(standby=True)
                else:
                    helper = None
                lock.release()
                if helper is not None:
                    self._rouse(helper)
                if more:  # its reply waits for the next job's, to go in one write
                    hold_replies(w.held)
                else:
                    if w.held:
                        w.held.flush()
                    hold_replies(None)
                self._run_job(job)
                del job
                lock.acquire()
                if w.freed:
                    w.freed = False
                else:
                    self._busy -= 1
                    self._free += 1
                self._done_count += 1
                continue
            if w.held:  # nothing more to run: what it holds goes now
                lock.release()
                w.held.flush()
                lock.acquire()
                continue
            self._free -= 1
            self._awake -= 1
            if self._closed:
                break
            self._parked.append(w)
            lock.release()
            w.wake.wait()  # whoever wakes it counted it awake
            lock.acquire()
        self._workers.remove(w)
        lock.release()
        hold_replies(None)
        w.wake.close()

    def run_here(self, fn: Callable[..., Any], *args: Any, label: str = "") -> None:
        """Run ``fn(*args)`` in the calling thread (not one of the pool's) as a job of
        :meth:`start` would run: its errors logged, and counted among the jobs
        :meth:`finish_started` waits for (and names) at shutdown."""
        self._run_started((fn, args, label))

    def _run_started(self, job: tuple[Any, ...]) -> None:
        fn, args, label = job
        with self._lock:
            self._started[id(job)] = label or getattr(fn, "__name__", repr(fn))
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

    def _run_job(self, job: tuple[Any, ...]) -> None:
        fn, args, deliver = job
        if type(deliver) is str:  # started with start(): nobody to hand the result to
            self._run_started(job)
            return
        result = outcome.capture(fn, *args)
        del job, fn, args
        self.about_done()
        try:
            deliver(result)
        except trio.RunFinishedError:
            pass

    def close(self) -> None:
        """Let the workers exit once the queued jobs are done (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waking = list(self._parked)
            self._parked.clear()
            # each finds the queue empty (or helps drain it), then exits
            self._awake += len(waking)
            self._free += len(waking)
            if self._standby is not None:  # under the lock: it cannot have exited
                self._standby.wake.set()
        for w in waking:  # parked: none exits before it is woken
            w.wake.set()
