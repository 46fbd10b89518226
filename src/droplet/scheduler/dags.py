"""DAG definitions and their validation. Pure code: no I/O.

>>> d = build_dag("d", ["a", "b"], [("a", "b")], (), {"a", "b"})
>>> d.sink, d.sources, d.upstream("b")
('b', ('a',), ('a',))
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import attrs

from ..errors import DagError

__all__ = ["Dag", "build_dag"]


@attrs.frozen
class Dag:
    """A validated DAG: functions in topological order, one sink."""

    name: str
    functions: tuple[str, ...]
    connections: tuple[tuple[str, str], ...]
    colocated: tuple[str, ...]
    sink: str
    sources: tuple[str, ...]

    def upstream(self, function: str) -> tuple[str, ...]:
        """Upstream functions of ``function`` in ``connections`` order (fan-in order)."""
        return tuple(src for src, dst in self.connections if dst == function)

    def downstream(self, function: str) -> tuple[str, ...]:
        return tuple(dst for src, dst in self.connections if src == function)

    def same_shape(self, other: Dag) -> bool:
        return (set(self.functions), self.connections, set(self.colocated)) == (
            set(other.functions), other.connections, set(other.colocated))


def build_dag(
    name: str,
    functions: Sequence[str],
    connections: Iterable[Sequence[str]],
    colocated: Iterable[str],
    registered: Collection[str],
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

    order = _topological_order(name, functions, edges)
    sinks = [fn for fn in order if not any(src == fn for src, _ in edges)]
    if len(sinks) != 1:
        raise DagError(
            f"DAG {name!r} must have exactly one sink (a function with no downstream); "
            f"it has {len(sinks)}: {', '.join(sinks)}"
        )
    sources = tuple(fn for fn in order if not any(dst == fn for _, dst in edges))
    return Dag(name, tuple(order), tuple(edges), colocated_t, sinks[0], sources)


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
