"""DAG definitions and their validation. Pure code: no I/O.

>>> d = build_dag("d", ["a", "b"], [("a", "b")], (), {"a", "b"})
>>> d.sink, d.sources, d.upstream("b")
('b', ('a',), ('a',))
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import attrs

from ..errors import DagError

__all__ = ["Dag", "build_dag", "check_dag_arguments", "DagArguments"]


@attrs.frozen
class Dag:
    """A validated DAG: functions in topological order, one sink."""

    name: str
    functions: tuple[str, ...]
    connections: tuple[tuple[str, str], ...]
    colocated: tuple[str, ...]
    sink: str
    sources: tuple[str, ...]
    #: multi-exec functions and, in the same order, their pickled invalid results.
    multiexec: tuple[str, ...] = ()
    invalid_results: tuple[bytes, ...] = ()
    #: functions placed only on executors with a ``gpu`` resource.
    gpu_functions: tuple[str, ...] = ()
    #: functions whose queued calls an executor serves as one batch.
    batching_functions: tuple[str, ...] = ()

    def upstream(self, function: str) -> tuple[str, ...]:
        """Upstream functions of ``function`` in ``connections`` order (fan-in order)."""
        return tuple(src for src, dst in self.connections if dst == function)

    def downstream(self, function: str) -> tuple[str, ...]:
        return tuple(dst for src, dst in self.connections if src == function)

    def same_shape(self, other: Dag) -> bool:
        def shape(d: Dag) -> tuple[Any, ...]:
            return (set(d.functions), d.connections, set(d.colocated),
                    dict(zip(d.multiexec, d.invalid_results, strict=True)),
                    set(d.gpu_functions), set(d.batching_functions))
        return shape(self) == shape(other)


def build_dag(
    name: str,
    functions: Sequence[str],
    connections: Iterable[Sequence[str]],
    colocated: Iterable[str],
    registered: Collection[str],
    *,
    multiexec: Sequence[str] = (),
    invalid_results: Sequence[bytes] = (),
    gpu_functions: Iterable[str] = (),
    batching_functions: Iterable[str] = (),
) -> Dag:
    """Validate a DAG definition against the registered functions.

    Raises:
        DagError: naming exactly what is wrong (unknown function, cycle, ...).
    """
    if not isinstance(name, str) or not name:
        raise DagError(f"DAG name must be a non-empty string, not {name!r}")
    functions = list(functions)
    if not functions:
        raise DagError(f"DAG {name!r} has no functions")
    seen: set[str] = set()
    for fn in functions:
        if not isinstance(fn, str):
            raise DagError(f"DAG {name!r}: function names must be strings, not {fn!r}")
        if fn in seen:
            raise DagError(f"DAG {name!r} lists function {fn!r} twice")
        seen.add(fn)
        if fn not in registered:
            raise DagError(f"DAG {name!r} uses function {fn!r}, which is not registered")
    edges: list[tuple[str, str]] = []
    for edge in connections:
        if len(edge) != 2:
            raise DagError(f"DAG {name!r}: connection {edge!r} is not a (source, sink) pair")
        src, dst = edge[0], edge[1]
        for end in (src, dst):
            if end not in seen:
                raise DagError(
                    f"DAG {name!r}: connection ({src!r}, {dst!r}) names {end!r}, "
                    "which is not one of the DAG's functions"
                )
        if src == dst:
            raise DagError(f"DAG {name!r}: function {src!r} is connected to itself (a cycle)")
        if (src, dst) in edges:
            raise DagError(f"DAG {name!r}: connection ({src!r}, {dst!r}) appears twice")
        edges.append((src, dst))
    colocated_t = tuple(colocated)
    for fn in colocated_t:
        if fn not in seen:
            raise DagError(f"DAG {name!r}: colocated function {fn!r} is not in the DAG")
    if len(multiexec) != len(invalid_results):
        raise DagError(f"DAG {name!r}: each multi-exec function needs its invalid results")
    extras = {"multi-exec": tuple(multiexec), "gpu": tuple(gpu_functions),
              "batching": tuple(batching_functions)}
    for kind, names in extras.items():
        for fn in names:
            if fn not in seen:
                raise DagError(f"DAG {name!r}: {kind} function {fn!r} is not in the DAG")

    order = _topological_order(name, functions, edges)
    sinks = [fn for fn in order if not any(src == fn for src, _ in edges)]
    if len(sinks) != 1:
        raise DagError(
            f"DAG {name!r} must have exactly one sink (a function with no downstream); "
            f"it has {len(sinks)}: {', '.join(sinks)}"
        )
    sources = tuple(fn for fn in order if not any(dst == fn for _, dst in edges))
    return Dag(name, tuple(order), tuple(edges), colocated_t, sinks[0], sources,
               extras["multi-exec"], tuple(invalid_results), extras["gpu"], extras["batching"])


@attrs.frozen
class DagArguments:
    """``register_dag``'s arguments, checked and split into plain lists."""

    name: str
    functions: list[str]
    connections: list[list[str]]
    colocated: list[str]
    #: multi-exec function name -> its invalid results (Python values)
    multiexec: dict[str, list[Any]]
    gpu_functions: list[str]
    batching_functions: list[str]


def _names(dag: str, what: str, value: Any) -> list[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise DagError(f"register_dag({dag!r}): {what} must be a list of function names, "
                       f"not {type(value).__name__}")
    out = list(value)
    for fn in out:
        if not isinstance(fn, str):
            raise DagError(f"register_dag({dag!r}): {what} entry {fn!r} is not a "
                           "function name (a string)")
    return out


def check_dag_arguments(
    name: Any, functions: Any, connections: Any, colocated: Any = (),
    gpu_functions: Any = (), batching_functions: Any = (),
) -> DagArguments:
    """Check ``register_dag``'s arguments on the client, before anything is sent.

    ``functions`` entries are names, or ``(name, invalid_results)`` for a
    multi-exec function (as in Cloudburst). Raises DagError naming the first
    argument of the wrong type.

    >>> check_dag_arguments("d", ["a", ("b", [None])], [("a", "b")]).multiexec
    {'b': [None]}
    """
    if not isinstance(name, str) or not name:
        raise DagError(f"DAG name must be a non-empty string, not {name!r}")
    if isinstance(functions, str | bytes) or not isinstance(functions, Iterable):
        raise DagError(f"register_dag({name!r}): functions must be a list, "
                       f"not {type(functions).__name__}")
    names: list[str] = []
    multiexec: dict[str, list[Any]] = {}
    for entry in functions:
        if isinstance(entry, tuple):
            if len(entry) != 2 or not isinstance(entry[0], str):
                raise DagError(f"register_dag({name!r}): function entry {entry!r} must be a "
                               "name or (name, invalid_results)")
            invalid = entry[1]
            if isinstance(invalid, str | bytes) or not isinstance(invalid, Iterable):
                raise DagError(f"register_dag({name!r}): the invalid results of "
                               f"{entry[0]!r} must be a list, not {type(invalid).__name__}")
            names.append(entry[0])
            multiexec[entry[0]] = list(invalid)
        elif isinstance(entry, str):
            names.append(entry)
        else:
            raise DagError(f"register_dag({name!r}): function {entry!r} is not a function "
                           "name (a string)")
    if isinstance(connections, str | bytes) or not isinstance(connections, Iterable):
        raise DagError(f"register_dag({name!r}): connections must be a list of "
                       f"(source, sink) pairs, not {type(connections).__name__}")
    edges: list[list[str]] = []
    for edge in connections:
        if (isinstance(edge, str | bytes) or not isinstance(edge, Sequence)
                or len(edge) != 2):
            raise DagError(f"register_dag({name!r}): connection {edge!r} is not a "
                           "(source, sink) pair")
        for end in edge:
            if not isinstance(end, str):
                raise DagError(f"register_dag({name!r}): connection {tuple(edge)!r} names "
                               f"{end!r}, which is not a function name (a string)")
        edges.append([edge[0], edge[1]])
    return DagArguments(
        name, names, edges, _names(name, "colocated", colocated), multiexec,
        _names(name, "gpu_functions", gpu_functions),
        _names(name, "batching_functions", batching_functions))


def _topological_order(name: str, functions: list[str], edges: list[tuple[str, str]]) -> list[str]:
    indegree = {fn: 0 for fn in functions}
    for _, dst in edges:
        indegree[dst] += 1
    ready = [fn for fn in functions if indegree[fn] == 0]
    order: list[str] = []
    while ready:
        fn = ready.pop(0)
        order.append(fn)
        for src, dst in edges:
            if src == fn:
                indegree[dst] -= 1
                if indegree[dst] == 0:
                    ready.append(dst)
    if len(order) != len(functions):
        stuck = sorted(fn for fn, deg in indegree.items() if deg > 0)
        raise DagError(f"DAG {name!r} has a cycle through {', '.join(stuck)}")
    return order
