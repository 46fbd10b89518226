"""The executors of a node: started, watched, scaled and drained.

:class:`ExecutorPool` runs each executor in a *slot* (a cancel scope around
``launch(slot_id)``: a child process, or an in-process executor for the
embedded cluster). The executor announces the slot id when it joins the
scheduler, which is how the pool finds its address. The pool talks to the
scheduler through a small :class:`PoolControl`: method calls on the node's
own scheduler (:class:`LocalControl`, the all-in-one node) or requests to a
remote one (:class:`RemoteControl`, an ``--role executor`` node whose
workers are child processes).

With ``--executors MIN:MAX`` the pool asks its
:class:`~droplet.autoscale.Autoscaler` once per report period what to do,
from what the scheduler knows of each executor (its last report and the calls
placed on it). Stopping an executor drains it first
(:meth:`~droplet.scheduler.service.SchedulerService.drain`): the scheduler
places nothing more on it, every call already placed there finishes, and only
then is its slot cancelled. A call placed a moment before the drain completes
there; one placed after goes to another executor. An executor still starting
is drained once it joined, and one the scheduler cannot confirm drained keeps
running.
"""

from __future__ import annotations

import abc
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import attrs
import trio

from ..autoscale import UP, Autoscaler, Observation, ScalingPolicy
from ..errors import DropletError, ProtocolError
from ..protocol.messages import BoolReply, DrainExecutor, PoolQuery, PoolReply
from ..rpc import Peer
from ..scheduler.service import SchedulerService
from ..status import ScaleEvent, ScalingStatus

__all__ = ["MAX_EVENTS", "ExecutorPool", "LocalControl", "PoolControl", "RemoteControl"]

log = logging.getLogger("droplet.node")

#: Scale events kept for the status view.
MAX_EVENTS = 20
#: Seconds a remote scheduler gets to answer a pool query (the tick is skipped if not).
QUERY_TIMEOUT = 10.0


class PoolControl(abc.ABC):
    """What a pool needs of its scheduler."""

    @abc.abstractmethod
    async def executors(self, prefix: str, status: ScalingStatus | None = None
                        ) -> dict[str, tuple[str, Observation]]:
        """``{node id: (url, observation)}`` of joined executors with node ids ``prefix...``.

        Executors being drained are left out. ``status``: the pool's own, for
        a scheduler that shows it.
        """

    @abc.abstractmethod
    async def drain(self, url: str) -> None:
        """Return once the scheduler placed nothing more on ``url`` and nothing runs there."""


def _observation(busy: int, queued: int, running: int, in_flight: int, placed: int
                 ) -> Observation:
    return Observation(busy, queued, max(running, in_flight), placed)


class LocalControl(PoolControl):
    """The scheduler of this process (the all-in-one node)."""

    def __init__(self, scheduler: SchedulerService) -> None:
        self.scheduler = scheduler

    async def executors(self, prefix: str, status: ScalingStatus | None = None
                        ) -> dict[str, tuple[str, Observation]]:
        return {node_id: (url, _observation(*load))
                for node_id, url, *load in self.scheduler.pool_view(prefix)}

    async def drain(self, url: str) -> None:
        await self.scheduler.drain(url)


class RemoteControl(PoolControl):
    """A scheduler in another process, over a link to it (an ``--role executor`` node)."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    async def executors(self, prefix: str, status: ScalingStatus | None = None
                        ) -> dict[str, tuple[str, Observation]]:
        text = json.dumps(status.to_dict()) if status is not None else ""
        reply = await self.peer.request(PoolQuery(prefix, text), QUERY_TIMEOUT)
        if type(reply) is not PoolReply:
            raise ProtocolError(f"expected PoolReply, got {type(reply).__name__}")
        columns = (reply.node_ids, reply.urls, reply.busy, reply.queued, reply.running,
                   reply.in_flight, reply.placed)
        if len({len(c) for c in columns}) != 1:
            raise ProtocolError("PoolReply lists differ in length")
        return {node_id: (url, _observation(*load))
                for node_id, url, *load in zip(*columns, strict=True)}

    async def drain(self, url: str) -> None:
        # No timeout: a drain lasts as long as the calls placed there, and asking
        # again would leave one more waiting drain in the scheduler each time.
        # A link that drops fails the request (ConnectionError).
        reply = await self.peer.request(DrainExecutor(url))
        if type(reply) is not BoolReply:
            raise ProtocolError(f"expected BoolReply, got {type(reply).__name__}")


@attrs.define(eq=False)
class _Slot:
    id: str
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    #: "starting" (not joined, or restarting), "running" or "draining".
    state: str = "starting"
    url: str | None = None


class ExecutorPool:
    """MIN to MAX executors of one node (a fixed number when MIN == MAX)."""

    def __init__(self, control: PoolControl, launch: Callable[[str], Awaitable[None]],
                 policy: ScalingPolicy, *, interval: float = 1.0, name: str = "w") -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        if not name:
            raise ValueError("a pool needs a name (the prefix of its executors' node ids)")
        self._control = control
        self._prefix = name
        self._launch = launch
        self.policy = policy
        self.interval = interval
        self.autoscaler = Autoscaler(policy)
        self._ids = (f"{name}{i}" for i in itertools.count())
        self._slots: dict[str, _Slot] = {}
        self._nursery: trio.Nursery | None = None
        self._observed: dict[str, Observation] = {}
        self.events: deque[ScaleEvent] = deque(maxlen=MAX_EVENTS)
        self.scale_ups = 0
        self.scale_downs = 0
        #: set (and replaced) whenever an executor starts, joins or stops.
        self.changed = trio.Event()
        #: how the status names this node ("" for the scheduler's own node).
        self.node = ""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Start the minimum, then (adaptive) rescale every ``interval`` until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self.policy.minimum):
                self._start_slot()
            task_status.started()
            while True:
                await self.refresh()
                if self.policy.adaptive:
                    self.decide(trio.current_time())
                await trio.sleep(self.interval)

    # ------------------------------------------------------------------ decisions

    async def refresh(self) -> None:
        """Learn which executors joined, their addresses and load, from the scheduler."""
        try:
            joined = await self._control.executors(
                self._prefix, self.status() if self.policy.adaptive else None)
        except DropletError as exc:  # try again next period
            log.warning("could not ask the scheduler about this node's executors: %s", exc)
            return
        changed = False
        self._observed = {}
        for slot in self._slots.values():
            if slot.state == "draining":
                continue
            url, observation = joined.get(slot.id, (None, None))
            state = "running" if url else "starting"
            changed |= state != slot.state or url != slot.url
            slot.url, slot.state = url, state
            if observation is not None:
                self._observed[slot.id] = observation
        if changed:
            self._changed()

    def decide(self, now: float) -> None:
        """Start or drain one executor if the autoscaler says so (after :meth:`refresh`)."""
        observed = {k: v for k, v in self._observed.items()
                    if self._slots.get(k) is not None and self._slots[k].state == "running"}
        decision = self.autoscaler.observe(
            now, observed, starting=self._count("starting"), draining=self._count("draining"))
        if decision == UP:
            queued = sum(o.queued for o in observed.values()) / max(1, len(observed))
            self.scale_up(f"{queued:.1f} queued calls per executor for "
                          f"{self.policy.up_after:g} s" if observed else "below the minimum")
        elif decision is not None:
            self.scale_down(decision[1], f"idle for {self.policy.down_after:g} s")

    # ------------------------------------------------------------------ actions

    def scale_up(self, reason: str = "asked") -> str:
        """Start one more executor (even past the maximum: the autoscaler keeps to it)."""
        slot = self._start_slot()
        self.scale_ups += 1
        self._event("up", self._count("running", "starting"), reason)
        log.info("starting executor %s (%s)", slot.id, reason)
        return slot.id

    def scale_down(self, slot_id: str, reason: str = "asked") -> None:
        """Drain executor ``slot_id`` and stop it once its calls are done (in the background)."""
        slot = self._slots.get(slot_id)
        if slot is None or slot.state == "draining":
            return
        assert self._nursery is not None
        slot.state = "draining"
        log.info("draining executor %s (%s)", slot.id, reason)
        self._nursery.start_soon(self._drain, slot, reason)

    async def _drain(self, slot: _Slot, reason: str) -> None:
        try:
            while True:  # its address, as of now (it may have joined since the last look)
                joined = await self._control.executors(self._prefix)
                slot.url = joined[slot.id][0] if slot.id in joined else None
                if slot.url is not None:
                    break
                # Still starting: stopping it now could race with its join (and
                # calls placed on it), so it is drained once it joined.
                await trio.sleep(self.interval)
            await self._control.drain(slot.url)
        except DropletError as exc:
            # Without the scheduler's word that nothing runs there, keep it running.
            log.warning("could not drain executor %s, keeping it: %s", slot.id, exc)
            slot.state = "running" if slot.url else "starting"
            self._changed()
            return
        slot.scope.cancel()
        self.scale_downs += 1
        self._event("down", self._count("running", "starting"), reason)

    def _start_slot(self) -> _Slot:
        assert self._nursery is not None, "the pool is not running"
        slot = _Slot(next(self._ids))
        self._slots[slot.id] = slot
        self._nursery.start_soon(self._run_slot, slot)
        return slot

    async def _run_slot(self, slot: _Slot) -> None:
        try:
            with slot.scope:
                await self._launch(slot.id)
        finally:
            self._slots.pop(slot.id, None)
            self._changed()

    # ------------------------------------------------------------------ status

    def _count(self, *states: str) -> int:
        return sum(1 for s in self._slots.values() if s.state in states)

    def _event(self, direction: str, executors: int, reason: str) -> None:
        self.events.append(ScaleEvent(time.time(), direction, executors, reason))
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    @property
    def slots(self) -> dict[str, str]:
        """Each executor's slot id and state (starting, running or draining), as last seen."""
        return {s.id: s.state for s in self._slots.values()}

    def url_of(self, slot_id: str) -> str | None:
        """Where executor ``slot_id`` serves, once it joined (as last seen)."""
        slot = self._slots.get(slot_id)
        return slot.url if slot is not None else None

    def status(self) -> ScalingStatus:
        states = list(self.slots.values())
        return ScalingStatus(
            self.policy.minimum, self.policy.maximum, states.count("running"),
            states.count("starting"), states.count("draining"), self.scale_ups,
            self.scale_downs, tuple(self.events), self.node)
