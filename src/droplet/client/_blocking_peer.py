"""One blocking socket to a node, shared by many threads: the sync client's transport.

A request is written by the calling thread and its reply read by a waiting
thread itself, with no event loop in between (see ``_blocking.py`` for why).

Many threads share one socket with the *leader/follower* pattern: whichever
waiting thread holds the read lock reads frames and hands every reply to the
thread waiting for it; when its own reply is in, it passes the read lock on
to another waiter. Writes take a lock, one whole batch of frames per write.
The wire rules are the sans-IO ones everyone uses (messages,
:class:`~droplet.protocol.handshake.ClientHandshake`); the bytes become frames
through a *wire* (``_blocking_wire.py``): the length prefix of ``tcp://`` and
``tls://``, or WebSocket messages for ``ws://`` and ``wss://`` (``_ws_codec.py``).
"""

from __future__ import annotations

import itertools
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import ConnectionError, DropletError, ProtocolError, TimeoutError
from ..protocol.framing import BIG_FRAME, DEFAULT_MAX_FRAME_SIZE, Buffer, Payload
from ..protocol.handshake import ClientHandshake
from ..protocol.messages import (
    ErrorReply,
    encode_gather,
)
from ..protocol.messages import decode as decode_message
from ..protocol.messages import encode as encode_message
from ..rpc import error_from_reply
from ._blocking_wire import PrefixWire, open_wire
from ._wire import Encoded

RECEIVE_SIZE = 256 * 1024
#: Buffers per ``sendmsg`` (Linux takes at most 1024).
IOV_MAX = 512
#: A waiting follower re-checks for a missed leader handoff this often (seconds).
HANDOFF_POLL = 0.05
#: Frames (or bytes) held back under load before the submitting thread writes them itself.
BATCH_FRAMES = 64
BATCH_BYTES = 256 * 1024
#: Seconds the writer thread lets held frames gather before writing them (a
#: wakeup of it per write costs the submitting thread more than the wait).
WRITER_DELAY = 0.0005
#: alive() reads the socket (to notice a peer that hung up) at most this often.
ALIVE_POLL = 0.005



def _write_held(peer_ref: weakref.ref[BlockingPeer], wanted: threading.Event) -> None:
    """The writer thread: writes a peer's held-back frames whenever woken.

    Under load, by the time it runs several frames are waiting: one system call
    (and one wakeup of the peer) for all of them. It holds the peer weakly.
    """
    while True:
        wanted.wait()
        # Let the batch grow a little: a thread issuing calls one after another
        # writes BATCH_FRAMES itself, and wakes this thread once per batch.
        time.sleep(WRITER_DELAY)
        wanted.clear()
        peer = peer_ref()
        if peer is None or peer._closing:
            return
        peer.flush(time.monotonic() + peer._write_timeout, last_try=True)
        del peer


class _Slot:
    __slots__ = ("done", "error", "value", "wake", "watchers")

    def __init__(self) -> None:
        #: set when done, or when asked to take over reading; made only when a
        #: thread sleeps on it (most waits read the reply themselves).
        self.wake: threading.Event | None = None
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        #: threads waiting for any of several slots (``BlockingPeer.wait_any``).
        self.watchers: list[_AnyOf] = []

    def finish(self) -> None:
        """Mark answered (value or error already set) and wake whoever waits for it."""
        self.done = True
        wake = self.wake  # read after done: see BlockingPeer._await
        if wake is not None:
            wake.set()
        watchers = self.watchers
        if watchers:
            for watcher in list(watchers):
                watcher.notify()


class _AnyOf:
    """A wait for the first of several slots: stands in for a slot in ``_waiting``."""

    __slots__ = ("done", "wake")

    def __init__(self) -> None:
        self.wake: threading.Event | None = None  # as _Slot's
        self.done = False

    def notify(self) -> None:
        self.done = True
        wake = self.wake
        if wake is not None:
            wake.set()


class BlockingPeer:
    """Requests and replies over one socket, usable from many threads at once.

    Every socket operation honours a deadline: the socket is non-blocking and
    threads wait for it in ``select()``, so a node that accepts and never
    answers, or stops reading, costs a caller its timeout and no more.
    """

    def __init__(self, url: str, *, token: str | None, timeout: float,
                 ssl_context: ssl.SSLContext | None = None,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.remote = url
        deadline = time.monotonic() + timeout
        # The socket (dialled, TLS and WebSocket upgrade done) and its framing.
        sock, self._decoder = open_wire(url, timeout=timeout, ssl_context=ssl_context,
                                        max_frame_size=max_frame_size)
        #: frames are a 4-byte length and the payload (tcp://, tls://).
        self._prefixed = type(self._decoder) is PrefixWire
        self._sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        #: what the reading thread (one at a time: the read lock) receives into.
        self._received = bytearray(RECEIVE_SIZE)
        self._received_view = memoryview(self._received)
        self._max = max_frame_size
        self._ids = itertools.count(1)
        self._pending: dict[int, _Slot] = {}
        self._waiting: set[_Slot | _AnyOf] = set()
        self._state = threading.Lock()
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._failure: BaseException | None = None
        self._polled = 0.0  # when the socket was last read (by alive() or a reader)
        self._owed = b""  # control frames to write when no write is under way (reader only)
        #: frames held back under load (submit(batch=True)), written in order
        #: before anything else; the writer thread writes them when woken.
        self._outgoing: list[Buffer] = []
        self._outgoing_bytes = 0
        self._write_wanted = threading.Event()
        self._writer: threading.Thread | None = None
        self._write_timeout = timeout
        # Threads using the socket right now; the last one out closes it once
        # the peer is closing (closing a descriptor another thread is in
        # select() on is undefined: it may even be reused for another file).
        self._users = 0
        self._closing = False
        self._closed_fd = False
        try:
            self._handshake(token, timeout, deadline)
        except BaseException:
            self.close()
            raise

    def _handshake(self, token: str | None, timeout: float, deadline: float) -> None:
        hs = ClientHandshake(self.remote, token)
        try:
            response = hs.on_challenge(self._next_message(deadline))
            if not self._send_all(self._decoder.frame_parts(encode_message(response)),
                                  deadline):
                raise TimeoutError("the node did not read the handshake")
            hs.on_result(self._next_message(deadline))
        except TimeoutError as exc:
            raise ConnectionError(
                f"no answer from a Droplet node at {self.remote} within {timeout:g} s; "
                "is a Droplet node (of this scheme) running there? start one with "
                "`python -m droplet.node`") from exc
        except ProtocolError as exc:
            raise ConnectionError(
                f"{self.remote} does not speak Droplet's protocol ({exc}); is it another "
                "service, or a node of another scheme (ws://, tls://)?") from exc

    def _next_message(self, deadline: float) -> Any:
        while (payload := self._decoder.next_frame()) is None:
            if not self._fill(deadline):
                raise TimeoutError(f"{self.remote} sent nothing in time")
        return decode_message(payload)[0]

    # ------------------------------------------------------------------ socket use

    def _enter(self) -> socket.socket:
        with self._state:
            if self._closing:
                raise ConnectionError(
                    f"connection to {self.remote} is closed"
                    + (f": {self._failure}" if self._failure is not None else ""))
            self._users += 1
        return self._sock

    def _exit(self) -> None:
        with self._state:
            self._users -= 1
            close = self._closing and self._users == 0 and not self._closed_fd
            if close:
                self._closed_fd = True
        if close:
            self._sock.close()

    def _fill(self, deadline: float) -> bool:
        """Read what the socket has into the decoder; False when nothing came by the deadline.

        A deadline already past still polls once, without waiting.
        """
        sock = self._enter()
        try:
            while True:
                if not (self._tls and sock.pending()):  # type: ignore[attr-defined]
                    remaining = max(0.0, deadline - time.monotonic())
                    if not select.select([sock], [], [], remaining)[0]:
                        return False
                # The rest of a big frame goes straight into its own buffer.
                target = self._decoder.receive_buffer()
                try:
                    if target is None:  # into our buffer: no 256 KiB allocation per read
                        got = sock.recv_into(self._received)
                    else:
                        got = sock.recv_into(target)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    if time.monotonic() >= deadline:
                        return False
                    continue  # woken for nothing (or TLS bookkeeping): wait again
                except OSError as exc:
                    raise ConnectionError(f"connection to {self.remote} broke: {exc}") from exc
                if not got:
                    raise ConnectionError(f"{self.remote} closed the connection")
                self._polled = time.monotonic()  # alive now: alive() need not look soon
                if target is None:
                    self._decoder.feed(self._received_view[:got])  # copies what came
                else:
                    self._decoder.received(got)
                return True
        finally:
            self._exit()

    def _send_all(self, data: bytes | list[Buffer], deadline: float) -> bool:
        """Write ``data`` (bytes, or pieces written with gather writes) by the
        deadline; False (nothing written) if the lock never came.

        A write cut off midway leaves half a frame on the wire: the connection
        is failed, and TimeoutError raised.
        """
        if not self._send_lock.acquire(blocking=False):
            remaining = deadline - time.monotonic()
            if not self._send_lock.acquire(timeout=max(0.0, remaining)):
                return False
        queued: list[Buffer] = []
        try:
            if self._outgoing:  # frames held back under load go first, in order
                with self._state:
                    queued, self._outgoing = self._outgoing, []
                    self._outgoing_bytes = 0
                data = [*queued, *([data] if isinstance(data, bytes) else data)]
            sock = self._enter()
            try:
                first = sent = 0
                if type(data) is list and len(data) == 1 and type(data[0]) is bytes:
                    data = data[0]  # one joined frame: the usual request
                if type(data) is bytes and data:
                    # One piece: tried at once, the general loop below for the rest.
                    try:
                        sent = sock.send(data)
                    except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                        pass
                    except OSError as exc:
                        raise ConnectionError(
                            f"connection to {self.remote} broke: {exc}") from exc
                    if sent == len(data):
                        return True
                    views = [memoryview(data)[sent:]]
                else:
                    views = [memoryview(p) for p in ([data] if isinstance(data, bytes)
                                                     else data)]
                # TLS has no sendmsg, nor has every platform (Windows).
                gather = not self._tls and hasattr(sock, "sendmsg")
                while first < len(views):
                    if not views[first].nbytes:
                        first += 1
                        continue
                    try:
                        if gather and len(views) - first > 1:
                            n = sock.sendmsg(views[first:first + IOV_MAX])
                        else:
                            n = sock.send(views[first])
                        sent += n
                        while n:
                            if n >= views[first].nbytes:
                                n -= views[first].nbytes
                                first += 1
                            else:
                                views[first] = views[first][n:]
                                n = 0
                        continue
                    except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                        pass
                    except OSError as exc:
                        raise ConnectionError(
                            f"connection to {self.remote} broke: {exc}") from exc
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not select.select([], [sock], [], remaining)[1]:
                        if sent == 0:
                            if queued:  # not ours to drop: they go with the next write
                                with self._state:
                                    self._outgoing[:0] = queued
                                    self._outgoing_bytes += sum(map(len, queued))
                            return False
                        error = TimeoutError(
                            f"{self.remote} stopped reading: a request was cut off midway, "
                            "so the connection is closed")
                        self._fail(error)
                        raise error
                return True
            finally:
                self._exit()
        finally:
            self._send_lock.release()

    # ------------------------------------------------------------------ requests

    def submit(self, *msgs: Any, timeout: float, oneway: Sequence[Any] = (),
               batch: bool = False) -> list[_Slot]:
        """Send requests in one write (after the one-way ``oneway`` messages).

        Each reply lands in its slot. Raises TimeoutError when the write could
        not be made within ``timeout`` seconds.

        ``batch``: while other requests on this connection await their replies
        (under load), the frames may be held back briefly and written with
        others, many per system call (each of which wakes the peer); they go
        out when BATCH_FRAMES are waiting, when a thread starts waiting for a
        reply, or when the writer thread gets to them, whichever is first.
        """
        if self._failure is not None:
            raise ConnectionError(f"connection to {self.remote} is closed: {self._failure}")
        deadline = time.monotonic() + timeout
        slots = [_Slot() for _ in msgs]
        with self._state:
            ids = [next(self._ids) for _ in msgs]
            self._pending.update(zip(ids, slots, strict=True))
        # An Encoded message (client/_wire.py) is encoded but for its request id.
        payloads = [m.payload() if type(m) is Encoded else encode_gather(m) for m in oneway]
        payloads += [m.payload(i) if type(m) is Encoded else encode_gather(m, i)
                     for m, i in zip(msgs, ids, strict=True)]
        self._write(self._frames(payloads), ids, deadline, timeout, batch,
                    type(msgs[0]).__name__ if msgs else "a message")
        return slots

    def submit_encoded(self, msg: Encoded, *, timeout: float, batch: bool = False) -> _Slot:
        """:meth:`submit` of one request encoded but for its request id
        (``client/_wire.py``): on a length-prefixed wire, the frame is one join,
        and the state lock is taken once (to note the request, and to see
        whether others are in flight: ``batch``)."""
        if self._failure is not None:
            raise ConnectionError(f"connection to {self.remote} is closed: {self._failure}")
        slot = _Slot()
        request_id = next(self._ids)  # atomic under the GIL
        if self._prefixed and msg.size() <= self._max:
            frame = msg.framed(request_id)
        else:
            frame = b"".join(self._frames([msg.payload(request_id)]))
        held = first = False
        with self._state:
            pending = self._pending
            pending[request_id] = slot
            if batch and len(pending) > 1:  # others are in flight: hold back (see submit)
                first = not self._outgoing
                self._outgoing.append(frame)
                self._outgoing_bytes += len(frame)
                held = (len(self._outgoing) < BATCH_FRAMES
                        and self._outgoing_bytes < BATCH_BYTES)
                if not held:
                    frame = b""  # full: write what is held now, from this thread
        if held:
            if first:
                self._wake_writer()
            return slot
        try:
            written = self._send_all(frame, time.monotonic() + timeout)
        except DropletError as exc:
            self._fail(exc)
            raise
        if not written:
            if not frame:  # ours stay held: the writer sends them
                self._wake_writer()
                return slot
            with self._state:
                self._pending.pop(request_id, None)
            raise TimeoutError(
                f"could not send Trigger to {self.remote} within {timeout:g} s: other "
                "requests fill the connection and the node is not reading")
        return slot

    def _write(self, pieces: list[Buffer], ids: list[int], deadline: float, timeout: float,
               batch: bool, what: str) -> None:
        """Write the frames of the requests ``ids`` (see :meth:`submit`), or hold them."""
        if batch:
            with self._state:
                held = len(self._pending) > len(ids)  # others are in flight: hold back
                if held:
                    # The writer is woken when the first frame is held: it writes
                    # what is held by then (frames held meanwhile need no wakeup).
                    first = not self._outgoing
                    self._outgoing += pieces
                    self._outgoing_bytes += sum(len(p) for p in pieces)
                    full = (len(self._outgoing) >= BATCH_FRAMES
                            or self._outgoing_bytes >= BATCH_BYTES)
            if held:
                if not full:
                    if first:
                        self._wake_writer()
                    return
                pieces = []  # write what is held now, from this thread
        try:
            written = self._send_all(pieces, deadline)
        except DropletError as exc:
            self._fail(exc)
            raise
        if not written and batch and not pieces:  # ours stay held: the writer sends them
            self._wake_writer()
            return
        if not written:
            with self._state:
                for i in ids:
                    self._pending.pop(i, None)
            raise TimeoutError(
                f"could not send {what} to {self.remote} within {timeout:g} s: other "
                "requests fill the connection and the node is not reading")

    def _wake_writer(self) -> None:
        """Have the writer thread (started on first use) write the held-back frames."""
        if self._writer is None:
            with self._state:
                if self._writer is None and not self._closing:
                    self._writer = threading.Thread(
                        target=_write_held, args=(weakref.ref(self), self._write_wanted),
                        name=f"droplet-writer-{self.remote}", daemon=True)
                    self._writer.start()
        self._write_wanted.set()

    def flush(self, deadline: float, *, last_try: bool = False) -> None:
        """Write the frames held back (see ``submit(batch=True)``) by ``deadline``.

        A waiter's deadline may be short (``wait_any(..., 0)`` polls): if the
        frames cannot go by then (another thread holds the write lock, or the
        socket is full), the writer thread takes them over with the whole write
        timeout. Only that ``last_try`` fails the connection: the peer is then
        really not reading.
        """
        if self._outgoing and self._failure is None:
            try:
                if self._send_all(b"", deadline):
                    return
                if not last_try:
                    self._wake_writer()
                    return
                raise TimeoutError(f"could not write to {self.remote} in time: "
                                   "the peer is not reading")
            except DropletError as exc:
                self._fail(exc)

    def send(self, *msgs: Any, timeout: float) -> bool:
        """Send one-way messages in one write; False if they could not be sent in time."""
        if self._failure is not None or not msgs:
            return False
        try:
            return self._send_all(self._frames([encode_gather(m) for m in msgs]),
                                  time.monotonic() + timeout)
        except DropletError as exc:
            self._fail(exc)
            return False

    def _frames(self, payloads: Sequence[Payload]) -> list[Buffer]:
        """The pieces of one write of framed ``payloads``: one joined buffer when
        small, else big messages' buffers as they are (no copy)."""
        frame_parts = self._decoder.frame_parts
        parts = [p for payload in payloads for p in frame_parts(payload)]
        if len(parts) > 1 and sum(len(p) for p in parts) < BIG_FRAME:
            return [b"".join(parts)]
        return parts

    def wait(self, slot: _Slot, timeout: float, what: str) -> Any:
        """The reply in ``slot`` within ``timeout`` seconds (reading for others meanwhile)."""
        if not self._await(slot, time.monotonic() + timeout):
            raise TimeoutError(f"{what} to {self.remote} got no reply in {timeout:g} s")
        if slot.error is not None:
            raise slot.error
        return slot.value

    def wait_any(self, slots: Iterable[_Slot], timeout: float) -> bool:
        """Wait until one of ``slots`` is answered (reading for others meanwhile).

        False when ``timeout`` seconds passed first. Sleeps while another
        thread reads, like :meth:`wait`; never spins.
        """
        deadline = time.monotonic() + timeout
        target = _AnyOf()
        watched = []
        for slot in slots:
            slot.watchers.append(target)
            watched.append(slot)
            if slot.done:
                target.done = True
        try:
            return target.done or self._await(target, deadline)
        finally:
            for slot in watched:
                slot.watchers.remove(target)

    def _await(self, target: _Slot | _AnyOf, deadline: float) -> bool:
        """Lead (read) or follow (sleep) until ``target`` is done; False past the deadline."""
        if self._outgoing:  # what we wait for may be among the frames held back
            self.flush(deadline)
        while not target.done:
            if self._read_lock.acquire(blocking=False):
                try:
                    self._lead(target, deadline)
                finally:
                    self._read_lock.release()
                    self._hand_off()
                if target.done:
                    break
            if time.monotonic() >= deadline:
                return False
            with self._state:
                if target.done:
                    break
                wake = target.wake
                if wake is None:
                    wake = target.wake = threading.Event()
                self._waiting.add(target)
            try:
                # done is set before finish() looks for the event: checked again
                # now that it exists, so a reply in between is never slept through.
                if not target.done:
                    wake.wait(min(HANDOFF_POLL, max(0.0, deadline - time.monotonic())))
                    wake.clear()
            finally:
                with self._state:
                    self._waiting.discard(target)
        return True

    def poll(self, slot: _Slot) -> bool:
        """Read whatever has arrived, without waiting; whether ``slot`` is answered."""
        if self._outgoing:
            self.flush(time.monotonic() + self._write_timeout)
        if not slot.done and self._failure is None and self._read_lock.acquire(blocking=False):
            try:
                self._lead(slot, time.monotonic())
            finally:
                self._read_lock.release()
                self._hand_off()
        return slot.done

    def alive(self) -> bool:
        """Whether the connection still stands: reads what arrived (an end of file
        too), at most every ALIVE_POLL seconds (a system call each)."""
        now = time.monotonic()
        if now - self._polled < ALIVE_POLL:
            return self._failure is None
        self._polled = now
        if self._failure is None and self._read_lock.acquire(blocking=False):
            try:
                self._lead(_AnyOf(), time.monotonic())
            finally:
                self._read_lock.release()
                self._hand_off()
        return self._failure is None

    @property
    def max_frame_size(self) -> int:
        """The largest frame this connection sends."""
        return self._max

    def request(self, msg: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        (slot,) = self.submit(msg, timeout=timeout)
        return self.wait(slot, max(0.0, deadline - time.monotonic()), type(msg).__name__)

    def _lead(self, slot: _Slot | _AnyOf, deadline: float) -> None:
        """Read and dispatch frames until ``slot`` is answered or the deadline passes."""
        try:
            while not slot.done:
                payload = self._decoder.next_frame()
                if payload is None:
                    if self._owed or self._decoder.has_output:  # ws: pongs
                        self._answer_control()
                    if not self._fill(deadline):
                        return
                    continue
                self._dispatch(payload)
            if type(slot) is _AnyOf:  # hand over the rest of what was read, in one go
                while (payload := self._decoder.next_frame()) is not None:
                    self._dispatch(payload)
            if self._owed or self._decoder.has_output:  # a ping read with the answer
                self._answer_control()
        except DropletError as exc:  # ConnectionError, ProtocolError: the socket is done
            self._fail(exc)

    def _dispatch(self, payload: bytes | memoryview) -> None:
        msg, request_id, is_reply = decode_message(payload)
        if not is_reply:
            return  # a node sends clients nothing but replies
        if request_id == 0 and type(msg) is ErrorReply:  # the node hangs up, saying why
            raise error_from_reply(msg, self.remote)
        with self._state:
            slot = self._pending.pop(request_id, None)
        if slot is None:
            return
        if type(msg) is ErrorReply:
            slot.error = error_from_reply(msg, self.remote)
        else:
            slot.value = msg
        slot.finish()

    def _hand_off(self) -> None:
        """Ask one waiting thread to take over reading."""
        if not self._waiting:  # (one that comes meanwhile polls: HANDOFF_POLL)
            return
        with self._state:
            for other in self._waiting:
                if not other.done and other.wake is not None:
                    other.wake.set()
                    return

    def _answer_control(self) -> None:
        """Write what the wire owes the peer (ws: pongs), unless a write is under
        way: the reader never waits for the send lock (the writer may be waiting
        for a peer that waits for us to read), so it tries again on its next read."""
        owed = self._owed + self._decoder.take_output()
        if self._send_lock.locked():
            self._owed = owed
        else:
            self._owed = b""
            self._send_all(owed, time.monotonic() + self._write_timeout)

    def _say_goodbye(self) -> None:
        """Send what the wire sends before hanging up (ws: a close frame), if it
        fits the socket now and no write is midway; never waits."""
        if not self._send_lock.acquire(blocking=False):
            return
        try:
            if not self._outgoing and (goodbye := self._decoder.goodbye()):
                self._sock.send(goodbye)
        except (OSError, ValueError):
            pass
        finally:
            self._send_lock.release()

    def _fail(self, error: BaseException) -> None:
        """Fail every pending request with ``error`` and close the connection."""
        with self._state:
            if self._failure is None:
                self._failure = error
            error = self._failure
            pending, self._pending = self._pending, {}
        for slot in pending.values():
            slot.error = error
            slot.finish()
        self.close()

    def close(self) -> None:
        """Close: wake every thread waiting on the socket; the last one out closes it."""
        with self._state:
            if self._failure is None:
                self._failure = ConnectionError(f"connection to {self.remote} is closed")
            first = not self._closing
            self._closing = True
            if first and not self._closed_fd:
                self._say_goodbye()
            close_now = self._users == 0 and not self._closed_fd
            if close_now:
                self._closed_fd = True
            pending, self._pending = self._pending, {}
        for slot in pending.values():
            slot.error = self._failure
            slot.finish()
        self._write_wanted.set()  # lets the writer thread see the peer closed
        if first and not close_now:
            try:  # wakes select() in other threads (readable, at end of file)
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
            except OSError:
                pass
        if close_now:
            self._sock.close()
