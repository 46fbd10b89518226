"""A client's direct run of a whole DAG: its order, and running it in one worker thread.

A client sends a DAG with several sources placed wholly on one executor as a
single trigger marked ``whole_run`` (:func:`~droplet.client._direct.triggers_for`).
The executor's fast lane runs such a run of plain ``def`` functions from start
to reply in one worker thread (:func:`run_whole`): every function in
topological order, each fed its upstream results in ``connections`` order, as
the ordinary path's fan-in does. Otherwise the trigger stands for one trigger
per source (:func:`whole_run_sources`) and the run takes the ordinary path.

Pure code, no I/O: what the functions read goes through their user library.
"""

from __future__ import annotations

import time
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

__all__ = ["Plan", "plan_of", "run_whole", "whole_run_sources"]

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


def run_whole(t: Trigger, plan: Plan, targets: list[Any], libs: list[UserLibrary],
              records: list[tuple[str, float, bool]]) -> tuple[Any, bool, int]:
    """In a worker thread: run every function of ``plan``; the sink's ``(value, failed)``
    and how many functions failed (or passed a failure on).

    As on the ordinary path: a function with a failed input does not run and
    passes the first failure (in ``connections`` order) on; each input is a
    private copy, a tuple splats, references resolve. Appends ``(function,
    seconds, failed)`` to ``records`` for each function that ran.
    """
    results: dict[str, tuple[Any, bool]] = {}
    failures = 0
    value: Any = None
    failed = False
    for fn, ups, target, lib in zip(plan.order, plan.upstream, targets, libs, strict=True):
        value, failed = None, False
        for src in ups:  # an upstream failure passes on first: this one does not run
            got, bad = results[src]
            if bad:
                value, failed = got, True
                break
        if not failed:
            started = time.perf_counter()
            value, failed = _call(t, fn, ups, target, lib, results)
            records.append((fn, time.perf_counter() - started, failed))
        if failed:
            failures += 1
        results[fn] = (value, failed)
    return value, failed, failures


def _call(t: Trigger, fn: str, ups: tuple[str, ...], target: Any, lib: UserLibrary,
          results: dict[str, tuple[Any, bool]]) -> tuple[Any, bool]:
    args: list[Any] = []
    carried: list[Any] = []
    try:
        if fn in t.arg_fns:
            args = list(loads(t.arg_blobs[t.arg_fns.index(fn)]))
        for src in ups:
            try:
                copy = private(results[src][0])
            except Exception as exc:  # as forwarding it would: the producer's error
                return _Failure(function_error(exc, src)), True
            carried += [lib.get(a.key, a.deserialize) if isinstance(a, DropletReference)
                        else a for a in spread(copy)]
        return target(lib, *args, *carried), False
    except Exception as exc:
        return _Failure(function_error(exc, fn)), True
