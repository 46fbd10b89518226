"""Length-prefixed framing: 4-byte big-endian length, then the payload.

:class:`FrameDecoder` is a sans-IO byte-stream parser in the style of h11: feed
it whatever the socket returned, then pull complete frames out. The declared
length is checked against ``max_frame_size`` *before* any buffer grows for it,
so a peer cannot make us allocate what it merely claims.
"""

from __future__ import annotations

import struct

from ..errors import ProtocolError

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "FrameDecoder", "frame"]

DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
_LEN = struct.Struct(">I")
HEADER_SIZE = _LEN.size


def frame(payload: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Prefix ``payload`` with its length. Raises ``ValueError`` if it is too big to send."""
    if len(payload) > max_frame_size:
        raise ValueError(
            f"frame of {len(payload)} bytes exceeds max_frame_size={max_frame_size}"
        )
    return _LEN.pack(len(payload)) + payload


class FrameDecoder:
    """Turns a byte stream into frames.

    >>> d = FrameDecoder()
    >>> d.feed(frame(b"hello") + frame(b"wor")[:5])
    >>> d.next_frame(), d.next_frame()
    (b'hello', None)
    >>> d.feed(b"or"); d.next_frame()
    b'wor'
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf) - self._pos

    @property
    def mid_frame(self) -> bool:
        """True when part of a frame has arrived (used for read timeouts and EOF)."""
        return self.buffered > 0

    def feed(self, data: bytes | bytearray) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_frame(self) -> bytes | None:
        """Return the next complete frame, ``None`` if more bytes are needed.

        Raises ProtocolError when the peer declares a frame over the limit.
        """
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
            return None
        payload = bytes(buf[pos + HEADER_SIZE : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
            if end > 65536:  # compact occasionally, not per frame
                del buf[:end]
                self._pos = 0
        return payload
