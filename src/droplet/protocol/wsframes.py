"""WebSocket frames (RFC 6455 section 5), sans-IO, for either end of a connection.

One codec serves both ends of ``ws://`` and ``wss://``: the async transport's
connections (:mod:`droplet.transports.websocket`, both roles) and the blocking
client (:mod:`droplet.client._ws_codec`, the client role). A client masks every
frame it sends and accepts only unmasked frames; a server is the reverse. What
it does, in Droplet's terms:

- one Droplet frame per binary message; a text message is a
  :class:`~droplet.ProtocolError` (and a close with code 1003 owed to the peer);
- ``max_frame_size`` on what arrives, checked on the declared length before
  anything is set aside for it (fragments of one message count together);
- big messages (:data:`~droplet.protocol.framing.BIG_FRAME` and up) go
  straight into a buffer of their own from the process's pool, as with the
  length prefix of ``tcp://`` (a masked one is unmasked there, in place);
- pings are answered (the pongs wait in :meth:`WsCodec.take_output`), pongs
  ignored, a close frame raises :class:`PeerClosed` with its code and reason,
  the close reply owed;
- no extensions (so no compression, no decompression bombs): a frame with a
  reserved bit set is refused, as is a frame masked the wrong way, an unknown
  opcode, a fragmented or oversize control frame, a stray continuation frame.

Every refusal queues a close frame with the RFC's code (1002, 1003, 1007,
1009) for the transport to send before it hangs up. This module does no I/O.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from ..errors import ConnectionError, ProtocolError
from .framing import (
    BIG_FRAME,
    DEFAULT_MAX_FRAME_SIZE,
    Buffer,
    BufferPool,
    Gather,
    Payload,
    ReceiveBuffer,
    with_header,
)

__all__ = ["PeerClosed", "WsCodec", "close_frame", "encode_frame", "mask", "server_frame_parts"]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
#: Close codes that mean "done", not "broken" (1005: the close frame had no code).
CLEAN_CODES = frozenset({1000, 1001, 1005})
_H2 = struct.Struct(">BB")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
#: 256 tables: ``_XOR[k]`` maps each byte b to b ^ k (for bytes.translate).
_XOR = [bytes(b ^ k for b in range(256)) for k in range(256)]
#: Payloads under this size are masked as one big integer.
SMALL = 1024
#: Pieces at least this big are masked with numpy, when it is installed.
NUMPY_MASK = SMALL
_np: Any = None


class PeerClosed(ConnectionError):
    """The peer sent a close frame: ``code`` (1005 when it gave none) and ``reason``."""

    def __init__(self, message: str, code: int, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason

    @property
    def clean(self) -> bool:
        """True for a normal goodbye (1000, 1001, no code)."""
        return self.code in CLEAN_CODES


def _numpy() -> Any:
    """numpy, or False when it is not installed (imported on the first big frame)."""
    global _np
    if _np is None:
        try:
            import numpy
        except ImportError:
            _np = False
        else:
            _np = numpy
    return _np


def mask(data: Buffer, key: bytes) -> bytes:
    """``data`` XOR the 4-byte ``key`` repeated (a copy); masking twice unmasks.

    >>> mask(mask(b"hello world", b"abcd"), b"abcd")
    b'hello world'
    """
    view = memoryview(data).cast("B")
    n = view.nbytes
    if n < SMALL:  # one int XOR: ~2 us
        return (int.from_bytes(view, "little")
                ^ int.from_bytes((key * (n // 4 + 1))[:n], "little")).to_bytes(n, "little")
    out = bytearray(n)
    _mask_into(out, 0, view, key)
    return bytes(out)


def _mask_into(out: bytearray | memoryview, pos: int, data: memoryview, key: bytes) -> None:
    """Write ``data`` XOR ``key`` (repeated from its first byte) to ``out[pos:]``.

    ``data`` may be that very part of ``out`` (unmasking in place)."""
    n = data.nbytes
    np: Any = _numpy() if n >= NUMPY_MASK else False
    if np:
        body = n - n % 4
        word = np.frombuffer(key, dtype=np.uint32)[0]
        np.bitwise_xor(np.frombuffer(data, dtype=np.uint32, count=body // 4), word,
                       out=np.frombuffer(out, dtype=np.uint32, count=body // 4,
                                         offset=pos))
        for i in range(body, n):
            out[pos + i] = data[i] ^ key[i % 4]
        return
    # Four strided translate passes per piece, at C speed (a per-byte Python
    # loop would cost ~50 ns a byte here); ~15 ms a MiB, hence numpy when it is there.
    step = 1 << 20
    for at in range(0, n, step):
        piece = bytearray(data[at:at + step])
        for i in range(4):
            piece[i::4] = piece[i::4].translate(_XOR[key[i]])
        out[pos + at:pos + at + len(piece)] = piece


def _header(opcode: int, size: int, masked: bool) -> bytes:
    bit = 0x80 if masked else 0
    if size < 126:
        return _H2.pack(0x80 | opcode, bit | size)
    if size < 1 << 16:
        return _H2.pack(0x80 | opcode, bit | 126) + _U16.pack(size)
    return _H2.pack(0x80 | opcode, bit | 127) + _U64.pack(size)


def encode_frame(payload: Payload | memoryview, opcode: int = OP_BINARY,
                 masked: bool = True) -> bytes | bytearray:
    """One whole frame in one buffer; ``masked`` (a client's) with a fresh random
    key, the payload (or each piece of a :class:`Gather`) copied once, masked."""
    if not masked:
        return b"".join(server_frame_parts(payload, opcode))
    key = os.urandom(4)
    if type(payload) is bytes and len(payload) < SMALL:  # one int XOR: ~2 us
        n = len(payload)
        body = (int.from_bytes(payload, "little")
                ^ int.from_bytes((key * (n // 4 + 1))[:n], "little")).to_bytes(n, "little")
        return _header(opcode, n, True) + key + body
    parts = payload.parts if isinstance(payload, Gather) else [payload]
    views = [memoryview(p).cast("B") for p in parts]
    size = sum(v.nbytes for v in views)
    head = _header(opcode, size, True) + key
    out = bytearray(len(head) + size)
    out[:len(head)] = head
    pos = 0
    for view in views:
        phase = pos % 4
        _mask_into(out, len(head) + pos, view, key[phase:] + key[:phase])
        pos += view.nbytes
    return out


def server_frame_parts(payload: Payload | memoryview, opcode: int = OP_BINARY) -> list[Buffer]:
    """An unmasked (server's) frame as pieces to write (see ``with_header``)."""
    size = len(payload) if type(payload) is not memoryview else payload.nbytes
    return with_header(_header(opcode, size, False), payload, size)


def close_frame(code: int, reason: str = "", masked: bool = True) -> bytes:
    """A close frame (the reason cut to fit a control frame's 125 bytes)."""
    body = _U16.pack(code) + reason.encode()[:123]
    return bytes(encode_frame(body, OP_CLOSE, masked))


class WsCodec(ReceiveBuffer):
    """WebSocket frames in, Droplet frames out, and frames for what we send.

    The same reading interface as :class:`~droplet.protocol.framing.FrameDecoder`
    (``feed``, ``next_frame``, ``receive_buffer``, ``received``, ``mid_frame``),
    plus :meth:`frame_parts` for sending and :meth:`take_output` for the control
    frames owed to the peer (pongs, a close). ``client``: this end is the client
    (masks what it sends, expects unmasked frames); else the server.
    """

    def __init__(self, remote: str, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 pool: BufferPool | None = None, *, client: bool = True) -> None:
        super().__init__(max_frame_size, pool)
        self.remote = remote
        self.client = client
        #: the second header byte's mask bit that the peer's frames must have.
        self._mask_bit = 0 if client else 0x80
        self._fragments: bytearray | None = None  # a fragmented message under way
        self._big_key: bytes | None = None  # the mask of the big message under way
        self._output: list[bytes] = []
        #: True while control frames are owed to the peer (see take_output).
        self.has_output = False

    # ------------------------------------------------------------------ sending

    def frame_parts(self, payload: Payload | memoryview) -> list[Buffer]:
        """The pieces to write for one binary message (ValueError over the limit)."""
        size = len(payload) if type(payload) is not memoryview else payload.nbytes
        if size > self.max_frame_size:
            raise ValueError(
                f"frame of {size} bytes exceeds max_frame_size={self.max_frame_size}")
        if self.client:
            return [encode_frame(payload)]
        return server_frame_parts(payload)

    def take_output(self) -> bytes:
        """Control frames owed to the peer (pongs, a close), once."""
        if not self._output:
            return b""
        out = b"".join(self._output)
        self._output.clear()
        self.has_output = False
        return out

    def close(self, code: int = 1000, reason: str = "") -> bytes:
        """A close frame from this end."""
        return close_frame(code, reason, self.client)

    def goodbye(self) -> bytes:
        """What to send before hanging up: a close frame (unless the peer's was answered)."""
        return self.take_output() or self.close(1000)

    def _owe(self, frame: bytes) -> None:
        self._output.append(frame)
        self.has_output = True

    # ------------------------------------------------------------------ receiving

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message (a reader thread runs a
        call inline only when nothing else is waiting: see ``transports/threadread``)."""
        staged = len(self._buf) - self._pos
        if self._big_view is not None:
            staged += self._filled
        if self._fragments is not None:
            staged += len(self._fragments)
        return staged

    @property
    def mid_frame(self) -> bool:
        """True when part of a message has arrived (for read timeouts and EOF)."""
        return (len(self._buf) > self._pos or self._big_view is not None
                or self._fragments is not None)

    def next_frame(self) -> bytes | memoryview | None:
        """The next whole binary message; None when more bytes are needed.

        Raises ProtocolError for a peer that broke the rules (a text message,
        an oversize or wrongly masked frame, ...) and PeerClosed for a close frame.
        """
        if self._big_view is not None:
            return self._finish_big()
        while True:
            buf, pos = self._buf, self._pos
            have = len(buf) - pos
            if have < 2:
                return None
            b0, b1 = buf[pos], buf[pos + 1]
            size, start = b1 & 0x7F, pos + 2
            if size == 126:
                if have < 4:
                    return None
                (size,) = _U16.unpack_from(buf, pos + 2)
                start += 2
            elif size == 127:
                if have < 10:
                    return None
                (size,) = _U64.unpack_from(buf, pos + 2)
                start += 8
            if (b0 != 0x82 or b1 & 0x80 != self._mask_bit or size > self.max_frame_size
                    or self._fragments is not None):
                self._check(b0, b1, size)  # not one whole binary message: look closer
            key = None
            if b1 & 0x80:
                if len(buf) < start + 4:
                    return None
                key = bytes(buf[start:start + 4])
                start += 4
            end = start + size
            if len(buf) < end:
                if size >= BIG_FRAME and b0 == 0x82 and self._fragments is None:
                    self._start_big(start, size, key)
                return None
            if key is None:
                payload = bytes(memoryview(buf)[start:end])
            elif size < SMALL:  # one int XOR, inline: the hot path of a server
                payload = (int.from_bytes(buf[start:end], "little") ^ int.from_bytes(
                    (key * (size // 4 + 1))[:size], "little")).to_bytes(size, "little")
            else:
                payload = mask(memoryview(buf)[start:end], key)
            if end == len(buf):
                buf.clear()
                self._pos = 0
            else:
                self._pos = end
                if end > 65536:
                    del buf[:end]
                    self._pos = 0
            if b0 == 0x82 and self._fragments is None:
                return payload
            message = self._other(b0 & 0x0F, b0 & 0x80, payload)
            if message is not None:
                return message

    def _check(self, b0: int, b1: int, size: int) -> None:
        opcode, fin = b0 & 0x0F, b0 & 0x80
        if b0 & 0x70:
            self._refuse(1002, "a frame with a reserved bit set (no extension was agreed)")
        if b1 & 0x80 != self._mask_bit:
            self._refuse(1002, "a masked frame (a server's frames are never masked)"
                         if self.client else
                         "an unmasked frame (a client's frames are always masked)")
        if opcode >= OP_CLOSE:
            if not fin or size > 125:
                self._refuse(1002, "a fragmented or oversize control frame")
            if opcode > OP_PONG:
                self._refuse(1002, f"a frame of unknown opcode {opcode:#x}")
            return
        if opcode == OP_TEXT:
            self._refuse(1003, "a text message; Droplet frames travel as binary messages")
        if opcode not in (OP_BINARY, OP_CONT):
            self._refuse(1002, f"a frame of unknown opcode {opcode:#x}")
        if (opcode == OP_CONT) != (self._fragments is not None):
            self._refuse(1002, "a continuation frame out of place")
        total = size + (len(self._fragments) if self._fragments is not None else 0)
        if total > self.max_frame_size:
            self._refuse(1009, f"a frame over max_frame_size={self.max_frame_size} "
                               f"({total} bytes declared)")

    def _other(self, opcode: int, fin: int, payload: bytes) -> bytes | None:
        """A control frame or a fragment: the message it completes, if any."""
        if opcode == OP_PING:
            self._owe(bytes(encode_frame(payload, OP_PONG, self.client)))
        elif opcode == OP_CLOSE:
            self._closed_by_peer(payload)
        elif opcode in (OP_BINARY, OP_CONT):
            if self._fragments is None:
                self._fragments = bytearray()
            self._fragments += payload
            if fin:
                message, self._fragments = bytes(self._fragments), None
                return message
        return None

    def _closed_by_peer(self, payload: bytes) -> None:
        if len(payload) == 1:
            self._refuse(1002, "a close frame with a one-byte body")
        code = _U16.unpack_from(payload)[0] if payload else 1005
        if payload and (code < 1000 or code in (1004, 1005, 1006, 1015)
                        or 1016 <= code < 3000 or code >= 5000):
            self._refuse(1002, f"a close frame with the invalid code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(1007, "a close frame whose reason is not UTF-8")
        self._owe(self.close(1000 if code == 1005 else code))
        if code in CLEAN_CODES:
            raise PeerClosed(f"{self.remote} closed the connection", code, reason)
        why = f" ({reason})" if reason else ""
        raise PeerClosed(f"{self.remote} closed the connection with code {code}{why}",
                         code, reason)

    def _refuse(self, code: int, what: str) -> None:
        self._owe(self.close(code, what[:60]))
        raise ProtocolError(f"{self.remote} sent {what}")

    def _start_big(self, start: int, size: int, key: bytes | None) -> None:
        buf = self._buf
        try:
            self._big = self._pool.take(size)
        except (OSError, MemoryError) as exc:
            raise ProtocolError(f"no memory for a frame of {size} bytes: {exc}") from None
        view = self._big_view = memoryview(self._big)[:size]
        self._big_key = key
        have = len(buf) - start
        view[:have] = memoryview(buf)[start:]
        self._filled = have
        buf.clear()
        self._pos = 0

    def _finish_big(self) -> memoryview | None:
        view, key = self._big_view, self._big_key
        if key is not None and view is not None and self._filled == len(view):
            _mask_into(view, 0, view, key)  # unmasked where it stays
            self._big_key = None
        return super()._finish_big()
