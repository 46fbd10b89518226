"""SchedulerService bookkeeping with fake peers (no sockets, virtual time)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from droplet.protocol.messages import CallAccepted, CallDag, RunDone, Trigger
from droplet.scheduler import service as scheduler_service
from droplet.scheduler.service import SchedulerService


class FakePeer:
    """Records what the scheduler sends an executor."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.state: dict[str, Any] = {}
        self.on_close: list[Any] = []
        self.closed = False
        self.remote = "fake://executor"

    async def send(self, msg: Any) -> None:
        self.sent.append(msg)

    async def request(self, msg: Any, timeout: float | None = None) -> Any:
        self.sent.append(msg)
        return None

    def post(self, msg: Any, *, on_full: str = "disconnect") -> None:
        self.sent.append(msg)

    def post_reply(self, request_id: int, msg: Any) -> None:
        self.sent.append(msg)


def make_scheduler(nursery: trio.Nursery) -> tuple[SchedulerService, FakePeer]:
    kvs: Any = FakePeer()
    scheduler = SchedulerService(nursery, kvs=kvs, kvs_url="")
    executor = FakePeer()
    scheduler._functions["f"] = "v1"
    scheduler._executors["fake://executor"] = scheduler_service._Executor(
        "fake://executor", executor)  # type: ignore[arg-type]
    return scheduler, executor


async def call(scheduler: SchedulerService) -> CallAccepted:
    client: Any = FakePeer()
    reply = await scheduler.handle(client, CallDag("f", True, ["f"], [b"\x80\x05]\x94."]), 1)
    assert isinstance(reply, CallAccepted)
    return reply


async def test_a_finished_run_releases_its_executor() -> None:
    async with trio.open_nursery() as nursery:
        scheduler, executor = make_scheduler(nursery)
        accepted = await call(scheduler)
        (trigger,) = executor.sent
        assert isinstance(trigger, Trigger) and trigger.run_id == accepted.run_id
        assert scheduler.statistics().runs_in_flight == 1
        assert scheduler._executors["fake://executor"].running == 1
        await scheduler.handle(FakePeer(), RunDone(accepted.run_id, None, False), 0)  # type: ignore[arg-type]
        assert scheduler.statistics().runs_in_flight == 0
        assert scheduler._executors["fake://executor"].running == 0
        nursery.cancel_scope.cancel()


async def test_runs_that_never_finish_are_forgotten(autojump_clock: trio.testing.MockClock
                                                    ) -> None:
    async with trio.open_nursery() as nursery:
        scheduler, _ = make_scheduler(nursery)
        await call(scheduler)  # its sink never reports
        await trio.sleep(scheduler_service.RUN_TTL + 1)
        for _ in range(scheduler_service.SWEEP_EVERY - 1):  # the sweep comes with calls
            await call(scheduler)
        await trio.testing.wait_all_tasks_blocked()
        # Only the hung run was old enough to go; the fresh ones are still tracked.
        assert scheduler.statistics().runs_in_flight == scheduler_service.SWEEP_EVERY - 1
        nursery.cancel_scope.cancel()


async def test_a_backed_up_executor_fails_the_call_at_once() -> None:
    """The trigger goes through the executor's outbox with on_full="raise": a call placed
    on an executor that is not reading fails now instead of stalling the caller's
    connection (issue 7), and the run is not left behind."""
    import pytest

    from droplet.errors import DropletError
    from droplet.rpc import OutboxFull

    async with trio.open_nursery() as nursery:
        scheduler, executor = make_scheduler(nursery)

        def full(msg: Any, *, on_full: str = "disconnect") -> None:
            assert on_full == "raise"  # a slow executor is refused work, not cut off
            raise OutboxFull("fake://executor is not keeping up")

        executor.post = full  # type: ignore[method-assign]
        with pytest.raises(DropletError, match="not keeping up"):
            await call(scheduler)
        assert scheduler.statistics().runs_in_flight == 0
        assert scheduler._executors["fake://executor"].running == 0
        nursery.cancel_scope.cancel()


async def test_a_forgotten_run_answers_its_caller(autojump_clock: trio.testing.MockClock
                                                  ) -> None:
    """Direct response: the waiting caller gets an error; a future: its result key does."""
    from droplet.client._core import unwrap_result
    from droplet.errors import TimeoutError
    from droplet.lattices import RAW, decode_lattice
    from droplet.protocol.messages import DagResult, KvsPut
    from droplet.rpc import DEFERRED

    async with trio.open_nursery() as nursery:
        scheduler, _ = make_scheduler(nursery)
        caller: Any = FakePeer()
        direct = CallDag("f", True, ["f"], [b"\x80\x05]\x94."], direct=True)
        assert await scheduler.handle(caller, direct, 7) is DEFERRED
        accepted = await call(scheduler)  # a future's call: its result key hears
        await trio.sleep(scheduler_service.RUN_TTL + 1)
        for _ in range(scheduler_service.SWEEP_EVERY - 2):
            await call(scheduler)
        await trio.testing.wait_all_tasks_blocked()
        (reply,) = caller.sent
        assert isinstance(reply, DagResult) and reply.failed
        with pytest.raises(TimeoutError, match="forgot"):
            unwrap_result(reply.value)
        kvs: Any = scheduler._kvs
        (put,) = [m for m in kvs.sent if isinstance(m, KvsPut)]
        assert put.key == accepted.result_key
        with pytest.raises(TimeoutError, match="unfinished after"):
            unwrap_result(decode_lattice(put.lattice, load=RAW).reveal())
        nursery.cancel_scope.cancel()


async def test_two_concurrent_registrations_of_one_name_cannot_both_win(
        autojump_clock: trio.testing.MockClock) -> None:
    """The name is taken before the registry write is awaited, so of two different
    shapes registered at once, one is refused (as it would be one after the other)."""
    from droplet.errors import DagError
    from droplet.protocol.messages import RegisterDag

    async with trio.open_nursery() as nursery:
        scheduler, _ = make_scheduler(nursery)
        scheduler._functions["g"] = "v1"
        kvs: Any = scheduler._kvs

        async def slow_request(msg: Any, timeout: float | None = None) -> Any:
            await trio.sleep(1)  # the store takes a while
            kvs.sent.append(msg)

        kvs.request = slow_request
        outcomes: list[str] = []

        async def register(functions: list[str], edges: list[list[str]]) -> None:
            try:
                await scheduler.handle(kvs, RegisterDag("d", functions, edges, []), 1)
                outcomes.append("ok")
            except DagError:
                outcomes.append("refused")

        async with trio.open_nursery() as both:
            both.start_soon(register, ["f"], [])
            both.start_soon(register, ["f", "g"], [["f", "g"]])
        assert sorted(outcomes) == ["ok", "refused"]
        nursery.cancel_scope.cancel()
