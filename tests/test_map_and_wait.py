"""``map`` (many calls per message), ``droplet.wait`` and ``droplet.as_completed``.

The sync forms run on both backends of DropletConnection: blocking sockets
(``tcp://``) and the event-loop portal (an embedded cluster, ``inproc://``).
The async forms run over inproc with a MockClock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

import droplet
from droplet import DropletConnection
from droplet.client._blocking import BlockingClient


async def gated(lib: Any, key: str) -> str:
    """Finishes once the KVS value at ``key`` is truthy."""
    while not await lib.aget(key):  # noqa: ASYNC110 (polls the KVS, not a local flag)
        await trio.sleep(0.01)
    return "released"


def fails_on_three(_: Any, x: int) -> int:
    if x == 3:
        raise ValueError("three is not allowed")
    return x * 10


@pytest.fixture(scope="module", params=["tcp", "inproc"])
def cluster(request: pytest.FixtureRequest) -> Iterator[droplet.LocalCluster]:
    listen = "tcp://127.0.0.1:0" if request.param == "tcp" else None
    with droplet.LocalCluster(executors=2, listen=listen) as running:
        yield running


@pytest.fixture
def cloud(cluster: droplet.LocalCluster) -> Iterator[DropletConnection]:
    if cluster.address.startswith("tcp://"):
        with DropletConnection(cluster.address, timeout=30) as conn:
            assert isinstance(conn._backend, BlockingClient)
            yield conn
    else:
        with cluster.connect() as conn:
            assert not isinstance(conn._backend, BlockingClient)
            yield conn


# --------------------------------------------------------------------------- map


def test_map_gives_results_in_order(cloud: DropletConnection) -> None:
    square = cloud.register(lambda _, x: x * x, "m_square")
    futures = square.map(range(40), chunksize=7)
    assert len(futures) == 40
    assert all(isinstance(f, droplet.DropletFuture) for f in futures)
    assert [f.get(timeout=30) for f in futures] == [x * x for x in range(40)]
    again = cloud.map("m_square", iter([5, 6]))  # any iterable, by name
    assert [f.get(timeout=30) for f in again] == [25, 36]


def test_a_tuple_item_is_one_argument(cloud: DropletConnection) -> None:
    describe = cloud.register(lambda _, x: f"{type(x).__name__}{len(x)}", "m_describe")
    futures = describe.map([(1, 2), (3,), "abc"])
    assert [f.get(timeout=30) for f in futures] == ["tuple2", "tuple1", "str3"]


def test_map_errors_are_per_item(cloud: DropletConnection) -> None:
    fn = cloud.register(fails_on_three, "m_fails")
    futures = fn.map(range(6), chunksize=2)
    for i, future in enumerate(futures):
        if i == 3:
            with pytest.raises(droplet.FunctionError, match="three is not allowed"):
                future.get(timeout=30)
        else:
            assert future.get(timeout=30) == i * 10


def _direct_of(cloud: DropletConnection) -> Any:
    backend: Any = cloud._backend
    return backend.direct if isinstance(backend, BlockingClient) else backend._client._direct


def test_map_sends_chunksize_calls_per_write_through_the_scheduler(
        cloud: DropletConnection) -> None:
    fn = cloud.register(lambda _, x: x + 1, "m_inc")
    writes: list[list[str]] = []
    backend: Any = cloud._backend
    if isinstance(backend, BlockingClient):
        peer: Any = backend.scheduler
        submit = peer.submit

        def counting(*msgs: Any, **kwargs: Any) -> Any:
            writes.append([type(m).__name__ for m in msgs])  # requests (not one-way ones)
            return submit(*msgs, **kwargs)
    else:  # the async client behind the portal
        peer = backend._client._scheduler
        asubmit = peer.submit

        async def counting(*msgs: Any) -> Any:  # type: ignore[misc]
            writes.append([type(m).__name__ for m in msgs])
            return await asubmit(*msgs)

    direct = _direct_of(cloud)
    peer.submit = counting
    direct.enabled = False  # as against a scheduler that hands out no placements
    try:
        futures = fn.map(range(10), chunksize=4)
        # one node: each call travels with the read of its result, 4 calls -> 8 messages
        assert [len(w) for w in writes] == [8, 8, 4]
        assert writes[0][:2] == ["CallDag", "KvsGet"]
        assert [f.get(timeout=30) for f in futures] == list(range(1, 11))
        writes.clear()
        fn.map(range(300))  # the default chunk size is 256
        assert [len(w) for w in writes] == [512, 88]
    finally:
        del peer.submit
        direct.enabled = True


def test_map_goes_straight_to_the_executors_chunksize_calls_per_write(
        cluster: droplet.LocalCluster, cloud: DropletConnection) -> None:
    blocking = isinstance(cloud._backend, BlockingClient)
    if blocking:
        pytest.skip("an embedded cluster's executors listen on inproc://, which a tcp:// "
                    "client does not dial (tcp: tests/e2e/test_direct_calls.py)")
    fn = cloud.register(lambda _, x: x + 1, "m_inc2")
    assert fn(0).get(timeout=30) == 1  # dials an executor
    direct = _direct_of(cloud)
    scheduler = cluster.node.scheduler
    started = scheduler.statistics().runs_started
    writes: list[tuple[str, list[str]]] = []

    def counted(url: str, peer: Any) -> None:
        submit = peer.submit
        if blocking:
            def counting(*msgs: Any, **kwargs: Any) -> Any:
                writes.append((url, [type(m).__name__ for m in msgs]))
                return submit(*msgs, **kwargs)
            peer.submit = counting
        else:
            async def acounting(*msgs: Any, **kwargs: Any) -> Any:
                writes.append((url, [type(m).__name__ for m in msgs]))
                return await submit(*msgs, **kwargs)
            peer.submit = acounting

    fn.map([0])  # both executors dialled (map spreads over the placement)
    peers = dict(direct._peers)
    assert sorted(peers) == sorted(ex.url for ex in cluster.node.executors)
    for url, peer in peers.items():
        counted(url, peer)
    try:
        futures = fn.map(range(10), chunksize=4)
        # split over the two executors (5 each), at most 4 calls per write
        assert sorted(len(w) for _, w in writes) == [1, 1, 4, 4]
        assert {u for u, _ in writes} == set(peers)
        assert all(names == ["Trigger"] * len(names) for _, names in writes)
        assert [f.get(timeout=30) for f in futures] == list(range(1, 11))
        writes.clear()
        futures = fn.map(range(600))  # the default chunk size is 256
        assert sorted(len(w) for _, w in writes) == [44, 44, 256, 256]
        assert [f.get(timeout=30) for f in futures] == list(range(1, 601))
        # none went through the scheduler
        assert scheduler.statistics().runs_started == started
    finally:
        for peer in peers.values():
            del peer.submit


def test_map_bad_arguments(cloud: DropletConnection) -> None:
    fn = cloud.register(lambda _, x: x, "m_echo")
    assert fn.map([]) == []
    with pytest.raises(ValueError, match="chunksize"):
        fn.map([1], chunksize=0)
    with pytest.raises(ValueError, match="chunksize"):
        fn.map([1], chunksize=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable"):
        fn.map(5)  # type: ignore[arg-type]
    with pytest.raises(droplet.DropletError, match="m_nope"):
        cloud.map("m_nope", [1, 2])
    assert [f.get(timeout=30) for f in fn.map([1])] == [1]  # the connection still works


# --------------------------------------------------------------------------- wait


def test_wait_all_completed(cloud: DropletConnection) -> None:
    fn = cloud.register(lambda _, x: x, "w_echo")
    futures = fn.map(range(20))
    done, not_done = droplet.wait(futures, timeout=30)
    assert done == set(futures) and not_done == set()
    assert all(f.done() for f in futures)
    done, not_done = droplet.wait(futures, return_when=droplet.ALL_COMPLETED)
    assert done == set(futures)


def test_wait_and_as_completed_without_timeout(cloud: DropletConnection) -> None:
    import time

    def slow(_: Any, x: int) -> int:
        time.sleep(0.2)
        return x

    fn = cloud.register(slow, "w_slow")
    futures = fn.map(range(3))
    assert not any(f.done() for f in futures)  # still running: the waits below block
    done, not_done = droplet.wait(futures)
    assert done == set(futures) and not not_done
    more = fn.map(range(3, 5))
    assert sorted(f.get() for f in droplet.as_completed(more)) == [3, 4]


def test_wait_first_completed_and_timeout(cloud: DropletConnection) -> None:
    cloud.register(gated, "w_gated")
    cloud.register(lambda _, x: x, "w_fast")
    cloud.put_object("w_gate", False)
    slow = cloud.exec_func("w_gated", ["w_gate"])
    fast = cloud.exec_func("w_fast", [1])
    done, not_done = droplet.wait([slow, fast], timeout=30,
                                  return_when=droplet.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    done, not_done = droplet.wait([slow, fast], timeout=0.2)  # no error past the timeout
    assert done == {fast} and not_done == {slow}
    cloud.put_object("w_gate", True)
    done, not_done = droplet.wait([slow], timeout=30)
    assert done == {slow} and slow.get() == "released"


def test_wait_first_exception(cloud: DropletConnection) -> None:
    cloud.register(gated, "w_gated2")
    fn = cloud.register(fails_on_three, "w_fails")
    cloud.put_object("w_gate2", False)
    slow = cloud.exec_func("w_gated2", ["w_gate2"])
    ok, bad = fn.map([1, 3])
    done, not_done = droplet.wait([slow, ok, bad], timeout=30,
                                  return_when=droplet.FIRST_EXCEPTION)
    assert bad in done and slow in not_done
    # without a failure, FIRST_EXCEPTION waits for all
    cloud.put_object("w_gate2", True)
    done, not_done = droplet.wait([slow, ok], timeout=30,
                                  return_when=droplet.FIRST_EXCEPTION)
    assert done == {slow, ok} and not_done == set()


def test_wait_bad_arguments(cloud: DropletConnection) -> None:
    fn = cloud.register(lambda _, x: x, "w_echo2")
    (future,) = fn.map([1])
    with pytest.raises(ValueError, match="return_when"):
        droplet.wait([future], return_when="SOMETIMES")
    with pytest.raises(TypeError, match="DropletFuture"):
        droplet.wait([future, 7])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="timeout"):
        droplet.wait([future], timeout=-1)
    assert droplet.wait([]) == (set(), set())


# --------------------------------------------------------------------------- as_completed


def test_as_completed_yields_in_finishing_order(cloud: DropletConnection) -> None:
    cloud.register(gated, "a_gated")
    fn = cloud.register(lambda _, x: x, "a_echo")
    cloud.put_object("a_gate", False)
    slow = cloud.exec_func("a_gated", ["a_gate"])
    fast = fn.map(range(5))
    seen = []
    for future in droplet.as_completed([slow, *fast, fast[0]], timeout=30):
        seen.append(future)
        if len(seen) == 5:  # every fast one is out: now let the slow one finish
            cloud.put_object("a_gate", True)
    assert set(seen[:5]) == set(fast) and seen[5] is slow and len(seen) == 6


def test_as_completed_times_out(cloud: DropletConnection) -> None:
    cloud.register(gated, "a_gated2")
    fn = cloud.register(lambda _, x: x, "a_echo2")
    cloud.put_object("a_gate2", False)
    slow = cloud.exec_func("a_gated2", ["a_gate2"])
    (fast,) = fn.map([1])
    it = droplet.as_completed([fast, slow], timeout=0.3)
    assert next(it) is fast
    with pytest.raises(droplet.TimeoutError, match="1 \\(of 2\\) futures unfinished"):
        next(it)
    cloud.put_object("a_gate2", True)
    assert slow.get(timeout=30) == "released"


# --------------------------------------------------------------------------- async forms


async def forever(_: Any) -> None:
    await trio.sleep_forever()


async def atimes(_: Any, x: int) -> int:
    if x == 3:
        raise ValueError("three is not allowed")
    await trio.sleep(x)  # finishes in (virtual) x seconds
    return x * 10


async def test_async_map_wait_and_as_completed(
        autojump_clock: trio.testing.MockClock) -> None:
    # Only async functions: autojump must not fire while a worker thread runs.
    async with droplet.open_local_cluster(executors=2) as running, \
            running.client() as cloud:
        fn = await cloud.register(atimes, "x_times")
        futures = await fn.map([2, 0, 1], chunksize=2)
        assert all(isinstance(f, droplet.AsyncDropletFuture) for f in futures)
        order = [await f.get() async for f in droplet.as_completed_async(futures, timeout=60)]
        assert order == [0, 10, 20]
        assert [await f for f in futures] == [20, 0, 10]  # map keeps the input order

        more = await cloud.map("x_times", [5, 3, 1])
        done, not_done = await droplet.wait_async(
            more, timeout=60, return_when=droplet.FIRST_COMPLETED)
        assert done == {more[1]}  # the failing call is the first to finish
        with pytest.raises(droplet.FunctionError, match="three"):
            await more[1].get()
        done, not_done = await droplet.wait_async(
            more, timeout=60, return_when=droplet.FIRST_EXCEPTION)
        assert more[1] in done and more[0] in not_done
        done, not_done = await droplet.wait_async(more, timeout=60)
        assert done == set(more) and not not_done


async def test_async_timeouts(autojump_clock: trio.testing.MockClock) -> None:
    async with droplet.open_local_cluster(executors=1) as running, \
            running.client() as cloud:
        await cloud.register(forever, "x_forever")
        fn = await cloud.register(atimes, "x_times2")
        stuck = await cloud.exec_func("x_forever")
        (quick,) = await fn.map([0])
        start = trio.current_time()
        done, not_done = await droplet.wait_async([stuck, quick], timeout=5)
        assert done == {quick} and not_done == {stuck}
        assert trio.current_time() - start == pytest.approx(5)
        seen = []
        with pytest.raises(droplet.TimeoutError, match="1 \\(of 2\\)"):
            async for future in droplet.as_completed_async([stuck, quick], timeout=4):
                seen.append(future)
        assert seen == [quick]
        with pytest.raises(TypeError, match="AsyncDropletFuture"):
            await droplet.wait_async([quick, "x"])  # type: ignore[list-item]


def test_waiting_threads_share_the_connection(cloud: DropletConnection) -> None:
    """One thread waits on many futures while others call and get: every reply
    reaches its thread, whoever happens to be reading the socket."""
    import threading

    fn = cloud.register(lambda _, x: x * 2, "t_double")
    results: dict[str, Any] = {}

    def waiter() -> None:
        futures = fn.map(range(200), chunksize=16)
        results["as_completed"] = sorted(
            f.get() for f in droplet.as_completed(futures, timeout=60))

    def caller(i: int) -> None:
        results[f"call{i}"] = [fn(i * 100 + j).get(timeout=60) for j in range(20)]

    threads = [threading.Thread(target=waiter)]
    threads += [threading.Thread(target=caller, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["as_completed"] == [2 * x for x in range(200)]
    for i in range(3):
        assert results[f"call{i}"] == [2 * (i * 100 + j) for j in range(20)]


@pytest.mark.parametrize("listen", ["tcp://127.0.0.1:0", None], ids=["blocking", "portal"])
def test_dropped_map_futures_release_their_results(listen: str | None) -> None:
    """map's futures follow the result-lifetime rules of single calls (client/_release.py)."""
    import gc
    import time

    with droplet.LocalCluster(executors=1, listen=listen) as local:
        kvs = local.node.kvs
        assert kvs is not None
        with (DropletConnection(local.address) if listen else local.connect()) as cloud:
            fn = cloud.register(lambda _, x: x * 2, "r_double")
            baseline = kvs.statistics().keys
            futures = fn.map(range(100), chunksize=32)
            assert sorted(f.get() for f in droplet.as_completed(futures, timeout=60)) == [
                2 * i for i in range(100)]
            # Through the scheduler (blocking: an embedded cluster's executors are
            # inproc://) the executor stores each result; straight to the executor
            # (portal) nothing is stored unless an obj_id is read (test_lazy_results.py).
            assert kvs.statistics().results == (100 if listen else 0)
            del futures
            for _ in range(400):  # released in batches, in the background: about 20 s at most
                gc.collect()
                if kvs.statistics().results == 0:
                    break
                time.sleep(0.05)
            assert kvs.statistics().results == 0
            assert kvs.statistics().keys == baseline
            with pytest.raises(droplet.DropletError, match="r_nope"):
                cloud.map("r_nope", [1, 2])  # refused calls: nothing to release
            assert [f.get() for f in fn.map([4])] == [8]
