"""Replies worker threads hold back under load and write many per system call.

Held replies (``held_replies.HeldReplies``) must reach each caller's own request, in
order, a failed call's error to its caller only, and never wait behind a call
that blocks.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.lowlevel

import droplet
from droplet.config import Config
from droplet.held_replies import HeldReplies, hold_replies
from droplet.node import Node, serve_node
from droplet.protocol.messages import DagResult, ErrorReply
from droplet.protocol.messages import decode as decode_message
from droplet.rpc import Peer
from droplet.transports import tcp
from droplet.transports.base import TransportOptions
from droplet.transports.tcp import StreamConnection

TIMEOUT = 30


def odd_fails(_: Any, x: int) -> int:
    if x % 7 == 3:
        raise ValueError(f"bad {x}")
    return x * 10


_GATE = threading.Event()


def gate_or_echo(_: Any, x: int) -> int:
    if x < 0:
        _GATE.wait(TIMEOUT)
    return x


@pytest.fixture
async def node_url() -> AsyncIterator[str]:
    """A node with one executor (all calls on one worker pool), over loopback TCP."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            main: Node = await nursery.start(functools.partial(serve_node, Config(
                listen="tcp://127.0.0.1:0", executors=0)))
            await nursery.start(functools.partial(serve_node, Config(
                role="executor", listen="tcp://127.0.0.1:0", scheduler=main.url)))
            yield main.url
            nursery.cancel_scope.cancel()


def _many_calls(url: str, n: int) -> list[Any]:
    with droplet.DropletConnection(url) as conn:
        f = conn.register(odd_fails, "odd_fails")
        f(0).get()  # warm: loaded, placement cached, direct calls
        futures = [f(i) for i in range(n)]
        out: list[Any] = []
        for future in futures:
            try:
                out.append(future.get(timeout=TIMEOUT))
            except droplet.FunctionError as exc:
                out.append(str(exc))
        return out


async def test_many_concurrent_calls_each_get_their_own_reply_or_error(node_url: str) -> None:
    n = 600
    with trio.fail_after(TIMEOUT * 2):
        out = await trio.to_thread.run_sync(_many_calls, node_url, n)
    for i, got in enumerate(out):
        if i % 7 == 3:
            assert isinstance(got, str) and f"bad {i}" in got
        else:
            assert got == i * 10


def _blocked_then_others(url: str) -> list[int]:
    with droplet.DropletConnection(url) as conn:
        f = conn.register(gate_or_echo, "gate_or_echo")
        f(0).get()
        quick = [f(i) for i in range(1, 40)]
        blocked = f(-1)
        after = [f(i) for i in range(40, 80)]
        # Replies held while the blocked call started come out without it.
        got = [q.get(timeout=TIMEOUT) for q in quick + after]
        _GATE.set()
        got.append(blocked.get(timeout=TIMEOUT))
        return got


async def test_held_replies_do_not_wait_behind_a_call_that_blocks(node_url: str) -> None:
    _GATE.clear()
    try:
        with trio.fail_after(TIMEOUT * 2):
            got = await trio.to_thread.run_sync(_blocked_then_others, node_url)
        assert got == [*range(1, 80), -1]
    finally:
        _GATE.set()


# --------------------------------------------------------------------------- units


async def _pair() -> tuple[Peer, StreamConnection, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    conn = StreamConnection(client, "tcp://peer", TransportOptions())
    return Peer(conn), StreamConnection(server, "tcp://them", TransportOptions()), server


async def test_held_replies_go_out_in_one_write_in_order() -> None:
    peer, receiver, _ = await _pair()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run)
            await trio.lowlevel.checkpoint()  # peer.run records the loop's token
            for _ in range(1, 11):  # requests 1..10 in flight, as a server would have
                await peer._inflight.acquire()

            def worker() -> None:
                held = HeldReplies()
                hold_replies(held)
                try:
                    for i in range(1, 11):
                        msg: Any = (ErrorReply("FunctionError", f"call {i} failed")
                                    if i == 4 else DagResult(f"run{i}", b"v%d" % i, False))
                        assert peer.write_from_thread(msg, i, reply=True)
                    assert held  # nothing written yet
                finally:
                    hold_replies(None)
                held.flush()
                assert not held

            await trio.to_thread.run_sync(worker)
            got = [decode_message(await receiver.receive()) for _ in range(10)]
            assert [request_id for _, request_id, _ in got] == list(range(1, 11))
            assert all(is_reply for _, _, is_reply in got)
            assert type(got[3][0]) is ErrorReply and got[3][0].message == "call 4 failed"
            assert [m.value for m, _, _ in got if type(m) is DagResult] == [
                b"v%d" % i for i in range(1, 11) if i != 4]
            # Every reply freed its request's in-flight slot.
            peer._collect_released()
            assert peer._inflight.value == 10_000  # Limits().max_inflight
            nursery.cancel_scope.cancel()
    await receiver.aclose()


async def test_held_replies_the_thread_path_refuses_go_through_the_loop() -> None:
    peer, receiver, _ = await _pair()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run)
            await trio.lowlevel.checkpoint()
            # Too much for one thread write: the loop's writer sends them, in order.
            frames = [b"x" * (tcp.BIG_FRAME // 3) + bytes([i]) for i in range(4)]
            await trio.to_thread.run_sync(peer._write_held, frames)
            for i in range(4):
                assert bytes(await receiver.receive()) == frames[i]
            nursery.cancel_scope.cancel()
    await receiver.aclose()


def test_a_full_hold_writes_itself() -> None:
    written: list[list[bytes]] = []

    class FakePeer:
        def _write_held(self, frames: list[bytes]) -> None:
            written.append(frames)

    held = HeldReplies()
    fake: Any = FakePeer()
    for i in range(200):
        held.add(fake, b"%d" % i)
    held.flush()
    assert [f for batch in written for f in batch] == [b"%d" % i for i in range(200)]
    assert len(written) >= 3  # flushed when full (HOLD_FRAMES), not only at the end
