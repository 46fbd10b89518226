"""The priority lattice: keep the value with the best (lowest) priority.

It is Anna's priority lattice, used for example to relax shortest-path
distances: each writer proposes a (distance, path) pair and every replica
converges on the shortest one, whatever order the proposals arrive in.
"""

from __future__ import annotations

from typing import Any, ClassVar, final

from .base import Lattice, as_number, value_key

__all__ = ["PriorityLattice"]


@final
class PriorityLattice(Lattice):
    """A value tagged with a priority; merge keeps the LOWER priority.

    Equal priorities are broken by the value's bytes (pickled, or raw in raw
    mode), and an ``int`` priority beats an equal ``float`` one, so the winner
    never depends on argument order.

    Args:
        priority: an ``int`` or ``float`` (not a bool, not NaN); lower wins.
        value: the user value (``bytes`` in raw mode).
    """

    __slots__ = ("_priority", "_value")

    type_name: ClassVar[str] = "Priority"

    def __init__(self, priority: int | float, value: Any) -> None:
        self._priority = as_number(priority, "PriorityLattice priority")
        self._value = value

    @property
    def priority(self) -> int | float:
        return self._priority

    @property
    def value(self) -> Any:
        return self._value

    def reveal(self) -> Any:
        """The value with the lowest priority seen so far."""
        return self._value

    def merge(self, other: PriorityLattice) -> PriorityLattice:
        self._check_mergeable(other)
        winner = self if _beats(self, other) else other
        return PriorityLattice(winner._priority, winner._value)

    def __eq__(self, other: object) -> bool:
        if type(other) is not PriorityLattice:
            return NotImplemented
        a, b = self._priority, other._priority
        return type(a) is type(b) and a == b and self._value == other._value

    def __hash__(self) -> int:
        return hash((PriorityLattice, self._priority, self._value))

    def __repr__(self) -> str:
        return f"PriorityLattice({self._priority!r}, {self._value!r})"


def _beats(a: PriorityLattice, b: PriorityLattice) -> bool:
    """Whether ``a`` wins over (or ties with) ``b``; pickles only on an exact tie."""
    if a.priority != b.priority:
        return a.priority < b.priority
    a_float, b_float = type(a.priority) is float, type(b.priority) is float
    if a_float != b_float:
        return not a_float
    return value_key(a.value) <= value_key(b.value)
