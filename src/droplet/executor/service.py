"""The executor: runs functions, resolves references, moves results along a DAG.

A trigger names one function of a run and carries the whole schedule, so the
executor needs nothing from the scheduler beyond the trigger: it waits for the
function's upstream inputs (fan-in, kept in ``connections`` order), runs it,
and sends the result straight to each downstream function's executor. The
sink writes the result to the KVS (or hands it to the scheduler for a direct
response). A function that raises becomes a FunctionError that flows down the
DAG to the caller; the executor itself carries on.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ..consistency import CAUSAL, CONSISTENCY_LEVELS, CausalContext, SessionResult
from ..errors import DropletError, ProtocolError, TimeoutError, _Failure
from ..links import PeerPool
from ..protocol.messages import (
    Blob,
    CacheInvalidate,
    ClusterInfo,
    DagResult,
    ExecutorJoin,
    FunctionRegistered,
    Hello,
    KvsPut,
    KvsUpdate,
    ListFunctions,
    Mail,
    Names,
    RunDone,
    Trigger,
)
from ..references import DropletReference
from ..rpc import DEFERRED, NOT_NOW, OutboxFull, Peer
from ..serialization import loads, mentions
from .batching import DEFAULT_MAX_BATCH, Batcher
from .cache import Cache, Counts
from .cache_service import RemoteCache
from .copies import private
from .direct import Callers, Reply, check_direct
from .downstream import arguments_for
from .fanin import FanIn
from .fastlane import FastLane
from .inline import InlineRuns
from .loader import FunctionLoader
from .multiexec import MultiExec, spread
from .outcomes import function_error, lww, pickle_result, pickle_value
from .reports import (
    REPORT_MAX_KEYS,
    REPORT_MIN_SIZE,
    CallRecorder,
    Load,
    report_periodically,
)
from .run_state import RunState
from .steps import RunContext, Step, run_sync_steps
from .thread_calls import ThreadCalls
from .threads import WorkerThreads
from .user_library import UserLibrary
from .wholerun import whole_run_sources

__all__ = ["ExecutorService", "ExecutorStatistics", "RunContext"]

log = logging.getLogger("droplet.executor")

#: Fan-in state for runs whose other inputs never came is dropped after this.
FANIN_TTL = 600.0
#: Invocations an executor runs at once. Past it, a triggered function does
#: not run: its run fails at once with an "overloaded" error. (The reader
#: cannot simply wait for a free slot: running functions need it to read
#: their store replies.)
MAX_INVOCATIONS = 10_000
#: Functions an executor loads when it joins (what is registered already);
#: later registrations are loaded as they are announced.
MAX_PREFETCH = 1024
PREFETCH_TIMEOUT = 30.0
#: Seconds a result may take to be written to the next executor, the store or
#: the scheduler before the send is abandoned (and that connection closed).
SEND_TIMEOUT = 60.0


@attrs.frozen
class ExecutorStatistics:
    url: str
    invocations: int
    failures: int
    running: int
    functions_loaded: int
    cache_hits: int
    cache_misses: int
    #: invocation tasks (running functions, or passing a result on).
    tasks: int = 0
    #: partial fan-ins waiting for inputs, and those dropped (expired or over the bound).
    fanin_pending: int = 0
    fanin_dropped: int = 0
    #: multi-exec runs still collecting attempts.
    multiexec_pending: int = 0
    #: invocations that can receive mail right now.
    mailboxes: int = 0
    cache_entries: int = 0
    #: encoded bytes the cache holds, and entries it evicted to stay in its bounds.
    cache_bytes: int = 0
    cache_evictions: int = 0
    worker_threads: int = 0
    abandoned_threads: int = 0
    #: open connections to other executors and the scheduler.
    peers: int = 0
    #: runs clients sent here themselves, still to answer.
    direct_waiting: int = 0
    #: triggers run on the fast lane (a worker thread from start to reply).
    fast_calls: int = 0
    #: direct runs of never-suspending async functions run at once (inline.py).
    inline_calls: int = 0
    #: direct runs taken from callers' threads, run by worker threads (thread_calls.py).
    thread_calls: int = 0


@attrs.frozen
class _Input:
    """One upstream result: the value (or a ``_Failure``) and the run's causal context."""

    value: Any
    failed: bool
    causal: bytes | None
    #: a tuple value becomes several arguments (upstream results do; a
    #: continuation's carried result is one argument, as in Cloudburst)
    spread: bool = True


class ExecutorService(RunState):
    MESSAGES = (Trigger, Mail, KvsUpdate, CacheInvalidate, FunctionRegistered)
    #: what it serves without waiting, in the sender's task (``handle_now``).
    MESSAGES_NOW = (Trigger,)
    #: what it may take from a caller's thread (``handle_from_thread``).
    MESSAGES_FROM_THREADS = (Trigger,)

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        url: str,
        scheduler: Peer,
        kvs: Peer,
        peers: PeerPool,
        threads: int = 32,
        resources: dict[str, int] | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        cache: Cache | RemoteCache | None = None,
        fast_lane: bool = True,
    ) -> None:
        self._nursery = nursery
        self.url = url
        self._scheduler = scheduler
        self._kvs = kvs
        self._peers = peers
        #: the node's cache: shared with the node's other executors when given,
        #: else this executor's own.
        self.cache: Cache | RemoteCache = Cache(kvs) if cache is None else cache
        self._own_cache = cache is None
        #: this executor's own reads of the cache (a node's executors share one).
        self._cache_counts = Counts()
        #: whether this executor's reports carry the cache's size and evictions
        #: (one executor per shared cache does, so totals count it once).
        self.reports_cache = True
        self.trio_token = trio.lowlevel.current_trio_token()
        self._threads = WorkerThreads(threads)
        self.resources = dict(resources or {})
        self.batcher = Batcher(nursery, self._threads.run, function_error, max_batch)
        self._multi = MultiExec()
        self._loader = FunctionLoader(kvs)
        self._fanin: FanIn[_Input] = FanIn(ttl=FANIN_TTL)
        #: clients waiting for the runs they sent here themselves.
        self._callers = Callers(ttl=FANIN_TTL)
        self._active = 0  # invocation tasks started and not finished
        self._libraries: dict[str, UserLibrary] = {}
        self._next_id = 0
        self._invocations = 0
        self._failures = 0
        self._running = 0
        #: calls, failures and latencies per function, for the next report.
        self.recorder = CallRecorder()
        #: plain calls run in a worker thread from start to reply (fastlane.py).
        self.fast_lane: FastLane | None = FastLane(self, MAX_INVOCATIONS) if fast_lane else None
        #: direct runs of async functions that never suspend, run at once (inline.py).
        self.inline: InlineRuns | None = InlineRuns(self, MAX_INVOCATIONS) if fast_lane else None
        #: direct runs sent from callers' threads, run by worker threads (thread_calls.py).
        self.thread_calls: ThreadCalls | None = (
            ThreadCalls(self, MAX_INVOCATIONS) if fast_lane else None)

    def _settle(self) -> None:
        """Count the runs worker threads finished on their own (fast lane, callers' threads)."""
        if self.fast_lane is not None:
            self.fast_lane.settle()
        if self.thread_calls is not None and self.thread_calls.done:
            self.thread_calls.settle()

    @property
    def _running_now(self) -> int:
        """Functions running now, however they were started."""
        threads, fast = self.thread_calls, self.fast_lane
        return (self._running + (threads.running if threads is not None else 0)
                + (fast.t_running if fast is not None else 0))

    def load(self) -> Load:
        """Current load and cache figures (what the periodic report carries)."""
        self._settle()
        cache = self.cache.statistics()
        counts = self._counts()
        mine = self.reports_cache
        return Load(self._threads.max_threads, self._threads.busy, self._threads.queued,
                    self._running_now, cache.entries if mine else 0, cache.bytes if mine else 0,
                    counts.hits, counts.misses, cache.evictions if mine else 0,
                    self.cache.summary(REPORT_MIN_SIZE, REPORT_MAX_KEYS))

    def _counts(self) -> Counts:
        if isinstance(self.cache, RemoteCache):  # its own view of the node's cache
            return Counts(self.cache.hits, self.cache.misses)
        return self._cache_counts

    def statistics(self) -> ExecutorStatistics:
        self._settle()
        cache = self.cache.statistics()
        counts = self._counts()
        return ExecutorStatistics(
            self.url, self._invocations, self._failures, self._running_now,
            len(self._loader), counts.hits, counts.misses,
            tasks=self._active + (self.fast_lane.t_active if self.fast_lane else 0),
            fanin_pending=len(self._fanin),
            fanin_dropped=self._fanin.dropped, multiexec_pending=len(self._multi),
            mailboxes=len(self._libraries), cache_entries=cache.entries,
            cache_bytes=cache.bytes, cache_evictions=cache.evictions,
            worker_threads=self._threads.threads, abandoned_threads=self._threads.abandoned,
            peers=len(self._peers), direct_waiting=len(self._callers),
            fast_calls=self.fast_lane.calls if self.fast_lane is not None else 0,
            inline_calls=self.inline.calls if self.inline is not None else 0,
            thread_calls=self.thread_calls.calls if self.thread_calls is not None else 0)

    async def _serve(self) -> None:
        """Own the worker threads: they exit when the service's nursery ends."""
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):  # fast-lane calls get the grace period too
                await self._threads.finish_started()
            if self.fast_lane is not None:
                self.fast_lane.close()
            self._threads.close()
            if self._own_cache or isinstance(self.cache, RemoteCache):
                self.cache.close()

    @classmethod
    async def join(
        cls, nursery: trio.Nursery, *, url: str, scheduler_url: str, workers: int,
        token: str | None, options: Any = None, threads: int = 32,
        resources: dict[str, int] | None = None, max_batch: int = DEFAULT_MAX_BATCH,
        report_interval: float = 1.0, node_id: str | None = None,
        before_join: Callable[[ExecutorService], None] | None = None,
        cache: Cache | None = None, node_cache: str | None = None,
        cache_size: int | None = None,
    ) -> ExecutorService:
        """Connect to the scheduler and KVS, announce ``url``, return the ready service.

        The service is built (and handed to ``before_join``, e.g. to route the
        messages of ``url``'s listener to it) before the scheduler hears of it:
        the scheduler may place calls here as soon as it does.
        ``node_id`` names this executor to whoever started it (an adaptive
        node finds its workers' addresses by it); a random one by default.
        ``cache``: the node's cache, shared with executors in this process;
        ``node_cache``: the URL of the node process whose cache this worker
        process uses (``--node-cache``). Neither: a cache of its own.
        """
        from ..links import connect_peer

        holder: list[ExecutorService] = []

        async def handle(peer: Peer, msg: Any, request_id: int) -> Any:
            if not holder and type(msg) is FunctionRegistered:
                return None  # announced while joining: the prefetch on joining loads it
            return await holder[0].handle(peer, msg, request_id)

        scheduler = await connect_peer(scheduler_url, nursery, token=token, handler=handle,
                                       options=options)
        node_id = node_id or uuid.uuid4().hex[:12]
        info: ClusterInfo = await scheduler.request(Hello("executor", node_id, url), 30)
        if info.kvs in ("", scheduler_url):
            kvs = scheduler
        else:
            kvs = await connect_peer(info.kvs, nursery, token=token, handler=handle,
                                     options=options)
        peers = PeerPool(nursery, token=token, options=options, handler=handle)
        chosen: Cache | RemoteCache | None = cache
        if node_cache is not None:
            link = scheduler if node_cache == scheduler_url else await connect_peer(
                node_cache, nursery, token=token, handler=handle, options=options)
            chosen = RemoteCache(link)
        elif chosen is None and cache_size is not None:
            chosen = Cache(kvs, max_bytes=cache_size)
        service = cls(nursery, url=url, scheduler=scheduler, kvs=kvs, peers=peers,
                      threads=threads, resources=resources, max_batch=max_batch,
                      cache=chosen)
        service._own_cache = cache is None and node_cache is None
        holder.append(service)
        peers.add(scheduler_url, scheduler)
        nursery.start_soon(service._serve)
        if before_join is not None:
            before_join(service)
        nursery.start_soon(service._prefetch_registered)
        await scheduler.request(ExecutorJoin(url, node_id, workers, dict(resources or {})), 30)
        nursery.start_soon(report_periodically, url, service.recorder, service.load,
                           functools.partial(scheduler.post, on_full="raise"), report_interval)
        return service

    # ------------------------------------------------------------------ messages

    async def handle(self, peer: Peer, msg: Any, request_id: int) -> Any:
        kind = type(msg)
        self._settle()
        fast = self.fast_lane
        if kind is Trigger:
            if request_id:  # a run a client sent here itself: answer it with the result
                return self._direct_run(peer, msg, request_id)
            if msg.whole_run:
                raise ProtocolError("a whole_run trigger must come as a request "
                                    "(a client's direct call)")
            if fast is None or not fast.try_start(msg, None, 0):
                self._on_trigger(msg)
        elif kind is KvsUpdate:
            await self.cache.update(msg.key, msg.lattice)
        elif kind is Mail:
            self._deliver(msg)
        elif kind is FunctionRegistered:
            self._nursery.start_soon(self._prefetch, [msg.name], msg.version)
        elif kind is CacheInvalidate and isinstance(self.cache, RemoteCache):
            self.cache.invalidate(msg.keys)
        else:
            raise ProtocolError(f"an executor does not serve {kind.__name__} messages")
        return None

    def handle_now(self, peer: Peer, msg: Any, request_id: int) -> Any:
        """What ``handle`` serves without waiting, called in the sender's task over an
        in-process connection (:data:`droplet.rpc.NowHandler`): a run a client sent
        here itself. Anything else: NOT_NOW (the connection's reader serves it)."""
        if type(msg) is not Trigger or not request_id:
            return NOT_NOW
        self._settle()
        return self._direct_run(peer, msg, request_id)

    def handle_from_thread(self, peer: Peer, msg: Any, request_id: int) -> Any:
        """From a caller's thread (an in-process sync client): a direct run that worker
        threads can run start to finish (thread_calls.py), else NOT_NOW (the
        caller's thread then hands it to the loop). Thread-safe."""
        calls = self.thread_calls
        if (type(msg) is Trigger and request_id and calls is not None
                and calls.try_start(msg, peer, request_id)):
            return DEFERRED
        return NOT_NOW

    @property
    def messages_in_reader(self) -> tuple[type[Any], ...]:
        """What it serves in a connection's reader thread (``handle_in_reader``):
        triggers, when the fast lane is on."""
        return (Trigger,) if self.fast_lane is not None else ()

    def handle_in_reader(self, peer: Peer, msg: Any, request_id: int,
                         inline: bool) -> bool | Callable[[], None]:
        """From the reader thread of a plain TCP connection (a client's, another
        executor's): a trigger the fast lane takes, run in that thread when
        ``inline`` (the callable returned), else queued for a worker thread;
        False: the read loop serves it, as ``handle`` (see
        :data:`droplet.rpc.ReaderHandler`). Thread-safe."""
        fast = self.fast_lane
        if fast is None or type(msg) is not Trigger:
            return False
        if request_id:  # a client's direct run
            try:
                check_direct(msg, self.url)
            except DropletError:
                return False  # the loop's path refuses it, saying why
            return fast.start_from_reader(msg, peer, request_id, inline)
        if msg.whole_run:
            return False
        return fast.start_from_reader(msg, None, 0, inline)

    def _direct_run(self, peer: Peer, t: Trigger, request_id: int) -> Any:
        """Start a run a client sent here itself; its result is the reply (DEFERRED)."""
        check_direct(t, self.url)
        fast = self.fast_lane
        if fast is not None and fast.try_start(t, peer, request_id):
            return DEFERRED
        if self.inline is not None and self.inline.try_run(t, peer, request_id):
            return DEFERRED
        now = time.monotonic()
        self._callers.add(t.run_id, Reply(peer, request_id, now), now)
        try:  # starts tasks, which run after we return
            if t.whole_run:  # one trigger for every source of the run
                for source in whole_run_sources(t):
                    self._on_trigger(source)
            else:
                self._on_trigger(t)
        except BaseException:
            self._callers.pop(t.run_id)
            raise
        return DEFERRED

    async def _prefetch(self, names: list[str], version: str | None = None) -> None:
        """Load functions ahead of their first call (at registration, or on joining).

        A failure is left for the first call to report, with its run.
        """
        for name in names:
            try:
                await self._loader.load(name, version)
            except Exception as exc:
                log.debug("prefetching %r failed (its first call will say why): %s",
                          name, exc)

    async def _prefetch_registered(self) -> None:
        """On joining: load what is registered already (up to MAX_PREFETCH functions)."""
        try:
            reply: Names = await self._scheduler.request(ListFunctions(None), PREFETCH_TIMEOUT)
        except DropletError as exc:
            log.debug("could not list the registered functions to prefetch: %s", exc)
            return
        await self._prefetch(reply.names[:MAX_PREFETCH])

    def _on_trigger(self, t: Trigger) -> None:
        """Start or feed the trigger's function.

        The decoder checked the trigger's shape (names, lengths, causal bytes).
        """
        if t.consistency not in CONSISTENCY_LEVELS:
            raise DropletError(f"unknown consistency level {t.consistency!r}")
        if len(t.multiexec) != len(t.invalid_results):
            raise DropletError(f"malformed trigger for {t.function!r}: multi-exec lists differ")
        if t.source is None:
            inputs = []
            if t.carried is not None:  # a continuation: the previous DAG's result
                try:
                    inputs.append(_Input(loads(t.carried), False, t.causal,
                                         spread=False))
                except Exception as exc:
                    inputs.append(_Input(_Failure(function_error(exc, t.function)), True,
                                         t.causal))
            self._start(t, inputs)
            return
        try:
            value = loads(t.result) if t.result is not None else None
            failed = t.failed
        except Exception as exc:
            value, failed = _Failure(function_error(exc, t.source)), True
        self._input(t, t.source, _Input(value, failed, t.causal))

    def _input(self, t: Trigger, source: str, given: _Input) -> None:
        """Record one upstream result; run the function once all have arrived."""
        upstream = [src for src, dst in t.edges if dst == t.function]
        if source not in upstream:
            raise DropletError(f"trigger from {source!r}, which does not feed {t.function!r}")
        if len(upstream) == 1 or t.function in t.multiexec:  # multi-exec: once per input
            self._start(t, [given])
            return
        inputs = self._fanin.add(t.run_id, t.function, source, given, upstream,
                                 time.monotonic())
        if inputs is not None:
            self._start(t, inputs)

    def _start(self, t: Trigger, inputs: list[_Input]) -> None:
        overloaded = self._active >= MAX_INVOCATIONS
        self._active += 1
        self._nursery.start_soon(self._invoke, t, inputs, overloaded)

    def _deliver(self, msg: Mail) -> None:
        lib = self._libraries.get(msg.dest)
        if lib is None:
            log.debug("dropping message for finished or unknown invocation %s", msg.dest)
        else:
            lib.deliver(msg.sender, msg.data)

    async def send_mail(self, dest: str, sender: str, data: bytes) -> None:
        url, _, local = dest.rpartition("/")
        if not url or not local:
            raise ValueError(f"{dest!r} is not an invocation id (from getid())")
        if url == self.url:
            self._deliver(Mail(dest, sender, data))
            return
        peer = await self._peers.get(url)
        await peer.send(Mail(dest, sender, data))

    # ------------------------------------------------------------------ running

    async def _invoke(self, t: Trigger, inputs: list[_Input], overloaded: bool) -> None:
        """Run ``t.function`` (and the local pipeline after it), then pass the result on.

        Nothing raised here reaches the service's nursery: an executor outlives
        whatever a peer or a function does.
        """
        try:
            await self._invoke_segment(t, inputs, overloaded)
        except (Exception, SystemExit):  # e.g. user code's sys.exit() while being loaded
            log.exception("run %s: invoking %s failed", t.run_id, t.function)
            caller = self._callers.pop(t.run_id)
            if caller is not None:  # never leave a client waiting
                caller.send_error(f"executor {self.url} could not run {t.function!r}; "
                                  "see its log")
        finally:
            self._active -= 1

    async def _invoke_segment(self, t: Trigger, inputs: list[_Input], overloaded: bool
                              ) -> None:
        segment = self._segment(t)
        started = time.perf_counter()
        ran = True  # False: an upstream failure passed on (this function did not run)
        self._running += len(segment)
        self._invocations += len(segment)
        libs: list[UserLibrary] = []
        run = RunContext(t.run_id, t.consistency, t.client_id or f"run-{t.run_id}")
        try:
            upstream_failure = next((i.value for i in inputs if i.failed), None)
            if upstream_failure is not None:  # pass the upstream error on; do not run
                result, failed, ran = upstream_failure, True, False
            elif overloaded:
                result, failed = _Failure(DropletError(
                    f"executor {self.url} is overloaded ({MAX_INVOCATIONS} invocations "
                    f"running); {t.function!r} did not run; try again later")), True
            elif t.deadline is not None and time.time() > t.deadline:
                result, failed = _Failure(TimeoutError(
                    f"the call's deadline passed before {t.function!r} could run")), True
            else:
                if t.consistency == CAUSAL:
                    run.causal = CausalContext.merge_all(
                        CausalContext.decode(c)
                        for c in ([i.causal for i in inputs] if inputs else [t.causal]))
                result, failed = await self._run_segment(t, segment, inputs, libs, run)
        finally:
            self._running -= len(segment)
            for lib in libs:
                self._libraries.pop(lib.getid(), None)
        if failed:
            self._failures += 1
        if ran:  # a pipelined segment's time counts for each of its functions
            elapsed = time.perf_counter() - started
            for fn in segment:
                self.recorder.record(fn, elapsed, failed)
        last = segment[-1]
        if last in t.multiexec:
            expected = max(1, sum(1 for _, dst in t.edges if dst == last))
            invalid = t.invalid_results[t.multiexec.index(last)]
            try:
                outcome = self._multi.outcome(t.run_id, last, expected, result, failed,
                                              invalid)
            except Exception as exc:  # invalid results that do not unpickle here
                outcome = _Failure(function_error(exc, last)), True
            if outcome is None:  # invalid, a later duplicate, or an attempt still out
                return
            result, failed = outcome
        sink = t if last == t.function else attrs.evolve(t, function=last)
        # A direct caller's result is posted (no wait) and bounds its one possible
        # wait itself: no cancel scope (~12 us) for the common case.
        bounded = (t.run_id in self._callers and t.output_key is None
                   and not any(src == last for src, _ in t.edges))
        try:
            with contextlib.nullcontext() if bounded else trio.fail_after(SEND_TIMEOUT):
                try:
                    await self._forward(sink, result, failed, run)
                except ValueError as exc:  # the result is too big for one frame
                    too_big = _Failure(DropletError(
                        f"the result of {last!r} is too large to send: {exc}"))
                    with trio.fail_after(SEND_TIMEOUT):
                        await self._forward(sink, too_big, True, run)
        except (Exception, trio.TooSlowError) as exc:
            log.warning("run %s: could not deliver result of %s: %s", t.run_id, last, exc)

    def _segment(self, t: Trigger) -> list[str]:
        """``t.function`` plus the pipeline steps after it that run here.

        A step joins when it is this executor's, has exactly one input (the
        previous step), which feeds nothing else, and takes no references (they
        must be read when the step runs). A pipeline of sync functions then
        costs one thread handoff instead of one per function.
        """
        segment = [t.function]
        special = set(t.multiexec) | set(t.batching)
        if t.function in special:  # these run (and forward) one at a time
            return segment
        while True:
            downstream = [dst for src, dst in t.edges if src == segment[-1]]
            if len(downstream) != 1:
                return segment
            nxt = downstream[0]
            if (nxt in special or t.placement[t.functions.index(nxt)] != self.url
                    or sum(1 for _, dst in t.edges if dst == nxt) != 1
                    or self._has_references(t, nxt)):
                return segment
            segment.append(nxt)

    @staticmethod
    def _has_references(t: Trigger, function: str) -> bool:
        if function not in t.arg_fns:
            return False
        blob = t.arg_blobs[t.arg_fns.index(function)]
        return mentions(blob, b"DropletReference")  # cheap, conservative pre-check

    async def _run_segment(
        self, t: Trigger, segment: list[str], inputs: list[_Input],
        libs: list[UserLibrary], run: RunContext,
    ) -> tuple[Any, bool]:
        """Run the segment's functions in order; returns ``(value, failed)``."""
        steps: list[Step] = []
        for fn in segment:
            try:
                steps.append(await self._prepare(t, fn, libs, run))
            except (Exception, SystemExit) as exc:  # a class's __init__ may exit too
                return _Failure(function_error(exc, fn)), True
        try:
            carried = await self._resolve(
                [a for i in inputs for a in (spread(i.value) if i.spread else [i.value])], run)
        except Exception as exc:
            return _Failure(function_error(exc, segment[0])), True
        if segment[0] in t.batching:
            step = steps[0]
            return await self.batcher.call(
                step.function, t.versions[t.functions.index(step.function)], step.target,
                step.is_async, step.lib, [*step.args, *carried])
        value: Any = None
        i = 0
        while i < len(steps):
            step = steps[i]
            if step.is_async:
                try:
                    if i:
                        carried = await self._resolve(spread(private(value)), run)
                    value = await step.target(step.lib, *step.args, *carried)
                except (Exception, SystemExit) as exc:  # sys.exit() never ends the node
                    return _Failure(function_error(exc, step.function)), True
                i += 1
            else:
                j = i
                while j < len(steps) and not steps[j].is_async:
                    j += 1
                if i:
                    try:
                        carried = await self._resolve(spread(private(value)), run)
                    except Exception as exc:
                        return _Failure(function_error(exc, step.function)), True
                # The thread resolves the results of steps it runs itself.
                value, failed = await self._threads.run(
                    run_sync_steps, steps[i:j], carried, label=step.function)
                if failed:
                    return value, True
                i = j
        return value, False

    async def _resolve(self, args: list[Any], run: RunContext) -> list[Any]:
        """Replace each DropletReference among ``args`` by the value it stands for."""
        if not any(isinstance(a, DropletReference) for a in args):
            return args
        return [await self.read_value(a.key, run, a.deserialize)
                if isinstance(a, DropletReference) else a for a in args]

    async def _prepare(self, t: Trigger, function: str, libs: list[UserLibrary],
                       run: RunContext) -> Step:
        loaded = await self._loader.load(function, t.versions[t.functions.index(function)])
        lib = self._new_library(run)
        libs.append(lib)
        args: list[Any] = []
        if function in t.arg_fns:
            for arg in loads(t.arg_blobs[t.arg_fns.index(function)]):
                if isinstance(arg, DropletReference):
                    arg = await self.read_value(arg.key, run, arg.deserialize)
                args.append(arg)
        target = loaded.obj
        if isinstance(target, tuple):  # (cls, init_args): one instance per executor
            if loaded.instance is None:
                async with loaded.init_lock:  # concurrent first calls build it once
                    if loaded.instance is None:
                        cls, init_args = target
                        loaded.instance = await self._threads.run(
                            lambda: cls(lib, *init_args))
            target = loaded.instance.run
        return Step(function, target, inspect.iscoroutinefunction(target), args, lib)

    def _new_library(self, run: RunContext) -> UserLibrary:
        """A user library for one invocation, reachable by its id for mail."""
        self._next_id += 1
        lib = UserLibrary(self, f"{self.url}/{self._next_id}", run)
        self._libraries[lib.getid()] = lib
        return lib

    # ------------------------------------------------------------------ results

    async def _forward(self, t: Trigger, result: Any, failed: bool, run: RunContext) -> None:
        downstream = [dst for src, dst in t.edges if src == t.function]
        causal = run.causal.encode() if run.causal is not None else None
        blob: Blob | None = None
        for dst in downstream:
            url = t.placement[t.functions.index(dst)]
            if url == self.url:  # same executor: no socket, but a private copy each
                value, bad = result, failed
                if not failed:
                    try:
                        value = private(result)
                    except Exception as exc:
                        value, bad = _Failure(function_error(exc, t.function)), True
                self._input(attrs.evolve(t, function=dst, source=t.function, result=None,
                                         failed=bad, causal=causal), t.function,
                            _Input(value, bad, causal))
                continue
            if blob is None:
                blob = pickle_value(result)
            await (await self._peers.get(url)).send(attrs.evolve(
                t, function=dst, source=t.function, result=blob, failed=failed, causal=causal,
                **arguments_for(t, dst)))
        if downstream:
            return
        if t.output_key and not failed:
            await self._kvs.request(KvsPut(t.output_key, lww(pickle_result(result))))
        if causal is not None and not failed:
            result = SessionResult(result, causal)
        caller = self._callers.pop(t.run_id)
        if caller is not None:  # a client's direct run: the result to it first
            blob = pickle_value(result)
            caller.send(DagResult(t.run_id, blob, failed))
            if not t.store_result:  # the client stores it if its key is asked for
                return
            # A plain pickle serves the store as is: pickled once for both.
            stored = blob if type(blob) is bytes else pickle_result(result)
            put = KvsPut(t.result_key, lww(stored))
            try:  # through the outbox: under load, many results per write
                self._kvs.post(put, on_full="raise", check_size=True)
            except OutboxFull:
                with trio.fail_after(SEND_TIMEOUT):
                    await self._kvs.send(put)
            return
        if not t.store_result:  # its caller went away, and nobody else wants it
            return
        scheduler = self._scheduler if not t.scheduler else await self._peers.get(t.scheduler)
        if t.direct:
            await scheduler.send(RunDone(t.run_id, pickle_value(result), failed))
            return
        # One-way: the caller learns of the result from the store itself.
        put = KvsPut(t.result_key, lww(pickle_result(result)))
        done = RunDone(t.run_id, None, failed)
        if scheduler is self._kvs:  # one node: both in one write
            await scheduler.send_many([put, done])
        else:
            await self._kvs.send(put)
            await scheduler.send(done)
