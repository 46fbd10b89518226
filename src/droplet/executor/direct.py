"""Runs a client sent straight to this executor, and who waits for their results.

A client holding a placement from the scheduler
(:class:`~droplet.protocol.messages.CallPlaced`) sends the source triggers of
a run placed wholly on one executor itself, the first as a request. The
executor runs it as any other run; when the sink finishes, the result goes
back as the reply to that request (a ``DagResult``) and only then to the store
under the run's result key, off the caller's path; or, when the trigger says
``store_result=False`` (what clients send), only to the caller, which stores
it itself if anyone asks for its key (``future.obj_id``).
"""

from __future__ import annotations

import logging
from typing import Any

from ..consistency import NORMAL
from ..errors import DropletError, ProtocolError
from ..protocol.messages import ErrorReply, Trigger
from ..rpc import Peer

__all__ = ["Callers", "Reply", "check_direct"]

log = logging.getLogger("droplet.executor")

#: Callers remembered before runs that never finished are swept (every SWEEP_EVERY adds).
SWEEP_EVERY = 1024


def check_direct(t: Trigger, url: str) -> None:
    """A run a client may start here itself: placed wholly here, a source, NORMAL, plain."""
    if (any(p != url for p in t.placement) or t.source is not None or t.direct
            or t.consistency != NORMAL or t.output_key is not None or t.multiexec
            or t.batching or t.carried is not None or t.scheduler
            or any(dst == t.function for _, dst in t.edges)):
        raise ProtocolError(
            "a run sent straight to an executor must be placed wholly on it and start "
            "at a source function, at NORMAL consistency, without multi-exec, batching, "
            "continuations or an output key")


class Reply:
    """Where a direct run's result goes: the caller's connection and request id."""

    __slots__ = ("peer", "request_id", "since")

    def __init__(self, peer: Peer, request_id: int, since: float) -> None:
        self.peer = peer
        self.request_id = request_id
        self.since = since

    def send(self, msg: Any) -> None:
        """Answer through the caller's outbox; a caller gone is nothing to tell."""
        try:
            self.peer.post_reply(self.request_id, msg)
        except DropletError as exc:
            log.debug("the caller of a direct run went away: %s", exc)

    def send_error(self, message: str) -> None:
        self.send(ErrorReply("DropletError", message))


class Callers:
    """Run id -> the caller waiting for its result, for runs started by clients."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._waiting: dict[str, Reply] = {}
        self._adds = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._waiting

    def add(self, run_id: str, reply: Reply, now: float) -> None:
        if run_id in self._waiting:
            raise ProtocolError(f"run {run_id!r} was already started here")
        self._waiting[run_id] = reply
        self._adds += 1
        if self._adds % SWEEP_EVERY == 0:
            self.sweep(now)

    def pop(self, run_id: str) -> Reply | None:
        return self._waiting.pop(run_id, None)

    def sweep(self, now: float) -> None:
        """Answer callers of runs unfinished after ``ttl`` seconds (their fan-in never
        completed): an error, rather than silence until their own timeout."""
        cutoff = now - self.ttl
        for run_id in [r for r, reply in self._waiting.items() if reply.since < cutoff]:
            self._waiting.pop(run_id).send_error(
                f"run {run_id} was still unfinished after {self.ttl:g} s; dropped")

