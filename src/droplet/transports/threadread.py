"""Reading a plain TCP or plain ``ws://`` connection in a thread of its own
(an executor's callers).

On the ordinary path every frame costs the event loop an ``epoll`` wait, a
re-arm and a reschedule of the reader task, and a call that a worker thread
runs costs a second thread wakeup (the worker's). A :class:`ThreadReader`
reads the socket in a thread instead (``poll`` and a non-blocking read into
the connection's sans-IO :class:`~droplet.protocol.framing.FrameDecoder`) and
offers each frame to its owner (``offer(frame, inline)``, see
:meth:`droplet.rpc.Peer._take_in_reader`), which answers:

- ``False``: not taken; the frame goes to the Trio side, in order, where
  :meth:`ThreadReader.receive` returns it (to ``Peer``'s read loop, unchanged);
- ``True``: taken (say, queued for a worker thread);
- a callable: run it here, in this thread (``inline`` was True: no more bytes
  were waiting). A sequential call then costs one thread wakeup.

A callable that runs longer than :data:`TAKEOVER_AFTER` (it blocks, or waits
for a later message on this very connection) must not stop the connection
being read: a watcher thread then starts another thread, which takes over the
reader role; the old one exits when its callable returns.

The rules of the Trio path hold: a frame over the limit or garbage is an error
for the Trio side to raise (a goodbye, then the connection closes); a frame
left unfinished for ``read_timeout`` seconds aborts the connection; the end of
the stream is ``EndOfChannel``. A decoder that owes the peer answers of its
own (the WebSocket codec's pongs, ``has_output``) has them written from the
thread by the connection (``owed``), before the frame that came with them is
offered; a close frame or a refusal is an error the Trio side raises like any
other (where the WebSocket connection sends the close frame owed and hangs
up). The thread reads a duplicate of the socket's
descriptor, which it alone closes, so it never reads a descriptor number that
was closed and reused; :meth:`close` (the connection closing) shuts the socket
down, which wakes the thread, and it exits. At most :data:`MAX_READERS`
connections per process are read this way; others stay on Trio. A connection
whose frames the offer keeps declining (:data:`HAND_BACK_AFTER` in a row) is
given back to Trio; the connection tries a thread again later.
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from ..errors import ProtocolError
from ..protocol.framing import FrameDecoder

__all__ = ["HANDED_BACK", "MAX_READERS", "TAKEOVER_AFTER", "Abort", "Offer", "ThreadReader"]

log = logging.getLogger("droplet.transports")

#: Connections per process read by a thread of their own (others stay on Trio).
MAX_READERS = 16
#: Seconds a callable run in the reader thread may take before another thread
#: takes over reading the connection (checked every this many seconds, so a
#: takeover comes after one to two periods).
TAKEOVER_AFTER = 0.002
#: Seconds with nothing to watch before the watcher's thread parks.
WATCH_IDLE = 0.05
#: Threads still running a callable after handing over the reader role, at most;
#: past it, the owner is told not to run inline (it queues for its workers).
MAX_STUCK = 32
#: Frames in a row not taken after which the thread gives the reading back to Trio
#: (a connection whose calls all take the ordinary path: async functions, say).
HAND_BACK_AFTER = 16
#: What :meth:`ThreadReader.receive` returns once the thread gave the reading back:
#: the decoder (with whatever it holds) is the connection's again.
HANDED_BACK: Any = object()
#: Seconds a thread that handed over the reader role stands by to take it again.
SPARE_IDLE = 60.0
#: Frames waiting for the Trio side at most; the thread stops reading meanwhile.
INBOX_FRAMES = 256
RECEIVE_SIZE = 256 * 1024

#: ``offer(frame, inline)``: False, True, or a callable to run in the reader thread.
Offer = Callable[[Any, bool], "bool | Callable[[], None]"]


class Abort(Exception):
    """Raised on the Trio side for an error after which the connection is aborted
    (not said goodbye on): ``error`` is what to raise then."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


_count_lock = threading.Lock()
_readers = 0
_stuck = 0


class ThreadReader:
    """Reads one connection's frames in a thread; see the module's docstring."""

    def __init__(self, fd: int, decoder: FrameDecoder, read_timeout: float, remote: str,
                 offer: Offer, token: trio.lowlevel.TrioToken,
                 owed: Callable[[], None] | None = None) -> None:
        self._fd = fd  # a duplicate: this reader's own
        self._decoder = decoder
        self._owed = owed
        self._read_timeout = read_timeout
        self._remote = remote
        self._offer = offer
        self._token = token
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._inbox: deque[Any] = deque()
        self._waiter: trio.Event | None = None
        self._wake_pending = False
        #: the reader role: only the thread whose role number this is reads.
        self._role = 0
        #: (role, number) of the callable the role's holder runs now, if any.
        self._inline: tuple[int, int] | None = None
        self._runs = 0
        self._closed = False
        self._drained = True
        self._deadline = math.inf
        #: a thread that handed over the reader role, standing by (see ``_thread``).
        self._spare: _Spare | None = None
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    @classmethod
    def start(cls, fd: int, decoder: FrameDecoder, read_timeout: float, remote: str,
              offer: Offer, token: trio.lowlevel.TrioToken,
              owed: Callable[[], None] | None = None) -> ThreadReader | None:
        """A reader thread for ``fd`` (not closed by it); None past :data:`MAX_READERS`.

        ``owed``: for a decoder that owes the peer answers of its own (a WebSocket
        codec's pongs: ``has_output``), called in the thread whenever it does, after
        the decoder parsed what came in and before the frame is offered or the
        thread waits for more bytes (so the answer goes out before anything the
        frame's handling sends)."""
        global _readers
        with _count_lock:
            if _readers >= MAX_READERS:
                return None
            _readers += 1
        try:
            reader = cls(os.dup(fd), decoder, read_timeout, remote, offer, token, owed)
            reader._spawn(0)
        except BaseException:
            with _count_lock:
                _readers -= 1
            raise
        return reader

    def _spawn(self, role: int) -> None:
        threading.Thread(target=self._thread, args=(role,), daemon=True,
                         name=f"droplet-reader {self._remote}").start()

    def _thread(self, role: int) -> None:
        """A reader thread: holds the reader role, and once it handed that over (its
        run took long), stands by to take it back at the next handover (one spare
        per connection: a handover then costs a wakeup, not a new thread)."""
        while True:
            if not self._loop(role):
                return
            spare = _Spare()
            with self._lock:
                if self._spare is not None or self._closed or self._role < 0:
                    return  # (role < 0: the reading went back to Trio or ended meanwhile)
                self._spare = spare
            spare.event.wait(SPARE_IDLE)
            with self._lock:
                if self._spare is spare:
                    self._spare = None
                if spare.role is None:
                    return
                role = spare.role

    # ------------------------------------------------------------------ Trio side

    async def receive(self) -> Any:
        """The next frame not taken by the offer; raises what ended the reading
        (:class:`Abort` for an error that aborts the connection)."""
        while True:
            with self._lock:
                if self._inbox:
                    item = self._inbox.popleft()
                    if len(self._inbox) == INBOX_FRAMES - 1:
                        self._space.notify()
                    event = None
                else:
                    event = self._waiter = trio.Event()
            if event is None:
                if isinstance(item, BaseException):
                    with self._lock:  # the error stays for any later receive
                        self._inbox.appendleft(item)
                    raise item
                return item
            await event.wait()

    def _wake(self) -> None:
        with self._lock:
            event, self._waiter = self._waiter, None
            self._wake_pending = False
        if event is not None:
            event.set()

    def close(self) -> None:
        """The connection is closing: the thread stops reading (and waiting for room)
        and exits. The caller then shuts the socket down, which wakes its ``poll``."""
        with self._lock:
            self._closed = True
            self._space.notify_all()
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.event.set()  # with no role: it exits

    # ------------------------------------------------------------------ the thread

    def _push(self, item: Any) -> None:
        with self._lock:
            self._inbox.append(item)
            if self._waiter is None or self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._token.run_sync_soon(self._wake)
        except trio.RunFinishedError:
            pass

    def _loop(self, role: int) -> bool:
        """Read as the holder of ``role``; True once the role was handed over (and this
        thread's run returned), False when the reading ended."""
        global _stuck
        misses = 0  # frames in a row not taken
        try:
            while True:
                with self._lock:
                    while (len(self._inbox) >= INBOX_FRAMES and not self._closed
                           and self._role == role):
                        self._space.wait()  # backpressure: the Trio side is behind
                    if self._role != role:
                        return False
                    if self._closed:
                        self._end_locked()
                        return False
                try:
                    frame = self._next_frame()
                except BaseException as exc:
                    with self._lock:
                        self._end_locked()
                    self._push(exc)
                    return False
                # Run it here only when nothing else is waiting (the last read left
                # the socket empty), and not too many threads are held up already.
                inline = (self._drained and not self._decoder.buffered
                          and _stuck < MAX_STUCK)
                try:
                    taken = self._offer(frame, inline)
                except Exception:
                    log.exception("a reader thread's offer failed; the loop handles it")
                    taken = False
                if taken is False:
                    misses += 1
                    if misses >= HAND_BACK_AFTER:  # nothing for this thread to do
                        with self._lock:
                            if self._role == role:
                                self._end_locked()
                        self._push(frame)
                        self._push(HANDED_BACK)
                        return False
                    self._push(frame)
                    continue
                misses = 0
                if taken is True:
                    continue
                del frame
                with self._lock:
                    self._runs += 1
                    self._inline = (role, self._runs)
                    run = self._runs
                _watcher.watch(self, run)
                try:
                    taken()
                except BaseException:
                    log.exception("a call run in a reader thread failed")
                del taken
                with self._lock:
                    if self._role == role:
                        self._inline = None
                        continue
                    # (else ``_inline`` is the new holder's now, if anything)
                with _count_lock:  # handed over (see _due): this thread's part is done
                    _stuck -= 1
                return True
        except BaseException:  # our bug: the Trio side must not wait forever
            log.exception("the reader thread of %s failed", self._remote)
            with self._lock:
                if self._role == role:
                    self._end_locked()
            self._push(trio.BrokenResourceError("the connection's reader thread failed"))
            return False

    def _end_locked(self) -> None:
        """The role holder stops reading for good (with the lock held)."""
        global _readers
        self._role = -1
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.event.set()  # with no role: it exits
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
            with _count_lock:
                _readers -= 1

    def _due(self, run: int) -> None:
        """From the watcher: the callable ``run`` still runs? Another thread reads on."""
        global _stuck
        with self._lock:
            if self._closed or self._inline is None or self._inline[1] != run:
                return
            if self._inline[0] != self._role:
                return
            self._role += 1
            role = self._role
            with _count_lock:
                _stuck += 1
            spare, self._spare = self._spare, None
            if spare is not None:
                spare.role = role
        if spare is not None:
            spare.event.set()
            return
        try:
            self._spawn(role)
        except BaseException:  # no thread to be had: the role stays with its holder
            with self._lock:
                ended = False
                if self._role == role:
                    if self._inline is not None and self._inline[0] == role - 1:
                        self._role -= 1  # its holder reads on once its run returns
                        with _count_lock:
                            _stuck -= 1
                    else:  # (it gave up the role meanwhile: nobody is left to read)
                        self._end_locked()
                        ended = True
            if ended:
                self._push(trio.BrokenResourceError("no thread to read the connection"))
            raise

    def _next_frame(self) -> Any:
        decoder = self._decoder
        owed = self._owed
        while True:
            frame = decoder.next_frame()  # ProtocolError: a frame over the limit
            if owed is not None and decoder.has_output:  # type: ignore[attr-defined]
                owed()  # (a pong: before the frame is handled, or we wait)
            if frame is not None:
                self._deadline = math.inf
                return frame
            if decoder.mid_frame:
                # A peer that starts a frame must finish it in time (slowloris).
                now = time.monotonic()
                if self._deadline == math.inf:
                    self._deadline = now + self._read_timeout
                if now >= self._deadline:
                    raise Abort(ProtocolError(
                        f"{self._remote} left a frame unfinished for "
                        f"{self._read_timeout:g} s"))
                timeout = self._deadline - now
            else:
                timeout = None
            got = self._read(timeout)
            if got is None:
                continue  # timed out: the deadline is checked above
            if not got:
                if decoder.mid_frame:
                    raise ProtocolError(f"{self._remote} closed the connection mid-frame")
                raise trio.EndOfChannel

    def _read(self, timeout: float | None) -> bool | None:
        """One read into the decoder: False at the end of the stream, None when
        nothing came in ``timeout`` seconds."""
        decoder = self._decoder
        while True:
            if self._closed:
                raise trio.ClosedResourceError("connection is closed")
            if self._drained:
                ready = self._poll.poll(-1 if timeout is None else
                                        max(1, math.ceil(timeout * 1000)))
                if not ready:
                    return None
                if self._closed:
                    raise trio.ClosedResourceError("connection is closed")
            target = decoder.receive_buffer()
            try:
                if target is None:
                    data = os.read(self._fd, RECEIVE_SIZE)
                    self._drained = len(data) < RECEIVE_SIZE
                    decoder.feed(data)
                    return bool(data)
                n = os.readv(self._fd, [target])
                self._drained = n < len(target)
                decoder.received(n)
                return n > 0
            except (BlockingIOError, InterruptedError):
                self._drained = True
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


class _Spare:
    __slots__ = ("event", "role")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.role: int | None = None


class _Watcher:
    """Looks, every :data:`TAKEOVER_AFTER` seconds, at the callables reader threads
    started before its last look, and has another thread take over the reading
    of those still running (one thread per process, ended when idle)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._new: list[tuple[ThreadReader, int]] = []
        self._thread: threading.Thread | None = None

    def watch(self, reader: ThreadReader, run: int) -> None:
        with self._lock:
            self._new.append((reader, run))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="droplet-reader-watch")
                self._thread.start()

    def _loop(self) -> None:
        last = time.monotonic()
        watched: list[tuple[ThreadReader, int]] = []
        while True:
            time.sleep(TAKEOVER_AFTER)
            for reader, run in watched:  # started at least TAKEOVER_AFTER ago
                try:
                    reader._due(run)
                except Exception:
                    log.exception("could not hand over the reading of %s", reader._remote)
            with self._lock:
                watched, self._new = self._new, []
                if watched:
                    last = time.monotonic()
                elif time.monotonic() - last > WATCH_IDLE:
                    self._thread = None  # nothing to watch for a while: the thread ends
                    return


_watcher = _Watcher()
