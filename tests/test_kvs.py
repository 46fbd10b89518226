"""The lattice store: its pure core (kvs/store.py) and KvsService over inproc://."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

import droplet
from droplet.kvs.backends import MemoryBackend
from droplet.kvs.service import KvsService
from droplet.kvs.store import Store
from droplet.lattices import (
    RAW,
    LWWLattice,
    MaxLattice,
    SetLattice,
    decode_lattice,
    encode_lattice,
)
from droplet.links import connect_peer, serve_peers
from droplet.protocol.messages import (
    KvsGet,
    KvsPut,
    KvsStored,
    KvsUnsubscribe,
    KvsUpdate,
    KvsValue,
    Ok,
)
from droplet.rpc import Peer


def lww(ts: int, value: bytes, writer: str = "w") -> bytes:
    return encode_lattice(LWWLattice(ts, value, writer), dump=RAW)


def raw_set(*elements: bytes) -> bytes:
    return encode_lattice(SetLattice(elements), dump=RAW)


def revealed(data: bytes | None) -> Any:
    assert data is not None
    return decode_lattice(data, load=RAW).reveal()


# --------------------------------------------------------------------------- pure store


def test_empty_store() -> None:
    store = Store()
    assert len(store) == 0
    assert store.get("k") is None
    assert "k" not in store
    assert store.type_name("k") is None
    assert store.delete("k") is False


def test_first_put_stores_and_reports_the_change() -> None:
    store = Store()
    type_name, changed = store.put("k", lww(1, b"one"))
    assert type_name == "LWW"
    assert changed is not None and changed == store.get("k")
    assert revealed(store.get("k")) == b"one"
    assert "k" in store and len(store) == 1
    assert store.type_name("k") == "LWW"


def test_put_merges_lww_newer_wins() -> None:
    store = Store()
    store.put("k", lww(1, b"old"))
    type_name, changed = store.put("k", lww(2, b"new"))
    assert type_name == "LWW"
    assert changed is not None
    assert revealed(store.get("k")) == b"new"


def test_older_lww_put_changes_nothing_and_returns_none() -> None:
    store = Store()
    store.put("k", lww(5, b"newest"))
    before = store.get("k")
    assert store.put("k", lww(3, b"stale")) == ("LWW", None)
    assert store.get("k") == before


def test_identical_put_returns_none() -> None:
    store = Store()
    store.put("k", raw_set(b"a"))
    assert store.put("k", raw_set(b"a")) == ("Set", None)
    assert store.put("k", raw_set()) == ("Set", None)


def test_set_put_is_a_union() -> None:
    store = Store()
    store.put("s", raw_set(b"a", b"b"))
    type_name, changed = store.put("s", raw_set(b"b", b"c"))
    assert type_name == "Set"
    assert changed == store.get("s")
    assert revealed(store.get("s")) == {b"a", b"b", b"c"}


def test_max_lattice_merge() -> None:
    store = Store()
    store.put("m", encode_lattice(MaxLattice(3), dump=RAW))
    assert store.put("m", encode_lattice(MaxLattice(1), dump=RAW))[1] is None
    store.put("m", encode_lattice(MaxLattice(9), dump=RAW))
    assert revealed(store.get("m")) == 9


def test_type_mismatch_names_both_types() -> None:
    store = Store()
    store.put("k", lww(1, b"x"))
    with pytest.raises(droplet.LatticeTypeError) as info:
        store.put("k", raw_set(b"y"))
    message = str(info.value)
    assert "'k'" in message and "LWW" in message and "Set" in message
    assert isinstance(info.value, TypeError)
    assert revealed(store.get("k")) == b"x"  # untouched


def test_garbage_is_protocol_error_and_store_untouched() -> None:
    store = Store()
    with pytest.raises(droplet.ProtocolError):
        store.put("k", b"not a lattice")
    assert "k" not in store


def test_delete() -> None:
    store = Store()
    store.put("k", lww(1, b"x"))
    assert store.delete("k") is True
    assert store.get("k") is None
    assert len(store) == 0


def test_store_keeps_user_values_opaque() -> None:
    """The store never unpickles: a value whose unpickling would fail is stored fine."""
    store = Store()
    poison = b"\x80\x05cnonexistent_module\nBoom\n."
    store.put("k", lww(1, poison))
    assert revealed(store.get("k")) == poison


# --------------------------------------------------------------------------- service

_names = itertools.count(1)


@asynccontextmanager
async def kvs_server() -> AsyncIterator[tuple[str, KvsService, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        service = KvsService(nursery)
        url = await nursery.start(partial(serve_peers, f"inproc://test-kvs-{next(_names)}",
                                          service.handle))
        yield url, service, nursery
        nursery.cancel_scope.cancel()


async def test_get_put_over_rpc() -> None:
    async with kvs_server() as (url, service, nursery):
        peer = await connect_peer(url, nursery)
        assert await peer.request(KvsGet("k")) == KvsValue("k", None)
        assert await peer.request(KvsPut("k", lww(1, b"v"))) == KvsStored("LWW")
        reply = await peer.request(KvsGet("k"))
        assert revealed(reply.lattice) == b"v"
        stats = service.statistics()
        assert (stats.keys, stats.gets, stats.puts) == (1, 2, 1)
        await peer.aclose()


async def test_type_mismatch_over_rpc_and_connection_keeps_serving() -> None:
    async with kvs_server() as (url, _, nursery):
        peer = await connect_peer(url, nursery)
        await peer.request(KvsPut("k", lww(1, b"v")))
        with pytest.raises(droplet.LatticeTypeError, match=r"LWW.*Set"):
            await peer.request(KvsPut("k", raw_set(b"x")))
        with pytest.raises(droplet.ProtocolError):
            await peer.request(KvsPut("k", b"garbage"))
        assert revealed((await peer.request(KvsGet("k"))).lattice) == b"v"
        await peer.aclose()


async def test_waiting_get_is_woken_by_a_put(autojump_clock: trio.testing.MockClock) -> None:
    async with kvs_server() as (url, _, nursery):
        reader = await connect_peer(url, nursery)
        writer = await connect_peer(url, nursery)
        got: list[Any] = []
        woken_at: list[float] = []

        async def wait_for_key() -> None:
            got.append(await reader.request(KvsGet("result", 60.0)))
            woken_at.append(trio.current_time())

        async with trio.open_nursery() as waiters:
            waiters.start_soon(wait_for_key)
            waiters.start_soon(wait_for_key)
            await trio.sleep(10)
            assert got == []  # still waiting
            put_at = trio.current_time()
            await writer.request(KvsPut("result", lww(1, b"42")))
        assert [revealed(r.lattice) for r in got] == [b"42", b"42"]
        assert all(t == put_at for t in woken_at)  # woken by the put, not the timeout
        await reader.aclose()
        await writer.aclose()


async def test_waiting_get_on_existing_key_answers_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvs_server() as (url, _, nursery):
        peer = await connect_peer(url, nursery)
        await peer.request(KvsPut("k", lww(1, b"here")))
        start = trio.current_time()
        reply = await peer.request(KvsGet("k", 30.0))
        assert trio.current_time() == start
        assert revealed(reply.lattice) == b"here"
        await peer.aclose()


async def test_waiting_get_times_out_with_none(autojump_clock: trio.testing.MockClock) -> None:
    async with kvs_server() as (url, _, nursery):
        peer = await connect_peer(url, nursery)
        start = trio.current_time()
        reply = await peer.request(KvsGet("never", 5.0))
        assert reply == KvsValue("never", None)
        assert trio.current_time() - start == pytest.approx(5.0)
        # and the key can still be waited for and written afterwards
        await peer.request(KvsPut("never", lww(1, b"late")))
        assert revealed((await peer.request(KvsGet("never", 5.0))).lattice) == b"late"
        await peer.aclose()


async def test_waiting_get_whose_client_left_does_not_break_the_service(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvs_server() as (url, _, nursery):
        leaver = await connect_peer(url, nursery)
        with trio.move_on_after(1):
            await leaver.request(KvsGet("k", 60.0))
        await leaver.aclose()
        other = await connect_peer(url, nursery)
        await other.request(KvsPut("k", lww(1, b"v")))  # wakes the departed waiter
        await trio.sleep(1)
        assert revealed((await other.request(KvsGet("k"))).lattice) == b"v"
        await other.aclose()


class Recorder:
    def __init__(self) -> None:
        self.updates: list[KvsUpdate] = []
        self._send, self._recv = trio.open_memory_channel[KvsUpdate](100)

    async def handle(self, peer: Peer, msg: Any, request_id: int) -> Any:
        assert isinstance(msg, KvsUpdate)
        self.updates.append(msg)
        await self._send.send(msg)

    async def next(self) -> KvsUpdate:
        return await self._recv.receive()


async def test_subscription_pushes_updates() -> None:
    async with kvs_server() as (url, service, nursery):
        recorder = Recorder()
        cache = await connect_peer(url, nursery, handler=recorder.handle)
        writer = await connect_peer(url, nursery)
        await writer.request(KvsPut("s", raw_set(b"a")))
        reply = await cache.request(KvsGet("s", None, True))
        assert revealed(reply.lattice) == {b"a"}
        assert service.statistics().subscriptions == 1

        await writer.request(KvsPut("s", raw_set(b"b")))
        update = await recorder.next()
        assert update.key == "s"
        assert revealed(update.lattice) == {b"a", b"b"}  # the merged value, not the delta

        # a put that changes nothing pushes nothing
        await writer.request(KvsPut("s", raw_set(b"a")))
        await writer.request(KvsPut("s", raw_set(b"c")))
        assert revealed((await recorder.next()).lattice) == {b"a", b"b", b"c"}
        assert len(recorder.updates) == 2

        # unsubscribe: no more pushes
        await cache.request(KvsUnsubscribe("s"))
        await writer.request(KvsPut("s", raw_set(b"d")))
        await trio.testing.wait_all_tasks_blocked()
        assert len(recorder.updates) == 2
        await cache.aclose()
        await writer.aclose()


async def test_subscribing_put_and_peer_close_forgets_subscriptions() -> None:
    async with kvs_server() as (url, service, nursery):
        recorder = Recorder()
        cache = await connect_peer(url, nursery, handler=recorder.handle)
        await cache.request(KvsPut("a", lww(1, b"1"), True))
        # a subscribing put gets its own write pushed back (that is how the
        # executor cache learns the merged value of its own put)
        assert revealed((await recorder.next()).lattice) == b"1"
        await cache.request(KvsGet("b", None, True))
        # b is absent: no subscription (a cache keeps no entry for it, so it
        # would never evict and unsubscribe it; it reads b again next time)
        assert service.statistics().subscriptions == 1
        await cache.request(KvsPut("b", lww(1, b"1")))
        await cache.request(KvsGet("b", None, True))
        assert service.statistics().subscriptions == 2
        writer = await connect_peer(url, nursery)
        await writer.request(KvsPut("a", lww(2, b"2")))
        assert revealed((await recorder.next()).lattice) == b"2"
        await cache.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert service.statistics().subscriptions == 0
        # writes after the subscriber left still succeed
        assert await writer.request(KvsPut("a", lww(3, b"3"))) == KvsStored("LWW")
        await writer.aclose()


async def test_unsubscribe_unknown_key_is_fine() -> None:
    async with kvs_server() as (url, _, nursery):
        peer = await connect_peer(url, nursery)
        assert await peer.request(KvsUnsubscribe("nothing")) == Ok()
        await peer.aclose()


async def test_call_results_expire_after_result_ttl(autojump_clock: trio.testing.MockClock
                                                    ) -> None:
    """Results (futures' obj_ids) are dropped once past result_ttl; user keys stay."""
    from droplet.kvs.keys import RESULT_PREFIX

    async with trio.open_nursery() as nursery:
        backend = MemoryBackend()
        kvs = KvsService(nursery, backend, result_ttl=60)

        async def put(key: str) -> None:
            peer: Any = None  # a put answered inline needs no peer
            await kvs.handle(peer, KvsPut(key, encode_lattice(LWWLattice.now(1))), 0)

        await put(RESULT_PREFIX + "old")
        await put("user-key")
        await trio.sleep(30)
        await put(RESULT_PREFIX + "newer")
        await trio.sleep(31)  # "old" is 61 s old, "newer" 31 s
        await put(RESULT_PREFIX + "newest")
        assert RESULT_PREFIX + "old" not in backend.store
        assert RESULT_PREFIX + "newer" in backend.store
        assert "user-key" in backend.store
        assert kvs.statistics().storage.keys == 3
        nursery.cancel_scope.cancel()


async def test_unsubscribing_leaves_no_empty_entries() -> None:
    """Regression (issue 7): KvsUnsubscribe left an empty subscriber set per key, and
    the connection's own record of its keys, forever."""
    async with kvs_server() as (url, service, nursery):
        cache = await connect_peer(url, nursery, handler=Recorder().handle)
        for i in range(50):
            await cache.request(KvsPut(f"k{i}", lww(1, b"1"), True))
        assert service.statistics().subscribed_keys == 50
        for i in range(50):
            await cache.send(KvsUnsubscribe(f"k{i}"))
        await cache.request(KvsGet("k0"))  # after the unsubscribes, in order
        stats = service.statistics()
        assert (stats.subscriptions, stats.subscribed_keys) == (0, 0)
        assert not service._subscribers
        await cache.aclose()
