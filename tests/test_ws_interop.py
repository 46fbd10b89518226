"""Droplet's ``ws://`` and ``wss://`` against independent WebSocket implementations.

The transport parses and builds its own frames (:mod:`droplet.protocol.wsframes`),
so these tests hold it to RFC 6455 with peers it shares no frame code with:
trio-websocket's client and server (wsproto underneath), and wsproto driven by
hand for fragmented messages and pings between fragments. Masking is checked
both ways: a server (wsproto) refuses unmasked client frames, and a client
refuses masked server frames.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from droplet.errors import ProtocolError
from droplet.transports import Connection, TransportOptions, get_transport, parse_address
from droplet.transports.tcp import StreamConnection

TIMEOUT = 10


@pytest.fixture(autouse=True, params=["loop", "thread"])
def reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test twice: our connections read by the loop, and (plain ``ws://``)
    by a reader thread from their first ``receive`` on (``read_in_thread``, as an
    executor's are), which then answers the pings and close frames. (A plain
    fixture: its teardown runs after the test's Trio run, threads may still end.)"""
    if request.param == "loop":
        yield "loop"
        return
    original = StreamConnection.receive
    started: list[bool] = []

    async def receive(self: StreamConnection) -> bytes | memoryview:
        if self.thread_reads and not getattr(self, "_tried_thread", False):
            self._tried_thread = True  # type: ignore[attr-defined]
            started.append(self.read_in_thread(lambda f, inline: False,
                                               trio.lowlevel.current_trio_token()))
        return await original(self)

    monkeypatch.setattr(StreamConnection, "receive", receive)
    yield "thread"
    if "wss" not in request.node.name:
        assert any(started), "no connection was read by a thread"
    deadline = time.monotonic() + TIMEOUT
    while any(t.name.startswith("droplet-reader ") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a reader thread did not end"
        time.sleep(0.01)


OPTIONS = TransportOptions(max_frame_size=4 * 1024 * 1024)
#: Messages of every header size: empty, 7-bit, 16-bit and 64-bit lengths, and
#: one big enough to be received into a buffer of its own (then unmasked there).
MESSAGES = [b"", b"x", bytes(range(256)) * 300, bytes(range(251)) * 1200 + b"tail"]


@asynccontextmanager
async def echo_listener(
    url: str, options: TransportOptions = OPTIONS,
) -> AsyncIterator[tuple[str, trio.MemoryReceiveChannel[object]]]:
    """Our listener: echoes frames, reports each frame and how receive ended."""
    send, receive = trio.open_memory_channel[object](100)

    async def handler(conn: Connection) -> None:
        while True:
            try:
                frame = await conn.receive()
            except Exception as exc:
                await send.send(exc)
                return
            await send.send(bytes(frame))
            await conn.send(bytes(frame))

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(get_transport(url).serve, url, handler, options)
        yield bound, receive
        nursery.cancel_scope.cancel()


async def ending(outcomes: trio.MemoryReceiveChannel[object]) -> object:
    async for outcome in outcomes:
        if isinstance(outcome, BaseException):
            return outcome
    raise AssertionError("the listener reported no end")


# --------------------------------------------------------------------------- their client


async def test_trio_websocket_client_round_trips_and_pings() -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_listener("ws://127.0.0.1:0") as (url, outcomes):
            async with open_websocket_url(url + "/", max_message_size=OPTIONS.max_frame_size
                                          ) as ws:
                for message in MESSAGES:
                    await ws.send_message(message)
                    assert await ws.get_message() == message
                await ws.ping(b"are you there")  # returns once our pong is in
            assert isinstance(await ending(outcomes), trio.EndOfChannel)  # a clean 1000


async def test_trio_websocket_client_close_code_and_reason_reach_us() -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_listener("ws://127.0.0.1:0") as (url, outcomes):
            async with open_websocket_url(url + "/") as ws:
                await ws.aclose(1011, "client gave up")
                assert ws.closed is not None and ws.closed.code == 1011  # echoed back
            end = await ending(outcomes)
            assert isinstance(end, trio.BrokenResourceError)
            assert "1011" in str(end) and "client gave up" in str(end)


async def test_trio_websocket_client_over_wss(
    tls_server_context: ssl.SSLContext, tls_client_context: ssl.SSLContext,
) -> None:
    with trio.fail_after(TIMEOUT):
        server = TransportOptions(max_frame_size=OPTIONS.max_frame_size,
                                  ssl_context=tls_server_context)
        async with echo_listener("wss://127.0.0.1:0", server) as (url, outcomes):
            async with open_websocket_url(url + "/", ssl_context=tls_client_context,
                                          max_message_size=OPTIONS.max_frame_size) as ws:
                for message in MESSAGES:
                    await ws.send_message(message)
                    assert await ws.get_message() == message
            assert isinstance(await ending(outcomes), trio.EndOfChannel)


# --------------------------------------------------------------------------- wsproto by hand


class HandDriven:
    """A wsproto client over a raw socket: fragments and pings where we like."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    async def send(self, *events: Event) -> None:
        await self.stream.send_all(b"".join(self.ws.send(e) for e in events))

    async def next_event(self) -> Event:
        while True:
            for event in self.ws.events():
                return event
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)


@asynccontextmanager
async def hand_driven(url: str) -> AsyncIterator[HandDriven]:
    """A wsproto client past its opening handshake with ``url``."""
    _, host, port = parse_address(url)
    assert port is not None
    async with await trio.open_tcp_stream(host, port) as stream:
        client = HandDriven(stream)
        await client.send(Request(host=f"{host}:{port}", target="/"))
        assert isinstance(await client.next_event(), AcceptConnection)
        yield client


async def test_fragmented_message_with_a_ping_between_fragments() -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_listener("ws://127.0.0.1:0") as (url, outcomes):
            async with hand_driven(url) as client:
                await client.send(
                    BytesMessage(b"frag", message_finished=False),
                    Ping(b"between"),
                    BytesMessage(b"men", message_finished=False),
                    BytesMessage(b"ted" * 50_000, message_finished=True),
                )
                pong = await client.next_event()
                assert isinstance(pong, Pong) and pong.payload == b"between"
                echoed = b""
                while True:  # wsproto may hand a long message over in pieces
                    event = await client.next_event()
                    assert isinstance(event, BytesMessage)
                    echoed += event.data
                    if event.message_finished:
                        break
                assert echoed == b"fragmented" + b"ted" * 49_999
                await client.send(CloseConnection(code=1001, reason="going away"))
                reply = await client.next_event()
                assert isinstance(reply, CloseConnection) and reply.code == 1001
            assert await outcomes.receive() == b"fragmented" + b"ted" * 49_999
            assert isinstance(await ending(outcomes), trio.EndOfChannel)


async def test_a_text_message_is_refused_with_1003() -> None:
    # (wsproto by hand: trio-websocket's client never closes its socket after a
    # close the server started, so it would leak one here.)
    with trio.fail_after(TIMEOUT):
        async with echo_listener("ws://127.0.0.1:0") as (url, outcomes):
            async with hand_driven(url) as client:
                await client.send(TextMessage("not binary"))
                close = await client.next_event()
                assert isinstance(close, CloseConnection) and close.code == 1003
                assert "binary" in close.reason
            end = await ending(outcomes)
            assert isinstance(end, ProtocolError) and "text message" in str(end)


# --------------------------------------------------------------------------- their server


@asynccontextmanager
async def trio_websocket_server(
) -> AsyncIterator[tuple[str, list[int | None], trio.Event]]:
    """trio-websocket's server: echoes; b"ping-me" pings first, b"close-1011" closes.
    Reports the close codes of the connections its peers closed."""
    closes: list[int | None] = []
    closed = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                message = await ws.get_message()
                if message == b"close-1011":
                    await ws.aclose(1011, "server says no")
                    return
                if message == b"ping-me":
                    await ws.ping(b"server ping")  # returns once our pong is in
                await ws.send_message(message)
        except ConnectionClosed as exc:
            closes.append(exc.reason.code)
            closed.set()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        yield f"ws://127.0.0.1:{server.port}", closes, closed
        nursery.cancel_scope.cancel()


async def test_our_client_against_trio_websocket_server() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio_websocket_server() as (url, closes, closed), \
                trio.open_nursery() as nursery:
            conn = await get_transport(url).connect(url, OPTIONS, nursery)
            for message in [*MESSAGES[:3], b"ping-me"]:  # wsproto's default limit: 1 MiB
                await conn.send(message)
                assert await conn.receive() == message
            await conn.aclose()
            await closed.wait()
            assert closes == [1000]

            conn = await get_transport(url).connect(url, OPTIONS, nursery)
            await conn.send(b"close-1011")
            with pytest.raises(trio.BrokenResourceError, match=r"1011 \(server says no\)"):
                await conn.receive()
            await conn.aclose()


async def test_a_lowered_incoming_limit_does_not_limit_what_we_send() -> None:
    """``limit_incoming`` (the pre-authentication limit) is about what arrives."""
    with trio.fail_after(TIMEOUT):
        async with echo_listener("ws://127.0.0.1:0") as (url, _), \
                trio.open_nursery() as nursery:
            conn = await get_transport(url).connect(url, OPTIONS, nursery)
            conn.limit_incoming(100)
            await conn.send(b"x" * 1000)  # a client's frame, masked
            conn.limit_incoming(None)
            assert await conn.receive() == b"x" * 1000
            await conn.aclose()
