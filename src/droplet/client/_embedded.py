"""A sync call to an embedded cluster, sent from the caller's thread.

The synchronous client of a :class:`~droplet.LocalCluster` runs an
:class:`~droplet.client.aio.AsyncDropletClient` in the cluster's event loop
thread. A call whose placement is cached would still wake that thread to
send it, and the result would wake it again on the way back. Over an
in-process connection that carries objects, :func:`send_from_thread` hands
the call's trigger to the executor from the caller's own thread
(:meth:`droplet.rpc.Peer.submit_from_thread`); an executor that can run it
in a worker thread from start to finish (``executor/thread_calls.py``)
answers the caller's thread directly, and the loop only catches up on the
bookkeeping later, off the caller's path. Anything else returns False and
the call goes the ordinary way.

The executor leaves the caller a :class:`~droplet.executor.thread_calls.Claim`
on the run it queued (the future keeps it): when the caller's ``get()``
comes before any worker thread started the run, and its functions are known
to be quick, the caller's thread runs it itself (``AsyncDropletFuture.run_claimed``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..executor.thread_calls import take_claim
from ..protocol.messages import CallDag
from ._direct import reference_set, triggers_for

if TYPE_CHECKING:
    from .aio import AsyncDropletClient, AsyncDropletFuture

__all__ = ["DECLINED_FOR", "send_from_thread"]

#: Seconds a target whose call an executor would not take from a thread (say,
#: its functions are ``async def``) goes the ordinary way without asking again.
DECLINED_FOR = 5.0


def send_from_thread(client: AsyncDropletClient, call: CallDag,
                     future: AsyncDropletFuture) -> bool:
    """From the caller's thread: send ``call`` (of kind ``may_go_direct``, with its
    ``future`` made already) straight to an executor that runs it in a worker
    thread. False: nothing was sent; send it the ordinary way."""
    direct = client._direct
    if not direct.enabled or not hasattr(client._scheduler.conn, "offer_from_thread"):
        return False  # not in-process (or direct calls off): nothing to hand over here
    shape = (call.target, call.is_function)
    now = time.monotonic()
    declined = client._declined_from_thread
    if declined and declined.get(shape, 0.0) > now:
        return False
    references = reference_set(call)
    clock = direct.clock()
    if not direct.settled(references, clock):
        return False
    placed = direct.fresh(call.target, call.is_function, clock, references)
    if placed is None:
        return False
    urls = direct.in_turn(placed)
    if not urls:
        return False
    peer = direct._peers.get(urls[0])
    if (peer is None or peer.closed or not peer.takes_from_threads
            or (triggers := triggers_for(call, placed.plan, peer.remote)) is None
            or len(triggers) != 1):  # not dialled yet, frames, or several sources
        return False
    future._direct = True
    future._fetching = True
    take_claim()  # nothing stale
    if peer.submit_from_thread(triggers[0], future._fetched_from_thread):
        future._claim = take_claim()  # get() may run it in this thread
        return True
    future._direct = False
    future._fetching = False
    declined[shape] = now + DECLINED_FOR
    return False
