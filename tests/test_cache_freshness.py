"""Issue 10 review: a worker never keeps a value that an invalidation (or its own
write) may have made stale, and a lost link drops what it can no longer keep fresh."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from droplet.executor.cache import Cache
from droplet.executor.cache_service import RemoteCache
from droplet.lattices import RAW, LWWLattice, encode_lattice
from droplet.protocol.messages import CacheGet, CachePut, CacheValue, KvsStored

TIMEOUT = 10


async def poll(check: Callable[[], bool]) -> None:
    while True:
        if check():
            return
        await trio.sleep(0.01)


def stored(value: Any, ts: int = 1) -> bytes:
    return encode_lattice(LWWLattice(ts, pickle.dumps(value)), dump=RAW)


class FakeNode:
    """The node's side of a worker link: one key, its version and encoding.

    ``during`` runs while a CacheGet is in flight, after the node chose its
    answer: what the worker's reader may process before the reading task resumes.
    """

    def __init__(self) -> None:
        self.on_close: list[Callable[[Any], None]] = []
        self.version = 1
        self.data = stored("old")
        self.during: Callable[[], Any] | None = None
        self.gets = 0

    def change(self, value: Any) -> None:
        self.version += 1
        self.data = stored(value, self.version)

    async def request(self, msg: Any, timeout: float | None = None) -> Any:
        if type(msg) is CachePut:
            self.version += 1
            self.data = msg.lattice
            return KvsStored("LWWLattice")
        assert type(msg) is CacheGet
        self.gets += 1
        if msg.version == self.version:
            reply = CacheValue(msg.key, self.version, True, len(self.data))
        else:
            reply = CacheValue(msg.key, self.version, True, len(self.data), data=self.data)
        during, self.during = self.during, None
        if during is not None:
            result = during()
            if result is not None:
                await result
        return reply


async def test_an_invalidation_read_before_the_reply_is_not_lost() -> None:
    node = FakeNode()
    remote = RemoteCache(node)  # type: ignore[arg-type]

    def write_elsewhere() -> None:  # the node changes, its invalidation overtakes the reply
        node.change("new")
        remote.invalidate(["k"])

    node.during = write_elsewhere
    with trio.fail_after(TIMEOUT):
        assert await remote.get_value("k") == "old"  # concurrent with the write: either
        assert await remote.get_value("k") == "new"  # after it: never the old value
        assert remote.peek_value("k") == (True, "new")


async def test_a_refresh_that_races_an_invalidation_still_answers() -> None:
    node = FakeNode()
    remote = RemoteCache(node)  # type: ignore[arg-type]
    with trio.fail_after(TIMEOUT):
        assert await remote.get_value("k") == "old"
        # "unchanged" is answered, then the invalidation of that version is read first.
        node.during = lambda: remote.invalidate(["k"])
        assert await remote.refresh("k") == node.data
        node.change("new")
        assert await remote.get_value("k") == "new"


async def test_a_read_in_flight_during_the_workers_own_write_is_not_kept() -> None:
    node = FakeNode()
    remote = RemoteCache(node)  # type: ignore[arg-type]
    answer = trio.Event()

    async def slow_reply() -> None:
        await answer.wait()

    node.during = slow_reply
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(remote.get_value, "k")  # answered "old", held up
            await trio.testing.wait_all_tasks_blocked()
            await remote.put("k", LWWLattice(5, "mine"))
            answer.set()
        assert await remote.get_value("k") == "mine"  # read your writes


async def test_a_worker_whose_node_link_closed_holds_nothing() -> None:
    node = FakeNode()
    remote = RemoteCache(node)  # type: ignore[arg-type]
    with trio.fail_after(TIMEOUT):
        assert await remote.get_value("k") == "old"
    assert remote.peek_value("k") == (True, "old")
    for callback in node.on_close:  # its invalidations are lost with it
        callback(node)
    assert remote.peek_value("k") == (False, None)


class FakeStore:
    def __init__(self) -> None:
        self.on_close: list[Callable[[Any], None]] = []

    async def send(self, msg: Any) -> None:
        pass


def test_a_cache_whose_store_link_closed_drops_everything() -> None:
    store = FakeStore()
    cache = Cache(store)  # type: ignore[arg-type]
    changed: list[str] = []
    cache.on_change = changed.append
    cache.replace("a", stored("x"))
    cache.replace("b", stored("y"))
    changed.clear()
    for callback in store.on_close:  # no more pushes: nothing stays fresh
        callback(store)
    assert cache.peek("a") is None and cache.peek("b") is None
    assert sorted(changed) == ["a", "b"]  # the node's workers are told too
    assert cache.statistics().bytes == 0


# ---------------------------------------------------------------- the node's numpy unpickler


class _Call:
    """Pickles as ``fn(*args)``: a hostile value naming only allowed numpy globals."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> Any:
        return self.fn, self.args


def test_the_node_allocates_nothing_a_hostile_numpy_pickle_asks_for() -> None:
    np = pytest.importorskip("numpy")
    from droplet.executor.oob import out_of_band

    reconstruct = pickle.loads(pickle.dumps(np.arange(3), protocol=4)).__reduce__()[0]
    big = (1 << 20,)
    hostile = [
        # ndarray(shape, dtype) called directly: 1 MiB of the node's uninitialised
        # memory would be written into a segment that workers read.
        _Call(np.ndarray, big, "u1"),
        # _reconstruct with a shape of its own: allocates it too.
        _Call(reconstruct, np.ndarray, big, b"u1"),
        # Python objects: no reason to load them in the node at all.
        np.array([1, "two", None], dtype=object),
    ]
    for value in hostile:
        payload = pickle.dumps(value, protocol=5)
        assert len(payload) < 1000
        assert out_of_band(payload) is None, value
    # Arrays as numpy pickles them still get the out-of-band layout.
    for protocol in (4, 5):
        assert out_of_band(pickle.dumps(np.arange(1000.0), protocol=protocol)) is not None


async def test_a_segment_that_cannot_be_written_is_sent_as_bytes(tmp_path: Path) -> None:
    from droplet.executor.cache_service import NodeCacheService
    from droplet.executor.segments import SegmentStore

    cache = Cache(None, shared_memory=True)
    cache.segments = SegmentStore(tmp_path / "shm")  # as if /dev/shm were full or gone
    data = stored(b"x" * (100 * 1024))
    cache.replace("big", data)
    peer = FakeStore()
    peer.state = {}  # type: ignore[attr-defined]
    reply = await NodeCacheService(cache).handle(peer, CacheGet("big", 0, False), 1)  # type: ignore[arg-type]
    assert reply.segment is None and reply.data == data
    cache.close()


class NodeLink:
    """A worker's link to its node's cache service, in process (requests handled inline)."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.state: dict[str, Any] = {}
        self.on_close: list[Callable[[Any], None]] = []
        self.remote = "worker"
        self.worker: RemoteCache | None = None

    async def request(self, msg: Any, timeout: float | None = None) -> Any:
        return await self.service.handle(self, msg, 1)

    def post(self, msg: Any) -> None:
        assert self.worker is not None
        self.worker.invalidate(msg.keys)


class Store(FakeStore):
    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, bytes] = {}

    async def request(self, msg: Any, timeout: float | None = None) -> Any:
        from droplet.protocol.messages import KvsValue

        return KvsValue(msg.key, self.data.get(msg.key))


async def test_a_value_the_node_does_not_keep_is_not_kept_by_the_worker() -> None:
    from droplet.executor.cache_service import NodeCacheService

    store = Store()
    cache = Cache(store, max_bytes=1000)  # type: ignore[arg-type]
    link = NodeLink(NodeCacheService(cache))
    remote = link.worker = RemoteCache(link)  # type: ignore[arg-type]
    store.data["huge"] = stored("a" * 5000)
    with trio.fail_after(TIMEOUT):
        assert await remote.get_value("huge") == "a" * 5000
        assert cache.peek("huge") is None  # too big: served, not kept, not subscribed
        # So no push reaches the node and no invalidation the worker:
        store.data["huge"] = stored("b" * 5000, 2)
        assert await remote.get_value("huge") == "b" * 5000
        # A value the node keeps is held by the worker (and invalidated through it).
        store.data["small"] = stored("s")
        assert await remote.get_value("small") == "s"
        assert remote.peek_value("small") == (True, "s")
        await cache.update("small", stored("t", 2))
        assert await remote.get_value("small") == "t"


async def test_a_node_cache_whose_store_link_was_cut_links_again() -> None:
    import droplet
    from droplet.executor.cache_service import open_node_cache

    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1) as cluster, cluster.client() as cloud:
            await cloud.put_object("k", "one")
            async with trio.open_nursery() as nursery:
                cache = await open_node_cache(nursery, cluster.address, token=None,
                                              max_bytes=1 << 20, shared_memory=False)
                assert await cache.get_value("k") == "one"
                first = cache._kvs
                assert first is not None
                await first.aclose()  # as the store does to a subscriber not reading
                assert cache.peek("k") is None  # no push would reach it any more
                await poll(lambda: cache._kvs is not first)
                assert await cache.get_value("k") == "one"  # read (and subscribed) again
                updates = cache.updates
                await cloud.put_object("k", "two")
                await poll(lambda: cache.updates > updates)
                assert await cache.get_value("k") == "two"
                nursery.cancel_scope.cancel()
