"""A client's direct run of a whole DAG: its order, and running it in one worker thread.

A client sends a DAG with several sources placed wholly on one executor as a
single trigger marked ``whole_run`` (:func:`~droplet.client._direct.triggers_for`).
The executor's fast lane runs such a run of plain ``def`` functions from start
to reply in worker threads (:class:`WholeRun`), with no task, event or
message in the event loop: each function is fed its upstream results in
``connections`` order, as the ordinary path's fan-in does, and whoever runs
the sink answers the caller. Otherwise the trigger stands for one trigger per
source (:func:`whole_run_sources`) and the run takes the ordinary path.

No I/O here: what the functions read goes through their user library.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from ..errors import _Failure
from ..protocol.messages import Trigger
from ..references import DropletReference
from ..serialization import loads
from .copies import private
from .multiexec import spread
from .outcomes import function_error
from .user_library import UserLibrary

__all__ = ["HELPER_DELAY", "Helpers", "Plan", "WholeRun", "plan_of", "whole_run_sources"]

#: Plans kept (one per DAG shape); past it the cache starts again.
MAX_PLANS = 256
#: Seconds ready functions of a whole run may wait for a claimer before more
#: are asked for (see :class:`WholeRun`), and seconds with no run to watch
#: before the watcher's thread parks.
HELPER_DELAY = 0.002
WATCH_IDLE = 0.05

log = logging.getLogger("droplet.executor")


@attrs.frozen
class Plan:
    """A DAG's functions in topological order, each with its upstream functions."""

    order: tuple[str, ...]
    upstream: tuple[tuple[str, ...], ...]
    #: the same by position in ``order``: each function's upstream and downstream ones.
    up: tuple[tuple[int, ...], ...] = attrs.field(init=False, eq=False, repr=False)
    down: tuple[tuple[int, ...], ...] = attrs.field(init=False, eq=False, repr=False)
    sources: int = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        index = {fn: i for i, fn in enumerate(self.order)}
        up = tuple(tuple(index[src] for src in ups) for ups in self.upstream)
        down: list[list[int]] = [[] for _ in self.order]
        for i, ups in enumerate(up):
            for j in ups:
                down[j].append(i)
        object.__setattr__(self, "up", up)
        object.__setattr__(self, "down", tuple(tuple(d) for d in down))
        object.__setattr__(self, "sources", sum(1 for u in up if not u))


_plans: dict[tuple[tuple[str, ...], tuple[tuple[str, ...], ...]], Plan | None] = {}


def plan_of(functions: list[str], edges: list[list[str]]) -> Plan | None:
    """The order to run a DAG in; None unless it is acyclic with exactly one sink.

    >>> plan_of(["a", "b", "c"], [["a", "c"], ["b", "c"]])
    Plan(order=('a', 'b', 'c'), upstream=((), (), ('a', 'b')))
    >>> plan_of(["a", "b"], [["a", "b"], ["b", "a"]]) is None
    True
    """
    key = (tuple(functions), tuple(tuple(e) for e in edges))
    try:
        return _plans[key]
    except KeyError:
        pass
    plan = _make_plan(functions, edges)
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[key] = plan
    return plan


def _make_plan(functions: list[str], edges: list[list[str]]) -> Plan | None:
    if len(set(functions)) != len(functions):
        return None
    upstream = {fn: tuple(src for src, dst in edges if dst == fn) for fn in functions}
    if sum(1 for fn in functions if not any(src == fn for src, _ in edges)) != 1:
        return None  # no sink, or several: whose result would the caller get?
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(functions):
        ready = [fn for fn in functions
                 if fn not in done and all(src in done for src in upstream[fn])]
        if not ready:
            return None  # a cycle
        order += ready
        done.update(ready)
    return Plan(tuple(order), tuple(upstream[fn] for fn in order))


def whole_run_sources(t: Trigger) -> list[Trigger]:
    """One ordinary trigger per source function of ``t``'s run (``t``'s own first)."""
    fed = {dst for _, dst in t.edges}
    sources = [fn for fn in t.functions if fn not in fed and fn != t.function]
    return [attrs.evolve(t, whole_run=False),
            *(attrs.evolve(t, function=fn, whole_run=False) for fn in sources)]


class WholeRun:
    """One whole run in worker threads: which functions are ready, and their results.

    The functions of a run run concurrently, as on the ordinary path (two
    sources may wait for each other's messages), but without paying a thread
    wakeup per function when they are quick: one *claimer* job starts the run
    and claims ready functions until none is left, going on downstream itself
    when its result completes a function's inputs. While it runs a function
    with others ready and unclaimed, the run is watched (:class:`Helpers`):
    if they are still unclaimed a moment later (``HELPER_DELAY``), more
    claimers are asked for (``more(run, n)``), one per function ready or
    running beyond the claimers there are. So a function that blocks, say
    waiting for its sibling's message, holds up its siblings for about a
    millisecond, never for good.
    """

    def __init__(self, t: Trigger, plan: Plan, targets: list[Any], libs: list[UserLibrary],
                 more: Callable[[WholeRun, int], None], watch: Callable[[WholeRun], None]
                 ) -> None:
        self.t = t
        self.plan = plan
        self._targets = targets
        #: the functions' user libraries (in ``plan.order``).
        self.libs = libs
        self._more = more
        self._watch = watch
        self._lock = threading.Lock()
        self._upstream = plan.up
        self._downstream = plan.down
        self._waiting = [len(ups) for ups in plan.up]
        self._ready = deque(i for i, ups in enumerate(plan.up) if not ups)
        self._results: list[tuple[Any, bool]] = [(None, False)] * len(plan.order)
        #: claimers started (or asked for) and not yet returned.
        self.claimers = 1
        self._running = 0
        self._watched = False
        #: ``(function, seconds, failed)`` for each function that ran.
        self.records: list[tuple[str, float, bool]] = []
        #: functions that failed or passed a failure on.
        self.failures = 0
        self._over = False

    def claim(self) -> tuple[Any, bool] | None:
        """Run ready functions until none is left; the sink's ``(value, failed)`` when
        this claimer ran it (then it answers the caller), else None."""
        sink = len(self.plan.order) - 1  # one sink, so last in topological order
        with self._lock:
            if not self._ready:
                self.claimers -= 1
                return None
            i = self._ready.popleft()
            self._running += 1
            watch = self._left_waiting()
        while True:
            if watch:
                self._watch(self)
            value, failed = self._run_one(i)
            if i == sink:
                return value, failed
            with self._lock:
                self._running -= 1
                self._results[i] = (value, failed)
                for j in self._downstream[i]:
                    self._waiting[j] -= 1
                    if self._waiting[j] == 0:
                        self._ready.append(j)
                if not self._ready:
                    self.claimers -= 1
                    return None
                i = self._ready.popleft()
                self._running += 1
                watch = self._left_waiting()

    def _left_waiting(self) -> bool:
        """(Under the lock.) Whether ready functions now wait for a claimer and the
        run is not watched yet: then it is (True: the caller tells the watcher)."""
        if self._watched or self._running + len(self._ready) <= self.claimers:
            return False
        self._watched = True
        return True

    def helpers_due(self) -> int | None:
        """For the watcher, a while after the run was watched: how many more claimers
        to ask for now; None: the run needs watching no more."""
        with self._lock:
            self._watched = False
            wanted = self._running + len(self._ready) - self.claimers
            if not self._ready or wanted <= 0:
                return None
            self.claimers += wanted
        self._more(self, wanted)
        return wanted

    def over(self) -> bool:
        """True the first time only: whoever calls it first settles the run."""
        with self._lock:
            over, self._over = self._over, True
        return not over

    def _run_one(self, i: int) -> tuple[Any, bool]:
        fn = self.plan.order[i]
        for j in self._upstream[i]:  # an upstream failure passes on: this one does not run
            got, bad = self._results[j]
            if bad:
                with self._lock:
                    self.failures += 1
                return got, True
        started = time.perf_counter()
        inputs = [self._results[j][0] for j in self._upstream[i]]
        value, failed = _call(self.t, fn, self.plan.upstream[i], inputs, self._targets[i],
                              self.libs[i])
        self.records.append((fn, time.perf_counter() - started, failed))
        if failed:
            with self._lock:
                self.failures += 1
        return value, failed


class Helpers:
    """The watcher of whole runs whose ready functions wait for a claimer (one thread).

    A claimer that runs a function while others of its run are ready hands
    the run here (a list append, no wakeup while the watcher is awake); every
    ``delay`` seconds the watcher looks at the runs handed in before its last
    look and asks for claimers for those whose functions still wait. It
    parks after ``idle`` seconds with nothing to watch.
    """

    def __init__(self, delay: float = HELPER_DELAY, idle: float = WATCH_IDLE) -> None:
        self.delay = delay
        self.idle = idle
        self._runs: list[WholeRun] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._parked = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def __call__(self, run: WholeRun) -> None:
        with self._lock:
            if self._closed:
                return
            self._runs.append(run)
            parked = self._parked
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="droplet-whole-runs")
                self._thread.start()
        if parked:
            self._wake.set()

    def close(self) -> None:
        """Let the watcher's thread exit (the executor is going away)."""
        with self._lock:
            self._closed = True
            self._runs.clear()
        self._wake.set()

    def _loop(self) -> None:
        last = time.monotonic()
        watched: list[WholeRun] = []
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                self._parked = not watched and not self._runs and now - last > self.idle
                if self._parked:
                    self._wake.clear()
            if self._parked:
                self._wake.wait()
                last = time.monotonic()
                continue
            time.sleep(self.delay)
            for run in watched:  # handed in at least ``delay`` seconds ago
                try:
                    run.helpers_due()
                except Exception:  # the executor is going away (its loop is gone)
                    log.debug("could not ask for claimers for run %s", run.t.run_id,
                              exc_info=True)
            with self._lock:
                watched, self._runs = self._runs, []
            if watched:
                last = time.monotonic()


def _call(t: Trigger, fn: str, ups: tuple[str, ...], inputs: list[Any], target: Any,
          lib: UserLibrary) -> tuple[Any, bool]:
    """Call ``fn`` with its arguments and its upstream results (private copies, tuples
    splatted, references resolved); ``(value, failed)``."""
    args: list[Any] = []
    carried: list[Any] = []
    try:
        if fn in t.arg_fns:
            args = list(loads(t.arg_blobs[t.arg_fns.index(fn)]))
        for src, value in zip(ups, inputs, strict=True):
            try:
                copy = private(value)
            except Exception as exc:  # as forwarding it would: the producer's error
                return _Failure(function_error(exc, src)), True
            carried += [lib.get(a.key, a.deserialize) if isinstance(a, DropletReference)
                        else a for a in spread(copy)]
        return target(lib, *args, *carried), False
    except Exception as exc:
        return _Failure(function_error(exc, fn)), True
