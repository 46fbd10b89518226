"""The storage backend seam: KvsService over a backend that always waits.

The in-memory backend answers every operation at once (``*_nowait``); a
remote backend (Redis) cannot. These tests run the service's waiting paths
over a backend whose every operation yields, and report changes "made by
another storage node" through the ``changed`` callback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from droplet.kvs.backends import BackendStatistics, ChangeHandler, MemoryBackend, StorageBackend
from droplet.kvs.service import KvsService
from droplet.lattices import RAW, LWWLattice, SetLattice, decode_lattice, encode_lattice
from droplet.links import connect_peer, serve_peers
from droplet.protocol.messages import KvsGet, KvsPut, KvsStored, KvsUpdate, KvsValue
from droplet.rpc import Peer


def lww(ts: int, value: bytes) -> bytes:
    return encode_lattice(LWWLattice(ts, value, "w"), dump=RAW)


def revealed(data: bytes | None) -> Any:
    assert data is not None
    return decode_lattice(data, load=RAW).reveal()


class AsyncOnly(StorageBackend):
    """A memory store reached only through awaits (like a network backend)."""

    name = "async-only"

    def __init__(self) -> None:
        self.inner = MemoryBackend()
        self.changed: ChangeHandler | None = None

    async def get(self, key: str) -> bytes | None:
        await trio.sleep(0.001)
        return self.inner.store.get(key)

    async def put(self, key: str, data: bytes) -> tuple[str, bytes | None]:
        await trio.sleep(0.001)
        return self.inner.store.put(key, data)

    async def delete(self, key: str) -> bool:
        await trio.sleep(0.001)
        return self.inner.store.delete(key)

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(self.name, len(self.inner.store))

    async def run(self, changed: ChangeHandler, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.changed = changed
        task_status.started()
        await trio.sleep_forever()

    async def put_elsewhere(self, key: str, data: bytes) -> None:
        """A write through another storage node: stored, then reported."""
        _, new = self.inner.store.put(key, data)
        assert self.changed is not None and new is not None
        await self.changed(key, new)


@asynccontextmanager
async def served(backend: StorageBackend) -> AsyncIterator[tuple[KvsService, Peer]]:
    async with trio.open_nursery() as nursery:
        service = KvsService(nursery, backend)
        await nursery.start(service.serve)
        url = await nursery.start(partial(serve_peers, "inproc://test-kvs-backend",
                                          service.handle))
        peer = await connect_peer(url, nursery)
        yield service, peer
        await peer.aclose()
        nursery.cancel_scope.cancel()


async def test_memory_backend_needs_no_run_and_reports_statistics() -> None:
    backend = MemoryBackend()
    assert backend.put_nowait("k", lww(1, b"v"))[0] == "LWW"
    assert backend.statistics() == BackendStatistics("memory", 1)
    assert revealed(await backend.get("k")) == b"v"
    assert await backend.put("k", lww(1, b"v")) == ("LWW", None)  # nothing changed
    assert await backend.delete("k") is True
    assert backend.get_nowait("k") is None
    await backend.aclose()


async def test_async_backend_get_put_and_type_errors() -> None:
    import droplet

    async with served(AsyncOnly()) as (service, peer):
        assert await peer.request(KvsGet("k")) == KvsValue("k", None)
        assert await peer.request(KvsPut("k", lww(1, b"v"))) == KvsStored("LWW")
        assert revealed((await peer.request(KvsGet("k"))).lattice) == b"v"
        with pytest.raises(droplet.LatticeTypeError):
            await peer.request(KvsPut("k", encode_lattice(SetLattice({b"x"}), dump=RAW)))
        assert service.statistics().storage == BackendStatistics("async-only", 1)


async def test_async_backend_waiting_get_woken_by_put_and_by_change_elsewhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = AsyncOnly()
    async with served(backend) as (_, peer):
        got: dict[str, Any] = {}

        async def wait_for(key: str) -> None:
            got[key] = (await peer.request(KvsGet(key, 60.0)), trio.current_time())

        async with trio.open_nursery() as waiters:
            waiters.start_soon(wait_for, "here")
            waiters.start_soon(wait_for, "there")
            await trio.sleep(5)
            start = trio.current_time()
            await peer.request(KvsPut("here", lww(1, b"1")))
            await backend.put_elsewhere("there", lww(1, b"2"))
        assert revealed(got["here"][0].lattice) == b"1"
        assert revealed(got["there"][0].lattice) == b"2"
        assert got["there"][1] - start < 1  # woken by the change, not the 60 s timer
        # a waiting read of a key that exists answers at once; one that never comes, None
        assert revealed((await peer.request(KvsGet("here", 60.0))).lattice) == b"1"
        assert await peer.request(KvsGet("never", 2.0)) == KvsValue("never", None)


async def test_change_elsewhere_is_pushed_to_subscribers() -> None:
    backend = AsyncOnly()
    async with trio.open_nursery() as nursery:
        service = KvsService(nursery, backend)
        await nursery.start(service.serve)
        url = await nursery.start(partial(serve_peers, "inproc://test-kvs-push", service.handle))
        send, receive = trio.open_memory_channel[KvsUpdate](10)

        async def on_update(peer: Peer, msg: Any, request_id: int) -> None:
            await send.send(msg)

        cache = await connect_peer(url, nursery, handler=on_update)
        # Subscriptions are only to keys that exist (a cache holds no absent keys).
        await backend.put_elsewhere("s", lww(1, b"first"))
        with trio.fail_after(5):
            await cache.request(KvsGet("s", None, True))  # subscribe
        await backend.put_elsewhere("s", lww(5, b"from another node"))
        with trio.fail_after(5):
            update = await receive.receive()
        assert update.key == "s" and revealed(update.lattice) == b"from another node"
        await cache.aclose()
        nursery.cancel_scope.cancel()


class FailingReads(AsyncOnly):
    """Reads fail (a Redis outage) once ``failing`` is set."""

    name = "failing-reads"
    failing = False

    async def get(self, key: str) -> bytes | None:
        if self.failing:
            await trio.lowlevel.checkpoint()
            from droplet.errors import StorageError

            raise StorageError("redis://127.0.0.1:1 is unreachable")
        return await super().get(key)


async def test_a_backend_failure_when_a_wait_runs_out_answers_that_read_only(
        autojump_clock: trio.testing.MockClock) -> None:
    """The timer's read fails: that reader gets the error; the node keeps serving."""
    from droplet.errors import StorageError

    backend = FailingReads()
    async with served(backend) as (service, peer):
        async with trio.open_nursery() as nursery:
            outcome: list[BaseException] = []

            async def wait_for_absent() -> None:
                try:
                    await peer.request(KvsGet("absent", 10.0))
                except StorageError as exc:
                    outcome.append(exc)

            nursery.start_soon(wait_for_absent)
            await trio.sleep(5)
            backend.failing = True
        assert len(outcome) == 1 and "unreachable" in str(outcome[0])
        backend.failing = False
        assert await peer.request(KvsPut("k", lww(1, b"v"))) == KvsStored("LWW")
        assert revealed((await peer.request(KvsGet("k"))).lattice) == b"v"


async def test_a_one_way_read_never_waits_and_frees_no_slot() -> None:
    async with served(MemoryBackend()) as (service, peer):
        await peer.send(KvsGet("absent", 60.0))  # one-way: nobody to answer
        assert await peer.request(KvsGet("other")) == KvsValue("other", None)
        assert service.statistics().waiting_reads == 0


async def test_a_subscription_over_the_cap_refuses_the_put_before_merging(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import droplet
    import droplet.kvs.service as kvs_service

    monkeypatch.setattr(kvs_service, "MAX_SUBSCRIPTIONS_PER_PEER", 1)
    async with served(MemoryBackend()) as (service, peer):
        await peer.request(KvsPut("a", lww(1, b"a"), True))
        with pytest.raises(droplet.DropletError, match="at most 1"):
            await peer.request(KvsPut("b", lww(1, b"b"), True))
        assert await peer.request(KvsGet("b")) == KvsValue("b", None)  # nothing half-done
        assert await peer.request(KvsPut("b", lww(1, b"b"))) == KvsStored("LWW")
