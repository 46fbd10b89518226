"""Adaptive executors in an embedded cluster: growth under a queue, shrink when idle, drains.

Sync functions queue in their executor's worker threads (one thread each
here), held by a gate key in the store. These tests run on the real clock
(the functions run in threads, which a MockClock would outrun), with short
thresholds and ``fail_after`` guards; nothing asserts a duration.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import trio

from droplet.client.aio import AsyncDropletClient
from droplet.cluster import RunningCluster, open_local_cluster
from droplet.node.pool import ExecutorPool
from droplet.status import ScalingStatus

FAST: dict[str, Any] = {"threads": 1, "report_interval": 0.05, "scale_up_after": 0.1,
        "scale_down_after": 0.3}
#: thresholds no test reaches: the pool scales only when a test asks it to.
MANUAL: dict[str, Any] = {"threads": 1, "report_interval": 0.05, "scale_up_after": 1e6,
          "scale_down_after": 1e6}


def gated(lib: Any, x: int) -> int:
    while not lib.get("gate"):
        time.sleep(0.005)
    return x * 2


def _pool(cluster: RunningCluster) -> ExecutorPool:
    assert cluster.node.pool is not None
    return cluster.node.pool


async def _wait_for(pool: ExecutorPool, check: Any) -> None:
    while not check(pool.status()):
        await pool.changed.wait()


async def test_a_burst_grows_executors_and_idle_shrinks_them() -> None:
    async with open_local_cluster((1, 3), **FAST) as cluster, cluster.client() as cloud:
        pool = _pool(cluster)
        assert pool.status().current == 1
        await cloud.put_object("gate", False)
        fn = await cloud.register(gated, "gated")
        futures: list[Any] = []
        with trio.fail_after(30):
            while pool.status().current < 3:  # keep calls queueing until the maximum
                futures.append(await fn(len(futures)))
                await trio.sleep(0.02)
        # Never past the maximum, whatever still queues.
        for _ in range(5):
            futures.append(await fn(len(futures)))
            await trio.sleep(0.05)
        assert pool.status().current + pool.status().starting == 3
        await cloud.put_object("gate", True)
        with trio.fail_after(30):
            results = [await f.get() for f in futures]
        assert results == [2 * i for i in range(len(futures))]
        with trio.fail_after(30):
            await _wait_for(pool, lambda s: s.current == 1 and not s.draining)
        status = await cloud.status()
        assert status.scaling is not None
        assert (status.scaling.minimum, status.scaling.maximum) == (1, 3)
        assert status.scaling.current == 1 and len(status.executors) == 1
        directions = [e.direction for e in status.scaling.events]
        assert directions == ["up", "up", "down", "down"]
        assert [e.executors for e in status.scaling.events] == [2, 3, 2, 1]
        assert len(cluster.node.executors) == 1
        # Drained executors sent their last report before they stopped: every call counted.
        function = status.function("gated")
        assert function is not None and function.calls == len(futures)
        # Still serving after shrinking.
        assert await (await fn(21)).get() == 42


async def test_scale_down_drains_calls_in_flight_and_places_none_there() -> None:
    async with open_local_cluster((1, 2), **MANUAL) as cluster, cluster.client() as cloud:
        cloud._direct.enabled = False  # placement through the scheduler, counted there
        pool = _pool(cluster)
        scheduler = cluster.node.scheduler
        assert scheduler is not None
        await cloud.put_object("gate", False)
        fn = await cloud.register(gated, "gated")
        second = pool.scale_up()
        with trio.fail_after(30):
            while scheduler.executor_url(second) is None:
                await scheduler.executors_changed.wait()
        url = scheduler.executor_url(second)
        assert url is not None
        futures = [await fn(i) for i in range(4)]  # spread over both executors
        # A call returns its future before the scheduler has placed it: wait
        # until all four are placed, so the load read below is final.
        for _ in range(3000):  # 30 s
            if sum(scheduler.executor_load(u)[1] for u in scheduler.executor_urls) >= 4:
                break
            await trio.sleep(0.01)
        else:
            raise AssertionError("the scheduler placed fewer than 4 calls in 30 s")
        in_flight, placed = scheduler.executor_load(url)
        assert in_flight >= 1
        pool.scale_down(second)
        await trio.sleep(0.2)
        assert pool.slots[second] == "draining"
        assert pool.status().draining == 1 and pool.status().current == 1
        # New calls go elsewhere while it drains.
        futures += [await fn(i) for i in range(4, 10)]
        assert scheduler.executor_load(url) == (in_flight, placed)
        assert url in scheduler.executor_urls  # still there: its calls are not done
        await cloud.put_object("gate", True)
        with trio.fail_after(30):
            results = [await f.get() for f in futures]
            await _wait_for(pool, lambda s: s.draining == 0)
        assert results == [2 * i for i in range(10)]
        assert second not in pool.slots and url not in scheduler.executor_urls
        assert pool.status().scale_downs == 1
        # The drained executor's last report (its last calls) reached the scheduler.
        with trio.fail_after(10):
            while True:
                found = (await cloud.status()).function("gated")
                if found is not None and found.calls == 10:
                    break
                await trio.sleep(0.05)
        assert await (await fn(5)).get() == 10


async def test_calls_keep_completing_while_executors_come_and_go() -> None:
    """A steady stream of calls across several scale-downs: none lost, none hangs."""
    async with open_local_cluster((1, 3), **MANUAL) as cluster, cluster.client() as cloud:
        pool = _pool(cluster)
        await cloud.put_object("gate", True)  # calls run through at once
        fn = await cloud.register(gated, "gated")
        futures: list[Any] = []

        async def churn() -> None:
            for _ in range(3):
                started = pool.scale_up()
                await trio.sleep(0.1)
                pool.scale_down(started)
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(churn)
            for i in range(60):
                futures.append(await fn(i))
                await trio.sleep(0.01)
        with trio.fail_after(30):
            results = [await f.get() for f in futures]
            await _wait_for(pool, lambda s: s.current == 1 and not (s.starting or s.draining))
        assert results == [2 * i for i in range(60)]
        assert pool.status().scale_downs == 3


async def test_fixed_executors_report_no_scaling() -> None:
    async with open_local_cluster(2, threads=1) as cluster:
        client: AsyncDropletClient
        async with cluster.client() as client:
            status = await client.status()
        assert status.scaling is None
        assert _pool(cluster).status().current == 2


async def test_pool_messages_answer_and_refuse_bad_requests() -> None:
    from droplet.errors import ProtocolError
    from droplet.links import connect_peer
    from droplet.protocol.messages import BoolReply, DrainExecutor, PoolQuery, PoolReply

    async with open_local_cluster((1, 2), **MANUAL) as cluster, \
            trio.open_nursery() as nursery:
        pool = _pool(cluster)
        (slot,) = pool.slots
        # The node's own pool, as the scheduler lists it.
        rows = cluster.node.scheduler.pool_view(slot[:-1])  # type: ignore[union-attr]
        assert [row[:2] for row in rows] == [(slot, pool.url_of(slot))]
        peer = await connect_peer(cluster.address, nursery)
        with pytest.raises(ProtocolError, match="prefix"):
            await peer.request(PoolQuery(""), 10)
        assert await peer.request(DrainExecutor("tcp://nowhere:1"), 10) == BoolReply(False)
        assert await peer.request(PoolQuery("x-w"), 10) == PoolReply(
            [], [], [], [], [], [], [])
        for garbage in ("{", '{"minimum": 1}', "[]", '{"minimum": -1}'):
            with pytest.raises(ProtocolError, match="status"):
                await peer.request(PoolQuery("x-w", garbage), 10)
        # A well-formed one shows in the status while this link lasts.
        good = ScalingStatus(1, 3, 2, node="tcp://elsewhere:1")
        await peer.request(PoolQuery("x-w", json.dumps(good.to_dict())), 10)
        async with cluster.client() as cloud:
            assert (await cloud.status()).pools == (good,)
        # Still serving after the bad requests.
        async with cluster.client() as cloud:
            fn = await cloud.register(lambda _, x: x + 1, "after_pool_messages")
            assert await (await fn(1)).get() == 2
        await peer.aclose()
        with trio.fail_after(10):
            while True:
                async with cluster.client() as cloud:
                    if not (await cloud.status()).pools:
                        break
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_a_call_placed_on_an_executor_before_its_join_reply_is_served() -> None:
    """The scheduler may place calls on an executor the moment it joins, before the
    executor has read the reply to its join: those triggers must find it ready."""
    from droplet.protocol.messages import ExecutorJoin

    async with open_local_cluster((1, 2), **MANUAL) as cluster, cluster.client() as cloud:
        cloud._direct.enabled = False  # placement through the scheduler, counted there
        pool = _pool(cluster)
        scheduler = cluster.node.scheduler
        router = cluster.node.router
        assert scheduler is not None and router is not None
        fn = await cloud.register(lambda _, x: x + 1, "inc_at_join")
        joined = router._routes[ExecutorJoin]
        reply_now = trio.Event()

        async def join_then_hold_the_reply(peer: Any, msg: Any, request_id: int) -> Any:
            reply = await joined(peer, msg, request_id)
            await reply_now.wait()  # registered, placeable, and not told yet
            return reply

        router._routes[ExecutorJoin] = join_then_hold_the_reply
        second = pool.scale_up()
        with trio.fail_after(30):
            while scheduler.executor_url(second) is None:
                await scheduler.executors_changed.wait()
        url = scheduler.executor_url(second)
        assert url is not None
        futures = [await fn(i) for i in range(4)]  # least loaded: the newcomer gets some
        assert scheduler.executor_load(url)[1] >= 1
        reply_now.set()
        with trio.fail_after(10):
            assert [await f.get() for f in futures] == [1, 2, 3, 4]


async def test_a_link_drains_only_the_executors_of_its_own_pool() -> None:
    """DrainExecutor and PoolQuery are a node's requests about its own workers: another
    link (a client, say) can neither drain nor claim the executors of others."""
    from droplet.errors import ProtocolError
    from droplet.links import connect_peer
    from droplet.protocol.messages import (
        BoolReply,
        DrainExecutor,
        ExecutorJoin,
        ExecutorReport,
        Hello,
        PoolQuery,
        PoolReply,
    )

    async with open_local_cluster((1, 2), **MANUAL) as cluster, \
            trio.open_nursery() as nursery:
        pool = _pool(cluster)
        scheduler = cluster.node.scheduler
        assert scheduler is not None
        (slot,) = pool.slots
        url = pool.url_of(slot)
        assert url is not None
        stranger = await connect_peer(cluster.address, nursery)
        with pytest.raises(ProtocolError, match="not one of"):
            await stranger.request(DrainExecutor(url), 10)
        assert url in scheduler.executor_urls and pool.status().current == 1
        assert scheduler.pool_view(slot[:-1])  # not draining either
        # Nor may it claim the node's workers (or overlap them) to drain them later.
        for taken in (slot[:-1], slot[:9], slot):
            with pytest.raises(ProtocolError, match="another"):
                await stranger.request(PoolQuery(taken), 10)
        with pytest.raises(ProtocolError, match="-"):  # would match executors' own ids
            await stranger.request(PoolQuery("a"), 10)
        # A link manages one pool: its prefix, and no table grows per request.
        assert await stranger.request(PoolQuery("x-w"), 10) == PoolReply(
            [], [], [], [], [], [], [])
        with pytest.raises(ProtocolError, match="one pool"):
            await stranger.request(PoolQuery("y-w"), 10)
        other = await connect_peer(cluster.address, nursery)
        with pytest.raises(ProtocolError, match="another"):
            await other.request(PoolQuery("x-"), 10)
        # A worker of the stranger's pool joins: the stranger may drain it, no one else.
        worker = await connect_peer(cluster.address, nursery)
        await worker.request(Hello("executor", "x-w0", "inproc://x-w0"), 10)
        await worker.request(ExecutorJoin("inproc://x-w0", "x-w0", 1, {}), 10)
        reply = await stranger.request(PoolQuery("x-w"), 10)
        assert reply.node_ids == ["x-w0"]
        with pytest.raises(ProtocolError, match="not one of"):
            await other.request(DrainExecutor("inproc://x-w0"), 10)
        assert "inproc://x-w0" in scheduler.executor_urls
        # A drain waits for the worker's next report.
        nursery.start_soon(lambda: _report_soon(worker, ExecutorReport(
            "inproc://x-w0", 1, 0, 0, 0, 0, 0, 0, 0, [], [], [], [], [])))
        with trio.fail_after(10):
            assert await stranger.request(DrainExecutor("inproc://x-w0"), 10) == BoolReply(True)
        assert "inproc://x-w0" not in scheduler.executor_urls
        assert url in scheduler.executor_urls
        # A worker that joined before its node's first query is that node's, once claimed.
        early = await connect_peer(cluster.address, nursery)
        await early.request(ExecutorJoin("inproc://z-w0", "z-w0", 1, {}), 10)
        with pytest.raises(ProtocolError, match="not one of"):
            await other.request(DrainExecutor("inproc://z-w0"), 10)
        assert (await other.request(PoolQuery("z-w"), 10)).node_ids == ["z-w0"]
        with pytest.raises(ProtocolError, match="another"):
            await early.request(PoolQuery("z-"), 10)
        # A link's claim ends with the link: no table keeps what closed links claimed.
        await stranger.aclose()
        with trio.fail_after(10):
            while True:
                if "x-w" not in scheduler._pool_owners:
                    break
                await trio.sleep(0.01)
        assert await early.request(PoolQuery("x-w"), 10) == PoolReply(
            [], [], [], [], [], [], [])
        nursery.cancel_scope.cancel()


async def _report_soon(peer: Any, report: Any) -> None:
    await trio.sleep(0.2)
    peer.post(report)


async def test_two_drains_of_one_executor_both_end_when_it_was_placed_on_again() -> None:
    """A node repeats a long drain (DrainExecutor again): when every executor is draining,
    calls still go to one, and each drain waiting for it returns once they are done."""
    async with open_local_cluster(1, threads=1) as cluster, cluster.client() as cloud:
        scheduler = cluster.node.scheduler
        assert scheduler is not None
        (url,) = scheduler.executor_urls
        await cloud.put_object("gate", False)
        fn = await cloud.register(gated, "gated")
        done: list[int] = []
        both_done = trio.Event()

        async def drain(i: int) -> None:
            await scheduler.drain(url)
            done.append(i)
            if len(done) == 2:
                both_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, 1)
            nursery.start_soon(drain, 2)
            await trio.sleep(0.01)
            assert scheduler._executors[url].draining
            # Nothing ran there when both began; now a call is placed there after all.
            future = await fn(3)
            assert scheduler.executor_load(url)[0] == 1
            await trio.sleep(1.5)  # both saw its next report, with the call still running
            await cloud.put_object("gate", True)
            with trio.fail_after(10):
                assert await future.get() == 6
                await both_done.wait()
        assert url not in scheduler.executor_urls
