"""Big frames and big values without copies: the sans-IO pieces.

Frames received into buffers of their own (fed, or written in place as a
socket's ``recv_into`` would), messages whose big blobs stay views of the
frame, pickles with out-of-band buffers, and the pool that reuses a frame's
buffer only once nothing refers to it. Synchronous: no event loop.
"""

from __future__ import annotations

import gc
import os
import pickle
import struct
import sys
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from droplet.errors import ProtocolError
from droplet.executor.downstream import ahead_of, arguments_for
from droplet.protocol import messages as m
from droplet.protocol.framing import (
    BIG_FRAME,
    HEADER_SIZE,
    BufferPool,
    FrameDecoder,
    Gather,
    frame,
    frame_parts,
    join,
)
from droplet.serialization import OUT_OF_BAND_MIN, dumps_value, loads, mentions

LEN = struct.Struct(">I")
fuzz = settings(max_examples=60, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

BIG = bytes(range(256)) * (BIG_FRAME // 256 + 3)  # a little over BIG_FRAME, not uniform


def read_with_recv_into(decoder: FrameDecoder, wire: bytes, cuts: list[int]) -> list[Any]:
    """Deliver ``wire`` in pieces as a transport does: into the decoder's buffer
    when it offers one (``recv_into``), else by ``feed``."""
    frames: list[Any] = []
    pos = 0
    sizes = iter(cuts)
    while pos < len(wire):
        while (f := decoder.next_frame()) is not None:
            frames.append(f)
        want = next(sizes, len(wire))
        target = decoder.receive_buffer()
        if target is None:
            chunk = wire[pos:pos + want]
            decoder.feed(chunk)
        else:
            n = min(want, len(target), len(wire) - pos)
            target[:n] = wire[pos:pos + n]
            decoder.received(n)
            chunk = wire[pos:pos + n]
        pos += len(chunk)
    while (f := decoder.next_frame()) is not None:
        frames.append(f)
    return frames


# --------------------------------------------------------------------------- framing

def test_a_big_frame_is_a_read_only_view_of_its_own_buffer() -> None:
    decoder = FrameDecoder(pool=BufferPool())
    decoder.feed(frame(BIG)[:100])
    assert decoder.next_frame() is None
    target = decoder.receive_buffer()
    assert target is not None and len(target) == len(BIG) - (100 - HEADER_SIZE)
    assert decoder.mid_frame and decoder.buffered == 100
    decoder.feed(frame(BIG)[100:] + frame(b"small"))
    got = decoder.next_frame()
    assert type(got) is memoryview and got.readonly and got == BIG
    assert decoder.next_frame() == b"small" and not decoder.mid_frame


@fuzz
@given(st.lists(st.sampled_from([b"", b"tiny", BIG, BIG[:BIG_FRAME], BIG[: BIG_FRAME - 1],
                                 b"z" * 70_000]), min_size=1, max_size=5),
       st.lists(st.integers(1, 3 * BIG_FRAME), max_size=40))
def test_big_frames_split_arbitrarily(payloads: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frame(p) for p in payloads)
    assert read_with_recv_into(FrameDecoder(pool=BufferPool()), wire, cuts) == payloads
    fed = FrameDecoder(pool=BufferPool())
    got = []
    pos = 0
    for size in [*cuts, len(wire)]:
        fed.feed(wire[pos:pos + size])
        pos += size
        while (f := fed.next_frame()) is not None:
            got.append(f)
    assert got == payloads and not fed.mid_frame


def test_big_frame_limit_is_checked_before_any_buffer_is_taken() -> None:
    pool = BufferPool()
    decoder = FrameDecoder(max_frame_size=BIG_FRAME, pool=pool)
    decoder.feed(LEN.pack(BIG_FRAME + 1) + b"x" * 10)
    with pytest.raises(ProtocolError, match=f"{BIG_FRAME + 1}-byte frame"):
        decoder.next_frame()
    assert pool.pooled_bytes == 0 and decoder.receive_buffer() is None


def test_no_memory_for_a_big_frame_is_this_connections_protocol_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """mmap can fail (ENOMEM under strict overcommit, many frames declared at
    once): that ends the one connection (ProtocolError, which the transports
    and services handle), never a node's listener with a stray OSError."""
    import errno
    import mmap

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", no_memory)
    decoder = FrameDecoder(pool=BufferPool())
    decoder.feed(frame(BIG)[:100])
    with pytest.raises(ProtocolError, match=f"frame of {len(BIG)} bytes"):
        decoder.next_frame()


def test_received_must_fit_the_frame_under_way() -> None:
    decoder = FrameDecoder(pool=BufferPool())
    with pytest.raises(ValueError):
        decoder.received(1)  # no big frame under way
    decoder.feed(LEN.pack(len(BIG)))
    assert decoder.next_frame() is None
    with pytest.raises(ValueError):
        decoder.received(len(BIG) + 1)


def receive(decoder: FrameDecoder, payload: bytes) -> Any:
    """One big frame, its header first: the rest lands in the decoder's buffer."""
    wire = frame(payload)
    decoder.feed(wire[:HEADER_SIZE])
    assert decoder.next_frame() is None
    return read_with_recv_into(decoder, wire[HEADER_SIZE:], [])[0]


def test_a_buffer_is_never_reused_while_a_frame_or_blob_refers_to_it() -> None:
    pool = BufferPool()
    decoder = FrameDecoder(pool=pool)
    other = bytes(reversed(BIG))
    first = receive(decoder, BIG)
    assert type(first) is memoryview
    blob = first[10:20]  # a decoded message keeps views like this one
    del first
    second = receive(decoder, other)
    assert second == other and blob == BIG[10:20]  # the first buffer was left alone
    assert len(pool._buffers) == 2
    del second
    gc.collect()
    third = receive(decoder, BIG)
    assert third == BIG and blob == BIG[10:20]
    assert len(pool._buffers) == 2  # the second frame's buffer, free again, was reused
    del blob, third
    assert receive(decoder, other) == other and len(pool._buffers) == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_does_not_write_into_its_parents_buffers() -> None:
    """A function may fork (``multiprocessing``); the child inherits the pool.
    Its buffers must be the child's own copies (a private mapping), or a frame
    the child receives lands in a buffer the parent is using."""
    pool = BufferPool()
    buffer = pool.take(BIG_FRAME)
    buffer[:4] = b"mine"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads around
        pid = os.fork()
    if pid == 0:  # the child: receives "its" frame into the buffer, and leaves
        try:
            buffer[:4] = b"kids"
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert buffer[:4] == b"mine"


def test_the_pool_keeps_at_most_its_limit() -> None:
    pool = BufferPool(max_bytes=3 * BIG_FRAME)
    held = [pool.take(2 * BIG_FRAME), pool.take(2 * BIG_FRAME)]  # the second does not fit
    assert pool.pooled_bytes == 2 * BIG_FRAME
    del held
    assert len(pool.take(BIG_FRAME)) == 2 * BIG_FRAME  # a free, big enough one
    big = pool.take(3 * BIG_FRAME)  # evicts the free one to make room
    assert pool.pooled_bytes == 3 * BIG_FRAME and pool._buffers == [big]


def test_frame_parts_join_small_payloads_and_gather_big_ones() -> None:
    assert frame_parts(b"abc") == [frame(b"abc")]
    assert frame_parts(Gather([b"a", memoryview(b"bc")])) == [frame(b"abc")]
    parts = frame_parts(Gather([b"head", BIG]))
    assert parts[0] == LEN.pack(4 + len(BIG)) and parts[2] is BIG
    assert b"".join(parts) == frame(b"head" + BIG)
    with pytest.raises(ValueError, match="max_frame_size=10"):
        frame_parts(Gather([b"x" * 11]), max_frame_size=10)


# --------------------------------------------------------------------------- messages

def trigger(**changes: Any) -> m.Trigger:
    fields: dict[str, Any] = dict(
        run_id="r", function="b", functions=["a", "b", "c"], versions=["1", "1", "1"],
        placement=["x", "x", "y"], edges=[["a", "b"], ["b", "c"]], arg_fns=["a", "c"],
        arg_blobs=[b"args of a", b"args of c"], source="a", result=b"r", failed=False,
        result_key="k", output_key=None, direct=False, consistency="NORMAL",
        client_id=None, deadline=None, scheduler="")
    fields.update(changes)
    return m.Trigger(**fields)


def test_join_puts_a_big_gather_into_a_pooled_buffer() -> None:
    pool = BufferPool()
    gather = Gather([b"head", memoryview(BIG), bytearray(b"tail")])
    joined = join(gather, pool)
    assert type(joined) is memoryview and joined.readonly and joined == bytes(gather)
    first = id(joined.obj)
    assert id(join(gather, pool).obj) != first  # still referred to: another buffer
    del joined
    gc.collect()
    again = join(gather, pool)
    assert id(again.obj) == first  # released: the same (warm) buffer again
    assert again == bytes(gather) and len(pool._buffers) == 2
    small = Gather([b"a", memoryview(b"bc")])
    assert join(small, pool) == b"abc" and type(join(small, pool)) is bytes
    assert join(b"plain", pool) == b"plain"


def test_big_blobs_are_gathered_not_joined_and_decode_as_views() -> None:
    msg = trigger(result=BIG, carried=b"c" * 100, arg_blobs=[BIG, b"small"])
    payload = m.encode_gather(msg, 7)
    assert type(payload) is Gather and any(p is BIG for p in payload.parts)
    assert bytes(payload) == m.encode(msg, 7)
    for wire in (bytes(payload), memoryview(bytes(payload)).toreadonly()):
        got, request_id, _ = m.decode(wire)
        assert got == msg and request_id == 7
        assert type(got.result) is memoryview and type(got.arg_blobs[0]) is memoryview
        # small blobs, and plain bytes fields, are bytes of their own
        assert type(got.arg_blobs[1]) is bytes and type(got.carried) is bytes
    big_put = m.KvsPut("key", BIG)
    got_put = m.decode(memoryview(m.encode(big_put)))[0]
    assert type(got_put.lattice) is bytes and got_put == big_put  # not a Blob field


def test_small_messages_stay_bytes() -> None:
    assert type(m.encode_gather(trigger())) is bytes


def test_a_gathered_blob_is_one_blob_on_the_wire() -> None:
    value = dumps_value([BIG])
    assert type(value) is Gather
    msg = m.CallDag("f", True, ["f"], [value])
    got = m.decode(bytes(m.encode_gather(msg)))[0]
    assert loads(got.arg_blobs[0]) == [BIG]


def test_a_truncated_big_blob_is_a_protocol_error() -> None:
    wire = m.encode(trigger(result=BIG))
    with pytest.raises(ProtocolError, match="exceeds the frame"):
        m.decode(memoryview(wire[:-1]))


# --------------------------------------------------------------------------- values

@pytest.mark.parametrize("value", [
    BIG, bytearray(BIG), [BIG, 1, "x"], (BIG, BIG[:OUT_OF_BAND_MIN]), [b"small", 2],
    {"nested": BIG},  # not lifted (in band), still a correct round trip
])
def test_out_of_band_round_trips(value: Any) -> None:
    blob = dumps_value(value)
    for wire in ([blob] if type(blob) is bytes else [blob, bytes(blob)]):
        assert loads(wire) == value
        assert loads(memoryview(bytes(wire)).toreadonly()) == value
        assert type(loads(wire)) is type(value)


def test_big_bytes_leave_the_pickle_stream() -> None:
    blob = dumps_value([BIG, BIG])
    assert type(blob) is Gather
    stream = blob.parts[1]
    assert len(stream) < 200 and sum(1 for p in blob.parts if p == BIG) == 1
    first, second = loads(bytes(blob))
    assert first is second  # the same object twice stays one object
    assert type(first) is bytes


def test_a_big_bytes_rebuilt_in_the_same_process_is_the_same_object() -> None:
    """In one process (no wire), an immutable ``bytes`` needs no copy; writable
    buffers and slices still get their own."""
    assert loads(dumps_value(BIG)) is BIG
    assert loads(dumps_value((BIG, 1)))[0] is BIG
    part = loads(dumps_value([BIG[1:]]))[0]
    assert part == BIG[1:]
    mine = bytearray(BIG)
    copied = loads(dumps_value(mine))
    assert copied == mine and copied is not mine
    received = loads(memoryview(bytes(dumps_value(BIG))).toreadonly())
    assert received == BIG and received is not BIG


def test_small_values_stay_plain_pickles() -> None:
    blob = dumps_value([1, b"x" * (OUT_OF_BAND_MIN - 1)])
    assert type(blob) is bytes and blob[0] == 0x80
    assert loads(blob) == [1, b"x" * (OUT_OF_BAND_MIN - 1)]


def test_writable_buffers_come_back_writable_and_private() -> None:
    wire = memoryview(bytes(dumps_value([bytearray(BIG)]))).toreadonly()
    (got,) = loads(wire)
    got[0] ^= 0xFF  # its own copy: the frame is read-only and unchanged
    assert got[1:] == BIG[1:] and wire.readonly


def test_numpy_arrays_travel_out_of_band() -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(OUT_OF_BAND_MIN, dtype=np.int64)
    blob = dumps_value({"a": array})
    assert type(blob) is Gather and len(blob.parts[1]) < 500
    got = loads(memoryview(bytes(blob)).toreadonly())["a"]
    assert (got == array).all() and got.flags.writeable
    got[0] = 99  # a private, writable copy
    assert array[0] == 0


def test_a_read_only_array_over_a_writable_one_is_still_copied() -> None:
    """Read-only is not immutable: a read-only view's base may change later.
    A snapshot (an executor's result) and a private copy (a local hand-off)
    must not see that change, as a plain pickle never did."""
    from droplet.executor.copies import private

    np = pytest.importorskip("numpy")
    base = np.zeros(OUT_OF_BAND_MIN, dtype=np.int64)
    view = base.view()
    view.flags.writeable = False
    sent = dumps_value(view, snapshot=True)
    mine = private(view)
    base[:2] = 7  # the function that returned the view changes it afterwards
    assert loads(memoryview(bytes(sent)).toreadonly())[0] == 0
    assert mine[0] == 0


def test_malformed_out_of_band_values_fail_to_unpickle() -> None:
    good = bytes(dumps_value([BIG]))
    for bad in (good[:5], good[:-1], good + b"x"):
        with pytest.raises(pickle.UnpicklingError):
            loads(bad)


def test_a_malformed_buffer_count_is_refused_before_it_costs_memory() -> None:
    """A header claiming 2**32 - 1 buffers is refused from the header, not after
    reading (and keeping) a length for every 9 bytes of the value."""
    import tracemalloc

    blob = struct.pack("<BII", 0, 2**32 - 1, 0) + bytes(4 * 1024 * 1024)
    tracemalloc.start()
    try:
        for bad in (blob, memoryview(blob)):
            with pytest.raises(pickle.UnpicklingError):
                loads(bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024  # unchecked: ~30 MB of tuples


def test_mentions_searches_the_stream_only() -> None:
    class DropletReferenceLike:
        pass

    assert mentions(dumps_value([BIG]), b"builtins")
    assert mentions(bytes(dumps_value([BIG])), b"builtins")
    assert not mentions(dumps_value([BIG]), b"\x00\x01\x02\x03")  # in the raw buffer only
    assert mentions(memoryview(pickle.dumps([list(range(20_000)), "needle"])), b"needle")
    assert not mentions(pickle.dumps([1]), b"needle")


def test_mentions_of_a_malformed_value_is_a_conservative_yes() -> None:
    """It is a pre-check (an executor's pipelining asks it before anything is
    unpickled): it must not raise, or the run dies unanswered."""
    good = bytes(dumps_value([BIG]))
    for bad in (b"\x00", good[:5], good[:-1], good + b"x"):
        assert mentions(bad, b"DropletReference")
        assert mentions(memoryview(bad), b"DropletReference")


# --------------------------------------------------------------------------- downstream

def test_downstream_triggers_drop_the_arguments_of_functions_that_ran() -> None:
    t = trigger(function="a", source=None, result=None)
    assert ahead_of(t.edges, "b") == {"b", "c"}
    assert arguments_for(t, "b") == {"arg_fns": ["c"], "arg_blobs": [b"args of c"]}
    assert arguments_for(t, "c") == {"arg_fns": ["c"], "arg_blobs": [b"args of c"]}
    assert arguments_for(trigger(arg_fns=["c"], arg_blobs=[b"c"]), "c") == {}


def test_private_copies_of_big_buffers_are_copies() -> None:
    from droplet.executor.copies import private

    assert private(BIG) is BIG  # immutable: no copy at all
    mine = bytearray(BIG)
    theirs = private([mine, mine])
    assert theirs == [mine, mine] and theirs[0] is theirs[1] and theirs[0] is not mine
    theirs[0][0] ^= 0xFF
    assert mine == BIG


# --------------------------------------------------------------------------- node memory

def test_retained_memory_setting() -> None:
    from droplet.node._memory import ENV, keep_freed_memory

    assert keep_freed_memory({ENV: "0"}) is False  # off: the allocator is left alone
    with pytest.raises(ValueError, match="DROPLET_RETAIN_MEMORY must be a number of bytes"):
        keep_freed_memory({ENV: "lots"})


_ARENA_PROBE = """
import resource, sys, threading
from droplet.node._memory import keep_freed_memory
assert keep_freed_memory({})
source = memoryview(b"x" * (16 << 20))
faults, turn, ready = [], threading.Lock(), threading.Barrier(4)
def work():
    mine = [bytearray(64) for _ in range(64)]  # this thread's first allocations
    ready.wait()  # all four alive at once: glibc would give each its own arena
    with turn:
        for _ in range(2):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            copy = bytes(source)
            del copy
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    ready.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(*faults)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_big_allocations_in_any_thread_reuse_freed_memory() -> None:
    """After :func:`keep_freed_memory`, a big value freed by one worker thread is
    the memory the next one gets, in whatever thread: page faults only the
    first time (per-thread arenas faulted in every thread's first 16 MiB, and,
    for bigger values, on every call)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _ARENA_PROBE], capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    faults = [int(n) for n in out]
    assert len(faults) == 8 and faults[0] > 1000  # the first one touches fresh pages
    assert max(faults[1:]) < 100, faults


def test_a_node_refuses_a_bad_retained_memory_setting(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from droplet.node._main import main

    monkeypatch.setenv("DROPLET_RETAIN_MEMORY", "lots")
    assert main(["--role", "executor", "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "DROPLET_RETAIN_MEMORY" in capsys.readouterr().err


# --------------------------------------------------------------------------- copies

def deliver(parts: list[Any], decoder: FrameDecoder) -> Any:
    """Stand-in for the socket: header fed, the rest written into the decoder's
    buffer as ``recv_into`` does (no allocation of ours)."""
    header, rest = bytes(parts[0][:HEADER_SIZE]), [memoryview(parts[0])[HEADER_SIZE:], *parts[1:]]
    decoder.feed(header)
    assert decoder.next_frame() is None
    for part in rest:
        part = memoryview(part)
        while part.nbytes:
            target = decoder.receive_buffer()
            assert target is not None
            n = min(len(target), part.nbytes)
            target[:n] = part[:n]
            decoder.received(n)
            part = part[n:]
    return decoder.next_frame()


def test_a_big_argument_is_copied_once_from_client_to_function() -> None:
    """Client -> scheduler -> executor, the way the services do it: the only
    allocation the argument's size is the ``bytes`` the function receives."""
    import tracemalloc

    from droplet.client._core import ClientCore

    data = bytes(range(256)) * (8 * 1024 * 1024 // 256)  # 8 MiB
    pool = BufferPool()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        call = ClientCore().dag_call("dag", {"f": data}, False, "NORMAL", None, None, None)
        wire = frame_parts(m.encode_gather(call, 1))
        received = deliver(wire, FrameDecoder(pool=pool))  # the scheduler
        got = m.decode(received)[0]
        assert type(got.arg_blobs[0]) is memoryview
        t = trigger(function="f", functions=["f"], versions=["1"], placement=["x"], edges=[],
                    arg_fns=got.arg_fns, arg_blobs=got.arg_blobs, source=None, result=None)
        del wire, received, got, call
        wire = frame_parts(m.encode_gather(t))
        received = deliver(wire, FrameDecoder(pool=pool))  # the executor
        (arg,) = loads(m.decode(received)[0].arg_blobs[0])
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert arg == data and type(arg) is bytes
    assert now - start >= len(data)  # the function's own bytes...
    assert peak - start < 1.5 * len(data)  # ...and no other copy, ever


def test_a_snapshot_does_not_change_with_the_buffer_it_was_taken_of() -> None:
    np = pytest.importorskip("numpy")
    kept = bytearray(BIG)
    array = np.zeros(OUT_OF_BAND_MIN, dtype=np.uint8)
    blob = dumps_value([kept, array], snapshot=True)
    kept[0] ^= 0xFF  # the function changes what it returned, before the send
    array[0] = 7
    got_kept, got_array = loads(memoryview(bytes(blob)).toreadonly())
    assert got_kept == BIG and type(got_kept) is bytearray
    assert got_array[0] == 0 and got_array.flags.writeable
    live = dumps_value([kept])  # without snapshot: views of the live buffers
    assert loads(live) == [kept] and loads(live)[0] is not kept


def test_each_source_gets_only_the_arguments_ahead_of_it() -> None:
    t = trigger(function="a", functions=["a", "x", "c"], edges=[["a", "c"], ["x", "c"]],
                arg_fns=["a", "x", "c"], arg_blobs=[b"A", b"X", b"C"], source=None,
                result=None, placement=["p", "q", "p"], versions=["1", "1", "1"])
    assert arguments_for(t, "a") == {"arg_fns": ["a", "c"], "arg_blobs": [b"A", b"C"]}
    assert arguments_for(t, "x") == {"arg_fns": ["x", "c"], "arg_blobs": [b"X", b"C"]}
