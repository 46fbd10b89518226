"""A WebSocket client's wire, sans-IO: the upgrade, masked frames out, server frames in.

The blocking client (:mod:`droplet.client._blocking_peer`) speaks ``ws://`` and
``wss://`` through this, over its own blocking socket. A client needs only a
small part of RFC 6455: it masks every frame it sends, and parses unmasked
frames from the server. What it does, in Droplet's terms:

- one Droplet frame per binary message; a text message is a
  :class:`~droplet.ProtocolError` (and a close with code 1003 owed to the server);
- ``max_frame_size`` on what arrives, checked on the declared length before
  anything is set aside for it (fragments of one message count together);
- big messages (:data:`~droplet.protocol.framing.BIG_FRAME` and up) go
  straight into a buffer of their own from the process's pool, as with the
  length prefix of ``tcp://``;
- pings are answered (the pongs wait in :meth:`WsClientCodec.take_output`), pongs
  ignored, a close frame ends the connection with a ``ConnectionError`` naming
  its code and reason;
- no extensions (so no compression): a frame with a reserved bit set is refused.

The HTTP upgrade runs through h11 (:class:`Upgrade`). This module does no I/O;
it is tested synchronously.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import Any

import h11

from ..errors import ConnectionError, ProtocolError
from ..protocol.framing import (
    BIG_FRAME,
    DEFAULT_MAX_FRAME_SIZE,
    Buffer,
    BufferPool,
    Gather,
    Payload,
    ReceiveBuffer,
)

__all__ = ["Upgrade", "WsClientCodec", "close_frame", "encode_frame", "mask"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Bytes of HTTP response we accept before giving up on an upgrade.
MAX_UPGRADE_RESPONSE = 16 * 1024

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_CLEAN_CODES = frozenset({1000, 1001})
_H2 = struct.Struct(">BB")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
#: 256 tables: ``_XOR[k]`` maps each byte b to b ^ k (for bytes.translate).
_XOR = [bytes(b ^ k for b in range(256)) for k in range(256)]


def mask(data: Buffer, key: bytes) -> bytes:
    """``data`` XOR the 4-byte ``key`` repeated (a copy).

    >>> mask(mask(b"hello world", b"abcd"), b"abcd")
    b'hello world'
    """
    out = bytearray(len(memoryview(data).cast("B")))
    _mask_into(out, 0, memoryview(data).cast("B"), key)
    return bytes(out)


#: Payloads under this size are masked as one big integer.
SMALL = 1024
#: Pieces at least this big are masked with numpy, when it is installed.
NUMPY_MASK = SMALL
_np: Any = None


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


def _mask_into(out: bytearray, pos: int, data: memoryview, key: bytes) -> None:
    """Write ``data`` XOR ``key`` (repeated from its first byte) to ``out[pos:]``."""
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
    # Four strided translate passes, at C speed (a per-byte Python loop would
    # cost ~50 ns a byte here); ~15 ms a MiB, hence numpy for big pieces.
    out[pos:pos + n] = data
    for i in range(4):
        out[pos + i:pos + n:4] = out[pos + i:pos + n:4].translate(_XOR[key[i]])


def _header(opcode: int, size: int) -> bytes:
    if size < 126:
        return _H2.pack(0x80 | opcode, 0x80 | size)
    if size < 1 << 16:
        return _H2.pack(0x80 | opcode, 0x80 | 126) + _U16.pack(size)
    return _H2.pack(0x80 | opcode, 0x80 | 127) + _U64.pack(size)


def encode_frame(payload: Payload | memoryview, opcode: int = OP_BINARY) -> bytes | bytearray:
    """One whole, masked client frame (a fresh random key each), in one buffer:
    the payload (or each piece of a :class:`Gather`) is copied once, masked."""
    key = os.urandom(4)
    if type(payload) is bytes and len(payload) < SMALL:  # one int XOR: ~2 us
        n = len(payload)
        masked = (int.from_bytes(payload, "little")
                  ^ int.from_bytes((key * (n // 4 + 1))[:n], "little")).to_bytes(n, "little")
        return _header(opcode, n) + key + masked
    parts = payload.parts if isinstance(payload, Gather) else [payload]
    views = [memoryview(p).cast("B") for p in parts]
    size = sum(v.nbytes for v in views)
    head = _header(opcode, size) + key
    out = bytearray(len(head) + size)
    out[:len(head)] = head
    pos = 0
    for view in views:
        phase = pos % 4
        _mask_into(out, len(head) + pos, view, key[phase:] + key[:phase])
        pos += view.nbytes
    return out


def close_frame(code: int, reason: str = "") -> bytes:
    """A masked close frame (the reason cut to fit a control frame's 125 bytes)."""
    return bytes(encode_frame(_U16.pack(code) + reason.encode()[:123], OP_CLOSE))


class Upgrade:
    """The client side of the HTTP upgrade, over h11.

    ``request`` is what to send; feed the reply to :meth:`receive` until it
    returns the bytes that came after the reply (frames already sent, maybe
    none); ``None`` means more is needed. A refusal or a reply that is not a
    WebSocket upgrade raises ``ConnectionError`` naming ``url``.
    """

    def __init__(self, url: str, host_header: str, path: str = "/") -> None:
        self.url = url
        self._key = base64.b64encode(os.urandom(16))
        headers: list[tuple[bytes, bytes]] = [
            (b"Host", host_header.encode()), (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Key", self._key),
            (b"Sec-WebSocket-Version", b"13")]
        self._expect = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_UPGRADE_RESPONSE)
        self.request = self._h11.send(
            h11.Request(method="GET", target=path, headers=headers)) or b""

    def _not_ws(self, why: str) -> ConnectionError:
        return ConnectionError(f"{self.url} {why}; is it a Droplet ws:// listener?")

    def receive(self, data: bytes) -> bytes | None:
        conn = self._h11
        if data:
            conn.receive_data(data)
        try:
            event: Any = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise self._not_ws(f"answered the WebSocket upgrade with something else ({exc})"
                               ) from None
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            headers = {name.lower(): value for name, value in event.headers}
            if headers.get(b"sec-websocket-accept") != self._expect:
                raise self._not_ws("accepted the upgrade with a wrong Sec-WebSocket-Accept")
            if headers.get(b"sec-websocket-extensions"):
                raise self._not_ws("chose a WebSocket extension this client did not offer")
            return conn.trailing_data[0]
        if isinstance(event, h11.Response | h11.InformationalResponse):
            raise self._not_ws(f"refused the WebSocket upgrade (HTTP {event.status_code})")
        raise self._not_ws("hung up during the WebSocket upgrade")


class WsClientCodec(ReceiveBuffer):
    """Server frames in, Droplet frames out; masked client frames for what we send.

    The same interface as :class:`~droplet.protocol.framing.FrameDecoder`
    (``feed``, ``next_frame``, ``receive_buffer``, ``received``), plus
    :meth:`frame_parts` for sending and :meth:`take_output` for the control
    frames owed to the server (pongs, a close reply).
    """

    def __init__(self, remote: str, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 pool: BufferPool | None = None) -> None:
        # The big frame under way is one whole binary message.
        super().__init__(max_frame_size, pool)
        self.remote = remote
        self._fragments: bytearray | None = None  # a fragmented message under way
        self._output: list[bytes] = []

    # ------------------------------------------------------------------ sending

    def frame_parts(self, payload: Payload | memoryview) -> list[Buffer]:
        size = len(payload) if type(payload) is not memoryview else payload.nbytes
        if size > self.max_frame_size:
            raise ValueError(
                f"frame of {size} bytes exceeds max_frame_size={self.max_frame_size}")
        return [encode_frame(payload)]

    @property
    def has_output(self) -> bool:
        return bool(self._output)

    def take_output(self) -> bytes:
        """Control frames owed to the server (pongs, a close reply), once."""
        if not self._output:
            return b""
        out = b"".join(self._output)
        self._output.clear()
        return out

    def goodbye(self) -> bytes:
        """What to send before hanging up: a close frame (unless the server's was answered)."""
        return self.take_output() or close_frame(1000)

    # ------------------------------------------------------------------ receiving

    def next_frame(self) -> bytes | memoryview | None:
        """The next whole binary message; None when more bytes are needed.

        Raises ProtocolError for a server that broke the rules (a text message,
        an oversize or masked frame, ...) and ConnectionError for a close frame.
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
            opcode, fin = b0 & 0x0F, b0 & 0x80
            self._check(b0, b1, opcode, fin, size)
            end = start + size
            if len(buf) < end:
                if size >= BIG_FRAME and fin and opcode == OP_BINARY:
                    self._start_big(start, size)
                return None
            payload = bytes(memoryview(buf)[start:end])
            if end == len(buf):
                buf.clear()
                self._pos = 0
            else:
                self._pos = end
                if end > 65536:
                    del buf[:end]
                    self._pos = 0
            if opcode == OP_BINARY and fin:
                return payload
            message = self._other(opcode, fin, payload)
            if message is not None:
                return message

    def _check(self, b0: int, b1: int, opcode: int, fin: int, size: int) -> None:
        if b0 & 0x70:
            self._refuse(1002, "a frame with a reserved bit set (no extension was agreed)")
        if b1 & 0x80:
            self._refuse(1002, "a masked frame (a server's frames are never masked)")
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
            self._output.append(bytes(encode_frame(payload, OP_PONG)))
        elif opcode == OP_CLOSE:
            code = _U16.unpack_from(payload)[0] if len(payload) >= 2 else 1005
            reason = payload[2:].decode("utf-8", "replace")
            self._output.append(close_frame(1000 if code == 1005 else code))
            if code in _CLEAN_CODES or code == 1005:
                raise ConnectionError(f"{self.remote} closed the connection")
            why = f" ({reason})" if reason else ""
            raise ConnectionError(
                f"{self.remote} closed the connection with code {code}{why}")
        elif opcode in (OP_BINARY, OP_CONT):
            if self._fragments is None:
                self._fragments = bytearray()
            self._fragments += payload
            if fin:
                message, self._fragments = bytes(self._fragments), None
                return message
        return None

    def _refuse(self, code: int, what: str) -> None:
        self._output.append(close_frame(code, what[:60]))
        raise ProtocolError(f"{self.remote} sent {what}")

    def _start_big(self, start: int, size: int) -> None:
        buf = self._buf
        try:
            self._big = self._pool.take(size)
        except (OSError, MemoryError) as exc:
            raise ProtocolError(f"no memory for a frame of {size} bytes: {exc}") from None
        view = self._big_view = memoryview(self._big)[:size]
        have = len(buf) - start
        view[:have] = memoryview(buf)[start:]
        self._filled = have
        buf.clear()
        self._pos = 0
