"""Issue 7: one slow or stuck peer never delays anyone else.

A subscriber (or a reader waiting for a key) that stops reading used to stall
the putting client's connection, because the store pushed the update inline
from the putter's reader task. Now pushes go through the subscriber's bounded
outbox; when it fills, that subscriber alone is disconnected.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from test_survival import raw_connection, reply_to

import droplet
from droplet.protocol.messages import KvsGet, KvsValue
from droplet.protocol.messages import encode as encode_message
from droplet.rpc import Limits, OutboxFull, Peer

TIMEOUT = 60.0
#: Past the in-memory transport's queue (1024 frames) plus a full outbox (64 MiB).
PUTS = 1700
BIG = b"x" * (128 << 10)


async def test_a_subscriber_that_stops_reading_does_not_stall_the_writer() -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1) as cluster, trio.open_nursery() as nursery:
            stuck = await raw_connection(cluster.address, nursery)
            await stuck.send(encode_message(KvsGet("hot", None, True), 1))
            assert type(await reply_to(stuck, 1)) is KvsValue
            # From here on `stuck` never reads again.
            async with cluster.client() as writer, cluster.client() as other:
                for _ in range(PUTS):
                    await writer.put_object("hot", BIG)
                    assert await other.get_object("elsewhere") is None
                fn = await other.register(lambda _, x: x * 2, "double")
                assert await (await fn(21)).get() == 42
            kvs = cluster.node.kvs
            assert kvs is not None
            assert kvs.statistics().subscriptions == 0  # the stuck one was dropped
            await stuck.aclose()


async def test_a_reader_waiting_for_a_key_that_stops_reading_does_not_stall_the_writer(
) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1) as cluster, trio.open_nursery() as nursery:
            stuck = await raw_connection(cluster.address, nursery)
            # Many waiting reads of keys the writer is about to put; never read.
            for i in range(PUTS):
                await stuck.send(encode_message(KvsGet(f"key-{i}", 600.0), i + 1))
            async with cluster.client() as writer:
                for i in range(PUTS):
                    await writer.put_object(f"key-{i}", BIG)
                async with cluster.client() as other:
                    assert await other.get_object("key-0") == BIG
            await stuck.aclose()


async def test_post_policies() -> None:
    """The outbox's two policies when full: disconnect the peer, or refuse the message."""
    from droplet.transports.inproc import _pair  # a connected pair without a listener

    a, b = _pair("inproc://outbox-test", 1 << 20, 1 << 20)
    peer = Peer(a, limits=Limits(outbox_messages=3))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        await trio.testing.wait_all_tasks_blocked()
        msg = KvsGet("k")
        with pytest.raises(OutboxFull):
            for _ in range(10_000):  # b never reads: the channel, then the outbox fill
                peer.post(msg, on_full="raise")
        assert not peer.closed and not peer.overflowed
        with pytest.raises(OutboxFull):
            peer.post(msg)
        assert peer.overflowed
        await trio.testing.wait_all_tasks_blocked()
        assert peer.closed
    await b.aclose()
