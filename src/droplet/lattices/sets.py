"""Grow-only sets and the numeric maximum: the simplest lattices.

Union and ``max`` are joins by construction, which is why they are the
building blocks for everything else (causal lattices union their concurrent
values, vector clocks take a pointwise max).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, final

from .base import Lattice, as_number

__all__ = ["MaxLattice", "OrderedSetLattice", "SetLattice"]


@final
class SetLattice(Lattice):
    """A grow-only set; merge is union.

    Elements must be hashable. In raw mode they are the elements' pickled bytes,
    so two values that are equal in Python but pickle differently (``1`` and
    ``1.0``) stay distinct on the storage server.

    Args:
        elements: the initial elements.
    """

    __slots__ = ("_elements",)

    type_name: ClassVar[str] = "Set"

    def __init__(self, elements: Iterable[Any] = ()) -> None:
        self._elements: frozenset[Any] = frozenset(elements)

    @property
    def elements(self) -> frozenset[Any]:
        return self._elements

    def reveal(self) -> frozenset[Any]:
        """The elements as a ``frozenset`` (immutable, like the lattice)."""
        return self._elements

    def merge(self, other: SetLattice) -> SetLattice:
        self._check_mergeable(other)
        return SetLattice(self._elements | other._elements)

    def __len__(self) -> int:
        return len(self._elements)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._elements)

    def __contains__(self, element: object) -> bool:
        return element in self._elements

    def __eq__(self, other: object) -> bool:
        if type(other) is not SetLattice:
            return NotImplemented
        return self._elements == other._elements

    def __hash__(self) -> int:
        return hash((SetLattice, self._elements))

    def __repr__(self) -> str:
        return f"SetLattice({_sorted_repr(self._elements)})"


@final
class OrderedSetLattice(Lattice):
    """A grow-only set that reveals its elements in sorted order.

    Elements must be hashable and mutually orderable with ``<`` (all ints, all
    strs, ...); the constructor checks this by sorting once. In raw mode the
    elements are bytes and sort bytewise, which is the order of the pickles, not
    of the values; decode with a ``load`` function to sort the real values.

    Args:
        elements: the initial elements.

    Raises:
        TypeError: the elements cannot be ordered against each other.
    """

    __slots__ = ("_elements", "_sorted")

    type_name: ClassVar[str] = "OrderedSet"

    def __init__(self, elements: Iterable[Any] = ()) -> None:
        self._elements: frozenset[Any] = frozenset(elements)
        try:
            self._sorted: tuple[Any, ...] = tuple(sorted(self._elements))
        except TypeError as exc:
            raise TypeError(
                f"OrderedSetLattice elements must be mutually orderable: {exc}"
            ) from exc

    @property
    def elements(self) -> frozenset[Any]:
        return self._elements

    def reveal(self) -> list[Any]:
        """The elements as a new ``list`` in ascending order."""
        return list(self._sorted)

    def merge(self, other: OrderedSetLattice) -> OrderedSetLattice:
        self._check_mergeable(other)
        return OrderedSetLattice(self._elements | other._elements)

    def __len__(self) -> int:
        return len(self._elements)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._sorted)

    def __contains__(self, element: object) -> bool:
        return element in self._elements

    def __eq__(self, other: object) -> bool:
        if type(other) is not OrderedSetLattice:
            return NotImplemented
        return self._elements == other._elements

    def __hash__(self) -> int:
        return hash((OrderedSetLattice, self._elements))

    def __repr__(self) -> str:
        return f"OrderedSetLattice({list(self._sorted)!r})"


@final
class MaxLattice(Lattice):
    """A number that only grows; merge keeps the maximum.

    Args:
        value: an ``int`` or ``float`` (not a bool, not NaN).
    """

    __slots__ = ("_value",)

    type_name: ClassVar[str] = "Max"

    def __init__(self, value: int | float) -> None:
        self._value = as_number(value, "MaxLattice value")

    @property
    def value(self) -> int | float:
        return self._value

    def reveal(self) -> int | float:
        """The maximum seen so far."""
        return self._value

    def merge(self, other: MaxLattice) -> MaxLattice:
        self._check_mergeable(other)
        # ``1`` and ``1.0`` tie; preferring the int makes the winner (and so the
        # canonical encoding) independent of argument order.
        a, b = self._value, other._value
        return MaxLattice(a if (a, type(a) is int) >= (b, type(b) is int) else b)

    def __eq__(self, other: object) -> bool:
        if type(other) is not MaxLattice:
            return NotImplemented
        # Type-sensitive so that equal lattices have equal encodings.
        return type(self._value) is type(other._value) and self._value == other._value

    def __hash__(self) -> int:
        return hash((MaxLattice, self._value))

    def __repr__(self) -> str:
        return f"MaxLattice({self._value!r})"


def _sorted_repr(elements: frozenset[Any]) -> str:
    # A stable repr (sets print in hash order) makes test failures readable.
    try:
        return repr(sorted(elements))
    except TypeError:
        return repr(set(elements))
