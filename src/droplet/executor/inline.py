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

Over an in-process connection that carries objects (``skip_encoding``), the
executor also offers the connection a :class:`Lane`: a client in the same
Trio run prepares a DAG's run there once (a template trigger, validated as the
connection would validate it, with the pipeline and its loaded functions
looked up), and then starts each call of it with :meth:`Prepared.run`,
giving only what changes per call (run id and pickled arguments): no trigger
is built, copied or checked per call, no request id, slot or reply message.
Everything else stays: the connection's in-flight limit, the executor's
invocation limit, its counters, a function reloaded (a new version) or a
closed connection sending calls the ordinary way, references in arguments
(those calls go the ordinary way too), and the result pickled for the client.

A lane also takes DAGs of ``async def`` functions that may suspend: such a
run cannot finish where it is started, so it becomes one task in the
executor's nursery (as on the ordinary path, minus the trigger and reply
messages), which awaits each function in turn. A run still going when the
executor stops is answered with an error saying so. (Stepping such a
coroutine in the caller's task first and handing it to a task only once it
suspends is not done: by then it may have entered cancel scopes or parked
itself on the caller's task, which cannot move to another task.)
"""

from __future__ import annotations

import dis
import functools
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..consistency import NORMAL
from ..errors import DropletError, _Failure
from ..protocol.framing import Gather
from ..protocol.messages import DagResult, InvalidMessage, Trigger
from ..protocol.parcel import pack, unpack
from ..references import DropletReference
from ..rpc import Peer
from ..serialization import loads, mentions
from .copies import private
from .direct import check_direct
from .multiexec import spread
from .outcomes import function_error, pickle_value
from .steps import RunContext, Step
from .user_library import UserLibrary

if TYPE_CHECKING:
    from .service import ExecutorService

__all__ = ["InlineRuns", "Lane", "Prepared", "never_suspends"]

#: What a finished run's pickled result (and whether it failed) is handed to.
Deliver = Callable[[Any, bool], None]

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



def _is_async(target: Any) -> bool:
    return inspect.iscoroutinefunction(target)


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


class _Reply:
    """Delivers a run's result as the reply to a request on ``peer``."""

    __slots__ = ("peer", "request_id", "run_id", "url")

    def __init__(self, peer: Peer, request_id: int, run_id: str, url: str) -> None:
        self.peer = peer
        self.request_id = request_id
        self.run_id = run_id
        self.url = url

    def __call__(self, blob: Any, failed: bool) -> None:
        try:
            self.peer.post_reply(self.request_id, DagResult(self.run_id, blob, failed))
        except DropletError as exc:
            log.debug("the caller of a direct run went away: %s", exc)
        except Exception:  # our bug: the caller must still hear something
            log.exception("run %s: replying to its caller failed", self.run_id)
            try:
                self.peer.post_error(self.request_id, DropletError(
                    f"executor {self.url} could not answer run {self.run_id}; see its log"))
            except DropletError:
                pass


class InlineRuns:
    """Runs eligible direct triggers at once (``try_run``, and lanes' ``Prepared.run``)."""

    def __init__(self, service: ExecutorService, max_invocations: int) -> None:
        self._svc = service
        self._max = max_invocations
        #: runs done this way (statistics), and of those, runs started through a lane.
        self.calls = 0
        self.lane_calls = 0

    def try_run(self, t: Trigger, peer: Peer, request_id: int) -> bool:
        """Run ``t`` now if it qualifies (then its reply is posted); False: the ordinary path."""
        svc = self._svc
        conn = peer.conn
        if conn.carries_objects and not getattr(conn, "has_lane", True):
            # a client's direct run over objects: its next calls may take the lane
            conn.offer_lane(Lane(self, peer))  # type: ignore[attr-defined]
        if not plain_client_run(t) or svc._active >= self._max:
            return False
        found = whole_pipeline(svc, t, never_suspends)
        if found is None:
            return False
        segment, targets = found
        self.start(t.run_id, t.client_id, segment, targets, t.arg_fns, t.arg_blobs,
                   _Reply(peer, request_id, t.run_id, svc.url))
        return True

    def start(self, run_id: str, client_id: str | None, segment: list[str],
              targets: list[Any], arg_fns: Sequence[str], arg_blobs: Sequence[Any],
              deliver: Deliver, at_once: bool = True) -> None:
        """Run ``segment`` (``targets``) with the run's pickled arguments (each
        function's unpickled now, so the caller may change what it passed as
        soon as this returns); its pickled result (or failure) goes to
        ``deliver``. ``at_once``: the functions never suspend, and run now;
        else they may, and run in one task in the executor's nursery."""
        svc = self._svc
        svc._active += 1
        svc._running += len(segment)
        svc._invocations += len(segment)
        self.calls += 1
        run = RunContext(run_id, NORMAL, client_id or f"run-{run_id}")
        libs = [svc._new_library(run) for _ in segment]
        started = time.perf_counter()
        steps = []
        for fn, target, lib in zip(segment, targets, libs, strict=True):
            args: list[Any] = []
            if fn in arg_fns:
                try:
                    args = list(loads(arg_blobs[arg_fns.index(fn)]))
                except Exception as exc:
                    self._finish(segment, libs, started,
                                 _Failure(function_error(exc, fn)), True, deliver)
                    return
            steps.append(Step(fn, target, True, args, lib))
        if at_once:
            self._go_on(segment, steps, 0, [], run, libs, started, deliver)
            return
        try:
            svc._nursery.start_soon(self._run_task, run_id, segment, steps, run, libs,
                                    started, deliver)
        except RuntimeError:  # the executor is stopping
            self._finish(segment, libs, started, _Failure(DropletError(
                f"executor {svc.url} is stopping; run {run_id} did not start")), True,
                deliver)

    def _go_on(self, segment: list[str], steps: list[Step], i: int, carried: list[Any],
               run: RunContext, libs: list[UserLibrary], started: float,
               deliver: Deliver) -> None:
        """Run ``steps[i:]`` now; a reference needing I/O hands the rest to a task."""
        svc = self._svc
        value: Any = None
        while i < len(steps):
            step = steps[i]
            try:
                value = _step(step.target(step.lib, *step.args, *carried))
            except (Exception, SystemExit) as exc:  # sys.exit() never ends the node
                self._finish(segment, libs, started,
                             _Failure(function_error(exc, step.function)), True, deliver)
                return
            i += 1
            if i == len(steps):
                break
            try:
                carried = spread(private(value))
            except Exception as exc:
                self._finish(segment, libs, started,
                             _Failure(function_error(exc, step.function)), True, deliver)
                return
            if any(isinstance(a, DropletReference) for a in carried):
                try:
                    resolved = self._resolve_now(carried, run)
                except Exception as exc:
                    self._finish(segment, libs, started,
                                 _Failure(function_error(exc, step.function)), True, deliver)
                    return
                if resolved is None:  # the cache cannot answer at once: in a task
                    svc._nursery.start_soon(self._go_on_later, segment, steps, i,
                                            carried, run, libs, started, deliver)
                    return
                carried = resolved
        self._finish(segment, libs, started, value, False, deliver)

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

    async def _go_on_later(self, segment: list[str], steps: list[Step], i: int,
                           carried: list[Any], run: RunContext, libs: list[UserLibrary],
                           started: float, deliver: Deliver) -> None:
        try:
            carried = await self._svc._resolve(carried, run)
        except Exception as exc:
            self._finish(segment, libs, started,
                         _Failure(function_error(exc, steps[i].function)), True, deliver)
            return
        self._go_on(segment, steps, i, carried, run, libs, started, deliver)

    async def _run_task(self, run_id: str, segment: list[str], steps: list[Step],
                        run: RunContext, libs: list[UserLibrary], started: float,
                        deliver: Deliver) -> None:
        """The run of functions that may suspend, awaited in turn (see ``start``)."""
        svc = self._svc
        value: Any = None
        carried: list[Any] = []
        try:
            for i, step in enumerate(steps):
                try:
                    if i:
                        carried = await svc._resolve(spread(private(value)), run)
                    value = await step.target(step.lib, *step.args, *carried)
                except (Exception, SystemExit) as exc:  # sys.exit() never ends the node
                    self._finish(segment, libs, started,
                                 _Failure(function_error(exc, step.function)), True, deliver)
                    return
        except BaseException:  # cancelled: the executor is stopping
            self._finish(segment, libs, started, _Failure(DropletError(
                f"executor {svc.url} stopped before run {run_id} finished")), True, deliver)
            raise
        self._finish(segment, libs, started, value, False, deliver)

    def _finish(self, segment: list[str], libs: list[UserLibrary], started: float,
                result: Any, failed: bool, deliver: Deliver) -> None:
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
        deliver(pickle_value(result), failed)


class Lane:
    """Direct runs from a client in this Trio run, started without messages.

    Offered to an in-process connection that carries objects
    (``InprocConnection.offer_lane``) by the executor behind it; see the
    module docstring. Every method runs in the loop's thread and never waits.
    """

    def __init__(self, runs: InlineRuns, peer: Peer) -> None:
        self._runs = runs
        #: the executor's end of the connection (its in-flight limit, whether closed).
        self._peer = peer

    def prepare(self, t: Trigger) -> Prepared | None:
        """A run of ``t``'s DAG (``t`` being one call of it, its arguments aside)
        that :meth:`Prepared.run` starts per call; None when such runs do not
        qualify (they go the ordinary way)."""
        runs = self._runs
        svc = runs._svc
        try:  # validated as the connection would validate the trigger, and a copy
            t = unpack(pack(attrs.evolve(t, arg_fns=[], arg_blobs=[])))[0]
            check_direct(t, svc.url)
        except (InvalidMessage, DropletError):
            return None
        if not plain_client_run(t):
            return None
        at_once = True
        found = whole_pipeline(svc, t, never_suspends)
        if found is None:
            at_once = False
            found = whole_pipeline(svc, t, _is_async)
            if found is None:
                return None
        segment, targets = found
        loaded = [svc._loader.peek(fn, t.versions[t.functions.index(fn)]) for fn in segment]
        return Prepared(self, t.client_id, frozenset(t.functions), segment, targets, loaded,
                        at_once)


class Prepared:
    """One DAG's runs through a :class:`Lane` (see :meth:`Lane.prepare`)."""

    __slots__ = ("_client_id", "_functions", "_lane", "_loaded", "_segment", "_targets",
                 "at_once", "stale")

    def __init__(self, lane: Lane, client_id: str | None, functions: frozenset[str],
                 segment: list[str], targets: list[Any], loaded: list[Any],
                 at_once: bool = True) -> None:
        self._lane = lane
        #: its functions never suspend: each run finishes where it is started.
        self.at_once = at_once
        self._client_id = client_id
        self._functions = functions
        self._segment = segment
        self._targets = targets
        self._loaded = loaded
        #: True once a function was loaded again (another version): prepare anew.
        self.stale = False

    def run(self, run_id: str, arg_fns: list[str], arg_blobs: list[Any],
            deliver: Deliver) -> bool:
        """Start one run now with these pickled arguments; its pickled result goes to
        ``deliver`` (at once, unless a result carries a reference the cache must
        fetch). False: not started (send it the ordinary way, which also says
        what is wrong with it)."""
        lane = self._lane
        runs = lane._runs
        svc = runs._svc
        peer = lane._peer
        if peer.closed or svc._active >= runs._max or self.stale:
            return False
        loader = svc._loader
        for fn, loaded in zip(self._segment, self._loaded, strict=True):
            if loader.peek(fn, loaded.version) is not loaded:
                self.stale = True
                return False
        if len(arg_fns) != len(arg_blobs):
            return False
        functions = self._functions
        for fn, blob in zip(arg_fns, arg_blobs, strict=True):
            if (type(fn) is not str or fn not in functions
                    or (type(blob) is not bytes and type(blob) is not Gather)
                    or mentions(blob, b"DropletReference")):
                return False  # the ordinary path reads references (or names the error)
        inflight = peer._inflight
        try:
            inflight.acquire_nowait()  # the connection's in-flight limit holds
        except trio.WouldBlock:
            return False
        runs.lane_calls += 1
        runs.start(run_id, self._client_id, self._segment, self._targets, arg_fns, arg_blobs,
                   functools.partial(_released, peer, deliver), self.at_once)
        return True


def _released(peer: Peer, deliver: Deliver, blob: Any, failed: bool) -> None:
    # Through the peer: its reader may wait at the limit for this slot (woken so).
    peer._release_slot()
    try:
        deliver(blob, failed)
    except Exception:  # the client's side: never the executor's problem
        log.exception("a lane's caller could not take its result")
