"""Function calls sent straight to executor processes (the blocking client over TCP).

A node with two executor processes of its own (``--executors 0`` plus two
``--role executor`` processes joining it, so the test can stop one): the
client caches the placement the scheduler hands out, the executors answer
calls themselves, and the result keys still reach the store.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import droplet
from droplet import DropletConnection, DropletReference
from droplet.client._blocking import BlockingClient
from droplet.client._blocking_peer import ALIVE_POLL
from droplet.client._core import ClientCore
from droplet.testing.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow

TIMEOUT = 20.0


def functions() -> tuple[Any, Any]:
    """Defined here, so they travel by value (the node's processes cannot import this module)."""
    def pid(_: Any, x: Any = None) -> int:
        import os

        return os.getpid()

    def read(lib: Any, key: Any) -> Any:
        return lib.get(key) if isinstance(key, str) else key

    return pid, read


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[NodeProcess, list[NodeProcess]]]:
    with ExitStack() as stack:
        node = stack.enter_context(start_node("--executors", "0",
                                              log_path=tmp_path / "node.log"))
        executors = [stack.enter_context(start_node(
            "--scheduler", node.url, role="executor", listen=None,
            log_path=tmp_path / f"executor{i}.log")) for i in range(2)]
        for ex in executors:
            node.wait_for_log(rf"executor {re.escape(ex.url)} joined", TIMEOUT)
        yield node, executors


def backend(conn: DropletConnection) -> BlockingClient:
    inner = conn._backend
    assert isinstance(inner, BlockingClient)
    return inner


def test_calls_go_straight_to_executors_and_results_reach_the_store(
        cluster: tuple[NodeProcess, list[NodeProcess]]) -> None:
    node, executors = cluster
    pid, read = functions()
    with DropletConnection(node.url, timeout=TIMEOUT) as conn:
        f = conn.register(pid, "where")
        # One after another: every call on one executor (its threads stay warm)...
        assert len({f(i).get() for i in range(10)}) == 1
        # ...several in flight at once: spread over both.
        assert {x.get() for x in [f(i) for i in range(10)]} == {ex.pid for ex in executors}
        assert sorted(backend(conn).direct.placed("where")) == sorted(
            ex.url for ex in executors)
        # Placed, hence accepted: calls of it through the scheduler go one-way.
        assert backend(conn).core.accepted.known(ClientCore.function_call("where", []))
        # The executor answered first and stored the result after: the key is
        # readable as soon as it is handed out.
        for i in range(20):
            future = f(i)
            value = future.get()
            assert conn.get_object(future.obj_id) == value
        # ...and usable as a reference by the next call.
        future = f(0)
        future.get()
        reader = conn.register(read, "read")
        assert reader(future.obj_id).get() == future.get()
        assert reader(DropletReference(future.obj_id)).get() == future.get()
        # A function that raises: the error, from the executor and from the store.
        boom = conn.register(lambda _: 1 / 0, "boom")
        failed = boom()
        with pytest.raises(droplet.FunctionError, match="ZeroDivisionError"):
            failed.get()
        with pytest.raises(droplet.FunctionError, match="ZeroDivisionError"):
            conn.get_object(failed.obj_id)
        with pytest.raises(droplet.RegistrationError, match="no function named 'nope'"):
            conn.exec_func("nope", [])
        # Futures answered by two executors (two connections): wait and as_completed.
        futures = [f(i) for i in range(8)]
        done, not_done = droplet.wait(futures, timeout=TIMEOUT)
        assert len(done) == 8 and not not_done
        assert {x.get() for x in futures} == {ex.pid for ex in executors}
        more = [f(i) for i in range(8)]
        assert sorted(x.get() for x in droplet.as_completed(more, timeout=TIMEOUT)) == sorted(
            x.get() for x in more)
        first = [conn.register(lambda _: __import__("time").sleep(30), "slow")(),
                 f(0), f(1)]
        done, _ = droplet.wait(first, timeout=TIMEOUT, return_when=droplet.FIRST_COMPLETED)
        assert done and first[0] not in done


def test_cached_placement_is_dropped_when_an_executor_leaves(
        cluster: tuple[NodeProcess, list[NodeProcess]]) -> None:
    node, (ex1, ex2) = cluster
    pid, _ = functions()
    with DropletConnection(node.url, timeout=TIMEOUT) as conn:
        f = conn.register(pid, "where")
        assert {x.get() for x in [f() for _ in range(6)]} == {ex1.pid, ex2.pid}
        direct = backend(conn).direct
        assert ex2.url in direct.placed("where")
        ex2.kill()
        node.wait_for_log(rf"executor {re.escape(ex2.url)} (disconnected|disappeared)",
                          TIMEOUT)
        # A connection read less than ALIVE_POLL ago counts as alive without a
        # look: a call sent within it would be the call in flight that fails.
        time.sleep(10 * ALIVE_POLL)
        # Every call after it left runs (on the executor still there), none fails:
        # one after another, and several at once (which would use both: the
        # placement naming ex2 goes when a call finds its connection ended).
        assert [f().get() for _ in range(10)] == [ex1.pid] * 10
        assert [x.get() for x in [f() for _ in range(10)]] == [ex1.pid] * 10
        assert direct.placed("where") == [ex1.url]
        assert ex2.url not in direct._peers


def test_dags_run_wholly_on_one_executor_and_answer_directly(
        cluster: tuple[NodeProcess, list[NodeProcess]]) -> None:
    node, executors = cluster
    pid, _ = functions()
    with DropletConnection(node.url, timeout=TIMEOUT) as conn:
        conn.register(lambda _, x: x * x, "sq")
        conn.register(lambda _, x: x + 1, "inc")
        conn.register(pid, "pid_a")
        conn.register(pid, "pid_b")
        conn.register(lambda _, *xs: sorted(xs), "gather")
        conn.register_dag("chain", ["sq", "inc"], [("sq", "inc")])
        conn.register_dag("fan", ["pid_a", "pid_b", "gather"],
                          [("pid_a", "gather"), ("pid_b", "gather")])
        for i in range(10):
            future = conn.call_dag("chain", {"sq": i})
            assert future.get() == i * i + 1
            assert conn.get_object(future.obj_id) == i * i + 1
        # A fan-in sent to one executor runs there whole: both sources, one process;
        # one run after another on the same executor, concurrent runs on both.
        seen = [conn.call_dag("fan", {}).get() for _ in range(6)]
        assert len({tuple(s) for s in seen}) == 1
        seen = [x.get() for x in [conn.call_dag("fan", {}) for _ in range(6)]]
        assert {tuple(s) for s in seen} == {(ex.pid, ex.pid) for ex in executors}
        assert len(backend(conn).direct.placed("fan", False)) == 2
        # Arguments for a function outside the DAG: the scheduler's error, at once.
        with pytest.raises(droplet.DagError, match="not in DAG 'chain'"):
            conn.call_dag("chain", {"nope": 1})
        # Deleted by this client: its cached placement goes too.
        conn.delete_dag("chain")
        with pytest.raises(droplet.DagError, match="no DAG named 'chain'"):
            conn.call_dag("chain", {"sq": 1})


def test_a_direct_call_honours_get_timeout_and_fails_when_its_executor_dies(
        cluster: tuple[NodeProcess, list[NodeProcess]]) -> None:
    node, executors = cluster
    with DropletConnection(node.url, timeout=TIMEOUT) as conn:
        def sleepy(_: Any, seconds: float) -> float:
            import time

            time.sleep(seconds)
            return seconds

        f = conn.register(sleepy, "sleepy")
        assert f(0).get() == 0
        future = f(60)
        assert future._inner._peer is not backend(conn).kvs  # sent to an executor
        with pytest.raises(droplet.TimeoutError):
            future.get(timeout=0.2)
        for ex in executors:
            ex.kill()
        # The connection's end is the call's error, well before the call's own timeout.
        with pytest.raises(droplet.ConnectionError):
            future.get(timeout=TIMEOUT - 1)
        # ...and what its key holds: the error, never a silent None.
        with pytest.raises(droplet.ConnectionError):
            conn.get_object(future.obj_id)


def test_a_handed_out_key_reads_the_result_once_wait_says_done(
        cluster: tuple[NodeProcess, list[NodeProcess]]) -> None:
    node, _ = cluster
    with DropletConnection(node.url, timeout=TIMEOUT) as conn:
        # Large results: the executor answers, then writes the key (a while after).
        blob = conn.register(lambda _, i: bytes([i]) * 2_000_000, "blob")
        assert len(blob(0).get()) == 2_000_000
        for i in range(10):
            future = blob(i)
            key = future.obj_id  # handed out before the result arrived
            done, _ = droplet.wait([future], timeout=TIMEOUT)
            assert done == {future}
            assert conn.get_object(key) == bytes([i]) * 2_000_000
        for i in range(10):
            future = blob(i)
            key = future.obj_id
            while not future.done():
                __import__("time").sleep(0.001)
            assert conn.get_object(key) == bytes([i]) * 2_000_000


def _count_calls_to_the_scheduler(conn: DropletConnection) -> list[str]:
    """Record the CallDags this client sends the scheduler (requests and one-way)."""
    peer: Any = backend(conn).scheduler
    submit, send = peer.submit, peer.send
    sent: list[str] = []

    def counting_submit(*msgs: Any, **kwargs: Any) -> Any:
        sent.extend(type(m).__name__ for m in [*msgs, *kwargs.get("oneway", ())]
                    if type(m).__name__ == "CallDag")
        return submit(*msgs, **kwargs)

    def counting_send(*msgs: Any, **kwargs: Any) -> Any:
        sent.extend(type(m).__name__ for m in msgs if type(m).__name__ == "CallDag")
        return send(*msgs, **kwargs)

    peer.submit, peer.send = counting_submit, counting_send
    return sent


def test_map_goes_straight_to_the_executors(
        cluster: tuple[NodeProcess, list[NodeProcess]]) -> None:
    node, executors = cluster
    pid, _ = functions()
    with DropletConnection(node.url, timeout=TIMEOUT) as conn:
        def tenfold(_: Any, x: int) -> int:
            if x == 3:
                raise ValueError("three is not allowed")
            return x * 10

        f = conn.register(tenfold, "tenfold")
        where = conn.register(pid, "where")
        sent = _count_calls_to_the_scheduler(conn)
        # Bigger than a chunk, in order, errors per item.
        futures = f.map(range(700), chunksize=64)
        for i, future in enumerate(futures):
            if i == 3:
                with pytest.raises(droplet.FunctionError, match="three is not allowed"):
                    future.get()
            else:
                assert future.get() == i * 10
        # Spread over both executors, none through the scheduler.
        assert {x.get() for x in where.map(range(40))} == {ex.pid for ex in executors}
        assert sent == []
        assert conn.get_object(futures[5].obj_id) == 50  # the key reaches the store
        with pytest.raises(droplet.RegistrationError, match="no function named 'nope'"):
            conn.map("nope", [1])
        assert sent == []


def test_map_calls_honour_get_timeout_and_none_hang_when_an_executor_leaves(
        cluster: tuple[NodeProcess, list[NodeProcess]]) -> None:
    node, (ex1, ex2) = cluster
    with DropletConnection(node.url, timeout=TIMEOUT) as conn:
        def sleepy(_: Any, seconds: float) -> float:
            import time

            time.sleep(seconds)
            return seconds

        f = conn.register(sleepy, "sleepy")
        assert [x.get() for x in f.map([0, 0])] == [0, 0]
        futures = f.map([0.3] * 40, chunksize=8)  # more than the executors' threads
        with pytest.raises(droplet.TimeoutError):
            futures[-1].get(timeout=0.05)
        ex2.kill()
        # Each call gets its result or a clear error (its executor left), none hangs.
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.get(timeout=TIMEOUT - 1))
            except droplet.ConnectionError as exc:
                assert "closed" in str(exc) or "connection" in str(exc).lower()
                outcomes.append("lost")
        assert 0.3 in outcomes
        node.wait_for_log(rf"executor {re.escape(ex2.url)} (disconnected|disappeared)",
                          TIMEOUT)
        # Later maps go to the executor still there (the placement naming ex2 went).
        assert [x.get() for x in f.map([0] * 10)] == [0] * 10
        assert [x.get() for x in f.map([0] * 10)] == [0] * 10
        assert backend(conn).direct.placed("sleepy") == [ex1.url]
        assert ex2.url not in backend(conn).direct._peers


def test_sequential_calls_stay_on_one_executor_and_concurrent_ones_spread(
        cluster: tuple[NodeProcess, list[NodeProcess]]) -> None:
    """Least outstanding with affinity (``_direct.py``): a call goes to the preferred
    executor with the fewest calls of this client in flight, on a tie the one
    used last."""
    import threading

    node, executors = cluster
    pid, _ = functions()
    with DropletConnection(node.url, timeout=TIMEOUT) as conn:
        f = conn.register(pid, "where")
        first = f().get()
        assert [f().get() for _ in range(20)] == [first] * 20
        conn.register_dag("one", ["where"], [])
        dag_first = conn.call_dag("one", {}).get()
        assert [conn.call_dag("one", {}).get() for _ in range(10)] == [dag_first] * 10
        # A call still running on one executor: the next goes to the other one,
        # and the calls after it stay there.
        def sleepy(_: Any, seconds: float) -> int:
            import os
            import time

            time.sleep(seconds)
            return os.getpid()

        slow = conn.register(sleepy, "sleepy")
        pinned = slow(0).get()
        busy = slow(5)
        others = [slow(0).get() for _ in range(5)]
        assert len(set(others)) == 1 and others[0] != pinned
        assert busy.get() == pinned
        # Four threads calling one after another: both executors serve them.
        seen: set[int] = set()

        def caller() -> None:
            for _ in range(5):
                seen.add(slow(0.05).get())

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen == {ex.pid for ex in executors}
        # map still spreads over every executor.
        assert {x.get() for x in f.map(range(40))} == {ex.pid for ex in executors}


@pytest.mark.parametrize("facade", [False, True])
def test_the_async_client_sticks_and_spreads_too(
        cluster: tuple[NodeProcess, list[NodeProcess]], facade: bool) -> None:
    """The async client (and the sync facade over it) choose executors the same way."""
    import trio

    from droplet.client._portal import Portal
    from droplet.client.aio import open_client

    node, executors = cluster
    pid, _ = functions()
    everyone = {ex.pid for ex in executors}

    async def main() -> None:
        with trio.fail_after(TIMEOUT * 2):
            async with open_client(node.url, timeout=TIMEOUT) as client:
                f = await client.register(pid, "where_async")
                first = await (await f()).get()
                assert [await (await f()).get() for _ in range(15)] == [first] * 15
                futures = [await f() for _ in range(10)]
                assert {await x.get() for x in futures} == everyone

    if not facade:
        trio.run(main)
        return
    portal = Portal("test-facade")
    try:
        with DropletConnection(node.url, timeout=TIMEOUT, _portal=portal) as conn:
            f = conn.register(pid, "where_facade")
            first = f().get()
            assert [f().get() for _ in range(15)] == [first] * 15
            assert {x.get() for x in [f() for _ in range(10)]} == everyone
    finally:
        portal.close()


def test_direct_response_calls_go_straight_to_an_executor_too(
        cluster: tuple[NodeProcess, list[NodeProcess]]) -> None:
    node, executors = cluster
    pid, _ = functions()
    with DropletConnection(node.url, timeout=TIMEOUT) as conn:
        conn.register(pid, "pid_d")
        conn.register(lambda _, x: x + 1, "inc_d")
        conn.register(lambda _, x: 1 / 0, "boom_d")
        conn.register_dag("d", ["pid_d", "inc_d"], [("pid_d", "inc_d")])
        conn.register_dag("bad", ["inc_d", "boom_d"], [("inc_d", "boom_d")])
        assert conn.call_dag("d", {"pid_d": 1}, direct_response=True) - 1 in {
            ex.pid for ex in executors}
        sent = _count_calls_to_the_scheduler(conn)
        # Plain arguments (the fast way) and others (a set: the ordinary way).
        results = [conn.call_dag("d", {"pid_d": 1}, direct_response=True) for _ in range(5)]
        results += [conn.call_dag("d", {"pid_d": {1}}, direct_response=True)]
        assert len(set(results)) == 1 and results[0] - 1 in {ex.pid for ex in executors}
        with pytest.raises(droplet.FunctionError, match="ZeroDivisionError"):
            conn.call_dag("bad", {"inc_d": 1}, direct_response=True)
        assert sent == []  # none through the scheduler
        # With a timeout (or another consistency level): through the scheduler, as before.
        assert conn.call_dag("d", {"pid_d": 1}, direct_response=True, timeout=TIMEOUT) - 1 in {
            ex.pid for ex in executors}
        assert sent == ["CallDag"]
        with pytest.raises(droplet.DagError, match="not in DAG 'd'"):
            conn.call_dag("d", {"nope": 1}, direct_response=True)
