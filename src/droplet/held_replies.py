"""Replies worker threads hold back under load, to write many per system call.

An executor's worker thread that runs calls back to back (more are queued)
holds the replies it writes with :meth:`droplet.rpc.Peer.write_from_thread`
(see ``executor/threads.py``) and writes them together, each connection's in
one write: one system call and one wakeup of the caller per batch instead of
one each. Replies are answers to distinct requests, matched by request id, so
holding them back reorders nothing a caller relies on.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .rpc import Peer

__all__ = ["HOLD_BYTES", "HOLD_FRAMES", "HeldReplies", "hold_replies", "replies_held"]

#: Replies a worker thread holds back at most (count, bytes) before writing them.
HOLD_FRAMES = 64
HOLD_BYTES = 64 * 1024

_holding = threading.local()  # .replies: this thread's HeldReplies while it holds


class HeldReplies:
    """Replies worker threads hold back while they run more queued calls, written
    many per system call (:meth:`flush`): one write and one wakeup of the caller
    for a batch instead of one each. Thread-safe: another thread may flush them
    (a worker stuck in a long call must not keep earlier calls' replies)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_peer: dict[Peer, list[bytes]] = {}
        self._frames = 0
        self._bytes = 0

    def __bool__(self) -> bool:
        return self._frames > 0

    def add(self, peer: Peer, frame: bytes) -> None:
        with self._lock:
            frames = self._by_peer.get(peer)
            if frames is None:
                self._by_peer[peer] = [frame]
            else:
                frames.append(frame)
            self._frames += 1
            self._bytes += len(frame)
            full = self._frames >= HOLD_FRAMES or self._bytes >= HOLD_BYTES
        if full:
            self.flush()

    def flush(self) -> None:
        """Write every held reply, each connection's in one write, in order."""
        with self._lock:
            if not self._frames:
                return
            by_peer, self._by_peer = self._by_peer, {}
            self._frames = self._bytes = 0
        for peer, frames in by_peer.items():
            peer._write_held(frames)


def hold_replies(replies: HeldReplies | None) -> None:
    """From a worker thread: hold back the replies it writes with
    :meth:`Peer.write_from_thread` in ``replies`` (None: write them at once)."""
    _holding.replies = replies


def replies_held() -> HeldReplies | None:
    """The HeldReplies this thread holds its replies in, if it holds them."""
    replies: HeldReplies | None = getattr(_holding, "replies", None)
    return replies
