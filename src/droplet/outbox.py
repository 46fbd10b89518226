"""A peer's outbox: frames queued for its writer task, bounded in messages and bytes.

Pure bookkeeping (no I/O): :class:`~droplet.rpc.Peer` puts frames here from
handlers running in *other* peers' readers and its own writer task takes them
in batches. A full outbox means the peer is not reading; what happens then is
the poster's policy (see :meth:`droplet.rpc.Peer.post`).
"""

from __future__ import annotations

from collections import deque

from .protocol.framing import Payload

__all__ = ["OUTBOX_BYTES", "OUTBOX_MESSAGES", "Outbox"]

#: Messages and bytes an outbox holds before its peer counts as stuck.
OUTBOX_MESSAGES = 10_000
OUTBOX_BYTES = 64 * 1024 * 1024


class Outbox:
    """Frames in order; one frame of any size always fits an empty outbox."""

    __slots__ = ("_frames", "max_bytes", "max_messages", "size_bytes")

    def __init__(self, max_messages: int = OUTBOX_MESSAGES,
                 max_bytes: int = OUTBOX_BYTES) -> None:
        self._frames: deque[Payload] = deque()
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.size_bytes = 0

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: Payload) -> bool:
        """Queue ``frame``; False (and nothing queued) when the outbox is full."""
        if self._frames and (len(self._frames) >= self.max_messages
                             or self.size_bytes + len(frame) > self.max_bytes):
            return False
        self._frames.append(frame)
        self.size_bytes += len(frame)
        return True

    def take(self) -> list[Payload]:
        """Everything queued, oldest first; the outbox is empty afterwards."""
        frames = list(self._frames)
        self.clear()
        return frames

    def clear(self) -> None:
        self._frames.clear()
        self.size_bytes = 0
