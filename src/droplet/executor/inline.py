"""Direct runs of ``async def`` functions that never suspend, run at once.

A run a client sent to this executor itself (see ``direct.py``) normally
becomes a Trio task: spawned, stepped, its result posted, at 10-15 us per
task switch on a small machine. When every function the run starts here is
an ``async def`` whose code has no suspension point at all (no ``await``,
``async for`` or ``async with``: see :func:`never_suspends`), its coroutine
finishes the moment it is first stepped, so there is nothing a task would
add: the executor steps the coroutines right where it received the trigger
(its connection's reader or, over an in-process connection that hands
messages over directly, the sender's task) and posts the reply there.

Everything else is the ordinary path's: arguments unpickled per function, a
private copy between functions, a new user library per invocation, errors
as the call's ``FunctionError``, the executor's counters and latency
records. A function's result that carries a DropletReference the cache
cannot answer at once is resolved in a task, as the ordinary path would.

Eligible: a source trigger with a request id (a client's direct run), at
NORMAL consistency, whose whole run is the pipeline that starts here (no
downstream function, no fan-in, multi-exec, batching, continuation, output
key or deadline), functions loaded already and without reference arguments,
and a result that goes to the client only (``store_result=False``, what
clients send). The executor is not over its invocation limit.
"""

from __future__ import annotations

import dis
import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..consistency import NORMAL
from ..errors import DropletError, _Failure
from ..protocol.messages import DagResult, Trigger
from ..references import DropletReference
from ..rpc import Peer
from .copies import private
from .multiexec import spread
from .outcomes import function_error, pickle_value
from .steps import RunContext, Step, build_steps
from .user_library import UserLibrary

if TYPE_CHECKING:
    from .service import ExecutorService

__all__ = ["InlineRuns", "never_suspends"]

log = logging.getLogger("droplet.executor")

#: Opcodes at which a coroutine may suspend (or that only appear around one).
_SUSPENDING = frozenset({"YIELD_VALUE", "SEND", "GET_AWAITABLE", "GET_AITER", "GET_ANEXT",
                         "BEFORE_ASYNC_WITH", "END_ASYNC_FOR", "ASYNC_GEN_WRAP",
                         "YIELD_FROM", "SETUP_ASYNC_WITH", "CLEANUP_THROW"})


@functools.lru_cache(maxsize=4096)
def _code_never_suspends(code: Any) -> bool:
    return not any(i.opname in _SUSPENDING for i in dis.get_instructions(code))


def never_suspends(target: Any) -> bool:
    """Whether ``target`` is an ``async def`` function (or method) whose coroutine
    finishes without ever suspending: its code has no ``await``, ``async for``
    or ``async with``. Anything else (a sync function, any other awaitable
    maker) is False."""
    func = getattr(target, "__func__", target)
    code = getattr(func, "__code__", None)
    if code is None or not code.co_flags & inspect.CO_COROUTINE:
        return False
    try:
        return _code_never_suspends(code)
    except Exception:  # an unreadable code object: take the ordinary path
        return False



def plain_client_run(t: Trigger) -> bool:
    """Whether ``t`` is a client's plain direct run: a source at NORMAL consistency
    with no deadline, output key, stored result, multiexec, batching or scheduler."""
    return not (t.source is not None or t.carried is not None or t.consistency != NORMAL
                or t.failed or t.multiexec or t.batching or t.output_key is not None
                or t.scheduler or t.deadline is not None or t.store_result or t.direct
                or t.whole_run)


def whole_pipeline(svc: ExecutorService, t: Trigger, accept: Callable[[Any], bool]
                   ) -> tuple[list[str], list[Any]] | None:
    """``t``'s pipeline here and what to call for each step, when the run ends
    with it (nothing downstream) and :func:`loaded_targets` finds them all."""
    segment = svc._segment(t)
    last = segment[-1]
    if any(src == last for src, _ in t.edges):
        return None  # the run goes on after this pipeline
    targets = loaded_targets(svc, t, segment, accept)
    return None if targets is None else (segment, targets)


def loaded_targets(svc: ExecutorService, t: Trigger, segment: list[str],
                   accept: Callable[[Any], bool]) -> list[Any] | None:
    """What to call for each function of ``segment``: None unless each is loaded
    (a class's instance built), ``accept``-ed, and takes no references in ``t``."""
    targets: list[Any] = []
    for fn in segment:
        loaded = svc._loader.peek(fn, t.versions[t.functions.index(fn)])
        if loaded is None:
            return None
        target = loaded.obj
        if isinstance(target, tuple):  # (cls, init_args): once built, its run method
            if loaded.instance is None:
                return None
            target = loaded.instance.run
        if not accept(target) or svc._has_references(t, fn):
            return None
        targets.append(target)
    return targets

class _Suspended(RuntimeError):
    pass


def _step(coro: Any) -> Any:
    """Run a coroutine that never suspends to its end; its value, or what it raised."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()  # cannot happen for code that never_suspends(); be safe
    raise _Suspended("an async function suspended where it was known not to")


class InlineRuns:
    """Runs eligible direct triggers at once (``try_run``)."""

    def __init__(self, service: ExecutorService, max_invocations: int) -> None:
        self._svc = service
        self._max = max_invocations
        #: runs done this way (statistics).
        self.calls = 0

    def try_run(self, t: Trigger, peer: Peer, request_id: int) -> bool:
        """Run ``t`` now if it qualifies (then its reply is posted); False: the ordinary path."""
        svc = self._svc
        if not plain_client_run(t) or svc._active >= self._max:
            return False
        found = whole_pipeline(svc, t, never_suspends)
        if found is None:
            return False
        segment, targets = found
        svc._active += 1
        svc._running += len(segment)
        svc._invocations += len(segment)
        self.calls += 1
        run = RunContext(t.run_id, t.consistency, t.client_id or f"run-{t.run_id}")
        libs = [svc._new_library(run) for _ in segment]
        started = time.perf_counter()
        steps = build_steps(t, segment, targets, libs, True)
        if isinstance(steps, _Failure):
            self._finish(t, segment, libs, peer, request_id, started, steps, True)
            return True
        self._go_on(t, segment, steps, 0, [], run, libs, peer, request_id, started)
        return True

    def _go_on(self, t: Trigger, segment: list[str], steps: list[Step], i: int,
               carried: list[Any], run: RunContext, libs: list[UserLibrary], peer: Peer,
               request_id: int, started: float) -> None:
        """Run ``steps[i:]`` now; a reference needing I/O hands the rest to a task."""
        svc = self._svc
        value: Any = None
        while i < len(steps):
            step = steps[i]
            try:
                value = _step(step.target(step.lib, *step.args, *carried))
            except Exception as exc:
                self._finish(t, segment, libs, peer, request_id, started,
                             _Failure(function_error(exc, step.function)), True)
                return
            i += 1
            if i == len(steps):
                break
            try:
                carried = spread(private(value))
            except Exception as exc:
                self._finish(t, segment, libs, peer, request_id, started,
                             _Failure(function_error(exc, step.function)), True)
                return
            if any(isinstance(a, DropletReference) for a in carried):
                try:
                    resolved = self._resolve_now(carried, run)
                except Exception as exc:
                    self._finish(t, segment, libs, peer, request_id, started,
                                 _Failure(function_error(exc, step.function)), True)
                    return
                if resolved is None:  # the cache cannot answer at once: in a task
                    svc._nursery.start_soon(self._go_on_later, t, segment, steps, i,
                                            carried, run, libs, peer, request_id, started)
                    return
                carried = resolved
        self._finish(t, segment, libs, peer, request_id, started, value, False)

    def _resolve_now(self, args: list[Any], run: RunContext) -> list[Any] | None:
        out = []
        for a in args:
            if isinstance(a, DropletReference):
                known, value = self._svc.read_local_value(a.key, run, a.deserialize)
                if not known:
                    return None
                a = value
            out.append(a)
        return out

    async def _go_on_later(self, t: Trigger, segment: list[str], steps: list[Step], i: int,
                           carried: list[Any], run: RunContext, libs: list[UserLibrary],
                           peer: Peer, request_id: int, started: float) -> None:
        try:
            carried = await self._svc._resolve(carried, run)
        except Exception as exc:
            self._finish(t, segment, libs, peer, request_id, started,
                         _Failure(function_error(exc, steps[i].function)), True)
            return
        self._go_on(t, segment, steps, i, carried, run, libs, peer, request_id, started)

    def _finish(self, t: Trigger, segment: list[str], libs: list[UserLibrary], peer: Peer,
                request_id: int, started: float, result: Any, failed: bool) -> None:
        """The ordinary path's bookkeeping, then the result to the caller."""
        svc = self._svc
        svc._active -= 1
        svc._running -= len(segment)
        for lib in libs:
            svc._libraries.pop(lib.getid(), None)
        if failed:
            svc._failures += 1
        elapsed = time.perf_counter() - started
        for fn in segment:
            svc.recorder.record(fn, elapsed, failed)
        try:
            peer.post_reply(request_id, DagResult(t.run_id, pickle_value(result), failed))
        except DropletError as exc:
            log.debug("the caller of a direct run went away: %s", exc)
        except Exception:  # our bug: the caller must still hear something
            log.exception("run %s: replying to its caller failed", t.run_id)
            try:
                peer.post_error(request_id, DropletError(
                    f"executor {svc.url} could not answer run {t.run_id}; see its log"))
            except DropletError:
                pass
