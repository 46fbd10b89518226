"""Placements handed out to clients, who then send whole runs straight to executors.

A client asks (:class:`~droplet.protocol.messages.PlaceCall`) where runs of a
function or DAG may go, naming the keys of the call's ``DropletReference``
arguments; the scheduler answers (:class:`~droplet.protocol.messages.CallPlaced`)
with the executors its placement policy allows for a whole run
(:meth:`~droplet.scheduler.placement.PlacementPolicy.whole_run`), best first,
for a lease of ``PLACEMENT_LEASE`` seconds. The client caches the answer per
(call shape, referenced keys), and drops it when an executor on it leaves or
the lease ends; the scheduler waits out the leases before retiring a drained
executor. Pure code: the scheduler's service passes what it knows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..errors import DagError
from ..protocol.messages import CallPlaced, PlaceCall
from .dags import Dag
from .placement import Candidate, PlacementPolicy

__all__ = ["PLACEMENT_LEASE", "Offer", "hand_out"]

#: Seconds a client may send a call shape's runs straight to the executors it
#: was given (CallPlaced) before asking again.
PLACEMENT_LEASE = 2.0


class Offer:
    """What the scheduler knows of one executor that may take new runs."""

    __slots__ = ("cached", "draining", "gpu", "queued", "running", "threads", "url")

    def __init__(self, url: str, running: int, threads: int, queued: int,
                 cached: Mapping[str, int], *, gpu: bool = False,
                 draining: bool = False) -> None:
        self.url = url
        self.running = running
        self.threads = threads
        self.queued = queued
        self.cached = cached
        self.gpu = gpu
        self.draining = draining


def hand_out(msg: PlaceCall, dag: Dag, functions: Mapping[str, str],
             offers: Iterable[Offer], policy: PlacementPolicy,
             lease: float = PLACEMENT_LEASE) -> CallPlaced:
    """The answer to ``msg`` for ``dag`` (``functions``: name -> registered version).

    Runs that need more than one executor (GPU functions, multi-exec,
    batching) and policies that place every call themselves get no
    executors: their calls go through the scheduler. Executors being drained
    and GPU executors are never handed out.
    """
    versions = []
    for fn in dag.functions:
        version = functions.get(fn)
        if version is None:
            raise DagError(f"DAG {dag.name!r} uses {fn!r}, which is no longer registered")
        versions.append(version)
    urls: Sequence[str] = ()
    preferred = 0
    # A policy opts in itself: a subclass of "data" that chooses otherwise does not.
    if (vars(type(policy)).get("whole_runs", False) and not dag.gpu_functions and not dag.multiexec
            and not dag.batching_functions):
        pool = [Candidate(o.url, o.running, o.threads, o.queued, False, o.cached)
                for o in offers if not o.gpu and not o.draining]
        if pool:
            run = policy.whole_run(pool, tuple(dict.fromkeys(msg.references)), msg.calls)
            known = {c.url for c in pool}
            if not set(run.executors) <= known or not 0 <= run.preferred <= len(run.executors):
                raise DagError(f"placement policy {type(policy).__name__} handed out "
                               f"{run!r}, which is not among the eligible executors")
            urls, preferred = run.executors, run.preferred
    return CallPlaced(msg.target, msg.is_function, list(dag.functions), versions,
                      [list(e) for e in dag.connections], list(urls), lease, preferred)
