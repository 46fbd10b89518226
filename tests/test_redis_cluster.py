"""The Redis backend on a 3-master Redis Cluster (no replicas), started by the fixture.

Keys spread over the masters by hash slot; a put through one Droplet storage
node is read, and pushed to subscribers, through another node that was given a
different Cluster node; a stale slot map is repaired by following ``MOVED``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

from droplet.kvs.backends.redis import RedisBackend
from droplet.kvs.backends.redis.resp import key_slot
from droplet.kvs.service import KvsService
from droplet.lattices import RAW, LWWLattice, SetLattice, decode_lattice, encode_lattice
from droplet.links import connect_peer, serve_peers
from droplet.protocol.messages import KvsGet, KvsPut, KvsUpdate
from droplet.rpc import Peer
from droplet.testing.redis_servers import RedisServer, redis_available, start_redis_cluster

pytestmark = pytest.mark.slow  # starts redis-server processes

GUARD = 15
KEYS = 300


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RedisServer]]:
    if not redis_available():
        pytest.skip("redis-server is not installed (apt-get install redis-server); "
                    "CI installs it, so these tests run there")
    with start_redis_cluster(3) as servers:
        yield servers


def enc(lattice: Any) -> bytes:
    return encode_lattice(lattice, dump=RAW)


@asynccontextmanager
async def storage_nodes(urls: list[str]) -> AsyncIterator[list[tuple[KvsService, str]]]:
    async with trio.open_nursery() as nursery:
        nodes = []
        for i, url in enumerate(urls):
            service = KvsService(nursery, RedisBackend(url))
            await nursery.start(service.serve)
            address = await nursery.start(partial(serve_peers, f"inproc://cluster-kvs-{i}",
                                                  service.handle))
            nodes.append((service, address))
        yield nodes
        nursery.cancel_scope.cancel()


async def test_keys_spread_over_the_masters_and_read_through_another_node(
    cluster: list[RedisServer], record_property: Any,
) -> None:
    urls = [f"redis://127.0.0.1:{cluster[0].port}?prefix=spread:",
            f"redis://127.0.0.1:{cluster[2].port}?prefix=spread:"]
    async with storage_nodes(urls) as [(first, one), (_, two)], trio.open_nursery() as nursery:
        writer, reader = await connect_peer(one, nursery), await connect_peer(two, nursery)
        with trio.fail_after(GUARD):
            for i in range(KEYS):
                await writer.request(KvsPut(f"key-{i}", enc(LWWLattice(1, b"%d" % i, "w"))))
            for i in range(KEYS):
                reply = await reader.request(KvsGet(f"key-{i}"))
                assert decode_lattice(reply.lattice, load=RAW).reveal() == b"%d" % i
        backend = first.backend
        assert isinstance(backend, RedisBackend)
        # where the keys are, asked of each master itself
        spread = {server.port: int(server.cli("EVAL", "return #redis.call('KEYS', "
                                              "'spread:key-*')", "0"))
                  for server in cluster}
        record_property("key_spread", spread)
        print(f"\n{KEYS} keys over 3 masters: {spread}")
        assert sum(spread.values()) == KEYS
        assert all(count > KEYS // 6 for count in spread.values()), spread
        # the slot rule the client routes by agrees with the cluster's own
        client = backend._client
        assert client is not None
        routed = Counter(client.node_for(b"spread:key-%d" % i)[1] for i in range(KEYS))
        assert dict(routed) == spread
        assert key_slot(b"spread:key-0") == int(cluster[0].cli("CLUSTER", "KEYSLOT",
                                                                "spread:key-0"))
        await writer.aclose()
        await reader.aclose()


async def test_a_write_through_one_node_is_pushed_to_a_cache_of_another(
    cluster: list[RedisServer],
) -> None:
    urls = [f"redis://127.0.0.1:{server.port}?prefix=push:" for server in cluster[:2]]
    async with storage_nodes(urls) as [(_, one), (_, two)], trio.open_nursery() as nursery:
        send, receive = trio.open_memory_channel[KvsUpdate](10)

        async def on_update(peer: Peer, msg: Any, request_id: int) -> None:
            await send.send(msg)

        cache = await connect_peer(two, nursery, handler=on_update)
        writer = await connect_peer(one, nursery)
        for i in range(5):  # keys on different masters
            await writer.request(KvsPut(f"k{i}", enc(SetLattice({b"old"}))))
            await cache.request(KvsGet(f"k{i}", None, True))  # caches subscribe to held keys
            await writer.request(KvsPut(f"k{i}", enc(SetLattice({b"new"}))))
            with trio.fail_after(GUARD):
                update = await receive.receive()
                while b"new" not in decode_lattice(update.lattice, load=RAW).reveal():
                    update = await receive.receive()  # the first put's notice, late
            assert update.key == f"k{i}"
        await cache.aclose()
        await writer.aclose()


async def test_hash_tags_co_locate_and_a_stale_slot_map_follows_moved(
    cluster: list[RedisServer],
) -> None:
    async def ignore(key: str, data: bytes) -> None:
        pass

    backend = RedisBackend(f"redis://127.0.0.1:{cluster[1].port}?prefix=moved:")
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run, ignore)
        client = backend._client
        assert client is not None and client.cluster and len(client.masters()) == 3
        a, b = backend.redis_key("{user7}.cart"), backend.redis_key("{user7}.profile")
        assert client.node_for(a) == client.node_for(b)
        # point every slot at one master: the others answer MOVED
        client._slots = [client.masters()[0]] * len(client._slots)
        for i in range(20):
            await backend.put(f"m{i}", enc(SetLattice({b"v"})))
        assert len(set(client._slots)) == 3  # the map was re-read
        for i in range(20):
            assert await backend.get(f"m{i}") == enc(SetLattice({b"v"}))
        nursery.cancel_scope.cancel()


async def test_a_slot_being_migrated_is_followed_with_asking(
    cluster: list[RedisServer],
) -> None:
    """Mid-migration the old owner answers ASK for keys it no longer has; the put goes
    to the importing node after ASKING, then the migration completes."""
    async def ignore(key: str, data: bytes) -> None:
        pass

    backend = RedisBackend(f"redis://127.0.0.1:{cluster[0].port}?prefix=ask:")
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run, ignore)
        client = backend._client
        assert client is not None
        rkey = backend.redis_key("migrating")
        slot = key_slot(rkey)
        by_port = {server.port: server for server in cluster}
        source = by_port[client.node_for(rkey)[1]]
        target = next(server for server in cluster if server is not source)
        source_id, target_id = (server.cli("CLUSTER", "MYID") for server in (source, target))
        assert target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id) == "OK"
        assert source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id) == "OK"
        try:
            await backend.put("migrating", enc(SetLattice({b"a"})))  # absent on the source: ASK
            assert target.cli("-c", "GET", rkey.decode()) != ""
        finally:
            for server in cluster:  # finish the migration: the target owns the slot
                server.cli("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        assert target.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot)) == "1"
        assert source.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot)) == "0"
        await backend.put("migrating", enc(SetLattice({b"b"})))  # MOVED to the new owner
        assert decode_lattice(await backend.get("migrating") or b"",
                              load=RAW).reveal() == {b"a", b"b"}
        nursery.cancel_scope.cancel()


async def test_two_embedded_droplet_clusters_on_one_redis_cluster(
    cluster: list[RedisServer],
) -> None:
    """Functions, DAGs, results and user keys of two Droplet deployments given different
    Cluster nodes: what one writes, the other reads."""
    import droplet

    urls = [f"redis://127.0.0.1:{server.port}?prefix=e2e:" for server in (cluster[0],
                                                                         cluster[2])]
    async with droplet.open_local_cluster(executors=1, storage=urls[0]) as a, \
            droplet.open_local_cluster(executors=1, storage=urls[1]) as b, \
            a.client() as cloud_a, b.client() as cloud_b:
        await cloud_a.register(lambda lib, k: lib.get(k) * 2, "double_key")
        await cloud_a.register(lambda _, x: x + 1, "inc")
        await cloud_a.register(lambda _, x: x * x, "square")
        await cloud_a.register_dag("inc_square", ["inc", "square"], [("inc", "square")])
        assert await (await cloud_a.call_dag("inc_square", {"inc": [2]})).get(GUARD) == 9
        for i in range(20):
            await cloud_b.put_object(f"n{i}", i)
        for i in range(20):
            future = await cloud_a.exec_func("double_key", [f"n{i}"])
            assert await future.get(GUARD) == 2 * i
        assert await cloud_a.get_object("n7") == 7
        await cloud_b.put_object("tagged", SetLattice({1}))
        await cloud_a.put_object("tagged", SetLattice({2}))
        assert (await cloud_b.get_object("tagged")).reveal() == {1, 2}
