"""``map()`` straight to executors: many calls per write, results as direct replies.

The calls of a map are grouped by the keys their ``DropletReference``
arguments name (most maps have one group: no references). Each group's items
are split, in contiguous runs as even as can be, over the executors its
placement prefers (see ``_direct.py``: all of them, least loaded first, for
calls without references; those caching the data otherwise), and each run is
sent in writes of at most ``chunksize`` calls. Every call is a request whose
reply (the result) comes from the executor, as for a single direct call.

Calls that cannot go direct (no executor reachable, a write to an executor
that left) go through the scheduler as before; the futures stay in item order.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConnectionError
from ..protocol.messages import CallDag, CallPlaced, Trigger
from ._direct import may_go_direct, reference_set, spread_over, triggers_for

if TYPE_CHECKING:
    from ._blocking import BlockingClient, BlockingFuture

__all__ = ["Chunk", "chunks_for", "map_direct"]

P = TypeVar("P")


class Chunk:
    """Calls (by their index in the map) to send to one executor in one write."""

    __slots__ = ("indices", "peer", "triggers")

    def __init__(self, peer: Any, indices: list[int], triggers: list[Trigger]) -> None:
        self.peer = peer
        self.indices = indices
        self.triggers = triggers


def chunks_for(calls: Sequence[CallDag], chunksize: int,
               spread: Callable[[tuple[str, ...], int], Sequence[tuple[P, CallPlaced]]],
               remote: Callable[[P], str]) -> tuple[list[Chunk], list[int]]:
    """The writes that send ``calls`` straight to executors, and the indices of
    the calls that must go through the scheduler instead.

    ``spread(references, count)``: the live connections and schedule for
    ``count`` calls naming ``references`` (see
    :meth:`~droplet.client._direct.DirectCalls.spread`).
    """
    groups: dict[tuple[str, ...], list[int]] = {}
    leftover: list[int] = []
    for i, call in enumerate(calls):
        if may_go_direct(call):
            groups.setdefault(reference_set(call), []).append(i)
        else:
            leftover.append(i)
    per_executor: list[list[Chunk]] = []
    for refs, indices in groups.items():
        targets = spread(refs, len(indices))
        if not targets:
            leftover += indices
            continue
        for (peer, plan), (start, stop) in zip(
                targets, spread_over(len(indices), len(targets)), strict=False):
            url = remote(peer)
            chunks: list[Chunk] = []
            per_executor.append(chunks)
            mine: list[int] = []
            triggers: list[Trigger] = []
            for i in indices[start:stop]:
                found = triggers_for(calls[i], plan, url)
                if found is None or len(found) != 1:  # one source per call: one request
                    leftover.append(i)
                    continue
                mine.append(i)
                triggers.append(found[0])
                if len(mine) == chunksize:
                    chunks.append(Chunk(peer, mine, triggers))
                    mine, triggers = [], []
            if mine:
                chunks.append(Chunk(peer, mine, triggers))
    # Each executor's first chunk first, and so on: all start working at once.
    ordered = [c for turn in itertools.zip_longest(*per_executor) for c in turn
               if c is not None]
    return ordered, sorted(leftover)


def map_direct(client: BlockingClient, calls: list[CallDag], chunksize: int
               ) -> tuple[list[CallDag], list[BlockingFuture | None]]:
    """Send what of ``calls`` can go straight to executors (blocking client).

    Returns the calls left for the scheduler, and per call its future (None
    for those left)."""
    from ._blocking import BlockingFuture

    direct = client.direct

    def spread(refs: tuple[str, ...], count: int) -> list[tuple[Any, CallPlaced]]:
        return direct.spread(calls[0].target, calls[0].is_function, refs, count)

    chunks, leftover = chunks_for(calls, chunksize, spread, lambda peer: str(peer.remote))
    futures: list[BlockingFuture | None] = [None] * len(calls)
    deadline = time.monotonic() + client.timeout
    sent = False
    for chunk in chunks:
        peer = chunk.peer
        try:
            slots = peer.submit(*chunk.triggers,
                                timeout=max(0.0, deadline - time.monotonic()))
        except ConnectionError:  # it left: these go through the scheduler
            direct.executor_left(peer.remote)
            leftover += chunk.indices
            continue
        sent = True
        for i, slot in zip(chunk.indices, slots, strict=True):
            key = calls[i].result_key
            assert key is not None
            futures[i] = BlockingFuture(key, client, slot, client.timeout, None, peer=peer)
    if sent:  # placed by the scheduler, so of a shape it accepts (see _submit_direct)
        client.core.accepted.accepted(calls[0])
    return [calls[i] for i in sorted(leftover)], futures
