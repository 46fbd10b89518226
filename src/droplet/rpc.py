"""Requests, replies and one-way messages over one transport Connection.

A :class:`Peer` owns one connection: its reader task (``run``) decodes every
frame, hands replies to the task waiting for them and passes everything else to
the service's handler. Handlers run inline in the reader, which gives natural
backpressure; a handler that must wait (a blocking read, a direct-response
call) returns :data:`DEFERRED` and answers later with :meth:`Peer.reply`.

Every connection starts with the handshake of ``protocol/handshake.py``; no
other message is decoded before it succeeds. Dialing, listening and the
handshake live in :mod:`droplet.links`.

A handler never sends to a *third* peer inline (a slow peer would stall the
connection whose reader runs the handler): it posts the message (:meth:`Peer.post`)
to that peer's bounded outbox, which the peer's own writer task drains. When
an outbox is full the peer is not reading: by default it is disconnected
(its subscriptions and waiting reads go with it), or, with
``on_full="raise"``, the poster gets a :class:`~droplet.errors.DropletError`
(a call placed on a backed-up executor fails instead of waiting).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import trio

from . import errors
from .errors import ConnectionError, DropletError, ProtocolError
from .held_replies import HOLD_BYTES, replies_held
from .outbox import OUTBOX_BYTES, OUTBOX_MESSAGES, Outbox
from .protocol.framing import BIG_FRAME, Gather, Payload, all_immutable
from .protocol.messages import (
    ErrorReply,
    InvalidMessage,
    Ok,
    encode_gather,
)
from .protocol.messages import decode as decode_message
from .protocol.messages import encode as encode_message
from .protocol.parcel import Parcel, pack, unpack
from .transports.base import Connection

__all__ = ["DEFERRED", "NOT_NOW", "Handler", "Limits", "NowHandler", "OutboxFull", "Peer",
           "ReaderHandler", "Slot", "error_from_reply"]

log = logging.getLogger("droplet.rpc")

#: Returned by a handler that will answer later with ``peer.reply(request_id, msg)``.
DEFERRED: Any = object()

Handler = Callable[["Peer", Any, int], Awaitable[Any]]
#: A handler's synchronous side: serves a request at once (its reply, None for
#: Ok, or DEFERRED), or returns :data:`NOT_NOW` to leave it to the reader.
NowHandler = Callable[["Peer", Any, int], Any]

#: Returned by a :data:`NowHandler` for a message it cannot serve without waiting.
NOT_NOW: Any = object()

#: A service's side for a connection read by a thread (``transports/threadread.py``):
#: ``(peer, msg, request_id, inline)`` from the reader thread, for a request or
#: one-way message it may serve there (thread-safe): False leaves it to the
#: read loop, True means taken (answered from a thread), and a callable is run
#: in the reader thread (only when ``inline``; it answers the request).
ReaderHandler = Callable[["Peer", Any, int, bool], "bool | Callable[[], None]"]

#: The reader yields to other tasks at least once per this many messages it
#: handles (a frame already buffered is read without a checkpoint).
CHECKPOINT_EVERY = 32


class Limits:
    """Per-connection resource limits (see the Security docs page).

    Attributes:
        max_inflight: requests from one peer being served at once; the reader
            stops reading (TCP backpressure) while the peer is at the limit.
        outbox_messages, outbox_bytes: what :meth:`Peer.post` may queue for a
            peer that is not reading (one frame of any size always fits).
    """

    def __init__(self, *, max_inflight: int = 10_000, outbox_messages: int = OUTBOX_MESSAGES,
                 outbox_bytes: int = OUTBOX_BYTES) -> None:
        self.max_inflight = max_inflight
        self.outbox_messages = outbox_messages
        self.outbox_bytes = outbox_bytes


class OutboxFull(DropletError):
    """A peer's outbox is full: it is not reading what it is sent."""


class Slot:
    """A sent request's pending reply (see :meth:`Peer.submit`)."""

    __slots__ = ("error", "event", "on_done", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        #: called (in the event loop) once the reply or an error is in.
        self.on_done: Callable[[], None] | None = None

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the reply is in: now, if it already is."""
        if self.event.is_set():
            callback()
        else:
            self.on_done = callback

    def _finish(self) -> None:
        self.event.set()
        callback, self.on_done = self.on_done, None  # holds e.g. a future: let it go
        if callback is not None:
            callback()

    def result(self) -> Any:
        """The reply; raises the request's error. Only valid once ``event`` is set."""
        if self.error is not None:
            raise self.error
        return self.value


class ThreadSlot(Slot):
    """A request sent from a thread other than the loop's (:meth:`Peer.submit_from_thread`):
    its reply, or the connection's end, calls ``on_reply(value, error)`` from
    whichever thread finishes it; its Trio event is never set."""

    __slots__ = ("on_reply",)

    def __init__(self, on_reply: Callable[[Any, BaseException | None], None]) -> None:
        super().__init__()
        self.on_reply = on_reply

    def _finish(self) -> None:
        self.on_reply(self.value, self.error)


def _encode_sharing(msg: Any, request_id: int = 0, reply: bool = False) -> Payload:
    """:func:`encode_gather`, except that a big message all of whose pieces are
    ``bytes`` (or views of ``bytes``: a big ``bytes`` argument or result) comes
    back as a :class:`Parcel`, for a connection within one process: the frame
    would be joined into a buffer and the value copied out of it again, where
    the Parcel hands over the very object (nobody can change it)."""
    frame = encode_gather(msg, request_id, reply)
    if type(frame) is Gather and all_immutable(frame):
        return cast(Payload, pack(msg, request_id, reply))
    return frame


class Peer:
    """One end of a Droplet connection."""

    def __init__(
        self,
        conn: Connection,
        handler: Handler | None = None,
        *,
        limits: Limits | None = None,
        name: str = "",
        now: NowHandler | None = None,
        thread_now: NowHandler | None = None,
        in_reader: ReaderHandler | None = None,
    ) -> None:
        self.conn = conn
        self.remote = conn.remote_address
        self.name = name or self.remote
        self._handler = handler
        #: serves requests in the sender's task, over an in-process connection
        #: that hands them over directly (``_take_now``).
        self._now = now
        #: a frame ``_take_now`` decoded and declined, with its decoding (the reader's next).
        self._predecoded: tuple[object, tuple[Any, int, bool]] | None = None
        #: serves requests sent from other threads (``_take_from_thread``); thread-safe.
        self._thread_now = thread_now
        self._ids = itertools.count(1)
        self._pending: dict[int, Slot] = {}
        self._closed = False
        self._close_reason: DropletError | None = None
        limits = limits or Limits()
        self._inflight = trio.Semaphore(limits.max_inflight)
        #: serves frames in the connection's reader thread, if it gets one (``run``).
        self._in_reader = in_reader
        #: in-flight slots the reader thread took without the semaphore (which only
        #: the loop may touch): the next releases pay them back first.
        self._borrowed = 0
        self._slot_lock = threading.Lock()
        #: set when a slot may have come free (the read loop waits for it at the limit).
        self._slot_freed = trio.Event()
        self._outbox = Outbox(limits.outbox_messages, limits.outbox_bytes)
        self._outbox_ready = trio.Event()
        self._run_scope: trio.CancelScope | None = None
        #: Worker-thread writes (write_from_thread): the connection's thread path,
        #: the loop to wake when it must finish a write, and the requests whose
        #: replies threads sent (their in-flight slots, freed in the loop).
        self._thread_send: Callable[[bytes], int] | None = (
            conn.send_from_thread if getattr(conn, "thread_writes", False)  # type: ignore[attr-defined]
            else None)
        self._token: trio.lowlevel.TrioToken | None = None  # set when ``run`` starts
        self._flush_wanted = False
        self._released: deque[None] = deque()
        self._reader_blocked = False
        #: messages dropped, and whether this peer was cut off, for a full outbox.
        self.overflowed = False
        self.on_close: list[Callable[[Peer], None]] = []
        #: Free-form per-connection state for services (e.g. an executor's id).
        self.state: dict[str, Any] = {}
        #: The largest frame this end may send, when known (connect_peer's options):
        #: ``post(..., check_size=True)`` refuses a bigger message at once.
        self.send_limit: int | None = None
        # An inproc connection with skip_encoding carries message objects: a
        # Parcel stands in for the frame (it has a len() for the limits) and
        # the reader unpacks instead of decoding (see protocol/parcel.py).
        # An encoded inproc connection hands a message whose big values nobody
        # can change (``bytes``) over as a Parcel too: no copy in one process.
        self._encode: Callable[..., Payload] = (
            cast(Callable[..., Payload], pack) if conn.carries_objects
            else _encode_sharing if getattr(conn, "in_process", False) else encode_gather)
        # ... and can take a posted message at once when its queue has room
        # (``try_send``), instead of waking this peer's writer task.
        self._try_send: Callable[[Any], bool] | None = getattr(conn, "try_send", None)

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, msg: Any) -> None:
        """Send a one-way message."""
        await self._send(self._encode(msg))

    async def send_many(self, msgs: Sequence[Any]) -> None:
        """Send several one-way messages in one write."""
        await self._send_many([self._encode(msg) for msg in msgs])

    async def reply(self, request_id: int, msg: Any) -> None:
        """Answer request ``request_id`` (used by handlers that returned DEFERRED).

        Request id 0 is a one-way message: nothing to answer, no slot to free.
        """
        if not request_id:
            return
        try:
            try:
                await self._send(self._encode(msg, request_id, reply=True))
            except ValueError as exc:
                # The reply is over max_frame_size (checked before anything is
                # written): tell the caller why instead of leaving it waiting.
                await self._send(encode_message(
                    ErrorReply("DropletError", f"{type(msg).__name__} reply too large: {exc}"),
                    request_id, reply=True))
        finally:
            self._release_slot()

    async def reply_error(self, request_id: int, exc: BaseException) -> None:
        await self.reply(request_id, _error_reply(exc))

    @property
    def outbox_size(self) -> int:
        """Frames posted and not yet handed to the connection."""
        return len(self._outbox)

    def post(self, msg: Any, *, on_full: str = "disconnect", check_size: bool = False) -> None:
        """Queue a one-way message for this peer's writer task; never waits.

        For handlers running in *another* peer's reader. When the outbox is
        full, ``on_full="disconnect"`` closes this peer (it is not reading) and
        ``"raise"`` leaves it alone; both raise :class:`OutboxFull`.
        ``check_size``: a message over :attr:`send_limit` raises ValueError (as
        ``send`` would) instead of being dropped by the writer.
        """
        encoded = self._encode(msg)
        if check_size and self.send_limit is not None and len(encoded) > self.send_limit:
            raise ValueError(f"frame of {len(encoded)} bytes exceeds "
                             f"max_frame_size={self.send_limit}")
        self._post(encoded, on_full)

    def post_reply(self, request_id: int, msg: Any, *, acquired: bool = True) -> None:
        """:meth:`reply` through the outbox (the answer to a deferred request).

        ``acquired=False``: the request held no in-flight slot (``thread_now``)."""
        if not request_id:
            return
        try:
            frame = self._encode(msg, request_id, reply=True)
        finally:
            if acquired:
                self._release_slot()
        self._post(frame, "disconnect")

    def post_error(self, request_id: int, exc: BaseException) -> None:
        """:meth:`reply_error` through the outbox."""
        self.post_reply(request_id, _error_reply(exc))

    @property
    def thread_writes(self) -> bool:
        """Whether :meth:`write_from_thread` can write on this connection at all."""
        return self._thread_send is not None

    def write_from_thread(self, msg: Any, request_id: int = 0, reply: bool = False) -> bool:
        """From a worker thread: write ``msg`` on the connection now, no loop wakeup.

        Only a small message over a connection that supports it (plain TCP);
        returns False when it was not taken, and the caller sends it from the
        loop as usual. Raises ValueError for a message over ``max_frame_size``
        (which the loop could not send either). Frames stay whole and in order
        with the loop's writes. A reply taken here frees its request's in-flight slot. A closed
        connection takes (and drops) the message: its caller is gone.
        """
        send = self._thread_send
        if send is None or self._closed or self._token is None:
            return False
        frame = encode_gather(msg, request_id, reply=reply)
        limit: int = self.conn.send_limit  # type: ignore[attr-defined]
        if len(frame) > limit:
            raise ValueError(f"frame of {len(frame)} bytes exceeds max_frame_size={limit}")
        if type(frame) is Gather:
            if len(frame) >= BIG_FRAME:
                return False
            frame = bytes(frame)
        held = replies_held() if reply and request_id else None
        if held is not None and len(frame) < HOLD_BYTES:
            held.add(self, cast(bytes, frame))
            self._thread_released()
            return True
        try:
            done = send(cast(bytes, frame))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            done = 0
        if done == 2:  # tcp.REFUSED
            return False
        if done == 1:  # tcp.FLUSH: the rest waits for the loop's writer
            self._call_soon(self._want_flush)
        if reply and request_id:
            self._thread_released()
        return True

    def _thread_released(self) -> None:
        """From a thread: a reply went out; its in-flight slot is free (for the loop
        to release, unless it pays back what the reader thread borrowed)."""
        with self._slot_lock:
            if self._borrowed:
                self._borrowed -= 1
            else:
                self._released.append(None)
        if self._reader_blocked:  # the reader waits for a free slot: free it now
            self._call_soon(self._collect_released)

    def _release_slot(self) -> None:
        """In the loop: a request's slot is free (a slot the reader thread borrowed
        is paid back first)."""
        if self._borrowed:
            with self._slot_lock:
                if self._borrowed:
                    self._borrowed -= 1
                    self._slot_freed.set()
                    return
        self._inflight.release()
        self._slot_freed.set()

    def _write_held(self, frames: list[bytes]) -> None:
        """Write replies a worker thread held back (see ``held_replies.py``)."""
        if self._closed:
            return  # the caller went away: nobody to answer
        send_many = getattr(self.conn, "send_many_from_thread", None)
        try:
            done = 2 if send_many is None else send_many(frames)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        if done == 1:  # tcp.FLUSH
            self._call_soon(self._want_flush)
        elif done == 2:  # tcp.REFUSED: the loop's writer sends them
            for frame in frames:
                self._call_soon(functools.partial(self._post_held, frame))

    def _post_held(self, frame: bytes) -> None:
        try:
            self._post(frame, "disconnect")
        except DropletError as exc:
            log.debug("the caller of a run went away: %s", exc)

    def _call_soon(self, fn: Callable[[], None]) -> None:
        assert self._token is not None
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    def _want_flush(self) -> None:
        self._flush_wanted = True
        self._outbox_ready.set()

    def _collect_released(self) -> None:
        """In the loop: free the in-flight slots of replies threads sent."""
        released = self._released
        while released:
            released.popleft()
            self._release_slot()
        self._slot_freed.set()

    async def _acquire_inflight(self) -> None:
        """An in-flight slot for a request the read loop serves. The slots the
        reader thread borrowed (``_take_in_reader``) count too: one is free when
        the semaphore holds more than they."""
        if self._released:
            self._collect_released()
        inflight = self._inflight
        # Under the lock: the reader thread borrows no slot between check and take.
        with self._slot_lock:
            if inflight.value > self._borrowed:
                inflight.acquire_nowait()  # no checkpoint: the read loop has its own
                return
        self._reader_blocked = True
        try:
            while True:
                self._collect_released()  # after the flag: a thread's release is not missed
                with self._slot_lock:
                    if inflight.value > self._borrowed:
                        inflight.acquire_nowait()
                        return
                self._slot_freed = trio.Event()
                await self._slot_freed.wait()
        finally:
            self._reader_blocked = False

    def _post(self, frame: Payload, on_full: str) -> None:
        if self._closed:
            raise ConnectionError(f"connection to {self.remote} is closed")
        if (self._try_send is not None and not self._outbox
                and not self._outbox_ready.is_set() and self._try_send(frame)):
            return  # an in-process peer with room: handed over now, in order, no task switch
        if not self._outbox.put(frame):
            if on_full == "raise":
                raise OutboxFull(f"{self.remote} is not keeping up: {len(self._outbox)} "
                                 "messages are queued for it; try again later")
            if not self.overflowed:
                self.overflowed = True
                log.warning("disconnecting %s: it is not reading (%d messages, %d bytes "
                            "queued for it)", self.remote, len(self._outbox),
                            self._outbox.size_bytes)
                if self._run_scope is not None:
                    self._run_scope.cancel()
            raise OutboxFull(f"{self.remote} is not reading; disconnected")
        self._outbox_ready.set()

    async def _write_outbox(self) -> None:
        outbox = self._outbox
        while True:
            if not outbox:
                if self._flush_wanted:  # what worker threads could not write at once
                    self._flush_wanted = False
                    try:
                        await self.conn.flush()  # type: ignore[attr-defined]
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.aclose()
                        return
                    continue
                self._outbox_ready = trio.Event()
                await self._outbox_ready.wait()
                continue
            frames = outbox.take()
            try:
                await self._send_many(frames)
            except ValueError:  # one of them is over max_frame_size: send the others
                try:
                    for frame in frames:
                        try:
                            await self._send(frame)
                        except ValueError as exc:
                            await self._refuse_oversize(frame, exc)
                except ConnectionError:
                    return
            except ConnectionError:
                return

    async def _refuse_oversize(self, frame: Payload, exc: ValueError) -> None:
        """A posted frame is over max_frame_size: a reply becomes an error reply
        (the caller learns why instead of waiting out its timeout); anything else
        is logged and dropped."""
        try:
            if isinstance(frame, Parcel):
                msg, request_id, is_reply = frame.msg, frame.request_id, frame.reply
            else:
                msg, request_id, is_reply = decode_message(bytes(frame))
        except ProtocolError:  # cannot happen for frames we encoded; be safe
            is_reply, request_id, msg = False, 0, None
        log.warning("dropped a %s to %s: %s", type(msg).__name__, self.remote, exc)
        if is_reply and request_id:
            await self._send(encode_message(
                ErrorReply("DropletError", f"{type(msg).__name__} reply too large: {exc}"),
                request_id, reply=True))

    async def _send(self, frame: Payload) -> None:
        await self._send_many((frame,))

    async def _send_many(self, frames: Sequence[Payload]) -> None:
        if self._closed:
            raise ConnectionError(f"connection to {self.remote} is closed")
        if not getattr(self.conn, "gather_writes", False):
            # A transport that takes whole bytes only: join big messages here.
            frames = [bytes(f) if type(f) is Gather else f for f in frames]
        try:
            if len(frames) == 1:
                await self.conn.send(cast(bytes, frames[0]))
            else:
                await self.conn.send_many(cast(Sequence[bytes], frames))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await self.aclose()
            raise ConnectionError(f"connection to {self.remote} broke: {exc}") from exc

    async def request(self, msg: Any, timeout: float | None = None) -> Any:
        """Send a request and wait for its reply; an ErrorReply is raised as its error."""
        request_id = next(self._ids)
        slot = Slot()
        self._pending[request_id] = slot
        try:
            await self._send(self._encode(msg, request_id))
            if timeout is None:
                await slot.event.wait()
            else:
                with trio.move_on_after(timeout):
                    await slot.event.wait()
                if not slot.event.is_set():
                    raise errors.TimeoutError(
                        f"{type(msg).__name__} to {self.remote} got no reply in {timeout:g} s"
                    )
        finally:
            self._pending.pop(request_id, None)
        return slot.result()

    async def submit(self, *msgs: Any, oneway: Sequence[Any] = ()) -> list[Slot]:
        """Send requests (in one write) without waiting: replies land in the slots.

        Saves a task when the caller only needs a reply later (a future's
        result), and a system call per extra request. A slot stays registered
        until its reply or the connection's end; a reply that never comes is
        the caller's to time out (see :meth:`wait`). ``oneway`` messages go
        first in the same write.
        """
        ids = [next(self._ids) for _ in msgs]
        slots = [Slot() for _ in msgs]
        encode = self._encode
        frames = [encode(m) for m in oneway]
        frames += [encode(m, i) for m, i in zip(msgs, ids, strict=True)]
        self._pending.update(zip(ids, slots, strict=True))
        try:
            await self._send_many(frames)
        except BaseException:
            for request_id in ids:
                self._pending.pop(request_id, None)
            raise
        return slots

    async def wait(self, slot: Slot, timeout: float, what: str) -> Any:
        """The reply in ``slot`` within ``timeout`` seconds, else TimeoutError naming ``what``."""
        with trio.move_on_after(timeout):
            await slot.event.wait()
        if not slot.event.is_set():
            raise errors.TimeoutError(f"{what} to {self.remote} got no reply in {timeout:g} s")
        return slot.result()

    async def run(self) -> None:
        """The reader loop (and the outbox's writer); returns when the connection closes."""
        self._token = trio.lowlevel.current_trio_token()
        take = getattr(self.conn, "take_directly", None)
        if take is not None and not self._closed:
            take(self._take_now)
            self.conn.take_from_threads(self._take_from_thread)  # type: ignore[attr-defined]
        if (self._in_reader is not None and not self._closed
                and getattr(self.conn, "thread_reads", False)):
            self.conn.read_in_thread(self._take_in_reader, self._token)  # type: ignore[attr-defined]
        try:
            async with trio.open_nursery() as nursery:
                self._run_scope = nursery.cancel_scope
                nursery.start_soon(self._write_outbox)
                try:
                    await self._read_loop()
                except ConnectionError as exc:
                    # A reply could not be sent because the peer hung up while we
                    # served its request (``_send`` closed the connection before
                    # raising): that ends this connection, never the service.
                    if not self._closed:
                        raise
                    log.info("%s went away before its reply: %s", self.remote, exc)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            await self.aclose()

    def _answer(self, slot: Slot, msg: Any) -> None:
        """Finish ``slot`` with the reply ``msg`` (an ErrorReply: its error)."""
        if type(msg) is ErrorReply:
            slot.error = error_from_reply(msg, self.remote)
        else:
            slot.value = msg
        try:
            slot._finish()
        except Exception:  # a waiter's callback: never the reader's or sender's problem
            log.exception("a reply's callback failed")

    async def _read_loop(self) -> None:
        conn, pending = self.conn, self._pending
        n = 0
        frame: Any = None
        msg: Any = None
        result: Any = None
        while True:
            # Let go of the last message before waiting for the next: a big
            # frame's buffer goes back to the pool now, not one message later.
            frame = msg = result = None
            try:
                frame = await conn.receive()
            except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except ProtocolError as exc:
                log.warning("closing connection from %s: %s", self.remote, exc)
                await self._say_goodbye(exc)
                return
            try:
                pre = self._predecoded
                if pre is not None:
                    self._predecoded = None
                if pre is not None and pre[0] is frame:  # decoded when it was offered
                    msg, request_id, is_reply = pre[1]
                elif isinstance(frame, Parcel):
                    msg, request_id, is_reply = unpack(frame)
                else:
                    msg, request_id, is_reply = decode_message(frame)
                    if not is_reply and self.conn.carries_objects:
                        # A peer sending requests as frames over an object-carrying
                        # connection (a raw-frame tool, one_request) is answered in
                        # frames. (Error replies are frames either way.)
                        self._encode = encode_gather
            except InvalidMessage as exc:
                # Well framed, wrong values: refuse this message, keep the connection.
                if exc.request_id and not exc.is_reply:
                    await self._send(encode_message(
                        ErrorReply("ProtocolError", str(exc)), exc.request_id, reply=True))
                elif exc.request_id and (slot := pending.pop(exc.request_id, None)) is not None:
                    # A reply we cannot read: its request fails now, saying why.
                    slot.error = ProtocolError(f"{self.remote} sent an invalid reply: {exc}")
                    slot._finish()
                else:
                    log.warning("dropped a message from %s: %s", self.remote, exc)
                continue
            except ProtocolError as exc:
                log.warning("closing connection from %s: %s", self.remote, exc)
                await self._say_goodbye(exc)
                return
            if is_reply:
                if request_id == 0 and type(msg) is ErrorReply:
                    # The peer is hanging up on us and says why (e.g. ProtocolError).
                    self._close_reason = error_from_reply(msg, self.remote)
                    # %r: the peer's text, escaped, cannot forge log lines.
                    log.warning("%s closed the connection: %r", self.remote, msg.message)
                    return
                slot = pending.pop(request_id, None)
                if slot is not None:
                    self._answer(slot, msg)
                continue
            if self._handler is None:
                log.warning("%s sent %s, which this endpoint does not serve",
                            self.remote, type(msg).__name__)
                if request_id:
                    await self._send(encode_message(
                        ErrorReply("ProtocolError", f"unexpected {type(msg).__name__}"),
                        request_id, reply=True))
                continue
            n += 1
            if not n % CHECKPOINT_EVERY:
                await trio.lowlevel.checkpoint()
            if request_id:
                await self._acquire_inflight()
            try:
                result = await self._handler(self, msg, request_id)
            except Exception as exc:  # a bad request never takes the node down
                if self._closed:
                    return
                if not isinstance(exc, DropletError):
                    log.exception("error handling %s from %s", type(msg).__name__, self.remote)
                elif not request_id:  # nobody to tell but the log
                    log.warning("dropped %s from %s: %s", type(msg).__name__, self.remote, exc)
                if request_id:
                    await self.reply(request_id, _error_reply(exc))
                continue
            if request_id and result is not DEFERRED:
                await self.reply(request_id, Ok() if result is None else result)

    def _take_now(self, frame: object) -> bool:
        """An in-process sender's frame, offered while our reader waits with nothing
        queued (``InprocConnection.take_directly``): handle it here, in the
        sender's task, if it needs no waiting, as the reader would have: a
        reply (its slot finished), or a request our ``now`` handler serves.
        False: the reader gets it as usual. Never raises (it runs in the
        sender's ``send``)."""
        if self._closed:
            return False
        decoded = self._decode_offered(frame)
        if decoded is None:
            return False
        # Declined, the frame goes next into the queue of our idle reader: it
        # takes this decoding instead of decoding the frame again.
        self._predecoded = (frame, decoded)
        msg, request_id, is_reply = decoded
        if is_reply:
            if not request_id:
                return False  # a goodbye: the reader closes the connection
            self._predecoded = None
            slot = self._pending.pop(request_id, None)
            if slot is not None:
                self._answer(slot, msg)
            return True
        now = self._now
        if now is None or not request_id or self._handler is None:
            return False
        try:
            self._inflight.acquire_nowait()
        except trio.WouldBlock:
            return False  # at the limit: the reader waits for a free slot
        try:
            result = now(self, msg, request_id)
        except Exception as exc:  # a bad request never takes the node down
            if not isinstance(exc, DropletError):
                log.exception("error handling %s from %s", type(msg).__name__, self.remote)
            result = _error_reply(exc)
        if result is NOT_NOW:
            self._inflight.release()
            self._slot_freed.set()
            return False
        self._predecoded = None
        if result is not DEFERRED:
            try:
                self.post_reply(request_id, Ok() if result is None else result)
            except DropletError as exc:  # closed, or not reading
                log.debug("could not answer %s: %s", self.remote, exc)
        return True

    def _take_in_reader(self, frame: object, inline: bool) -> bool | Callable[[], None]:
        """In the connection's reader thread (``transports/threadread.py``): a request
        or one-way message the ``in_reader`` handler serves there (see
        :data:`ReaderHandler`); False: the read loop gets the frame, as usual
        (replies, bad bytes, everything else). Never raises."""
        handler = self._in_reader
        if self._closed or handler is None:
            return False
        decoded = self._decode_offered(frame)
        if decoded is None:
            return False
        msg, request_id, is_reply = decoded
        if is_reply:
            return False
        if request_id:
            with self._slot_lock:  # the request's in-flight slot, borrowed
                if self._inflight.value <= self._borrowed:
                    return False  # at the limit: the read loop waits for a slot
                self._borrowed += 1
                # Earlier requests still unanswered: a pipelining caller, whose
                # calls go to the workers (which write their replies in batches).
                inline = inline and self._borrowed == 1
        try:
            taken = handler(self, msg, request_id, inline)
        except Exception:
            log.exception("error handling %s from %s in its reader thread",
                          type(msg).__name__, self.remote)
            taken = False
        if taken is False and request_id:
            self._thread_released()  # (the slot goes back, whoever paid it meanwhile)
        return taken

    def _decode_offered(self, frame: object) -> tuple[Any, int, bool] | None:
        """A frame offered by the connection, decoded as the reader would; None when
        the reader must see it (bad bytes or values, whose handling it owns, or
        frames where this connection expects parcels). Thread-safe (pure)."""
        kind = type(frame)
        if kind is Parcel:
            try:
                return unpack(cast(Parcel, frame))
            except InvalidMessage:
                return None
        if kind is not bytes or self.conn.carries_objects:
            return None
        try:
            return decode_message(cast(bytes, frame))
        except ProtocolError:  # InvalidMessage too
            return None

    def _encode_offer(self, msg: Any, request_id: int, reply: bool) -> object:
        """``msg`` as this connection carries it, whole (a parcel, or joined bytes)."""
        frame = self._encode(msg, request_id, reply=reply)
        return bytes(frame) if type(frame) is Gather else frame

    # ------------------------------------------------------------ from other threads

    @property
    def takes_from_threads(self) -> bool:
        """Whether :meth:`submit_from_thread` may work on this connection at all."""
        return not self._closed and hasattr(self.conn, "offer_from_thread")

    def submit_from_thread(self, msg: Any,
                           on_reply: Callable[[Any, BaseException | None], None]) -> bool:
        """From a thread other than the loop's: send request ``msg`` to an in-process
        peer that serves it from threads too (``thread_now``), with no wakeup of
        the loop. ``on_reply(value, error)`` gets the reply (or the connection's
        end), from whichever thread has it. False: not sent; send it from the loop."""
        if not self.takes_from_threads:
            return False
        request_id = next(self._ids)  # itertools.count: atomic
        self._pending[request_id] = ThreadSlot(on_reply)
        try:
            taken = self.conn.offer_from_thread(  # type: ignore[attr-defined]
                self._encode_offer(msg, request_id, False))
        except BaseException:
            self._pending.pop(request_id, None)
            raise
        if not taken:
            self._pending.pop(request_id, None)
        return bool(taken)

    def reply_from_thread(self, request_id: int, msg: Any) -> bool:
        """From a worker thread: answer a request taken by ``thread_now`` straight to
        its sender's thread slot. False: not delivered; reply from the loop with
        :meth:`post_reply` ``(acquired=False)``."""
        if self._closed:
            return False
        offer = getattr(self.conn, "offer_from_thread", None)
        return offer is not None and bool(offer(self._encode_offer(msg, request_id, True)))

    def _take_from_thread(self, frame: object) -> bool:
        """A frame from another thread (``InprocConnection.offer_from_thread``): the
        reply to a :class:`ThreadSlot`, or a request ``thread_now`` serves. Anything
        else: False (its sender sends it from the loop). Never raises."""
        if self._closed:
            return False
        decoded = self._decode_offered(frame)
        if decoded is None:
            return False
        msg, request_id, is_reply = decoded
        if is_reply:
            slot = self._pending.get(request_id)
            if type(slot) is not ThreadSlot or self._pending.pop(request_id, None) is None:
                return False
            self._answer(slot, msg)
            return True
        now = self._thread_now
        if now is None or not request_id:
            return False
        try:
            result = now(self, msg, request_id)
        except Exception:  # the loop's path serves it, and says what is wrong
            return False
        return result is DEFERRED

    async def _say_goodbye(self, exc: BaseException) -> None:
        with trio.move_on_after(1):
            try:
                await self.conn.send(encode_message(_error_reply(exc), 0, reply=True))
            except Exception:
                pass

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        take = getattr(self.conn, "take_directly", None)
        if take is not None:
            take(None)
            self.conn.take_from_threads(None)  # type: ignore[attr-defined]
        if self._run_scope is not None:
            self._run_scope.cancel()
        self._outbox.clear()
        pending, self._pending = self._pending, {}
        for slot in list(pending.values()):  # a snapshot: threads may add (submit_from_thread)
            slot.error = self._close_reason or ConnectionError(
                f"connection to {self.remote} closed before the reply")
            slot._finish()
        with trio.CancelScope(shield=True):
            await self.conn.aclose()
        for callback in self.on_close:
            try:
                callback(self)
            except Exception:
                log.exception("on_close callback failed")


def _error_reply(exc: BaseException) -> ErrorReply:
    if isinstance(exc, DropletError):
        return ErrorReply(type(exc).__name__, str(exc))
    if isinstance(exc, ValueError | TypeError | KeyError):
        return ErrorReply("DropletError", f"bad request: {exc}")
    return ErrorReply(
        "DropletError", f"internal error: {type(exc).__name__}: {exc}", traceback.format_exc()
    )


def error_from_reply(msg: ErrorReply, remote: str) -> DropletError:
    """The error a peer's ErrorReply stands for (its kind, never a FunctionError)."""
    cls = getattr(errors, msg.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, DropletError)) or cls is errors.FunctionError:
        cls = DropletError
    if not msg.traceback:
        return cls(msg.message)
    error = cls(f"{msg.message}\n\nRemote traceback (on {remote}):\n{msg.traceback.rstrip()}")
    error.remote_traceback = msg.traceback
    return error
