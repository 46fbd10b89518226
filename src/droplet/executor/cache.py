"""The executor's co-located cache of KVS values.

Reads go to the KVS on a miss with ``subscribe=True``; the store then pushes
every later change of the key (``KvsUpdate``), so a cached value is as fresh
as the last push the cache received: NORMAL consistency's "the latest value
the cache knows". Values are kept in raw (still-pickled) form and decoded by
the reader, so a cached object cannot be mutated by one invocation under
another's feet.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

from ..lattices import RAW, Lattice, decode_lattice, encode_lattice
from ..protocol.messages import KvsGet, KvsPut, KvsStored, KvsUnsubscribe, KvsValue
from ..rpc import Peer

__all__ = ["DEFAULT_CAPACITY", "Cache", "CacheStatistics"]

#: Values a cache holds; the least recently stored is evicted (and unsubscribed).
DEFAULT_CAPACITY = 100_000


@attrs.frozen
class CacheStatistics:
    entries: int
    hits: int
    misses: int
    #: encoded size of the cached values.
    bytes: int = 0


class Cache:
    def __init__(self, kvs: Peer, *, capacity: int | None = None) -> None:
        self._kvs = kvs
        self._capacity = DEFAULT_CAPACITY if capacity is None else capacity
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.bytes = 0

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(len(self._entries), self.hits, self.misses, self.bytes)

    def peek(self, key: str) -> bytes | None:
        """The cached encoding of ``key`` without any I/O (safe from worker threads)."""
        return self._entries.get(key)

    async def get(self, key: str) -> bytes | None:
        """The encoded lattice at ``key``: from the cache, else from the KVS."""
        data = self._entries.get(key)
        if data is not None:
            self.hits += 1
            return data
        self.misses += 1
        reply: KvsValue = await self._kvs.request(KvsGet(key, None, True))
        if reply.lattice is not None:
            await self._store(key, reply.lattice)
        return reply.lattice

    async def refresh(self, key: str) -> bytes | None:
        """Read ``key`` from the KVS even if cached (a read that must not be stale)."""
        reply: KvsValue = await self._kvs.request(KvsGet(key, None, True))
        if reply.lattice is not None:
            await self._store(key, reply.lattice)
        return self._entries.get(key)

    async def put(self, key: str, lattice: Lattice, *, raw: bool = False) -> str:
        """Merge a lattice into the KVS (and, via the pushed update, into this cache).

        ``raw`` means the lattice's user values are already pickled bytes.
        """
        data = encode_lattice(lattice, dump=RAW) if raw else encode_lattice(lattice)
        stored: KvsStored = await self._kvs.request(KvsPut(key, data, True))
        return stored.type_name

    async def update(self, key: str, data: bytes) -> None:
        """A pushed change from the KVS: merge it into what the cache holds."""
        await self._store(key, data)

    async def _store(self, key: str, data: bytes) -> None:
        old = self._entries.get(key)
        if old is not None and old != data:
            merged = decode_lattice(old, load=RAW).merge(decode_lattice(data, load=RAW))
            data = encode_lattice(merged, dump=RAW)
        self.bytes += len(data) - (len(old) if old is not None else 0)
        self._entries[key] = data
        self._entries.move_to_end(key)
        if len(self._entries) > self._capacity:
            evicted, gone = self._entries.popitem(last=False)
            self.bytes -= len(gone)
            try:
                await self._kvs.send(KvsUnsubscribe(evicted))
            except Exception:
                pass
