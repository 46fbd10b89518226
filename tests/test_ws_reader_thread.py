"""A plain ``ws://`` connection read by a thread of its own (``transports/threadread.py``):
the WebSocket rules hold there as on the loop (pongs, close frames, refusals with
their close codes, the frame limit, the slowloris timeout), and an executor's calls
over ``ws://`` run in that thread.

Socket tests: each runs under a ``trio.fail_after`` guard, on loopback.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

import droplet
from droplet.config import Config
from droplet.errors import ProtocolError
from droplet.node import Node, serve_node
from droplet.protocol.wsframes import OP_CLOSE, OP_PING, OP_PONG, encode_frame
from droplet.transports import tcp, threadread
from droplet.transports.base import TransportOptions
from droplet.transports.websocket import WebSocketConnection

TIMEOUT = 30


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("droplet-reader ")]


async def _until(check: Callable[[], bool]) -> None:
    while not check():  # noqa: ASYNC110 (threads to wait for; nothing to await)
        await trio.sleep(0.01)


def _masked(payload: bytes, opcode: int = 0x2) -> bytes:
    """A client's frame (masked, as a client must)."""
    return bytes(encode_frame(payload, opcode, masked=True))


class _Far:
    """The far (client) end: raw bytes out, the server's unmasked frames in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def frame(self) -> tuple[int, bytes]:
        """The next frame: (opcode, payload); EOFError when the server hung up."""
        while True:
            if len(self.buf) >= 2:
                opcode, size, start = self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
                assert not self.buf[1] & 0x80, "a server's frame must not be masked"
                if size == 126:
                    size, start = (struct.unpack_from(">H", self.buf, 2)[0]
                                   if len(self.buf) >= 4 else 1 << 62), 4
                elif size == 127:
                    size, start = (struct.unpack_from(">Q", self.buf, 2)[0]
                                   if len(self.buf) >= 10 else 1 << 62), 10
                if len(self.buf) >= start + size:
                    payload = self.buf[start:start + size]
                    self.buf = self.buf[start + size:]
                    return opcode, payload
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                raise EOFError(f"hung up with {self.buf!r} left")
            self.buf += data

    async def close_code(self) -> tuple[int, str]:
        """Skips to the server's close frame: its code and reason; then the hang-up."""
        while True:
            opcode, payload = await self.frame()
            if opcode == OP_CLOSE:
                code = struct.unpack_from(">H", payload)[0]
                with pytest.raises(EOFError):
                    await self.frame()
                return code, payload[2:].decode()


async def _pair(**options: Any) -> tuple[WebSocketConnection, _Far]:
    """A server-side WebSocketConnection past its upgrade, and the raw far end."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    far = await trio.open_tcp_stream("127.0.0.1", port)
    near = await listeners[0].accept()
    await listeners[0].aclose()
    conn = WebSocketConnection(near, "ws://them", TransportOptions(**options), client=False)
    return conn, _Far(far)


def _start(conn: WebSocketConnection, offer: Any = None) -> None:
    assert conn.thread_reads
    assert conn.read_in_thread(offer or (lambda f, inline: False),
                               trio.lowlevel.current_trio_token())


async def test_frames_not_taken_reach_the_loop_in_order() -> None:
    conn, far = await _pair()
    taken: list[bytes] = []

    def offer(f: Any, inline: bool) -> bool:
        if bytes(f).startswith(b"take"):
            taken.append(bytes(f))
            return True
        return False

    with trio.fail_after(TIMEOUT):
        _start(conn, offer)
        frames = [(b"take" if i % 3 == 0 else b"loop") + str(i).encode() for i in range(300)]
        # (fragments and a ping in between: one message each, a pong owed)
        wire = b"".join(_masked(f) for f in frames[:-1])
        wire += _masked(b"", OP_PING)
        last = frames[-1]
        wire += bytes([0x02, 0x80 | 3]) + b"\0\0\0\0" + last[:3]  # first fragment
        wire += bytes([0x80, 0x80 | (len(last) - 3)]) + b"\0\0\0\0" + last[3:]
        await far.stream.send_all(wire)
        got = [bytes(await conn.receive()) for _ in range(200)]
        assert got == [f for f in frames if f.startswith(b"loop")]
        assert taken == [f for f in frames if f.startswith(b"take")]
        assert await far.frame() == (OP_PONG, b"")  # written by the reader thread
        await conn.aclose()
        assert await far.close_code() == (1000, "")
        await _until(lambda: not _reader_threads())
        await far.stream.aclose()


async def test_after_the_thread_gives_the_reading_back_the_loop_answers_pings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp, "THREAD_RETRY_AFTER", 1000)
    conn, far = await _pair()
    with trio.fail_after(TIMEOUT):
        _start(conn)  # (takes nothing: gives the reading back after a few frames)
        frames = [b"m%d" % i for i in range(threadread.HAND_BACK_AFTER + 2)]
        await far.stream.send_all(b"".join(_masked(f) for f in frames))
        assert [bytes(await conn.receive()) for _ in frames] == frames
        assert conn._reader is None
        await _until(lambda: not _reader_threads())
        await far.stream.send_all(_masked(b"loop?", OP_PING) + _masked(b"after"))
        assert bytes(await conn.receive()) == b"after"
        assert await far.frame() == (OP_PONG, b"loop?")  # written by receive, on the loop
        await conn.aclose()
        assert await far.close_code() == (1000, "")
        await far.stream.aclose()


async def test_a_ping_is_answered_while_a_call_runs_in_the_reader_thread() -> None:
    """The thread runs a call (which waits, so another thread takes over the
    reading); a ping meanwhile gets its pong at once, before the call's reply."""
    conn, far = await _pair()
    release = threading.Event()
    ran_in: list[str] = []

    def call() -> None:
        ran_in.append(threading.current_thread().name)
        release.wait(TIMEOUT)
        assert conn.send_from_thread(b"reply") == tcp.SENT

    def offer(f: Any, inline: bool) -> bool | Callable[[], None]:
        return call if bytes(f) == b"call" and inline else False

    with trio.fail_after(TIMEOUT):
        _start(conn, offer)
        await far.stream.send_all(_masked(b"call"))
        await _until(lambda: bool(ran_in))
        assert ran_in[0].startswith("droplet-reader ")
        await far.stream.send_all(_masked(b"are you there", OP_PING))
        assert await far.frame() == (OP_PONG, b"are you there")
        release.set()
        assert await far.frame() == (0x2, b"reply")
        await far.stream.send_all(_masked(b"after"))
        assert bytes(await conn.receive()) == b"after"
        await conn.aclose()
        assert await far.close_code() == (1000, "")
        await _until(lambda: not _reader_threads())
        await far.stream.aclose()


async def test_a_pong_the_socket_will_not_take_now_goes_out_from_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader thread's pong meets a full socket (here: its write says so): the
    loop's writer sends it, and a frame a worker thread writes after it waits its turn."""
    conn, far = await _pair()
    write = os.write
    refused: list[bytes] = []

    def full_for_pongs(fd: int, data: Any) -> int:
        if fd == conn._fd and bytes(data[:1]) == b"\x8a" and not refused:
            refused.append(bytes(data))
            raise BlockingIOError
        return write(fd, data)

    monkeypatch.setattr(tcp.os, "write", full_for_pongs)
    with trio.fail_after(TIMEOUT):
        _start(conn)
        await far.stream.send_all(_masked(b"hello?", OP_PING))
        assert await far.frame() == (OP_PONG, b"hello?")  # the loop's writer sent it
        assert refused  # (the thread tried first)
        assert conn.send_from_thread(b"next") == tcp.SENT
        assert await far.frame() == (0x2, b"next")
        await conn.aclose()
        await _until(lambda: not _reader_threads())
        await far.stream.aclose()


@pytest.mark.parametrize(("code", "raised", "message"), [
    (1000, trio.EndOfChannel, "^$"),
    (1001, trio.EndOfChannel, "^$"),
    (4001, trio.BrokenResourceError, r"closed the connection with code 4001 \(gone fishing\)"),
])
async def test_a_close_frame_from_the_peer_is_answered_and_ends_the_connection(
        code: int, raised: type[BaseException], message: str) -> None:
    conn, far = await _pair()
    with trio.fail_after(TIMEOUT):
        _start(conn)
        reason = b"gone fishing" if code == 4001 else b""
        await far.stream.send_all(_masked(b"last") + _masked(struct.pack(">H", code) + reason,
                                                             OP_CLOSE))
        assert bytes(await conn.receive()) == b"last"
        with pytest.raises(raised, match=message):
            await conn.receive()
        with pytest.raises(raised):  # and ever after
            await conn.receive()
        assert (await far.close_code())[0] == code  # the close echoed, then the hang-up
        with pytest.raises(trio.ClosedResourceError):
            conn.send_from_thread(b"too late")
        await conn.aclose()
        await _until(lambda: not _reader_threads())
        await far.stream.aclose()


@pytest.mark.parametrize(("wire", "code", "message"), [
    (_masked(b"hello", 0x1), 1003, "a text message"),
    (bytes([0x82, 0x05]) + b"plain", 1002, "an unmasked frame"),
    (bytes([0x82, 0x80 | 127]) + struct.pack(">Q", 5000) + b"\0\0\0\0" + b"x" * 10,
     1009, "over max_frame_size=1000"),
    (bytes([0xC2, 0x80]) + b"\0\0\0\0", 1002, "reserved bit"),
], ids=["text", "unmasked", "oversize", "reserved-bit"])
async def test_a_broken_rule_gets_its_close_code(wire: bytes, code: int, message: str) -> None:
    conn, far = await _pair(max_frame_size=1000)
    with trio.fail_after(TIMEOUT):
        _start(conn)
        await far.stream.send_all(_masked(b"fine") + wire)
        assert bytes(await conn.receive()) == b"fine"
        with pytest.raises(ProtocolError, match=message):
            await conn.receive()
        got, reason = await far.close_code()
        assert got == code and reason
        await conn.aclose()
        await _until(lambda: not _reader_threads())
        await far.stream.aclose()


async def test_the_lowered_limit_holds_in_the_thread() -> None:
    """``limit_incoming`` (the pre-authentication limit) applies to what the thread reads."""
    conn, far = await _pair(max_frame_size=1 << 20)
    conn.limit_incoming(100)
    with trio.fail_after(TIMEOUT):
        _start(conn)
        await far.stream.send_all(_masked(b"x" * 100) + _masked(b"x" * 101))
        assert bytes(await conn.receive()) == b"x" * 100
        with pytest.raises(ProtocolError, match="max_frame_size=100"):
            await conn.receive()
        assert (await far.close_code())[0] == 1009
        await conn.aclose()
        await _until(lambda: not _reader_threads())
        await far.stream.aclose()


async def test_a_message_left_unfinished_aborts_the_connection() -> None:
    conn, far = await _pair(read_timeout=0.3)
    with trio.fail_after(TIMEOUT):
        _start(conn)
        await far.stream.send_all(_masked(b"whole") + _masked(b"half a message")[:9])
        assert bytes(await conn.receive()) == b"whole"
        with pytest.raises(ProtocolError, match="left a frame unfinished for 0.3 s"):
            await conn.receive()
        with pytest.raises(EOFError):  # aborted: no close frame, just the hang-up
            await far.frame()
        await conn.aclose()
        await _until(lambda: not _reader_threads())
        await far.stream.aclose()


async def test_the_peer_hanging_up_without_a_close_frame_is_broken() -> None:
    conn, far = await _pair()
    with trio.fail_after(TIMEOUT):
        _start(conn)
        await far.stream.send_all(_masked(b"bye?"))
        await far.stream.aclose()
        assert bytes(await conn.receive()) == b"bye?"
        with pytest.raises(trio.BrokenResourceError, match="went away without a close frame"):
            await conn.receive()
        await conn.aclose()
        await _until(lambda: not _reader_threads())


async def test_aclose_while_the_thread_waits_says_goodbye_and_ends_it() -> None:
    conn, far = await _pair()
    with trio.fail_after(TIMEOUT):
        _start(conn)
        await _until(lambda: bool(_reader_threads()))
        await conn.aclose()
        assert await far.close_code() == (1000, "")
        await _until(lambda: not _reader_threads())
        with pytest.raises(trio.ClosedResourceError):
            await conn.receive()
        await far.stream.aclose()


async def test_wss_is_not_read_by_a_thread() -> None:
    """Only a plain socket can be read by a thread: a TLS stream stays on Trio."""
    a, b = trio.testing.memory_stream_pair()
    conn = WebSocketConnection(a, "wss://them", TransportOptions(), client=False)
    assert not conn.thread_reads
    assert not conn.read_in_thread(lambda f, inline: False, trio.lowlevel.current_trio_token())
    await conn.aclose()
    await b.aclose()


# --------------------------------------------------------------------------- an executor


def where(_: Any, x: Any) -> tuple[Any, str]:
    return x, threading.current_thread().name


@pytest.fixture
async def ws_node() -> AsyncIterator[Node]:
    """A KVS+scheduler node and one executor node, all over ``ws://``."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            main: Node = await nursery.start(functools.partial(serve_node, Config(
                listen="ws://127.0.0.1:0", executors=0)))
            await nursery.start(functools.partial(serve_node, Config(
                role="executor", listen="ws://127.0.0.1:0", scheduler=main.url)))
            yield main
            nursery.cancel_scope.cancel()
    await _until(lambda: not _reader_threads())


async def test_calls_over_ws_run_in_the_connections_reader_thread(ws_node: Node) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(ws_node.url) as cloud:
            f = await cloud.register(where, "where")
            results = [await (await f(i)).get() for i in range(20)]
            assert [x for x, _ in results] == list(range(20))
            assert any(name.startswith("droplet-reader ws://") for _, name in results)
