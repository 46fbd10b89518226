"""Issue 7: every long-lived table has a bound or an expiry, and shows in statistics().

The fan-in table (pure, tested synchronously), and an embedded cluster whose
table sizes are the same after 10,000 more calls that subscribe, wait, fan in
and exchange messages.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

import droplet
import droplet.executor.cache
from droplet.executor.fanin import FanIn

TIMEOUT = 300.0
#: Keys the functions touch, and the (small) executor cache they rotate through.
KEYS = 200
CACHE = 50


# --------------------------------------------------------------------------- fan-in


def test_fan_in_completes_in_upstream_order() -> None:
    table: FanIn[str] = FanIn()
    assert table.add("r", "join", "b", "B", ["a", "b"], now=0.0) is None
    assert len(table) == 1
    assert table.add("r", "join", "a", "A", ["a", "b"], now=1.0) == ["A", "B"]
    assert len(table) == 0


def test_fan_in_entries_expire() -> None:
    """Regression: partial fan-ins were swept only past 1,000 entries."""
    table: FanIn[int] = FanIn(ttl=10.0)
    for i in range(5):
        table.add(f"run-{i}", "join", "a", i, ["a", "b"], now=float(i))
    assert len(table) == 5
    table.add("late", "join", "a", 0, ["a", "b"], now=13.5)  # runs 0-3 are past 10 s
    assert len(table) == 2 and table.dropped == 4
    assert table.expire(now=100.0) == 2 and len(table) == 0


def test_fan_in_is_bounded_by_size() -> None:
    table: FanIn[int] = FanIn(max_entries=3)
    for i in range(10):
        table.add(f"run-{i}", "join", "a", i, ["a", "b"], now=0.0)
    assert len(table) == 3 and table.dropped == 7
    assert table.add("run-9", "join", "b", 9, ["a", "b"], now=0.0) == [9, 9]


# --------------------------------------------------------------------------- 10,000 calls


async def touch(lib: Any, i: int) -> int:
    """Writes and reads a key (cache subscription), mails itself, empties its mailbox."""
    key = f"shared-{i % KEYS}"
    await lib.aput(key, i)
    await lib.aget(key)
    await lib.asend(lib.getid(), b"ping")
    assert lib.recv() == [(lib.getid(), b"ping")]
    return i


def src(_: Any, i: int) -> int:
    return i


async def left(lib: Any, i: int) -> int:
    await lib.aget(f"shared-{i % KEYS}")
    return i + 1


def right(_: Any, i: int) -> int:
    return i * 2


def join(_: Any, a: int, b: int) -> int:
    return a + b


def _sizes(cluster: Any) -> dict[str, int]:
    node = cluster.node
    sizes = {f"kvs.{k}": v for k, v in attrs.asdict(node.kvs.statistics()).items()}
    sizes.update({f"scheduler.{k}": v
                  for k, v in attrs.asdict(node.scheduler.statistics()).items()})
    for n, ex in enumerate(node.executors):
        sizes.update({f"executor{n}.{k}": v for k, v in attrs.asdict(ex.statistics()).items()
                      if not isinstance(v, str)})
    return sizes


#: What each table may hold once the calls are done: empty, or its bound.
def _bounds(executors: int) -> dict[str, int]:
    bounds = {
        "kvs.subscriptions": executors * CACHE, "kvs.subscribed_keys": executors * CACHE,
        "kvs.waiting_reads": 0, "kvs.waited_keys": 0, "kvs.pinned_runs": 0,
        "scheduler.runs_in_flight": 0,
    }
    for n in range(executors):
        bounds.update({f"executor{n}.running": 0, f"executor{n}.tasks": 0,
                       f"executor{n}.fanin_pending": 0, f"executor{n}.direct_waiting": 0,
                       f"executor{n}.mailboxes": 0, f"executor{n}.cache_entries": CACHE})
    return bounds


async def _calls(cloud: Any, n: int) -> None:
    async def one(i: int) -> None:
        if i % 4 == 0:
            future = await cloud.call_dag("fan", {"src": [i]})
            assert await future.get() == (i + 1) + 2 * i
        else:
            assert await (await cloud.exec_func("touch", [i])).get() == i

    async def batch(start: int) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(start, min(start + 50, n)):
                nursery.start_soon(one, i)

    for start in range(0, n, 50):
        await batch(start)


@pytest.mark.parametrize("calls", [
    2_000, pytest.param(10_000, marks=pytest.mark.slow)])
async def test_table_sizes_stay_bounded_over_many_calls(
        calls: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: unsubscribing left empty subscriber sets, partial fan-ins were kept
    until 1,000 piled up, and none of these sizes showed in statistics()."""
    monkeypatch.setattr(droplet.executor.cache, "DEFAULT_CAPACITY", CACHE)
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(2, placement="spread") as cluster:
            async with cluster.client() as cloud:
                await cloud.register(touch, "touch")
                for fn in (src, left, right, join):
                    await cloud.register(fn, fn.__name__)
                await cloud.register_dag("fan", ["src", "left", "right", "join"],
                                         [("src", "left"), ("src", "right"),
                                          ("left", "join"), ("right", "join")])
                await _calls(cloud, 500)
                await trio.testing.wait_all_tasks_blocked(0.05)
                before = _sizes(cluster)
                await _calls(cloud, calls)
                await trio.testing.wait_all_tasks_blocked(0.05)
                after = _sizes(cluster)
            bounds = _bounds(2)
            for name, bound in bounds.items():
                assert before[name] <= bound and after[name] <= bound, (name, before, after)
            assert after["kvs.subscribed_keys"] > 0  # the calls did subscribe
            # The calls did run where the sizes were taken.
            assert sum(after[f"executor{n}.invocations"] for n in range(2)) > calls


async def test_every_node_process_reports_its_table_sizes() -> None:
    """GetStatistics: what the soak benchmark samples from each process."""
    from droplet.links import one_request
    from droplet.protocol.messages import GetStatistics, Statistics

    with trio.fail_after(30):
        async with droplet.open_local_cluster(1) as cluster:
            reply = await one_request(cluster.address, GetStatistics())
            assert type(reply) is Statistics
            for name in ("kvs.subscribed_keys", "kvs.waiting_reads", "kvs.results",
                         "scheduler.runs_in_flight", "executor0.fanin_pending",
                         "executor0.mailboxes", "executor0.worker_threads"):
                assert name in reply.values
            alone = await one_request(cluster.node.executors[0].url, GetStatistics())
            assert "executor0.cache_entries" in alone.values
            assert not any(k.startswith("kvs.") for k in alone.values)


_GATE: list[trio.Event] = []


async def held(_: Any) -> str:
    await _GATE[0].wait()
    return "done"


async def test_an_executor_at_its_invocation_limit_fails_new_calls_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Triggers never pile up tasks without bound, and the reader never waits for a
    slot (running functions need it for their store replies)."""
    from droplet.executor import service as executor_service

    monkeypatch.setattr(executor_service, "MAX_INVOCATIONS", 1)
    _GATE[:] = [trio.Event()]
    with trio.fail_after(30):
        async with droplet.open_local_cluster(1) as cluster:
            async with cluster.client() as cloud:
                hold = await cloud.register(held, "held")
                first = await hold()
                executor = cluster.node.executors[0]
                await trio.testing.wait_all_tasks_blocked()
                assert executor.statistics().tasks == 1
                with pytest.raises(droplet.DropletError, match="overloaded"):
                    await (await hold()).get()
                _GATE[0].set()
                assert await first.get() == "done"
                assert await (await hold()).get() == "done"


def test_multi_exec_attempts_expire_without_a_pile_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like the fan-in table: expired oldest first on every new run, and bounded."""
    import pickle

    from droplet.executor import multiexec

    clock = [0.0]
    monkeypatch.setattr(multiexec, "_now", lambda: clock[0])
    table = multiexec.MultiExec()
    invalid = pickle.dumps([None])
    for i in range(5):  # first of two attempts each: the runs wait for the second
        clock[0] = float(i)
        assert table.outcome(f"run-{i}", "f", 2, None, False, invalid) is None
    assert len(table) == 5
    clock[0] = multiexec.MULTI_TTL + 2.5  # runs 0-2 are past the TTL
    table.outcome("late", "f", 2, None, False, invalid)
    assert len(table) == 3
    monkeypatch.setattr(multiexec, "MULTI_MAX", 3)
    table.outcome("later", "f", 2, None, False, invalid)
    assert len(table) == 3
