"""Calls started through the lanes of executors in this Trio run.

Over an ``inproc://`` connection that carries objects (``skip_encoding``),
an executor offers its client a lane (:class:`droplet.executor.inline.Lane`):
the client prepares a DAG's run there once per placement (a template trigger
the executor validates, as the connection would) and then starts each call
of it with its run id and pickled arguments only. This module keeps those
preparations, per placement and executor, for :class:`~droplet.client.aio.AsyncDropletClient`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..ids import unique_id
from ..protocol.messages import CallDag, CallPlaced
from ..rpc import Peer
from ._direct import triggers_for

if TYPE_CHECKING:
    from .aio import AsyncDropletFuture

__all__ = ["MAX_LANES", "Lanes", "lane_of"]

#: DAG runs prepared on executors' lanes a client remembers (one per placement).
MAX_LANES = 256


def lane_of(peer: Peer) -> Any:
    """The lane the executor behind ``peer`` offers, or None (another transport,
    frames, none offered yet, or the connection closed)."""
    lane = getattr(peer.conn, "lane", None)
    return lane() if lane is not None else None


class Lanes:
    """One client's runs prepared on executors' lanes."""

    def __init__(self) -> None:
        #: (id(plan), executor url) -> (plan, lane, prepared run or None)
        self._prepared: dict[tuple[int, str], tuple[CallPlaced, Any, Any]] = {}

    def start(self, lane: Any, url: str, call: CallDag, plan: CallPlaced,
              future: AsyncDropletFuture) -> bool:
        """Start ``call`` (placed by ``plan`` on executor ``url``) through ``lane``,
        its result going to ``future``. False: not started (the lane does not
        take such runs, or not now); send it the ordinary way."""
        prepared_runs = self._prepared
        key = (id(plan), url)
        entry = prepared_runs.get(key)
        if entry is None or entry[0] is not plan or entry[1] is not lane:
            triggers = triggers_for(call, plan, url)
            prepared = lane.prepare(triggers[0]) if triggers and len(triggers) == 1 else None
            if len(prepared_runs) >= MAX_LANES:
                prepared_runs.clear()  # placements come and go with their leases
            entry = prepared_runs[key] = (plan, lane, prepared)
        prepared = entry[2]
        if prepared is None:
            return False
        was = future._direct, future._fetching
        future._direct = True  # answered to this client alone, as over the connection
        future._fetching = True
        if not prepared.run(unique_id(), call.arg_fns, call.arg_blobs, future._delivered):
            future._direct, future._fetching = was
            if prepared.stale:
                prepared_runs.pop(key, None)
            return False
        return True

    def clear(self) -> None:
        self._prepared.clear()
