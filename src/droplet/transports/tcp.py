"""``tcp://HOST:PORT`` (and ``tls://`` with the standard ``ssl`` module).

One length-prefixed byte stream per connection. ``receive`` owns the
:class:`~droplet.protocol.framing.FrameDecoder`; because ``receive_some`` (and
``recv_into``) either returns bytes or is cancelled with none consumed, a
cancelled ``receive`` loses nothing and the decoder keeps any partial frame. A
cancelled ``send`` may have written half a frame, so it closes the connection.

Big frames cost one copy per hop and few trips through the event loop: on
plain TCP the rest of a big frame is received with ``recv_into`` straight into
the buffer the decoder set aside for it (as much per call as the kernel has),
and a :class:`~droplet.protocol.framing.Gather` payload is written with
``sendmsg`` from the buffers it is made of, never joined.

A worker thread may write a small frame itself (:meth:`StreamConnection.send_from_thread`,
plain TCP on POSIX): one non-blocking ``send`` on the socket when no Trio task is
writing, so an executor's reply costs no wakeup of the event loop. A thread lock
shared with the Trio writer keeps every frame whole and in order: while a Trio
task writes, or bytes are still waiting, the thread's frame joins the backlog,
which the Trio writer sends before anything newer.
"""

from __future__ import annotations

import errno
import math
import os
import socket as _socket
import ssl
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import trio

from ..errors import ConnectionError, ProtocolError
from ..protocol.framing import BIG_FRAME, Buffer, FrameDecoder, Payload, frame_parts
from ._sockets import dial, open_listeners, peer_url
from .base import Connection, ConnectionHandler, Transport, TransportOptions
from .registry import parse_address
from .threadread import HANDED_BACK, Abort, Offer, ThreadReader

__all__ = ["StreamConnection", "TcpTransport"]

RECEIVE_SIZE = 256 * 1024
#: Largest read for a big frame over TLS (which cannot ``recv_into``).
BIG_RECEIVE_SIZE = 4 * 1024 * 1024
#: Buffers per ``sendmsg`` (Linux takes at most 1024).
IOV_MAX = 512
#: Seconds ``aclose`` may spend on TLS's close_notify before it just hangs up.
CLOSE_TIMEOUT = 1.0
#: Bytes a worker thread may leave queued for the Trio writer; past it,
#: :meth:`StreamConnection.send_from_thread` refuses (the caller takes the loop's path).
THREAD_BACKLOG_BYTES = 4 * 1024 * 1024

#: Frames read on Trio after a reader thread gave the reading back before a
#: thread is tried again (see :meth:`StreamConnection.read_in_thread`).
THREAD_RETRY_AFTER = 256

#: What :meth:`StreamConnection.send_from_thread` did with a frame.
SENT = 0  # written (or queued behind a Trio write that will send it)
FLUSH = 1  # queued: the caller must have the loop call ``flush()``
REFUSED = 2  # not taken: send it from the loop as usual


class StreamConnection(Connection):
    """Frames over any ``trio.abc.Stream`` (TCP socket, TLS stream)."""

    def __init__(self, stream: trio.abc.Stream, remote_address: str, options: TransportOptions):
        self._stream = stream
        #: the raw trio socket of a plain TCP stream (receive_into, sendmsg); None for TLS.
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._lowat = 1  # SO_RCVLOWAT in force (-1: cannot be set)
        #: sendmsg is missing on some platforms (Windows): then parts are sent one by one.
        self._gather = self._sock is not None and hasattr(self._sock, "sendmsg")
        self.remote_address = remote_address
        self._decoder = FrameDecoder(options.max_frame_size)
        self._send_limit = options.max_frame_size
        self._read_timeout = options.read_timeout
        self._send_lock = trio.Lock()
        self._closed = False
        #: Worker-thread writes (see send_from_thread): the lock guards the socket's
        #: write side, ``_busy`` (a Trio task is writing) and the backlog.
        self._fd = self._sock.fileno() if self._sock is not None and os.name == "posix" else -1
        self._tlock = threading.Lock()
        self._busy = False
        #: no thread may write any more (a subclass's closing handshake is under way).
        self._threads_done = False
        self._backlog: deque[Buffer] = deque()
        self._backlog_bytes = 0
        #: the last read left the socket empty (see _read_fd).
        self._drained = True
        # When the frame under way must be complete (set on the first wait for it).
        self._frame_deadline = math.inf
        #: the thread that reads this connection, once :meth:`read_in_thread` started it.
        self._reader: ThreadReader | None = None
        #: after it gave the reading back: what to start it again with, and the
        #: frames to read on Trio first.
        self._thread_offer: tuple[Offer, trio.lowlevel.TrioToken] | None = None
        self._thread_retry = 0

    def limit_incoming(self, max_frame_size: int | None) -> None:
        self._decoder.max_frame_size = (
            self._send_limit if max_frame_size is None else max_frame_size)

    #: ``send`` and ``send_many`` take :class:`~droplet.protocol.framing.Gather` payloads.
    gather_writes = True

    def _frame_parts(self, data: Payload | memoryview) -> list[Buffer]:
        """The pieces to write for one frame (a subclass may frame differently: ws)."""
        return frame_parts(data, self._send_limit)

    async def send(self, data: Payload) -> None:
        await self._write(self._frame_parts(data))

    async def send_many(self, frames: Sequence[Payload]) -> None:
        framed = self._frame_parts
        parts = [p for f in frames for p in framed(f)]
        if len(parts) > 1 and sum(len(p) for p in parts) < BIG_FRAME:
            parts = [b"".join(parts)]  # small frames: one write of one buffer
        await self._write(parts)

    @property
    def send_limit(self) -> int:
        """The largest frame payload this end sends (``max_frame_size``)."""
        return self._send_limit

    @property
    def thread_writes(self) -> bool:
        """Whether :meth:`send_from_thread` can write at all (plain TCP, POSIX)."""
        return self._fd >= 0

    def send_from_thread(self, data: bytes) -> int:
        """From any thread but the loop's: write one small frame's payload.

        Returns :data:`SENT` (written now, or queued behind the Trio write under
        way, which sends it), :data:`FLUSH` (queued, perhaps in part: the caller
        must get the loop to call :meth:`flush`) or :data:`REFUSED` (nothing
        taken: too big, no thread path, or too much already waiting).
        Raises ``trio.ClosedResourceError`` when the connection is closed.
        """
        if self._fd < 0 or len(data) >= BIG_FRAME:
            return REFUSED
        frame = self._frame_parts(data)[0]  # ValueError: over the limit
        return self._thread_write(bytes(frame) if type(frame) is not bytes else frame)

    def send_many_from_thread(self, payloads: Sequence[bytes]) -> int:
        """:meth:`send_from_thread` for several small frames, in order, in one write
        (one system call, one wakeup of the peer); all are taken or none."""
        if self._fd < 0:
            return REFUSED
        framed = self._frame_parts
        frames = b"".join([p for data in payloads for p in framed(data)])
        if len(frames) >= BIG_FRAME:
            return REFUSED
        return self._thread_write(frames)

    def _thread_write(self, frame: bytes, control: bool = False) -> int:
        """``control``: a few bytes the protocol owes the peer (a WebSocket pong),
        never refused for the backlog's size (a later frame must not pass them)."""
        with self._tlock:
            if self._closed or self._threads_done:
                raise trio.ClosedResourceError("connection is closed")
            if self._busy or self._backlog:
                if (self._backlog_bytes + len(frame) > THREAD_BACKLOG_BYTES
                        and not control):
                    return REFUSED
                # Behind a Trio write (which drains the backlog before it ends) or
                # behind a flush already asked for: in order either way.
                self._backlog.append(frame)
                self._backlog_bytes += len(frame)
                return SENT
            try:
                sent = os.write(self._fd, frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                return REFUSED  # let the loop's write find (and report) the error
            if sent == len(frame):
                return SENT
            rest = frame[sent:]
            self._backlog.append(rest)
            self._backlog_bytes += len(rest)
            return FLUSH

    async def flush(self) -> None:
        """Send what worker threads left queued (after :data:`FLUSH`)."""
        if self._backlog:
            await self._write([])
        else:
            await trio.lowlevel.checkpoint()

    async def _write(self, parts: list[Buffer]) -> None:
        async with self._send_lock:
            with self._tlock:
                if self._closed:
                    raise trio.ClosedResourceError("connection is closed")
                self._busy = True
                if self._backlog:  # threads' frames were queued first: they go first
                    parts = [*self._backlog, *parts]
                    self._backlog.clear()
                    self._backlog_bytes = 0
            try:
                while parts:
                    await self._write_parts(parts)
                    with self._tlock:
                        parts = list(self._backlog)
                        self._backlog.clear()
                        self._backlog_bytes = 0
                        if not parts:
                            self._busy = False
            except BaseException:
                # Half a frame may be on the wire: this connection is unusable.
                await self._abort()
                raise
            finally:
                if self._busy:
                    with self._tlock:
                        self._busy = False

    async def _write_parts(self, parts: list[Buffer]) -> None:
        if len(parts) == 1:
            await self._stream.send_all(parts[0])
        elif self._gather:
            assert self._sock is not None
            with _socket_errors():
                await _sendmsg_all(self._sock, parts)
        else:
            for part in parts:
                await self._stream.send_all(part)

    @property
    def thread_reads(self) -> bool:
        """Whether :meth:`read_in_thread` can work here (plain TCP, POSIX)."""
        return self._fd >= 0

    def read_in_thread(self, offer: Offer, token: trio.lowlevel.TrioToken) -> bool:
        """From now on a thread reads this connection and offers each frame to
        ``offer`` (see :mod:`droplet.transports.threadread`); :meth:`receive`
        returns the frames it does not take, in order. Call it only from the
        connection's reader, between two ``receive`` calls (after the handshake).
        False: not started (no thread path, or too many reader threads already:
        then ``receive`` tries again after :data:`THREAD_RETRY_AFTER` frames, as it
        does after a thread that found nothing to take gave the reading back)."""
        if not self.thread_reads or self._closed or self._reader is not None:
            return False
        self._thread_offer = (offer, token)
        self._reader = ThreadReader.start(self._fd, self._decoder, self._read_timeout,
                                          self.remote_address, offer, token,
                                          self._owed_in_thread())
        if self._reader is None:  # too many already: try again later
            self._thread_retry = THREAD_RETRY_AFTER
            return False
        return True

    def _owed_in_thread(self) -> Callable[[], None] | None:
        """What the reader thread calls when the decoder owes the peer an answer
        (``ThreadReader``'s ``owed``; WebSocket's pongs): none here."""
        return None

    async def receive(self) -> bytes | memoryview:  # type: ignore[override]
        if self._reader is not None:
            try:
                frame: bytes | memoryview = await self._reader.receive()
            except Abort as exc:  # a frame left unfinished: as below
                await self._abort()
                raise exc.error from None
            if frame is not HANDED_BACK:
                return frame
            # The thread found nothing to take and gave the reading back (the
            # decoder is ours again); it gets another go after a while.
            self._reader = None
            self._drained = False
            self._thread_retry = THREAD_RETRY_AFTER
        elif self._thread_retry and self._thread_offer is not None:
            self._thread_retry -= 1
            if not self._thread_retry and self.read_in_thread(*self._thread_offer):
                return await self.receive()
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
                    got = await self._read_more()
                if scope.cancelled_caught:
                    await self._abort()
                    raise ProtocolError(
                        f"{self.remote_address} left a frame unfinished for "
                        f"{self._read_timeout:g} s"
                    )
            else:
                got = await self._read_more()
            if not got:
                if decoder.mid_frame:
                    raise ProtocolError(f"{self.remote_address} closed the connection mid-frame")
                raise trio.EndOfChannel

    async def _read_more(self) -> bool:
        """One read into the decoder; False at the end of the stream."""
        decoder = self._decoder
        target = decoder.receive_buffer()
        if target is None and self._fd >= 0:
            data: bytes | bytearray = await self._read_fd()
        elif target is None:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        elif self._sock is not None:  # the bytes go where the frame will stay
            with _socket_errors():
                n = self._sock_recv_now(target)
                if n < 0:  # nothing there yet: wait for a big piece of it
                    self._set_lowat(min(len(target), BIG_RECEIVE_SIZE))
                    try:
                        n = await self._sock.recv_into(target)
                    finally:
                        self._set_lowat(1)
            decoder.received(n)
            return n > 0
        else:
            data = await self._stream.receive_some(min(len(target), BIG_RECEIVE_SIZE))
        decoder.feed(data)
        return bool(data)

    def _sock_recv_now(self, target: memoryview) -> int:
        """What is already there of a big frame, without a trip through the loop
        (-1: nothing yet)."""
        if self._fd < 0:
            return -1
        if self._closed:  # as _read_fd: never read a descriptor that may be reused
            raise trio.ClosedResourceError("connection is closed")
        try:
            return os.readv(self._fd, [target])
        except (BlockingIOError, InterruptedError):
            return -1

    def _set_lowat(self, size: int) -> None:
        """Wake this reader only once ``size`` bytes are there (``SO_RCVLOWAT``):
        a big frame arrives in a few big reads instead of one per segment the
        sender's kernel happens to push (each read a trip through the loop)."""
        if self._lowat == size or self._sock is None:
            return
        try:
            self._sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVLOWAT, size)
        except OSError:
            self._lowat = -1  # not supported here: read as it comes
            return
        self._lowat = size

    def _mark_closed(self) -> None:
        with self._tlock:  # no worker thread writes to the descriptor after this
            was_closed, self._closed = self._closed, True
            self._backlog.clear()
            self._backlog_bytes = 0
        if self._reader is not None and not was_closed:
            self._reader.close()
            try:  # wakes the reader thread's poll (it reads a duplicate descriptor)
                assert self._sock is not None
                self._sock.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass

    async def _read_fd(self) -> bytes:
        """One read of plain TCP: when the last read emptied the socket, wait for
        it to be readable first (one system call and one exception fewer than
        trying, failing and then waiting, which is what a message every now and
        then would otherwise cost each time)."""
        assert self._sock is not None
        while True:
            if self._closed:
                await trio.lowlevel.checkpoint()
                raise trio.ClosedResourceError("connection is closed")
            if self._drained:
                await trio.lowlevel.wait_readable(self._sock)
                if self._closed:
                    raise trio.ClosedResourceError("connection is closed")
            try:
                data = os.read(self._fd, RECEIVE_SIZE)
            except BlockingIOError:
                self._drained = True
                continue
            except OSError as exc:
                with _socket_errors():
                    raise exc
            self._drained = len(data) < RECEIVE_SIZE
            return data

    async def _abort(self) -> None:
        self._mark_closed()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._mark_closed()
        with trio.CancelScope(shield=True):
            # Bounded: TLS sends close_notify, which a peer that stopped reading
            # would otherwise make us wait for forever (and shielded at that).
            with trio.move_on_after(CLOSE_TIMEOUT):
                try:
                    await self._stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            await trio.aclose_forcefully(self._stream)


@contextmanager
def _socket_errors() -> Iterator[None]:
    """What ``trio.SocketStream`` makes of socket errors, for our direct socket calls."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


async def _sendmsg_all(sock: trio.socket.SocketType, parts: list[Buffer]) -> None:
    """Write every byte of ``parts``, in order, with gather writes."""
    views = [memoryview(p) for p in parts]
    first = 0
    while first < len(views):
        sent = await sock.sendmsg(views[first:first + IOV_MAX])
        while sent:
            view = views[first]
            if sent >= view.nbytes:
                sent -= view.nbytes
                first += 1
            else:
                views[first] = view[sent:]
                sent = 0
        while first < len(views) and not views[first].nbytes:
            first += 1


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
