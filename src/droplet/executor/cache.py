"""A node's cache of KVS values, shared by all of that node's executors.

Reads go to the KVS on a miss with ``subscribe=True``; the store then pushes
every later change of the key (``KvsUpdate``), so a cached value is as fresh
as the last push the cache received: NORMAL consistency's "the latest value
the cache knows". Concurrent misses of one key make one read of the store.

The cache is bounded in bytes (``--cache-size``) and in entries, least
recently used first out; an evicted key is unsubscribed. Every change of a
key gets a new *version* (a number unique within this cache), so readers can
keep what they decoded from one version and know when it is outdated:

- executors in this process (the embedded LocalCluster, a ``--role executor``
  node) call it directly and share one :class:`~.values.DecodedValues`, so an
  immutable value is unpickled once per version for the whole process;
- worker processes of an all-in-one node reach it through
  :class:`~.cache_service.NodeCacheService` (``CacheGet`` messages); values of
  :data:`SEGMENT_THRESHOLD` bytes or more are handed over as a shared-memory
  segment (:mod:`.segments`) written once per version, never over the socket.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ..lattices import RAW, Lattice, decode_lattice, encode_lattice
from ..protocol.messages import KvsGet, KvsPut, KvsStored, KvsUnsubscribe, KvsUpdate, KvsValue
from ..rpc import Peer
from .oob import out_of_band
from .segments import SegmentStore
from .values import DecodedValues, lww_payload

__all__ = ["DEFAULT_CACHE_BYTES", "DEFAULT_CAPACITY", "SEGMENT_THRESHOLD", "Cache",
           "CacheStatistics", "Counts", "Entry"]

log = logging.getLogger("droplet.executor")

#: Values a cache holds at most, whatever their size (each is a subscription).
DEFAULT_CAPACITY = 100_000
#: Bytes of encoded values a node's cache holds by default (``--cache-size``).
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
#: Values this big or bigger reach worker processes through shared memory.
SEGMENT_THRESHOLD = 64 * 1024


@attrs.frozen
class CacheStatistics:
    entries: int
    hits: int
    misses: int
    #: encoded size of the cached values.
    bytes: int = 0
    #: entries dropped to stay within the bounds.
    evictions: int = 0
    #: the bound on ``bytes`` (``--cache-size``).
    capacity_bytes: int = 0
    #: reads sent to the store (misses, refreshes; concurrent misses share one).
    fetches: int = 0
    #: pushed changes received from the store.
    updates: int = 0
    #: shared-memory segments alive, and their bytes.
    segments: int = 0
    segment_bytes: int = 0
    #: reads answered with an object already decoded for that version.
    decoded_hits: int = 0


@attrs.define
class Counts:
    """One reader's hits and misses (each executor sharing a node's cache keeps its own)."""

    hits: int = 0
    misses: int = 0


@attrs.define
class Entry:
    """One cached key: its encoded lattice and the version of that encoding."""

    version: int
    data: bytes
    #: the shared-memory segment holding ``data``, once a worker process asked,
    #: and its layout: "" (the encoded lattice) or "oob" (see :mod:`.oob`).
    segment: str | None = None
    layout: str = ""


class Cache:
    """One node's cache (see the module docstring). ``kvs`` is its link to the store.

    The store pushes ``KvsUpdate`` on the link the cache reads through: route
    them to :meth:`update` (:meth:`handle` does, as that link's handler).
    """

    MESSAGES = (KvsUpdate,)

    def __init__(self, kvs: Peer | None, *, capacity: int | None = None,
                 max_bytes: int = DEFAULT_CACHE_BYTES, shared_memory: bool = False) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache size must not be negative, not {max_bytes!r}")
        self._kvs = kvs
        self._capacity = DEFAULT_CAPACITY if capacity is None else capacity
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        #: key -> size of the entries of SEGMENT_THRESHOLD bytes or more (reports).
        self._large: dict[str, int] = {}
        self._fetching: dict[str, trio.Event] = {}
        self._version = 0
        self.decoded = DecodedValues(max_bytes)
        self.segments = SegmentStore() if shared_memory else None
        self._segment_failed = False  # warned once that segments cannot be written
        #: called with a key whose cached version changed or went away (the
        #: service telling worker processes; see cache_service.py).
        self.on_change: Callable[[str], None] | None = None
        self.hits = 0
        self.misses = 0
        self.bytes = 0
        self.evictions = 0
        self.fetches = 0
        self.updates = 0
        if kvs is not None:
            self._watch(kvs)

    def attach(self, kvs: Peer) -> None:
        """Read through ``kvs`` from now on (for a cache made before its link)."""
        self._kvs = kvs
        self._watch(kvs)

    def _watch(self, kvs: Peer) -> None:
        on_close = getattr(kvs, "on_close", None)
        if on_close is not None:
            on_close.append(self._lost)

    def _lost(self, kvs: Peer) -> None:
        """The link to the store closed, and the subscriptions with it: no push
        would tell us of a change any more, so drop everything (workers too)."""
        if kvs is not self._kvs:
            return
        for key in list(self._entries):
            self._drop(key)

    def _store_link(self) -> Peer:
        if self._kvs is None:
            raise RuntimeError("this cache has no link to the store yet (attach one)")
        return self._kvs

    def statistics(self) -> CacheStatistics:
        segments = self.segments
        return CacheStatistics(
            len(self._entries), self.hits, self.misses, self.bytes, self.evictions,
            self.max_bytes, self.fetches, self.updates,
            len(segments) if segments is not None else 0,
            segments.total_bytes if segments is not None else 0, self.decoded.hits)

    def summary(self, min_size: int = 0, limit: int | None = None) -> dict[str, int]:
        """``key -> encoded size`` of cached keys of at least ``min_size`` bytes.

        With ``limit``, only that many: the largest (what placement cares about).
        """
        if min_size >= SEGMENT_THRESHOLD:  # without scanning every small entry
            found = [(k, n) for k, n in list(self._large.items()) if n >= min_size]
        else:
            found = [(k, len(e.data)) for k, e in list(self._entries.items())
                     if len(e.data) >= min_size]
        if limit is not None and len(found) > limit:
            found.sort(key=lambda item: item[1], reverse=True)
            found = found[:limit]
        return dict(found)

    def close(self) -> None:
        """Drop everything and remove the shared-memory segments (the node is stopping)."""
        self._entries.clear()
        self._large.clear()
        self.decoded.clear()
        self.bytes = 0
        if self.segments is not None:
            self.segments.close()

    async def handle(self, peer: Peer, msg: Any, request_id: int) -> Any:
        if type(msg) is KvsUpdate:
            await self.update(msg.key, msg.lattice)
        return None

    # ------------------------------------------------------------------ reads

    def peek(self, key: str) -> bytes | None:
        """The cached encoding of ``key`` without any I/O (safe from worker threads)."""
        entry = self._entries.get(key)
        return entry.data if entry is not None else None

    def peek_entry(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def peek_value(self, key: str) -> tuple[bool, Any]:
        """``(True, value)`` when ``key`` is cached (or ``(True, None)`` never): no I/O.

        Safe from worker threads: an immutable value decoded before is handed
        out as is; anything else is decoded here (a private copy).
        """
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        found, value = self.decoded.get(key, entry.version)
        if found:
            return True, value
        return True, self.decoded.decode(key, entry.version, entry.data)

    async def get(self, key: str, counts: Counts | None = None) -> bytes | None:
        """The encoded lattice at ``key``: from the cache, else from the KVS."""
        entry = await self.entry(key, counts)
        return entry.data if entry is not None else None

    async def get_value(self, key: str, counts: Counts | None = None) -> Any:
        """The value at ``key`` (as ``reveal_stored``), decoded once per version if immutable."""
        entry = await self.entry(key, counts)
        if entry is None:
            return None
        found, value = self.decoded.get(key, entry.version)
        if found:
            return value
        return self.decoded.decode(key, entry.version, entry.data)

    async def entry(self, key: str, counts: Counts | None = None) -> Entry | None:
        """The cached entry of ``key``, read from the KVS on a miss (once for concurrent misses).

        ``counts``: the reader's own hit and miss counters, counted too.
        """
        counts = counts or Counts()
        while True:
            entry = self._entries.get(key)
            if entry is not None:
                self.hits += 1
                counts.hits += 1
                self._entries.move_to_end(key)
                return entry
            pending = self._fetching.get(key)
            if pending is None:
                break
            await pending.wait()  # another reader is fetching it: share its read
            entry = self._entries.get(key)
            if entry is not None:
                self.hits += 1
                counts.hits += 1
                return entry
            # absent (or too big to keep): read it ourselves
            break
        self.misses += 1
        counts.misses += 1
        return await self._fetch(key)

    async def refresh(self, key: str) -> bytes | None:
        """Read ``key`` from the KVS even if cached (a read that must not be stale)."""
        entry = await self._fetch(key)
        return entry.data if entry is not None else None

    async def refresh_entry(self, key: str) -> Entry | None:
        return await self._fetch(key)

    async def _fetch(self, key: str) -> Entry | None:
        done = self._fetching.get(key)
        mine = done is None
        if mine:
            done = self._fetching[key] = trio.Event()
        assert done is not None
        try:
            self.fetches += 1
            reply: KvsValue = await self._store_link().request(KvsGet(key, None, True))
            if reply.lattice is None:
                return None
            return await self._store(key, reply.lattice)
        finally:
            if mine:
                del self._fetching[key]
                done.set()

    # ------------------------------------------------------------------ writes

    async def put(self, key: str, lattice: Lattice, *, raw: bool = False) -> str:
        """Merge a lattice into the KVS (and, via the pushed update, into this cache).

        ``raw`` means the lattice's user values are already pickled bytes.
        """
        data = encode_lattice(lattice, dump=RAW) if raw else encode_lattice(lattice)
        return await self.put_encoded(key, data)

    async def put_encoded(self, key: str, data: bytes) -> str:
        # subscribe=True: the store pushes the merged value to this link before
        # answering, so the writer reads its own write from this cache.
        stored: KvsStored = await self._store_link().request(KvsPut(key, data, True))
        return stored.type_name

    async def update(self, key: str, data: bytes) -> None:
        """A pushed change from the KVS: merge it into what the cache holds."""
        self.updates += 1
        await self._store(key, data)

    def replace(self, key: str, data: bytes) -> None:
        """Hold ``data`` for ``key`` as a new version, unmerged (tests make stale caches)."""
        self._drop(key)
        self._add(key, data)

    async def _store(self, key: str, data: bytes) -> Entry | None:
        old = self._entries.get(key)
        if old is not None:
            if old.data == data:
                self._entries.move_to_end(key)
                return old
            merged = decode_lattice(old.data, load=RAW).merge(decode_lattice(data, load=RAW))
            data = encode_lattice(merged, dump=RAW)
            if data == old.data:
                self._entries.move_to_end(key)
                return old
            self._drop(key)
        if len(data) > self.max_bytes:  # never fits: serve this read, keep nothing
            await self._unsubscribe(key)
            self._version += 1
            return Entry(self._version, data)
        entry = self._add(key, data)
        while (self.bytes > self.max_bytes or len(self._entries) > self._capacity) \
                and len(self._entries) > 1:
            evicted, _ = next(iter(self._entries.items()))
            self._drop(evicted)
            self.evictions += 1
            await self._unsubscribe(evicted)
        return entry

    def _add(self, key: str, data: bytes) -> Entry:
        self._version += 1
        entry = self._entries[key] = Entry(self._version, data)
        self.bytes += len(data)
        if len(data) >= SEGMENT_THRESHOLD:
            self._large[key] = len(data)
        return entry

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.bytes -= len(entry.data)
        self._large.pop(key, None)
        self.decoded.forget(key)
        if self.on_change is not None:
            self.on_change(key)
        if entry.segment is not None and self.segments is not None:
            self.segments.unlink(entry.segment)

    async def _unsubscribe(self, key: str) -> None:
        if self._kvs is None:
            return
        try:
            await self._kvs.send(KvsUnsubscribe(key))
        except Exception as exc:  # the store went away: nothing left to unsubscribe
            log.debug("could not unsubscribe %r: %s", key, exc)

    # ------------------------------------------------------------------ worker processes

    def segment_of(self, key: str, entry: Entry) -> tuple[str, str, int] | None:
        """The shared-memory segment holding ``entry`` (made now if needed): name, layout, size.

        None when the cache keeps no segments or ``entry`` is no longer the
        cached version of ``key`` (the caller then sends the bytes). A numpy
        value is laid out with its arrays out of band (layout ``"oob"``), so
        workers map them without copying.
        """
        if self.segments is None or self._entries.get(key) is not entry:
            return None
        if entry.segment is None:
            payload = lww_payload(entry.data)
            parts = out_of_band(payload) if payload is not None else None
            try:
                if parts is not None:
                    entry.segment, entry.layout = self.segments.create_parts(parts), "oob"
                else:
                    entry.segment = self.segments.create(entry.data)
            except OSError as exc:  # /dev/shm full (64 MiB in a container), gone...
                (log.debug if self._segment_failed else log.warning)(
                    "no shared-memory segment for %r (%s): sending its bytes", key, exc)
                self._segment_failed = True
                return None
        return entry.segment, entry.layout, self.segments.size_of(entry.segment)
