"""The embedded call path without messages or thread wakeups.

- Lanes (``executor/inline.py``): over an ``inproc://`` connection that
  carries objects, the async client prepares a DAG's run on the executor once
  per placement and then starts each call of it with its id and pickled
  arguments only. Frames connections never get one.
- Claims (``executor/thread_calls.py``): a sync client's call queued for a
  worker thread is run by the caller's own thread when it waits for it first,
  if its functions are known to be quick and the caller waits long enough.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

import pytest
import trio
import trio.testing
from test_embedded_fast_paths import BOTH, _fails, _increment, _square

import droplet
from droplet.client._direct import triggers_for
from droplet.executor import thread_calls
from droplet.executor.inline import Lane
from droplet.executor.loader import Loaded


async def _reference_to(_: Any, key: str) -> droplet.DropletReference:
    return droplet.DropletReference(key)


async def _first(_: Any, xs: list[int]) -> int:
    return xs[0]


def _lane_calls(cluster: Any) -> int:
    return sum(ex.inline.lane_calls for ex in cluster.node.executors)


async def _dag(cloud: Any) -> None:
    await cloud.register(_square, "sq")
    await cloud.register(_increment, "inc")
    await cloud.register_dag("d", ["sq", "inc"], [("sq", "inc")])


# --------------------------------------------------------------------------- lanes


@BOTH
async def test_calls_go_through_a_lane_over_objects_only(skip: bool) -> None:
    async with droplet.open_local_cluster(2, skip_encoding=skip) as cluster, \
            cluster.client() as cloud:
        await _dag(cloud)
        results = [await (await cloud.call_dag("d", {"sq": [i]})).get() for i in range(30)]
        assert results == [i * i + 1 for i in range(30)]
        if skip:
            assert _lane_calls(cluster) >= 25  # the first calls place and prepare
        else:
            assert _lane_calls(cluster) == 0  # frames keep to their bytes
        stats = [ex.statistics() for ex in cluster.node.executors]
        assert sum(s.invocations for s in stats) == 2 * 30  # counted, every function
        assert all(s.running == 0 and s.tasks == 0 and s.mailboxes == 0 for s in stats)
        future = await cloud.call_dag("d", {"sq": [4]})
        assert await future.get() == 17
        assert await cloud.get_object(future.obj_id) == 17  # the result key still works
        # A key handed out before the result is read is stored too.
        future = await cloud.call_dag("d", {"sq": [5]})
        key = future.obj_id
        assert await future.get() == 26
        assert await cloud.get_object(key) == 26


async def test_errors_through_a_lane_are_the_calls_errors() -> None:
    async with droplet.open_local_cluster(1, skip_encoding=True) as cluster, \
            cluster.client() as cloud:
        await cloud.register(_square, "sq")
        await cloud.register(_fails, "bad")
        await cloud.register_dag("d", ["sq", "bad"], [("sq", "bad")])
        for i in range(5):
            with pytest.raises(droplet.FunctionError, match=f"no good: {i * i}"):
                await (await cloud.call_dag("d", {"sq": [i]})).get()
        for _ in range(3):  # arguments that do not fit the function
            with pytest.raises(droplet.FunctionError, match="argument"):
                await (await cloud.call_dag("d", {"sq": [1, 2]})).get()
        assert _lane_calls(cluster) >= 6
        assert sum(ex.statistics().failures for ex in cluster.node.executors) == 8
        assert await (await cloud.exec_func("sq", [4])).get() == 16


async def test_a_lane_run_whose_reference_needs_the_store_answers_later() -> None:
    async with droplet.open_local_cluster(1, skip_encoding=True) as cluster, \
            cluster.client() as cloud:
        await cloud.register(_reference_to, "ref")
        await cloud.register(_increment, "inc")
        await cloud.register_dag("d", ["ref", "inc"], [("ref", "inc")])
        await cloud.put_object("a", 1)
        assert await (await cloud.call_dag("d", {"ref": ["a"]})).get() == 2
        before = _lane_calls(cluster)
        for i in range(5):  # keys the executor's cache has not read: a task reads each
            await cloud.put_object(f"k{i}", 10 * i)
            future = await cloud.call_dag("d", {"ref": [f"k{i}"]})
            assert await future.get() == 10 * i + 1
        assert _lane_calls(cluster) - before == 5
        (ex,) = cluster.node.executors
        assert ex.statistics().running == 0


async def test_reference_arguments_take_the_ordinary_path() -> None:
    async with droplet.open_local_cluster(1, skip_encoding=True) as cluster, \
            cluster.client() as cloud:
        await cloud.register(_first, "first")
        assert await (await cloud.exec_func("first", [[5]])).get() == 5
        assert await (await cloud.exec_func("first", [[6]])).get() == 6
        through_lane = _lane_calls(cluster)
        assert through_lane >= 1
        await cloud.put_object("xs", [7, 8])
        ref = droplet.DropletReference("xs", deserialize=True)
        for _ in range(3):  # (through the scheduler: "xs" was written just now)
            assert await (await cloud.exec_func("first", [ref])).get() == 7
        assert _lane_calls(cluster) == through_lane
        # An argument that may hold a reference (its pickle names the class) is
        # declined by the lane, and the future made for it releases no key.
        released: list[str] = []
        release = cloud._releases.release
        cloud._releases.release = lambda key: (released.append(key), release(key))
        futures = [await cloud.exec_func("first", [["DropletReference"]]) for _ in range(3)]
        gc.collect()
        assert [await f.get() for f in futures] == ["DropletReference"] * 3
        assert _lane_calls(cluster) == through_lane
        assert not set(released) & {f._key for f in futures}
        assert await cloud.get_object(futures[-1].obj_id) == "DropletReference"


async def test_a_lane_declines_what_it_must_not_run() -> None:
    async with droplet.open_local_cluster(1, skip_encoding=True) as cluster, \
            cluster.client() as cloud:
        await _dag(cloud)
        assert await (await cloud.call_dag("d", {"sq": [2]})).get() == 5
        call = cloud._core.dag_call("d", {"sq": [3]}, False, "NORMAL", None, None, None)
        found = cloud._direct.cached_target("d", False, ())
        assert found is not None
        peer, plan = found
        lane = peer.conn.lane()
        assert isinstance(lane, Lane)
        (trigger,) = triggers_for(call, plan, peer.remote) or []
        prepared = lane.prepare(trigger)
        assert prepared is not None
        got: list[Any] = []

        def deliver(blob: Any, failed: bool) -> None:
            got.append((droplet.serialization.loads(blob), failed))

        # The connection's in-flight limit holds: with no slot free, not here.
        inflight = lane._peer._inflight
        taken = 0
        while True:
            try:
                inflight.acquire_nowait()
            except trio.WouldBlock:
                break
            taken += 1
        assert not prepared.run("r1", call.arg_fns, call.arg_blobs, deliver)
        for _ in range(taken):
            inflight.release()
        # Arguments for a function not in the run, or of the wrong kind: not here
        # (the ordinary path names what is wrong).
        assert not prepared.run("r2", ["nope"], call.arg_blobs, deliver)
        assert not prepared.run("r3", call.arg_fns, ["not bytes"], deliver)
        assert not prepared.run("r4", call.arg_fns, [], deliver)
        assert got == []
        assert prepared.run("r5", call.arg_fns, call.arg_blobs, deliver)
        assert got == [(10, False)]
        # A function loaded again makes the preparation stale: prepared anew.
        (ex,) = cluster.node.executors
        loaded = ex._loader.peek("inc", plan.versions[plan.functions.index("inc")])
        assert loaded is not None
        ex._loader._functions["inc"] = Loaded(loaded.version, loaded.obj)
        assert not prepared.run("r6", call.arg_fns, call.arg_blobs, deliver)
        assert prepared.stale
        assert await (await cloud.call_dag("d", {"sq": [4]})).get() == 17
        assert await (await cloud.call_dag("d", {"sq": [5]})).get() == 26
        assert got == [(10, False)]
        # A closed connection: no lane at all, and calls go (and dial) the ordinary way.
        await peer.aclose()
        assert peer.conn.lane() is None
        assert not prepared.run("r7", call.arg_fns, call.arg_blobs, deliver)


async def _awaits(lib: Any, x: int) -> int:
    await trio.lowlevel.checkpoint()
    return x - 1


async def _awaits_and_fails(lib: Any, x: int) -> int:
    await trio.lowlevel.checkpoint()
    raise KeyError(x)


async def _forever(_: Any, x: int) -> None:
    if x:
        await trio.sleep_forever()


async def test_functions_that_await_run_in_one_task_through_a_lane() -> None:
    async with droplet.open_local_cluster(2, skip_encoding=True) as cluster, \
            cluster.client() as cloud:
        await cloud.register(_awaits, "aw")
        await cloud.register(_square, "sq")
        await cloud.register(_awaits_and_fails, "bad")
        await cloud.register_dag("d", ["sq", "aw"], [("sq", "aw")])
        await cloud.register_dag("e", ["aw", "bad"], [("aw", "bad")])
        results = [await (await cloud.call_dag("d", {"sq": [i]})).get() for i in range(20)]
        assert results == [i * i - 1 for i in range(20)]
        assert _lane_calls(cluster) >= 15
        for i in range(4):
            with pytest.raises(droplet.FunctionError, match="KeyError"):
                await (await cloud.call_dag("e", {"aw": [i]})).get()
        future = await cloud.call_dag("d", {"sq": [3]})
        assert await future.get() == 8
        assert await cloud.get_object(future.obj_id) == 8
        stats = [ex.statistics() for ex in cluster.node.executors]
        assert sum(s.invocations for s in stats) == 2 * 25
        assert sum(s.failures for s in stats) == 4
        assert all(s.running == 0 and s.tasks == 0 for s in stats)


async def test_a_lane_task_times_out_in_virtual_time_and_hears_its_executor_stop(
        autojump_clock: trio.testing.MockClock) -> None:
    async with droplet.open_local_cluster(1, skip_encoding=True) as cluster:
        async with cluster.client() as cloud:
            await cloud.register(_forever, "forever")
            for _ in range(3):
                assert await (await cloud.exec_func("forever", [0])).get() is None
            before = _lane_calls(cluster)
            future = await cloud.exec_func("forever", [1])
            assert _lane_calls(cluster) == before + 1
            with pytest.raises(droplet.TimeoutError):
                await future.get(timeout=5)
            (ex,) = cluster.node.executors
            assert ex.statistics().tasks == 1
    with pytest.raises(droplet.DropletError, match="stopped before"):
        await future.get()


def test_a_sync_client_sends_async_functions_through_lanes_too() -> None:
    with droplet.LocalCluster(2, skip_encoding=True) as cluster:
        conn = cluster.connect()
        conn.register(_square, "sq")
        conn.register(_awaits, "aw")
        conn.register_dag("d", ["sq", "aw"], [("sq", "aw")])
        assert [conn.call_dag("d", {"sq": [i]}).get() for i in range(10)] == \
            [i * i - 1 for i in range(10)]
        assert conn.exec_func("sq", [3]).get() == 9
        assert conn.exec_func("sq", [4]).get() == 16
        assert _lane_calls(cluster) >= 8
        future = conn.call_dag("d", {"sq": [5]})
        assert future.get() == 24
        assert conn.get_object(future.obj_id) == 24


# --------------------------------------------------------------------------- claims


def _where(_: Any, x: int) -> tuple[str, int]:
    import threading as _threading

    return _threading.current_thread().name, x


def _where_again(_: Any, x: int) -> tuple[str, str, int]:
    import threading as _threading

    return "again", _threading.current_thread().name, x


def _sleepy(_: Any, seconds: float) -> str:
    import threading as _threading
    import time as _time

    _time.sleep(seconds)
    return _threading.current_thread().name


def _fails_sync(_: Any, x: int) -> int:
    raise ValueError(f"bad {x}")


def _ran_here(cluster: droplet.LocalCluster) -> int:
    return sum(ex.thread_calls.ran_here for ex in cluster.node.executors)


def _warm(conn: Any, name: str, *args: Any) -> None:
    for _ in range(thread_calls.QUICK_RUNS + 3):  # the first asks for a placement
        conn.exec_func(name, list(args)).get()


@BOTH
def test_a_sync_caller_runs_a_quick_call_itself(skip: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The caller always wins (it waits at once), and workers do not sleep for long.
    monkeypatch.setattr(thread_calls, "LEAVE_TO_CALLER", 0.5)
    me = threading.current_thread().name
    with droplet.LocalCluster(1, skip_encoding=skip) as cluster:
        conn = cluster.connect()
        conn.register(_where, "where")
        conn.register(_fails_sync, "bad")
        _warm(conn, "where", 0)
        assert _ran_here(cluster) <= 3  # not quick until QUICK_RUNS runs were
        ran = _ran_here(cluster)
        assert [conn.exec_func("where", [i]).get() for i in range(5)] == \
            [(me, i) for i in range(5)]
        assert _ran_here(cluster) == ran + 5
        # Registered again (another version), it must prove itself quick again.
        conn.register(_where_again, "where")
        assert all(conn.exec_func("where", [i]).get() != ("again", me, i) for i in range(5))
        assert conn.exec_func("where", [0]).get()[0] == "again"
        _warm(conn, "where", 0)
        assert conn.exec_func("where", [8]).get() == ("again", me, 8)
        conn.register(_where, "where")
        _warm(conn, "where", 0)
        future = conn.exec_func("where", [9])
        assert future.get() == (me, 9)
        assert conn.get_object(future.obj_id) == (me, 9)
        for i in range(thread_calls.QUICK_RUNS + 3):  # errors stay the call's errors
            with pytest.raises(droplet.FunctionError, match=f"bad {i}"):
                conn.exec_func("bad", [i]).get()
        assert _ran_here(cluster) > 6
        (ex,) = cluster.node.executors
        stats = cluster._portal.run(_read_stats, ex)
        assert stats.invocations == 4 * (thread_calls.QUICK_RUNS + 3) + 13
        assert stats.failures == thread_calls.QUICK_RUNS + 3
        assert stats.running == 0


def _ctrl_c(_: Any, x: int) -> int:
    if x:
        raise KeyboardInterrupt  # as the signal handler does in the main thread
    return x


def test_ctrl_c_in_a_call_the_caller_runs_interrupts_the_caller(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thread_calls, "LEAVE_TO_CALLER", 0.5)
    assert threading.current_thread() is threading.main_thread()
    with droplet.LocalCluster(1) as cluster:
        conn = cluster.connect()
        conn.register(_ctrl_c, "ctrl_c")
        _warm(conn, "ctrl_c", 0)
        ran = _ran_here(cluster)
        future = conn.exec_func("ctrl_c", [1])
        with pytest.raises(KeyboardInterrupt):
            future.get()
        assert _ran_here(cluster) == ran + 1
        # The call itself failed (nothing waits for it forever), and the node serves on.
        with pytest.raises(droplet.FunctionError, match="KeyboardInterrupt"):
            future.get(timeout=5)
        assert conn.exec_func("ctrl_c", [0]).get() == 0


async def _read_stats(ex: Any) -> Any:
    return ex.statistics()


def test_a_function_slow_lately_or_a_short_timeout_waits_for_its_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    me = threading.current_thread().name
    with droplet.LocalCluster(1, skip_encoding=True) as cluster:
        conn = cluster.connect()
        conn.register(_sleepy, "sleepy")
        _warm(conn, "sleepy", 0.0)
        monkeypatch.setattr(thread_calls, "LEAVE_TO_CALLER", 0.5)
        assert conn.exec_func("sleepy", [0.0]).get() == me
        # One slow run: the next ones go to a worker again, however short.
        assert conn.exec_func("sleepy", [0.02]).get() == me
        monkeypatch.setattr(thread_calls, "LEAVE_TO_CALLER", 0.0)
        assert conn.exec_func("sleepy", [0.0]).get() != me
        _warm(conn, "sleepy", 0.0)  # quick again after QUICK_RUNS quick runs in a row
        monkeypatch.setattr(thread_calls, "LEAVE_TO_CALLER", 0.5)
        assert conn.exec_func("sleepy", [0.0]).get() == me
        # A timeout under HERE_MIN_TIMEOUT is waited out in this thread, exactly
        # (LEAVE_TO_CALLER 0: else the worker would leave it to us, and it timed out).
        monkeypatch.setattr(thread_calls, "LEAVE_TO_CALLER", 0.0)
        ran = _ran_here(cluster)
        future = conn.exec_func("sleepy", [0.0])
        assert future.get(timeout=thread_calls.HERE_MIN_TIMEOUT / 2) != me
        assert _ran_here(cluster) == ran


def _remember(lib: Any, key: str, x: int) -> int:
    lib.put(key, x)
    return x


def _remember_where(lib: Any, key: str, x: int) -> tuple[str, Any]:
    import threading as _threading

    lib.put(key, x)
    return _threading.current_thread().name, lib.get(key)


def test_a_quick_call_run_in_the_callers_thread_uses_the_store(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thread_calls, "LEAVE_TO_CALLER", 0.5)
    me = threading.current_thread().name
    with droplet.LocalCluster(1, skip_encoding=True) as cluster:
        conn = cluster.connect()
        conn.register(_remember_where, "rw")
        _warm(conn, "rw", "warm", 0)
        if _ran_here(cluster):  # quick: the store's round trips took under 5 ms each
            assert conn.exec_func("rw", ["k", 3]).get() == (me, 3)
            assert conn.get_object("k") == 3
        else:  # a busy machine: the calls were never quick, and ran in workers
            assert conn.exec_func("rw", ["k", 3]).get()[1] == 3


def test_a_quick_call_nobody_waits_for_still_runs() -> None:
    with droplet.LocalCluster(1, skip_encoding=True) as cluster:
        conn = cluster.connect()
        conn.register(_remember, "remember")
        _warm(conn, "remember", "warm", 0)
        future = conn.exec_func("remember", ["k", 42])  # no get(): a worker runs it
        deadline = time.monotonic() + 20
        while conn.get_object("k") != 42:
            assert time.monotonic() < deadline, "the call never ran"
            time.sleep(0.01)
        assert future.get() == 42
        # A key read before the result: stored once the result is in.
        future = conn.exec_func("remember", ["j", 7])
        key = future.obj_id
        assert future.get() == 7
        assert conn.get_object(key) == 7


def test_a_caller_running_a_trio_loop_leaves_its_calls_to_workers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thread_calls, "LEAVE_TO_CALLER", 0.5)
    me = threading.current_thread().name
    with droplet.LocalCluster(1, skip_encoding=True) as cluster:
        conn = cluster.connect()
        conn.register(_remember_where, "rw")
        _warm(conn, "rw", "warm", 0)
        ran = _ran_here(cluster)

        async def blocking_call_inside_a_loop() -> tuple[str, Any]:
            # (blocks this loop: only to show where the function runs)
            result: tuple[str, Any] = conn.exec_func("rw", ["k", 4]).get()
            return result

        where, value = trio.run(blocking_call_inside_a_loop)
        assert value == 4 and where != me  # its lib.get could not have run here
        assert _ran_here(cluster) == ran


def test_the_keeper_of_quick_calls_ends_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thread_calls, "KEEPER_IDLE", 0.05)
    with droplet.LocalCluster(1, skip_encoding=True) as cluster:
        conn = cluster.connect()
        conn.register(_where, "where")
        _warm(conn, "where", 0)
        futures = [conn.exec_func("where", [i]) for i in range(3)]  # kept, then handed on
        (ex,) = cluster.node.executors
        keeper = ex.thread_calls._keeper
        assert [f.get()[1] for f in futures] == [0, 1, 2]
        deadline = time.monotonic() + 20
        while keeper._thread is not None:
            assert time.monotonic() < deadline, "the keeper thread never ended"
            time.sleep(0.01)
        assert conn.exec_func("where", [5]).get()[1] == 5  # a new keeper when needed


def test_sync_wait_sees_results_run_in_the_callers_thread() -> None:
    with droplet.LocalCluster(2, skip_encoding=False) as cluster:
        conn = cluster.connect()
        conn.register(_where, "where")
        _warm(conn, "where", 0)
        futures = [conn.exec_func("where", [i]) for i in range(10)]
        done, not_done = droplet.wait(futures, timeout=30)
        assert len(done) == 10 and not not_done
        assert sorted(f.get()[1] for f in futures) == list(range(10))
        ordered = [f.get()[1] for f in droplet.as_completed(
            [conn.exec_func("where", [i]) for i in range(5)], timeout=30)]
        assert sorted(ordered) == list(range(5))


async def _sleeps(_: Any, x: int) -> int:
    if x:
        await trio.sleep(x)
    return x


async def test_a_lane_run_finishing_frees_its_slot_for_a_request_waiting_at_the_limit(
        autojump_clock: trio.testing.MockClock) -> None:
    # max_inflight=1: a lane run holds the connection's only slot, so the next call
    # goes the ordinary way, and the executor's reader waits for that slot. The
    # lane run finishing must wake it (not leave the call waiting for ever).
    async with droplet.open_local_cluster(1, skip_encoding=True, max_inflight=1) as cluster, \
            cluster.client() as cloud:
        await cloud.register(_sleeps, "sleeps")
        for _ in range(3):
            assert await (await cloud.exec_func("sleeps", [0])).get() == 0
        before = _lane_calls(cluster)
        first = await cloud.exec_func("sleeps", [1])
        assert _lane_calls(cluster) == before + 1
        second = await cloud.exec_func("sleeps", [0])
        assert _lane_calls(cluster) == before + 1  # at the limit: the ordinary way
        assert await first.get(timeout=30) == 1
        assert await second.get(timeout=30) == 0


async def _exits(_: Any, x: int) -> int:
    if x:
        raise SystemExit(x)  # as sys.exit(x), with no await before it
    return x


@BOTH
async def test_sys_exit_in_a_function_run_at_once_is_its_calls_error(skip: bool) -> None:
    """As on the ordinary path, ``sys.exit()`` in a function is that call's
    FunctionError: it never reaches the caller's task (run at once, or through
    a lane) nor ends the executor."""
    async with droplet.open_local_cluster(1, skip_encoding=skip) as cluster, \
            cluster.client() as cloud:
        await cloud.register(_exits, "exits")
        for i in range(6):
            assert await (await cloud.exec_func("exits", [0])).get() == 0
            with pytest.raises(droplet.FunctionError, match="SystemExit"):
                await (await cloud.exec_func("exits", [i + 1])).get()
        assert await (await cloud.exec_func("exits", [0])).get() == 0
        (ex,) = cluster.node.executors
        assert ex.statistics().tasks == 0
