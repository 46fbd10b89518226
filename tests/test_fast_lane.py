"""The executor's fast lane and the thread-safe TCP write path under it.

The fast lane needs connections a worker thread can write (plain TCP), so
these tests run a node and executors in this process over loopback TCP.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

import droplet
from droplet.config import Config
from droplet.executor.threads import WorkerThreads
from droplet.node import Node, serve_node
from droplet.transports import tcp
from droplet.transports.base import TransportOptions
from droplet.transports.tcp import StreamConnection

TIMEOUT = 30


def noop(_: Any, x: Any) -> Any:
    return x


def inc(_: Any, x: int) -> int:
    return x + 1


def boom(_: Any, x: Any) -> Any:
    raise ValueError(f"boom {x}")


_GATE = threading.Event()


def gated(_: Any, x: Any) -> Any:
    _GATE.wait(TIMEOUT)
    return x


class _Cluster:
    def __init__(self, main: Node, workers: list[Node]) -> None:
        self.url = main.url
        self.executors = [w.executors[0] for w in workers]

    def fast_calls(self) -> int:
        return sum(ex.statistics().fast_calls for ex in self.executors)


@pytest.fixture
async def cluster() -> AsyncIterator[_Cluster]:
    """A KVS+scheduler node and two executor nodes, all over loopback TCP."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            main: Node = await nursery.start(functools.partial(serve_node, Config(
                listen="tcp://127.0.0.1:0", executors=0, placement="spread")))
            workers = [await nursery.start(functools.partial(serve_node, Config(
                role="executor", listen="tcp://127.0.0.1:0", scheduler=main.url)))
                for _ in range(2)]
            yield _Cluster(main, workers)
            nursery.cancel_scope.cancel()


async def _until(check: Any) -> None:
    while not check():  # noqa: ASYNC110 (worker threads settle; nothing to wait on)
        await trio.sleep(0.01)


async def test_direct_calls_take_the_fast_lane_and_keep_their_result_key(
        cluster: _Cluster) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(cluster.url) as cloud:
            f = await cloud.register(inc, "inc")
            futures = [await f(i) for i in range(20)]
            assert [await fut.get() for fut in futures] == list(range(1, 21))
            assert cluster.fast_calls() > 0
            assert await cloud.get_object(futures[-1].obj_id) == 20
            # A worker thread settles its call after the reply is out: soon, not at once.
            await _until(lambda: sum(ex.statistics().running + ex.statistics().tasks
                                     for ex in cluster.executors) == 0)


async def test_a_function_that_raises_on_the_fast_lane_is_the_callers_error(
        cluster: _Cluster) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(cluster.url) as cloud:
            f = await cloud.register(boom, "boom")
            ok = await cloud.register(noop, "noop")
            await (await ok(0)).get()  # warm: loaded everywhere, direct placement known
            before = cluster.fast_calls()
            for i in range(3):
                with pytest.raises(droplet.FunctionError, match=f"boom {i}"):
                    await (await f(i)).get()
            assert cluster.fast_calls() > before
            await _until(lambda: sum(ex.statistics().failures
                                     for ex in cluster.executors) >= 3)
            assert await (await ok("still here")).get() == "still here"


async def test_a_blocked_function_times_out_its_caller_and_blocks_nobody_else(
        cluster: _Cluster) -> None:
    _GATE.clear()
    try:
        with trio.fail_after(TIMEOUT):
            async with droplet.open_client(cluster.url) as cloud:
                slow = await cloud.register(gated, "gated")
                ok = await cloud.register(noop, "noop")
                await (await ok(0)).get()
                stuck = [await slow(i) for i in range(4)]
                with pytest.raises(droplet.TimeoutError):
                    await stuck[0].get(timeout=0.2)
                # Both executors hold blocked calls; others still get answers.
                assert [await (await ok(i)).get() for i in range(10)] == list(range(10))
                _GATE.set()
                assert [await s.get() for s in stuck] == [0, 1, 2, 3]
    finally:
        _GATE.set()


async def test_a_dag_placed_by_the_scheduler_across_two_executors(cluster: _Cluster) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(cluster.url) as cloud:
            await cloud.register(inc, "a")
            await cloud.register(inc, "b")
            await cloud.register_dag("ab", ["a", "b"], [("a", "b")])
            # Warm up: code loaded and executors connected to each other.
            for i in range(5):
                assert await (await cloud.call_dag("ab", {"a": i})).get() == i + 2
            before = cluster.fast_calls()
            for i in range(10):
                assert await cloud.call_dag("ab", {"a": i}, direct_response=True) == i + 2
                assert await (await cloud.call_dag("ab", {"a": i})).get() == i + 2
            assert cluster.fast_calls() >= before + 20


# --------------------------------------------------------------------------- worker threads


async def test_jobs_still_running_at_shutdown_get_the_grace_period_then_are_named(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    threads = WorkerThreads(2, grace=5.0)
    release = threading.Event()
    quick_done = threading.Event()
    threads.start(quick_done.set, label="quick")
    threads.start(release.wait, TIMEOUT, label="stuck_fn")
    with caplog.at_level(logging.WARNING, logger="droplet.executor"):
        await trio.to_thread.run_sync(quick_done.wait, TIMEOUT)
        await threads.finish_started()
    release.set()
    threads.close()
    assert threads.abandoned == 1
    assert "stuck_fn is still running 5 s" in caplog.text
    assert "quick" not in caplog.text


async def test_finish_started_returns_when_the_jobs_end() -> None:
    threads = WorkerThreads(1, grace=TIMEOUT)
    release = threading.Event()
    threads.start(release.wait, TIMEOUT, label="job")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(threads.finish_started)
            await trio.sleep(0.05)
            release.set()
    threads.close()
    assert threads.abandoned == 0


# --------------------------------------------------------------------------- TCP thread writes


async def _tcp_pair(sndbuf: int | None = None, max_frame_size: int | None = None
                    ) -> tuple[StreamConnection, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    if sndbuf is not None:
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    options = TransportOptions() if max_frame_size is None else TransportOptions(
        max_frame_size=max_frame_size)
    return StreamConnection(client, "tcp://peer", options), server


async def test_thread_writes_keep_frames_whole_and_in_order_with_loop_writes() -> None:
    """Threads and a loop task write at once over a small send buffer, the
    reader starting only once a thread's write was partial (so frames queue
    and the loop finishes writes): every frame arrives whole, each writer's
    frames in the order it wrote them."""
    conn, server = await _tcp_pair(sndbuf=4096)
    first_flush = trio.Event()
    receiver = StreamConnection(server, "tcp://them", TransportOptions())
    per_writer = 600
    writers = ["loop", "t0", "t1", "t2"]
    got: dict[str, list[int]] = {w: [] for w in writers}
    flushes = [0]

    def payload(writer: str, i: int) -> bytes:
        return f"{writer}:{i}:".encode() + bytes([i % 251]) * (100 + 37 * (i % 50))

    def thread_writer(name: str) -> None:
        for i in range(per_writer):
            while True:
                done = conn.send_from_thread(payload(name, i))
                if done != tcp.REFUSED:
                    break
                trio.from_thread.run(conn.send, payload(name, i))  # the loop's path
                done = tcp.SENT
                break
            if done == tcp.FLUSH:
                flushes[0] += 1
                trio.from_thread.run_sync(first_flush.set)
                trio.from_thread.run(conn.flush)

    async def loop_writer() -> None:
        await first_flush.wait()
        for i in range(per_writer):
            await conn.send(payload("loop", i))

    async def read_all() -> None:
        await first_flush.wait()
        total = per_writer * len(writers)
        for _ in range(total):
            frame = bytes(await receiver.receive())
            name, index, rest = frame.split(b":", 2)
            i = int(index)
            assert rest == payload(name.decode(), i).split(b":", 2)[2], "a frame was torn"
            got[name.decode()].append(i)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            nursery.start_soon(loop_writer)
            for name in writers[1:]:
                nursery.start_soon(trio.to_thread.run_sync, thread_writer, name)
    for name in writers:
        assert got[name] == list(range(per_writer)), name
    assert flushes[0] >= 1  # a partial write was finished by the loop at least once
    await conn.aclose()
    await receiver.aclose()


async def test_thread_writes_refuse_what_they_cannot_take() -> None:
    conn, server = await _tcp_pair(max_frame_size=1000)
    try:
        assert conn.thread_writes
        assert conn.send_from_thread(b"x" * tcp.BIG_FRAME) == tcp.REFUSED  # the loop's job
        with pytest.raises(ValueError, match="max_frame_size=1000"):
            conn.send_from_thread(b"x" * 1001)
        await conn.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await trio.to_thread.run_sync(conn.send_from_thread, b"late")
    finally:
        await server.aclose()


async def test_a_caller_that_stops_reading_holds_up_only_its_own_replies() -> None:
    """A thread's frames to a peer that does not read queue up to a bound, then
    are refused (the loop's outbox rules take over); another connection's
    thread writes go straight through meanwhile."""
    stalled, stalled_server = await _tcp_pair(sndbuf=4096)
    other, other_server = await _tcp_pair()
    receiver = StreamConnection(other_server, "tcp://them", TransportOptions())
    frame = b"r" * 60_000

    def fill() -> int:
        for _ in range(10_000):
            done = stalled.send_from_thread(frame)
            if done == tcp.REFUSED:
                return done
        return done

    with trio.fail_after(TIMEOUT):
        assert await trio.to_thread.run_sync(fill) == tcp.REFUSED
        assert await trio.to_thread.run_sync(other.send_from_thread, b"hello") == tcp.SENT
        assert bytes(await receiver.receive()) == b"hello"
    for c in (stalled, other, receiver):
        await c.aclose()
    await stalled_server.aclose()
