"""Calls sent straight to an executor, with placement from the scheduler.

Through the scheduler a call crosses four connections (client -> scheduler ->
executor -> store -> client); sent straight to an executor it crosses two
(client -> executor -> client), and the executor writes the result key to the
store after answering. The scheduler still owns placement and load: it hands
out, per function or DAG, the executors that may run a whole call of it, least
loaded first, with the call's schedule (:class:`~droplet.protocol.messages.CallPlaced`),
for a short lease; the client spreads calls over them in turn and asks again
when the lease ends.

A cached placement is dropped when an executor on it leaves (its connection
ends, or it cannot be reached), and calls go through the scheduler whenever
no executor of the placement can be reached (executors listening on an
address this client cannot dial, or a scheduler that does not hand out
placements).

Other clients learn that a function was registered again, or a DAG deleted,
when their lease ends (a few seconds): until then their calls run the
function's new code (executors load what is stored) or the deleted DAG.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import DropletError, ProtocolError
from ..protocol.messages import CallPlaced

__all__ = ["DIAL_TIMEOUT", "UNREACHABLE_RETRY", "DirectCalls"]

#: Seconds to connect to an executor before sending its calls through the scheduler.
DIAL_TIMEOUT = 2.0
#: Seconds an executor that could not be reached is not tried again.
UNREACHABLE_RETRY = 30.0


class _Placed:
    __slots__ = ("expires", "plan", "turn", "urls")

    def __init__(self, plan: CallPlaced, expires: float) -> None:
        self.plan = plan
        self.urls = list(plan.executors)
        self.expires = expires
        self.turn = 0


class DirectCalls:
    """Cached placements and connections to executors, for one client.

    ``dial(url)`` opens a connection to an executor (anything with ``alive()``
    and ``close()``); ``place(target, is_function)`` asks the scheduler (a
    CallPlaced, or the error of an unknown function or DAG). Thread-safe.
    """

    def __init__(self, dial: Callable[[str], Any],
                 place: Callable[[str, bool], CallPlaced],
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self._dial = dial
        self._place = place
        self._clock = clock
        self._placements: dict[tuple[str, bool], _Placed] = {}
        self._peers: dict[str, Any] = {}
        self._unreachable: dict[str, float] = {}
        self._lock = threading.Lock()
        #: False once the scheduler turned out not to hand out placements.
        self.enabled = True

    def target(self, target: str, is_function: bool) -> tuple[Any, CallPlaced] | None:
        """A live connection to an executor for a call of ``target``, and its schedule.

        None: send the call through the scheduler. Raises what the scheduler
        said about ``target`` (say, RegistrationError: no function of that name).
        """
        if not self.enabled:
            return None
        now = self._clock()
        key = (target, is_function)
        placed = self._placements.get(key)
        if placed is None or placed.expires <= now:
            try:
                reply = self._place(target, is_function)
            except ProtocolError:  # a scheduler that does not place calls for clients
                self.enabled = False
                return None
            placed = _Placed(reply, now + reply.lease)
            self._placements[key] = placed
        for _ in range(len(placed.urls)):
            url = placed.urls[placed.turn % len(placed.urls)]
            placed.turn += 1
            peer = self._peer(url, now)
            if peer is not None:
                return peer, placed.plan
        return None

    def _peer(self, url: str, now: float) -> Any:
        peer = self._peers.get(url)
        if peer is not None:
            if peer.alive():
                return peer
            self.executor_left(url)
        if self._unreachable.get(url, 0.0) > now:
            return None
        with self._lock:  # one dial per executor, however many threads call
            peer = self._peers.get(url)
            if peer is not None:
                return peer
            try:
                peer = self._dial(url)
            except (DropletError, ValueError, OSError):
                self._unreachable[url] = now + UNREACHABLE_RETRY
                return None
            self._unreachable.pop(url, None)
            self._peers[url] = peer
            return peer

    def executor_left(self, url: str) -> None:
        """Forget ``url``: its connection, and every placement naming it."""
        peer = self._peers.pop(url, None)
        if peer is not None:
            peer.close()
        for key, placed in list(self._placements.items()):
            if url in placed.urls:
                self._placements.pop(key, None)

    def forget(self, target: str, is_function: bool) -> None:
        """Drop the placement of ``target`` (this client changed or deleted it)."""
        self._placements.pop((target, is_function), None)

    def placed(self, target: str, is_function: bool = True) -> list[str]:
        """The executors cached for ``target`` (empty when none are)."""
        placed = self._placements.get((target, is_function))
        return list(placed.urls) if placed is not None else []

    def close(self) -> None:
        peers, self._peers = self._peers, {}
        self._placements.clear()
        for peer in peers.values():
            peer.close()
