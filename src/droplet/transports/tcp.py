"""``tcp://HOST:PORT`` (and ``tls://`` with the standard ``ssl`` module).

One length-prefixed byte stream per connection. ``receive`` owns the
:class:`~droplet.protocol.framing.FrameDecoder`; because ``receive_some`` either
returns bytes or is cancelled with none consumed, a cancelled ``receive`` loses
nothing and the decoder keeps any partial frame. A cancelled ``send`` may have
written half a frame, so it closes the connection.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Sequence

import trio

from ..errors import ConnectionError, ProtocolError
from ..protocol.framing import FrameDecoder, frame
from ._sockets import dial, open_listeners, peer_url
from .base import Connection, ConnectionHandler, Transport, TransportOptions
from .registry import parse_address

__all__ = ["StreamConnection", "TcpTransport"]

RECEIVE_SIZE = 256 * 1024
#: Seconds ``aclose`` may spend on TLS's close_notify before it just hangs up.
CLOSE_TIMEOUT = 1.0


class StreamConnection(Connection):
    """Frames over any ``trio.abc.Stream`` (TCP socket, TLS stream)."""

    def __init__(self, stream: trio.abc.Stream, remote_address: str, options: TransportOptions):
        self._stream = stream
        self.remote_address = remote_address
        self._decoder = FrameDecoder(options.max_frame_size)
        self._send_limit = options.max_frame_size
        self._read_timeout = options.read_timeout
        self._send_lock = trio.Lock()
        self._closed = False
        # When the frame under way must be complete (set on the first wait for it).
        self._frame_deadline = math.inf

    def limit_incoming(self, max_frame_size: int | None) -> None:
        self._decoder.max_frame_size = (
            self._send_limit if max_frame_size is None else max_frame_size)

    async def send(self, data: bytes) -> None:
        await self._write(frame(data, self._send_limit))

    async def send_many(self, frames: Sequence[bytes]) -> None:
        limit = self._send_limit
        await self._write(b"".join([frame(f, limit) for f in frames]))

    async def _write(self, payload: bytes) -> None:
        async with self._send_lock:
            if self._closed:
                raise trio.ClosedResourceError("connection is closed")
            try:
                await self._stream.send_all(payload)
            except BaseException:
                # Half a frame may be on the wire: this connection is unusable.
                await self._abort()
                raise

    async def receive(self) -> bytes:
        decoder = self._decoder
        while True:
            payload = decoder.next_frame()
            if payload is not None:
                self._frame_deadline = math.inf
                return payload
            if decoder.mid_frame:
                # A peer that starts a frame must finish it in time (slowloris);
                # the deadline covers the whole frame, not each read.
                if self._frame_deadline == math.inf:
                    self._frame_deadline = trio.current_time() + self._read_timeout
                with trio.move_on_at(self._frame_deadline) as scope:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                if scope.cancelled_caught:
                    await self._abort()
                    raise ProtocolError(
                        f"{self.remote_address} left a frame unfinished for "
                        f"{self._read_timeout:g} s"
                    )
            else:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            if not data:
                if decoder.mid_frame:
                    raise ProtocolError(f"{self.remote_address} closed the connection mid-frame")
                raise trio.EndOfChannel
            decoder.feed(data)

    async def _abort(self) -> None:
        self._closed = True
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            # Bounded: TLS sends close_notify, which a peer that stopped reading
            # would otherwise make us wait for forever (and shielded at that).
            with trio.move_on_after(CLOSE_TIMEOUT):
                try:
                    await self._stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            await trio.aclose_forcefully(self._stream)


class TcpTransport(Transport):
    schemes = ("tcp", "tls")

    async def serve(
        self,
        url: str,
        handler: ConnectionHandler,
        options: TransportOptions,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        scheme = parse_address(url)[0]
        stream_listeners, bound = await open_listeners(url, options, tls=scheme == "tls")

        async def on_stream(stream: trio.abc.Stream) -> None:
            conn = StreamConnection(stream, peer_url(scheme, stream), options)
            try:
                if isinstance(stream, trio.SSLStream):
                    with trio.fail_after(options.read_timeout):
                        await stream.do_handshake()
                await handler(conn)
            except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError):
                pass  # the peer went away or never finished its TLS handshake
            finally:
                await conn.aclose()

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, on_stream, stream_listeners)
            task_status.started(bound)

    async def connect(
        self, url: str, options: TransportOptions, nursery: trio.Nursery
    ) -> Connection:
        scheme = parse_address(url)[0]
        socket_stream, host, _ = await dial(url)
        stream: trio.abc.Stream = socket_stream
        if scheme == "tls":
            ctx = options.ssl_context
            if not isinstance(ctx, ssl.SSLContext):
                ctx = ssl.create_default_context()
            ssl_stream = trio.SSLStream(stream, ctx, server_hostname=host)
            try:
                await ssl_stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError) as exc:
                await trio.aclose_forcefully(ssl_stream)
                raise ConnectionError(f"TLS handshake with {url} failed: {exc}") from exc
            stream = ssl_stream
        return StreamConnection(stream, url, options)
