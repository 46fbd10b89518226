"""A plain-TCP connection read by a thread of its own (``transports/threadread.py``),
and the executor's calls run in that thread (the fast lane without a worker wakeup).

Socket tests: each runs under a ``trio.fail_after`` guard, on loopback.
"""

from __future__ import annotations

import functools
import logging
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

import droplet
from droplet.config import Config
from droplet.errors import ProtocolError
from droplet.executor import threads as worker_threads
from droplet.links import _client_handshake
from droplet.node import Node, serve_node
from droplet.protocol.framing import frame
from droplet.protocol.messages import ErrorReply
from droplet.protocol.messages import decode as decode_message
from droplet.testing.transport_checks import CHECKS
from droplet.transports import tcp, threadread
from droplet.transports.base import TransportOptions
from droplet.transports.tcp import StreamConnection, TcpTransport

TIMEOUT = 30
LEN = struct.Struct(">I")


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("droplet-reader ")]


async def _until(check: Callable[[], bool]) -> None:
    while not check():  # noqa: ASYNC110 (threads to wait for; nothing to await)
        await trio.sleep(0.01)


async def _pair(**options: Any) -> tuple[StreamConnection, trio.SocketStream]:
    """A StreamConnection (read by a thread, in the tests) and the raw far end."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    far = await trio.open_tcp_stream("127.0.0.1", port)
    near = await listeners[0].accept()
    await listeners[0].aclose()
    return StreamConnection(near, "tcp://them", TransportOptions(**options)), far


# --------------------------------------------------------------------------- the transport


async def test_frames_not_taken_reach_the_loop_in_order() -> None:
    conn, far = await _pair()
    taken: list[bytes] = []

    def offer(f: Any, inline: bool) -> bool:
        if bytes(f).startswith(b"take"):
            taken.append(bytes(f))
            return True
        return False

    with trio.fail_after(TIMEOUT):
        assert conn.read_in_thread(offer, trio.lowlevel.current_trio_token())
        frames = [(b"take" if i % 3 == 0 else b"loop") + str(i).encode() for i in range(300)]
        await far.send_all(b"".join(frame(f) for f in frames))
        got = [bytes(await conn.receive()) for _ in range(200)]
        assert got == [f for f in frames if f.startswith(b"loop")]
        assert taken == [f for f in frames if f.startswith(b"take")]
        await far.aclose()
        with pytest.raises(trio.EndOfChannel):
            await conn.receive()
        await conn.aclose()
        await _until(lambda: not _reader_threads())


async def test_a_thread_that_takes_nothing_gives_the_reading_back_and_tries_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp, "THREAD_RETRY_AFTER", 20)
    conn, far = await _pair()
    offered: list[bytes] = []

    def offer(f: Any, inline: bool) -> bool:
        offered.append(bytes(f))
        return bytes(f).startswith(b"take")

    with trio.fail_after(TIMEOUT):
        assert conn.read_in_thread(offer, trio.lowlevel.current_trio_token())
        frames = [b"loop%d" % i for i in range(threadread.HAND_BACK_AFTER + 10)]
        await far.send_all(b"".join(frame(f) for f in frames))
        assert [bytes(await conn.receive()) for _ in frames] == frames  # all, in order
        assert conn._reader is None  # given back after HAND_BACK_AFTER declined frames
        assert offered == frames[:threadread.HAND_BACK_AFTER]
        await _until(lambda: not _reader_threads())
        # 20 frames on Trio later, a thread reads again (and takes what it can).
        later = [b"trio%d" % i for i in range(19)] + [b"again", b"take me", b"last"]
        await far.send_all(b"".join(frame(f) for f in later))
        got = [bytes(await conn.receive()) for _ in range(len(later) - 1)]
        assert got == [f for f in later if f != b"take me"]
        assert conn._reader is not None and offered[-2:] == [b"take me", b"last"]
        await conn.aclose()
        await _until(lambda: not _reader_threads())
        await far.aclose()


async def test_a_long_inline_run_hands_the_reading_to_another_thread() -> None:
    """A callable run in the reader thread that waits (here, for a frame sent
    after it on the same connection) does not stop the connection being read."""
    conn, far = await _pair()
    release = threading.Event()
    ran_in: list[str] = []

    def blocked() -> None:
        ran_in.append(threading.current_thread().name)
        release.wait(TIMEOUT)

    def offer(f: Any, inline: bool) -> bool | Callable[[], None]:
        if bytes(f) == b"block":
            assert inline
            return blocked
        if bytes(f) == b"release":
            release.set()
            return True
        return False

    with trio.fail_after(TIMEOUT):
        assert conn.read_in_thread(offer, trio.lowlevel.current_trio_token())
        await far.send_all(frame(b"block"))
        await _until(lambda: bool(ran_in))
        await far.send_all(frame(b"after") + frame(b"release"))
        assert bytes(await conn.receive()) == b"after"
        await _until(release.is_set)
        assert ran_in[0].startswith("droplet-reader ")
        # The old thread stands by once its run returns; the new one reads on.
        await _until(lambda: conn._reader is not None and conn._reader._spare is not None)
        await far.send_all(frame(b"more"))
        assert bytes(await conn.receive()) == b"more"
        await conn.aclose()  # the thread, waiting in poll, wakes and exits
        await _until(lambda: not _reader_threads())
        await far.aclose()


async def test_a_handed_over_reader_that_runs_long_is_handed_over_again() -> None:
    """The first long run ends while the thread that took over runs a long one
    of its own: that one is handed over too (its mark is not the first's to clear)."""
    conn, far = await _pair()
    events = {b"1": threading.Event(), b"2": threading.Event()}
    running: list[bytes] = []

    def offer(f: Any, inline: bool) -> bool | Callable[[], None]:
        name = bytes(f)
        if name.startswith(b"block"):
            def run() -> None:
                running.append(name)
                events[name[-1:]].wait(TIMEOUT)
            return run
        if name.startswith(b"set"):
            events[name[-1:]].set()
            return True
        return False

    with trio.fail_after(TIMEOUT):
        assert conn.read_in_thread(offer, trio.lowlevel.current_trio_token())
        await far.send_all(frame(b"block1"))
        await _until(lambda: running == [b"block1"])
        await far.send_all(frame(b"set1") + frame(b"block2"))
        await _until(lambda: running == [b"block1", b"block2"])
        await far.send_all(frame(b"set2") + frame(b"after"))
        assert bytes(await conn.receive()) == b"after"
        assert events[b"2"].is_set()
        await conn.aclose()
        await _until(lambda: not _reader_threads())
        await far.aclose()


async def test_a_frame_over_the_limit_is_the_loops_protocol_error() -> None:
    conn, far = await _pair(max_frame_size=1000)
    with trio.fail_after(TIMEOUT):
        assert conn.read_in_thread(lambda f, inline: False,
                                   trio.lowlevel.current_trio_token())
        await far.send_all(frame(b"fine") + LEN.pack(5000) + b"x" * 100)
        assert bytes(await conn.receive()) == b"fine"
        with pytest.raises(ProtocolError, match="5000-byte frame; the limit is 1000"):
            await conn.receive()
        await _until(lambda: not _reader_threads())
        await conn.aclose()
        await far.aclose()


async def test_a_frame_left_unfinished_aborts_the_connection() -> None:
    conn, far = await _pair(read_timeout=0.3)
    with trio.fail_after(TIMEOUT):
        assert conn.read_in_thread(lambda f, inline: False,
                                   trio.lowlevel.current_trio_token())
        await far.send_all(frame(b"whole") + frame(b"half a frame")[:8])
        assert bytes(await conn.receive()) == b"whole"
        with pytest.raises(ProtocolError, match="left a frame unfinished for 0.3 s"):
            await conn.receive()
        assert await far.receive_some(100) == b""  # aborted: the far end sees the close
        await _until(lambda: not _reader_threads())
        await far.aclose()


async def test_the_end_of_the_stream_mid_frame_is_a_protocol_error() -> None:
    conn, far = await _pair()
    with trio.fail_after(TIMEOUT):
        assert conn.read_in_thread(lambda f, inline: False,
                                   trio.lowlevel.current_trio_token())
        await far.send_all(frame(b"cut short")[:6])
        await far.aclose()
        with pytest.raises(ProtocolError, match="closed the connection mid-frame"):
            await conn.receive()
        await conn.aclose()
        await _until(lambda: not _reader_threads())


async def test_only_so_many_connections_get_a_reader_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threadread, "MAX_READERS", 1)
    one, far_one = await _pair()
    two, far_two = await _pair()
    token = trio.lowlevel.current_trio_token()
    with trio.fail_after(TIMEOUT):
        assert one.read_in_thread(lambda f, inline: False, token)
        assert not two.read_in_thread(lambda f, inline: False, token)
        await far_two.send_all(frame(b"on trio"))
        assert bytes(await two.receive()) == b"on trio"  # read by the loop, as ever
        await one.aclose()
        await _until(lambda: not _reader_threads())
        three, far_three = await _pair()
        assert three.read_in_thread(lambda f, inline: False, token)  # a place came free
        for c in (two, three):
            await c.aclose()
        for s in (far_one, far_two, far_three):
            await s.aclose()
        await _until(lambda: not _reader_threads())


#: checks in which no connection receives anything.
NO_RECEIVE = {"connect_refused"}


@pytest.fixture
def threaded_tcp(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every plain-TCP (or plain ws) connection is read by a thread (taking nothing) from its
    first ``receive`` on; the list says which got one."""
    original = StreamConnection.receive
    started: list[bool] = []

    async def receive(self: StreamConnection) -> bytes | memoryview:
        if self.thread_reads and not getattr(self, "_tried_thread", False):
            self._tried_thread = True  # type: ignore[attr-defined]
            started.append(self.read_in_thread(lambda f, inline: False,
                                               trio.lowlevel.current_trio_token()))
        return await original(self)

    monkeypatch.setattr(StreamConnection, "receive", receive)
    return started


@pytest.mark.parametrize("scheme", ["tcp", "ws"])
@pytest.mark.parametrize("check", list(CHECKS))
async def test_the_transport_conformance_suite_with_reader_threads(
        threaded_tcp: list[bool], check: str, scheme: str) -> None:
    """Plain TCP and plain WebSocket connections (both ends), read by threads."""
    with trio.fail_after(10):
        await CHECKS[check](f"{scheme}://127.0.0.1:0", TransportOptions(), TransportOptions())
    await _until(lambda: not _reader_threads())
    if check not in NO_RECEIVE:
        assert any(threaded_tcp), "no connection was read by a thread"


# --------------------------------------------------------------------------- an executor


def where(_: Any, x: Any) -> tuple[Any, str]:
    return x, threading.current_thread().name


_GATE = threading.Event()


def gated(_: Any, x: Any) -> tuple[Any, str]:
    _GATE.wait(TIMEOUT)
    return x, threading.current_thread().name


def boom(_: Any, x: Any) -> Any:
    raise ValueError(f"boom {x}")


def waiter(lib: Any, key: str) -> Any:
    """Publishes its id, then waits for mail (sent by a call made after this one)."""
    lib.put(key, lib.getid())
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        messages = lib.recv()
        if messages:
            return [m for _, m in messages]
        time.sleep(0.002)
    raise AssertionError("no message arrived")


def mailer(lib: Any, key: str) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        dest = lib.get(key)
        if dest is not None:
            lib.send(dest, b"ping")
            return "sent"
        time.sleep(0.002)
    raise AssertionError("the waiter never published its id")


class _One:
    def __init__(self, main: Node, worker: Node) -> None:
        self.url = main.url
        self.executor = worker.executors[0]
        self.executor_url = worker.url


@pytest.fixture
async def one() -> AsyncIterator[_One]:
    """A KVS+scheduler node and one executor node over loopback TCP."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            main: Node = await nursery.start(functools.partial(serve_node, Config(
                listen="tcp://127.0.0.1:0", executors=0)))
            worker: Node = await nursery.start(functools.partial(serve_node, Config(
                role="executor", listen="tcp://127.0.0.1:0", scheduler=main.url,
                read_timeout=1.0, max_frame_size=1 << 20)))
            yield _One(main, worker)
            nursery.cancel_scope.cancel()
    await _until(lambda: not _reader_threads())


async def test_a_call_runs_in_the_connections_reader_thread(one: _One) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(one.url) as cloud:
            f = await cloud.register(where, "where")
            results = [await (await f(i)).get() for i in range(20)]
            assert [x for x, _ in results] == list(range(20))
            # Sequential calls: each ran where its trigger was read.
            assert any(name.startswith("droplet-reader ") for _, name in results)
            bad = await cloud.register(boom, "boom")
            for i in range(3):
                with pytest.raises(droplet.FunctionError, match=f"boom {i}"):
                    await (await bad(i)).get()
            await _until(lambda: one.executor.statistics().failures >= 3)
            assert one.executor.statistics().fast_calls >= 20


def named(_: Any, x: Any) -> tuple[Any, str]:
    return x, threading.current_thread().name


def tagged(_: Any, x: Any, first: str) -> tuple[Any, str, str]:
    return x, first, threading.current_thread().name  # (a tuple result splats)


async def test_a_dag_across_two_executors_runs_in_their_reader_threads() -> None:
    """The second function's trigger comes over the first executor's connection
    to the second, whose reader thread runs it."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            main: Node = await nursery.start(functools.partial(serve_node, Config(
                listen="tcp://127.0.0.1:0", executors=0, placement="spread")))
            workers = [await nursery.start(functools.partial(serve_node, Config(
                role="executor", listen="tcp://127.0.0.1:0", scheduler=main.url)))
                for _ in range(2)]
            async with droplet.open_client(main.url) as cloud:
                await cloud.register(named, "named")
                await cloud.register(tagged, "tagged")
                await cloud.register_dag("nt", ["named", "tagged"], [("named", "tagged")])
                results = [await (await cloud.call_dag("nt", {"named": i})).get()
                           for i in range(20)]
            assert [r[0] for r in results] == list(range(20))
            assert any(r[2].startswith("droplet-reader ") for r in results)
            assert all(w.executors[0].statistics().fast_calls > 0 for w in workers)
            nursery.cancel_scope.cancel()


async def test_a_blocked_call_does_not_block_the_next_on_its_connection(one: _One) -> None:
    _GATE.clear()
    try:
        with trio.fail_after(TIMEOUT):
            async with droplet.open_client(one.url) as cloud:
                slow = await cloud.register(gated, "gated")
                f = await cloud.register(where, "where")
                await (await f(0)).get()
                stuck = await slow("first")
                await trio.sleep(0.05)  # it runs (and blocks) in the reader thread by now
                assert [(await (await f(i)).get())[0] for i in range(5)] == list(range(5))
                _GATE.set()
                value, name = await stuck.get()
                assert value == "first" and name.startswith("droplet-reader ")
    finally:
        _GATE.set()


async def test_mail_between_calls_on_one_connection(one: _One) -> None:
    """The waiter runs in the reader thread and waits for mail from a call sent
    after it on the same connection: the reading goes on in another thread."""
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(one.url) as cloud:
            wait = await cloud.register(waiter, "waiter")
            send = await cloud.register(mailer, "mailer")
            for run in range(3):
                key = f"rendezvous_{run}"
                waiting = await wait(key)
                sent = await send(key)
                assert await sent.get() == "sent"
                assert await waiting.get() == [b"ping"]


_RUNNING = [0, 0]  # running now, most at once
_COUNT_LOCK = threading.Lock()


def counted(_: Any, x: Any) -> Any:
    with _COUNT_LOCK:
        _RUNNING[0] += 1
        _RUNNING[1] = max(_RUNNING[1], _RUNNING[0])
    try:
        _GATE.wait(TIMEOUT)
    finally:
        with _COUNT_LOCK:
            _RUNNING[0] -= 1
    return x


async def test_max_inflight_holds_for_calls_a_reader_thread_takes() -> None:
    """A caller at ``max_inflight`` requests in service waits for a slot, whether
    its calls were taken by the reader thread or by the read loop."""
    _GATE.clear()
    _RUNNING[:] = [0, 0]
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                main: Node = await nursery.start(functools.partial(serve_node, Config(
                    listen="tcp://127.0.0.1:0", executors=0)))
                await nursery.start(functools.partial(serve_node, Config(
                    role="executor", listen="tcp://127.0.0.1:0", scheduler=main.url,
                    max_inflight=2)))
                async with droplet.open_client(main.url) as cloud:
                    f = await cloud.register(counted, "counted")
                    _GATE.set()
                    assert await (await f(-1)).get() == -1  # warm
                    _GATE.clear()
                    _RUNNING[:] = [0, 0]
                    futures = [await f(i) for i in range(5)]
                    await _until(lambda: _RUNNING[0] == 2)
                    await trio.sleep(0.1)  # more would have started by now
                    assert _RUNNING[1] == 2
                    _GATE.set()
                    assert [await fut.get() for fut in futures] == list(range(5))
                nursery.cancel_scope.cancel()
    finally:
        _GATE.set()


async def _raw_executor_connection(one: _One) -> Any:
    conn = await TcpTransport().connect(one.executor_url, TransportOptions(), None)  # type: ignore[arg-type]
    await _client_handshake(conn, one.executor_url, None)
    return conn


async def _goodbye(conn: Any) -> ErrorReply:
    """The executor's goodbye (an ErrorReply with request id 0), then the close."""
    while True:
        try:
            msg, request_id, is_reply = decode_message(bytes(await conn.receive()))
        except (trio.EndOfChannel, trio.BrokenResourceError) as exc:
            raise AssertionError("closed without a goodbye") from exc
        if is_reply and not request_id and type(msg) is ErrorReply:
            return msg


@pytest.mark.parametrize("bad", ["oversize", "garbage"])
async def test_bad_frames_to_a_threaded_connection_get_the_loops_answer(
        one: _One, bad: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(one.url) as cloud:
            f = await cloud.register(where, "where")
            await (await f(0)).get()
            before = len(_reader_threads())
            conn = await _raw_executor_connection(one)
            await _until(lambda: len(_reader_threads()) > before)
            if bad == "oversize":
                await conn._stream.send_all(LEN.pack(2 << 20) + b"x" * 64)
                expected = "the limit is 1048576"
            else:
                await conn._stream.send_all(frame(b"\xff" * 40))
                expected = ""
            goodbye = await _goodbye(conn)
            assert goodbye.kind == "ProtocolError" and expected in goodbye.message
            with pytest.raises((trio.EndOfChannel, trio.BrokenResourceError)):
                while True:
                    await conn.receive()
            await conn.aclose()
            assert (await (await f(1)).get())[0] == 1  # the executor serves on


async def test_a_half_frame_to_a_threaded_connection_times_out(one: _One) -> None:
    with trio.fail_after(TIMEOUT):
        before = len(_reader_threads())
        conn = await _raw_executor_connection(one)
        await _until(lambda: len(_reader_threads()) > before)
        await conn._stream.send_all(frame(b"x" * 100)[:20])
        with pytest.raises((trio.EndOfChannel, trio.BrokenResourceError)):
            while True:  # the executor hangs up after read_timeout (1 s)
                await conn.receive()
        await conn.aclose()
        async with droplet.open_client(one.url) as cloud:
            f = await cloud.register(where, "where")
            assert (await (await f(1)).get())[0] == 1


async def test_shutdown_with_a_call_still_running_in_a_reader_thread(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The executor shuts down; a call still running in a reader thread gets the
    grace period a worker's gets, then is named (and its thread left to end)."""
    monkeypatch.setattr(worker_threads, "SHUTDOWN_GRACE", 0.3)
    _GATE.clear()
    try:
        with trio.fail_after(TIMEOUT), caplog.at_level(logging.WARNING,
                                                       logger="droplet.executor"):
            async with trio.open_nursery() as nursery:
                main: Node = await nursery.start(functools.partial(serve_node, Config(
                    listen="tcp://127.0.0.1:0", executors=0)))
                await nursery.start(functools.partial(serve_node, Config(
                    role="executor", listen="tcp://127.0.0.1:0", scheduler=main.url)))
                async with droplet.open_client(main.url) as cloud:
                    slow = await cloud.register(gated, "gated")
                    await slow("blocked")
                    await _until(lambda: bool(_reader_threads()))
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()  # the executor goes, its call still running
            assert "gated is still running 0.3 s" in caplog.text
            _GATE.set()
            await _until(lambda: not _reader_threads())
    finally:
        _GATE.set()


async def test_no_reader_thread_without_the_fast_lane(one: _One) -> None:
    """An executor whose fast lane is off serves every frame from its read loop
    (a connection opened while it is off starts no reader thread)."""
    ex = one.executor
    lane = ex.fast_lane
    ex.fast_lane = None
    try:
        assert ex.messages_in_reader == ()
        before = len(_reader_threads())
        with trio.fail_after(TIMEOUT):
            async with droplet.open_client(one.url) as cloud:
                f = await cloud.register(where, "where")
                results = [await (await f(i)).get() for i in range(5)]
                assert [x for x, _ in results] == list(range(5))
                assert not any(n.startswith("droplet-reader ") for _, n in results)
                assert len(_reader_threads()) == before
    finally:
        ex.fast_lane = lane


async def test_calls_running_from_reader_threads_count_towards_the_invocation_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The executor's invocation limit counts the fast-lane calls reader threads
    started: a call past it on the ordinary path is refused as overloaded."""
    from droplet.executor import service as executor_service

    monkeypatch.setattr(executor_service, "MAX_INVOCATIONS", 2)
    _GATE.clear()
    _RUNNING[:] = [0, 0]
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                main: Node = await nursery.start(functools.partial(serve_node, Config(
                    listen="tcp://127.0.0.1:0", executors=0)))
                worker: Node = await nursery.start(functools.partial(serve_node, Config(
                    role="executor", listen="tcp://127.0.0.1:0", scheduler=main.url)))
                async with droplet.open_client(main.url) as cloud:
                    f = await cloud.register(counted, "counted")
                    _GATE.set()
                    assert await (await f(-1)).get() == -1  # warm: placed, loaded
                    _GATE.clear()
                    futures = [await f(i) for i in range(2)]
                    await _until(lambda: _RUNNING[0] == 2)
                    assert worker.executors[0].fast_lane.t_active == 2  # type: ignore[union-attr]
                    third = await f(2)
                    with pytest.raises(droplet.DropletError, match="overloaded"):
                        await third.get(timeout=5)  # (not run: it would wait for the gate)
                    assert _RUNNING[1] == 2
                    _GATE.set()
                    assert [await fut.get() for fut in futures] == [0, 1]
                nursery.cancel_scope.cancel()
    finally:
        _GATE.set()


class _RacySlots:
    """A Peer's in-flight semaphore whose ``acquire_nowait`` first lets another
    thread run ``between()`` (a reader thread's offer, at the worst moment)."""

    def __init__(self, inner: trio.Semaphore, between: Callable[[], None]) -> None:
        self._inner = inner
        self._between = between

    @property
    def value(self) -> int:
        return self._inner.value

    def acquire_nowait(self) -> None:
        racer = threading.Thread(target=self._between)
        racer.start()
        racer.join(0.5)  # (blocked on the Peer's slot lock: it goes on afterwards)
        self._inner.acquire_nowait()

    def release(self) -> None:
        self._inner.release()


async def test_the_read_loop_and_a_reader_thread_never_both_take_the_last_slot() -> None:
    """``max_inflight``: the read loop's check for a free slot and its taking of it
    are one step for the reader thread, which borrows slots meanwhile."""
    from droplet.protocol.messages import ListFunctions
    from droplet.protocol.messages import encode as encode_message
    from droplet.rpc import Limits, Peer

    conn, far = await _pair()
    offered: list[Any] = []

    async def handler(peer: Peer, msg: Any, request_id: int) -> Any:
        return None

    def in_reader(peer: Peer, msg: Any, request_id: int, inline: bool) -> bool:
        return True  # taken: answered later, from a thread

    with trio.fail_after(TIMEOUT):
        peer = Peer(conn, handler, limits=Limits(max_inflight=1), in_reader=in_reader)
        request = encode_message(ListFunctions(), 7)
        inner = peer._inflight
        peer._inflight = _RacySlots(  # type: ignore[assignment]
            inner, lambda: offered.append(peer._take_in_reader(request, False)))
        await peer._acquire_inflight()  # the loop takes the only slot
        while not offered:  # noqa: ASYNC110 (a thread to wait for)
            await trio.sleep(0.01)
        in_service = (1 - inner.value) + peer._borrowed
        assert offered == [False]  # at the limit: the read loop gets it, in order
        assert in_service == 1
        await conn.aclose()
        await far.aclose()


async def test_no_reader_thread_lingers_after_the_reading_was_given_back() -> None:
    conn, far = await _pair()
    release = threading.Event()
    ran: list[str] = []
    reader: threadread.ThreadReader | None = None

    def blocked() -> None:
        ran.append(threading.current_thread().name)
        release.wait(TIMEOUT)

    def offer(f: Any, inline: bool) -> bool | Callable[[], None]:
        return blocked if bytes(f) == b"block" else False

    try:
        with trio.fail_after(TIMEOUT):
            assert conn.read_in_thread(offer, trio.lowlevel.current_trio_token())
            reader = conn._reader
            await far.send_all(frame(b"block"))
            await _until(lambda: bool(ran) and len(_reader_threads()) == 2)  # taken over
            frames = [b"loop%d" % i for i in range(threadread.HAND_BACK_AFTER)]
            await far.send_all(b"".join(frame(f) for f in frames))
            assert [bytes(await conn.receive()) for _ in frames] == frames
            await far.send_all(frame(b"on trio"))
            assert bytes(await conn.receive()) == b"on trio"
            assert conn._reader is None  # given back to Trio
            release.set()  # the first thread's run returns
        with trio.fail_after(5):  # (SPARE_IDLE is 60 s)
            await _until(lambda: not _reader_threads())
    finally:
        release.set()
        if reader is not None:
            reader.close()  # (ends the lingering spare: later tests count reader threads)
        await conn.aclose()
        await far.aclose()
