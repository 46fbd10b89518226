"""Private copies of values handed from one function to the next.

A function's result reaches a downstream function on another executor as a
fresh unpickled object; on the same executor it used to be the very same
object, so in a diamond one branch could mutate the other's input. Every
hand-off now goes through :func:`private`, which gives the same semantics
under every placement: immutable values (numbers, strings, bytes, and small
tuples/frozensets of them) are passed as they are, anything else is copied
through pickle, exactly what crossing the wire would have done. Big buffers
(a ``bytearray``, an array) are copied once, not twice: they are pickled out
of band (``serialization.dumps_value``) and only rebuilt from the original.
"""

from __future__ import annotations

from typing import Any

from ..serialization import dumps_value, loads

__all__ = ["is_immutable", "private"]

_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, range,
                    type(Ellipsis)})
#: Tuples and frozensets bigger or deeper than this are copied rather than scanned.
_MAX_SCAN = 64
_MAX_DEPTH = 3


def is_immutable(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` cannot be changed by whoever receives it (a cheap, safe guess).

    >>> is_immutable((1, "a", (b"x", None))), is_immutable((1, [2]))
    (True, False)
    """
    kind = type(value)
    if kind in _ATOMS:
        return True
    if kind is tuple or kind is frozenset:
        return (depth < _MAX_DEPTH and len(value) <= _MAX_SCAN
                and all(is_immutable(v, depth + 1) for v in value))
    return False


def private(value: Any) -> Any:
    """``value`` itself when immutable, else a deep copy made by pickling it.

    Raises TypeError when the value cannot be pickled (as sending it would).
    """
    if is_immutable(value):
        return value
    return loads(dumps_value(value))
