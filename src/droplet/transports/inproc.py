"""``inproc://NAME``: connections between tasks of one Trio run, no sockets.

By default frames cross as the same encoded ``bytes`` the socket transports
send, so an embedded cluster exercises exactly the codec the network does
(STYLE.md, "same bytes everywhere"); only the kernel is skipped. Two
exceptions for big messages: one in pieces is joined into a pooled buffer
(warm memory, as a socket's receiver uses), and one whose big values nobody
can change (``bytes`` arguments and results) crosses as a
:class:`~droplet.protocol.parcel.Parcel`, so the function gets the very
``bytes`` object instead of two copies of it.

A listener started with ``TransportOptions(skip_encoding=True)`` gives its
connections :attr:`~droplet.transports.base.Connection.carries_objects`: they
also carry :class:`~droplet.protocol.parcel.Parcel` objects (a message, not
its encoding), which :class:`~droplet.rpc.Peer` then sends instead of frames.
Both kinds count against ``max_frame_size`` by ``len()``.

Any of these connections (frames or objects) may also hand a message over
with no task switch at all:
while its reader waits with nothing queued, a frame sent to it is first
offered to the callback its owner registered with :meth:`InprocConnection.take_directly`
(a :class:`~droplet.rpc.Peer` takes replies, and requests its handler can
serve without waiting, there and then, in the sender's task). Anything the
callback declines, and anything sent while a frame is queued, goes through
the queue as before, so frames are still handled in the order they were sent.

A connection that carries objects may also have a *lane*: an object the
service behind one end offers (:meth:`InprocConnection.offer_lane`) for the
other end to call directly, with no message at all (an executor's
:class:`~droplet.executor.inline.Lane`). :meth:`InprocConnection.lane` returns
it while both ends are open.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import trio

from ..errors import ConnectionError, ProtocolError
from ..protocol.framing import Gather, join
from .base import Connection, ConnectionHandler, Transport, TransportOptions

__all__ = ["InprocConnection", "InprocTransport"]

# Frames a sender may queue before it waits for the receiver (backpressure).
QUEUE_FRAMES = 1024

# name -> (owning run, channel of incoming connections, listener's max_frame_size,
#          whether its connections carry objects)
_listeners: dict[
    str, tuple[trio.lowlevel.TrioToken, trio.MemorySendChannel[InprocConnection], int, bool]
] = {}
_names = itertools.count(1)


class InprocConnection(Connection):
    def __init__(
        self,
        send_channel: trio.MemorySendChannel[bytes],
        receive_channel: trio.MemoryReceiveChannel[bytes],
        remote_address: str,
        max_frame_size: int,
        carries_objects: bool = False,
    ) -> None:
        self.carries_objects = carries_objects
        self._send = send_channel
        self._recv = receive_channel
        self.remote_address = remote_address
        self._max = max_frame_size
        self._incoming_limit = max_frame_size
        #: the other end (set by ``_pair``), whose reader a send may serve directly.
        self._other: InprocConnection | None = None
        #: True while this end's reader waits with nothing queued.
        self._idle = False
        #: takes a frame in the sender's task (see ``take_directly``), or None.
        self._taker: Callable[[object], bool] | None = None
        self._shut = False  # aclose() was called
        #: takes a frame sent from another thread (see ``take_from_threads``), or None.
        self._thread_taker: Callable[[object], bool] | None = None
        #: what the service behind this end offers the other end to call directly.
        self._lane: object | None = None

    @property
    def has_lane(self) -> bool:
        """Whether this end offers a lane already (see :meth:`offer_lane`)."""
        return self._lane is not None

    def offer_lane(self, lane: object) -> None:
        """Let the other end call ``lane`` directly instead of sending messages
        (objects connections only: an encoded one keeps to its frames)."""
        if self.carries_objects and not self._shut:
            self._lane = lane

    def lane(self) -> object | None:
        """What the other end's service offers to be called directly, or None
        (none offered, frames, or either end closed)."""
        other = self._other
        if other is None or self._shut or other._shut:
            return None
        return other._lane

    def take_directly(self, taker: Callable[[object], bool] | None) -> None:
        """Offer frames sent to this end to ``taker`` first, in the sender's task,
        whenever this end's reader waits with nothing queued (encoded frames and,
        in objects mode, parcels alike).

        ``taker(frame)`` returns True when it handled the frame (then it is not
        queued), False to leave it to the reader. It must not wait, and must not
        raise: it runs inside someone else's ``send``. None stops the offers.
        """
        self._taker = taker

    def take_from_threads(self, taker: Callable[[object], bool] | None) -> None:
        """Let threads other than the loop's hand frames to ``taker``: see
        :meth:`offer_from_thread`. ``taker`` must be thread-safe, must not
        raise, and returns False for a frame it leaves to the loop."""
        self._thread_taker = taker

    def offer_from_thread(self, frame: object) -> bool:
        """From any thread: hand ``frame`` to the other end's thread taker now.

        False when it was not taken (no taker, the frame is over the limit, the
        connection is closed, or the taker declined): send it from the loop as
        usual. A frame taken here passes no queue, so it keeps no order with
        frames the loop sends (calls from threads are independent requests and
        their replies)."""
        other = self._other
        if other is None or self._shut:
            return False
        taker = other._thread_taker
        size = len(frame)  # type: ignore[arg-type]
        if taker is None or size > self._max or size > other._incoming_limit:
            return False
        return taker(frame)

    def _offer(self, frame: object) -> bool:
        """Hand ``frame`` to the other end's taker, if it is waiting with an empty queue."""
        other = self._other
        if other is None or not other._idle or self._shut:
            return False
        taker = other._taker
        if taker is None or len(frame) > other._incoming_limit:  # type: ignore[arg-type]
            return False
        return taker(frame)

    def _queued(self) -> None:
        """A frame went into the queue: the other end's reader takes it (and any
        frame after it must queue behind it), so nothing is offered meanwhile."""
        other = self._other
        if other is not None:
            other._idle = False

    #: ``send`` takes :class:`~droplet.protocol.framing.Gather` payloads: a big
    #: one is joined into a pooled buffer (see :func:`~droplet.protocol.framing.join`).
    gather_writes = True
    #: Both ends are in this process: :class:`~droplet.rpc.Peer` sends a big
    #: message of immutable values as a Parcel even without ``carries_objects``.
    in_process = True

    async def send(self, frame: bytes) -> None:
        if len(frame) > self._max:
            raise ValueError(f"frame of {len(frame)} bytes exceeds max_frame_size={self._max}")
        if isinstance(frame, Gather):  # what Peer sends big messages as
            frame = join(frame)
        try:
            if self.carries_objects:
                # The fast mode does not yield to the scheduler when the queue has
                # room (a task switch costs more than the send): it still notices
                # a cancellation, and waits like any send when the queue is full.
                await trio.lowlevel.checkpoint_if_cancelled()
                if self._offer(frame):
                    return
                try:
                    self._send.send_nowait(frame)
                    self._queued()
                    return
                except trio.WouldBlock:
                    pass
            elif self._other is not None and self._other._idle:
                # Encoded frames are handed over in the sender's task too (the same
                # bytes, decoded by the receiver): no task switch when taken.
                await trio.lowlevel.checkpoint_if_cancelled()
                if self._offer(frame):
                    return
            # Before the send, which may yield: by the time it returns, the
            # reader may have taken the frame and be waiting, idle, again.
            self._queued()
            await self._send.send(frame)
        except trio.ClosedResourceError:
            raise
        except trio.BrokenResourceError:
            raise trio.BrokenResourceError(f"{self.remote_address} went away") from None

    def try_send(self, frame: object) -> bool:
        """Send without waiting: False when the frame must go the slow way (the
        queue is full, the frame is over the limit, the connection is closed, or
        it is not whole ``bytes`` on a connection of encoded frames), so the
        caller's ``send`` raises what it should."""
        if len(frame) > self._max:  # type: ignore[arg-type]
            return False
        if not self.carries_objects and type(frame) is not bytes:
            return False  # a Gather of a big message: the writer joins it
        if self._offer(frame):
            return True
        try:
            self._send.send_nowait(frame)  # type: ignore[arg-type]
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self._queued()
        return True

    def limit_incoming(self, max_frame_size: int | None) -> None:
        self._incoming_limit = self._max if max_frame_size is None else max_frame_size

    async def receive(self) -> bytes:
        # EndOfChannel when the peer closed.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            frame = self._recv.receive_nowait()
        except trio.WouldBlock:
            self._idle = True  # a sender may now hand frames to our taker
            try:
                frame = await self._recv.receive()
            finally:
                self._idle = False
        else:
            if not self.carries_objects:  # as in send: no task switch in the fast mode
                await trio.lowlevel.cancel_shielded_checkpoint()
        if len(frame) > self._incoming_limit:
            raise ProtocolError(
                f"{len(frame)}-byte frame exceeds the limit {self._incoming_limit}")
        return frame

    async def aclose(self) -> None:
        self._shut = True
        self._taker = None
        self._thread_taker = None
        self._lane = None
        self._idle = False
        self._send.close()
        self._recv.close()
        await trio.lowlevel.checkpoint()


def _pair(
    server_url: str, client_max: int, server_max: int, objects: bool = False
) -> tuple[InprocConnection, InprocConnection]:
    a_send, b_recv = trio.open_memory_channel[bytes](QUEUE_FRAMES)
    b_send, a_recv = trio.open_memory_channel[bytes](QUEUE_FRAMES)
    client = InprocConnection(a_send, a_recv, server_url, client_max, objects)
    server = InprocConnection(b_send, b_recv, "inproc://client", server_max, objects)
    client._other, server._other = server, client
    return client, server


class InprocTransport(Transport):
    schemes = ("inproc",)

    async def serve(
        self,
        url: str,
        handler: ConnectionHandler,
        options: TransportOptions,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        name = url.split("://", 1)[1].rstrip("/") or f"anon-{next(_names)}"
        if name in _listeners:
            raise OSError(f"inproc://{name} is already in use")
        incoming_send, incoming_recv = trio.open_memory_channel[InprocConnection](math.inf)
        _listeners[name] = (
            trio.lowlevel.current_trio_token(),
            incoming_send,
            options.max_frame_size,
            options.skip_encoding,
        )
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(f"inproc://{name}")
                async for conn in incoming_recv:
                    nursery.start_soon(_run_handler, handler, conn)
        finally:
            entry = _listeners.get(name)
            if entry is not None and entry[1] is incoming_send:
                del _listeners[name]
            incoming_send.close()

    async def connect(
        self, url: str, options: TransportOptions, nursery: trio.Nursery
    ) -> Connection:
        name = url.split("://", 1)[1].rstrip("/")
        entry = _listeners.get(name)
        if entry is None:
            raise ConnectionError(f"nothing listens at inproc://{name}")
        token, incoming, server_max, objects = entry
        if token is not trio.lowlevel.current_trio_token():
            raise ConnectionError(
                f"inproc://{name} belongs to another Trio run; inproc connections only work "
                "between tasks of the same run (use tcp:// across threads or processes)"
            )
        client, server = _pair(f"inproc://{name}", options.max_frame_size, server_max,
                               objects)
        try:
            incoming.send_nowait(server)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ConnectionError(f"inproc://{name} stopped listening") from None
        await trio.lowlevel.checkpoint()
        return client


async def _run_handler(handler: ConnectionHandler, conn: Connection) -> None:
    async with conn:
        try:
            await handler(conn)
        except trio.BrokenResourceError:
            pass  # the peer went away (as tcp:// and ws:// listeners tolerate)
