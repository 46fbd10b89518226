"""Fan-in DAGs on the executor's fast lane: a client's direct run of a whole DAG.

A client sends a DAG with several sources, placed wholly on one executor, as
one ``whole_run`` trigger; the fast lane runs all of it in one worker thread
when its functions are plain ``def`` functions, else the executor starts each
source on the ordinary path. These run a node and executors in this process
over loopback TCP (the fast lane writes its reply from the worker thread).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

import droplet
from droplet.config import Config
from droplet.executor.service import ExecutorService
from droplet.executor.wholerun import Helpers, Plan, WholeRun, plan_of
from droplet.node import Node, serve_node
from droplet.protocol.messages import InvalidMessage, Trigger, decode, encode

TIMEOUT = 30


def ident(_: Any, x: Any) -> Any:
    return x


def add3(_: Any, a: Any, b: Any, c: Any) -> Any:
    return a + b + c


def boom(_: Any, x: Any) -> Any:
    raise ValueError(f"source failed on {x}")


def pair(_: Any, x: Any) -> Any:
    return (x, x * 10)


def append_one(_: Any, xs: list[int]) -> list[int]:
    xs.append(1)  # mutates its input: a private copy, so the other branch sees none of it
    return xs


def both(_: Any, a: Any, b: Any) -> Any:
    return [a, b]


async def aident(_: Any, x: Any) -> Any:
    return x


def receiver(lib: Any, key: str) -> Any:
    """Publishes its id, then waits for a message: its sibling must run meanwhile."""
    lib.put(key, lib.getid())
    for _ in range(TIMEOUT * 100):
        messages = lib.recv()
        if messages:
            return [data for _, data in messages]
        time.sleep(0.01)
    raise AssertionError("no message arrived")


def sender(lib: Any, key: str) -> Any:
    for _ in range(TIMEOUT * 100):
        dest = lib.get(key)
        if dest is not None:
            lib.send(dest, b"ping")
            return "sent"
        time.sleep(0.01)
    raise AssertionError("the receiver never published its id")


def key_of(_: Any, key: str) -> str:
    return key


class _Cluster:
    def __init__(self, main: Node, workers: list[Node]) -> None:
        self.url = main.url
        self.executors: list[ExecutorService] = [w.executors[0] for w in workers]

    def total(self, field: str) -> int:
        return sum(getattr(ex.statistics(), field) for ex in self.executors)


@contextlib.asynccontextmanager
async def _cluster(executors: int, placement: str) -> AsyncIterator[_Cluster]:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            main: Node = await nursery.start(functools.partial(serve_node, Config(
                listen="tcp://127.0.0.1:0", executors=0, placement=placement)))
            workers = [await nursery.start(functools.partial(serve_node, Config(
                role="executor", listen="tcp://127.0.0.1:0", scheduler=main.url)))
                for _ in range(executors)]
            yield _Cluster(main, workers)
            nursery.cancel_scope.cancel()


@pytest.fixture
async def one() -> AsyncIterator[_Cluster]:
    """A KVS+scheduler node and one executor node, over loopback TCP (the "data"
    placement hands out direct placements to clients)."""
    async with _cluster(1, "data") as c:
        yield c


@pytest.fixture
async def two() -> AsyncIterator[_Cluster]:
    """A KVS+scheduler node and two executor nodes, over loopback TCP; "spread"
    placement: every call goes through the scheduler, across both executors."""
    async with _cluster(2, "spread") as c:
        yield c


async def _until(check: Any) -> None:
    while not check():  # noqa: ASYNC110 (worker threads settle; nothing to wait on)
        await trio.sleep(0.01)


async def _fanin3(cloud: Any, sources: tuple[Any, Any, Any] = (ident, ident, ident)) -> None:
    for i, fn in enumerate(sources):
        await cloud.register(fn, f"s{i}")
    await cloud.register(add3, "add3")
    await cloud.register_dag("fanin3", ["s0", "s1", "s2", "add3"],
                             [("s0", "add3"), ("s1", "add3"), ("s2", "add3")])


async def test_a_fanin_runs_whole_on_the_fast_lane(one: _Cluster) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(one.url) as cloud:
            await _fanin3(cloud)
            args = {"s0": 1, "s1": 20, "s2": 300}
            assert await (await cloud.call_dag("fanin3", args)).get() == 321  # warm
            await _until(lambda: one.total("running") == 0)
            before = one.total("fast_calls"), one.total("invocations")
            futures = [await cloud.call_dag("fanin3", {"s0": i, "s1": 2 * i, "s2": 3 * i})
                       for i in range(10)]
            assert [await f.get() for f in futures] == [6 * i for i in range(10)]
            # One fast-lane call per run, four functions each, nothing left waiting.
            await _until(lambda: one.total("running") == 0)
            assert one.total("fast_calls") == before[0] + 10
            assert one.total("invocations") == before[1] + 40
            assert one.total("fanin_pending") == 0
            assert one.total("tasks") == 0
            assert await cloud.get_object(futures[-1].obj_id) == 54


async def test_a_failing_source_is_the_callers_error_and_the_executor_serves_on(
        one: _Cluster) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(one.url) as cloud:
            await _fanin3(cloud, (ident, boom, ident))
            ok = await cloud.register(ident, "ok")
            assert await (await ok(0)).get() == 0
            before = one.total("fast_calls"), one.total("failures")
            for i in range(3):
                future = await cloud.call_dag("fanin3", {"s0": 1, "s1": i, "s2": 3})
                with pytest.raises(droplet.FunctionError, match=f"source failed on {i}"):
                    await future.get()
            assert one.total("fast_calls") >= before[0] + 3
            # The failing source and the sink it passed its failure to, per run.
            await _until(lambda: one.total("failures") >= before[1] + 6)
            assert one.total("fanin_pending") == 0
            assert await (await ok("still here")).get() == "still here"


async def test_inputs_are_private_copies_and_tuples_splat(one: _Cluster) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(one.url) as cloud:
            await cloud.register(ident, "a")
            await cloud.register(ident, "b")
            await cloud.register(append_one, "m")
            await cloud.register(both, "j")
            await cloud.register(pair, "p")
            await cloud.register(add3, "sum")
            # two sources; one feeds a mutator and (the same list) the join
            await cloud.register_dag("diamond", ["a", "b", "m", "j"],
                                     [("a", "m"), ("m", "j"), ("b", "j")])
            # a tuple result splats into two of add3's three arguments
            await cloud.register_dag("splat", ["p", "a", "sum"], [("p", "sum"), ("a", "sum")])
            before = one.total("fast_calls")
            shared = [7]
            for _ in range(3):
                got = await (await cloud.call_dag("diamond", {"a": [shared], "b": [shared]})).get()
                assert got == [[7, 1], [7]]
                assert await (await cloud.call_dag("splat", {"p": 2, "a": 5})).get() == 27
            assert one.total("fast_calls") >= before + 4  # after the first calls warmed up


async def test_branches_of_a_whole_run_run_concurrently(one: _Cluster) -> None:
    """Two sources, and two branches after a fan-out, that wait for each other."""
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(one.url) as cloud:
            await cloud.register(receiver, "recv")
            await cloud.register(sender, "send")
            await cloud.register(key_of, "key")
            await cloud.register(both, "meet")
            await cloud.register_dag("sources", ["recv", "send", "meet"],
                                     [("recv", "meet"), ("send", "meet")])
            await cloud.register_dag("fanout", ["key", "recv", "send", "meet"],
                                     [("key", "recv"), ("key", "send"), ("recv", "meet"),
                                      ("send", "meet")])
            before = one.total("fast_calls")
            for i in range(3):
                key = f"rendezvous-{i}"
                got = await (await cloud.call_dag("sources", {"recv": key, "send": key})
                             ).get()
                assert got == [[b"ping"], "sent"]
                got = await (await cloud.call_dag("fanout", {"key": f"fan-{i}"})).get()
                assert got == [[b"ping"], "sent"]
            assert one.total("fast_calls") >= before + 4  # after the first calls warmed up


async def test_async_functions_and_a_lane_switched_off_take_the_ordinary_path(
        one: _Cluster) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(one.url) as cloud:
            await _fanin3(cloud, (ident, aident, ident))
            assert await (await cloud.call_dag("fanin3", {"s0": 1, "s1": 2, "s2": 3})
                          ).get() == 6
            before = one.total("fast_calls")
            for i in range(5):
                assert await (await cloud.call_dag(
                    "fanin3", {"s0": i, "s1": i, "s2": i})).get() == 3 * i
            assert one.total("fast_calls") == before  # an async source: not the fast lane
            await cloud.register(ident, "s1")  # all plain again; now with no fast lane
            await cloud.register_dag("plain", ["s0", "s1", "s2", "add3"],
                                     [("s0", "add3"), ("s1", "add3"), ("s2", "add3")])
            ex = one.executors[0]
            lane, ex.fast_lane = ex.fast_lane, None
            try:
                for i in range(5):
                    assert await (await cloud.call_dag(
                        "plain", {"s0": i, "s1": 1, "s2": 1})).get() == i + 2
            finally:
                ex.fast_lane = lane
            await _until(lambda: one.total("tasks") == 0)
            assert one.total("fanin_pending") == 0


async def test_a_fanin_across_two_executors_still_gathers_its_inputs(two: _Cluster) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(two.url) as cloud:
            await _fanin3(cloud)
            # Through the scheduler: functions on both executors, sources passing
            # their results on from the fast lane to the sink's executor.
            for i in range(6):
                assert await cloud.call_dag("fanin3", {"s0": i, "s1": 1, "s2": 2},
                                            direct_response=True) == i + 3
                assert await (await cloud.call_dag(
                    "fanin3", {"s0": i, "s1": 1, "s2": 2})).get() == i + 3
            assert all(ex.statistics().invocations > 0 for ex in two.executors)
            await _until(lambda: two.total("tasks") + two.total("running") == 0)
            assert two.total("fanin_pending") == 0


def test_the_order_a_whole_run_takes() -> None:
    assert plan_of(["j", "a", "b"], [["a", "j"], ["b", "j"]]) == Plan(
        ("a", "b", "j"), ((), (), ("a", "b")))
    assert plan_of(["a", "b", "c", "d"], [["a", "b"], ["a", "c"], ["c", "d"], ["b", "d"]]
                   ) == Plan(("a", "b", "c", "d"), ((), ("a",), ("a",), ("c", "b")))
    assert plan_of(["a", "b"], [["a", "b"], ["b", "a"]]) is None  # a cycle
    assert plan_of(["a", "b", "c"], [["a", "b"], ["a", "c"]]) is None  # two sinks
    assert plan_of(["a", "a"], []) is None


def _trigger(**changes: Any) -> Trigger:
    base = Trigger("r1", "a", ["a", "b", "j"], ["1", "2", "3"], ["tcp://e:1"] * 3,
                   [["a", "j"], ["b", "j"]], [], [], None, None, False, "k", None, False,
                   "NORMAL", None, None, "", store_result=False)
    return attrs.evolve(base, **changes)


@pytest.mark.parametrize("changes", [{"direct": True}, {"scheduler": "tcp://s:1"},
                                     {"source": "b", "result": b"x"}, {"carried": b"x"}])
def test_whole_run_is_only_for_a_clients_source_trigger(changes: dict[str, Any]) -> None:
    assert decode(encode(_trigger(whole_run=True)))[0].whole_run
    bad = _trigger(whole_run=True, store_result=True, **changes)
    with pytest.raises(InvalidMessage, match="whole_run may be true only"):
        decode(encode(bad))


# --------------------------------------------------------------------------- WholeRun alone


def _whole(functions: list[str], edges: list[list[str]], targets: dict[str, Any],
           arg_map: dict[str, list[Any]], helpers: Helpers) -> tuple[Any, bool]:
    """Run a whole run with claimer threads of its own; the sink's outcome."""
    from droplet.serialization import dumps

    t = attrs.evolve(_trigger(), functions=functions, placement=["tcp://e:1"] * len(functions),
                     versions=["1"] * len(functions), edges=edges, function=functions[0],
                     arg_fns=list(arg_map), arg_blobs=[dumps(a) for a in arg_map.values()])
    plan = plan_of(functions, edges)
    assert plan is not None
    outcome: list[tuple[Any, bool]] = []
    done = threading.Event()
    threads: list[threading.Thread] = []

    def claimer(run: WholeRun) -> None:
        got = run.claim()
        if got is not None:
            outcome.append(got)
            done.set()

    def more(run: WholeRun, n: int) -> None:
        for _ in range(n):
            threads.append(threading.Thread(target=claimer, args=(run,), daemon=True))
            threads[-1].start()

    run = WholeRun(t, plan, [targets[fn] for fn in plan.order],
                   [object() for _ in plan.order], more, helpers)  # type: ignore[misc]
    more(run, 1)
    assert done.wait(TIMEOUT)
    for thread in threads:
        thread.join(TIMEOUT)
    return outcome[0]


def test_a_whole_run_gets_more_claimers_when_a_function_waits_for_its_sibling() -> None:
    helpers = Helpers(delay=0.001, idle=0.01)
    met = threading.Event()
    try:
        # a fans out to b and c; b waits for c, which only a second claimer can run
        value, failed = _whole(
            ["a", "b", "c", "j"], [["a", "b"], ["a", "c"], ["b", "j"], ["c", "j"]],
            {"a": lambda _, x: x, "b": lambda _, x: met.wait(TIMEOUT) and x + 1,
             "c": lambda _, x: met.set() or x + 2, "j": lambda _, b, c: (b, c)},
            {"a": [1]}, helpers)
        assert (value, failed) == ((2, 3), False)
        # quick functions, a fan-in: the one claimer may run them all
        value, failed = _whole(["s0", "s1", "j"], [["s0", "j"], ["s1", "j"]],
                               {"s0": lambda _, x: x, "s1": lambda _, x: x,
                                "j": lambda _, a, b: a - b}, {"s0": [5], "s1": [3]}, helpers)
        assert (value, failed) == (2, False)
    finally:
        helpers.close()


def test_a_failure_in_a_whole_run_passes_on_in_connections_order() -> None:
    helpers = Helpers(delay=0.001)

    def bad(_: Any, x: Any) -> Any:
        raise KeyError(x)

    try:
        value, failed = _whole(["s0", "s1", "s2", "j"], [["s2", "j"], ["s1", "j"], ["s0", "j"]],
                               {"s0": bad, "s1": boom, "s2": ident, "j": add3},
                               {"s0": ["k"], "s1": [2], "s2": [3]}, helpers)
        assert failed
        assert "source failed on 2" in str(value.error)  # s1 comes before s0 in the edges
    finally:
        helpers.close()


async def test_a_whole_run_trigger_must_come_as_a_request(one: _Cluster) -> None:
    ex = one.executors[0]
    t = attrs.evolve(_trigger(), placement=[ex.url] * 3, whole_run=True)
    with pytest.raises(droplet.ProtocolError, match="whole_run trigger must come as a request"):
        await ex.handle(None, t, 0)  # type: ignore[arg-type]
    assert ex.statistics().tasks == 0
