"""Vector clocks and the causal lattices built on them.

A causal lattice keeps the newest value of a key, where "newest" follows
causality (vector clocks) rather than wall time: a write that saw another
replaces it, and writes that did not see each other are both kept until a
later write that saw both replaces them.

Anna describes the state as one clock plus a set of values. Taken literally
that merge is not associative: merging ``a`` and ``b`` (concurrent) and then
``c`` (whose clock equals ``a.clock | b.clock``) keeps all three values, while
merging ``b`` and ``c`` first drops ``b`` and then ``a``. So these lattices keep
each value under the clock it was written with (a set of *versions*) and drop
a version only when another version's clock strictly dominates it. That is the
classic multi-value register: a true lattice, and it reveals the same values as
Anna whenever Anna's merge order does not matter. :attr:`clock` is the join of
the version clocks, which is what a writer increments to supersede them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal, TypeVar, final

from .base import Lattice
from .maps import MapKey, MapLattice

__all__ = ["MultiKeyCausalLattice", "SingleKeyCausalLattice", "VectorClock"]

Order = Literal["before", "after", "equal", "concurrent"]


@final
class VectorClock(Lattice):
    """Counters per node; merge is the pointwise maximum.

    A missing node counts as 0, so zero entries are dropped: ``{"a": 0}`` and
    ``{}`` are the same clock, with the same encoding.

    Args:
        counters: node id (``str``) to a non-negative ``int``.
    """

    __slots__ = ("_counters", "_hash", "_total")

    type_name: ClassVar[str] = "VectorClock"

    def __init__(self, counters: Mapping[str, int] | None = None) -> None:
        clean: dict[str, int] = {}
        for node, count in (counters or {}).items():
            if type(node) is not str:
                raise TypeError(f"vector clock node ids must be str, not {type(node).__name__}")
            if isinstance(count, bool) or not isinstance(count, int):
                raise TypeError(
                    f"vector clock counters must be int, not {type(count).__name__} (node {node!r})"
                )
            if count < 0:
                raise ValueError(f"vector clock counter for {node!r} is negative: {count}")
            if count:
                clean[node] = int(count)
        self._counters = dict(sorted(clean.items()))
        self._hash = hash(frozenset(self._counters.items()))
        # A clock can only be strictly dominated by one with a larger total,
        # which lets pruning skip most comparisons.
        self._total = sum(self._counters.values())

    def reveal(self) -> dict[str, int]:
        """A new ``dict`` of node id to counter (zero counters omitted)."""
        return dict(self._counters)

    def get(self, node: str) -> int:
        """The counter of ``node``; 0 when the clock has never seen it."""
        return self._counters.get(node, 0)

    def merge(self, other: VectorClock) -> VectorClock:
        self._check_mergeable(other)
        merged = dict(self._counters)
        for node, count in other._counters.items():
            if count > merged.get(node, 0):
                merged[node] = count
        return VectorClock(merged)

    def __len__(self) -> int:
        """The number of nodes with a non-zero counter."""
        return len(self._counters)

    def increment(self, node: str) -> VectorClock:
        """A new clock with ``node``'s counter one higher: the clock of a new write."""
        counters = dict(self._counters)
        counters[node] = counters.get(node, 0) + 1
        return VectorClock(counters)

    def compare(self, other: VectorClock) -> Order:
        """Where ``self`` stands relative to ``other`` in causal order."""
        le = all(count <= other.get(node) for node, count in self._counters.items())
        ge = all(count <= self.get(node) for node, count in other._counters.items())
        if le and ge:
            return "equal"
        if le:
            return "before"
        if ge:
            return "after"
        return "concurrent"

    def dominates(self, other: VectorClock) -> bool:
        """Whether ``self`` saw everything ``other`` did and more (strictly after)."""
        # Equal totals with pointwise >= would mean equal clocks, so a larger
        # total plus coverage is exactly strict dominance.
        return self._total > other._total and all(
            count <= self.get(node) for node, count in other._counters.items()
        )

    def concurrent_with(self, other: VectorClock) -> bool:
        """Whether neither clock saw the other."""
        return self.compare(other) == "concurrent"

    def __eq__(self, other: object) -> bool:
        if type(other) is not VectorClock:
            return NotImplemented
        return self._counters == other._counters

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"VectorClock({self._counters!r})"


def as_clock(value: VectorClock | Mapping[str, int]) -> VectorClock:
    """Accept a clock or a plain mapping, the way users naturally write one."""
    return value if isinstance(value, VectorClock) else VectorClock(value)


P = TypeVar("P")


def merge_versions(
    a: Mapping[VectorClock, P], b: Mapping[VectorClock, P], join: Callable[[P, P], P]
) -> dict[VectorClock, P]:
    """Union two version sets (joining payloads under equal clocks), then prune.

    A version survives unless some other version's clock strictly dominates
    it. The survivors are the maximal clocks of the union, which does not
    depend on grouping or order: that is what makes the merge a lattice join.
    """
    combined = dict(a)
    absorb_versions(combined, b, join)
    return prune_versions(combined)


def absorb_versions(
    into: dict[VectorClock, P], versions: Mapping[VectorClock, P], join: Callable[[P, P], P]
) -> None:
    """Add ``versions`` to ``into`` in place, joining payloads under equal clocks."""
    for clock, payload in versions.items():
        mine = into.get(clock)
        into[clock] = payload if mine is None else join(mine, payload)


def prune_versions(versions: Mapping[VectorClock, P]) -> dict[VectorClock, P]:
    """Keep the versions no other version dominates, in a canonical clock order.

    Clocks are visited by decreasing total, so every clock's dominators come
    before it, and checking against the kept ones suffices (whatever dominates
    a dropped clock also dominates what that clock dominated).
    """
    if len(versions) <= 1:
        return dict(versions)
    kept: list[tuple[VectorClock, P]] = []
    for clock, payload in sorted(versions.items(), key=lambda item: -item[0]._total):
        if not any(other.dominates(clock) for other, _ in kept):
            kept.append((clock, payload))
    return dict(sorted(kept, key=lambda item: clock_order(item[0])))


def clock_order(clock: VectorClock) -> tuple[tuple[str, int], ...]:
    """A total order on clocks (by their sorted entries), for canonical encodings."""
    return tuple(clock.reveal().items())


def _join_clocks(clocks: Iterable[VectorClock]) -> VectorClock:
    result = VectorClock()
    for clock in clocks:
        result = result.merge(clock)
    return result


def _reveal_values(values: frozenset[Any]) -> Any:
    if len(values) == 1:
        return next(iter(values))
    return values


@final
class SingleKeyCausalLattice(Lattice):
    """A multi-value register ordered by vector clocks.

    A write whose clock dominates another's replaces it; concurrent writes are
    kept side by side; a write that saw all of them (its clock dominates each)
    replaces them all. Values must be hashable (raw mode: bytes).

    Args:
        clock: the vector clock of this write.
        values: the written value(s); usually one.
    """

    __slots__ = ("_versions",)

    type_name: ClassVar[str] = "SingleKeyCausal"

    def __init__(
        self, clock: VectorClock | Mapping[str, int] | None = None, values: Iterable[Any] = ()
    ) -> None:
        clock = as_clock({} if clock is None else clock)
        values = frozenset(values)
        self._versions: dict[VectorClock, frozenset[Any]] = (
            {clock: values} if len(clock) or values else {}
        )

    @classmethod
    def from_versions(
        cls, versions: Iterable[tuple[VectorClock, Iterable[Any]]]
    ) -> SingleKeyCausalLattice:
        """A lattice holding several versions (as the codec decodes them); pruned as by merge."""
        combined: dict[VectorClock, frozenset[Any]] = {}
        for clock, values in versions:
            absorb_versions(combined, cls(clock, values)._versions, frozenset.union)
        result = cls()
        result._versions = prune_versions(combined)
        return result

    @property
    def versions(self) -> dict[VectorClock, frozenset[Any]]:
        """A new dict of each surviving clock to the values written under it."""
        return dict(self._versions)

    @property
    def clock(self) -> VectorClock:
        """The join of all version clocks: increment it to supersede every value."""
        return _join_clocks(self._versions)

    @property
    def values(self) -> frozenset[Any]:
        """Every concurrent value."""
        return frozenset().union(*self._versions.values())

    def reveal(self) -> Any:
        """The value if exactly one survives, else a ``frozenset`` of the concurrent ones.

        An empty lattice reveals ``frozenset()``. A lone value that is itself a
        frozenset is ambiguous; read :attr:`values` when that matters.
        """
        return _reveal_values(self.values)

    def merge(self, other: SingleKeyCausalLattice) -> SingleKeyCausalLattice:
        self._check_mergeable(other)
        result = SingleKeyCausalLattice()
        result._versions = merge_versions(self._versions, other._versions, frozenset.union)
        return result

    def __eq__(self, other: object) -> bool:
        if type(other) is not SingleKeyCausalLattice:
            return NotImplemented
        return self._versions == other._versions

    def __hash__(self) -> int:
        return hash((SingleKeyCausalLattice, frozenset(self._versions.items())))

    def __repr__(self) -> str:
        if len(self._versions) == 1:
            ((clock, values),) = self._versions.items()
            return f"SingleKeyCausalLattice({clock!r}, {set(values)!r})"
        body = [(clock, set(values)) for clock, values in self._versions.items()]
        return f"SingleKeyCausalLattice.from_versions({body!r})"


Dependencies = MapLattice | Mapping[MapKey, VectorClock | Mapping[str, int]]
_Payload = tuple[MapLattice, frozenset[Any]]


def as_dependencies(dependencies: Dependencies | None) -> MapLattice:
    """Dependencies as a MapLattice of VectorClocks, whichever form the caller used."""
    items: Iterable[tuple[MapKey, object]]
    if isinstance(dependencies, MapLattice):
        items = dependencies.items()
    else:
        items = (dependencies or {}).items()
    clocks: dict[MapKey, Lattice] = {}
    for key, clock in items:
        if not isinstance(clock, VectorClock | Mapping):
            raise TypeError(
                f"dependency clocks must be VectorClocks, not {type(clock).__name__} (key {key!r})"
            )
        clocks[key] = as_clock(clock)
    return MapLattice(clocks)


def _join_payloads(a: _Payload, b: _Payload) -> _Payload:
    return (a[0].merge(b[0]), a[1] | b[1])


@final
class MultiKeyCausalLattice(Lattice):
    """A causal value that also records the clocks of the keys it depends on.

    Merges like :class:`SingleKeyCausalLattice`; versions with equal clocks
    join their dependencies key-wise (pointwise max of each clock). Readers use
    the dependencies to assemble a causally consistent cut across keys.

    Args:
        clock: the vector clock of this write.
        dependencies: key to the clock of that key this write depended on, as a
            :class:`MapLattice` of :class:`VectorClock` or a plain mapping.
        values: the written value(s); usually one.
    """

    __slots__ = ("_versions",)

    type_name: ClassVar[str] = "MultiKeyCausal"

    def __init__(
        self,
        clock: VectorClock | Mapping[str, int] | None = None,
        dependencies: Dependencies | None = None,
        values: Iterable[Any] = (),
    ) -> None:
        clock = as_clock({} if clock is None else clock)
        deps = as_dependencies(dependencies)
        values = frozenset(values)
        self._versions: dict[VectorClock, _Payload] = (
            {clock: (deps, values)} if len(clock) or len(deps) or values else {}
        )

    @classmethod
    def from_versions(
        cls, versions: Iterable[tuple[VectorClock, Dependencies, Iterable[Any]]]
    ) -> MultiKeyCausalLattice:
        """A lattice holding several versions (as the codec decodes them); pruned as by merge."""
        combined: dict[VectorClock, _Payload] = {}
        for clock, dependencies, values in versions:
            absorb_versions(combined, cls(clock, dependencies, values)._versions, _join_payloads)
        result = cls()
        result._versions = prune_versions(combined)
        return result

    @property
    def versions(self) -> dict[VectorClock, tuple[MapLattice, frozenset[Any]]]:
        """A new dict of each surviving clock to its (dependencies, values)."""
        return dict(self._versions)

    @property
    def clock(self) -> VectorClock:
        """The join of all version clocks: increment it to supersede every value."""
        return _join_clocks(self._versions)

    @property
    def dependencies(self) -> MapLattice:
        """The key-wise join of every surviving version's dependencies."""
        result = MapLattice()
        for deps, _ in self._versions.values():
            result = result.merge(deps)
        return result

    @property
    def values(self) -> frozenset[Any]:
        """Every concurrent value."""
        return frozenset().union(*(values for _, values in self._versions.values()))

    def reveal(self) -> Any:
        """The value if exactly one survives, else a ``frozenset`` of the concurrent ones."""
        return _reveal_values(self.values)

    def merge(self, other: MultiKeyCausalLattice) -> MultiKeyCausalLattice:
        self._check_mergeable(other)
        result = MultiKeyCausalLattice()
        result._versions = merge_versions(self._versions, other._versions, _join_payloads)
        return result

    def __eq__(self, other: object) -> bool:
        if type(other) is not MultiKeyCausalLattice:
            return NotImplemented
        return self._versions == other._versions

    def __hash__(self) -> int:
        return hash((MultiKeyCausalLattice, frozenset(self._versions.items())))

    def __repr__(self) -> str:
        body = [
            (clock, deps.reveal(), set(values)) for clock, (deps, values) in self._versions.items()
        ]
        return f"MultiKeyCausalLattice.from_versions({body!r})"
