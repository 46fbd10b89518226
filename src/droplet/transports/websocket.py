"""``ws://HOST:PORT`` and ``wss://`` (WebSocket over TLS): one frame per binary message.

For peers that can only reach us through HTTP infrastructure (browsers,
proxies, load balancers). Each Droplet frame travels as one binary WebSocket
message, so WebSocket's own framing replaces the length prefix of ``tcp://``.

trio-websocket does the WebSocket work: the HTTP upgrade, reassembly of
fragmented messages, answering pings, the closing handshake and its size limit
(``max_message_size``). Its connection needs a background reader task, which
runs in the nursery ``Transport.connect`` is given (on a listener, in one
nursery per connection). What stays here are Droplet's own rules:

- binary messages only: a text message is a :class:`~droplet.ProtocolError`
  naming it, and the connection closes with code 1003;
- ``max_frame_size`` both ways, and the lower pre-authentication limit of
  ``limit_incoming``. A listener's reader reads nothing past the HTTP upgrade
  until the handler asks for its first frame, by which time that limit is set,
  and a whole message over the current limit is refused even if it was read
  before, so an unauthenticated peer cannot make us hold more than one socket
  read (``RECEIVE_SIZE``) plus a 4 KiB frame;
- a message whose first bytes arrived must be complete within ``read_timeout``
  (slowloris), and so must the TLS and HTTP opening handshakes;
- errors in Droplet's terms: ``ConnectionError`` naming the address (and the
  fix) for a failed dial, TLS handshake or upgrade; ``EndOfChannel`` for a clean
  close (codes 1000, 1001, 1005), ``BrokenResourceError`` for any other end,
  ``ProtocolError`` for a peer that broke the rules;
- bounded, shielded ``aclose``: a peer that stopped reading cannot keep us
  from hanging up.

No extensions are negotiated (no compression, so no decompression bombs).
trio-websocket exposes no setter for the incoming size limit nor a way to see
that a message is partly received, so :class:`_Adapter` touches its private
``_max_message_size``, ``_message_size`` and ``_wsproto`` attributes, and
:func:`_deliver_eagerly` wraps its ``_send_channel`` (one scheduler pass less
per message); the dependency is pinned to the 0.12 series and the
conformance suite's ``limit_incoming`` and the stalled-frame tests fail if
they move.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, cast

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, ConnectionRejected
from wsproto.connection import ConnectionState

from ..errors import ConnectionError, ProtocolError
from ._sockets import dial, open_listeners, peer_url
from .base import Connection, ConnectionHandler, Transport, TransportOptions
from .registry import parse_address

__all__ = ["MESSAGE_QUEUE_SIZE", "RECEIVE_SIZE", "WebSocketConnection", "WebSocketTransport"]

log = logging.getLogger(__name__)

#: Bytes asked of the socket per read (trio-websocket's default is 4 KiB: 16
#: reads, and 16 trips through wsproto, for a 64 KiB frame).
RECEIVE_SIZE = 256 * 1024
#: Whole messages the reader may queue ahead of ``receive`` (trio-websocket's
#: default is 1). Each may be ``max_frame_size`` long, so a connection whose
#: consumer lags holds up to ``(MESSAGE_QUEUE_SIZE + 1) * max_frame_size``
#: (the +1: the message the reader is assembling); while the queue is full the
#: reader answers no ping or close. Two let a close frame that follows a
#: frame or two be answered before they are read; latency does not change
#: with it (every message still wakes the consumer once).
MESSAGE_QUEUE_SIZE = 2
#: Seconds ``aclose`` may spend on the closing handshake before it just hangs up.
CLOSE_TIMEOUT = 1.0

_CLEAN_CODES = frozenset({1000, 1001, 1005})
_ABNORMAL = 1006  # no close frame: the TCP connection just ended
_UNSUPPORTED_DATA = 1003
_MESSAGE_TOO_BIG = 1009


class _HandshakeFailed(Exception):
    """The WebSocket opening handshake did not complete (the reason is the message)."""


class _Adapter(trio.abc.Stream):
    """The byte stream trio-websocket sees: the socket (or TLS) stream, plus three jobs.

    - It holds the reader before each read until ``release()`` (a listener's
      connection stays unread until its handler first receives).
    - It enforces the per-message deadline: while a message is partly in,
      reads must bring the rest before ``read_timeout`` runs out.
    - ``hold_writes(n)`` gathers the next ``n`` writes into the one after them,
      so ``send_many`` costs one system call.
    """

    def __init__(self, inner: trio.abc.Stream, read_timeout: float) -> None:
        self.inner = inner
        self.ws: trio_websocket.WebSocketConnection | None = None
        self._read_timeout = read_timeout
        self._deadline = math.inf
        self.timed_out = False
        self._gate: trio.Event | None = None
        self._held_writes = 0
        self._pending: list[bytes] = []
        self.write_failure: BaseException | None = None  # a write that failed midway

    # ------------------------------------------------------ trio-websocket's private state

    def message_started(self) -> bool:
        ws = self.ws
        return ws is not None and bool(ws._message_size)

    def set_incoming_limit(self, limit: int) -> None:
        assert self.ws is not None
        self.ws._max_message_size = limit

    def parse_failed(self) -> bool:
        """wsproto turns a frame it cannot parse into a close event of its own
        making and stays OPEN; a peer's close frame moves it out of OPEN."""
        ws = self.ws
        return ws is not None and ws._wsproto.state is ConnectionState.OPEN

    # ------------------------------------------------------------------ reads

    def hold(self) -> None:
        self._gate = trio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._gate is not None and not self._gate.is_set():
            await self._gate.wait()
        if not self.message_started():
            self._deadline = math.inf
            return await self.inner.receive_some(max_bytes)
        if self._deadline == math.inf:
            # The deadline covers the whole message, not each read (trickling).
            self._deadline = trio.current_time() + self._read_timeout
        with trio.move_on_at(self._deadline):
            return await self.inner.receive_some(max_bytes)
        self.timed_out = True
        raise trio.BrokenResourceError("frame unfinished past read_timeout")

    # ------------------------------------------------------------------ writes

    def hold_writes(self, count: int) -> None:
        """Hold ``count`` more writes (a ``send_many`` of ``count + 1`` messages).

        Counts add up, so concurrent ``send_many`` calls (or a pong the reader
        writes meanwhile) interleave whole messages, in lock order, and the
        last write of the last of them always finds nothing held: every call
        adds one hold fewer than it writes.
        """
        self._held_writes += count

    def drop_held_writes(self) -> None:
        self._held_writes = 0
        self._pending.clear()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._held_writes:
            # trio-websocket writes under its own lock, one message at a time;
            # a held write only appends, and the next unheld one sends it all.
            self._held_writes -= 1
            self._pending.append(bytes(data))
            return
        if self._pending:
            self._pending.append(bytes(data))
            data = b"".join(self._pending)
            self._pending.clear()
        try:
            await self.inner.send_all(data)
        except BaseException as exc:
            # Part of a message may be on the wire (a cancelled write): the
            # connection is unusable, so close it rather than let it be reused.
            self.drop_held_writes()
            if self.write_failure is None:
                self.write_failure = exc
            await trio.aclose_forcefully(self.inner)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _EagerSend:
    """trio-websocket's reader hands messages to ``receive`` through this: a
    message goes into the queue without a pass through the scheduler when
    there is room (``MemorySendChannel.send`` always yields once first)."""

    def __init__(self, inner: trio.MemorySendChannel[Any]) -> None:
        self.inner = inner

    async def send(self, value: Any) -> None:
        try:
            self.inner.send_nowait(value)
        except trio.WouldBlock:
            await self.inner.send(value)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _deliver_eagerly(ws: trio_websocket.WebSocketConnection) -> None:
    ws._send_channel = cast(Any, _EagerSend(ws._send_channel))


class _ReaderHost:
    """Stands in for the nursery trio-websocket starts its reader task in.

    The reader runs in the real nursery, but contained: its cancel scope is
    ours (``aclose`` ends it), and an exception it raises (a refused upgrade)
    is kept for the handshake to report instead of crashing the nursery, which
    belongs to the caller (a client's, a node's).
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.scope = trio.CancelScope()
        self.failure: Exception | None = None
        self.handshake_scope: trio.CancelScope | None = None

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object,
                   name: object = None) -> None:
        self._nursery.start_soon(self._run, fn, *args, name=name or "websocket reader")

    async def _run(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        try:
            with self.scope:
                await fn(*args)
        except Exception as exc:
            self.failure = exc
            log.debug("websocket reader ended: %r", exc)
        finally:
            if self.handshake_scope is not None:
                self.handshake_scope.cancel()  # the reader ended before the upgrade did


class WebSocketConnection(Connection):
    """Droplet frames as binary messages over an open trio-websocket connection."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        stream: _Adapter,
        reader: _ReaderHost,
        remote_address: str,
        options: TransportOptions,
    ) -> None:
        self._ws = ws
        self._stream = stream  # the byte stream (the conformance suite's _vanish cuts it)
        self._reader = reader
        self.remote_address = remote_address
        self.max_frame_size = options.max_frame_size
        self._incoming_limit = options.max_frame_size
        self._read_timeout = options.read_timeout
        self._closed = False  # aclose() was called
        # How the connection ended, once it has: what receive raises (a fresh
        # exception each time) and what a send says.
        self._end: tuple[type[BaseException], str] | None = None

    def limit_incoming(self, max_frame_size: int | None) -> None:
        limit = self.max_frame_size if max_frame_size is None else max_frame_size
        self._incoming_limit = limit
        self._stream.set_incoming_limit(limit)

    async def send(self, frame: bytes) -> None:
        await self.send_many((frame,))

    async def send_many(self, frames: Sequence[bytes]) -> None:
        for frame in frames:
            if len(frame) > self.max_frame_size:
                raise ValueError(
                    f"frame of {len(frame)} bytes exceeds max_frame_size={self.max_frame_size}"
                )
        if self._closed:
            raise trio.ClosedResourceError("connection is closed")
        if self._end is not None:
            raise trio.BrokenResourceError(self._end[1] or self._gone())
        if not frames:
            await trio.lowlevel.checkpoint()
            return
        # No lock of our own: trio-websocket writes each message under its
        # lock, and the adapter closes the stream if a write is cancelled midway.
        self._stream.hold_writes(len(frames) - 1)
        try:
            for frame in frames:
                await self._ws.send_message(frame if type(frame) is bytes else bytes(frame))
        except ConnectionClosed as exc:
            self._stream.drop_held_writes()
            if self._closed:
                raise trio.ClosedResourceError("connection is closed") from None
            raise trio.BrokenResourceError(self._why_closed(exc)) from None
        except BaseException:
            self._stream.drop_held_writes()
            raise

    async def receive(self) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("connection is closed")
        self._stream.release()
        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            if self._closed:
                raise trio.ClosedResourceError("connection is closed") from None
            raise await self._ended(exc) from None
        if isinstance(message, str):
            await self._fail(
                _UNSUPPORTED_DATA,
                f"{self.remote_address} sent a text message; "
                "Droplet frames travel as binary messages",
            )
        if len(message) > self._incoming_limit:  # read before limit_incoming lowered it
            await self._fail(_MESSAGE_TOO_BIG, self._too_big())
        return message

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        await self._hang_up(1000, None)

    # ------------------------------------------------------------------ internals

    def _too_big(self) -> str:
        return f"{self.remote_address} sent a frame over max_frame_size={self._incoming_limit}"

    def _gone(self) -> str:
        return f"{self.remote_address} closed the connection"

    def _why_closed(self, exc: ConnectionClosed) -> str:
        if self._end is not None:
            return self._end[1] or self._gone()
        reason = exc.reason
        if reason is None or reason.code == _ABNORMAL:
            return f"{self.remote_address} went away without a close frame"
        why = f" ({reason.reason})" if reason.reason else ""
        return f"{self.remote_address} closed the connection with code {reason.code}{why}"

    def _classify(self, exc: ConnectionClosed) -> tuple[type[BaseException], str]:
        """How a connection trio-websocket saw end ends for us (the first time)."""
        reason = exc.reason
        code = None if reason is None else reason.code
        why = "" if reason is None else reason.reason
        write_failure = self._stream.write_failure
        if write_failure is not None:
            what = ("was cancelled" if isinstance(write_failure, trio.Cancelled)
                    else f"failed ({write_failure})")
            return trio.BrokenResourceError, (
                f"a send to {self.remote_address} {what} midway; the connection was closed")
        if self._stream.timed_out:
            return ProtocolError, (f"{self.remote_address} left a frame unfinished for "
                                   f"{self._read_timeout:g} s")
        if code == _MESSAGE_TOO_BIG:
            return ProtocolError, f"{self._too_big()} ({why})"
        if code is not None and code != _ABNORMAL and self._stream.parse_failed():
            return ProtocolError, f"{self.remote_address} sent an invalid WebSocket frame: {why}"
        if code == _ABNORMAL and self._stream.message_started():
            return ProtocolError, f"{self.remote_address} closed the connection mid-frame"
        if code in _CLEAN_CODES:
            return trio.EndOfChannel, ""
        return trio.BrokenResourceError, self._why_closed(exc)

    async def _ended(self, exc: ConnectionClosed) -> BaseException:
        """The exception ``receive`` raises for a connection trio-websocket saw end.

        The first time, the stream is closed too: the closing handshake (if
        any) is over, and a peer that ends a connection is owed no more bytes.
        """
        if self._end is None:
            self._end = self._classify(exc)
            await self._abort()
        cls, message = self._end
        return cls(message) if message else cls()

    async def _fail(self, code: int, message: str) -> NoReturn:
        """The peer broke Droplet's rules: tell it why, hang up, raise ProtocolError."""
        self._end = (ProtocolError, message)
        await self._hang_up(code, message[:120])
        raise ProtocolError(message)

    async def _hang_up(self, code: int, reason: str | None) -> None:
        """Run the closing handshake if possible, then close the stream and stop the reader.

        Shielded and bounded by CLOSE_TIMEOUT: a peer that stopped reading (or a
        sender stuck behind it holding the lock) cannot keep us from closing.
        """
        self._stream.release()  # the reader must see the peer's close reply
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_TIMEOUT):
                try:
                    await self._ws.aclose(code, reason)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            await trio.aclose_forcefully(self._stream.inner)
        self._reader.scope.cancel()

    async def _abort(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._stream.inner)
        self._reader.scope.cancel()


# ---------------------------------------------------------------------- handshakes


async def _open_client_side(
    nursery: trio.Nursery, stream: trio.abc.Stream, url: str, host_header: str,
    options: TransportOptions,
) -> WebSocketConnection:
    """Run the client's upgrade over ``stream``; the reader runs in ``nursery``."""
    adapter = _Adapter(stream, options.read_timeout)
    reader = _ReaderHost(nursery)
    try:
        with trio.CancelScope() as handshake:
            reader.handshake_scope = handshake
            ws = await trio_websocket.wrap_client_stream(
                cast(Any, reader), cast(Any, adapter), host_header, "/",
                message_queue_size=MESSAGE_QUEUE_SIZE,
                max_message_size=options.max_frame_size,
                receive_buffer_size=RECEIVE_SIZE,
            )
        reader.handshake_scope = None
        if handshake.cancelled_caught:
            failure = reader.failure
            if isinstance(failure, ConnectionRejected):
                raise _HandshakeFailed(
                    f"{url} refused the WebSocket upgrade (HTTP {failure.status_code}); "
                    "is it a Droplet ws:// listener?")
            raise _HandshakeFailed(
                f"{url} answered the WebSocket handshake with something else, or hung up "
                f"({failure or 'no upgrade'}); is it a Droplet ws:// listener?")
    except BaseException:
        reader.scope.cancel()
        raise
    adapter.ws = ws
    _deliver_eagerly(ws)
    return WebSocketConnection(ws, adapter, reader, url, options)


async def _open_server_side(
    nursery: trio.Nursery, stream: trio.abc.Stream, remote: str, options: TransportOptions,
) -> WebSocketConnection:
    """Accept the upgrade over ``stream``; the reader runs in ``nursery``."""
    adapter = _Adapter(stream, options.read_timeout)
    reader = _ReaderHost(nursery)
    try:
        with trio.CancelScope() as handshake:
            reader.handshake_scope = handshake
            request = await trio_websocket.wrap_server_stream(
                cast(Any, reader), adapter,
                message_queue_size=MESSAGE_QUEUE_SIZE,
                max_message_size=options.max_frame_size,
                receive_buffer_size=RECEIVE_SIZE,
            )
            adapter.hold()  # nothing past the upgrade is read before the handler asks
            ws = await request.accept()
        reader.handshake_scope = None
        if handshake.cancelled_caught:
            raise _HandshakeFailed(f"not a WebSocket upgrade ({reader.failure or 'hung up'})")
    except ConnectionClosed as exc:
        reader.scope.cancel()
        raise _HandshakeFailed(f"hung up during the WebSocket upgrade ({exc})") from None
    except BaseException:
        reader.scope.cancel()
        raise
    adapter.ws = ws
    _deliver_eagerly(ws)
    return WebSocketConnection(ws, adapter, reader, remote, options)


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
            async with trio.open_nursery() as nursery:  # this connection's reader
                try:
                    with trio.fail_after(options.read_timeout):
                        if isinstance(stream, trio.SSLStream):
                            await stream.do_handshake()
                        conn = await _open_server_side(
                            nursery, stream, peer_url(scheme, stream), options)
                except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError,
                        _HandshakeFailed) as exc:
                    log.debug("dropped a connection before its WebSocket upgrade: %s", exc)
                    await trio.aclose_forcefully(stream)
                    return  # not a WebSocket client, or too slow to become one
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
                try:
                    await handler(conn)
                except trio.BrokenResourceError:
                    pass  # the peer went away
                finally:
                    await conn.aclose()

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, on_stream, stream_listeners)
            task_status.started(bound)

    async def connect(
        self, url: str, options: TransportOptions, nursery: trio.Nursery
    ) -> Connection:
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
                    try:
                        await stream.do_handshake()
                    except (trio.BrokenResourceError, ssl.SSLError) as exc:
                        raise ConnectionError(
                            f"TLS handshake with {url} failed: {exc.__cause__ or exc}"
                        ) from exc
                shown = f"[{host}]" if ":" in host else host
                return await _open_client_side(nursery, stream, url, f"{shown}:{port}", options)
        except trio.TooSlowError as exc:
            await trio.aclose_forcefully(stream)
            raise ConnectionError(
                f"{url} did not finish the WebSocket handshake within "
                f"{options.read_timeout:g} s; is it a Droplet ws:// listener?"
            ) from exc
        except _HandshakeFailed as exc:
            await trio.aclose_forcefully(stream)
            raise ConnectionError(str(exc)) from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
