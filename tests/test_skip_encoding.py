"""The encoding-free ``inproc://`` mode (``skip_encoding``): messages as objects.

The pure part (:mod:`droplet.protocol.parcel`) is tested synchronously: what
is copied, what is checked, what ``len()`` says. Then embedded clusters with
the flag on: isolation between callers and functions (a mutated argument or
result never leaks), bad input, timeouts in virtual time, an executor leaving,
and the node's own links, which never encode whatever the flag says. The
broader slice runs in test_end_to_end.py and test_survival.py, whose cluster
fixtures are parametrised both ways; ``DROPLET_SKIP_ENCODING=1 pytest`` runs
every embedded test with the flag on.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import trio
import trio.testing

import droplet
from droplet.cluster import skip_encoding_default
from droplet.links import connect_peer
from droplet.protocol.framing import Gather
from droplet.protocol.messages import (
    ErrorReply,
    InvalidMessage,
    KvsGet,
    KvsPut,
    Ok,
    Trigger,
    decode,
    encode,
)
from droplet.protocol.parcel import ENVELOPE_BYTES, Parcel, pack, unpack

# --------------------------------------------------------------------------- the pure part


def _trigger(**changes: Any) -> Trigger:
    fields: dict[str, Any] = dict(
        run_id="r1", function="f", functions=["f", "g"], versions=["1", "1"],
        placement=["inproc://a", "inproc://b"], edges=[["f", "g"]], arg_fns=["f"],
        arg_blobs=[b"args"], source=None, result=None, failed=False, result_key="res/1",
        output_key=None, direct=False, consistency="NORMAL", client_id=None, deadline=None,
        scheduler="inproc://s")
    fields.update(changes)
    return Trigger(**fields)


def test_a_message_of_immutable_fields_crosses_as_it_is() -> None:
    msg = KvsPut("k", b"value")
    parcel = pack(msg, 3, reply=False)
    assert parcel.msg is msg
    assert len(parcel) == ENVELOPE_BYTES + len(b"value")
    assert unpack(parcel) == (msg, 3, False)
    assert unpack(pack(Ok(), 9, reply=True)) == (Ok(), 9, True)


def test_lists_are_copied_so_neither_end_sees_the_others_changes() -> None:
    msg = _trigger()
    parcel = pack(msg)
    got = parcel.msg
    assert got == msg and got is not msg
    for name in ("functions", "versions", "placement", "edges", "arg_fns", "arg_blobs"):
        assert getattr(got, name) is not getattr(msg, name), name
    assert got.edges[0] is not msg.edges[0]
    msg.functions.append("h")
    msg.edges[0].append("x")
    assert got.functions == ["f", "g"] and got.edges == [["f", "g"]]


def test_tuples_travel_as_lists_as_over_the_wire() -> None:
    msg = _trigger(functions=("f", "g"), edges=[("f", "g")], arg_blobs=(b"a",))
    got = unpack(pack(msg))[0]
    assert got == decode(encode(msg))[0]
    assert got.functions == ["f", "g"] and got.edges == [["f", "g"]]
    assert got.arg_blobs == [b"a"]


def test_values_that_view_someone_elses_buffer_are_copied() -> None:
    buffer = bytearray(b"abc" * 100)
    writable = memoryview(buffer)
    gather = Gather([b"head", memoryview(buffer)])
    frozen = memoryview(b"immutable bytes" * 10)
    msg = _trigger(arg_blobs=[writable.toreadonly(), frozen], result=gather, source="f")
    got = pack(msg).msg
    buffer[:3] = b"XYZ"  # the caller changes its object after the send
    assert got.arg_blobs[0] == b"abc" * 100 and type(got.arg_blobs[0]) is bytes
    assert got.arg_blobs[1] is frozen  # a view of immutable bytes may stay a view
    assert got.result == b"head" + b"abc" * 100 and type(got.result) is bytes
    # A non-view field never gets a view, as decode never gives one.
    put = pack(KvsPut("k", memoryview(b"v" * 10))).msg  # type: ignore[arg-type]
    assert type(put.lattice) is bytes


def test_len_counts_the_values_as_a_frame_would() -> None:
    msg = _trigger(arg_blobs=[b"x" * 1000, b"y" * 500], result=b"z" * 10, source="f")
    parcel = pack(msg)
    assert len(parcel) == ENVELOPE_BYTES + 1510
    assert len(parcel) <= len(encode(msg)) + ENVELOPE_BYTES


@pytest.mark.parametrize(("msg", "match"), [
    (KvsGet(7), r"KvsGet.key must be str, got int"),  # type: ignore[arg-type]
    (KvsPut("k", "not bytes"), r"KvsPut.lattice must be bytes, got str"),  # type: ignore[arg-type]
    (_trigger(versions=["1"]), r"2 functions but 1 versions"),
    (_trigger(functions=["f", 3]), r"Trigger.functions must be list\[str\]"),
    (_trigger(deadline=float("nan")), r"deadline"),
])
def test_unpack_refuses_what_decode_refuses(msg: Any, match: str) -> None:
    with pytest.raises(InvalidMessage, match=match) as info:
        unpack(pack(msg, 5))
    assert info.value.request_id == 5 and not info.value.is_reply


def test_unpack_refuses_a_non_message() -> None:
    with pytest.raises(InvalidMessage, match="not a Droplet message"):
        unpack(Parcel(object(), 1, False, 0))


def test_a_parcel_and_a_frame_carry_the_same_message() -> None:
    msg = _trigger(arg_blobs=[pickle.dumps([1, 2])], client_id="c")
    assert unpack(pack(msg, 4))[0] == decode(encode(msg, 4))[0]
    err = ErrorReply("DropletError", "boom")
    assert unpack(pack(err, 2, True)) == decode(encode(err, 2, True))


def test_the_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DROPLET_SKIP_ENCODING", raising=False)
    assert skip_encoding_default(None) is False
    monkeypatch.setenv("DROPLET_SKIP_ENCODING", "1")
    assert skip_encoding_default(None) is True
    assert skip_encoding_default(False) is False
    with pytest.raises(TypeError, match="skip_encoding must be True, False or None"):
        skip_encoding_default("yes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- embedded

def _mutate_and_sum(_: Any, data: bytearray, items: list[int]) -> tuple[int, list[int]]:
    total = sum(data[:16]) + len(data)
    data[:4] = b"EVIL"
    items.append(99)
    return total, items


def _keeps(_: Any, items: list[int]) -> list[int]:
    return items


async def _aslow_sum(_: Any, data: bytearray) -> int:
    await trio.sleep(0.01)
    return sum(data[:16]) + len(data)


@pytest.mark.parametrize("skip", [False, True], ids=["frames", "objects"])
async def test_arguments_and_results_never_alias(skip: bool) -> None:
    async with droplet.open_local_cluster(1, skip_encoding=skip) as running, \
            running.client() as cloud:
        await cloud.register(_mutate_and_sum, "mutate")
        await cloud.register(_aslow_sum, "aslow")
        await cloud.register(_keeps, "keeps")
        big = bytearray(b"\x01" * (256 * 1024))  # big: pickled with out-of-band buffers
        items = [1, 2]
        total, back = await (await cloud.exec_func("mutate", [big, items])).get()
        assert total == 16 + len(big)
        assert big[:4] == b"\x01" * 4 and items == [1, 2]  # the function's changes stay there
        assert back == [1, 2, 99] and back is not items
        # The caller changes its argument right after the call is sent, before the
        # function has run: the function still sees what was passed.
        future = await cloud.exec_func("aslow", [big])
        big[:16] = b"\x00" * 16
        assert await future.get() == 16 + len(big)
        # A result the caller mutates is not the stored one.
        future = await cloud.exec_func("keeps", [[5]])
        first = await future.get()
        first.append(6)
        assert await cloud.get_object(future.obj_id) == [5]


@pytest.mark.parametrize("skip", [False, True], ids=["frames", "objects"])
async def test_bad_input_gets_a_clear_error_and_the_cluster_serves(skip: bool) -> None:
    async with droplet.open_local_cluster(1, skip_encoding=skip) as running, \
            running.client() as cloud:
        await cloud.register(_keeps, "keeps")
        await cloud.register_dag("d", ["keeps"], [])
        with pytest.raises((TypeError, ValueError, droplet.DropletError), match="consistency"):
            await cloud.call_dag("d", {"keeps": [1]}, consistency="SOMETIMES")
        # A hand-made message with a field of the wrong type, straight to the node.
        async with trio.open_nursery() as nursery:
            peer = await connect_peer(running.address, nursery)
            assert peer.conn.carries_objects is skip
            bad = KvsGet(7)  # type: ignore[arg-type]
            with pytest.raises(droplet.DropletError, match=r"KvsGet.key must be str"):
                await peer.request(bad, 10)
            if skip:  # refused, the connection kept (a frame would have closed it)
                assert not peer.closed
                reply = await peer.request(KvsGet("nothing-here"), 10)
                assert reply.key == "nothing-here" and reply.lattice is None
            await peer.aclose()
        assert await (await cloud.exec_func("keeps", [[3]])).get() == [3]


async def _sleeps_forever(_: Any) -> None:
    await trio.sleep_forever()


async def test_timeouts_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    async with droplet.open_local_cluster(1, skip_encoding=True) as running, \
            running.client() as cloud:
        fn = await cloud.register(_sleeps_forever, "forever")
        future = await fn()
        start = trio.current_time()
        with pytest.raises(droplet.TimeoutError):
            await future.get(timeout=2)
        assert trio.current_time() - start == pytest.approx(2)
        await cloud.register_dag("never", ["forever"], [])
        with pytest.raises(droplet.TimeoutError, match=r"'never'.*3 s"):
            await cloud.call_dag("never", {}, direct_response=True, timeout=3)


@pytest.mark.parametrize("skip", [False, True], ids=["frames", "objects"])
async def test_an_oversize_value_is_refused_both_ways(skip: bool) -> None:
    async with droplet.open_local_cluster(1, skip_encoding=skip,
                                          max_frame_size=256 * 1024) as running, \
            running.client() as cloud:
        await cloud.register(_keeps, "keeps")
        with pytest.raises(droplet.DropletError, match="max_frame_size|too large|exceeds"):
            await (await cloud.exec_func("keeps", [b"x" * (512 * 1024)])).get(timeout=30)
        assert await (await cloud.exec_func("keeps", [[1]])).get() == [1]


def _gated(lib: Any, x: int) -> int:
    return 2 * x


async def test_calls_go_on_while_an_executor_leaves() -> None:
    async with droplet.open_local_cluster(
            (1, 2), skip_encoding=True, threads=1, report_interval=0.05,
            scale_up_after=1e6, scale_down_after=1e6) as running, running.client() as cloud:
        pool = running.node.pool
        scheduler = running.node.scheduler
        assert pool is not None and scheduler is not None
        fn = await cloud.register(_gated, "gated")
        second = pool.scale_up()
        with trio.fail_after(30):
            while scheduler.executor_url(second) is None:
                await scheduler.executors_changed.wait()
        futures = [await fn(i) for i in range(6)]
        pool.scale_down(second)
        futures += [await fn(i) for i in range(6, 12)]
        with trio.fail_after(30):
            assert [await f.get() for f in futures] == [2 * i for i in range(12)]
            while second in pool.slots:
                await pool.changed.wait()
        assert await (await fn(21)).get() == 42


@pytest.mark.parametrize("skip", [False, True], ids=["frames", "objects"])
async def test_the_nodes_own_links_never_encode(skip: bool) -> None:
    """The scheduler's and the cache's links to the node's store carry objects always;
    the public address and the executors' links only with the flag."""
    async with droplet.open_local_cluster(1, skip_encoding=skip) as running, \
            running.client() as cloud:
        node = running.node
        assert node.scheduler is not None
        assert node.scheduler._kvs.conn.carries_objects
        assert cloud._scheduler.conn.carries_objects is skip
        await cloud.put_object("k", 1)
        assert await cloud.get_object("k") == 1


async def test_a_client_sending_frames_is_answered_in_frames() -> None:
    """one_request (health checks, ``droplet status``) speaks frames over any connection."""
    from droplet.node import cluster_info
    from droplet.protocol.messages import ClusterInfo

    async with droplet.open_local_cluster(1, skip_encoding=True) as running:
        info = await cluster_info(running.address)
        assert type(info) is ClusterInfo
