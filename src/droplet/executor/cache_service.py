"""The node cache as seen by the node's worker processes.

:class:`NodeCacheService` answers ``CacheGet`` and ``CachePut`` from the
executor workers an all-in-one node runs as child processes, on the link they
already have to the node, and tells each worker (``CacheInvalidate``) when a
key it was given changes or leaves the node's cache. :class:`RemoteCache` is
the worker's side: it holds what it was given (small values as bytes, large
ones as a read-only mapping of the node's shared-memory segment) and serves
it locally until told otherwise, so a warm read costs no round trip and no
copy; immutable values are decoded once per version
(:class:`~.values.DecodedValues`).

Freshness is the node cache's, one hop later: a change reaches a worker as
soon as the node's cache has it and the worker has read the invalidation.
A worker's own write drops its held version at once (read your writes).
"""

from __future__ import annotations

import functools
import logging
import mmap
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from ..errors import ProtocolError
from ..lattices import RAW, Lattice, encode_lattice
from ..protocol.messages import CacheGet, CacheInvalidate, CachePut, CacheValue, KvsStored
from ..rpc import Peer
from .cache import SEGMENT_THRESHOLD, Cache, CacheStatistics, Counts
from .oob import load_out_of_band
from .segments import map_segment
from .values import DecodedValues, decode_value

__all__ = ["NodeCacheService", "RemoteCache"]

log = logging.getLogger("droplet.executor")

#: Keys a worker remembers (versions, small values, mapped segments).
WORKER_ENTRIES = 4096
#: Bytes of small values a worker keeps (values under SEGMENT_THRESHOLD).
WORKER_SMALL_BYTES = 64 * 1024 * 1024
#: Seconds between attempts of a node cache to link to the store again.
RELINK_DELAY = 0.5


class NodeCacheService:
    """Serves the node's :class:`~.cache.Cache` to its worker processes (plug into a router)."""

    MESSAGES = (CacheGet, CachePut)

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        #: key -> the worker links that hold a version of it.
        self._holders: dict[str, set[Peer]] = {}
        #: invalidations sent.
        self.invalidations = 0
        cache.on_change = self._changed

    def _hold(self, peer: Peer, key: str) -> None:
        keys: set[str] | None = peer.state.get("cache_held")
        if keys is None:
            keys = peer.state["cache_held"] = set()
            peer.on_close.append(self._gone)
        keys.add(key)
        self._holders.setdefault(key, set()).add(peer)

    def _gone(self, peer: Peer) -> None:
        for key in peer.state.get("cache_held", ()):
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(peer)
                if not holders:
                    del self._holders[key]

    def _changed(self, key: str) -> None:
        for peer in self._holders.pop(key, ()):
            peer.state.get("cache_held", set()).discard(key)
            self.invalidations += 1
            try:
                peer.post(CacheInvalidate([key]))
            except Exception as exc:  # it is not reading: it was disconnected
                log.debug("could not tell %s that %r changed: %s", peer.remote, key, exc)

    async def handle(self, peer: Peer, msg: Any, request_id: int) -> Any:
        cache = self.cache
        if type(msg) is CachePut:
            return KvsStored(await cache.put_encoded(msg.key, msg.lattice))
        if type(msg) is not CacheGet:
            raise ProtocolError(f"the node cache does not serve {type(msg).__name__} messages")
        before = cache.misses
        entry = await (cache.refresh_entry(msg.key) if msg.refresh else cache.entry(msg.key))
        hit = cache.misses == before and not msg.refresh
        if entry is None:
            return CacheValue(msg.key, 0, hit)
        keep = cache.peek_entry(msg.key) is entry
        if keep:  # held here: tell the worker of changes
            self._hold(peer, msg.key)
        size = len(entry.data)
        if entry.version == msg.version:
            return CacheValue(msg.key, entry.version, hit, size, keep=keep)
        if size >= SEGMENT_THRESHOLD and not msg.inline:
            found = cache.segment_of(msg.key, entry)
            if found is not None:
                name, layout, stored = found
                return CacheValue(msg.key, entry.version, hit, stored, segment=name,
                                  layout=layout)
        # Not kept here (too big for the cache): nothing would tell the worker
        # of a change, so it must not keep it either.
        return CacheValue(msg.key, entry.version, hit, size, data=entry.data, keep=keep)


@attrs.define
class _Held:
    version: int
    size: int
    data: bytes | None = None
    mapping: mmap.mmap | None = None
    layout: str = ""

    def view(self) -> bytes | memoryview:
        if self.data is not None:
            return self.data
        mapping = self.mapping
        if mapping is None:
            raise ValueError("this value was dropped meanwhile")
        return memoryview(mapping)

    def close(self) -> None:
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:  # a view is still exported: the GC unmaps it later
                pass
            self.mapping = None


class RemoteCache:
    """A worker process's handle on its node's cache (same interface as :class:`Cache`)."""

    def __init__(self, node: Peer, *, decoded_bytes: int | None = None,
                 segment_dir: Path | None = None) -> None:
        self._node = node
        self._segment_dir = segment_dir
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._small_bytes = 0
        #: key -> [reads of it in flight, invalidations seen meanwhile]: a reply
        #: that raced an invalidation (or this worker's own write) may predate
        #: the change, so it serves that read and is not kept.
        self._reading: dict[str, list[int]] = {}
        # A lost link loses the invalidations too: keep nothing that could go stale.
        on_close = getattr(node, "on_close", None)
        if on_close is not None:
            on_close.append(lambda _peer: self.close())
        self.decoded = DecodedValues() if decoded_bytes is None else DecodedValues(decoded_bytes)
        self.hits = 0
        self.misses = 0
        #: values received (bytes or a segment), and reads that needed none.
        self.transfers = 0
        self.unchanged = 0

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(len(self._held), self.hits, self.misses,
                               sum(h.size for h in self._held.values()),
                               decoded_hits=self.decoded.hits)

    def summary(self, min_size: int = 0, limit: int | None = None) -> dict[str, int]:
        found = [(k, h.size) for k, h in list(self._held.items()) if h.size >= min_size]
        if limit is not None and len(found) > limit:
            found.sort(key=lambda item: item[1], reverse=True)
            found = found[:limit]
        return dict(found)

    def close(self) -> None:
        for reading in self._reading.values():
            reading[1] += 1
        self.decoded.clear()
        for held in self._held.values():
            held.close()
        self._held.clear()
        self._small_bytes = 0

    def invalidate(self, keys: list[str]) -> None:
        """The node's cache says these keys changed: drop what is held of them."""
        for key in keys:
            self._invalidate(key)

    def _invalidate(self, key: str) -> None:
        reading = self._reading.get(key)
        if reading is not None:  # a read in flight must not keep what it gets
            reading[1] += 1
        self._forget(key)

    def peek(self, key: str) -> bytes | None:
        """The held encoding of ``key`` without I/O (None when not held as one)."""
        held = self._held.get(key)
        if held is None or held.layout:
            return None
        return bytes(held.view())

    def peek_value(self, key: str) -> tuple[bool, Any]:
        """``(True, value)`` when ``key`` is held here (no I/O; safe from worker threads)."""
        held = self._held.get(key)
        if held is None:
            return False, None
        try:
            return True, self._value(key, held)
        except ValueError:  # unmapped meanwhile by the event loop: ask the node
            return False, None

    async def get(self, key: str, counts: Counts | None = None) -> bytes | None:
        return await self._encoded(key, refresh=False)

    async def refresh(self, key: str) -> bytes | None:
        return await self._encoded(key, refresh=True)

    async def _encoded(self, key: str, *, refresh: bool) -> bytes | None:
        """The encoded lattice at ``key`` (CAUSAL reads, ``deserialize=False``)."""
        held = await self._read(key, refresh=refresh)
        if held is None:
            return None
        if not held.layout:
            return bytes(held.view())
        # Held out of band: ask for the encoding itself (rare: not the common path).
        reply: CacheValue = await self._node.request(CacheGet(key, 0, False, True))
        return reply.data

    async def get_value(self, key: str, counts: Counts | None = None) -> Any:
        held = await self._read(key, refresh=False)
        if held is None:
            return None
        return self._value(key, held)

    def _value(self, key: str, held: _Held) -> Any:
        found, value = self.decoded.get(key, held.version)
        if found:
            return value
        if self._held.get(key) is not held:  # served once, not kept: decode, keep nothing
            view = held.view()
            return load_out_of_band(view) if held.layout == "oob" else decode_value(view)
        if held.layout == "oob":  # read-only views of the node's one copy
            return self.decoded.keep(key, held.version, load_out_of_band(held.view()),
                                     held.size)
        return self.decoded.decode(key, held.version, held.view())

    async def put(self, key: str, lattice: Lattice, *, raw: bool = False) -> str:
        data = encode_lattice(lattice, dump=RAW) if raw else encode_lattice(lattice)
        return await self.put_encoded(key, data)

    async def put_encoded(self, key: str, data: bytes) -> str:
        try:
            stored: KvsStored = await self._node.request(CachePut(key, data))
        finally:
            self._invalidate(key)  # read your writes: the next read asks the node
        return stored.type_name

    async def update(self, key: str, data: bytes) -> None:
        """Pushes go to the node's cache, not here; a stray one changes nothing."""

    async def _read(self, key: str, *, refresh: bool) -> _Held | None:
        held = self._held.get(key)
        if held is not None and not refresh:  # valid until the node says otherwise
            self.hits += 1
            self._held.move_to_end(key)
            return held
        reading = self._reading.setdefault(key, [0, 0])
        reading[0] += 1
        seen = reading[1]
        try:
            return await self._ask(key, held, refresh, lambda: reading[1] != seen)
        finally:
            reading[0] -= 1
            if not reading[0]:
                del self._reading[key]

    async def _ask(self, key: str, held: _Held | None, refresh: bool,
                   raced: Callable[[], bool]) -> _Held | None:
        known = held.version if held is not None else 0
        reply: CacheValue = await self._node.request(CacheGet(key, known, refresh))
        if reply.hit:
            self.hits += 1
        else:
            self.misses += 1
        if reply.version == 0:
            self._forget(key)
            return None
        if held is not None and reply.version == held.version:
            if self._held.get(key) is held and not raced() and reply.keep:
                self.unchanged += 1
                self._held.move_to_end(key)
                return held
            # Dropped while we asked: get the value itself (not kept if raced).
            reply = await self._node.request(CacheGet(key, 0, False))
            if reply.version == 0:
                return None
        self.transfers += 1
        mapping = None
        if reply.segment is not None:
            try:
                mapping = map_segment(reply.segment, reply.size, self._segment_dir)
            except FileNotFoundError:  # evicted before we mapped it: ask for the bytes
                reply = await self._node.request(CacheGet(key, 0, False, True))
                if reply.version == 0:
                    self._forget(key)
                    return None
        if mapping is None and reply.data is None:
            raise ProtocolError(f"the node cache sent neither data nor a segment for {key!r}")
        fresh = _Held(reply.version, reply.size, reply.data, mapping,
                      reply.layout if mapping is not None else "")
        if raced() or not reply.keep:  # may predate a change: serve it, keep nothing
            return fresh
        self._forget(key)
        self._held[key] = fresh
        if fresh.data is not None:
            self._small_bytes += fresh.size
        self._trim()
        return fresh

    def _forget(self, key: str) -> None:
        self.decoded.forget(key)  # first: its arrays may be views of the mapping
        held = self._held.pop(key, None)
        if held is not None:
            if held.data is not None:
                self._small_bytes -= held.size
            held.close()

    def _trim(self) -> None:
        while (len(self._held) > WORKER_ENTRIES or self._small_bytes > WORKER_SMALL_BYTES) \
                and len(self._held) > 1:
            self._forget(next(iter(self._held)))


def _set_on_close(event: trio.Event, _peer: Peer) -> None:
    event.set()


async def open_node_cache(nursery: Any, kvs_url: str, *, token: str | None,
                          max_bytes: int, shared_memory: bool, options: Any = None) -> Cache:
    """A node's cache on a link of its own to the store at ``kvs_url``.

    It lives as long as ``nursery``: when that is cancelled its segments are removed.
    """
    from ..links import connect_peer

    cache = Cache(None, max_bytes=max_bytes, shared_memory=shared_memory)

    async def connect() -> Peer:
        link = await connect_peer(kvs_url, nursery, token=token, handler=cache.handle,
                                  options=options)
        cache.attach(link)
        return link

    link = await connect()

    async def relink_and_close_on_exit() -> None:
        # A lost link (e.g. cut by the store for a full outbox) loses the
        # subscriptions: the cache dropped everything (Cache._lost); link again.
        current = link
        try:
            while True:
                closed = trio.Event()
                current.on_close.append(functools.partial(_set_on_close, closed))
                if not current.closed:
                    await closed.wait()
                log.warning("the node cache lost its link to the store; linking again")
                while True:
                    try:
                        current = await connect()
                        break
                    except Exception as exc:
                        log.warning("the node cache cannot reach the store: %s", exc)
                        await trio.sleep(RELINK_DELAY)
        finally:
            cache.close()

    nursery.start_soon(relink_and_close_on_exit)
    return cache
