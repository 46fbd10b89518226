"""The executor's fast lane: a plain call runs in a worker thread from start to reply.

The ordinary path costs several Trio task switches per call (a task per
invocation, the worker thread's result back into the loop, the outbox writer
woken by an event) at 10-15 us each on a small machine. A trigger that needs
none of what those tasks are for skips them all: the reader hands it straight
to a worker thread, which loads the arguments, runs the functions, pickles the
result once and writes the reply (or the scheduler's ``RunDone`` and the
result key, unless the trigger says ``store_result=False``: then only the
reply) itself on the socket (:meth:`droplet.rpc.Peer.write_from_thread`).
The loop is woken only when a write cannot complete at once.

A trigger takes the fast lane when the functions it starts here are one chain
of ``def`` functions that are loaded already (a source, or a function with one
upstream function, and the pipeline after it), whose result goes to the caller
or to other executors already connected, at NORMAL consistency, without
arguments that are references, multi-exec, batching, continuations, an output
key or a deadline already past, and when the connections its results go out on
can be written from a thread (plain TCP). A client's direct run of a whole
DAG that is not one chain (a fan-in, a fan-out; placed wholly here) takes it
too when all its functions are such: a claimer job runs its functions, more
claimers join when some wait (``wholerun.py``), and whoever runs the sink
replies. Anything else, or a lane that is switched off
(``ExecutorService(fast_lane=False)``), takes the ordinary path.
Robustness is the same on both: a function that raises becomes
the call's FunctionError; one that blocks holds only its own worker thread;
the caller's timeout is its own.

Bookkeeping (counters, latency records, mailboxes) is settled in the loop, in
batches, the next time the executor handles a message or reports its load.

On a plain-TCP connection read by a thread of its own (``transports/threadread.py``)
the lane starts from that thread (:meth:`FastLane.start_from_reader`): a call
with nothing else waiting runs right there, in the reader thread (one thread
wakeup per call, none of the loop), others go to the worker threads as above.
Such calls count themselves under a lock as they finish; the loop only adds up
the totals.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..consistency import NORMAL
from ..errors import DropletError, _Failure
from ..protocol.messages import DagResult, ErrorReply, KvsPut, RunDone, Trigger
from ..references import DropletReference
from ..rpc import Peer
from ..serialization import loads
from .downstream import arguments_for
from .multiexec import spread
from .outcomes import function_error, lww, pickle_result, pickle_value
from .reports import CallRecorder
from .steps import RunContext, build_steps, run_sync_steps
from .user_library import UserLibrary
from .wholerun import Helpers, WholeRun, plan_of

if TYPE_CHECKING:
    from .service import ExecutorService

__all__ = ["FastLane"]

log = logging.getLogger("droplet.executor")

#: Seconds a write the loop finishes for the fast lane may take (as SEND_TIMEOUT).
SEND_TIMEOUT = 60.0
#: Functions remembered as plain ``def`` functions (past it, the memory starts again).
MAX_PLAIN = 4096

#: a finished call: ``(function, seconds, failed)`` per function that ran, how many
#: failed, and its functions' user libraries.
_Done = tuple[list[tuple[str, float, bool]], int, list[UserLibrary]]


class FastLane:
    """Starts eligible triggers in worker threads and settles their bookkeeping."""

    def __init__(self, service: ExecutorService, max_invocations: int) -> None:
        self._svc = service
        self._max = max_invocations
        #: finished calls, appended by worker threads, settled in the loop.
        self.done: deque[_Done] = deque()
        #: Calls started from a connection's reader thread: counted by the threads
        #: themselves under ``_tlock`` (no per-call work for the loop, which only
        #: adds the totals up in ``settle``): running now, and finished since.
        self._tlock = threading.Lock()
        self.t_active = 0
        self.t_running = 0
        self._t_calls = 0
        self._t_invocations = 0
        self._t_unsettled = False
        self._t_failures = 0
        self._t_recorder = CallRecorder()
        self._ids = itertools.count(1)  # their user libraries' ids
        #: calls that took the fast lane (statistics).
        self.calls = 0
        #: the watcher that asks for more claimers for whole runs (wholerun.py).
        self.helpers = Helpers()
        #: function name -> its loaded code, once found to be a plain ``def``
        #: function (checked again whenever the loaded code is another object).
        self._plain: dict[str, Any] = {}

    def close(self) -> None:
        """The executor is going away: no more claimers are asked for."""
        self.helpers.close()

    # ---------------------------------------------------------------- in the loop

    def try_start(self, t: Trigger, peer: Peer | None, request_id: int) -> bool:
        """Start ``t`` in a worker thread if it qualifies; False: take the ordinary path."""
        job = self._prepare(t, peer, request_id, False)
        if job is None:
            return False
        self._svc._threads.start(*job[1:], label=t.function)
        return True

    def start_from_reader(self, t: Trigger, peer: Peer | None, request_id: int,
                          inline: bool) -> bool | Callable[[], None]:
        """From a connection's reader thread (``transports/threadread.py``): ``t``'s
        run, to run in that thread when ``inline`` (the run, a callable), else
        queued for a worker thread (True), if it qualifies; False: the loop's path.
        Thread-safe: nothing of the loop's state is changed here (see ``begun``)."""
        job = self._prepare(t, peer, request_id, True)
        if job is None:
            return False
        libs, fn, args = job[0], job[1], job[2:]
        if inline:  # (counted among the jobs the shutdown waits for, as in a worker)
            return functools.partial(self._svc._threads.run_here, fn, *args,
                                     label=t.function)
        try:
            self._svc._threads.start(*job[1:], label=t.function)
        except RuntimeError:  # the pool shut down meanwhile: the loop's path says so
            for lib in libs:
                self._svc._libraries.pop(lib.getid(), None)
            with self._tlock:
                self.t_active -= 1
                self.t_running -= len(libs)
                self._t_calls -= 1
                self._t_invocations -= len(libs)
            return False
        return True

    def _prepare(self, t: Trigger, peer: Peer | None, request_id: int, threaded: bool
                 ) -> tuple[Any, ...] | None:
        """The job that runs ``t`` (its user libraries, then the function and its
        arguments), counted as started, if ``t`` qualifies; None otherwise."""
        svc = self._svc
        active = svc._active + self.t_active
        if (t.carried is not None or t.consistency != NORMAL or t.failed
                or t.multiexec or t.batching or t.output_key is not None or t.scheduler
                or active >= self._max or svc._threads.closed
                or (t.deadline is not None and time.time() > t.deadline)):
            return None
        # Its results are written from the worker thread: on connections that can take that.
        if not (svc._kvs.thread_writes and svc._scheduler.thread_writes
                and (peer is None or peer.thread_writes)):
            return None
        if t.whole_run:
            return None if peer is None or not request_id else self._prepare_whole(
                t, peer, request_id, threaded)
        upstream = sum(1 for _, dst in t.edges if dst == t.function)
        if upstream != (0 if t.source is None else 1):
            return None  # a fan-in (or a loop): the ordinary path gathers inputs
        segment = svc._segment(t)
        last = segment[-1]
        downstream = [t.placement[t.functions.index(dst)]
                      for src, dst in t.edges if src == last]
        if svc.url in downstream:  # more to run here, after a fan-in or next to other branches
            # A client's run (placed wholly here): all of it, as a whole run.
            return None if peer is None or not request_id else self._prepare_whole(
                t, peer, request_id, threaded)
        peers: list[Peer] = []
        for url in downstream:
            found = svc._peers.peek(url)
            if found is None or not found.thread_writes:
                return None  # not connected yet: the ordinary path dials
            peers.append(found)
        targets = self._targets(t, segment)
        if targets is None:
            return None
        libs = self._begin(t, len(segment), threaded)
        return (libs, self._job, t, segment, targets, libs, peers, peer, request_id,
                time.perf_counter())

    def _prepare_whole(self, t: Trigger, peer: Peer, request_id: int, threaded: bool
                       ) -> tuple[Any, ...] | None:
        """A client's direct run of a whole DAG (a fan-in, a fan-out) in claimer threads."""
        plan = plan_of(t.functions, t.edges)
        if plan is None or (not t.whole_run and plan.sources != 1):
            return None  # (an older client sends the other sources' triggers itself)
        targets = self._targets(t, plan.order)
        if targets is None:
            return None
        libs = self._begin(t, len(plan.order), threaded)
        run = WholeRun(t, plan, targets, libs, functools.partial(self._more, peer, request_id),
                       self.helpers)
        return (libs, self._claim, run, peer, request_id)

    def _targets(self, t: Trigger, functions: Sequence[str]) -> list[Any] | None:
        """What to call for each of ``functions``; None unless all are loaded plain
        ``def`` functions (or built instances) without references in their arguments."""
        svc = self._svc
        targets: list[Any] = []
        plain = self._plain
        for fn in functions:
            loaded = svc._loader.peek(fn, t.versions[t.functions.index(fn)])
            if loaded is None:
                return None
            target = loaded.obj
            if plain.get(fn) is not target:  # not known to be a plain def function
                if isinstance(target, tuple):  # (cls, init_args): once built, its run method
                    if loaded.instance is None:
                        return None
                    target = loaded.instance.run
                if inspect.iscoroutinefunction(target):
                    return None
                if target is loaded.obj:
                    if len(plain) >= MAX_PLAIN:
                        plain.clear()
                    plain[fn] = target
            if svc._has_references(t, fn):
                return None
            targets.append(target)
        return targets

    def _begin(self, t: Trigger, functions: int, threaded: bool = False) -> list[UserLibrary]:
        """Count a call of ``functions`` functions as started; their user libraries.

        ``threaded``: from a thread other than the loop's, which counts it later."""
        svc = self._svc
        run = RunContext(t.run_id, t.consistency, t.client_id or f"run-{t.run_id}")
        if threaded:
            libs = _ThreadLibs()
            for _ in range(functions):  # reachable by id for mail, as the loop's are
                lib = UserLibrary(svc, f"{svc.url}/r{next(self._ids)}", run)
                svc._libraries[lib.getid()] = lib  # one dict store: atomic
                libs.append(lib)
            with self._tlock:  # counted as started now, as below (before any reply)
                self.t_active += 1
                self.t_running += functions
                self._t_calls += 1
                self._t_invocations += functions
                self._t_unsettled = True
            return libs
        svc._active += 1
        svc._running += functions
        svc._invocations += functions
        self.calls += 1
        return [svc._new_library(run) for _ in range(functions)]

    def settle(self) -> None:
        """Account for the calls worker threads finished since the last time."""
        svc, done = self._svc, self.done
        if self._t_unsettled:
            with self._tlock:
                self._t_unsettled = False
                calls, self._t_calls = self._t_calls, 0
                invocations, self._t_invocations = self._t_invocations, 0
                failures, self._t_failures = self._t_failures, 0
                recorder, self._t_recorder = self._t_recorder, CallRecorder()
            self.calls += calls
            svc._invocations += invocations
            svc._failures += failures
            svc.recorder.merge(recorder)
        while done:
            records, failures, libs = done.popleft()
            svc._active -= 1
            svc._running -= len(libs)
            svc._failures += failures
            for fn, elapsed, failed in records:
                svc.recorder.record(fn, elapsed, failed)
            for lib in libs:
                svc._libraries.pop(lib.getid(), None)

    async def _send_in_loop(self, peer: Peer, msgs: Sequence[Any]) -> None:
        try:
            with trio.fail_after(SEND_TIMEOUT):
                await peer.send_many(msgs)
        except (Exception, trio.TooSlowError) as exc:
            log.warning("could not deliver %s to %s: %s",
                        ", ".join(type(m).__name__ for m in msgs), peer.remote, exc)

    # ---------------------------------------------------------------- in a worker thread

    def _job(self, t: Trigger, segment: list[str], targets: list[Any],
             libs: list[UserLibrary], peers: list[Peer], peer: Peer | None, request_id: int,
             started: float) -> None:
        failed = True
        elapsed = 0.0
        try:
            value, failed = self._run(t, segment, targets, libs)
            elapsed = time.perf_counter() - started
            if peers:
                self._pass_on(t, segment[-1], value, failed, peers)
                return
            try:
                self._finish(t, value, failed, peer, request_id)
            except ValueError as exc:  # the result is too big for one frame
                # As the ordinary path does: the caller had its error reply; the
                # run's result key (and the scheduler) get this failure instead.
                too_big = _Failure(DropletError(
                    f"the result of {segment[-1]!r} is too large to send: {exc}"))
                failed = True
                self._finish(t, too_big, True, None, 0)
        except BaseException:  # our bug, not the function's: never leave a caller waiting
            log.exception("run %s: the fast lane failed running %s", t.run_id, t.function)
            if peer is not None and request_id:
                message = f"executor {self._svc.url} could not run {t.function!r}; see its log"
                self._soon(functools.partial(_reply_error, peer, request_id, message))
        finally:
            self._done(([(fn, elapsed, failed) for fn in segment], int(failed), libs))

    def _claim(self, run: WholeRun, peer: Peer, request_id: int) -> None:
        """A claimer of a whole run (see :class:`WholeRun`); who runs the sink answers."""
        t = run.t
        try:
            outcome = run.claim()
            if outcome is None:
                return
            value, failed = outcome
            try:
                self._finish(t, value, failed, peer, request_id)
            except ValueError as exc:  # the result is too big for one frame: as in _job
                too_big = _Failure(DropletError(
                    f"the result of {run.plan.order[-1]!r} is too large to send: {exc}"))
                run.failures += 0 if failed else 1
                self._finish(t, too_big, True, None, 0)
        except BaseException:  # our bug, not the function's: never leave a caller waiting
            log.exception("run %s: the fast lane failed running %s", t.run_id, t.function)
            if not run.over():
                return
            message = f"executor {self._svc.url} could not run {t.function!r}; see its log"
            self._soon(functools.partial(_reply_error, peer, request_id, message))
            self._done((run.records, max(1, run.failures), run.libs))
            return
        if run.over():
            self._done((run.records, run.failures, run.libs))

    def _done(self, record: _Done) -> None:
        """A call finished: settled in the loop, or here for a call a reader thread
        started (under the lock; the loop only adds up the totals)."""
        records, failures, libs = record
        if type(libs) is not _ThreadLibs:
            self.done.append(record)
            return
        libraries = self._svc._libraries
        for lib in libs:
            libraries.pop(lib.getid(), None)
        with self._tlock:
            self.t_active -= 1
            self.t_running -= len(libs)
            self._t_failures += failures
            self._t_unsettled = True
            for fn, elapsed, failed in records:
                self._t_recorder.record(fn, elapsed, failed)

    def _more(self, peer: Peer, request_id: int, run: WholeRun, claimers: int) -> None:
        """From the watcher of whole runs: ``claimers`` more for ``run``, started from
        the loop."""
        def start() -> None:
            for _ in range(claimers):
                self._svc._threads.start(self._claim, run, peer, request_id,
                                         label=run.t.function)
        self._soon(start)

    @staticmethod
    def _run(t: Trigger, segment: list[str], targets: list[Any], libs: list[UserLibrary]
             ) -> tuple[Any, bool]:
        carried: list[Any] = []
        if t.source is not None:  # the upstream result: a tuple splats, references resolve
            lib = libs[0]
            try:
                value = loads(t.result) if t.result is not None else None
                carried = [lib.get(a.key, a.deserialize) if isinstance(a, DropletReference)
                           else a for a in spread(value)]
            except Exception as exc:
                return _Failure(function_error(exc, segment[0])), True
        steps = build_steps(t, segment, targets, libs, False)
        if isinstance(steps, _Failure):
            return steps, True
        return run_sync_steps(steps, carried)

    def _pass_on(self, t: Trigger, last: str, value: Any, failed: bool,
                 peers: list[Peer]) -> None:
        """The result to the executors of the functions downstream (``_forward``'s sends)."""
        blob = pickle_value(value)
        downstream = [dst for src, dst in t.edges if src == last]
        for dst, peer in zip(downstream, peers, strict=True):
            trigger = attrs.evolve(t, function=dst, source=last, result=blob, failed=failed,
                                   causal=None, **arguments_for(t, dst))
            try:
                self._write(peer, [trigger])
            except ValueError as exc:  # too big for one frame: the error goes on instead
                too_big = _Failure(DropletError(
                    f"the result of {last!r} is too large to send: {exc}"))
                self._write(peer, [attrs.evolve(trigger, result=pickle_value(too_big),
                                                failed=True)])

    def _finish(self, t: Trigger, value: Any, failed: bool, peer: Peer | None,
                request_id: int) -> None:
        """The sink's result to whoever waits for it, as ``ExecutorService._forward`` does."""
        svc = self._svc
        blob = pickle_value(value)
        if peer is not None and request_id:  # a client's direct call: the reply first
            reply = DagResult(t.run_id, blob, failed)
            svc._threads.about_done()  # the rest is quick: a call queued now waits for us
            try:
                sent = peer.write_from_thread(reply, request_id, reply=True)
            except ValueError:  # too big: the loop's path replies with an error naming the limit
                sent = False
            if not sent:
                self._soon(functools.partial(_reply, peer, request_id, reply))
            if not t.store_result:  # the client stores it if its key is asked for
                return
        elif not t.store_result:  # its caller went away, and nobody else wants it
            return
        # A plain pickle serves the store as is: the result is pickled once.
        stored = blob if type(blob) is bytes else pickle_result(value)
        if peer is not None and request_id:
            self._write(svc._kvs, [KvsPut(t.result_key, lww(stored))])
        elif t.direct:
            self._write(svc._scheduler, [RunDone(t.run_id, blob, failed)])
        else:  # the caller reads the result key once it hears the run is done
            put, done = KvsPut(t.result_key, lww(stored)), RunDone(t.run_id, None, failed)
            if svc._scheduler is svc._kvs:
                self._write(svc._kvs, [put, done])
            else:
                self._write(svc._kvs, [put])
                self._write(svc._scheduler, [done])

    def _write(self, peer: Peer, msgs: list[Any]) -> None:
        """Write ``msgs`` in order from this thread; what cannot go now goes from the loop.

        Raises ValueError, before anything is written, for a message over the
        frame limit."""
        for i, msg in enumerate(msgs):
            if not peer.write_from_thread(msg):
                self._soon(functools.partial(self._svc._nursery.start_soon,
                                             self._send_in_loop, peer, msgs[i:]))
                return

    def _soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop (a callback that must not raise: it would end the run)."""
        def guarded() -> None:
            try:
                fn()
            except Exception:
                log.exception("the fast lane's hand-over to the event loop failed")
        try:
            self._svc.trio_token.run_sync_soon(guarded)
        except trio.RunFinishedError:
            pass  # the executor is gone, and its callers' connections with it


class _ThreadLibs(list[UserLibrary]):
    """The user libraries of a call a reader thread started (its threads count it)."""


def _reply(peer: Peer, request_id: int, msg: Any) -> None:
    try:
        peer.post_reply(request_id, msg)
    except DropletError as exc:
        log.debug("the caller of a direct run went away: %s", exc)


def _reply_error(peer: Peer, request_id: int, message: str) -> None:
    _reply(peer, request_id, ErrorReply("DropletError", message))
