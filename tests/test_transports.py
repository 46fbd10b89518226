"""Transports: the conformance suite for every scheme, then hostile peers on raw sockets."""

from __future__ import annotations

import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from droplet.errors import ConnectionError, ProtocolError
from droplet.testing.transport_checks import CHECKS, check_transport
from droplet.transports import TransportOptions, get_transport, open_connection, parse_address
from droplet.transports.base import Connection

# "inproc-objects": inproc with skip_encoding (message objects, no encoding),
# so the suite runs over inproc both ways (STYLE.md 5).
SCHEMES = ["inproc", "inproc-objects", "tcp", "tls", "ws", "wss"]
Setup = tuple[str, TransportOptions, TransportOptions]


@pytest.fixture(params=SCHEMES)
def setup(
    request: pytest.FixtureRequest,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> Setup:
    scheme: str = request.param
    if scheme == "inproc":
        return "inproc://", TransportOptions(), TransportOptions()
    if scheme == "inproc-objects":
        return "inproc://", TransportOptions(skip_encoding=True), TransportOptions()
    secure = scheme in ("tls", "wss")
    server = TransportOptions(ssl_context=tls_server_context if secure else None)
    client = TransportOptions(ssl_context=tls_client_context if secure else None)
    return f"{scheme}://127.0.0.1:0", server, client


@pytest.mark.parametrize("check", list(CHECKS))
async def test_conformance(setup: Setup, check: str) -> None:
    with trio.fail_after(10):
        await CHECKS[check](*setup)


async def test_check_transport_runs_the_whole_suite(setup: Setup) -> None:
    with trio.fail_after(30):
        await check_transport(*setup)


# --------------------------------------------------------------------------- helpers

Outcome = bytes | BaseException


@asynccontextmanager
async def recording_server(
    url: str, options: TransportOptions
) -> AsyncIterator[tuple[str, trio.MemoryReceiveChannel[Outcome]]]:
    """A listener that echoes frames and reports how each connection's receive ended."""
    outcomes_send, outcomes_recv = trio.open_memory_channel[Outcome](100)

    async def handler(conn: Connection) -> None:
        while True:
            try:
                frame = await conn.receive()
            except Exception as exc:
                await outcomes_send.send(exc)
                return
            await outcomes_send.send(frame)
            await conn.send(frame)

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(get_transport(url).serve, url, handler, options)
        yield bound, outcomes_recv
        nursery.cancel_scope.cancel()


async def raw_connect(url: str) -> trio.SocketStream:
    _, host, port = parse_address(url)
    assert port is not None
    return await trio.open_tcp_stream(host, port)


async def assert_still_serves(url: str, options: TransportOptions) -> None:
    """Every hostile-input test ends with a normal call that must succeed.

    The client keeps the default read_timeout: only the listener is on a short fuse.
    """
    client = TransportOptions(max_frame_size=options.max_frame_size,
                              ssl_context=options.ssl_context)
    async with open_connection(url, client) as conn:
        await conn.send(b"still there?")
        assert await conn.receive() == b"still there?"


async def next_failure(outcomes: trio.MemoryReceiveChannel[Outcome]) -> BaseException:
    async for outcome in outcomes:
        if isinstance(outcome, BaseException):
            return outcome
    raise AssertionError("the server reported no failure")


LEN = struct.Struct(">I")
TCP_OPTIONS = TransportOptions(max_frame_size=1024, read_timeout=0.2)


# --------------------------------------------------------------------------- hostile tcp peers


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # "GET " declares a 1.2 GB frame
        b"\xff\xff\xff\xffwhatever follows",
        LEN.pack(1025),  # one byte over the limit, and not one payload byte sent
    ],
    ids=["http", "max-length", "just-over-limit"],
)
async def test_tcp_oversize_declared_length_is_refused_before_payload(garbage: bytes) -> None:
    with trio.fail_after(10):
        async with recording_server("tcp://127.0.0.1:0", TCP_OPTIONS) as (url, outcomes):
            async with await raw_connect(url) as raw:
                await raw.send_all(garbage)
                failure = await next_failure(outcomes)
            assert isinstance(failure, ProtocolError)
            assert "limit is 1024" in str(failure)
            await assert_still_serves(url, TCP_OPTIONS)


async def test_tcp_truncated_frame_then_close() -> None:
    with trio.fail_after(10):
        async with recording_server("tcp://127.0.0.1:0", TCP_OPTIONS) as (url, outcomes):
            async with await raw_connect(url) as raw:
                await raw.send_all(LEN.pack(100) + b"only part of it")
            failure = await next_failure(outcomes)
            assert isinstance(failure, ProtocolError)
            assert "mid-frame" in str(failure)
            await assert_still_serves(url, TCP_OPTIONS)


async def test_tcp_stalled_frame_times_out() -> None:
    with trio.fail_after(10):
        async with recording_server("tcp://127.0.0.1:0", TCP_OPTIONS) as (url, outcomes):
            async with await raw_connect(url) as raw:
                await raw.send_all(LEN.pack(100) + b"started, then silence")
                failure = await next_failure(outcomes)
            assert isinstance(failure, ProtocolError)
            assert "unfinished" in str(failure)
            await assert_still_serves(url, TCP_OPTIONS)


async def test_tcp_trickled_frame_times_out() -> None:
    """read_timeout bounds the whole frame, not each read: trickling does not reset it."""
    with trio.fail_after(10):
        async with recording_server("tcp://127.0.0.1:0", TCP_OPTIONS) as (url, outcomes):
            async with await raw_connect(url) as raw:
                async with trio.open_nursery() as nursery:

                    async def trickle() -> None:
                        # 100 bytes at one per 50 ms: 5 s to finish, far past 0.2 s.
                        await raw.send_all(LEN.pack(100))
                        for _ in range(100):
                            await trio.sleep(0.05)
                            try:
                                await raw.send_all(b"x")
                            except trio.BrokenResourceError:
                                return

                    nursery.start_soon(trickle)
                    failure = await next_failure(outcomes)
                    nursery.cancel_scope.cancel()
            assert isinstance(failure, ProtocolError)
            assert "unfinished" in str(failure)
            await assert_still_serves(url, TCP_OPTIONS)


async def test_tcp_frames_split_across_writes_reassemble() -> None:
    with trio.fail_after(10):
        async with recording_server("tcp://127.0.0.1:0", TCP_OPTIONS) as (url, outcomes):
            async with await raw_connect(url) as raw:
                wire = LEN.pack(5) + b"hello" + LEN.pack(0) + LEN.pack(3) + b"abc"
                for i in range(len(wire)):
                    await raw.send_all(wire[i : i + 1])
                    await trio.sleep(0.001)  # separate reads, most likely
                assert [await outcomes.receive() for _ in range(3)] == [b"hello", b"", b"abc"]
                echoed = b""
                while len(echoed) < len(wire):  # read the echoes: no RST on close
                    echoed += await raw.receive_some(4096)
                assert echoed == wire
            assert isinstance(await outcomes.receive(), trio.EndOfChannel)


async def test_tcp_client_receives_protocol_error_from_garbage_server() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def garbage_server(stream: trio.SocketStream) -> None:
                async with stream:
                    await stream.send_all(b"\xff\xff\xff\xff")
                    await trio.sleep_forever()

            serve = partial(trio.serve_tcp, garbage_server, 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            port = listeners[0].socket.getsockname()[1]
            url = f"tcp://127.0.0.1:{port}"
            async with open_connection(url, TCP_OPTIONS) as conn:
                with pytest.raises(ProtocolError):
                    await conn.receive()
            nursery.cancel_scope.cancel()


async def test_tls_silent_client_is_dropped_after_read_timeout(
    tls_server_context: ssl.SSLContext, tls_client_context: ssl.SSLContext
) -> None:
    server_options = TransportOptions(ssl_context=tls_server_context, read_timeout=0.2)
    with trio.fail_after(10):
        async with recording_server("tls://127.0.0.1:0", server_options) as (url, _):
            async with await raw_connect(url) as raw:
                # Never start the TLS handshake: the listener hangs up on us.
                assert await raw.receive_some(1024) == b""
            await assert_still_serves(url, TransportOptions(ssl_context=tls_client_context))


async def test_tls_client_refuses_untrusted_certificate(
    tls_server_context: ssl.SSLContext,
) -> None:
    untrusting = TransportOptions(ssl_context=ssl.create_default_context())
    with trio.fail_after(10):
        server_options = TransportOptions(ssl_context=tls_server_context)
        async with recording_server("tls://127.0.0.1:0", server_options) as (url, _):
            with pytest.raises(ConnectionError, match="TLS handshake"):
                async with open_connection(url, untrusting):
                    pass


async def _tls_pair_over(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
) -> tuple[trio.SSLStream[trio.abc.Stream], trio.SSLStream[trio.abc.Stream]]:
    server = trio.SSLStream(a, server_ctx, server_side=True)
    client = trio.SSLStream(b, client_ctx, server_hostname="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client


async def test_tls_aclose_does_not_wait_for_a_peer_that_stopped_reading(
    autojump_clock: trio.testing.MockClock,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> None:
    """close_notify cannot be delivered to a peer that never reads; aclose gives up.

    In memory (a lockstep stream: every send waits for the peer's receive), so
    virtual time is safe here.
    """
    from droplet.transports.tcp import StreamConnection

    a, b = trio.testing.lockstep_stream_pair()
    server, client = await _tls_pair_over(a, b, tls_server_context, tls_client_context)
    conn = StreamConnection(server, "tls://peer", TransportOptions())
    with trio.fail_after(60):  # virtual seconds; aclose used to hang here, shielded
        await conn.aclose()
    await trio.aclose_forcefully(client)


async def test_ws_aclose_does_not_wait_for_a_peer_that_stopped_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from droplet.transports.websocket import _accept

    a, b = trio.testing.lockstep_stream_pair()

    async def client_that_stops_reading() -> None:
        await b.send_all(UPGRADE)
        assert (await b.receive_some(4096)).startswith(b"HTTP/1.1 101 ")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_that_stops_reading)
        conn = await _accept(nursery, a, "ws://peer:1", TransportOptions())
        with trio.fail_after(60):  # virtual seconds
            await conn.aclose()  # the close frame cannot be delivered: give up, hang up
        await trio.aclose_forcefully(b)


# --------------------------------------------------------------------------- hostile ws peers

WS_OPTIONS = TransportOptions(max_frame_size=1024, read_timeout=0.2)
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One client WebSocket frame, masked with a zero key (so the payload reads as sent)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    return head + (b"\0\0\0\0" if masked else b"") + payload


async def raw_ws_connect(url: str) -> trio.SocketStream:
    """A raw socket that has completed the WebSocket opening handshake."""
    raw = await raw_connect(url)
    await raw.send_all(UPGRADE)
    response = b""
    while b"\r\n\r\n" not in response:
        response += await raw.receive_some(4096)
    assert response.startswith(b"HTTP/1.1 101 ")
    return raw


async def read_until_closed(raw: trio.SocketStream) -> bytes:
    received = b""
    try:
        while data := await raw.receive_some(4096):
            received += data
    except trio.BrokenResourceError:
        pass
    return received


@pytest.mark.parametrize(
    ("wire", "expected", "code"),
    [
        (ws_frame(0x1, b"text, not binary"), "text message", 1003),
        (ws_frame(0x2, b"unmasked", masked=False), "unmasked frame", 1002),
        (bytes([0x83, 0x80, 0, 0, 0, 0]), "unknown opcode 0x3", 1002),  # reserved opcode
        (ws_frame(0x2, b"x", fin=False) + ws_frame(0x2, b"y"), "continuation", 1002),
        (bytes([0xC2, 0x80, 0, 0, 0, 0]), "reserved bit", 1002),  # compressed: not agreed
        (ws_frame(0x9, b"p" * 126), "control frame", 1002),
        (ws_frame(0x8, b"\3"), "one-byte body", 1002),
        (ws_frame(0x8, struct.pack(">H", 1005)), "invalid code 1005", 1002),
        (ws_frame(0x8, struct.pack(">H", 1000) + b"\xff"), "not UTF-8", 1007),
        (ws_frame(0x2, b"x" * 1025), "max_frame_size", 1009),
        (ws_frame(0x2, b"x" * 600, fin=False) + ws_frame(0x0, b"y" * 600), "max_frame_size",
         1009),
        (ws_frame(0x2, b"x" * 70_000)[:10], "max_frame_size", 1009),  # the header is enough
    ],
    ids=["text", "unmasked", "bad-opcode", "binary-inside-fragments", "rsv", "big-ping",
         "short-close", "close-1005", "close-reason-not-utf8", "oversize",
         "oversize-fragmented", "oversize-declared"],
)
async def test_ws_bad_frames_raise_protocol_error(wire: bytes, expected: str, code: int) -> None:
    with trio.fail_after(10):
        async with recording_server("ws://127.0.0.1:0", WS_OPTIONS) as (url, outcomes):
            async with await raw_ws_connect(url) as raw:
                await raw.send_all(wire)
                failure = await next_failure(outcomes)
                # The server says why in a close frame with the RFC's code, then hangs up.
                goodbye = await read_until_closed(raw)
                assert goodbye[:1] == b"\x88"
                assert struct.unpack(">H", goodbye[2:4])[0] == code
            assert isinstance(failure, ProtocolError)
            assert expected in str(failure)
            await assert_still_serves(url, WS_OPTIONS)


async def test_ws_fragmented_message_and_ping_are_handled() -> None:
    with trio.fail_after(10):
        async with recording_server("ws://127.0.0.1:0", WS_OPTIONS) as (url, outcomes):
            async with await raw_ws_connect(url) as raw:
                await raw.send_all(
                    ws_frame(0x2, b"frag", fin=False)
                    + ws_frame(0x9, b"ping!")  # control frames may come between fragments
                    + ws_frame(0x0, b"mented")
                )
                assert await outcomes.receive() == b"fragmented"
                received = b""
                while b"fragmented" not in received:
                    received += await raw.receive_some(4096)
                assert received.startswith(b"\x8a\x05ping!")  # the pong comes first
            assert isinstance(await outcomes.receive(), trio.BrokenResourceError)
            await assert_still_serves(url, WS_OPTIONS)


async def test_ws_stalled_frame_times_out() -> None:
    with trio.fail_after(10):
        async with recording_server("ws://127.0.0.1:0", WS_OPTIONS) as (url, outcomes):
            async with await raw_ws_connect(url) as raw:
                await raw.send_all(ws_frame(0x2, b"x" * 100)[:20])  # started, then silence
                failure = await next_failure(outcomes)
            assert isinstance(failure, ProtocolError)
            assert "unfinished" in str(failure)
            await assert_still_serves(url, WS_OPTIONS)


async def test_ws_trickled_frame_times_out() -> None:
    with trio.fail_after(10):
        async with recording_server("ws://127.0.0.1:0", WS_OPTIONS) as (url, outcomes):
            async with await raw_ws_connect(url) as raw:
                async with trio.open_nursery() as nursery:

                    async def trickle() -> None:
                        wire = ws_frame(0x2, b"x" * 100)
                        for i in range(len(wire)):  # ~5 s at one byte per 50 ms
                            try:
                                await raw.send_all(wire[i : i + 1])
                            except trio.BrokenResourceError:
                                return
                            await trio.sleep(0.05)

                    nursery.start_soon(trickle)
                    failure = await next_failure(outcomes)
                    nursery.cancel_scope.cancel()
            assert isinstance(failure, ProtocolError)
            assert "unfinished" in str(failure)
            await assert_still_serves(url, WS_OPTIONS)


@pytest.mark.parametrize("wire", [UPGRADE[:30], b""], ids=["partial-request", "silent"])
async def test_ws_stalled_handshake_is_dropped(wire: bytes) -> None:
    with trio.fail_after(10):
        async with recording_server("ws://127.0.0.1:0", WS_OPTIONS) as (url, _):
            async with await raw_connect(url) as raw:
                await raw.send_all(wire)
                assert await read_until_closed(raw) == b""  # hung up after read_timeout
            await assert_still_serves(url, WS_OPTIONS)


async def test_ws_garbage_instead_of_handshake_gets_400() -> None:
    with trio.fail_after(10):
        async with recording_server("ws://127.0.0.1:0", WS_OPTIONS) as (url, _):
            async with await raw_connect(url) as raw:
                await raw.send_all(b"\x00\x01garbage\r\n\r\n")
                assert (await read_until_closed(raw)).startswith(b"HTTP/1.1 400 ")
            await assert_still_serves(url, WS_OPTIONS)


async def test_ws_peer_closing_tcp_without_close_frame_is_broken() -> None:
    with trio.fail_after(10):
        async with recording_server("ws://127.0.0.1:0", WS_OPTIONS) as (url, outcomes):
            async with await raw_ws_connect(url) as raw:
                await raw.send_all(ws_frame(0x2, b"last words"))
                assert await outcomes.receive() == b"last words"
            assert isinstance(await outcomes.receive(), trio.BrokenResourceError)
            await assert_still_serves(url, WS_OPTIONS)


async def test_ws_close_with_error_code_is_broken_not_end() -> None:
    with trio.fail_after(10):
        async with recording_server("ws://127.0.0.1:0", WS_OPTIONS) as (url, outcomes):
            async with await raw_ws_connect(url) as raw:
                await raw.send_all(ws_frame(0x8, struct.pack(">H", 1011) + b"oops"))
                assert (await read_until_closed(raw)).startswith(b"\x88")  # the close reply
            failure = await outcomes.receive()
            assert isinstance(failure, trio.BrokenResourceError)
            assert "1011" in str(failure) and "oops" in str(failure)


async def serve_raw(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> str:
    """A plain TCP server standing in for a broken or foreign WebSocket server."""

    async def wrapped(stream: trio.SocketStream) -> None:
        async with stream:
            await handler(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, wrapped, 0, host="127.0.0.1"))
    return f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_ws_connect_to_a_tcp_droplet_listener_raises_connection_error() -> None:
    with trio.fail_after(10):
        async with recording_server("tcp://127.0.0.1:0", TCP_OPTIONS) as (tcp_url, _):
            ws_url = "ws://" + tcp_url.split("://", 1)[1]
            with pytest.raises(ConnectionError, match="is it a Droplet ws:// listener"):
                async with open_connection(ws_url, WS_OPTIONS):
                    pass


async def test_ws_connect_to_a_silent_server_times_out() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def silent(stream: trio.SocketStream) -> None:
                await trio.sleep_forever()

            url = await serve_raw(nursery, silent)
            with pytest.raises(ConnectionError, match="did not finish the WebSocket handshake"):
                async with open_connection(url, WS_OPTIONS):
                    pass
            nursery.cancel_scope.cancel()


async def test_ws_connect_to_a_refusing_http_server() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def refuse(stream: trio.SocketStream) -> None:
                await stream.receive_some(4096)
                await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                await trio.sleep_forever()

            url = await serve_raw(nursery, refuse)
            with pytest.raises(ConnectionError, match="HTTP 404"):
                async with open_connection(url, WS_OPTIONS):
                    pass
            nursery.cancel_scope.cancel()


async def test_ws_connect_refused_message() -> None:
    with trio.fail_after(10):
        async with recording_server("ws://127.0.0.1:0", WS_OPTIONS) as (url, _):
            pass
        with pytest.raises(ConnectionError) as info:
            async with open_connection(url, WS_OPTIONS):
                pass
        message = str(info.value)
        assert url in message and "python -m droplet.node" in message


async def test_wss_listener_needs_ssl_context() -> None:
    async def handler(conn: Connection) -> None:
        raise AssertionError("no connection expected")

    with pytest.raises(ValueError, match="ssl_context"):
        await get_transport("wss://127.0.0.1:0").serve(
            "wss://127.0.0.1:0", handler, TransportOptions()
        )


async def test_wss_client_refuses_untrusted_certificate(
    tls_server_context: ssl.SSLContext,
) -> None:
    with trio.fail_after(10):
        server_options = TransportOptions(ssl_context=tls_server_context)
        async with recording_server("wss://127.0.0.1:0", server_options) as (url, _):
            with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                async with open_connection(url, TransportOptions()):
                    pass


def test_websocket_transport_is_registered_lazily() -> None:
    from droplet.transports.websocket import WebSocketTransport

    assert isinstance(get_transport("ws://h:1"), WebSocketTransport)
    assert get_transport("wss://h:1") is not None


def test_websocket_code_loads_only_for_ws_addresses() -> None:
    """STYLE.md 2: importing droplet (and using tcp://) never loads the WebSocket stack."""
    import subprocess
    import sys

    code = (
        "import sys, droplet, droplet.transports as t; t.get_transport('tcp://h:1'); "
        "assert 'wsproto' not in sys.modules, 'wsproto imported eagerly'; "
        "assert 'droplet.transports.websocket' not in sys.modules; "
        "t.get_transport('ws://h:1'); assert 'wsproto' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
