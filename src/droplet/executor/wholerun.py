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

__all__ = ["Plan", "WholeRun", "plan_of", "whole_run_sources"]

#: Plans kept (one per DAG shape); past it the cache starts again.
MAX_PLANS = 256


@attrs.frozen
class Plan:
    """A DAG's functions in topological order, each with its upstream functions."""

    order: tuple[str, ...]
    upstream: tuple[tuple[str, ...], ...]


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
    sources may wait for each other's messages): one claimer thread per
    source is started, and each claims ready functions until none is left,
    going on downstream itself when its result completes a function's inputs.
    A claimer that finds nothing to do returns at once, so with plain quick
    functions the first claimer awake usually runs the whole run alone.
    Whenever more functions are ready or running than there are claimers
    (a fan-out), ``more(run, n)`` is asked for ``n`` more claimers.
    """

    def __init__(self, t: Trigger, plan: Plan, targets: list[Any], libs: list[UserLibrary],
                 more: Callable[[WholeRun, int], None]) -> None:
        self.t = t
        self.plan = plan
        self._targets = targets
        #: the functions' user libraries (in ``plan.order``).
        self.libs = libs
        self._more = more
        self._lock = threading.Lock()
        index = {fn: i for i, fn in enumerate(plan.order)}
        self._upstream = [tuple(index[src] for src in ups) for ups in plan.upstream]
        self._downstream: list[list[int]] = [[] for _ in plan.order]
        for i, ups in enumerate(self._upstream):
            for j in ups:
                self._downstream[j].append(i)
        self._waiting = [len(ups) for ups in self._upstream]
        self._ready = deque(i for i, ups in enumerate(self._upstream) if not ups)
        self._results: list[tuple[Any, bool]] = [(None, False)] * len(plan.order)
        #: claimers started (or asked for) and not yet returned.
        self.claimers = len(self._ready)
        self._running = 0
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
        while True:
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
                wanted = self._running + len(self._ready) - self.claimers
                if wanted > 0:
                    self.claimers += wanted
            if wanted > 0:
                self._more(self, wanted)

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
