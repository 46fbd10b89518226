"""The executors of an all-in-one node: started, watched, scaled and drained.

:class:`ExecutorPool` runs each executor in a *slot* (a cancel scope around
``launch(slot_id)``: a child process, or an in-process executor for the
embedded cluster). The executor announces the slot id when it joins the
scheduler, which is how the pool finds its address.

With ``--executors MIN:MAX`` the pool asks its
:class:`~droplet.autoscale.Autoscaler` once per report period what to do,
from what the scheduler knows of each executor (its last report and the calls
placed on it). Stopping an executor drains it first
(:meth:`~droplet.scheduler.service.SchedulerService.drain`): the scheduler
places nothing more on it, every call already placed there finishes, and only
then is its slot cancelled. A call placed a moment before the drain completes
there; one placed after goes to another executor.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import attrs
import trio

from ..autoscale import UP, Autoscaler, Observation, ScalingPolicy
from ..scheduler.service import SchedulerService
from ..status import ScaleEvent, ScalingStatus

__all__ = ["MAX_EVENTS", "ExecutorPool"]

log = logging.getLogger("droplet.node")

#: Scale events kept for the status view.
MAX_EVENTS = 20


@attrs.define(eq=False)
class _Slot:
    id: str
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    #: "starting" (not joined, or restarting), "running" or "draining".
    state: str = "starting"
    url: str | None = None


class ExecutorPool:
    """MIN to MAX executors of one node (a fixed number when MIN == MAX)."""

    def __init__(self, scheduler: SchedulerService, launch: Callable[[str], Awaitable[None]],
                 policy: ScalingPolicy, *, interval: float = 1.0, name: str = "w") -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self._scheduler = scheduler
        self._launch = launch
        self.policy = policy
        self.interval = interval
        self.autoscaler = Autoscaler(policy)
        self._ids = (f"{name}{i}" for i in itertools.count())
        self._slots: dict[str, _Slot] = {}
        self._nursery: trio.Nursery | None = None
        self.events: deque[ScaleEvent] = deque(maxlen=MAX_EVENTS)
        self.scale_ups = 0
        self.scale_downs = 0
        #: set (and replaced) whenever an executor starts, joins or stops.
        self.changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Start the minimum, then (adaptive) rescale every ``interval`` until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self.policy.minimum):
                self._start_slot()
            task_status.started()
            if not self.policy.adaptive:
                await trio.sleep_forever()
            while True:
                await trio.sleep(self.interval)
                self.tick(trio.current_time())

    # ------------------------------------------------------------------ decisions

    def _observe(self, now: float) -> dict[str, Observation]:
        reported = {e.url: e for e in self._scheduler.view.status("", [], [], now).executors}
        found = {}
        for slot in self._slots.values():
            if slot.state == "draining":
                continue
            slot.url = self._scheduler.executor_url(slot.id)
            slot.state = "running" if slot.url else "starting"
            if slot.url is None:
                continue
            in_flight, placed = self._scheduler.executor_load(slot.url)
            report = reported.get(slot.url)
            if report is None:
                found[slot.id] = Observation(running=in_flight, placed=placed)
            else:
                found[slot.id] = Observation(report.busy, report.queued,
                                             max(report.running, in_flight), placed)
        return found

    def tick(self, now: float) -> None:
        """Look at the executors once and start or drain one if the autoscaler says so."""
        observed = self._observe(now)
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
        url = self._scheduler.executor_url(slot.id)
        if url is not None:
            await self._scheduler.drain(url)
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
        """Each executor's slot id and state (starting, running or draining)."""
        for slot in self._slots.values():
            if slot.state != "draining":
                slot.url = self._scheduler.executor_url(slot.id)
                slot.state = "running" if slot.url else "starting"
        return {s.id: s.state for s in self._slots.values()}

    def status(self) -> ScalingStatus:
        states = list(self.slots.values())
        return ScalingStatus(
            self.policy.minimum, self.policy.maximum, states.count("running"),
            states.count("starting"), states.count("draining"), self.scale_ups,
            self.scale_downs, tuple(self.events))
