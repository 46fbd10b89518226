"""Where each function of a run executes. Pure code: no I/O.

A policy is a :class:`PlacementPolicy`: the base class handles what every
policy must honour (``colocated`` functions share one executor; a DAG's
``gpu_functions``, and any colocated group holding one, go only to executors
with a ``gpu`` resource; the load of the functions of this run already placed
counts), and asks the policy's :meth:`~PlacementPolicy.choose` for each
function. Three are built in, chosen by the scheduler's ``placement`` setting:

- ``"data"`` (default): compute goes to the data. A function whose arguments
  include ``DropletReference`` s runs on the executor whose node caches the
  most bytes of those keys (from the executors' reports), skipping executors
  whose queue is over ``max_queue``, ties broken by load. Otherwise it behaves
  as ``"locality"``.
- ``"locality"``: a function whose only input is a function that feeds
  nothing else (a pipeline step) runs on that function's executor, so its
  input never crosses a socket; everything else goes to the least-loaded
  executor, round-robin among equals.
- ``"spread"``: every function goes to the least-loaded executor (maximal
  parallelism).
- ``"random"``: an executor drawn at random (a baseline for benchmarks).

Clients send runs straight to executors where the policy allows it
(:meth:`PlacementPolicy.whole_run`): the scheduler hands out, per call shape
and set of referenced keys, the executors a whole run may go to, best first.
``"data"`` and ``"locality"`` allow it; the others place every call at the
scheduler.

Plug in your own: subclass :class:`PlacementPolicy`, implement ``choose`` and
either decorate it with :func:`register_policy` (then ``placement = "name"``)
or name it as ``"package.module:ClassName"`` in the configuration.
"""

from __future__ import annotations

import abc
import importlib
import random
from collections.abc import Mapping, Sequence
from typing import ClassVar, TypeVar

import attrs

from ..errors import DagError, DropletError
from .dags import Dag

__all__ = ["DEFAULT_POLICY", "MAX_QUEUE", "POLICIES", "Candidate", "Context", "DataPolicy",
           "LocalityPolicy", "Placement", "PlacementPolicy", "RandomPolicy", "RunPlacement",
           "SpreadPolicy", "check_policy_name", "policy_class", "register_policy"]

#: The policy a scheduler uses unless told otherwise.
DEFAULT_POLICY = "data"
#: Calls waiting on an executor past which data-aware placement looks elsewhere.
MAX_QUEUE = 16


@attrs.frozen
class Candidate:
    """What the scheduler knows of one executor when it places a run."""

    url: str
    #: functions placed here and not finished (the scheduler's own count).
    running: int = 0
    #: worker threads and calls waiting for one, as last reported (0: no report yet).
    threads: int = 0
    queued: int = 0
    #: started with a ``gpu`` resource.
    gpu: bool = False
    #: ``key -> bytes`` its node caches (large values, as last reported).
    cached: Mapping[str, int] = attrs.field(factory=dict)

    def queue(self, load: int) -> int:
        """Calls waiting here when ``load`` functions are placed and unfinished."""
        if self.threads:
            return max(self.queued, load - self.threads)
        return self.queued


@attrs.frozen
class Context:
    """One function's placement question, for :meth:`PlacementPolicy.choose`."""

    dag: Dag
    function: str
    #: where the run's functions placed so far go.
    where: Mapping[str, str]
    #: functions running or placed per executor URL, including this run's.
    load: Mapping[str, int]
    #: the keys of the function's DropletReference arguments.
    references: tuple[str, ...] = ()


@attrs.frozen
class RunPlacement:
    """Where clients may send whole runs of one call shape themselves."""

    #: executor URLs, best first (empty: every call goes through the scheduler).
    executors: tuple[str, ...] = ()
    #: spread runs over the first ``preferred`` only, the rest being fallbacks
    #: in order; 0 spreads them over all.
    preferred: int = 0


class PlacementPolicy(abc.ABC):
    """A placement policy. Subclasses implement :meth:`choose`; keep them pure and fast.

    One instance serves a scheduler for its lifetime (it may keep state, e.g.
    a round-robin turn); it is called from the scheduler's event loop only.
    """

    #: the name the ``placement`` setting uses for it (see :func:`register_policy`).
    name: ClassVar[str] = ""
    #: whether clients may send whole runs to one executor (see :meth:`whole_run`);
    #: honoured only when set on the class itself (a subclass opts in anew).
    whole_runs: ClassVar[bool] = False

    def __init__(self) -> None:
        self._turn = 0

    @abc.abstractmethod
    def choose(self, pool: Sequence[Candidate], context: Context) -> str:
        """The URL, one of ``pool`` (never empty), where ``context.function`` runs."""

    def whole_run(self, pool: Sequence[Candidate], references: Sequence[str] = (),
                  calls: int = 1) -> RunPlacement:
        """Executors of ``pool`` a client may send a whole run to, for a call whose
        ``DropletReference`` arguments name ``references``; ``calls``: how many
        such calls the client is about to send at once (a ``map``).

        Only asked when :attr:`whole_runs` is set. The default: every executor,
        least loaded (``Candidate.running``) first.
        """
        return RunPlacement(tuple(c.url for c in sorted(pool, key=lambda c: c.running)))

    def least_loaded(self, pool: Sequence[Candidate], load: Mapping[str, int]) -> str:
        """The least-loaded executor of ``pool``, round-robin among equals."""
        best = min(load.get(c.url, 0) for c in pool)
        ties = [c.url for c in pool if load.get(c.url, 0) == best]
        self._turn += 1
        return ties[self._turn % len(ties)]

    def place(self, dag: Dag, executors: Sequence[Candidate],
              references: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
        """Map each function of ``dag`` to the URL of one of ``executors``.

        ``references``: per function, the keys of its DropletReference arguments.
        """
        if not executors:
            raise DropletError(
                "no executors are connected to the scheduler; start one with "
                "`python -m droplet.node --role executor --scheduler URL`"
            )
        refs = references or {}
        load = {c.url: c.running for c in executors}
        gpus = [c for c in executors if c.gpu]
        where: dict[str, str] = {}
        group_home: str | None = None
        gpu_group = any(fn in dag.gpu_functions for fn in dag.colocated)
        for fn in dag.functions:
            pool: Sequence[Candidate] = executors
            if fn in dag.gpu_functions or (gpu_group and fn in dag.colocated):
                pool = gpus
                if not pool:
                    raise DagError(
                        f"DAG {dag.name!r}: {fn!r} needs a gpu executor and none is "
                        "connected; start one with `python -m droplet.node --role "
                        "executor --scheduler URL --resources gpu=1`")
            if fn in dag.colocated and group_home is not None:
                chosen = group_home
            else:
                chosen = self.choose(pool, Context(dag, fn, where, load,
                                                   tuple(refs.get(fn, ()))))
                if chosen not in {c.url for c in pool}:
                    raise DropletError(f"placement policy {type(self).__name__} chose "
                                       f"{chosen!r}, which is not an eligible executor")
                if fn in dag.colocated:
                    group_home = chosen
            where[fn] = chosen
            load[chosen] = load.get(chosen, 0) + 1
        return where


_REGISTRY: dict[str, type[PlacementPolicy]] = {}
P = TypeVar("P", bound=type[PlacementPolicy])


def register_policy(cls: P) -> P:
    """Class decorator: make a policy available by its ``name`` (``placement = "name"``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to be registered")
    _REGISTRY[cls.name] = cls
    return cls


def _pipeline_home(pool: Sequence[Candidate], context: Context) -> str | None:
    """The executor of ``context.function``'s only upstream, when it is a pipeline step."""
    dag, fn = context.dag, context.function
    ups = dag.upstream(fn)
    if len(ups) == 1 and dag.downstream(ups[0]) == (fn,):
        home = context.where[ups[0]]
        if any(c.url == home for c in pool):
            return home
    return None


@register_policy
class LocalityPolicy(PlacementPolicy):
    """Pipeline steps stay with their upstream; the rest go to the least-loaded executor."""

    name = "locality"
    whole_runs = True

    def choose(self, pool: Sequence[Candidate], context: Context) -> str:
        home = _pipeline_home(pool, context)
        return home if home is not None else self.least_loaded(pool, context.load)


@register_policy
class SpreadPolicy(PlacementPolicy):
    """Every function to the least-loaded executor."""

    name = "spread"

    def choose(self, pool: Sequence[Candidate], context: Context) -> str:
        return self.least_loaded(pool, context.load)


@register_policy
class DataPolicy(PlacementPolicy):
    """Compute goes to the data (see the module docstring)."""

    name = "data"
    whole_runs = True

    def __init__(self, max_queue: int = MAX_QUEUE) -> None:
        super().__init__()
        if max_queue < 0:
            raise ValueError(f"max_queue must not be negative, not {max_queue!r}")
        self.max_queue = max_queue

    def choose(self, pool: Sequence[Candidate], context: Context) -> str:
        load = context.load
        open_ = [c for c in pool if c.queue(load.get(c.url, 0)) <= self.max_queue]
        eligible = open_ or pool  # all backed up: the least loaded of them all
        if context.references:
            keys = set(context.references)
            scores = {c.url: sum(c.cached.get(k, 0) for k in keys) for c in eligible}
            best = max(scores.values())
            if best > 0:
                return self.least_loaded([c for c in eligible if scores[c.url] == best], load)
        home = _pipeline_home(eligible, context)
        return home if home is not None else self.least_loaded(eligible, load)


    def whole_run(self, pool: Sequence[Candidate], references: Sequence[str] = (),
                  calls: int = 1) -> RunPlacement:
        """With references: the executors whose node caches the most bytes of them
        (among those whose queue is not over ``max_queue``) are preferred, least
        loaded first; when none caches any, the least loaded one alone, in turn
        among equals (so each key gets cached in one place, and keys spread over
        the nodes). The others follow as fallbacks. ``calls`` more than the
        preferred executors have room for (threads plus ``max_queue``, less
        what they run) spill over to the next ones, in that order."""
        if not references:
            return super().whole_run(pool)
        keys = set(references)
        scores = {c.url: sum(c.cached.get(k, 0) for k in keys) for c in pool}
        open_ = [c for c in pool if c.queue(c.running) <= self.max_queue]
        eligible = open_ or list(pool)
        first = sorted(eligible, key=lambda c: (-scores[c.url], c.running))
        best = scores[first[0].url]
        preferred = sum(1 for c in first if scores[c.url] == best)
        if best == 0:  # cached nowhere: one executor, least loaded, in turn among equals
            home = self.least_loaded(eligible, {c.url: c.running for c in eligible})
            first.sort(key=lambda c: c.url != home)
            preferred = 1
        room = 0
        for c in first[:preferred]:
            room += max(0, (c.threads or 1) + self.max_queue - c.running)
        while calls > 1 and room < calls and preferred < len(first):  # a map: spill over
            c = first[preferred]
            room += max(0, (c.threads or 1) + self.max_queue - c.running)
            preferred += 1
        chosen = {c.url for c in eligible}
        rest = sorted((c for c in pool if c.url not in chosen),
                      key=lambda c: (-scores[c.url], c.running))
        urls = tuple(c.url for c in first + rest)
        return RunPlacement(urls, min(preferred, len(urls)))


@register_policy
class RandomPolicy(PlacementPolicy):
    """Every function to an executor drawn at random (a baseline for benchmarks)."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._random = random.Random(seed)

    def choose(self, pool: Sequence[Candidate], context: Context) -> str:
        return self._random.choice(pool).url


#: The policies for real use (also registered: "random", a baseline for benchmarks).
POLICIES = ("data", "locality", "spread")


def policy_class(name: str) -> type[PlacementPolicy]:
    """The policy class for a registered ``name`` or a ``"package.module:Class"`` path."""
    found = _REGISTRY.get(name)
    if found is not None:
        return found
    module, colon, attr = name.partition(":")
    if not colon:
        raise ValueError(f"unknown placement policy {name!r}; choose one of "
                         f"{', '.join(sorted(_REGISTRY))}, or name your own class as "
                         "'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"placement policy {name!r} cannot be loaded: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, PlacementPolicy)):
        raise ValueError(f"placement policy {name!r} is not a PlacementPolicy subclass")
    return cls


def check_policy_name(name: str) -> None:
    """Raise ValueError unless ``name`` is registered or looks like ``module:Class``."""
    if name not in _REGISTRY and ":" not in name:
        policy_class(name)


class Placement:
    """The scheduler's placement: a policy by name, with the older call signature."""

    def __init__(self, policy: str = DEFAULT_POLICY) -> None:
        self.policy = policy
        self.impl = policy_class(policy)()

    def place(
        self, dag: Dag, executors: Sequence[str | Candidate], running: Mapping[str, int],
        gpu_executors: Sequence[str] = (),
        references: Mapping[str, Sequence[str]] | None = None,
    ) -> dict[str, str]:
        """Map each function of ``dag`` to one of ``executors`` (URLs or candidates).

        ``running``: functions unfinished per executor URL (for plain URLs);
        ``gpu_executors``: those started with a ``gpu`` resource; the DAG's gpu
        functions run only there (DagError when there are none).
        """
        gpus = set(gpu_executors)
        candidates = [
            c if isinstance(c, Candidate) else
            Candidate(c, running.get(c, 0), gpu=c in gpus) for c in executors]
        return self.impl.place(dag, candidates, references)
