"""Regression tests from a review of the fast call path (issue 9).

Each test failed before the fix committed with it: a user function that
raises SystemExit, concurrent first calls of an async client, a direct call
that falls back to the scheduler, a sync wait over several executors' sockets.
"""

from __future__ import annotations

import functools
import gc
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio
import trio.testing

import droplet
from droplet import AsyncDropletClient, DropletConnection
from droplet.config import Config
from droplet.node import Node, serve_node

TIMEOUT = 30


async def ainc(_: Any, x: int) -> int:
    """inc on the loop: under the autojump MockClock a worker thread's real time
    races virtual time (the clock jumps while the loop waits for the thread)."""
    return x + 1


def inc(_: Any, x: int) -> int:
    return x + 1


def leave(_: Any, code: int) -> int:
    sys.exit(code)  # a user's script-style function: its caller gets a FunctionError


async def leave_async(_: Any, code: int) -> int:
    await trio.lowlevel.checkpoint()
    raise SystemExit(code)


def interrupted(_: Any, x: int) -> int:
    raise KeyboardInterrupt(f"user code raised this, not a Ctrl-C ({x})")


class Leaver:
    """A registered class whose constructor exits (built on the first call)."""

    def __init__(self, _: Any) -> None:
        sys.exit(5)

    def run(self, _: Any, x: int) -> int:
        return x


def leave_batch(_: Any, xs: list[int]) -> list[int]:
    sys.exit(6)


# --------------------------------------------------------------------------- SystemExit


@pytest.fixture
async def tcp_nodes() -> AsyncIterator[tuple[Node, list[Node]]]:
    """A KVS+scheduler node and two executor nodes over loopback TCP (fast lane on)."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            main: Node = await nursery.start(functools.partial(serve_node, Config(
                listen="tcp://127.0.0.1:0", executors=0)))
            workers = [await nursery.start(functools.partial(serve_node, Config(
                role="executor", listen="tcp://127.0.0.1:0", scheduler=main.url)))
                for _ in range(2)]
            yield main, workers
            nursery.cancel_scope.cancel()


async def _exits_are_function_errors(client: AsyncDropletClient) -> None:
    ok = await client.register(inc, "inc")
    assert await (await ok(1)).get() == 2
    for name, fn in (("leave", leave), ("leave_async", leave_async),
                     ("interrupted", interrupted)):
        f = await client.register(fn, name)
        for i in range(3):
            with pytest.raises(droplet.FunctionError, match="SystemExit|KeyboardInterrupt"):
                await (await f(i)).get()
            # A reference argument takes the ordinary path (no fast lane) everywhere.
            await client.put_object("review-code", i)
            with pytest.raises(droplet.FunctionError, match="SystemExit|KeyboardInterrupt"):
                await (await f(droplet.DropletReference("review-code"))).get()
    leaver = await client.register((Leaver, ()), "leaver")
    for i in range(3):
        with pytest.raises(droplet.FunctionError, match="SystemExit"):
            await (await leaver(i)).get()
    await client.register(leave_batch, "leave_batch")
    await client.register_dag("batch_dag", ["leave_batch"], [],
                              batching_functions=["leave_batch"])
    for i in range(3):
        with pytest.raises(droplet.FunctionError, match="SystemExit"):
            await (await client.call_dag("batch_dag", {"leave_batch": i})).get()
    # Every executor still serves.
    assert [await (await ok(i)).get() for i in range(8)] == list(range(1, 9))


async def test_a_function_that_raises_system_exit_is_its_callers_error_embedded() -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(executors=2) as running:
            async with running.client() as client:
                await _exits_are_function_errors(client)


async def test_a_function_that_raises_system_exit_is_its_callers_error_over_tcp(
        tcp_nodes: tuple[Node, list[Node]]) -> None:
    main, workers = tcp_nodes
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(main.url, timeout=10) as client:
            await _exits_are_function_errors(client)
            client._direct.enabled = False  # through the scheduler: triggers it places
            await _exits_are_function_errors(client)
    assert sum(w.executors[0].statistics().fast_calls for w in workers) > 0


# --------------------------------------------------------------------------- async client dials


async def test_concurrent_first_calls_dial_each_executor_once_and_close_cleanly() -> None:
    """Many tasks calling at once, before any executor connection exists, share one
    connection per executor; aclose() then closes them all, so a nursery the user
    owns (AsyncDropletClient.connect) exits instead of waiting on leaked readers."""
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(executors=2) as running:
            async with trio.open_nursery() as nursery:
                client = await AsyncDropletClient.connect(running.address, nursery,
                                                          token=running.token)
                dials: list[str] = []
                dial = client._direct._dial

                async def counting(url: str) -> Any:
                    dials.append(url)
                    return await dial(url)

                client._direct._dial = counting  # type: ignore[method-assign]
                f = await client.register(inc, "inc")
                results: list[int] = []

                async def call(i: int) -> None:
                    results.append(await (await f(i)).get())

                async with trio.open_nursery() as calls:
                    for i in range(50):
                        calls.start_soon(call, i)
                assert sorted(results) == list(range(1, 51))
                assert dials and len(dials) == len(set(dials))  # one dial per executor
                await client.aclose()
            # the nursery exited: nothing of the client was left running in it


async def test_a_direct_call_that_falls_back_to_the_scheduler_keeps_its_result(
        autojump_clock: trio.testing.MockClock) -> None:
    """The executor's connection breaks as a direct call goes out: the call goes
    through the scheduler, under the same result key, and nothing of the
    attempt releases that key (the result stays readable by its obj_id)."""
    async with droplet.open_local_cluster(executors=1) as running:
        async with running.client() as client:
            f = await client.register(ainc, "inc")
            assert await (await f(0)).get() == 1  # placement cached, executor dialled
            ((url, peer),) = client._direct._peers.items()

            async def broken(*msgs: Any, oneway: Any = ()) -> Any:
                await peer.aclose()  # the executor hung up as the call went out
                raise droplet.ConnectionError(f"connection to {url} broke")

            peer.submit = broken  # type: ignore[method-assign]
            future = await f(41)
            gc.collect()
            assert await future.get() == 42
            key = future.obj_id
            await trio.sleep(5)  # well past FLUSH_DELAY: released keys were sent
            assert await client.get_object(key) == 42


# --------------------------------------------------------------------------- sync wait


_GATES = {i: threading.Event() for i in range(4)}


def gate(_: Any, i: int) -> int:
    _GATES[i].wait(TIMEOUT)
    return i


@contextmanager
def _tcp_nodes_in_a_thread() -> Iterator[str]:
    """A KVS+scheduler node and two executor nodes over loopback TCP, run by Trio
    in a thread of their own (a sync client blocks this one): the main node's URL."""
    ready: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            main: Node = await nursery.start(functools.partial(serve_node, Config(
                listen="tcp://127.0.0.1:0", executors=0)))
            for _ in range(2):
                await nursery.start(functools.partial(serve_node, Config(
                    role="executor", listen="tcp://127.0.0.1:0", scheduler=main.url)))
            ready.put(main.url)
            await trio.to_thread.run_sync(stop.wait)
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    try:
        yield ready.get(timeout=TIMEOUT)
    finally:
        stop.set()
        thread.join(TIMEOUT)


def test_a_sync_wait_over_two_executors_sees_a_reply_another_thread_read() -> None:
    """droplet.wait on futures of two executors' connections sleeps in select() on
    both sockets; a reply another thread reads off one of them (that thread leads
    the socket, waiting for its own reply) must still end the wait."""
    for event in _GATES.values():
        event.clear()
    with _tcp_nodes_in_a_thread() as url, DropletConnection(url, timeout=TIMEOUT) as conn:
        futures = conn.register(gate, "gate").map(range(4), chunksize=1)
        by_peer: dict[Any, list[int]] = {}
        for i, f in enumerate(futures):
            by_peer.setdefault(f._inner._peer, []).append(i)  # type: ignore[attr-defined]
        assert len(by_peer) == 2, "the map went straight to both executors"
        (one, (mine, first)), (_, (second, _)) = by_peer.items()
        other_thread: list[threading.Thread] = []
        dispatch = one._dispatch

        def slow_dispatch(payload: Any) -> None:
            if threading.current_thread() in other_thread:
                time.sleep(0.3)  # read off the socket, handed over a little later
            dispatch(payload)

        one._dispatch = slow_dispatch
        leader = threading.Thread(target=futures[mine].get, daemon=True)
        other_thread.append(leader)
        leader.start()
        deadline = time.monotonic() + TIMEOUT
        while not one._read_lock.locked() and time.monotonic() < deadline:
            time.sleep(0.001)
        got: dict[str, Any] = {}

        def waiter() -> None:
            got["wait"] = droplet.wait([futures[first], futures[second]],
                                       return_when=droplet.FIRST_COMPLETED)

        waiting = threading.Thread(target=waiter, daemon=True)
        waiting.start()
        time.sleep(0.2)  # asleep in select() by now
        try:
            _GATES[first].set()
            waiting.join(10)
            assert not waiting.is_alive(), "wait slept through a reply that was in"
        finally:
            for event in _GATES.values():
                event.set()
            leader.join(TIMEOUT)
            waiting.join(TIMEOUT)
        done, not_done = got["wait"]
        assert futures[first] in done and futures[second] in not_done
        assert [f.get() for f in futures] == [0, 1, 2, 3]


async def test_closing_while_an_executor_is_being_dialled_leaves_nothing_running(
        autojump_clock: trio.testing.MockClock) -> None:
    """aclose() while a call dials its executor: the connection that dial opens
    afterwards is closed too, so a nursery the user owns still exits."""
    async with droplet.open_local_cluster(executors=1) as running:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                client = await AsyncDropletClient.connect(running.address, nursery,
                                                          token=running.token)
                f = await client.register(inc, "inc")
                dialling = trio.Event()
                dial = client._direct._dial

                async def slow(url: str) -> Any:
                    dialling.set()
                    await trio.sleep(1)
                    return await dial(url)

                client._direct._dial = slow  # type: ignore[method-assign]

                async def call() -> None:
                    with pytest.raises(droplet.DropletError):
                        await (await f(1)).get()

                nursery.start_soon(call)
                await dialling.wait()
                await client.aclose()
            # the nursery exited: the late connection was not left running in it
