"""Direct runs sent from a caller's thread, run by a worker thread, no event loop between.

A synchronous client of an embedded cluster (:class:`~droplet.LocalCluster`)
lives in the caller's thread, and its cluster's event loop in another. The
ordinary way, a call wakes the loop's thread, which wakes a worker thread,
which wakes the loop again with the result, which wakes the caller: four
thread wakeups (70-300 us each on a small machine). Over an in-process
connection that carries objects, the caller's thread may instead hand the
trigger straight to the executor (``InprocConnection.offer_from_thread``,
``Peer.submit_from_thread``): when it qualifies, :meth:`ThreadCalls.try_start`
(still in the caller's thread) queues it for a worker thread, which runs the
functions, pickles the result and hands the reply straight back to the
caller's thread (``Peer.reply_from_thread``). Two wakeups, none of the loop.

What qualifies is what the fast lane takes from a client (see ``fastlane.py``)
and more narrowly: a direct run's source trigger whose whole run is one
pipeline of loaded ``def`` functions on this executor, without reference
arguments, at NORMAL consistency, no multi-exec, batching, continuation,
output key or deadline, and a result for the caller only
(``store_result=False``). Anything else goes the ordinary way (the caller's
thread hands it to the loop).

A caller's thread that waits for such a run (``future.get()``) may run it
itself when no worker thread has started it yet (:class:`Claim`): then the
call costs no thread wakeup at all on its way. A blocking function would keep
the caller past its ``get(timeout=...)``, so the caller only runs calls whose
functions are known to return quickly: each one's last :data:`QUICK_RUNS`
runs from callers' threads (on this executor, of its current version) all took under
:data:`QUICK_SECONDS`, and the caller's timeout is at least
:data:`HERE_MIN_TIMEOUT`. Anything else (a new function, one slow lately, a
short timeout) waits for its worker thread, so its timeout holds exactly.
The price of the rule: a function that was quick QUICK_RUNS times in a row
and then blocks makes that one ``get()`` return when it finishes, past its
timeout (with the right result). A worker thread is still woken when the
call is queued, except a quick one, which is left to its caller for
:data:`LEAVE_TO_CALLER` seconds only (see :class:`_Keeper`), so a call nobody
waits for still runs.

Nothing here touches the executor's loop-side state from a foreign thread:
the running gauges are this object's own (under a lock), and what the loop
keeps (invocation, failure and latency counts, mailboxes) is settled in the
loop in batches (:meth:`settle`), as the fast lane does.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..errors import DropletError
from ..protocol.messages import DagResult, ErrorReply, Trigger
from ..rpc import Peer
from .direct import check_direct
from .fastlane import FastLane
from .inline import plain_client_run, whole_pipeline
from .outcomes import pickle_value
from .steps import RunContext, interrupted
from .user_library import UserLibrary

if TYPE_CHECKING:
    from .service import ExecutorService

__all__ = ["HERE_MIN_TIMEOUT", "LEAVE_TO_CALLER", "QUICK_RUNS", "QUICK_SECONDS", "Claim",
           "ThreadCalls",
           "take_claim"]

log = logging.getLogger("droplet.executor")

_Done = tuple[list[str], float, bool, list[UserLibrary]]

#: A caller's thread runs a call itself only when each of its functions' last
#: QUICK_RUNS runs from callers' threads took under QUICK_SECONDS each...
QUICK_RUNS = 16
QUICK_SECONDS = 0.005
#: ... and the caller waits for it at least this long (a shorter timeout is
#: always waited out in the caller's thread, exactly).
HERE_MIN_TIMEOUT = 1.0
#: Seconds a quick run is left to its caller (who usually waits for it at once)
#: before a worker thread runs it.
LEAVE_TO_CALLER = 0.002
#: Seconds without quick runs after which the thread keeping them ends.
KEEPER_IDLE = 1.0

#: The Claim of the run the current thread queued last (see take_claim).
_queued = threading.local()


class Claim:
    """A run queued for a worker thread that its caller may run instead.

    Whoever takes it first runs it: a worker thread (:meth:`by_worker`), or the
    caller's thread waiting for its result (:meth:`run_here`). ``quick``: its
    functions are known to return quickly (see the module docstring).
    """

    __slots__ = ("_job", "_owner", "_queued", "_taken", "quick")

    def __init__(self, owner: ThreadCalls, job: functools.partial[None], quick: bool) -> None:
        self._owner = owner
        self._job: functools.partial[None] | None = job
        self._taken = threading.Lock()
        self.quick = quick
        self._queued = time.perf_counter()

    def _take(self) -> functools.partial[None] | None:
        if not self._taken.acquire(False):
            return None
        job, self._job = self._job, None
        return job

    @property
    def taken(self) -> bool:
        return self._taken.locked()

    def by_worker(self) -> None:
        """In a worker thread: run it, unless its caller took it."""
        job = self._take()
        if job is not None:
            job()

    def run_here(self, timeout: float) -> bool:
        """In the caller's thread, about to wait up to ``timeout`` seconds for the
        result: run it now if it is quick and no worker took it. True: it ran
        here (its reply has been delivered)."""
        if not self.quick:
            return False
        if timeout < HERE_MIN_TIMEOUT or trio.lowlevel.in_trio_run():
            # Ours to wait out, or a thread running a Trio loop of its own (where a
            # function's blocking ``lib.get`` would refuse to run): a worker runs it now.
            self._owner._keeper.hand_over(self)
            return False
        job = self._take()
        if job is None:
            return False
        owner = self._owner
        with owner._lock:
            owner.ran_here += 1
        job()
        if interrupted.set:  # Ctrl-C during the function: its call failed, the caller stops
            interrupted.set = False
            raise KeyboardInterrupt
        return True


class _Keeper:
    """Holds quick runs for their callers, and hands those not taken within
    LEAVE_TO_CALLER seconds to the worker threads.

    Queuing a run with the worker threads would wake one per call (a write to
    its pipe from the caller's thread, which then competes with the caller for
    the GIL), only for it to find the run taken. The keeper is one thread per
    executor that wakes once per LEAVE_TO_CALLER while runs come in (seeing
    to all of them at once), and only the first run after a pause wakes it;
    it ends after KEEPER_IDLE seconds without runs.
    """

    def __init__(self, start: Callable[[Claim], None], name: str) -> None:
        self._start = start
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._claims: deque[Claim] = deque()
        self._thread: threading.Thread | None = None
        self._parked = False  # waiting with no run to see to: adding one must wake it

    def add(self, claim: Claim) -> None:
        with self._cond:
            self._claims.append(claim)
            if self._thread is None:
                self._thread = threading.Thread(target=self._keep, name=self._name,
                                                daemon=True)
                self._thread.start()
            elif self._parked:
                self._parked = False
                self._cond.notify()

    def hand_over(self, claim: Claim) -> None:
        """``claim`` is not its caller's to run: to a worker thread now (once)."""
        if not claim.taken:
            self._start(claim)

    def _keep(self) -> None:
        cond, claims = self._cond, self._claims
        while True:
            due: list[Claim] = []
            with cond:
                if not claims:
                    self._parked = True
                    cond.wait(KEEPER_IDLE)
                    if not claims:  # idle: end (the next run starts another)
                        self._thread = None
                        self._parked = False
                        return
                    self._parked = False
                now = time.perf_counter()
                while claims and claims[0]._queued + LEAVE_TO_CALLER <= now:
                    due.append(claims.popleft())
                if not due:
                    cond.wait(claims[0]._queued + LEAVE_TO_CALLER - now)
                    continue
            for claim in due:
                self.hand_over(claim)


def take_claim() -> Claim | None:
    """The Claim of the run this thread's last offer queued (once), if any."""
    claim: Claim | None = getattr(_queued, "claim", None)
    if claim is not None:
        _queued.claim = None
    return claim



def _plain(target: Any) -> bool:
    """A function a worker thread can run (not ``async def``)."""
    return not inspect.iscoroutinefunction(target)

class ThreadCalls:
    """Starts eligible direct runs from callers' threads; settles them in the loop."""

    def __init__(self, service: ExecutorService, max_invocations: int) -> None:
        self._svc = service
        self._max = max_invocations
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        #: runs started here and not finished: runs, and functions running.
        self.active = 0
        self.running = 0
        #: finished runs, settled in the loop.
        self.done: deque[_Done] = deque()
        #: runs started this way (statistics; updated in the loop).
        self.calls = 0
        #: runs their callers' threads ran themselves (Claim.run_here).
        self.ran_here = 0
        #: per function and version (registered again, it proves itself again):
        #: its latest runs from callers' threads in a row that were quick.
        self._streaks: dict[tuple[str, str], int] = {}
        self._keeper = _Keeper(self._to_worker, f"{service.url}-keeper")

    def _quick(self, keys: list[tuple[str, str]]) -> bool:
        streaks = self._streaks
        return all(streaks.get(key, 0) >= QUICK_RUNS for key in keys)

    @staticmethod
    def _keys(t: Trigger, segment: list[str]) -> list[tuple[str, str]]:
        return [(fn, t.versions[t.functions.index(fn)]) for fn in segment]

    def try_start(self, t: Trigger, peer: Peer, request_id: int) -> bool:
        """From a caller's thread: queue ``t`` for a worker thread if it qualifies."""
        svc = self._svc
        if (not plain_client_run(t) or svc._threads.closed
                or svc._active + self.active >= self._max):
            return False
        try:
            check_direct(t, svc.url)
        except DropletError:
            return False  # the loop's path refuses it, saying why
        found = whole_pipeline(svc, t, _plain)
        if found is None:
            return False
        segment, targets = found
        run = RunContext(t.run_id, t.consistency, t.client_id or f"run-{t.run_id}")
        libs = []
        for _ in segment:  # reachable by id for mail, as the loop's libraries are
            lib = UserLibrary(svc, f"{svc.url}/t{next(self._ids)}", run)
            svc._libraries[lib.getid()] = lib  # one dict store: atomic
            libs.append(lib)
        with self._lock:
            self.active += 1
            self.running += len(segment)
        claim = Claim(self, functools.partial(self._job, t, segment, targets, libs, peer,
                                              request_id, time.perf_counter()),
                      self._quick(self._keys(t, segment)))
        if claim.quick:  # left to its caller for a moment (see _Keeper)
            self._keeper.add(claim)
        else:
            try:
                svc._threads.start(claim.by_worker, label=t.function)
            except RuntimeError:  # the pool shut down meanwhile: the loop's path says so
                self._finished(segment, 0.0, False, libs, counted=False)
                return False
        _queued.claim = claim
        return True

    def _to_worker(self, claim: Claim) -> None:
        """A quick run its caller did not take: to a worker thread (or, once the
        workers are shut down, run here: its caller must still hear)."""
        try:
            self._svc._threads.start(claim.by_worker, label="a call left to its caller")
        except RuntimeError:
            claim.by_worker()

    def _job(self, t: Trigger, segment: list[str], targets: list[Any],
             libs: list[UserLibrary], peer: Peer, request_id: int, started: float) -> None:
        """In a worker thread (or the caller's: Claim.run_here): run the pipeline,
        answer the caller's thread."""
        failed = True
        elapsed, ran = 0.0, math.inf  # a run that did not finish is never quick
        began = time.perf_counter()
        try:
            value, failed = FastLane._run(t, segment, targets, libs)
            done = time.perf_counter()
            elapsed, ran = done - started, done - began
            reply: Any = DagResult(t.run_id, pickle_value(value), failed)
        except BaseException:  # our bug, not the function's: never leave a caller waiting
            log.exception("run %s: running %s from a caller's thread failed",
                          t.run_id, t.function)
            reply = ErrorReply("DropletError", f"executor {self._svc.url} could not run "
                               f"{t.function!r}; see its log")
        # Counted before the reply: whoever hears of the result sees the run done.
        self._finished(segment, elapsed, failed, libs, ran=ran, keys=self._keys(t, segment))
        try:
            if not peer.reply_from_thread(request_id, reply):
                # Not taken (too big for the connection, the caller gone): the loop
                # replies the ordinary way (an error naming the limit, or nothing).
                self._svc.trio_token.run_sync_soon(
                    functools.partial(_reply_in_loop, peer, request_id, reply))
        except trio.RunFinishedError:
            pass  # the executor is gone, and its callers' connections with it
        except Exception:
            log.exception("run %s: could not answer its caller", t.run_id)

    def _finished(self, segment: list[str], elapsed: float, failed: bool,
                  libs: list[UserLibrary], counted: bool = True, ran: float = 0.0,
                  keys: list[tuple[str, str]] | None = None) -> None:
        with self._lock:
            self.active -= 1
            self.running -= len(segment)
            if keys:
                streaks = self._streaks
                quick = ran < QUICK_SECONDS
                for key in keys:
                    streaks[key] = streaks.get(key, 0) + 1 if quick else 0
        self.done.append((segment if counted else [], elapsed, failed, libs))

    def settle(self) -> None:
        """In the loop: count what finished since the last time."""
        svc, done = self._svc, self.done
        while done:
            segment, elapsed, failed, libs = done.popleft()
            for lib in libs:
                svc._libraries.pop(lib.getid(), None)
            if not segment:
                continue
            self.calls += 1
            svc._invocations += len(segment)
            if failed:
                svc._failures += 1
            for fn in segment:
                svc.recorder.record(fn, elapsed, failed)


def _reply_in_loop(peer: Peer, request_id: int, msg: Any) -> None:
    try:
        peer.post_reply(request_id, msg, acquired=False)
    except DropletError as exc:
        log.debug("the caller of a direct run went away: %s", exc)
    except Exception:
        log.exception("could not answer %s", peer.remote)

