"""Issue 10: one cache per node, shared by its executors (in process and in worker processes)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import trio

import droplet
from droplet import DropletReference
from droplet.errors import ProtocolError
from droplet.executor.cache import Cache
from droplet.executor.cache_service import NodeCacheService, RemoteCache
from droplet.executor.segments import SegmentStore, map_segment
from droplet.executor.values import DecodedValues, decode_value, lww_payload
from droplet.lattices import RAW, LWWLattice, encode_lattice
from droplet.links import connect_peer, serve_peers
from droplet.protocol.messages import CacheInvalidate, CacheValue, decode, encode

TIMEOUT = 30
KIB = 1024


def stored(value: Any, ts: int = 1) -> bytes:
    return encode_lattice(LWWLattice(ts, pickle.dumps(value)), dump=RAW)


def blen(lib: Any, value: Any) -> int:
    return len(value)


def poke(lib: Any, value: list[int]) -> list[int]:
    value.append(99)  # must not reach the next reader
    return value


async def poll(check: Any, what: str) -> None:
    """Wait (bounded) until ``check()`` is true."""
    with trio.fail_after(TIMEOUT):
        while True:
            if check():
                return
            await trio.sleep(0.01)


def files(path: Path) -> list[str]:
    return sorted(os.listdir(path))


# ---------------------------------------------------------------- pure parts


def test_lww_payload_finds_the_value_without_copying() -> None:
    data = stored(b"abc" * 1000)
    view = lww_payload(data)
    assert view is not None and isinstance(view, memoryview)
    assert pickle.loads(view) == b"abc" * 1000
    assert view.obj is data  # a view of the encoding, not a copy
    assert lww_payload(b"") is None
    assert lww_payload(data[:-1]) is None  # truncated
    assert lww_payload(data + b"x") is None  # trailing bytes
    # Not LWW: decoded the general way.
    as_set = encode_lattice(droplet.lattices.SetLattice({1}))
    assert lww_payload(as_set) is None
    assert decode_value(as_set, False).reveal() == {1}


def test_decoded_values_keeps_immutables_by_version_and_bytes() -> None:
    decoded = DecodedValues(max_bytes=300)
    first = decoded.decode("k", 1, stored(b"x" * 100))
    found, again = decoded.get("k", 1)
    assert found and again is first
    assert decoded.get("k", 2) == (False, None)  # another version
    mutable = decoded.decode("m", 1, stored([1, 2]))
    assert decoded.get("m", 1) == (False, None)  # never shared
    assert decoded.decode("m", 1, stored([1, 2])) is not mutable
    decoded.decode("a", 1, stored(b"a" * 150))
    decoded.decode("b", 1, stored(b"b" * 150))  # over 300 bytes: "k" goes first
    assert decoded.get("k", 1) == (False, None)
    assert decoded.bytes <= 300


def test_segments_are_created_mapped_and_removed(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path)
    name = store.create(b"hello world")
    mapping = map_segment(name, 11, tmp_path)
    assert bytes(mapping) == b"hello world"
    with pytest.raises(ValueError, match="not 12"):
        map_segment(name, 12, tmp_path)
    with pytest.raises(ValueError, match="not a Droplet"):
        map_segment("../etc/passwd", 1, tmp_path)
    store.unlink(name)
    assert bytes(mapping) == b"hello world"  # a mapping outlives the unlink
    mapping.close()
    store.create(b"a")
    store.create(b"b")
    assert len(store) == 2 and store.total_bytes == 2
    store.close()
    assert files(tmp_path) == []


def test_segments_of_dead_nodes_are_swept(tmp_path: Path) -> None:
    dead = tmp_path / "droplet-999999999-0123abcd-1"  # no such process
    alive = tmp_path / f"droplet-{os.getpid()}-0123abcd-1"
    other = tmp_path / "unrelated-file"
    for path in (dead, alive, other):
        path.write_bytes(b"x")
    SegmentStore(tmp_path)
    assert not dead.exists() and alive.exists() and other.exists()


def test_cache_value_message_round_trips_and_is_checked() -> None:
    msg = CacheValue("k", 3, True, 10, None, "droplet-1-0123abcd-1")
    assert decode(encode(msg))[0] == msg
    with pytest.raises(ProtocolError, match="not both"):
        decode(encode(CacheValue("k", 3, True, 1, b"x", "droplet-1-0123abcd-1")))
    with pytest.raises(ProtocolError, match="negative"):
        decode(encode(CacheValue("k", -1, True)))


# ---------------------------------------------------------------- one node, in process


async def test_executors_of_a_node_share_one_cache_hit_and_miss() -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(2, placement="spread") as cluster:
            cache = cluster.node.cache
            assert cache is not None
            assert all(ex.cache is cache for ex in cluster.node.executors)
            async with cluster.client() as cloud:
                await cloud.put_object("v", b"y" * (100 * KIB))
                fn = await cloud.register(blen, "blen")
                before = cache.statistics()
                assert await (await fn(DropletReference("v"))).get() == 100 * KIB
                middle = cache.statistics()
                assert middle.misses == before.misses + 1 and middle.fetches == 1
                for _ in range(4):  # both executors (spread), all from the one cache
                    assert await (await fn(DropletReference("v"))).get() == 100 * KIB
                after = cache.statistics()
                assert after.misses == middle.misses and after.hits >= middle.hits + 4
                assert after.fetches == 1 and after.entries >= 1
                assert after.bytes >= 100 * KIB
                assert after.decoded_hits >= 3  # the same bytes object, not a copy
                assert cluster.node.statistics()["cache.hits"] == after.hits


async def test_a_mutable_value_is_a_private_copy_for_each_call() -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1) as cluster, cluster.client() as cloud:
            await cloud.put_object("list", [1, 2])
            fn = await cloud.register(poke, "poke")
            for _ in range(3):
                assert await (await fn(DropletReference("list"))).get() == [1, 2, 99]


async def test_eviction_by_bytes_unsubscribes() -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1, cache_size=250 * KIB) as cluster:
            cache = cluster.node.cache
            assert cache is not None and cache.max_bytes == 250 * KIB
            async with cluster.client() as cloud:
                fn = await cloud.register(blen, "blen")
                for i in range(4):
                    await cloud.put_object(f"e{i}", bytes(100 * KIB))
                    assert await (await fn(DropletReference(f"e{i}"))).get() == 100 * KIB
                stats = cache.statistics()
                assert stats.bytes <= 250 * KIB and stats.evictions == 2
                assert cache.peek("e0") is None and cache.peek("e3") is not None
                # The evicted keys are no longer pushed to the cache.
                kvs = cluster.node.kvs
                assert kvs is not None
                await poll(lambda: kvs.statistics().subscribed_keys <= 2, "unsubscribes")
                # An evicted key is read again on its next use (a miss).
                misses = stats.misses
                assert await (await fn(DropletReference("e0"))).get() == 100 * KIB
                assert cache.statistics().misses == misses + 1


async def test_a_value_bigger_than_the_cache_is_served_not_kept() -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1, cache_size="10K") as cluster:
            async with cluster.client() as cloud:
                await cloud.put_object("huge", bytes(50 * KIB))
                fn = await cloud.register(blen, "blen")
                assert await (await fn(DropletReference("huge"))).get() == 50 * KIB
                assert cluster.node.cache is not None
                assert cluster.node.cache.statistics().entries == 0


async def test_a_write_elsewhere_is_pushed_and_never_read_stale() -> None:
    def read(lib: Any, key: str) -> Any:
        return lib.get(key)

    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(2) as cluster, cluster.client() as cloud:
            cache = cluster.node.cache
            assert cache is not None
            fn = await cloud.register(read, "read")
            await cloud.put_object("w", "one")
            assert await (await fn("w")).get() == "one"
            for n in range(5):
                before = cache.statistics().updates
                # The client writes straight to the store (another node, as far
                # as this cache knows); the store pushes the change.
                await cloud.put_object("w", f"v{n}")
                await poll(lambda b=before: cache.statistics().updates > b, "the push")
                assert await (await fn("w")).get() == f"v{n}"  # no stale read
            assert cache.statistics().fetches == 1  # pushes refreshed it, no re-reads


async def test_concurrent_misses_read_the_store_once() -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(2, placement="spread") as cluster:
            async with cluster.client() as cloud:
                await cloud.put_object("once", bytes(200 * KIB))
                fn = await cloud.register(blen, "blen")
                for _ in range(2):  # both executors load the function first
                    assert await (await fn("warm")).get() == 4
                kvs = cluster.node.kvs
                assert kvs is not None
                gets = kvs.statistics().gets
                futures = [await fn(DropletReference("once")) for _ in range(6)]
                assert [await f.get() for f in futures] == [200 * KIB] * 6
                assert cluster.node.cache is not None
                assert cluster.node.cache.statistics().fetches == 1
                # One read of the key (plus the result reads of the calls).
                assert kvs.statistics().gets - gets <= 1 + 6


# ---------------------------------------------------------------- worker processes' side


async def worker(url: str, nursery: trio.Nursery, segments: Path) -> RemoteCache:
    """A worker's cache on a link to the node cache at ``url`` (taking its invalidations)."""
    holder: list[RemoteCache] = []

    async def handle(peer: Any, msg: Any, request_id: int) -> None:
        assert type(msg) is CacheInvalidate
        holder[0].invalidate(msg.keys)

    holder.append(RemoteCache(await connect_peer(url, nursery, handler=handle),
                              segment_dir=segments))
    return holder[0]


async def test_worker_processes_read_large_values_through_shared_memory(
        tmp_path: Path) -> None:
    """RemoteCache <-> NodeCacheService over a real link; segments removed after."""
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1) as cluster, cluster.client() as cloud:
            await cloud.put_object("big", b"z" * (300 * KIB))
            await cloud.put_object("small", "tiny")
            await cloud.put_object("mut", bytearray(b"m" * (100 * KIB)))
            async with trio.open_nursery() as nursery:
                cache = Cache(None, shared_memory=True)
                cache.segments = SegmentStore(tmp_path)
                cache.attach(await connect_peer(cluster.address, nursery,
                                                handler=cache.handle))
                service = NodeCacheService(cache)
                url = await nursery.start(serve_peers, "inproc://node-cache-test",
                                          service.handle)
                workers = [await worker(url, nursery, tmp_path) for _ in range(2)]
                first = [await w.get_value("big") for w in workers]
                assert first[0] == b"z" * (300 * KIB) == first[1]
                assert cache.statistics().fetches == 1  # one read for both workers
                assert len(files(tmp_path)) == 1  # one segment for the node
                again = await workers[0].get_value("big")
                assert again is first[0]  # warm: the same object, no copy
                assert workers[0].transfers == 1 and workers[0].hits == 1  # held: no asking
                assert await workers[1].get_value("small") == "tiny"
                a, b = await workers[0].get_value("mut"), await workers[0].get_value("mut")
                assert a == b and a is not b  # mutable: a private copy each
                assert await workers[0].get_value("absent") is None
                # A write through a worker: its next read sees it (read your writes),
                await workers[1].put("big", LWWLattice.now(b"new"))
                assert await workers[1].get_value("big") == b"new"
                # and the other worker as soon as the node's invalidation reaches it.
                await poll(lambda: workers[0].peek_value("big") == (False, None),
                           "the invalidation")
                assert await workers[0].get_value("big") == b"new"
                assert service.invalidations >= 1
                # A write elsewhere (the client): pushed to the node, passed on.
                await cloud.put_object("small", "changed")
                await poll(lambda: workers[1].peek_value("small") == (False, None),
                           "the invalidation")
                assert await workers[1].get_value("small") == "changed"
                assert await workers[1].get("small") == cache.peek("small")
                assert len(files(tmp_path)) <= 1  # the old segment is gone
                for w in workers:
                    w.close()
                cache.close()
                assert files(tmp_path) == []
                nursery.cancel_scope.cancel()


async def test_a_vanished_segment_falls_back_to_the_bytes(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1) as cluster, cluster.client() as cloud:
            await cloud.put_object("big", b"q" * (100 * KIB))
            async with trio.open_nursery() as nursery:
                cache = Cache(None, shared_memory=True)
                cache.segments = SegmentStore(tmp_path)
                cache.attach(await connect_peer(cluster.address, nursery,
                                                handler=cache.handle))
                entry = await cache.entry("big")
                assert entry is not None
                found = cache.segment_of("big", entry)
                assert found is not None and found[1] == ""  # bytes: the lattice itself
                os.unlink(tmp_path / found[0])  # as if evicted between reply and mapping
                url = await nursery.start(serve_peers, "inproc://node-cache-gone",
                                          NodeCacheService(cache).handle)
                remote = await worker(url, nursery, tmp_path)
                assert await remote.get_value("big") == b"q" * (100 * KIB)
                remote.close()
                cache.close()
                nursery.cancel_scope.cancel()


async def test_numpy_arrays_are_shared_read_only() -> None:
    np = pytest.importorskip("numpy")

    def writable(lib: Any, array: Any) -> bool:
        try:
            array[0] = 7
        except ValueError:
            return False
        return True

    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1) as cluster, cluster.client() as cloud:
            await cloud.put_object("arr", np.zeros(100_000))
            fn = await cloud.register(writable, "writable")
            for _ in range(3):  # read-only, and the same array each time
                assert await (await fn(DropletReference("arr"))).get() is False
            assert cluster.node.cache is not None
            assert cluster.node.cache.statistics().decoded_hits >= 2
            assert float((await cloud.get_object("arr")).sum()) == 0.0
            # Object arrays hold mutable elements: a private, writable copy each.
            await cloud.put_object("objs", np.array([1, 2], dtype=object))
            for _ in range(2):
                assert await (await fn(DropletReference("objs"))).get() is True


def test_out_of_band_layout_round_trips_numpy_without_copies() -> None:
    np = pytest.importorskip("numpy")
    from droplet.executor.oob import load_out_of_band, out_of_band

    array = np.arange(100_000, dtype=np.int64).reshape(1000, 100)
    parts = out_of_band(pickle.dumps(array, protocol=5))
    assert parts is not None
    data = bytes(b"".join(bytes(p) for p in parts))
    back = load_out_of_band(data)
    assert (back == array).all() and back.dtype == array.dtype
    assert not back.flags.writeable and not back.flags.owndata  # a view of ``data``
    # Plain containers of arrays too (the container is rebuilt, the arrays are views).
    both = out_of_band(pickle.dumps({"numpy": array}))
    assert both is not None
    assert not load_out_of_band(b"".join(bytes(p) for p in both))["numpy"].flags.writeable
    # Not numpy, or numpy with anything needing other code: left as it is.
    assert out_of_band(pickle.dumps(b"x" * 1000)) is None
    from collections import OrderedDict
    assert out_of_band(pickle.dumps(OrderedDict(numpy=array))) is None
    assert out_of_band(pickle.dumps(np.array([1, None], dtype=object))) is None
    with pytest.raises(ValueError, match="not an out-of-band"):
        load_out_of_band(b"x" * 100)
    with pytest.raises(ValueError, match="past the end"):
        load_out_of_band(data[:-10])


async def test_worker_processes_get_numpy_arrays_as_views_of_shared_memory(
        tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1) as cluster, cluster.client() as cloud:
            await cloud.put_object("arr", np.ones(50_000))
            async with trio.open_nursery() as nursery:
                cache = Cache(None, shared_memory=True)
                cache.segments = SegmentStore(tmp_path)
                cache.attach(await connect_peer(cluster.address, nursery,
                                                handler=cache.handle))
                url = await nursery.start(serve_peers, "inproc://node-cache-numpy",
                                          NodeCacheService(cache).handle)
                workers = [await worker(url, nursery, tmp_path) for _ in range(2)]
                arrays = [await w.get_value("arr") for w in workers]
                for array in arrays:
                    assert float(array.sum()) == 50_000.0
                    assert not array.flags.writeable and not array.flags.owndata
                assert await workers[0].get_value("arr") is arrays[0]
                # The encoded lattice is still there for reads that need it.
                assert await workers[0].get("arr") == cache.peek("arr")
                assert len(files(tmp_path)) == 1
                del arrays
                for w in workers:
                    w.close()
                cache.close()
                assert files(tmp_path) == []
                nursery.cancel_scope.cancel()


def test_the_summary_lists_large_entries_largest_first() -> None:
    cache = Cache(None)
    cache.replace("small", stored(b"s"))
    cache.replace("mid", stored(b"m" * (100 * KIB)))
    cache.replace("large", stored(b"l" * (300 * KIB)))
    sizes = {k: len(cache.peek(k) or b"") for k in ("small", "mid", "large")}
    assert cache.summary(64 * KIB) == {"mid": sizes["mid"], "large": sizes["large"]}
    assert cache.summary(64 * KIB, limit=1) == {"large": sizes["large"]}
    assert cache.summary(0) == sizes
    cache.replace("large", stored(b"now small"))
    assert list(cache.summary(64 * KIB)) == ["mid"]
    cache.close()
    assert cache.summary(0) == {} and cache.statistics().bytes == 0


async def test_hostile_cache_messages_get_errors_and_the_node_serves_on() -> None:
    from droplet.errors import DropletError
    from droplet.protocol.messages import CacheGet, CachePut

    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1) as cluster, cluster.client() as cloud:
            async with trio.open_nursery() as nursery:
                peer = await connect_peer(cluster.address, nursery)
                with pytest.raises(DropletError):
                    await peer.request(CachePut("k", b"not a lattice"), 10)
                absent = await peer.request(CacheGet("nothing", 5, True, True), 10)
                assert absent == CacheValue("nothing", 0, False)
                with pytest.raises(ProtocolError, match="does not serve"):
                    await peer.request(CacheInvalidate(["x"]), 10)
                nursery.cancel_scope.cancel()
            fn = await cloud.register(blen, "blen")
            await cloud.put_object("ok", b"fine")
            assert await (await fn(DropletReference("ok"))).get() == 4
