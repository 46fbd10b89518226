"""Maps of lattices, merged key by key.

A map whose values are lattices is itself a lattice: merging key-wise keeps
every key from either side and joins the values under shared keys. It is how
one KVS key can hold many independently updated fields, and how causal
lattices carry the clocks of their dependencies.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, Mapping
from typing import Any, ClassVar, final

from .base import Lattice

__all__ = ["MapKey", "MapLattice", "check_map_key", "map_key_order"]

MapKey = str | int | bytes

_KEY_RANK = {bytes: 0, int: 1, str: 2}


def check_map_key(key: object) -> None:
    """Accept exact ``str``, ``int`` and ``bytes`` keys: what the wire carries natively.

    Bools are refused although they are ints: ``True`` and ``1`` would collide
    in a dict but encode differently.
    """
    if type(key) not in _KEY_RANK:
        raise TypeError(f"map keys must be str, int or bytes, not {type(key).__name__}")


def map_key_order(key: MapKey) -> tuple[int, Any]:
    """A total order over mixed key types (bytes < int < str), for canonical encodings."""
    return (_KEY_RANK[type(key)], key)


@final
class MapLattice(Lattice):
    """A dict from keys to lattices; merge joins values key by key.

    Keys only on one side are kept as they are. Values under the same key must
    be the same lattice type.

    Args:
        mapping: keys (``str``, ``int`` or ``bytes``) to :class:`Lattice` values.

    Raises:
        TypeError: a key or value has an unsupported type.
    """

    __slots__ = ("_entries",)

    type_name: ClassVar[str] = "Map"

    def __init__(self, mapping: Mapping[MapKey, Lattice] | None = None) -> None:
        entries: dict[MapKey, Lattice] = {}
        for key, value in (mapping or {}).items():
            check_map_key(key)
            if not isinstance(value, Lattice):
                raise TypeError(
                    f"MapLattice values must be lattices, not {type(value).__name__} "
                    f"(under key {key!r}); wrap plain values, e.g. in LWWLattice.now(value)"
                )
            entries[key] = value
        self._entries = entries

    def reveal(self) -> dict[MapKey, Any]:
        """A new ``dict`` of each key to its lattice's ``reveal()``."""
        return {key: value.reveal() for key, value in self._entries.items()}

    def merge(self, other: MapLattice) -> MapLattice:
        self._check_mergeable(other)
        merged = dict(self._entries)
        for key, theirs in other._entries.items():
            mine = merged.get(key)
            merged[key] = theirs if mine is None else mine.merge(theirs)
        return MapLattice(merged)

    def get(self, key: MapKey, default: Lattice | None = None) -> Lattice | None:
        return self._entries.get(key, default)

    def keys(self) -> KeysView[MapKey]:
        return self._entries.keys()

    def items(self) -> ItemsView[MapKey, Lattice]:
        return self._entries.items()

    def __getitem__(self, key: MapKey) -> Lattice:
        return self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[MapKey]:
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __eq__(self, other: object) -> bool:
        if type(other) is not MapLattice:
            return NotImplemented
        return self._entries == other._entries

    def __hash__(self) -> int:
        return hash((MapLattice, frozenset(self._entries.items())))

    def __repr__(self) -> str:
        ordered = sorted(self._entries.items(), key=lambda item: map_key_order(item[0]))
        body = ", ".join(f"{key!r}: {value!r}" for key, value in ordered)
        return f"MapLattice({{{body}}})"
