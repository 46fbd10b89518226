"""The storage core: keys mapped to lattices, merged on every write. No I/O.

The store never unpickles user data: lattices are decoded in raw mode, where
user values stay opaque bytes and merges compare timestamps, clocks and bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import LatticeTypeError
from ..lattices import RAW, Lattice, decode_lattice, encode_lattice

__all__ = ["Store"]


class Store:
    """Keys mapped to lattices in a dict (the core of the memory and durable backends)."""

    def __init__(self) -> None:
        # key -> (decoded raw lattice, its canonical encoding)
        self._data: dict[str, tuple[Lattice, bytes]] = {}

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str) -> bytes | None:
        """The encoded lattice at ``key``, or None."""
        entry = self._data.get(key)
        return None if entry is None else entry[1]

    def type_name(self, key: str) -> str | None:
        entry = self._data.get(key)
        return None if entry is None else entry[0].type_name

    def put(self, key: str, data: bytes) -> tuple[str, bytes | None]:
        """Merge an encoded lattice into ``key``.

        Returns ``(type_name, new_encoding)``; ``new_encoding`` is None when the
        merge changed nothing (so nobody needs to be told).

        Raises:
            ProtocolError: ``data`` is not a lattice encoding.
            LatticeTypeError: ``key`` holds a lattice of another type.
        """
        incoming = decode_lattice(data, load=RAW)
        entry = self._data.get(key)
        if entry is None:
            encoded = encode_lattice(incoming, dump=RAW)
            self._data[key] = (incoming, encoded)
            return incoming.type_name, encoded
        current, current_bytes = entry
        if type(current) is not type(incoming):
            raise LatticeTypeError(
                f"key {key!r} holds a {current.type_name} lattice; "
                f"cannot merge a {incoming.type_name} lattice into it"
            )
        merged = current.merge(incoming)
        encoded = encode_lattice(merged, dump=RAW)
        if encoded == current_bytes:
            return current.type_name, None
        self._data[key] = (merged, encoded)
        return merged.type_name, encoded

    def delete(self, key: str) -> bool:
        return self._data.pop(key, None) is not None

    def copy(self) -> Store:
        """A copy that later puts to either side do not change (entries are immutable)."""
        clone = Store()
        clone._data = dict(self._data)
        return clone

    def encodings(self) -> Iterator[tuple[str, bytes]]:
        """Each key with its canonical encoding."""
        for key, (_, encoded) in self._data.items():
            yield key, encoded
