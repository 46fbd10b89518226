"""The Redis storage backend against a real redis-server (started by the fixtures).

The merge property: whatever sequence of puts reaches Redis, through whichever
of two storage nodes, every put returns what the in-memory store returns for
the same sequence, and the key ends up holding the same canonical encoding.
Then the service-level behaviour across storage nodes: concurrent merges into
one key, waiting reads and subscribed caches woken by a write through the
other node, and the connection details (AUTH/SELECT, TLS, NOSCRIPT, reconnects).
"""

from __future__ import annotations

import itertools
import pickle
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.lowlevel
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_lattices import KINDS, strategy

import droplet
from droplet.kvs.backends.redis import RedisBackend, RedisError, StorageUnavailable
from droplet.kvs.service import KvsService
from droplet.kvs.store import Store
from droplet.lattices import (
    RAW,
    LWWLattice,
    MapLattice,
    MaxLattice,
    MultiKeyCausalLattice,
    SetLattice,
    SingleKeyCausalLattice,
    VectorClock,
    decode_lattice,
    encode_lattice,
)
from droplet.links import connect_peer, serve_peers
from droplet.protocol.messages import KvsGet, KvsPut, KvsStored, KvsUpdate, KvsValue
from droplet.rpc import Peer
from droplet.testing.redis_servers import RedisServer, start_redis

pytestmark = pytest.mark.slow  # starts redis-server processes

GUARD = 15  # seconds: a bound for each wait, never an expected duration


def enc(lattice: Any) -> bytes:
    return encode_lattice(lattice, dump=RAW)


def revealed(data: bytes | None) -> Any:
    assert data is not None
    return decode_lattice(data, load=RAW).reveal()


@asynccontextmanager
async def backends(url: str, count: int = 2) -> AsyncIterator[list[RedisBackend]]:
    """``count`` running backends on one Redis, as ``count`` storage nodes would have."""
    async def ignore(key: str, data: bytes) -> None:
        pass

    async with trio.open_nursery() as nursery:
        started = []
        for _ in range(count):
            backend = RedisBackend(url)
            await nursery.start(backend.run, ignore)
            started.append(backend)
        yield started
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def storage_nodes(url: str, count: int = 2) -> AsyncIterator[list[tuple[KvsService, str]]]:
    """``count`` KVS services on one Redis, each served at its own inproc:// address."""
    async with trio.open_nursery() as nursery:
        nodes = []
        for _ in range(count):
            service = KvsService(nursery, RedisBackend(url))
            await nursery.start(service.serve)
            address = await nursery.start(partial(serve_peers, f"inproc://redis-kvs-{next(_example)}",
                                                  service.handle))
            nodes.append((service, address))
        yield nodes
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- merges

_example = itertools.count()


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_merges_in_redis_agree_with_the_in_memory_store(
    kind: str, redis_url: str, data: st.DataObject,
) -> None:
    puts = [enc(lat) for lat in data.draw(st.lists(strategy(kind, "raw"), min_size=1,
                                                   max_size=6))]
    expected = Store()
    key = f"k-{next(_example)}"  # a fresh key per example (the prefix is per test)

    async def check() -> None:
        async with backends(redis_url) as (one, two):
            for i, put in enumerate(puts):
                backend = one if i % 2 == 0 else two
                assert await backend.put(key, put) == expected.put(key, put)
            assert await one.get(key) == await two.get(key) == expected.get(key)

    trio.run(check)


@pytest.mark.parametrize(("older", "newer"), [
    (LWWLattice(-5, b"a", "w"), LWWLattice(3, b"b", "w")),
    (LWWLattice(-(2**63), b"a", "w"), LWWLattice(-(2**63) + 1, b"b", "w")),
    (LWWLattice(1_700_000_000_000_000_000, b"z", "w"), LWWLattice(1_700_000_000_000_000_001,
                                                                b"a", "w")),
    (LWWLattice(2**64, b"a", "w"), LWWLattice(2**65, b"b", "w")),  # past 64 bits: fallback
    (LWWLattice(7, b"a", "w\u00e9"), LWWLattice(7, b"a", "x")),  # writer, by code point
])
async def test_lww_order_covers_the_whole_timestamp_range(
    redis_url: str, older: LWWLattice, newer: LWWLattice,
) -> None:
    async with backends(redis_url) as (one, two):
        assert (await one.put("k", enc(older)))[1] == enc(older)
        assert await two.put("k", enc(newer)) == ("LWW", enc(newer))
        assert await one.put("k", enc(older)) == ("LWW", None)
        assert await two.get("k") == enc(newer)


async def test_which_types_merge_in_lua_and_which_by_compare_and_set(redis_url: str) -> None:
    async with backends(redis_url, 1) as (backend,):
        for key, first, second in [
            ("set", SetLattice({b"a"}), SetLattice({b"b"})),
            ("clock", VectorClock({"n": 1}), VectorClock({"m": 2})),
            ("causal", SingleKeyCausalLattice(VectorClock({"n": 1}), {b"x"}),
             SingleKeyCausalLattice(VectorClock({"m": 1}), {b"y"})),
        ]:
            await backend.put(key, enc(first))
            await backend.put(key, enc(second))
        assert (backend.script_merges, backend.cas_merges) == (6, 0)
        assert revealed(await backend.get("clock")) == {"n": 1, "m": 2}
        assert revealed(await backend.get("causal")) == {b"x", b"y"}
        # maps and multi-key causal lattices: read, merged here, written if unchanged
        await backend.put("map", enc(MapLattice({"a": MaxLattice(1)})))
        await backend.put("map", enc(MapLattice({"b": MaxLattice(2)})))
        assert backend.cas_merges == 1  # the first put of a key is a plain script write
        # a counter Lua cannot hold exactly (past 2**53) falls back too
        await backend.put("clock", enc(VectorClock({"n": 2**60})))
        assert backend.cas_merges == 2
        assert revealed(await backend.get("clock")) == {"n": 2**60, "m": 2}


async def test_type_mismatch_and_garbage_are_refused_and_change_nothing(
    redis_url: str, redis_server: RedisServer,
) -> None:
    async with backends(redis_url, 1) as (backend,):
        await backend.put("k", enc(LWWLattice(1, b"v", "w")))
        with pytest.raises(droplet.LatticeTypeError, match="holds a LWW lattice"):
            await backend.put("k", enc(SetLattice({b"x"})))
        with pytest.raises(droplet.LatticeTypeError, match="holds a LWW lattice"):
            await backend.put("k", enc(MapLattice({"a": MaxLattice(1)})))  # CAS path too
        with pytest.raises(droplet.ProtocolError):
            await backend.put("k", b"not a lattice")
        assert revealed(await backend.get("k")) == b"v"
        # a key someone else wrote is reported as such, not taken for a lattice
        redis_server.cli("SET", backend.redis_key("foreign").decode(), "hello")
        with pytest.raises(droplet.StorageError, match="not a Droplet lattice"):
            await backend.put("foreign", enc(SetLattice({b"x"})))
        assert await backend.delete("k") is True
        assert await backend.delete("k") is False
        assert await backend.get("k") is None


async def test_concurrent_merges_into_one_set_key_through_two_storage_nodes(
    redis_url: str,
) -> None:
    async with storage_nodes(redis_url) as nodes, trio.open_nursery() as nursery:
        peers = [await connect_peer(address, nursery) for _, address in nodes]

        async def add(i: int) -> None:
            reply = await peers[i % 2].request(KvsPut("s", enc(SetLattice({b"e%d" % i}))))
            assert reply == KvsStored("Set")

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as writers:
                for i in range(200):
                    writers.start_soon(add, i)
        for peer in peers:
            reply = await peer.request(KvsGet("s"))
            assert revealed(reply.lattice) == {b"e%d" % i for i in range(200)}
        for peer in peers:
            await peer.aclose()


@pytest.mark.parametrize("kind", ["SingleKeyCausal", "MultiKeyCausal"])
async def test_concurrent_causal_versions_are_kept_side_by_side(redis_url: str,
                                                                kind: str) -> None:
    """Single-key causal lattices merge in Lua, multi-key ones by compare-and-set:
    either way no concurrent version may be lost."""
    async with backends(redis_url) as (one, two):
        def version(i: int) -> bytes:
            clock = VectorClock({f"w{i}": 1})
            if kind == "SingleKeyCausal":
                return enc(SingleKeyCausalLattice(clock, {b"v%d" % i}))
            return enc(MultiKeyCausalLattice(clock, {"dep": VectorClock({"d": i})},
                                             {b"v%d" % i}))

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as writers:
                for i in range(40):
                    writers.start_soon((one if i % 2 else two).put, "c", version(i))
        stored = decode_lattice(await one.get("c") or b"", load=RAW)
        assert type(stored).__name__ == kind + "Lattice"
        assert isinstance(stored, SingleKeyCausalLattice | MultiKeyCausalLattice)
        assert len(stored.versions) == 40
        assert stored.reveal() == {b"v%d" % i for i in range(40)}
        # the first put found no key; the other 39 merged in Lua or by compare-and-set
        assert one.cas_merges + two.cas_merges == (39 if kind == "MultiKeyCausal" else 0)


# --------------------------------------------------------------------------- freshness


async def test_a_write_through_one_node_reaches_the_others_subscribers_and_waiters(
    redis_url: str,
) -> None:
    async with storage_nodes(redis_url) as [(_, first), (_, second)], \
            trio.open_nursery() as nursery:
        send, receive = trio.open_memory_channel[KvsUpdate](10)

        async def on_update(peer: Peer, msg: Any, request_id: int) -> None:
            await send.send(msg)

        cache = await connect_peer(first, nursery, handler=on_update)
        writer = await connect_peer(second, nursery)
        await writer.request(KvsPut("k", enc(LWWLattice(0, b"old", "w"))))
        assert revealed((await cache.request(KvsGet("k", None, True))).lattice) == b"old"
        waited: list[KvsValue] = []  # subscribed above (caches subscribe to keys they hold)

        async def wait_for_result() -> None:
            waited.append(await cache.request(KvsGet("result", 60.0)))

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as waiting:
                waiting.start_soon(wait_for_result)
                await trio.sleep(0.1)
                await writer.request(KvsPut("k", enc(LWWLattice(1, b"fresh", "w"))))
                update = await receive.receive()
                while revealed(update.lattice) == b"old":  # the first put's notice, late
                    update = await receive.receive()
                assert update.key == "k" and revealed(update.lattice) == b"fresh"
                await writer.request(KvsPut("result", enc(LWWLattice(1, b"42", "w"))))
        assert revealed(waited[0].lattice) == b"42"
        await cache.aclose()
        await writer.aclose()


async def test_large_values_are_read_back_instead_of_travelling_in_notices(
    redis_url: str,
) -> None:
    send, receive = trio.open_memory_channel[tuple[str, bytes]](10)

    async def changed(key: str, data: bytes) -> None:
        await send.send((key, data))

    async with trio.open_nursery() as nursery:
        listener, writer = RedisBackend(redis_url), RedisBackend(redis_url, inline_limit=100)
        await nursery.start(listener.run, changed)
        await nursery.start(writer.run, changed)
        small, big = enc(LWWLattice(1, b"s", "w")), enc(LWWLattice(1, b"x" * 1000, "w"))
        await writer.put("small", small)
        await writer.put("big", big)
        with trio.fail_after(GUARD):
            got = [await receive.receive(), await receive.receive()]
        assert got == [("small", small), ("big", big)]  # the writer hears not itself
        assert listener.notices == 2 and writer.notices == 0
        nursery.cancel_scope.cancel()


async def test_a_cache_is_as_fresh_through_two_droplet_nodes_on_one_redis(
    redis_url: str,
) -> None:
    """Two all-in-one nodes share a Redis: a function's cached read sees a put via the other."""
    async with droplet.open_local_cluster(executors=1, storage=redis_url) as a, \
            droplet.open_local_cluster(executors=1, storage=redis_url) as b, \
            a.client() as cloud_a, b.client() as cloud_b:
        assert type(a.node.kvs.backend) is RedisBackend

        def read(lib: Any, key: str) -> Any:
            return lib.get(key)

        await cloud_a.register(read, "read")
        await cloud_b.put_object("shared", 1)
        assert await (await cloud_a.exec_func("read", ["shared"])).get(GUARD) == 1
        cache = a.node.executors[0].cache
        assert cache.peek("shared") is not None  # cached, and subscribed
        misses = cache.statistics().misses
        await cloud_b.put_object("shared", 2)  # through the other node: pushed to a's cache
        with trio.fail_after(GUARD):
            for _ in range(10_000):  # until the pushed update arrived
                if pickle.loads(revealed(cache.peek("shared"))) == 2:
                    break
                await trio.sleep(0.005)
        assert await (await cloud_a.exec_func("read", ["shared"])).get(GUARD) == 2
        assert cache.statistics().misses == misses  # the push refreshed it, not a new read


# --------------------------------------------------------------------------- connections


async def test_scripts_are_reloaded_after_a_script_flush(
    redis_url: str, redis_server: RedisServer,
) -> None:
    async with backends(redis_url, 1) as (backend,):
        await backend.put("k", enc(SetLattice({b"a"})))
        redis_server.cli("SCRIPT", "FLUSH")
        assert (await backend.put("k", enc(SetLattice({b"b"}))))[1] is not None
        assert revealed(await backend.get("k")) == {b"a", b"b"}


async def test_a_killed_connection_is_replaced(redis_url: str, redis_server: RedisServer
                                               ) -> None:
    async with backends(redis_url, 1) as (backend,):
        await backend.put("k", enc(SetLattice({b"a"})))
        redis_server.cli("CLIENT", "KILL", "TYPE", "normal")
        with trio.fail_after(GUARD):
            await backend.put("k", enc(SetLattice({b"b"})))
        assert revealed(await backend.get("k")) == {b"a", b"b"}


async def test_auth_and_select_come_from_the_url() -> None:
    with start_redis("--requirepass", "s3cret") as server:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        async with backends(url, 1) as (backend,):
            await backend.put("k", enc(SetLattice({b"a"})))
        assert server.cli("-a", "s3cret", "--no-auth-warning", "-n", "3", "EXISTS",
                          "droplet:k") == "1"
        assert server.cli("-a", "s3cret", "--no-auth-warning", "-n", "0", "DBSIZE") == "0"
        with pytest.raises(BaseExceptionGroup) as failed:
            async with backends(f"redis://:wrong@127.0.0.1:{server.port}/0", 1):
                pass
        assert failed.group_contains(RedisError, match="refused the connection setup")


async def test_nothing_listening_is_a_clear_error() -> None:
    from droplet.testing.nodes import free_port

    with pytest.raises(BaseExceptionGroup) as failed:
        async with backends(f"redis://127.0.0.1:{free_port()}/0", 1):
            pass
    assert failed.group_contains(StorageUnavailable, match="cannot connect to Redis")


async def test_rediss_uses_tls(tmp_path: Any, tls_ca: trustme.CA) -> None:
    cert = tls_ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = (tmp_path / "cert.pem", tmp_path / "key.pem",
                                    tmp_path / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    tls_ca.cert_pem.write_to_path(str(ca_file))
    try:
        server_cm = start_redis(tls_files=(str(cert_file), str(key_file), str(ca_file)))
        server = server_cm.__enter__()
    except (RuntimeError, subprocess.SubprocessError) as exc:
        pytest.skip(f"this redis-server cannot serve TLS: {exc}")
    try:
        async with backends(server.url, 1) as (backend,):
            await backend.put("k", enc(SetLattice({b"a"})))
            assert revealed(await backend.get("k")) == {b"a"}
        # without the CA the server's certificate is refused
        with pytest.raises(BaseExceptionGroup) as failed:
            async with backends(f"rediss://127.0.0.1:{server.port}/0", 1):
                pass
        assert failed.group_contains(StorageUnavailable, match="cannot connect")
    finally:
        server_cm.__exit__(None, None, None)


async def test_a_bad_put_through_a_redis_node_fails_alone(redis_url: str) -> None:
    async with storage_nodes(redis_url, 1) as [(_, address)], trio.open_nursery() as nursery:
        peer = await connect_peer(address, nursery)
        await peer.request(KvsPut("k", enc(LWWLattice(1, b"v", "w"))))
        with pytest.raises(droplet.LatticeTypeError):
            await peer.request(KvsPut("k", enc(SetLattice({b"x"}))))
        with pytest.raises(droplet.ProtocolError):
            await peer.request(KvsPut("k", b"garbage"))
        assert revealed((await peer.request(KvsGet("k"))).lattice) == b"v"
        await peer.aclose()


async def test_cancelled_commands_do_not_shift_replies(redis_url: str) -> None:
    """A caller cancelled while its reply is in flight leaves its slot: later replies
    still reach the right callers."""
    from droplet.kvs.backends.redis.connection import open_redis_connection
    from droplet.kvs.backends.redis.resp import parse_redis_url

    async with trio.open_nursery() as nursery:
        conn = await open_redis_connection(nursery, parse_redis_url(redis_url))
        for i in range(50):
            await conn.execute("SET", f"cancel-{i}", str(i))
        async with trio.open_nursery() as callers:
            for i in range(50):
                callers.start_soon(conn.execute, "GET", f"cancel-{i}")
            await trio.lowlevel.checkpoint()
            callers.cancel_scope.cancel()  # some sent, none answered yet
        results = []

        async def get(i: int) -> None:
            results.append((i, await conn.execute("GET", f"cancel-{i}")))

        async with trio.open_nursery() as callers:
            for i in range(50):
                callers.start_soon(get, i)
        assert sorted(results) == [(i, str(i).encode()) for i in range(50)]
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_call_results_expire_in_redis_itself(redis_url: str,
                                                   redis_server: RedisServer) -> None:
    async def ignore(key: str, data: bytes) -> None:
        pass

    async with trio.open_nursery() as nursery:
        backend = RedisBackend(redis_url, result_ttl=600)
        await nursery.start(backend.run, ignore)
        result, user = "__droplet/results/run-1", "user-key"
        await backend.put(result, enc(LWWLattice(1, b"r", "w")))
        await backend.put(user, enc(LWWLattice(1, b"u", "w")))
        await backend.put(result + "c", enc(VectorClock({"n": 1})))  # compare-and-set path
        await backend.put(result + "c", enc(VectorClock({"m": 1})))
        ttl = int(redis_server.cli("PTTL", backend.redis_key(result).decode()))
        assert 590_000 < ttl <= 600_000
        assert 590_000 < int(redis_server.cli("PTTL", backend.redis_key(result + "c").decode()))
        assert redis_server.cli("PTTL", backend.redis_key(user).decode()) == "-1"  # no expiry
        nursery.cancel_scope.cancel()


async def test_storage_nodes_recover_when_redis_restarts() -> None:
    """While Redis is down a put fails with a clear error (never acknowledged); once it
    is back both the command connections and the change subscription reconnect."""
    from droplet.testing.nodes import free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    send, receive = trio.open_memory_channel[tuple[str, bytes]](10)

    async def changed(key: str, data: bytes) -> None:
        await send.send((key, data))

    with start_redis(port=port) as server:
        async with trio.open_nursery() as nursery:
            listener, writer = RedisBackend(url), RedisBackend(url)
            await nursery.start(listener.run, changed)
            await nursery.start(writer.run, changed)
            await writer.put("k", enc(SetLattice({b"before"})))
            with trio.fail_after(GUARD):
                assert (await receive.receive())[0] == "k"
            server.stop()
            with pytest.raises(droplet.StorageError, match="Redis at 127.0.0.1"):
                await writer.put("k", enc(SetLattice({b"while down"})))
            with start_redis(port=port):
                with trio.fail_after(GUARD):
                    for i in range(1000):  # the subscription comes back within a second
                        await writer.put("k", enc(SetLattice({b"after-%d" % i})))
                        with trio.move_on_after(0.2):
                            key, data = await receive.receive()
                            break
                assert key == "k" and b"after-0" in revealed(data)  # a fresh, empty Redis
            nursery.cancel_scope.cancel()
