"""The scheduler: function and DAG registry, placement, run bookkeeping.

It is on the path of a call only once: it places the run's functions and
triggers the sources. Results flow executor to executor and from the sink to
the KVS (or, for direct responses, back through here to the waiting caller).

Handlers run in the reader of the connection they serve, so messages for other
peers (triggers for executors, direct results for callers) go through those
peers' bounded outboxes (:meth:`~droplet.rpc.Peer.post`), and requests to the
store carry a timeout: a stuck executor, caller or store cannot stall anyone
else's connection.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .. import errors
from ..consistency import CAUSAL, CONSISTENCY_LEVELS
from ..errors import DagError, DropletError, ProtocolError, RegistrationError, _Failure
from ..executor.downstream import arguments_for
from ..ids import unique_id
from ..kvs.keys import REGISTRY_KEY, RESULT_PREFIX, function_key
from ..lattices import RAW, LWWLattice, encode_lattice
from ..protocol.messages import (
    Blob,
    BoolReply,
    CallAccepted,
    CallDag,
    CallPlaced,
    ClusterInfo,
    DagResult,
    DeleteDag,
    DrainExecutor,
    ExecutorJoin,
    ExecutorReport,
    FunctionExists,
    FunctionRegistered,
    GetStatus,
    Hello,
    KvsGet,
    KvsPut,
    KvsRelease,
    ListDags,
    ListFunctions,
    Names,
    PlaceCall,
    PoolQuery,
    PoolReply,
    RegisterDag,
    RegisterFunction,
    RunDone,
    StatusReply,
    Trigger,
)
from ..protocol.messages import decode as decode_message
from ..registration import code_version
from ..rpc import DEFERRED, Peer
from ..status import ClusterStatus, ScalingStatus
from .dags import Dag, build_dag
from .handout import PLACEMENT_LEASE, Offer, hand_out
from .placement import DEFAULT_POLICY, Candidate, Placement
from .registry import dag_entry, decode_registry, function_entry
from .reports import ClusterView

__all__ = ["SchedulerService", "SchedulerStatistics"]

log = logging.getLogger("droplet.scheduler")

#: A run still unfinished after this long is forgotten (checked every SWEEP_EVERY calls).
RUN_TTL = 3600.0
SWEEP_EVERY = 1024
#: Seconds the scheduler waits for the store (registrations, recorded failures).
KVS_TIMEOUT = 30.0
#: Seconds a drained executor may take to send its last report before it is retired.
DRAIN_REPORT_WAIT = 5.0
#: Scale events kept of each adaptive executor node's status.
MAX_POOL_EVENTS = 20
#: Most DAG calls chained by continuations in one call.
MAX_CONTINUATIONS = 32



@attrs.frozen
class SchedulerStatistics:
    functions: int
    dags: int
    executors: int
    runs_in_flight: int
    runs_started: int


@attrs.define
class _Run:
    executors: list[str]
    result_key: str
    caller: tuple[Peer, int] | None  # direct response: who is waiting, request id
    consistency: str = "NORMAL"
    started: float = 0.0
    #: a DAG call to run on this run's result (its result is the caller's)
    then: CallDag | None = None


@attrs.define
class _Executor:
    url: str
    peer: Peer
    running: int = 0
    resources: dict[str, int] = attrs.Factory(dict)
    node_id: str = ""
    #: functions placed on it so far (adaptive executors: was it given work?)
    placed: int = 0
    #: being drained: no new calls; ``idle`` is set once nothing runs on it.
    draining: bool = False
    idle: trio.Event = attrs.Factory(trio.Event)
    #: set (and replaced) by each of its reports.
    reported: trio.Event = attrs.Factory(trio.Event)
    #: who may drain it: the claimant of its node id's pool prefix when it joined.
    owner: object = None


class SchedulerService:
    MESSAGES = (
        Hello, ExecutorJoin, RegisterFunction, ListFunctions, FunctionExists,
        RegisterDag, DeleteDag, CallDag, RunDone, ExecutorReport, GetStatus, ListDags,
        PlaceCall, PoolQuery, DrainExecutor,
    )

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        kvs: Peer,
        kvs_url: str,
        node_id: str = "",
        placement: str = DEFAULT_POLICY,
    ) -> None:
        self._nursery = nursery
        self._kvs = kvs
        #: where clients find the KVS; "" means "at the address you reached me at".
        self.kvs_url = kvs_url
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self._placement = Placement(placement)
        self._functions: dict[str, str] = {}  # name -> version
        self._dags: dict[str, Dag] = {}
        self._executors: dict[str, _Executor] = {}
        self._runs: dict[str, _Run] = {}
        self._runs_started = 0
        self.executors_changed = trio.Event()
        #: the executors' periodic reports, added up (status and metrics).
        self.view = ClusterView()
        #: adaptive executors of this node (set by the node): their status record.
        self.scaling: Callable[[], ScalingStatus | None] = lambda: None
        #: adaptive ``--role executor`` nodes, by their workers' node id prefix.
        self._pools: dict[str, ScalingStatus] = {}
        #: pool prefix -> its claimant (a node's link, or this node's own pool).
        self._pool_owners: dict[str, object] = {}

    def statistics(self) -> SchedulerStatistics:
        return SchedulerStatistics(
            functions=len(self._functions),
            dags=len(self._dags),
            executors=len(self._executors),
            runs_in_flight=len(self._runs),
            runs_started=self._runs_started,
        )

    def cluster_status(self) -> ClusterStatus:
        """The cluster as this scheduler sees it (``conn.status()``)."""
        status = self.view.status(self.node_id, list(self._functions), list(self._dags),
                                  trio.current_time())
        pools = tuple(sorted(self._pools.values(), key=lambda p: p.node))
        return attrs.evolve(status, scaling=self.scaling(), pools=pools)

    @property
    def executor_urls(self) -> list[str]:
        return list(self._executors)

    async def handle(self, peer: Peer, msg: Any, request_id: int) -> Any:
        kind = type(msg)
        if kind is CallDag:
            if not request_id and not msg.direct and msg.result_key:
                return await self._call_oneway(peer, msg)
            return await self._call(peer, msg, request_id)
        if kind is RunDone:
            await self._run_done(msg)
            return None
        if kind is ExecutorReport:
            if peer.state.get("executor_url") != msg.url:
                raise ProtocolError(f"report for {msg.url!r} from a peer that is not it")
            self.view.report(msg, trio.current_time(), self._functions)
            ex = self._executors.get(msg.url)
            if ex is not None:
                ex.reported.set()
                ex.reported = trio.Event()
            return None
        if kind is PlaceCall:
            return self._place_call(msg)
        if kind is GetStatus:
            return StatusReply(self.cluster_status().to_json())
        if kind is ListDags:
            return Names(sorted(self._dags))
        if kind is Hello:
            return ClusterInfo(self.kvs_url, "", self.node_id)
        if kind is RegisterFunction:
            return await self._register_function(msg)
        if kind is ListFunctions:
            names = sorted(n for n in self._functions if n.startswith(msg.prefix or ""))
            return Names(names)
        if kind is FunctionExists:
            return BoolReply(msg.name in self._functions)
        if kind is RegisterDag:
            return await self._register_dag(msg)
        if kind is DeleteDag:
            if self._dags.pop(msg.name, None) is None:
                raise DagError(f"no DAG named {msg.name!r}")
            await self._kvs.request(KvsPut(REGISTRY_KEY, dag_entry(msg.name, None)), KVS_TIMEOUT)
            return None
        if kind is ExecutorJoin:
            return self._join(peer, msg)
        if kind is PoolQuery:
            self.claim_pool(msg.prefix, peer)
            if msg.status:
                self._pool_status(peer, msg.prefix, msg.status)
            return self._pool_reply(msg.prefix)
        if kind is DrainExecutor:
            ex = self._executors.get(msg.url)
            if ex is None:
                return BoolReply(False)
            if ex.owner is not peer:
                raise ProtocolError(f"executor {msg.url} is not one of this link's workers: "
                                    "only the node that started it may drain it")
            # Deferred: a drain lasts as long as the calls running there.
            self._nursery.start_soon(self._drain_for, peer, request_id, msg.url)
            return DEFERRED
        raise ProtocolError(f"the scheduler does not serve {kind.__name__} messages")

    # ------------------------------------------------------------------ registry

    async def restore(self) -> None:
        """Load the functions and DAGs registered before this scheduler started.

        They are in the KVS (:mod:`droplet.scheduler.registry`), so a restarted
        node with a durable store, or a scheduler restarted beside a running
        storage node, serves what was registered before.
        """
        reply = await self._kvs.request(KvsGet(REGISTRY_KEY), KVS_TIMEOUT)
        if reply.lattice is None:
            return
        functions, dags, problems = decode_registry(reply.lattice)
        for problem in problems:
            log.error("registry key %s: skipping %s", REGISTRY_KEY, problem)
        self._functions.update(functions)
        for name, (fns, edges, colocated) in dags.items():
            try:
                self._dags[name] = build_dag(name, fns, edges, colocated, self._functions)
            except DagError as exc:
                log.warning("not restoring DAG %r: %s", name, exc)
        log.info("restored %d function(s) and %d DAG(s) from the store",
                 len(functions), len(self._dags))

    async def _register_function(self, msg: RegisterFunction) -> None:
        if not msg.name or "/" in msg.name:
            raise RegistrationError(
                f"function name must be a non-empty string without '/', not {msg.name!r}")
        if not msg.code:
            raise RegistrationError(f"function {msg.name!r}: empty code")
        version = code_version(msg.code)
        lattice = LWWLattice.now(msg.code)
        await self._kvs.request(
            KvsPut(function_key(msg.name), encode_lattice(lattice, dump=RAW)), KVS_TIMEOUT)
        await self._kvs.request(KvsPut(REGISTRY_KEY, function_entry(msg.name, version)),
                                KVS_TIMEOUT)
        self._functions[msg.name] = version
        # Executors load the code now, not on its first call (a round trip to the store).
        for ex in list(self._executors.values()):
            try:
                ex.peer.post(FunctionRegistered(msg.name, version), on_full="raise")
            except DropletError:  # a backed-up executor loads it on first call instead
                pass

    async def _register_dag(self, msg: RegisterDag) -> None:
        dag = build_dag(msg.name, msg.functions, msg.connections, msg.colocated,
                        self._functions, multiexec=msg.multiexec,
                        invalid_results=msg.invalid_results, gpu_functions=msg.gpu_functions,
                        batching_functions=msg.batching_functions)
        old = self._dags.get(msg.name)
        if old is not None and not old.same_shape(dag):
            raise DagError(
                f"a different DAG named {msg.name!r} is already registered; "
                "delete it first (delete_dag) or pick another name"
            )
        self._dags[msg.name] = dag  # before awaiting: a concurrent registration sees it
        if old is None:
            try:
                await self._kvs.request(KvsPut(REGISTRY_KEY, dag_entry(msg.name, dag)),
                                        KVS_TIMEOUT)
            except BaseException:
                if self._dags.get(msg.name) is dag:  # not stored: not registered
                    del self._dags[msg.name]
                raise

    # ------------------------------------------------------------------ executors

    def _join(self, peer: Peer, msg: ExecutorJoin) -> ClusterInfo:
        owner = next((who for prefix, who in self._pool_owners.items()
                      if msg.node_id.startswith(prefix)), None)
        self._executors[msg.url] = _Executor(msg.url, peer, resources=dict(msg.resources),
                                             node_id=msg.node_id, owner=owner)
        self.view.join(msg.url, msg.workers)
        peer.state["executor_url"] = msg.url
        peer.on_close.append(self._executor_left)
        log.info("executor %s joined", msg.url)
        self.executors_changed.set()
        self.executors_changed = trio.Event()
        return ClusterInfo(self.kvs_url, "", self.node_id)

    def _executor_left(self, peer: Peer) -> None:
        url: str | None = peer.state.get("executor_url")
        ex = self._executors.get(url) if url else None
        if url is None or ex is None or ex.peer is not peer:
            return
        del self._executors[url]
        ex.idle.set()
        self.view.leave(url)
        if trio.current_effective_deadline() == float("-inf"):
            return  # this node is shutting down; nobody is left to tell
        self.executors_changed.set()
        self.executors_changed = trio.Event()
        lost = [run_id for run_id, run in self._runs.items() if url in run.executors]
        if lost:
            log.warning("executor %s disappeared; failing %d runs placed on it", url, len(lost))
        else:
            log.info("executor %s disconnected", url)
        for run_id in lost:
            self._nursery.start_soon(self._fail_run, run_id, DropletError(
                f"executor {url} disappeared while running this call; it was not completed"))

    # ------------------------------------------------------------------ draining

    def _placeable(self) -> list[str]:
        """Executors that take new calls: all but those being drained (if any are left)."""
        urls = [url for url, ex in self._executors.items() if not ex.draining]
        return urls or list(self._executors)

    def executor_url(self, node_id: str) -> str | None:
        """The address of the joined executor that announced ``node_id``, if any."""
        return next((url for url, ex in self._executors.items() if ex.node_id == node_id),
                    None)

    def executor_load(self, url: str) -> tuple[int, int]:
        """Executor ``url``'s functions in flight now and placed so far ((0, 0): unknown)."""
        ex = self._executors.get(url)
        return (ex.running, ex.placed) if ex is not None else (0, 0)

    async def drain(self, url: str) -> None:
        """Stop placing calls on executor ``url``, then return once nothing runs on it.

        Every run with a function placed there has finished (its result was
        reported) when this returns, so the executor can stop without losing a
        call. The executor is then forgotten (:meth:`retire`); a call placed
        before the drain began still completes, a call placed after goes elsewhere.
        """
        ex = self._executors.get(url)
        if ex is None:
            return
        ex.draining = True
        # Clients may send runs straight to it until the placements they hold
        # (CallPlaced, which no longer names it) run out.
        leases_end = trio.current_time() + PLACEMENT_LEASE
        while True:
            if ex.running == 0:
                ex.idle.set()
            await ex.idle.wait()
            if self._executors.get(url) is not ex:
                return  # it left (its runs were failed) or was retired meanwhile
            # Its next report counts the calls it finished last; then it may go.
            with trio.move_on_after(DRAIN_REPORT_WAIT):
                await ex.reported.wait()
            if ex.running == 0 and self._executors.get(url) is ex:
                await self._direct_runs_done(ex, leases_end)
                if ex.running == 0 and self._executors.get(url) is ex:
                    break
            if self._executors.get(url) is not ex:
                return
            # Placed on after all (every executor was draining): wait for that too.
            # A drain of it repeated meanwhile may have replaced the event already:
            # share that one (a second replacement would leave one drain waiting forever).
            if ex.idle.is_set():
                ex.idle = trio.Event()
        self.retire(url)

    async def _direct_runs_done(self, ex: _Executor, leases_end: float) -> None:
        """Wait until no client may send runs to ``ex`` any more and, by its reports,
        none it was sent is still running (direct runs are not counted here)."""
        await trio.sleep_until(leases_end)
        # The last report may predate runs clients sent just before their leases
        # ended: judge by a report that came after the leases ended, at least.
        fresh = False
        while self._executors.get(ex.url) is ex and (not fresh or self.view.running(ex.url) > 0):
            with trio.move_on_after(DRAIN_REPORT_WAIT):
                await ex.reported.wait()
            fresh = True

    def pool_view(self, prefix: str) -> list[tuple[str, str, int, int, int, int, int]]:
        """``(node_id, url, busy, queued, running, in flight, placed)`` of the joined
        executors whose node id starts with ``prefix`` (an adaptive node's workers)."""
        if not prefix:
            raise ProtocolError("a pool query needs a non-empty node id prefix")
        reported = {e.url: e for e in self.view.status("", [], [], trio.current_time())
                    .executors}
        found = []
        for url, ex in self._executors.items():
            if ex.draining or not ex.node_id.startswith(prefix):
                continue
            r = reported.get(url)
            busy, queued, running = (r.busy, r.queued, r.running) if r else (0, 0, 0)
            found.append((ex.node_id, url, busy, queued, running, ex.running, ex.placed))
        return found

    def claim_pool(self, prefix: str, owner: object) -> None:
        """Let ``owner`` (a node's link, or this node's pool) manage the executors that join
        with node ids ``prefix...`` from now on: only it may drain them.

        A link claims one prefix, with its first :class:`PoolQuery` (normally
        before its workers join; workers that joined earlier are adopted).
        Refused: a prefix without a "-" (it could match executors' own random
        node ids), one overlapping another's, or one matching an executor that
        another claimant owns.
        """
        if not prefix:
            raise ProtocolError("a pool query needs a non-empty node id prefix")
        if "-" not in prefix:
            raise ProtocolError(f"a pool's node id prefix must contain a '-', not {prefix!r}")
        mine = next((p for p, who in self._pool_owners.items() if who is owner), None)
        if mine == prefix:
            return
        if mine is not None:
            raise ProtocolError(f"this link manages one pool, {mine!r}, not also {prefix!r}")
        if any(p.startswith(prefix) or prefix.startswith(p) for p in self._pool_owners):
            raise ProtocolError(f"node id prefix {prefix!r} overlaps another node's pool")
        matching = [ex for ex in self._executors.values() if ex.node_id.startswith(prefix)]
        if any(ex.owner is not None and ex.owner is not owner for ex in matching):
            raise ProtocolError(f"executors of another node joined with node ids {prefix!r}...")
        self._pool_owners[prefix] = owner
        for ex in matching:
            ex.owner = owner
        if isinstance(owner, Peer):
            def release(_: Peer) -> None:
                self._pool_owners.pop(prefix, None)

            owner.on_close.append(release)

    def _pool_status(self, peer: Peer, prefix: str, text: str) -> None:
        """Keep an executor node's scaling status (for ``conn.status()``) while it is linked."""
        try:
            found = ScalingStatus.from_dict(json.loads(text))
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"pool status: not valid JSON ({exc})") from None
        self._pools[prefix] = attrs.evolve(found, events=found.events[-MAX_POOL_EVENTS:])
        prefixes: set[str] = peer.state.setdefault("pool_prefixes", set())
        if not prefixes:
            peer.on_close.append(self._pool_left)
        prefixes.add(prefix)

    def _pool_left(self, peer: Peer) -> None:
        for prefix in peer.state.get("pool_prefixes", ()):
            self._pools.pop(prefix, None)

    def _pool_reply(self, prefix: str) -> PoolReply:
        rows = self.pool_view(prefix)
        columns = [list(c) for c in zip(*rows, strict=True)] if rows else [[]] * 7
        return PoolReply(*columns)

    async def _drain_for(self, peer: Peer, request_id: int, url: str) -> None:
        await self.drain(url)
        try:
            peer.post_reply(request_id, BoolReply(True))
        except DropletError:
            log.debug("the node that asked to drain %s went away", url)

    def retire(self, url: str) -> None:
        """Forget executor ``url`` (being stopped on purpose, with nothing running)."""
        ex = self._executors.pop(url, None)
        if ex is None:
            return
        ex.idle.set()
        self.view.leave(url)
        log.info("executor %s drained and retired", url)
        self.executors_changed.set()
        self.executors_changed = trio.Event()

    async def _fail_run(self, run_id: str, error: DropletError) -> None:
        value = pickle.dumps(_Failure(error))
        run = self._runs.get(run_id)
        if run is None:
            return
        if run.caller is None:
            try:
                await self._kvs.request(
                    KvsPut(run.result_key,
                           encode_lattice(LWWLattice.now(value), dump=RAW)), KVS_TIMEOUT)
            except DropletError as exc:
                log.warning("could not record failure of run %s: %s", run_id, exc)
        await self._run_done(RunDone(run_id, value, True))

    # ------------------------------------------------------------------ calls

    async def _call(self, peer: Peer, msg: CallDag, request_id: int) -> Any:
        if msg.consistency not in CONSISTENCY_LEVELS:
            raise DagError(
                f"unknown consistency level {msg.consistency!r}; "
                f"use one of {', '.join(CONSISTENCY_LEVELS)}")
        dag = self._dag_for(msg)
        then = self._continuation(msg)
        caller = (peer, request_id) if msg.direct else None
        result_key = msg.result_key or f"{RESULT_PREFIX}{unique_id()}"
        run_id = await self._start(dag, msg, caller, result_key, None, then)
        if msg.direct:
            return DEFERRED
        return CallAccepted(run_id, result_key)

    def _place_call(self, msg: PlaceCall) -> CallPlaced:
        """Where a client may send runs of ``msg.target`` itself (see ``handout.py``)."""
        dag = self._dag_for(CallDag(msg.target, msg.is_function, [], []))
        loads = self.view.loads()
        offers = []
        for ex in self._executors.values():
            threads, queued, cached = self.view.load(ex.url)
            offers.append(Offer(ex.url, ex.running + loads.get(ex.url, 0), threads, queued,
                                cached, gpu=ex.resources.get("gpu", 0) > 0,
                                draining=ex.draining))
        return hand_out(msg, dag, self._functions, offers, self._placement.impl)

    async def _call_oneway(self, peer: Peer, msg: CallDag) -> None:
        """A call sent without a request id: nobody waits for ``CallAccepted``.

        Clients send calls this way once a call of the same shape was accepted
        (see :class:`~droplet.client._core.AcceptedCalls`): they chose the
        result key and wait on it already, so a refusal is stored there as the
        call's failure and reaches the caller's ``get()``.
        """
        try:
            await self._call(peer, msg, 0)
        except Exception as exc:  # a custom placement policy's bug too: the caller waits
            assert msg.result_key is not None
            if not isinstance(exc, DropletError):
                log.exception("call of %r failed", msg.target)
                exc = DropletError(f"internal error: {type(exc).__name__}: {exc}")
            # In a task: this runs in the caller's reader, which must not wait on the store.
            self._nursery.start_soon(self._record_failure, "", msg.result_key,
                                     pickle.dumps(_Failure(exc)))

    def _dag_for(self, msg: CallDag) -> Dag:
        if msg.is_function:
            if msg.target not in self._functions:
                raise RegistrationError(f"no function named {msg.target!r} is registered")
            return Dag(msg.target, (msg.target,), (), (), msg.target, (msg.target,))
        found = self._dags.get(msg.target)
        if found is None:
            raise DagError(f"no DAG named {msg.target!r} is registered")
        return found

    def _continuation(self, msg: CallDag, depth: int = 0) -> CallDag | None:
        """The DAG call to run on ``msg``'s result, checked now so errors reach the caller."""
        if msg.continuation is None:
            return None
        if depth >= MAX_CONTINUATIONS:
            raise DagError(f"call_dag({msg.target!r}): more than {MAX_CONTINUATIONS} "
                           "chained continuations")
        try:
            then = decode_message(msg.continuation)[0]
        except DropletError as exc:
            raise DagError(f"call_dag({msg.target!r}): malformed continuation: {exc}") from None
        if type(then) is not CallDag or then.is_function:
            raise DagError(f"call_dag({msg.target!r}): a continuation must be a DAG call")
        if msg.consistency == CAUSAL or then.consistency == CAUSAL:
            raise DagError(f"call_dag({msg.target!r}): continuations do not run under CAUSAL")
        self._dag_for(then)
        self._continuation(then, depth + 1)
        return then

    async def _start(self, dag: Dag, msg: CallDag, caller: tuple[Peer, int] | None,
                     result_key: str, carried: Blob | None, then: CallDag | None) -> str:
        """Place and trigger one run of ``dag``; returns the run id."""
        if msg.consistency not in CONSISTENCY_LEVELS:
            raise DagError(
                f"unknown consistency level {msg.consistency!r}; "
                f"use one of {', '.join(CONSISTENCY_LEVELS)}")
        for fn in msg.arg_fns:
            if fn not in dag.functions:
                raise DagError(f"arguments given for {fn!r}, which is not in DAG {dag.name!r}")
        versions = []
        for fn in dag.functions:
            version = self._functions.get(fn)
            if version is None:
                raise DagError(f"DAG {dag.name!r} uses {fn!r}, which is no longer registered")
            versions.append(version)
        candidates = []
        for url in self._placeable():
            ex = self._executors[url]
            threads, queued, cached = self.view.load(url)
            candidates.append(Candidate(url, ex.running, threads, queued,
                                        ex.resources.get("gpu", 0) > 0, cached))
        references = dict(zip(msg.arg_fns, msg.references, strict=False))
        where = self._placement.place(dag, candidates, {}, (), references)
        run_id = unique_id()
        deadline = time.time() + msg.timeout if msg.timeout else None
        placed = [where[fn] for fn in dag.functions]
        for url in placed:
            self._executors[url].running += 1
            self._executors[url].placed += 1
        # A run with a continuation reports its result here, to start the next DAG.
        direct = caller is not None or then is not None
        self._runs[run_id] = _Run(placed, result_key, caller, msg.consistency,
                                  trio.current_time(), then)
        self._runs_started += 1
        if self._runs_started % SWEEP_EVERY == 0:
            self._forget_stale_runs()
        edges = [list(e) for e in dag.connections]
        for fn in dag.sources:
            trigger = Trigger(
                run_id, fn, list(dag.functions), versions, placed, edges,
                msg.arg_fns, msg.arg_blobs, None, None, False, result_key, msg.output_key,
                direct, msg.consistency, msg.client_id, deadline, "", msg.causal,
                list(dag.multiexec), list(dag.invalid_results), list(dag.batching_functions),
                carried,
            )
            if len(dag.sources) > 1:  # each source carries only the arguments ahead of it
                trigger = attrs.evolve(trigger, **arguments_for(trigger, fn))
            try:
                # Through the executor's outbox: a backed-up executor fails this
                # call at once instead of stalling the caller's connection.
                self._executors[where[fn]].peer.post(trigger, on_full="raise")
            except (DropletError, KeyError) as exc:
                self._runs.pop(run_id, None)
                self._release(placed)
                raise DropletError(f"could not reach executor {where[fn]}: {exc}") from exc
        return run_id

    def _forget_stale_runs(self) -> None:
        """Drop runs whose sink never reported (a hung function), so they cannot pile up."""
        cutoff = trio.current_time() - RUN_TTL
        stale = [run_id for run_id, run in self._runs.items() if run.started < cutoff]
        for run_id in stale:
            # Its caller (a direct response) or its future hears why, never silence.
            self._nursery.start_soon(self._fail_run, run_id, errors.TimeoutError(
                f"run {run_id} was still unfinished after {RUN_TTL:g} s, so the "
                "scheduler forgot it (a function that never returns?)"))
        if stale:
            log.warning("forgot %d runs still unfinished after %g s", len(stale), RUN_TTL)

    def _release(self, placed: list[str]) -> None:
        for url in placed:
            ex = self._executors.get(url)
            if ex is not None and ex.running > 0:
                ex.running -= 1
                if ex.running == 0 and ex.draining:
                    ex.idle.set()

    async def _run_done(self, msg: RunDone) -> None:
        run = self._runs.pop(msg.run_id, None)
        if run is None:
            return
        self._release(run.executors)
        if run.consistency == "REPEATABLE_READ":
            try:
                self._kvs.post(KvsRelease(msg.run_id), on_full="raise")
            except DropletError as exc:
                log.warning("could not release versions pinned by run %s: %s", msg.run_id, exc)
        if run.then is not None:
            await self._continue(msg, run, run.then)
            return
        if run.caller is not None:
            peer, request_id = run.caller
            value = msg.value if msg.value is not None else pickle.dumps(None)
            try:
                peer.post_reply(request_id, DagResult(msg.run_id, value, msg.failed))
            except DropletError:
                log.debug("caller of run %s went away", msg.run_id)

    async def _continue(self, done: RunDone, run: _Run, then: CallDag) -> None:
        """A run with a continuation finished: run the next DAG on its result."""
        if not done.failed and done.value is not None:
            try:
                nxt = self._continuation(then)
                await self._start(self._dag_for(then), then, run.caller, run.result_key,
                                  done.value, nxt)
                return
            except DropletError as exc:
                done = RunDone(done.run_id, pickle.dumps(_Failure(exc)), True)
        # The run (or starting its continuation) failed: that is the caller's result.
        value = done.value if done.value is not None else pickle.dumps(None)
        if run.caller is not None:
            peer, request_id = run.caller
            try:
                peer.post_reply(request_id, DagResult(done.run_id, value, True))
            except DropletError:
                log.debug("caller of run %s went away", done.run_id)
            return
        # In a task: this runs in the executor's reader, which must not wait on the store.
        self._nursery.start_soon(self._record_failure, done.run_id, run.result_key, value)

    async def _record_failure(self, run_id: str, result_key: str, value: Blob) -> None:
        try:
            await self._kvs.request(KvsPut(
                result_key, encode_lattice(LWWLattice.now(bytes(value)), dump=RAW)), KVS_TIMEOUT)
        except DropletError as exc:
            log.warning("could not record failure of run %s: %s", run_id, exc)
