"""``conn.kvs_client``: an Anna-style client of the lattice KVS.

Cloudburst programs reach the store through ``cloud.kvs_client`` (an
``AnnaTcpClient``): ``get`` takes a key or a list of keys and returns
``{key: lattice or None}``; ``put(key, lattice)`` merges a lattice into the
key. Droplet's lattices (:mod:`droplet.lattices`) stand in for Anna's:
``LWWLattice(timestamp, value)`` for ``LWWPairLattice``, and so on.

>>> cloud.kvs_client.put("model", LWWLattice(0, model_bytes))    # doctest: +SKIP
True
>>> cloud.kvs_client.get("model")["model"].reveal() == model_bytes  # doctest: +SKIP
True
"""

from __future__ import annotations

import pickle
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..errors import DropletError
from ..lattices import Lattice, decode_lattice, encode_lattice
from ._core import check_key

__all__ = ["AsyncKvsClient", "KvsClient"]

Fetch = Callable[[list[str]], list[bytes | None]]
Store = Callable[[str, bytes], None]


def _keys(keys: str | Sequence[str]) -> list[str]:
    if isinstance(keys, str):
        return [check_key(keys)]
    if not isinstance(keys, list | tuple | set | frozenset):
        raise TypeError(f"kvs_client.get takes a key or a list of keys, "
                        f"not {type(keys).__name__}")
    return [check_key(k) for k in keys]


def _encoded(key: str, lattice: Any) -> bytes:
    check_key(key)
    if not isinstance(lattice, Lattice):
        raise TypeError(
            f"kvs_client.put({key!r}, ...) takes a lattice (droplet.lattices, e.g. "
            f"LWWLattice(0, value)), not {type(lattice).__name__}; "
            "use put_object() for plain values")
    return encode_lattice(lattice)


def _decoded(keys: list[str], found: list[bytes | None]) -> dict[str, Lattice | None]:
    result: dict[str, Lattice | None] = {}
    for key, data in zip(keys, found, strict=True):
        if data is None:
            result[key] = None
            continue
        try:
            result[key] = decode_lattice(data, load=pickle.loads)
        except Exception as exc:
            raise DropletError(f"kvs_client.get: the value at {key!r} cannot be "
                               f"decoded here: {exc}") from exc
    return result


class KvsClient:
    """Blocking Anna-style access to the KVS of a :class:`DropletConnection`."""

    def __init__(self, fetch: Fetch, store: Store) -> None:
        self._fetch = fetch
        self._store = store

    def get(self, keys: str | Sequence[str]) -> dict[str, Lattice | None]:
        """``{key: lattice or None}`` for one key or a list of keys."""
        wanted = _keys(keys)
        return _decoded(wanted, self._fetch(wanted))

    def put(self, key: str, lattice: Lattice) -> bool:
        """Merge ``lattice`` into ``key``; True once the store has it."""
        self._store(key, _encoded(key, lattice))
        return True


class AsyncKvsClient:
    """:class:`KvsClient` for Trio code: ``await kvs.get(...)``, ``await kvs.put(...)``."""

    def __init__(self, fetch: Callable[[list[str]], Awaitable[list[bytes | None]]],
                 store: Callable[[str, bytes], Awaitable[None]]) -> None:
        self._fetch = fetch
        self._store = store

    async def get(self, keys: str | Sequence[str]) -> dict[str, Lattice | None]:
        wanted = _keys(keys)
        return _decoded(wanted, await self._fetch(wanted))

    async def put(self, key: str, lattice: Lattice) -> bool:
        await self._store(key, _encoded(key, lattice))
        return True
