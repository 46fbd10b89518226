"""The synchronous client's fast path: blocking sockets, no event loop.

For ``tcp://`` and ``tls://`` addresses :class:`~droplet.client.client.DropletConnection`
talks to the node directly from the calling thread. Going through a Trio loop
in a background thread costs two thread handoffs per call (each a wakeup of a
sleeping thread: hundreds of microseconds on a small VM); here the caller
writes its request and reads the reply itself.

Many threads share one socket with the *leader/follower* pattern: whichever
waiting thread holds the read lock reads frames and hands every reply to the
thread waiting for it; when its own reply is in, it passes the read lock on
to another waiter. Writes take a lock, one whole batch of frames per write.
The wire rules are the sans-IO ones everyone uses (framing, messages,
:class:`~droplet.protocol.handshake.ClientHandshake`, :class:`ClientCore`).
"""

from __future__ import annotations

import builtins
import itertools
import os
import select
import socket
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import ConnectionError, DropletError, ProtocolError, TimeoutError
from ..protocol.framing import (
    BIG_FRAME,
    DEFAULT_MAX_FRAME_SIZE,
    Buffer,
    FrameDecoder,
    Payload,
    frame,
    frame_parts,
)
from ..protocol.handshake import ClientHandshake
from ..protocol.messages import (
    Blob,
    BoolReply,
    CallDag,
    CallPlaced,
    ClusterInfo,
    DagResult,
    DeleteDag,
    ErrorReply,
    FunctionExists,
    GetStatus,
    Hello,
    KvsForget,
    KvsGet,
    KvsPut,
    KvsValue,
    ListDags,
    ListFunctions,
    Names,
    PlaceCall,
    StatusReply,
    encode_gather,
)
from ..protocol.messages import decode as decode_message
from ..protocol.messages import encode as encode_message
from ..rpc import error_from_reply
from ..status import ClusterStatus
from ..transports.registry import parse_address
from ._core import ClientCore, check_key, check_timeout, result_blob, unwrap_result
from ._direct import (
    CONFIRM_WAIT,
    DIAL_TIMEOUT,
    DirectCalls,
    may_go_direct,
    same_scheme,
    triggers_for,
)
from ._release import FLUSH_DELAY, MAX_BATCH, Releases

__all__ = ["BlockingClient", "BlockingFuture", "BlockingPeer"]

RECEIVE_SIZE = 256 * 1024
#: Buffers per ``sendmsg`` (Linux takes at most 1024).
IOV_MAX = 512
#: A waiting follower re-checks for a missed leader handoff this often (seconds).
HANDOFF_POLL = 0.05
#: Frames (or bytes) held back under load before the submitting thread writes them itself.
BATCH_FRAMES = 64
BATCH_BYTES = 256 * 1024
#: alive() reads the socket (to notice a peer that hung up) at most this often.
ALIVE_POLL = 0.005
#: Seconds close() may spend telling the store which results it can drop.
CLOSE_FLUSH_TIMEOUT = 1.0


def _flush_releases(client_ref: weakref.ref[BlockingClient], stop: threading.Event) -> None:
    """The flusher thread: sends queued result releases every FLUSH_DELAY seconds.

    It holds the client only weakly, so a client nobody closed can still be
    collected (and then stops this thread).
    """
    while not stop.wait(FLUSH_DELAY):
        client = client_ref()
        if client is None:
            return
        try:
            client.flush_releases()
        except Exception:  # the connection broke: calls will say so
            pass
        del client


def _write_held(peer_ref: weakref.ref[BlockingPeer], wanted: threading.Event) -> None:
    """The writer thread: writes a peer's held-back frames whenever woken.

    Under load, by the time it runs several frames are waiting: one system call
    (and one wakeup of the peer) for all of them. It holds the peer weakly.
    """
    while True:
        wanted.wait()
        wanted.clear()
        peer = peer_ref()
        if peer is None or peer._closing:
            return
        peer.flush(time.monotonic() + peer._write_timeout)
        del peer


class _Slot:
    __slots__ = ("done", "error", "value", "wake", "watchers")

    def __init__(self) -> None:
        self.wake = threading.Event()  # set when done, or when asked to take over reading
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        #: threads waiting for any of several slots (``BlockingPeer.wait_any``).
        self.watchers: list[_AnyOf] = []

    def finish(self) -> None:
        """Mark answered (value or error already set) and wake whoever waits for it."""
        self.done = True
        self.wake.set()
        watchers = self.watchers
        if watchers:
            for watcher in list(watchers):
                watcher.notify()


class _AnyOf:
    """A wait for the first of several slots: stands in for a slot in ``_waiting``."""

    __slots__ = ("done", "wake")

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.done = False

    def notify(self) -> None:
        self.done = True
        self.wake.set()


class BlockingPeer:
    """Requests and replies over one socket, usable from many threads at once.

    Every socket operation honours a deadline: the socket is non-blocking and
    threads wait for it in ``select()``, so a node that accepts and never
    answers, or stops reading, costs a caller its timeout and no more.
    """

    def __init__(self, url: str, *, token: str | None, timeout: float,
                 ssl_context: ssl.SSLContext | None = None,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        scheme, host, port = parse_address(url)
        if scheme not in ("tcp", "tls") or port is None:
            raise ValueError(f"the blocking client speaks tcp:// and tls://, not {url!r}")
        self.remote = url
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectionError(
                f"no Droplet node at {url} ({exc.strerror or exc}); "
                "start one with `python -m droplet.node`") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "tls":
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock = (ssl_context or ssl.create_default_context()).wrap_socket(
                    sock, server_hostname=host)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise ConnectionError(f"TLS handshake with {url} failed: {exc}") from exc
        sock.setblocking(False)  # every wait is a select() with the caller's deadline
        self._sock = sock
        self._decoder = FrameDecoder(max_frame_size)
        self._max = max_frame_size
        self._ids = itertools.count(1)
        self._pending: dict[int, _Slot] = {}
        self._waiting: set[_Slot | _AnyOf] = set()
        self._state = threading.Lock()
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._failure: BaseException | None = None
        self._polled = 0.0  # when alive() last read the socket
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
            if not self._send_all(frame(encode_message(response)), deadline):
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
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                    remaining = max(0.0, deadline - time.monotonic())
                    if not select.select([sock], [], [], remaining)[0]:
                        return False
                # The rest of a big frame goes straight into its own buffer.
                target = self._decoder.receive_buffer()
                try:
                    if target is None:
                        data = sock.recv(RECEIVE_SIZE)
                        got = len(data)
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
                if target is None:
                    self._decoder.feed(data)
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
            # TLS has no sendmsg, nor has every platform (Windows).
            gather = not isinstance(sock, ssl.SSLSocket) and hasattr(sock, "sendmsg")
            try:
                views = [memoryview(p) for p in ([data] if isinstance(data, bytes) else data)]
                first = sent = 0
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
        payloads = [encode_gather(m) for m in oneway]
        payloads += [encode_gather(m, i) for m, i in zip(msgs, ids, strict=True)]
        pieces = self._frames(payloads)
        if batch:
            with self._state:
                held = len(self._pending) > len(ids)  # others are in flight: hold back
                if held:
                    self._outgoing += pieces
                    self._outgoing_bytes += sum(len(p) for p in pieces)
                    full = (len(self._outgoing) >= BATCH_FRAMES
                            or self._outgoing_bytes >= BATCH_BYTES)
            if held:
                if not full:
                    self._wake_writer()
                    return slots
                pieces = []  # write what is held now, from this thread
        try:
            written = self._send_all(pieces, deadline)
        except DropletError as exc:
            self._fail(exc)
            raise
        if not written and batch and not pieces:  # ours stay held: the writer sends them
            self._wake_writer()
            return slots
        if not written:
            with self._state:
                for i in ids:
                    self._pending.pop(i, None)
            raise TimeoutError(
                f"could not send {type(msgs[0]).__name__ if msgs else 'a message'} to "
                f"{self.remote} within {timeout:g} s: other requests fill the connection "
                "and the node is not reading")
        return slots

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

    def flush(self, deadline: float) -> None:
        """Write the frames held back (see ``submit(batch=True)``) by ``deadline``."""
        if self._outgoing and self._failure is None:
            try:
                if not self._send_all(b"", deadline):
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
        parts = [p for payload in payloads for p in frame_parts(payload, self._max)]
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
                self._waiting.add(target)
            try:
                target.wake.wait(min(HANDOFF_POLL, max(0.0, deadline - time.monotonic())))
                target.wake.clear()
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
                    if not self._fill(deadline):
                        return
                    continue
                self._dispatch(payload)
            if type(slot) is _AnyOf:  # hand over the rest of what was read, in one go
                while (payload := self._decoder.next_frame()) is not None:
                    self._dispatch(payload)
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
        with self._state:
            for other in self._waiting:
                if not other.done:
                    other.wake.set()
                    return

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


class BlockingFuture:
    """A call's pending result; the read of it was sent with the call.

    The result stays in the store while this future lives (or, once ``obj_id``
    was handed out, until the connection closes): see ``_release.py``.
    """

    def __init__(self, key: str, client: BlockingClient, slot: _Slot, wait: float,
                 session: str | None, peer: BlockingPeer | None = None) -> None:
        self._key = key
        self._client = client
        self._slot = slot
        #: where the reply comes from: the store (a KvsValue), or for a call sent
        #: straight to an executor, that executor (a DagResult).
        self._peer = peer or client.kvs
        self._direct = peer is not None
        self._wait = wait
        self._session = session
        self._blob: Blob | None = None
        self._pinned = False

    @property
    def obj_id(self) -> str:
        """The KVS key of the result; handing it out keeps the result until close()."""
        if not self._pinned:
            self._pinned = True
            self._client.releases.pin(self._key)
            self._confirm_stored()
        return self._key

    def _confirm_stored(self) -> None:
        """A direct call's executor stores the result after answering: once this
        future holds the result and its key was handed out, wait (briefly) until
        the store has it, so ``get_object(obj_id)`` finds it."""
        if (self._direct and self._pinned and self._slot.done
                and not isinstance(self._slot.error, ConnectionError)):
            self._direct = False
            try:
                self._client.kvs.request(KvsGet(self._key, CONFIRM_WAIT), CONFIRM_WAIT + 5)
            except DropletError:  # the store went away: nothing to wait for
                pass

    def __del__(self) -> None:
        if not self._pinned:
            self._client.releases.release(self._key)

    def _take_reply(self, remaining: float) -> None:
        """Use the answered slot: the result, its error, or a new read if the wait ran out."""
        slot = self._slot
        if slot.error is not None:
            raise slot.error
        if type(slot.value) is DagResult:  # straight from the executor
            self._blob = slot.value.value
            return
        reply: KvsValue = slot.value
        if reply.lattice is not None:
            self._blob = result_blob(reply.lattice)
        elif remaining > 0:  # the store's wait ran out first: wait there again
            (self._slot,) = self._client.kvs.submit(KvsGet(self._key, remaining),
                                                    timeout=remaining)

    def get(self, timeout: float | None = None) -> Any:
        wait = check_timeout(timeout, self._wait)
        deadline = time.monotonic() + wait
        while self._blob is None:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                self._peer.wait(self._slot, remaining, "result")
            except TimeoutError:
                raise TimeoutError(
                    f"no result for {self._key} within {wait:g} s "
                    "(pass a larger timeout to get() if the function is slow)") from None
            self._take_reply(max(0.0, deadline - time.monotonic()))
            if self._blob is None and deadline <= time.monotonic():
                raise TimeoutError(
                    f"no result for {self._key} within {wait:g} s "
                    "(pass a larger timeout to get() if the function is slow)")
        if self._direct and self._pinned:
            self._confirm_stored()
        return self._client.core.finish(unwrap_result(self._blob), self._session)

    def done(self) -> bool:
        """Whether the result (or an error) is in; reads what arrived, never waits."""
        if self._blob is not None:
            return True
        self._peer.poll(self._slot)
        return self._settled()

    def _settled(self) -> bool:
        """Whether the result (or an error) is in, from what was read already (no I/O
        unless the store's wait ran out, when the read is sent again)."""
        if self._blob is not None:
            return True
        if not self._slot.done:
            return False
        if self._slot.error is not None:
            return True
        self._take_reply(self._wait)
        if self._blob is None:
            return False
        if self._direct and self._pinned:  # done: its handed-out key reads the result
            self._confirm_stored()
        return True


class BlockingClient:
    """The client API over :class:`BlockingPeer` (scheduler, and KVS when separate)."""

    def __init__(self, url: str, *, token: str | None, timeout: float,
                 ssl_context: ssl.SSLContext | None = None,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, direct: bool = True) -> None:
        token = token if token is not None else os.environ.get("DROPLET_TOKEN") or None
        self.timeout = timeout
        self.core = ClientCore()
        self.releases = Releases()

        def dial(address: str, connect_timeout: float = timeout) -> BlockingPeer:
            return BlockingPeer(address, token=token, timeout=connect_timeout,
                                ssl_context=ssl_context, max_frame_size=max_frame_size)

        def dial_executor(address: str) -> BlockingPeer:
            same_scheme(url, address)
            return dial(address, min(timeout, DIAL_TIMEOUT))

        def place(target: str, is_function: bool) -> CallPlaced:
            reply: CallPlaced = self.scheduler.request(PlaceCall(target, is_function), timeout)
            return reply

        #: calls sent straight to executors (placement cached from the scheduler).
        self.direct = DirectCalls(dial_executor, place)
        self.direct.enabled = direct

        self.scheduler = dial(url)
        try:
            info: ClusterInfo = self.scheduler.request(
                Hello("client", uuid.uuid4().hex[:12]), timeout)
            self.kvs = self.scheduler if info.kvs in ("", url) else dial(info.kvs)
        except BaseException:
            self.scheduler.close()
            raise
        self._stop_flusher = threading.Event()
        flusher = threading.Thread(target=_flush_releases,
                                   args=(weakref.ref(self), self._stop_flusher),
                                   name="droplet-client-releases", daemon=True)
        flusher.start()
        self._flusher = flusher

    def close(self) -> None:
        self._stop_flusher.set()
        if self._flusher is not threading.current_thread():
            self._flusher.join()
        try:
            keys = self.releases.take_all()
            for start in range(0, len(keys), MAX_BATCH):
                self.kvs.send(KvsForget(keys[start:start + MAX_BATCH]),
                              timeout=CLOSE_FLUSH_TIMEOUT)
        finally:
            self.direct.close()
            self.scheduler.close()
            self.kvs.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop_flusher", None)
        if stop is not None:
            stop.set()

    def _releases_due(self) -> list[Any]:
        """A KvsForget of the queued releases, to ride along with the next write."""
        if not len(self.releases):
            return []
        return [KvsForget(self.releases.take())]

    def flush_releases(self) -> None:
        """Tell the store about collected futures now (the flusher does it on a timer)."""
        while len(self.releases):
            keys = self.releases.take()
            if not self.kvs.send(KvsForget(keys), timeout=self.timeout):
                return

    # functions
    def register(self, function: Callable[..., Any] | tuple[type, Sequence[Any]],
                 name: str) -> None:
        self.scheduler.request(ClientCore.register_request(function, name), self.timeout)
        self.direct.forget(name, True)

    def function_exists(self, name: str) -> bool:
        reply: BoolReply = self.scheduler.request(FunctionExists(name), self.timeout)
        return reply.value

    def list(self, prefix: str | None = None) -> list[str]:
        reply: Names = self.scheduler.request(ListFunctions(prefix), self.timeout)
        return reply.names

    def exec_func(self, name: str, args: Iterable[Any]) -> BlockingFuture:
        call = ClientCore.function_call(name, args)
        return self._submit_direct(call) or self._submit(call, self.timeout)

    def _submit_direct(self, call: CallDag) -> BlockingFuture | None:
        """Send ``call`` straight to an executor (see ``_direct.py``); None when it must
        go through the scheduler (no executor reachable, or a call of another kind)."""
        if not may_go_direct(call):
            return None
        found = self.direct.target(call.target, call.is_function)
        if found is None:
            return None
        peer, plan = found
        triggers = triggers_for(call, plan, peer.remote)
        if triggers is None:
            return None
        assert call.result_key is not None
        try:  # the first source's trigger carries the request: the sink answers it
            (slot,) = peer.submit(triggers[0], timeout=self.timeout, oneway=triggers[1:],
                                  batch=True)
        except ConnectionError:
            self.direct.executor_left(peer.remote)
            return None
        # Placed by the scheduler, so of a shape it accepts: were these calls to
        # go through it later (direct calls off, executors unreachable), they
        # need not wait for CallAccepted.
        self.core.accepted.accepted(call)
        return BlockingFuture(call.result_key, self, slot, self.timeout, None, peer=peer)

    def map(self, name: str, items: Iterable[Any],
            chunksize: int) -> builtins.list[BlockingFuture]:
        """One call of ``name`` per item, ``chunksize`` calls (and their result reads)
        per write; every call is accepted (or the first refusal raised) before returning."""
        calls = [ClientCore.function_call(name, [item]) for item in items]
        keys = [c.result_key or "" for c in calls]
        deadline = time.monotonic() + self.timeout
        same = self.kvs is self.scheduler
        accepted: builtins.list[_Slot] = []
        futures: builtins.list[BlockingFuture] = []
        for start in range(0, len(calls), chunksize):
            chunk = calls[start:start + chunksize]
            fetches = [KvsGet(key, self.timeout) for key in keys[start:start + chunksize]]
            remaining = max(0.0, deadline - time.monotonic())
            if same:  # calls and result reads interleaved, in one write
                slots = self.scheduler.submit(
                    *[m for pair in zip(chunk, fetches, strict=True) for m in pair],
                    timeout=remaining, oneway=self._releases_due())
                call_slots, fetch_slots = slots[0::2], slots[1::2]
            else:
                call_slots = self.scheduler.submit(*chunk, timeout=remaining)
                fetch_slots = self.kvs.submit(*fetches, timeout=remaining,
                                              oneway=self._releases_due())
            accepted += call_slots
            futures += [BlockingFuture(f.key, self, slot, self.timeout, None)
                        for f, slot in zip(fetches, fetch_slots, strict=True)]
        refusal: DropletError | None = None
        for future, slot in zip(futures, accepted, strict=True):
            try:
                self.scheduler.wait(slot, max(0.0, deadline - time.monotonic()), "CallDag")
            except DropletError as exc:
                future._pinned = True  # refused: no result will be stored, none to release
                refusal = refusal or exc
        if refusal is not None:  # the first refusal (say, no such function)
            raise refusal
        return futures

    def _submit(self, call: CallDag, wait: float) -> BlockingFuture:
        assert call.result_key is not None
        fetch = KvsGet(call.result_key, wait)
        deadline = time.monotonic() + self.timeout
        accepted = self.core.accepted
        if accepted.known(call):
            # A call of this shape was accepted before: send it one-way, with no
            # wait for its acceptance; a refusal is stored as its result.
            if self.kvs is self.scheduler:  # one node: call and result read in one write
                (fetch_slot,) = self.scheduler.submit(
                    fetch, timeout=self.timeout, oneway=[*self._releases_due(), call])
            else:
                if not self.scheduler.send(call, timeout=self.timeout):
                    raise TimeoutError(
                        f"could not send the call to {self.scheduler.remote} within "
                        f"{self.timeout:g} s: the node is not reading")
                (fetch_slot,) = self.kvs.submit(fetch, timeout=self.timeout,
                                                oneway=self._releases_due())
            return BlockingFuture(call.result_key, self, fetch_slot, wait,
                                  ClientCore.session_of(call))
        if self.kvs is self.scheduler:  # one node: call and result read in one write
            call_slot, fetch_slot = self.scheduler.submit(
                call, fetch, timeout=self.timeout, oneway=self._releases_due())
        else:
            (call_slot,) = self.scheduler.submit(call, timeout=self.timeout)
            (fetch_slot,) = self.kvs.submit(fetch, timeout=self.timeout,
                                            oneway=self._releases_due())
        future = BlockingFuture(call.result_key, self, fetch_slot, wait,
                                ClientCore.session_of(call))
        try:
            self.scheduler.wait(call_slot, max(0.0, deadline - time.monotonic()), "CallDag")
        except BaseException:
            future._pinned = True  # refused: no result will be stored, nothing to release
            raise
        accepted.accepted(call)
        return future

    # DAGs
    def register_dag(self, name: str, functions: Sequence[Any], connections: Any,
                     colocated: Any, gpu_functions: Any = (),
                     batching_functions: Any = ()) -> None:
        self.scheduler.request(
            ClientCore.register_dag_request(name, functions, connections, colocated,
                                            gpu_functions, batching_functions),
            self.timeout)
        self.direct.forget(name, False)

    def delete_dag(self, name: str) -> None:
        self.scheduler.request(DeleteDag(name), self.timeout)
        self.direct.forget(name, False)

    def call_dag(self, name: str, arg_map: dict[str, Any], direct_response: bool,
                 consistency: str, output_key: str | None, client_id: str | None,
                 timeout: float | None, dry_run: bool = False,
                 continuation: CallDag | None = None) -> Any:
        call = self.core.dag_call(name, arg_map, direct_response, consistency, output_key,
                                  client_id, timeout, continuation)
        if dry_run:
            return call
        wait = self.timeout if timeout is None else timeout
        if not direct_response:
            return self._submit_direct(call) or self._submit(call, wait)
        try:
            result: DagResult = self.scheduler.request(call, wait)
        except TimeoutError as exc:
            raise TimeoutError(f"DAG {name!r} gave no result within {wait:g} s") from exc
        return self.core.finish(unwrap_result(result.value), ClientCore.session_of(call))

    # KVS
    def put_object(self, key: str, value: Any) -> bool:
        self.kvs.request(ClientCore.put_request(key, value), self.timeout)
        return True

    def get_object(self, key: str) -> Any:
        reply: KvsValue = self.kvs.request(KvsGet(check_key(key)), self.timeout)
        return ClientCore.stored_object(reply)

    def fetch_many(self, keys: builtins.list[str]) -> builtins.list[bytes | None]:
        """The stored encodings of ``keys``: all reads in one write."""
        deadline = time.monotonic() + self.timeout
        slots = self.kvs.submit(*[KvsGet(k) for k in keys], timeout=self.timeout)
        replies: builtins.list[KvsValue] = [
            self.kvs.wait(slot, max(0.0, deadline - time.monotonic()), "KvsGet")
            for slot in slots]
        return [r.lattice for r in replies]

    def store(self, key: str, data: bytes) -> None:
        self.kvs.request(KvsPut(key, data), self.timeout)

    # cluster
    def list_dags(self) -> builtins.list[str]:
        reply: Names = self.scheduler.request(ListDags(), self.timeout)
        return reply.names

    def status(self) -> ClusterStatus:
        reply: StatusReply = self.scheduler.request(GetStatus(), self.timeout)
        return ClusterStatus.from_json(reply.data)

