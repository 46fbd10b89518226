"""Length-prefixed framing: 4-byte big-endian length, then the payload.

:class:`FrameDecoder` is a sans-IO byte-stream parser in the style of h11: feed
it whatever the socket returned, then pull complete frames out. The declared
length is checked against ``max_frame_size`` *before* any buffer is set aside
for it, so a peer cannot make us allocate more than the limit.

Big frames (:data:`BIG_FRAME` bytes and more) are not accumulated chunk by
chunk: once the header of one is in, the decoder sets aside a buffer of the
declared size and :meth:`FrameDecoder.receive_buffer` hands out the part still
to fill, so a socket ``recv_into`` writes the bytes straight to where they
stay (the frame is then a read-only ``memoryview`` of that buffer, and message
blobs are views into it: no copy).

The buffers are private anonymous memory (``mmap``), so a peer that declares a frame
and sends little of it makes the kernel commit only the pages that arrived.
They come from a small per-process pool (:class:`BufferPool`): touching fresh
pages costs more than copying into warm ones on small VMs (a fresh 50 MiB
buffer about 6x a copy into a used one), so a buffer nobody references any
more is used again. "Nobody" is exact: every view of a buffer holds a
reference to it, and a pooled buffer is handed out again only when the
pool's own reference is the only one left, so a decoded message may keep
views of its frame for as long as it likes.

On the sending side, :class:`Gather` is a payload in pieces (a message header
and the buffers of its blobs) that socket transports write with one gather
write instead of joining them into one copy.
"""

from __future__ import annotations

import mmap
import struct
import sys
import threading
from collections.abc import Sequence

from ..errors import ProtocolError

__all__ = ["BIG_FRAME", "DEFAULT_MAX_FRAME_SIZE", "Buffer", "BufferPool", "FrameDecoder",
           "Gather", "Payload", "ReceiveBuffer", "all_immutable", "frame", "frame_parts",
           "immutable", "join", "with_header"]

DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
#: Frames at least this big are received into a buffer of their own.
BIG_FRAME = 256 * 1024
_LEN = struct.Struct(">I")
HEADER_SIZE = _LEN.size

#: What a frame or a piece of one may be: bytes, or a view of someone's buffer.
Buffer = bytes | bytearray | memoryview


class Gather:
    """A frame payload in pieces, sent as they are (one gather write, no join).

    ``len()`` is its size in bytes and ``bytes()`` joins it (one copy), for
    transports that take only whole ``bytes``.

    >>> g = Gather([b"ab", memoryview(b"cde")])
    >>> len(g), bytes(g)
    (5, b'abcde')
    """

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: Sequence[Buffer]) -> None:
        self.parts = list(parts)
        self.nbytes = sum(p.nbytes if type(p) is memoryview else len(p) for p in self.parts)

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __repr__(self) -> str:
        return f"<Gather of {len(self.parts)} parts, {self.nbytes} bytes>"


#: A frame payload to send: whole bytes, or pieces.
Payload = bytes | Gather


def immutable(piece: Buffer) -> bool:
    """Whether nobody can change the bytes of ``piece``: ``bytes`` or a view of
    them (a read-only view of a writable buffer may still change behind it)."""
    obj: object = piece
    while type(obj) is memoryview:
        obj = obj.obj
    return type(obj) is bytes


def all_immutable(gather: Gather) -> bool:
    """Whether every piece of ``gather`` is :func:`immutable`."""
    return all(immutable(p) for p in gather.parts)


def join(payload: Payload, pool: BufferPool | None = None) -> bytes | memoryview:
    """``payload`` in one piece, for a transport that takes whole frames only.

    A big :class:`Gather` is copied into a pooled buffer (warm memory, used
    again once nothing refers to it) and comes back as a read-only view of it,
    what a socket's receiving side hands out; ``bytes(gather)`` would be a
    fresh allocation, which glibc maps page by page for every big frame
    (several times the cost of the copy). Anything else is returned as it is.
    """
    if not isinstance(payload, Gather):
        return payload
    size = payload.nbytes
    if size < BIG_FRAME:
        return b"".join(payload.parts)
    buffer = (POOL if pool is None else pool).take(size)
    view = memoryview(buffer)[:size]
    pos = 0
    for part in payload.parts:
        n = part.nbytes if type(part) is memoryview else len(part)
        view[pos:pos + n] = part
        pos += n
    return view.toreadonly()


def frame(payload: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Prefix ``payload`` with its length. Raises ``ValueError`` if it is too big to send."""
    if len(payload) > max_frame_size:
        raise ValueError(
            f"frame of {len(payload)} bytes exceeds max_frame_size={max_frame_size}"
        )
    return _LEN.pack(len(payload)) + payload


def frame_parts(payload: Payload | memoryview,
                max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> list[Buffer]:
    """:func:`frame` without joining: the pieces to write, header first.

    A small payload comes back as one joined piece (one system call's worth,
    cheaper to copy than to gather); a big one as the header and its pieces.
    """
    size = len(payload) if type(payload) is not memoryview else payload.nbytes
    if size > max_frame_size:
        raise ValueError(f"frame of {size} bytes exceeds max_frame_size={max_frame_size}")
    return with_header(_LEN.pack(size), payload, size)


def with_header(head: bytes, payload: Payload | memoryview, size: int) -> list[Buffer]:
    """``head`` then ``payload`` (of ``size`` bytes) as pieces to write: one joined
    piece when small, else the header and the payload's own buffers (no copy)."""
    if isinstance(payload, Gather):
        if size < BIG_FRAME:
            return [head + bytes(payload)]
        return [head, *payload.parts]
    if size < BIG_FRAME:
        return [head + payload]
    return [head, payload]


class BufferPool:
    """Big-frame buffers of one process, used again once nothing refers to them.

    Holds at most ``max_bytes`` of buffers; a frame that finds no free buffer
    big enough gets a new one (pooled if it fits, else freed after use).
    Thread-safe (the blocking client reads from many threads).
    """

    def __init__(self, max_bytes: int = 2 * DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_bytes = max_bytes
        self._buffers: list[mmap.mmap] = []
        self._lock = threading.Lock()

    @property
    def pooled_bytes(self) -> int:
        return sum(len(b) for b in self._buffers)

    def take(self, size: int) -> mmap.mmap:
        """A buffer of at least ``size`` bytes that nothing else refers to."""
        with self._lock:
            buffers = self._buffers
            best = -1
            for i in range(len(buffers)):
                # Two references: the list's and getrefcount's argument. Any
                # view (memoryview, decoded blob) of the buffer holds another.
                if len(buffers[i]) >= size and sys.getrefcount(buffers[i]) == 2 and (
                        best < 0 or len(buffers[i]) < len(buffers[best])):
                    best = i
            if best >= 0:
                return buffers[best]
            fresh = _new_buffer(size)
            room = self.max_bytes - self.pooled_bytes
            if size > room:  # make room by letting go of free buffers, biggest first
                for i in sorted(range(len(buffers)), key=lambda i: -len(buffers[i])):
                    if room >= size:
                        break
                    if sys.getrefcount(buffers[i]) == 2:
                        room += len(buffers[i])
                        buffers[i] = None  # type: ignore[call-overload]
                self._buffers = buffers = [b for b in buffers if b is not None]
            if size <= room:
                buffers.append(fresh)
            return fresh


#: Private anonymous memory: Python's default for ``mmap(-1, n)`` is a *shared*
#: mapping, which a forked child (``multiprocessing`` in a function) would
#: share with its parent, pool and all, each writing frames into the other's.
_PRIVATE = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}


def _new_buffer(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, **_PRIVATE)


#: The pool every decoder of this process takes its big-frame buffers from.
POOL = BufferPool()


class ReceiveBuffer:
    """Bytes of a stream not yet taken as messages, and the one big message under
    way, received straight into a pooled buffer of its own.

    What :class:`FrameDecoder` and the sync client's WebSocket codec share: a
    subclass parses ``_buf`` from ``_pos`` and, for a big message, sets
    ``_big`` / ``_big_view`` (its buffer and a view of its size) and ``_filled``.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 pool: BufferPool | None = None) -> None:
        self.max_frame_size = max_frame_size
        self._pool = POOL if pool is None else pool
        self._buf = bytearray()
        self._pos = 0
        # The big message under way: its buffer, a view of it, and how much is in.
        self._big: mmap.mmap | None = None
        self._big_view: memoryview | None = None
        self._filled = 0

    def receive_buffer(self) -> memoryview | None:
        """Where the rest of the big frame under way goes, else ``None``.

        A transport that can ``recv_into`` reads into this view and reports how
        many bytes it got with :meth:`received`; otherwise (or on ``None``) it
        :meth:`feed`\\ s what it read. Asking is only meaningful after
        :meth:`next_frame` returned ``None``.
        """
        view = self._big_view
        if view is None or self._filled == len(view):
            return None
        return view[self._filled:]

    def received(self, n: int) -> None:
        """``n`` bytes were written into the view :meth:`receive_buffer` gave."""
        view = self._big_view
        if view is None or not 0 <= n <= len(view) - self._filled:
            raise ValueError(f"received({n}) does not fit the frame under way")
        self._filled += n

    def _finish_big(self) -> memoryview | None:
        """The big message under way, read-only, once whole (then forgotten);
        None while bytes of it are still to come."""
        view = self._big_view
        assert view is not None
        if self._filled < len(view):
            return None
        self._big = self._big_view = None
        self._filled = 0
        return view.toreadonly()

    def feed(self, data: Buffer) -> None:
        view = self._big_view
        if view is not None and self._filled < len(view):
            data = memoryview(data)
            take = min(len(data), len(view) - self._filled)
            view[self._filled:self._filled + take] = data[:take]
            self._filled += take
            if take == len(data):
                return
            data = data[take:]
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data



class FrameDecoder(ReceiveBuffer):
    """Turns a byte stream into frames.

    >>> d = FrameDecoder()
    >>> d.feed(frame(b"hello") + frame(b"wor")[:5])
    >>> d.next_frame(), d.next_frame()
    (b'hello', None)
    >>> d.feed(b"or"); d.next_frame()
    b'wor'

    Frames under :data:`BIG_FRAME` come out as ``bytes``; bigger ones as a
    read-only ``memoryview`` of a buffer that belongs to that frame alone.
    """

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        staged = len(self._buf) - self._pos
        if self._big is not None:
            staged += HEADER_SIZE + self._filled
        return staged

    @property
    def mid_frame(self) -> bool:
        """True when part of a frame has arrived (used for read timeouts and EOF)."""
        return self.buffered > 0

    def next_frame(self) -> bytes | memoryview | None:
        """Return the next complete frame, ``None`` if more bytes are needed.

        Raises ProtocolError when the peer declares a frame over the limit.
        """
        if self._big_view is not None:
            return self._finish_big()
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        (size,) = _LEN.unpack_from(buf, pos)
        if size > self.max_frame_size:
            raise ProtocolError(
                f"peer declared a {size}-byte frame; the limit is {self.max_frame_size}"
            )
        end = pos + HEADER_SIZE + size
        if len(buf) < end:
            if size >= BIG_FRAME:
                self._start_big(size)
            return None
        payload = bytes(memoryview(buf)[pos + HEADER_SIZE : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
            if end > 65536:  # compact occasionally, not per frame
                del buf[:end]
                self._pos = 0
        return payload

    def _start_big(self, size: int) -> None:
        """Give the big frame whose header is at ``_pos`` a buffer; move its start there."""
        buf, start = self._buf, self._pos + HEADER_SIZE
        try:
            self._big = self._pool.take(size)
        except (OSError, MemoryError) as exc:  # e.g. ENOMEM under strict overcommit
            # This connection cannot go on; the process (and its other peers) can.
            raise ProtocolError(f"no memory for a frame of {size} bytes: {exc}") from None
        view = self._big_view = memoryview(self._big)[:size]
        have = len(buf) - start
        view[:have] = memoryview(buf)[start:]
        self._filled = have
        buf.clear()
        self._pos = 0
