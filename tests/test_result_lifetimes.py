"""A call's result lives while something can still read it (client/_release.py).

Futures that are garbage-collected release their result keys in batches
(KvsForget); an ``obj_id`` handed out pins the result until the connection
closes; ``output_key`` copies stay; the TTL is only the backstop.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

import droplet
from droplet.client._blocking import BlockingClient
from droplet.kvs.keys import RESULT_PREFIX
from droplet.kvs.service import KvsService
from droplet.lattices import LWWLattice, encode_lattice
from droplet.protocol.messages import KvsForget, KvsPut

CALLS = 200


def _eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (bounded: about 20 s); fail naming ``what``."""
    for _ in range(400):
        gc.collect()
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never became true: {what}")


def _results(kvs: KvsService) -> int:
    store = kvs.backend.store  # type: ignore[attr-defined]  # the in-memory backend's
    return sum(1 for key in store._data if key.startswith(RESULT_PREFIX))


# --------------------------------------------------------------------------- the store


async def test_forget_deletes_results_and_ignores_other_keys(
        autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        kvs = KvsService(nursery, result_ttl=60)
        peer: Any = None  # one-way messages answered inline need no peer

        async def put(key: str) -> None:
            await kvs.handle(peer, KvsPut(key, encode_lattice(LWWLattice.now(1))), 0)

        await put(RESULT_PREFIX + "a")
        await put("user-key")
        await kvs.handle(peer, KvsForget([RESULT_PREFIX + "a", "user-key"]), 0)
        assert kvs.backend.get_nowait(RESULT_PREFIX + "a") is None
        # clients release call results, nothing else
        assert kvs.backend.get_nowait("user-key") is not None
        nursery.cancel_scope.cancel()


async def test_a_result_released_before_it_arrives_is_dropped_on_arrival(
        autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        kvs = KvsService(nursery, result_ttl=60)
        peer: Any = None
        key = RESULT_PREFIX + "early"
        await kvs.handle(peer, KvsForget([key]), 0)
        await kvs.handle(peer, KvsPut(key, encode_lattice(LWWLattice.now(1))), 0)
        assert kvs.backend.get_nowait(key) is None
        assert kvs.statistics().early_releases == 0
        # a release for a result that never comes is forgotten after the TTL
        await kvs.handle(peer, KvsForget([RESULT_PREFIX + "never"]), 0)
        assert kvs.statistics().early_releases == 1
        await trio.sleep(61)
        await kvs.handle(peer, KvsForget([]), 0)
        assert kvs.statistics().early_releases == 0
        nursery.cancel_scope.cancel()


async def test_early_releases_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from droplet.kvs import service as kvs_service

    monkeypatch.setattr(kvs_service, "MAX_EARLY_RELEASES", 10)
    async with trio.open_nursery() as nursery:
        kvs = KvsService(nursery)
        peer: Any = None
        await kvs.handle(peer, KvsForget([f"{RESULT_PREFIX}{i}" for i in range(25)]), 0)
        assert kvs.statistics().early_releases == 10
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- clients


def _connect(local: droplet.LocalCluster) -> droplet.DropletConnection:
    """The blocking client for a tcp:// cluster, the portal client for inproc://."""
    if local.address.startswith("tcp://"):
        conn = droplet.DropletConnection(local.address)
        local._connections.append(conn)  # closed with the cluster
        return conn
    return local.connect()


def _drop_futures(cloud: droplet.DropletConnection, read: bool) -> None:
    fn = cloud.register(lambda _, x: x * 2, "double")
    futures = [fn(i) for i in range(CALLS)]
    if read:
        assert [f.get() for f in futures] == [2 * i for i in range(CALLS)]
    else:
        futures[-1].get()  # the results arrive; nobody reads the others
    del futures


@pytest.mark.parametrize("read", [True, False], ids=["read", "unread"])
@pytest.mark.parametrize("listen", ["tcp://127.0.0.1:0", None], ids=["blocking", "portal"])
def test_dropped_futures_release_their_results(listen: str | None, read: bool) -> None:
    with droplet.LocalCluster(executors=1, listen=listen) as local:
        kvs = local.node.kvs
        assert kvs is not None
        cloud = _connect(local)
        assert isinstance(cloud._backend, BlockingClient) == (listen is not None)
        cloud.register(lambda _, x: x, "warm-up")
        baseline = kvs.statistics().keys + 1  # plus the function registered below
        _drop_futures(cloud, read)
        _eventually(lambda: kvs.statistics().keys == baseline,
                    f"KVS back to {baseline} keys")
        assert kvs.statistics().results == 0
        assert cloud.exec_func("double", [4]).get() == 8  # still serving


def test_futures_dropped_before_their_result_arrives() -> None:
    """The release reaches the store before the result: the result is dropped on arrival."""
    with droplet.LocalCluster(executors=1, listen="tcp://127.0.0.1:0") as local:
        kvs = local.node.kvs
        assert kvs is not None
        cloud = _connect(local)

        async def slow(_: Any, x: int) -> int:
            await trio.sleep(0.3)
            return x

        fn = cloud.register(slow, "slow")
        for i in range(20):
            fn(i)  # dropped at once
        cloud._backend.flush_releases()
        _eventually(lambda: kvs.statistics().puts >= 21 and _results(kvs) == 0,
                    "no results stored")
        _eventually(lambda: kvs.statistics().early_releases == 0,
                    "no releases waiting for results")


def test_obj_id_pins_the_result_until_the_connection_closes() -> None:
    with droplet.LocalCluster(executors=1, listen="tcp://127.0.0.1:0") as local:
        kvs = local.node.kvs
        assert kvs is not None
        with _connect(local) as cloud:
            fn = cloud.register(lambda _, x: x + 1, "inc")
            future = fn(1)
            key = future.obj_id
            assert future.get() == 2
            del future
            gc.collect()
            cloud._backend.flush_releases()
            assert cloud.get_object(key) == 2  # still there: the key was handed out
            output = cloud.call_dag  # output_key copies are the user's, never released
            cloud.register_dag("d", ["inc"], [])
            assert output("d", {"inc": 5}, output_key="kept").get() == 6
        _eventually(lambda: _results(kvs) == 0, "pinned result released at close")
        assert kvs.backend.get_nowait("kept") is not None


async def test_async_client_releases_dropped_futures(
        autojump_clock: trio.testing.MockClock) -> None:
    async with droplet.open_local_cluster(executors=1) as running, \
            running.client() as cloud:
        kvs = running.node.kvs
        assert kvs is not None

        async def triple(_: Any, x: int) -> int:
            return 3 * x

        fn = await cloud.register(triple, "triple")
        baseline = kvs.statistics().keys
        futures = [await fn(i) for i in range(CALLS)]
        assert [await f for f in futures] == [3 * i for i in range(CALLS)]
        pinned = await fn(-1)
        key = pinned.obj_id
        del futures, pinned
        for _ in range(100):
            gc.collect()
            await trio.sleep(0.1)
            if kvs.statistics().keys == baseline + 1:
                break
        assert kvs.statistics().keys == baseline + 1  # only the pinned result is left
        assert await cloud.get_object(key) == -3
    assert kvs.statistics().keys == baseline  # released when the client closed


async def test_get_rejects_a_negative_timeout_async() -> None:
    async with droplet.open_local_cluster(executors=1) as running, \
            running.client() as cloud:
        async def ident(_: Any, x: int) -> int:
            return x

        future = await (await cloud.register(ident, "ident"))(1)
        with pytest.raises(ValueError, match="timeout"):
            await future.get(timeout=-1)
        assert await future.get() == 1


def test_get_rejects_a_negative_timeout_portal() -> None:
    with droplet.LocalCluster(executors=1) as local:
        future = local.connect().register(lambda _, x: x, "ident")(1)
        with pytest.raises(ValueError, match="timeout"):
            future.get(timeout=-1)
        assert future.get() == 1
