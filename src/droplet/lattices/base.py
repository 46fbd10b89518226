"""The lattice interface every Droplet value type implements.

A lattice is a value with a ``merge`` that is associative, commutative and
idempotent. Those three laws are what let replicas, caches and the storage
server apply writes in any order, any number of times, and still agree: a
retried put, a reordered update or a gossip round that delivers the same state
twice all converge to the same value. Nothing here does I/O or imports trio.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar, Self

import cloudpickle

from ..errors import LatticeTypeError

__all__ = ["Lattice", "as_number", "value_key"]


class Lattice(abc.ABC):
    """A join-semilattice value. The docstrings below are the contract.

    Lattices are immutable in spirit: no method changes an instance, so a
    lattice can be shared between a cache, a store and user code without
    copying. Subclasses set :attr:`type_name`, the name that travels on the
    wire and appears in type-mismatch errors.
    """

    __slots__ = ()

    type_name: ClassVar[str]

    @abc.abstractmethod
    def reveal(self) -> Any:
        """The plain Python value a user reads (for example, LWW's value)."""

    @abc.abstractmethod
    def merge(self, other: Self) -> Self:
        """Join ``self`` with ``other`` into a new lattice; neither operand changes.

        The join is associative, commutative and idempotent, also when the
        lattices hold raw (still pickled) bytes instead of Python values.

        Raises:
            LatticeTypeError: ``other`` is a different lattice type. It is a
                ``TypeError``, and a ``DropletError`` because the storage server
                can meet it when a peer's map holds another type under a key.
        """

    def _check_mergeable(self, other: object) -> None:
        if type(other) is not type(self):
            other_name = getattr(other, "type_name", type(other).__name__)
            raise LatticeTypeError(
                f"cannot merge a {other_name} lattice into a {self.type_name} lattice"
            )


def value_key(value: object) -> tuple[bool, bytes]:
    """A total order on user values, used only to break exact ties.

    Raw-mode values are the pickled bytes themselves, and compare as they are;
    Python values compare by their ``cloudpickle`` bytes, which equal the raw
    bytes when the default codec made them, so a client and the storage server
    pick the same winner. The leading flag keeps a ``bytes`` value from ever
    comparing equal to a different object whose pickle happens to be those bytes.
    """
    if type(value) is bytes:
        return (False, value)
    return (True, cloudpickle.dumps(value))


def as_number(value: object, what: str) -> int | float:
    """``value`` as an exact ``int`` or ``float``; reject bools, NaN and non-numbers.

    NaN compares false with everything, so ``max`` over it would depend on
    argument order and the merge would stop being commutative. ``-0.0``
    becomes ``0.0`` so equal numbers of one type have one encoding. Subclasses (an
    ``IntEnum``, a numpy float) become the exact builtin type, because only
    exact builtins travel in the plain-value encoding.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be an int or float, not {type(value).__name__}")
    if isinstance(value, int):
        return int(value)
    if math.isnan(value):
        raise ValueError(f"{what} must not be NaN")
    return float(value) + 0.0  # -0.0 + 0.0 == +0.0
