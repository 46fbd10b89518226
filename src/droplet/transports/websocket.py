"""``ws://HOST:PORT`` and ``wss://`` (WebSocket over TLS): one frame per binary message.

For peers that can only reach us through HTTP infrastructure (browsers,
proxies, load balancers). Each Droplet frame travels as one binary WebSocket
message, so WebSocket's own framing replaces the length prefix of ``tcp://``.

Two parts, each done by what does it best:

- **The opening handshake** (the HTTP upgrade, both ends) is trio-websocket's
  (``wrap_server_stream`` / ``wrap_client_stream``), over a stream that hands
  it the bytes up to the end of the HTTP head and nothing after: whatever
  follows is kept for the frame codec, and trio-websocket's reader task, which
  then waits for bytes it will never get, is cancelled. The connection needs no
  background task after that.
- **The frames** are :class:`~droplet.protocol.wsframes.WsCodec`'s (the codec
  the blocking client uses too), driven by :class:`WebSocketConnection`, a
  :class:`~droplet.transports.tcp.StreamConnection` with WebSocket framing: the
  caller's ``receive`` parses frames straight off the socket, big messages go
  into a buffer of their own (``recv_into``), writes are gathered, and a worker
  thread may write a small frame itself (``send_from_thread``), and an
  executor's plain ``ws://`` connections are read by a thread of their own
  (``read_in_thread``, see :mod:`droplet.transports.threadread`), so executors
  reached over ``ws://`` have the fast lane and the reader thread that
  ``tcp://`` has. That thread writes the pongs the codec owes (with the
  connection's locked thread write, in order with every other write; what the
  socket will not take at once the loop's writer sends); a close frame, a
  broken rule, the slowloris timeout or the end of the stream come to
  ``receive`` as exceptions, which end the connection as on the loop. ``wss://``
  stays on the loop (TLS records need it).

Why not trio-websocket's frame path: measured on a 2-core VM (one sequential
no-op call, ``benchmarks/cpuprobe.py --scheme ws|tcp``, least of three runs),
the executor spent 540 us of CPU per call over ``ws://`` against 287 us over
``tcp://``: wsproto's parser alone took ~35-50 us per message received (this
codec ~9 us), trio-websocket's reader a task switch and a memory channel per
message, and its connection cannot be written from a thread, so ws executors
had no fast lane. With this module the executor spends 280 us per call over
``ws://`` (p50 0.40 ms against 0.44 ms for tcp in the same window); see
docs/discussion/architecture.rst.

Droplet's rules, as for every transport:

- binary messages only: a text message is a :class:`~droplet.ProtocolError`
  naming it, and the connection closes with code 1003;
- ``max_frame_size`` both ways, and the lower pre-authentication limit of
  ``limit_incoming``, checked on the declared length before anything is set
  aside (fragments of one message count together); nothing past the upgrade is
  read before the handler first calls ``receive``, so the limit is in place;
- a message whose first bytes arrived must be complete within ``read_timeout``
  (slowloris), and so must the TLS and HTTP opening handshakes;
- pings are answered, the closing handshake is answered and started (bounded by
  ``CLOSE_TIMEOUT``, shielded: a peer that stopped reading cannot keep us from
  hanging up), a peer that breaks RFC 6455 gets the close code it earned;
- errors in Droplet's terms: ``ConnectionError`` naming the address (and the
  fix) for a failed dial, TLS handshake or upgrade; ``EndOfChannel`` for a clean
  close (codes 1000, 1001, 1005), ``BrokenResourceError`` for any other end
  (a close code with its reason, or no close frame at all), ``ProtocolError``
  for a peer that broke the rules.

No extensions are negotiated (no compression, so no decompression bombs).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, ConnectionRejected

from ..errors import ConnectionError, ProtocolError
from ..protocol.framing import Buffer, Payload
from ..protocol.wsframes import PeerClosed, WsCodec, encode_frame, server_frame_parts
from ._sockets import dial, open_listeners, peer_url
from .base import Connection, ConnectionHandler, Transport, TransportOptions
from .registry import parse_address
from .tcp import FLUSH, StreamConnection

__all__ = ["CLOSE_TIMEOUT", "WebSocketConnection", "WebSocketTransport"]

log = logging.getLogger(__name__)

#: Seconds ``aclose`` (or a refusal) may spend sending a close frame before it just hangs up.
CLOSE_TIMEOUT = 1.0


class _HandshakeFailed(Exception):
    """The WebSocket opening handshake did not complete (the reason is the message)."""


class _HeadOnly(trio.abc.Stream):
    """The stream trio-websocket runs the opening handshake over.

    Reads pass through until the HTTP head (request or response) is complete;
    the bytes after it are kept in :attr:`rest` for the frame codec and later
    reads wait forever (until trio-websocket's reader is cancelled). A client
    whose upgrade was refused reads on, so trio-websocket can report the refusal.
    """

    def __init__(self, inner: trio.abc.Stream, client: bool) -> None:
        self.inner = inner
        self._client = client
        self._head = bytearray()
        self._done = False  # the head is in: no more reads
        self._passing = False  # a refusal: every read passes
        self.rest = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._done:
            await trio.sleep_forever()
        data = await self.inner.receive_some(max_bytes)
        if self._passing:
            return data
        seen = len(self._head)
        self._head += data  # bounded: h11 refuses a head over 16 KiB
        end = self._head.find(b"\r\n\r\n", max(0, seen - 3))
        if end < 0:
            return data
        if self._client and not self._head.startswith(b"HTTP/1.1 101 "):
            self._passing = True  # trio-websocket reads the refusal's body
            self._head = bytearray()
            return data
        self._done = True
        cut = end + 4
        self.rest = bytes(self._head[cut:])
        passed = bytes(self._head[seen:cut])
        self._head = bytearray()
        return passed

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _ReaderHost:
    """Stands in for the nursery trio-websocket starts its reader task in.

    The reader runs in the real nursery, but contained: its cancel scope is
    ours (the handshake's end cancels it), and an exception it raises (a refused
    upgrade) is kept for the handshake to report instead of crashing the
    nursery, which belongs to the caller (a client's, a node's).
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.scope = trio.CancelScope()
        self.failure: Exception | None = None
        self.handshake_scope: trio.CancelScope | None = None

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object,
                   name: object = None) -> None:
        self._nursery.start_soon(self._run, fn, *args, name=name or "websocket handshake")

    async def _run(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        try:
            with self.scope:
                await fn(*args)
        except Exception as exc:
            self.failure = exc
            log.debug("websocket handshake reader ended: %r", exc)
        finally:
            if self.handshake_scope is not None:
                self.handshake_scope.cancel()  # the reader ended before the upgrade did


class WebSocketConnection(StreamConnection):
    """Droplet frames as binary WebSocket messages over a stream past its upgrade.

    ``client``: this end opened the connection (it masks what it sends).
    ``rest``: bytes that arrived right after the HTTP head.
    """

    def __init__(self, stream: trio.abc.Stream, remote_address: str,
                 options: TransportOptions, *, client: bool, rest: bytes = b"") -> None:
        super().__init__(stream, remote_address, options)
        self._codec = WsCodec(remote_address, options.max_frame_size, client=client)
        self._decoder = self._codec  # type: ignore[assignment]
        if rest:
            self._codec.feed(rest)
        self._aclosed = False  # aclose() was called
        # How the connection ended, once it has: what receive raises (a fresh
        # exception each time) and what a send says.
        self._end: tuple[type[BaseException], str] | None = None

    def _frame_parts(self, data: Payload | memoryview) -> list[Buffer]:
        size = len(data) if type(data) is not memoryview else data.nbytes
        if size > self._send_limit:
            raise ValueError(
                f"frame of {size} bytes exceeds max_frame_size={self._send_limit}")
        # (Not the codec's frame_parts: its limit is the incoming one, maybe lowered.)
        return [encode_frame(data)] if self._codec.client else server_frame_parts(data)

    # Read by a thread (``read_in_thread``, plain ``ws://`` on POSIX, as ``tcp://``):
    # the thread writes the pongs the codec owes itself (``_owed_in_thread``); a
    # close frame, a broken rule, a timeout or the end of the stream reach
    # ``receive`` as the exception they are, which ends the connection as below.

    def _owed_in_thread(self) -> Callable[[], None] | None:
        return self._send_owed

    def _send_owed(self) -> None:
        """In the reader thread: the pongs owed, written now (in order with every
        other write; the loop's writer sends what the socket would not take)."""
        out = self._codec.take_output()
        if not out:
            return
        try:
            done = self._thread_write(out, control=True)
        except trio.ClosedResourceError:
            return  # closing: our close frame is (or was) on its way instead
        if done == FLUSH and self._thread_offer is not None:
            try:
                self._thread_offer[1].run_sync_soon(
                    trio.lowlevel.spawn_system_task, self._flush_owed)
            except trio.RunFinishedError:
                pass
        # (REFUSED: the socket failed; the reader finds out and ends the connection)

    async def _flush_owed(self) -> None:
        try:
            await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the connection ended (and _write aborted it)

    def _no_more_thread_writes(self) -> None:
        """Our close frame goes next: nothing from a thread after it."""
        with self._tlock:
            self._threads_done = True

    def send_from_thread(self, data: bytes) -> int:
        # Nothing from a worker thread once our close frame may be on its way.
        if self._aclosed or self._end is not None:
            raise trio.ClosedResourceError("connection is closed")
        return super().send_from_thread(data)

    def send_many_from_thread(self, payloads: Sequence[bytes]) -> int:
        if self._aclosed or self._end is not None:  # as send_from_thread
            raise trio.ClosedResourceError("connection is closed")
        return super().send_many_from_thread(payloads)

    async def _write(self, parts: list[Buffer]) -> None:
        if self._end is not None and not self._aclosed:
            raise trio.BrokenResourceError(self._end[1] or self._gone())
        await super()._write(parts)

    async def _read_more(self) -> bool:
        if self._codec.has_output:  # a pong owed while we wait for more
            await super()._write([self._codec.take_output()])
        return await super()._read_more()

    async def receive(self) -> bytes | memoryview:  # type: ignore[override]
        if self._aclosed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("connection is closed")
        if self._end is not None:
            await trio.lowlevel.checkpoint()
            raise self._raise_end()
        try:
            frame = await super().receive()
        except PeerClosed as exc:
            await self._end_with(trio.EndOfChannel if exc.clean else trio.BrokenResourceError,
                                 "" if exc.clean else str(exc))
            raise self._raise_end() from None
        except ProtocolError as exc:  # its close frame (if any) is owed
            await self._end_with(ProtocolError, str(exc))
            raise
        except trio.EndOfChannel:
            await self._end_with(trio.BrokenResourceError,
                                 f"{self.remote_address} went away without a close frame")
            raise self._raise_end() from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self._aclosed:
                raise trio.ClosedResourceError("connection is closed") from None
            raise
        # A pong answers before anything we send next (a reader thread writes its own).
        if self._reader is None and self._codec.has_output:
            await super()._write([self._codec.take_output()])
        return frame

    async def aclose(self) -> None:
        if self._aclosed:
            await trio.lowlevel.checkpoint()
            return
        self._aclosed = True
        self._no_more_thread_writes()
        if self._end is None and not self._closed:
            await self._say_goodbye(self._codec.close(1000))
        await super().aclose()

    # ------------------------------------------------------------------ internals

    def _gone(self) -> str:
        return f"{self.remote_address} closed the connection"

    def _raise_end(self) -> BaseException:
        assert self._end is not None
        cls, message = self._end
        return cls(message) if message else cls()

    async def _end_with(self, cls: type[BaseException], message: str) -> None:
        """The connection ended (the peer closed or broke the rules): send the close
        frame owed, if any, and hang up; ``receive`` raises ``cls(message)`` from now on."""
        self._no_more_thread_writes()
        owed = self._codec.take_output()  # (the reader thread, if any, has ended)
        if owed and not self._closed:
            await self._say_goodbye(owed)
        self._end = (cls, message)
        await self._abort()

    async def _say_goodbye(self, close: bytes) -> None:
        """Send a close frame, shielded and bounded: a peer that stopped reading
        (or a sender stuck behind it) cannot keep us from hanging up."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await super()._write([close])
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


# ---------------------------------------------------------------------- handshakes


async def _handshake(
    nursery: trio.Nursery, stream: trio.abc.Stream, client: bool,
    upgrade: Callable[[_ReaderHost, _HeadOnly], Awaitable[object]],
) -> bytes:
    """Run trio-websocket's side of the upgrade (``upgrade``) over ``stream``.

    Returns the bytes that came after the HTTP head; raises _HandshakeFailed.
    Its reader task runs in ``nursery`` and is cancelled before this returns.
    """
    head = _HeadOnly(stream, client)
    reader = _ReaderHost(nursery)
    try:
        with trio.CancelScope() as scope:
            reader.handshake_scope = scope
            await upgrade(reader, head)
        reader.handshake_scope = None
        if scope.cancelled_caught:
            failure = reader.failure
            if not client:
                raise _HandshakeFailed(f"not a WebSocket upgrade ({failure or 'hung up'})")
            if isinstance(failure, ConnectionRejected):
                raise _HandshakeFailed(f"refused the WebSocket upgrade (HTTP "
                                       f"{failure.status_code}); is it a Droplet ws:// listener?")
            raise _HandshakeFailed(
                f"answered the WebSocket handshake with something else, or hung up "
                f"({failure or 'no upgrade'}); is it a Droplet ws:// listener?")
    except ConnectionClosed as exc:
        raise _HandshakeFailed(f"hung up during the WebSocket upgrade ({exc})") from None
    finally:
        reader.scope.cancel()  # the frames are ours from here
    return head.rest


async def _accept(
    nursery: trio.Nursery, stream: trio.abc.Stream, remote: str, options: TransportOptions,
) -> WebSocketConnection:
    """The server's side of the upgrade over ``stream``, then its connection."""
    async def upgrade(reader: _ReaderHost, head: _HeadOnly) -> None:
        request = await trio_websocket.wrap_server_stream(reader, head)  # type: ignore[arg-type]
        await request.accept()

    rest = await _handshake(nursery, stream, False, upgrade)
    return WebSocketConnection(stream, remote, options, client=False, rest=rest)


async def _connect(
    nursery: trio.Nursery, stream: trio.abc.Stream, url: str, host_header: str,
    options: TransportOptions,
) -> WebSocketConnection:
    """The client's side of the upgrade over ``stream``, then its connection."""
    async def upgrade(reader: _ReaderHost, head: _HeadOnly) -> None:
        await trio_websocket.wrap_client_stream(
            reader, head, host_header, "/")  # type: ignore[arg-type]

    try:
        rest = await _handshake(nursery, stream, True, upgrade)
    except _HandshakeFailed as exc:
        raise _HandshakeFailed(f"{url} {exc}") from None
    return WebSocketConnection(stream, url, options, client=True, rest=rest)


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
            async with trio.open_nursery() as nursery:  # the handshake's reader
                try:
                    with trio.fail_after(options.read_timeout):
                        if isinstance(stream, trio.SSLStream):
                            await stream.do_handshake()
                        conn = await _accept(nursery, stream, peer_url(scheme, stream), options)
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
                return await _connect(nursery, stream, url, f"{shown}:{port}", options)
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
