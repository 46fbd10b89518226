"""Where each function of a run executes. Pure code: no I/O.

Two policies, chosen by the scheduler's ``placement`` setting:

- ``"locality"`` (default): a function whose only input is a function that
  feeds nothing else (a pipeline step) runs on that function's executor, so its
  input never crosses a socket; everything else goes to the least-loaded
  executor, round-robin among equals.
- ``"spread"``: every function goes to the least-loaded executor, counting the
  functions of this run already placed (maximal parallelism).

``colocated`` functions of a DAG always share one executor. A DAG's
``gpu_functions`` (and any colocated group holding one) go only to executors
with a ``gpu`` resource. Data locality (placing calls where their references
are cached) slots in here later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import DagError, DropletError
from .dags import Dag

__all__ = ["POLICIES", "Placement"]

POLICIES = ("locality", "spread")


class Placement:
    def __init__(self, policy: str = "locality") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown placement policy {policy!r}; choose one of {POLICIES}")
        self.policy = policy
        self._turn = 0

    def _least_loaded(self, executors: Sequence[str], load: Mapping[str, int]) -> str:
        best = min(load.get(e, 0) for e in executors)
        ties = [e for e in executors if load.get(e, 0) == best]
        self._turn += 1
        return ties[self._turn % len(ties)]

    def place(
        self, dag: Dag, executors: Sequence[str], running: Mapping[str, int],
        gpu_executors: Sequence[str] = (),
    ) -> dict[str, str]:
        """Map each function of ``dag`` to one of ``executors`` (URLs).

        ``gpu_executors``: those started with a ``gpu`` resource; the DAG's
        gpu functions run only there (DagError when there are none).
        """
        if not executors:
            raise DropletError(
                "no executors are connected to the scheduler; start one with "
                "`python -m droplet.node --role executor --scheduler URL`"
            )
        load = dict(running)
        where: dict[str, str] = {}
        group_home: str | None = None
        gpu_group = any(fn in dag.gpu_functions for fn in dag.colocated)
        for fn in dag.functions:
            pool = executors
            if fn in dag.gpu_functions or (gpu_group and fn in dag.colocated):
                pool = [e for e in executors if e in set(gpu_executors)]
                if not pool:
                    raise DagError(
                        f"DAG {dag.name!r}: {fn!r} needs a gpu executor and none is "
                        "connected; start one with `python -m droplet.node --role "
                        "executor --scheduler URL --resources gpu=1`")
            if fn in dag.colocated and group_home is not None:
                chosen = group_home
            else:
                ups = dag.upstream(fn)
                if (
                    self.policy == "locality"
                    and len(ups) == 1
                    and dag.downstream(ups[0]) == (fn,)
                    and where[ups[0]] in pool
                ):
                    chosen = where[ups[0]]
                else:
                    chosen = self._least_loaded(pool, load)
                if fn in dag.colocated:
                    group_home = chosen
            where[fn] = chosen
            load[chosen] = load.get(chosen, 0) + 1
        return where
