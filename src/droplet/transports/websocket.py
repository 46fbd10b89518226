"""``ws://HOST:PORT`` and ``wss://`` (WebSocket over TLS): one frame per binary message.

For peers that can only reach us through HTTP infrastructure (browsers,
proxies, load balancers). Each Droplet frame travels as one binary WebSocket
message, so WebSocket's own framing replaces the length prefix of ``tcp://``.

The protocol engine is wsproto, the sans-IO library under trio-websocket,
driven from the caller's tasks exactly like :mod:`.tcp` drives its
:class:`~droplet.protocol.framing.FrameDecoder`: the connection's reader owns
the stream and the parser inside ``receive``, ``send`` takes a lock, and nothing
runs in the background. trio-websocket's connection objects need a background
reader task per connection, which needs a nursery that
``Transport.connect(url, options)`` cannot be given without hiding it
(STYLE.md 9), and they pass every message from that task to the caller through
a memory channel: one more task switch per message.

Limits: a message is counted as its chunks arrive and refused once it passes
``max_frame_size``, so a peer cannot make us hold more than the limit plus one
read; a peer that starts a frame must finish it within ``read_timeout``; the
opening handshake (TLS and HTTP, whose header size h11 bounds) must finish
within ``read_timeout`` too. No extensions are negotiated (no compression, so no
decompression bombs).
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Sequence
from typing import NoReturn

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ..errors import ConnectionError, ProtocolError
from ._sockets import dial, open_listeners, peer_url
from .base import Connection, ConnectionHandler, Transport, TransportOptions
from .registry import parse_address

__all__ = ["WebSocketConnection", "WebSocketTransport"]

RECEIVE_SIZE = 256 * 1024
#: Seconds ``aclose`` may spend sending its close frame before it just hangs up.
CLOSE_TIMEOUT = 1.0

# RFC 6455 close codes. A close with one of _CLEAN_CODES is an orderly end
# (EndOfChannel); any other code means the peer gave up on us (BrokenResourceError).
_NORMAL = 1000
_POLICY_VIOLATION = 1008
_UNSUPPORTED_DATA = 1003
_MESSAGE_TOO_BIG = 1009
_CLEAN_CODES = frozenset({1000, 1001, 1005})

_End = tuple[type[Exception], str]


class WebSocketConnection(Connection):
    """Droplet frames as binary messages over an open WebSocket (either side)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: WSConnection,
        remote_address: str,
        options: TransportOptions,
    ) -> None:
        self._stream = stream
        self._ws = ws
        self.remote_address = remote_address
        self.max_frame_size = options.max_frame_size
        self._incoming_limit = options.max_frame_size
        self._read_timeout = options.read_timeout
        self._send_lock = trio.Lock()
        # Chunks of the message being received, and their total size.
        self._parts: list[bytes | bytearray] = []
        self._size = 0
        # True when the last bytes fed to wsproto produced no event yet: a frame
        # has started. Its deadline is set when we first wait for the rest.
        self._started = False
        self._deadline = math.inf
        self._closed = False  # aclose() was called
        self._end: _End | None = None  # how receive/send fail once the connection ended

    def limit_incoming(self, max_frame_size: int | None) -> None:
        self._incoming_limit = self.max_frame_size if max_frame_size is None else max_frame_size

    async def send(self, frame: bytes) -> None:
        await self.send_many((frame,))

    async def send_many(self, frames: Sequence[bytes]) -> None:
        for frame in frames:
            if len(frame) > self.max_frame_size:
                raise ValueError(
                    f"frame of {len(frame)} bytes exceeds max_frame_size={self.max_frame_size}"
                )
        async with self._send_lock:
            if self._closed:
                raise trio.ClosedResourceError("connection is closed")
            if self._end is not None:
                raise trio.BrokenResourceError(self._end[1] or self._gone())
            try:
                data = b"".join([self._ws.send(BytesMessage(data=f)) for f in frames])
            except LocalProtocolError:
                # The peer's close frame was parsed; the reader is answering it.
                raise trio.BrokenResourceError(self._gone()) from None
            try:
                await self._stream.send_all(data)
            except BaseException:
                # Part of a message may be on the wire: this connection is unusable.
                await self._abort(f"a send to {self.remote_address} failed midway")
                raise

    async def receive(self) -> bytes:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("connection is closed")
            if self._end is not None:
                raise self._end[0](self._end[1])
            for event in self._ws.events():
                self._started = False
                if isinstance(event, BytesMessage):
                    self._size += len(event.data)
                    if self._size > self._incoming_limit:
                        await self._fail(
                            _MESSAGE_TOO_BIG,
                            f"{self.remote_address} sent a frame over "
                            f"max_frame_size={self._incoming_limit}",
                        )
                    if not event.message_finished:
                        self._parts.append(event.data)
                        continue
                    if self._parts:
                        self._parts.append(event.data)
                        payload = b"".join(self._parts)
                        self._parts = []
                    else:
                        payload = bytes(event.data)  # no copy when it already is bytes
                    self._size = 0
                    self._deadline = math.inf
                    return payload
                if not self._parts:
                    self._deadline = math.inf  # no frame is unfinished any more
                if isinstance(event, Ping):
                    async with self._send_lock:
                        if not self._closed and self._end is None:
                            await self._write(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    await self._on_close(event)
                elif isinstance(event, TextMessage):
                    await self._fail(
                        _UNSUPPORTED_DATA,
                        f"{self.remote_address} sent a text message; "
                        "Droplet frames travel as binary messages",
                    )
                # Pong: nothing to do (we never ping).
            data = await self._receive_some()
            if not data:
                mid_frame = self._started or bool(self._parts)
                reason = f"{self.remote_address} went away without a close frame"
                await self._abort(reason)
                if mid_frame:
                    raise ProtocolError(f"{self.remote_address} closed the connection mid-frame")
                raise trio.BrokenResourceError(reason)
            self._ws.receive_data(bytes(data))  # no copy: sockets return bytes
            self._started = True

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        await self._hang_up(CloseConnection(code=_NORMAL))

    # ------------------------------------------------------------------ internals

    def _gone(self) -> str:
        return f"{self.remote_address} closed the connection"

    async def _receive_some(self) -> bytes | bytearray:
        try:
            if not (self._started or self._parts):
                return await self._stream.receive_some(RECEIVE_SIZE)
            # A peer that starts a frame must finish it in time (slowloris); the
            # deadline covers the whole frame, not each read.
            if self._deadline == math.inf:
                self._deadline = trio.current_time() + self._read_timeout
            with trio.move_on_at(self._deadline):
                return await self._stream.receive_some(RECEIVE_SIZE)
        except trio.BrokenResourceError:
            await self._abort(f"the connection to {self.remote_address} broke")
            raise
        except trio.ClosedResourceError:
            if self._end is None or self._closed:
                raise  # closed by aclose()
            # A failed send in another task closed the stream under us.
            raise trio.BrokenResourceError(self._end[1]) from None
        await self._fail(
            _POLICY_VIOLATION,
            f"{self.remote_address} left a frame unfinished for {self._read_timeout:g} s",
        )

    async def _write(self, data: bytes) -> None:
        """Send wsproto output; the caller holds the send lock."""
        try:
            await self._stream.send_all(data)
        except BaseException:
            await self._abort(f"a send to {self.remote_address} failed midway")
            raise

    async def _on_close(self, event: CloseConnection) -> NoReturn:
        if self._ws.state is ConnectionState.OPEN:
            # wsproto reports a frame it cannot parse as a close event of its
            # own making (the state stays OPEN); the peer sent no close.
            await self._fail(
                event.code,
                f"{self.remote_address} sent an invalid WebSocket frame: {event.reason}",
            )
        if event.code in _CLEAN_CODES:
            self._end = (trio.EndOfChannel, "")
        else:
            why = f" ({event.reason})" if event.reason else ""
            self._end = (
                trio.BrokenResourceError,
                f"{self.remote_address} closed the connection with code {event.code}{why}",
            )
        # Answer the peer's close frame (RFC 6455 5.5.1), then hang up.
        await self._hang_up(event.response())
        raise self._end[0](self._end[1])

    async def _fail(self, code: int, message: str) -> NoReturn:
        """The peer broke the protocol: tell it why, hang up, raise ProtocolError."""
        self._end = (trio.BrokenResourceError, message)
        await self._hang_up(CloseConnection(code=code, reason=message[:120]))
        raise ProtocolError(message)

    async def _hang_up(self, goodbye: CloseConnection) -> None:
        """Send ``goodbye`` if the protocol still allows it, then close the stream.

        Shielded and bounded by CLOSE_TIMEOUT: a peer that stopped reading (or a
        sender stuck behind it holding the lock) cannot keep us from closing.
        """
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_TIMEOUT):
                async with self._send_lock:
                    state = self._ws.state
                    if state is ConnectionState.OPEN or state is ConnectionState.REMOTE_CLOSING:
                        try:
                            await self._stream.send_all(self._ws.send(goodbye))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
            await trio.aclose_forcefully(self._stream)

    async def _abort(self, reason: str) -> None:
        if self._end is None:
            self._end = (trio.BrokenResourceError, reason)
        await trio.aclose_forcefully(self._stream)


# ---------------------------------------------------------------------- handshakes


async def _request_upgrade(stream: trio.abc.Stream, url: str, host_header: str) -> WSConnection:
    """Client side of the opening handshake."""
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=host_header, target="/")))
    while True:
        data = await stream.receive_some(RECEIVE_SIZE)
        try:
            ws.receive_data(bytes(data) if data else None)
        except RemoteProtocolError as exc:
            raise ConnectionError(
                f"{url} answered the WebSocket handshake with something else ({exc}); "
                "is it a Droplet ws:// listener?"
            ) from exc
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return ws
            if isinstance(event, RejectConnection):
                raise ConnectionError(
                    f"{url} refused the WebSocket upgrade (HTTP {event.status_code}); "
                    "is it a Droplet ws:// listener?"
                )
        if not data:
            raise ConnectionError(
                f"{url} closed the connection during the WebSocket handshake; "
                "is it a Droplet ws:// listener?"
            )


async def _accept_upgrade(stream: trio.abc.Stream) -> WSConnection:
    """Server side of the opening handshake; ProtocolError if it is not one."""
    ws = WSConnection(ConnectionType.SERVER)
    while True:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise trio.BrokenResourceError("peer closed the connection during the handshake")
        try:
            ws.receive_data(bytes(data))
        except RemoteProtocolError as exc:
            if exc.event_hint is not None:  # a 400 for the HTTP client that got lost
                try:
                    await stream.send_all(ws.send(exc.event_hint))
                except (LocalProtocolError, h11.LocalProtocolError):
                    pass
            raise ProtocolError(f"not a WebSocket upgrade request: {exc}") from exc
        for event in ws.events():
            if isinstance(event, Request):
                await stream.send_all(ws.send(AcceptConnection()))
                return ws


class WebSocketTransport(Transport):
    schemes = ("ws", "wss")

    async def serve(
        self,
        url: str,
        handler: ConnectionHandler,
        options: TransportOptions,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        scheme = parse_address(url)[0]
        # https_compatible: WebSocket peers (browsers, proxies) often skip close_notify.
        stream_listeners, bound = await open_listeners(
            url, options, tls=scheme == "wss", https_compatible=True)

        async def on_stream(stream: trio.abc.Stream) -> None:
            try:
                with trio.fail_after(options.read_timeout):
                    if isinstance(stream, trio.SSLStream):
                        await stream.do_handshake()
                    ws = await _accept_upgrade(stream)
            except (trio.BrokenResourceError, trio.TooSlowError, ProtocolError):
                await trio.aclose_forcefully(stream)
                return  # not a WebSocket client, or too slow to become one
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            conn = WebSocketConnection(stream, ws, peer_url(scheme, stream), options)
            try:
                await handler(conn)
            except trio.BrokenResourceError:
                pass  # the peer went away
            finally:
                await conn.aclose()

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, on_stream, stream_listeners)
            task_status.started(bound)

    async def connect(self, url: str, options: TransportOptions) -> Connection:
        scheme = parse_address(url)[0]
        tcp_stream, host, port = await dial(url)
        stream: trio.abc.Stream = tcp_stream
        try:
            with trio.fail_after(options.read_timeout):
                if scheme == "wss":
                    ctx = options.ssl_context
                    if not isinstance(ctx, ssl.SSLContext):
                        ctx = ssl.create_default_context()
                    stream = trio.SSLStream(
                        tcp_stream, ctx, server_hostname=host, https_compatible=True
                    )
                    await stream.do_handshake()
                shown = f"[{host}]" if ":" in host else host
                ws = await _request_upgrade(stream, url, f"{shown}:{port}")
        except trio.TooSlowError as exc:
            await trio.aclose_forcefully(stream)
            raise ConnectionError(
                f"{url} did not finish the WebSocket handshake within "
                f"{options.read_timeout:g} s"
            ) from exc
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            raise ConnectionError(
                f"handshake with {url} failed: {exc.__cause__ or exc}"
            ) from exc
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return WebSocketConnection(stream, ws, url, options)
