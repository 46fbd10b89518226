"""The executor pool's supervision in virtual time: a fake scheduler, fake executors.

The launcher is a task that "joins" (the fake control lists it) and sleeps
until its slot is cancelled; the control's drain blocks until the test says
the executor's calls are done. MockClock(autojump_threshold=0) runs the
thresholds (seconds) instantly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio.testing

from droplet.autoscale import Observation, ScalingPolicy
from droplet.errors import ConnectionError
from droplet.node.pool import ExecutorPool, PoolControl
from droplet.status import ScalingStatus


class FakeControl(PoolControl):
    def __init__(self) -> None:
        self.load: dict[str, Observation] = {}
        self.alive: set[str] = set()
        self.drains: list[str] = []
        self.drained = trio.Event()

    async def executors(self, prefix: str, status: ScalingStatus | None = None
                        ) -> dict[str, tuple[str, Observation]]:
        return {slot: (f"fake://{slot}", self.load.get(slot, Observation()))
                for slot in sorted(self.alive) if slot.startswith(prefix)}

    async def drain(self, url: str) -> None:
        self.drains.append(url)
        await self.drained.wait()  # "the calls placed there are still running"


def _launcher(control: FakeControl) -> Callable[[str], Awaitable[None]]:
    async def launch(slot: str) -> None:
        control.alive.add(slot)
        try:
            await trio.sleep_forever()
        finally:
            control.alive.discard(slot)

    return launch


async def test_pool_grows_on_a_queue_and_drains_before_stopping(
        autojump_clock: trio.testing.MockClock) -> None:
    control = FakeControl()
    policy = ScalingPolicy(1, 3, up_queue=1.0, up_after=2.0, down_after=30.0)
    pool = ExecutorPool(control, _launcher(control), policy,
                        interval=1.0, name="p-w")
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await trio.sleep(1.5)
        assert pool.slots == {"p-w0": "running"}
        control.load["p-w0"] = Observation(busy=4, queued=8, running=12, placed=12)
        await trio.sleep(1.0)
        assert len(pool.slots) == 1  # not yet: the queue must persist 2 s
        await trio.sleep(2.0)
        assert len(pool.slots) == 2
        # The new one joined and shares the queue; it grows again only if it persists.
        control.load["p-w1"] = Observation(busy=4, queued=4, running=8, placed=8)
        control.load["p-w0"] = Observation(busy=4, queued=4, running=8, placed=12)
        await trio.sleep(4.0)
        assert pool.slots == {"p-w0": "running", "p-w1": "running", "p-w2": "running"}
        await trio.sleep(60.0)
        assert len(pool.slots) == 3  # the maximum, however long it queues

        # The load is gone: after 30 s idle the newest extra executor is drained.
        for slot in control.alive:
            control.load[slot] = Observation(placed=20)
        await trio.sleep(31.0)
        assert control.drains == ["fake://p-w2"]
        assert pool.slots["p-w2"] == "draining" and "p-w2" in control.alive
        await trio.sleep(100.0)
        # Still running: its calls are not done, and no other is drained meanwhile.
        assert control.drains == ["fake://p-w2"] and "p-w2" in control.alive
        assert pool.status().draining == 1 and pool.status().current == 2
        control.drained.set()
        await trio.sleep(1.5)
        assert "p-w2" not in control.alive
        await trio.sleep(60.0)
        assert pool.slots == {"p-w0": "running"}  # down to the minimum, never below
        await trio.sleep(100.0)
        assert pool.slots == {"p-w0": "running"}
        status = pool.status()
        assert [(e.direction, e.executors) for e in status.events] == [
            ("up", 2), ("up", 3), ("down", 2), ("down", 1)]
        assert (status.minimum, status.maximum, status.current) == (1, 3, 1)
        nursery.cancel_scope.cancel()


async def test_fixed_pool_never_scales(autojump_clock: trio.testing.MockClock) -> None:
    control = FakeControl()
    pool = ExecutorPool(control, _launcher(control), ScalingPolicy(2, 2),
                        interval=1.0, name="f-w")
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        for slot in ("f-w0", "f-w1"):
            control.load[slot] = Observation(busy=1, queued=50, running=51)
        await trio.sleep(1000.0)
        assert pool.slots == {"f-w0": "running", "f-w1": "running"}
        assert not pool.events and not control.drains
        nursery.cancel_scope.cancel()


class FailingControl(FakeControl):
    async def drain(self, url: str) -> None:
        self.drains.append(url)
        raise ConnectionError("the scheduler went away")


async def test_an_executor_the_scheduler_cannot_drain_keeps_running(
        autojump_clock: trio.testing.MockClock) -> None:
    control = FailingControl()
    pool = ExecutorPool(control, _launcher(control), ScalingPolicy(1, 2), interval=1.0,
                        name="d-w")
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        second = pool.scale_up()
        await trio.sleep(1.5)
        assert pool.slots[second] == "running"
        pool.scale_down(second)
        await trio.sleep(0.5)
        assert control.drains == [f"fake://{second}"]
        assert pool.slots[second] == "running" and second in control.alive
        assert pool.status().scale_downs == 0
        nursery.cancel_scope.cancel()


async def test_stopping_a_starting_executor_waits_for_its_join_then_drains_it(
        autojump_clock: trio.testing.MockClock) -> None:
    control = FakeControl()
    control.drained.set()

    async def slow_to_join(slot: str) -> None:
        if slot.endswith("w1"):
            await trio.sleep(5.0)
        control.alive.add(slot)
        try:
            await trio.sleep_forever()
        finally:
            control.alive.discard(slot)

    pool = ExecutorPool(control, slow_to_join, ScalingPolicy(1, 2), interval=1.0, name="s-w")
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        second = pool.scale_up()
        await trio.sleep(0.5)
        pool.scale_down(second)
        await trio.sleep(3.0)
        assert second not in control.alive and not control.drains  # not joined yet
        assert pool.slots[second] == "draining"
        await trio.sleep(3.0)
        # Joined at t=5: drained through the scheduler, then stopped.
        assert control.drains == [f"fake://{second}"]
        assert second not in control.alive and second not in pool.slots
        nursery.cancel_scope.cancel()


async def test_a_long_remote_drain_is_one_request(
        autojump_clock: trio.testing.MockClock) -> None:
    """A drain lasts as long as the calls there: the node asks once and waits, rather than
    piling up a drain request (and a waiting task in the scheduler) every minute."""
    from droplet import errors
    from droplet.node.pool import RemoteControl
    from droplet.protocol.messages import BoolReply, DrainExecutor

    class FakeSchedulerLink:
        def __init__(self) -> None:
            self.sent: list[object] = []
            self.calls_done = trio.Event()

        async def request(self, msg: object, timeout: float | None = None) -> object:
            self.sent.append(msg)
            with trio.move_on_after(float("inf") if timeout is None else timeout):
                await self.calls_done.wait()
                return BoolReply(True)
            raise errors.TimeoutError("no reply")

    link = FakeSchedulerLink()
    control = RemoteControl(link)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.drain, "tcp://w:1")
        await trio.sleep(600)  # ten minutes of calls still running there
        link.calls_done.set()
    assert link.sent == [DrainExecutor("tcp://w:1")]
