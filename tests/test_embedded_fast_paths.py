"""The embedded call path's shortcuts, end to end and piece by piece.

- An ``inproc://`` connection that carries objects hands a frame to the
  receiving Peer in the sender's task while the receiver waits with nothing
  queued (``InprocConnection.take_directly``, ``Peer._take_now``): replies,
  and requests the handler's synchronous side serves (an executor's direct
  run). Order is kept; anything else goes through the reader as before.
- Direct runs of ``async def`` functions that never suspend run at once where
  the trigger arrives (``executor/inline.py``).
- ``AsyncDropletFuture.get`` waits on the client's deadline heap
  (``client/_deadlines.py``) instead of a cancel scope per wait.

Each behaviour runs in both encodings where it exists in both.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import trio
import trio.testing

import droplet
from droplet.executor.inline import never_suspends
from droplet.links import connect_peer, serve_peers
from droplet.protocol.messages import ErrorReply, KvsGet, KvsValue, Ok
from droplet.rpc import DEFERRED, NOT_NOW, Limits, Peer
from droplet.transports.base import TransportOptions

BOTH = pytest.mark.parametrize("skip", [False, True], ids=["frames", "objects"])


async def _square(_: Any, x: int) -> int:
    return x * x


async def _increment(_: Any, x: int) -> int:
    return x + 1


async def _fails(_: Any, x: int) -> int:
    raise ValueError(f"no good: {x}")


async def _awaits(_: Any, x: int) -> int:
    await trio.lowlevel.checkpoint()
    return x - 1


async def _forever(_: Any) -> None:
    await trio.sleep_forever()


async def _gated(lib: Any, x: int) -> int:
    while not await lib.aget("gate"):  # noqa: ASYNC110 (the gate is a key in the store)
        await trio.sleep(0.01)
    return x


async def _reference_to(_: Any, key: str) -> droplet.DropletReference:
    return droplet.DropletReference(key)


class _Adder:
    def __init__(self, lib: Any, n: int) -> None:
        self.n = n

    async def run(self, lib: Any, x: int) -> int:
        return x + self.n


def _inline_calls(cluster: Any) -> int:
    return sum(ex.statistics().inline_calls for ex in cluster.node.executors)


# --------------------------------------------------------------------------- never_suspends


def test_never_suspends_tells_awaiting_code_apart() -> None:
    async def plain(_: Any) -> int:
        return 1

    async def awaiting(_: Any) -> None:
        await trio.sleep(1)

    async def looping(it: Any) -> None:
        async for _ in it:
            pass

    async def managing(cm: Any) -> None:
        async with cm:
            pass

    async def comprehending(it: Any) -> list[Any]:
        return [x async for x in it]

    def sync(_: Any) -> int:
        return 1

    assert never_suspends(plain) and never_suspends(_square)
    assert never_suspends(_Adder(None, 1).run)  # a method: its function's code
    for target in (awaiting, looping, managing, comprehending, _awaits, _forever):
        assert not never_suspends(target), target
    for target in (sync, lambda _: 1, len, 3, None):
        assert not never_suspends(target)


# --------------------------------------------------------------------------- end to end


@BOTH
async def test_a_dag_of_never_suspending_functions_runs_at_once(skip: bool) -> None:
    async with droplet.open_local_cluster(2, skip_encoding=skip) as cluster, \
            cluster.client() as cloud:
        await cloud.register(_square, "sq")
        await cloud.register(_increment, "inc")
        await cloud.register_dag("d", ["sq", "inc"], [("sq", "inc")])
        results = [await (await cloud.call_dag("d", {"sq": [i]})).get() for i in range(40)]
        assert results == [i * i + 1 for i in range(40)]
        assert await (await cloud.exec_func("sq", [7])).get() == 49
        assert _inline_calls(cluster) >= 40
        # The result key still works for a call answered at once.
        future = await cloud.call_dag("d", {"sq": [5]})
        assert await future.get() == 26
        assert await cloud.get_object(future.obj_id) == 26
        # The executors' counters count every function of the inline runs.
        stats = [ex.statistics() for ex in cluster.node.executors]
        assert sum(s.invocations for s in stats) >= 2 * 41 + 1
        assert all(s.running == 0 and s.tasks == 0 and s.mailboxes == 0 for s in stats)


@BOTH
async def test_errors_of_functions_run_at_once_are_the_calls_errors(skip: bool) -> None:
    async with droplet.open_local_cluster(1, skip_encoding=skip) as cluster, \
            cluster.client() as cloud:
        await cloud.register(_square, "sq")
        await cloud.register(_fails, "bad")
        await cloud.register_dag("first", ["bad", "sq"], [("bad", "sq")])
        await cloud.register_dag("second", ["sq", "bad"], [("sq", "bad")])
        with pytest.raises(droplet.FunctionError, match="no good: 3"):
            await (await cloud.call_dag("first", {"bad": [3]})).get()
        with pytest.raises(droplet.FunctionError, match="no good: 9"):
            await (await cloud.call_dag("second", {"sq": [3]})).get()
        with pytest.raises(droplet.FunctionError, match="argument"):
            await (await cloud.exec_func("sq", [1, 2, 3])).get()  # too many arguments
        before = sum(ex.statistics().failures for ex in cluster.node.executors)
        assert before >= 3 and _inline_calls(cluster) >= 3
        assert await (await cloud.exec_func("sq", [4])).get() == 16  # the executor serves on
        running = [ex.statistics() for ex in cluster.node.executors]
        assert all(s.running == 0 and s.tasks == 0 and s.mailboxes == 0 for s in running)


@BOTH
async def test_functions_that_await_take_the_ordinary_path(skip: bool) -> None:
    async with droplet.open_local_cluster(1, skip_encoding=skip) as cluster, \
            cluster.client() as cloud:
        await cloud.register(_square, "sq")
        await cloud.register(_awaits, "aw")
        await cloud.register((_Adder, (10,)), "adder")
        await cloud.register_dag("mixed", ["sq", "aw"], [("sq", "aw")])
        assert await (await cloud.call_dag("mixed", {"sq": [3]})).get() == 8
        assert _inline_calls(cluster) == 0  # one function awaits: a task runs the run
        # A class registration whose instance is not built yet: the ordinary path
        # builds it; once built, its never-suspending run() goes at once.
        assert await (await cloud.exec_func("adder", [1])).get() == 11
        assert await (await cloud.exec_func("adder", [2])).get() == 12
        assert _inline_calls(cluster) == 1


@BOTH
async def test_a_reference_between_functions_is_resolved_in_a_task(skip: bool) -> None:
    async with droplet.open_local_cluster(1, skip_encoding=skip) as cluster, \
            cluster.client() as cloud:
        await cloud.register(_reference_to, "ref")
        await cloud.register(_increment, "inc")
        await cloud.register_dag("d", ["ref", "inc"], [("ref", "inc")])
        await cloud.put_object("k", 41)
        # The call names no reference (only the function's result does), so it goes
        # direct at once; the executor's cache has not read "k": a task reads it.
        assert await (await cloud.call_dag("d", {"ref": ["k"]})).get() == 42
        # Now cached: resolved at once.
        assert await (await cloud.call_dag("d", {"ref": ["k"]})).get() == 42
        assert _inline_calls(cluster) == 2


async def test_calls_answered_at_once_still_let_other_tasks_run() -> None:
    async with droplet.open_local_cluster(1, skip_encoding=True) as cluster, \
            cluster.client() as cloud:
        await cloud.register(_square, "sq")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            before = ticks
            for i in range(200):
                assert await (await cloud.exec_func("sq", [i])).get() == i * i
            nursery.cancel_scope.cancel()
        assert ticks - before >= 200 // 32  # at least one schedule point per 32 calls
        assert _inline_calls(cluster) >= 200


@BOTH
async def test_an_embedded_call_takes_no_task_switch(skip: bool) -> None:
    """Counting work, not time: a 2-function DAG answered within its own send."""

    class Steps(trio.abc.Instrument):
        def __init__(self) -> None:
            self.steps = 0

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            self.steps += 1

    # no load report falls in the counted calls (it would take a few steps)
    async with droplet.open_local_cluster(2, skip_encoding=skip,
                                          report_interval=3600) as cluster, \
            cluster.client() as cloud:
        await cloud.register(_square, "sq")
        await cloud.register(_increment, "inc")
        await cloud.register_dag("d", ["sq", "inc"], [("sq", "inc")])
        for _ in range(5):
            await (await cloud.call_dag("d", {"sq": [3]})).get()
        await trio.testing.wait_all_tasks_blocked()
        steps = Steps()
        trio.lowlevel.add_instrument(steps)
        try:
            for _ in range(64):
                assert await (await cloud.call_dag("d", {"sq": [3]})).get() == 10
        finally:
            trio.lowlevel.remove_instrument(steps)
        # The periodic schedule points (2) and what they let run now and then;
        # through tasks, each call took 2 to 7 steps (128 to 448 here).
        assert steps.steps <= 16


# --------------------------------------------------------------------------- timeouts


async def test_get_times_out_in_virtual_time_per_wait(
        autojump_clock: trio.testing.MockClock) -> None:
    async with droplet.open_local_cluster(1, skip_encoding=True) as cluster, \
            cluster.client() as cloud:
        await cloud.put_object("gate", False)
        fn = await cloud.register(_forever, "forever")
        gated = await cloud.register(_gated, "gated")
        slow, late = await fn(), await gated(5)
        outcomes: dict[str, Any] = {}

        async def wait(name: str, future: Any, timeout: float) -> None:
            start = trio.current_time()
            try:
                outcomes[name] = await future.get(timeout=timeout)
            except droplet.TimeoutError:
                outcomes[name] = ("timeout", trio.current_time() - start)

        async with trio.open_nursery() as nursery:
            # the later deadline first: the earlier one must still wake on time
            nursery.start_soon(wait, "long", late, 100)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait, "short", slow, 2)
            await trio.sleep(10)
            assert outcomes["short"] == ("timeout", pytest.approx(2))
            assert "long" not in outcomes
            await cloud.put_object("gate", True)
        assert outcomes["long"] == 5
        # a second wait on a future that timed out: again its own timeout
        start = trio.current_time()
        with pytest.raises(droplet.TimeoutError, match="3 s"):
            await slow.get(timeout=3)
        assert trio.current_time() - start == pytest.approx(3)


async def test_a_cancelled_get_leaves_the_future_usable() -> None:
    async with droplet.open_local_cluster(1, skip_encoding=True) as cluster, \
            cluster.client() as cloud:
        await cloud.put_object("gate", False)
        gated = await cloud.register(_gated, "gated")
        future = await gated(8)
        with trio.move_on_after(0.05) as scope:
            await future.get(timeout=30)
        assert scope.cancelled_caught
        await cloud.put_object("gate", True)
        with trio.fail_after(30):
            assert await future.get() == 8
        assert cloud._deadlines._live == 0


async def test_many_waits_keep_the_deadline_heap_small() -> None:
    async with droplet.open_local_cluster(1, skip_encoding=True) as cluster, \
            cluster.client() as cloud:
        fn = await cloud.register(_awaits, "aw")  # answered later: every get() waits
        for i in range(300):
            assert await (await fn(i)).get() == i - 1
        assert len(cloud._deadlines._heap) <= 64 + 1


# --------------------------------------------------------------------------- the hand-over


class _Service:
    """A handler with a synchronous side: counts which side served what."""

    def __init__(self) -> None:
        self.now = 0
        self.later = 0
        self.deferred: list[tuple[Peer, int]] = []

    async def handle(self, peer: Peer, msg: Any, request_id: int) -> Any:
        self.later += 1
        return KvsValue(msg.key, b"later")

    def handle_now(self, peer: Peer, msg: Any, request_id: int) -> Any:
        if msg.key == "decline":
            return NOT_NOW
        if msg.key == "raise":
            raise droplet.DropletError("refused at once")
        if msg.key == "defer":
            self.deferred.append((peer, request_id))
            return DEFERRED
        self.now += 1
        return KvsValue(msg.key, b"now")


async def _serve(nursery: trio.Nursery, service: _Service, skip: bool,
                 limits: Limits | None = None) -> str:
    url: str = await nursery.start(lambda task_status: serve_peers(
        "inproc://", service.handle, options=TransportOptions(skip_encoding=skip),
        limits=limits, now=service.handle_now, task_status=task_status))
    return url


@BOTH
async def test_requests_are_served_in_the_senders_task_when_the_reader_waits(
        skip: bool) -> None:
    service = _Service()
    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, service, skip)
        peer = await connect_peer(url, nursery)
        await trio.testing.wait_all_tasks_blocked()
        assert peer.conn.carries_objects is skip
        reply = await peer.request(KvsGet("a"), 10)
        assert reply.lattice == b"now"  # frames too: the same bytes, decoded at once
        assert (service.now, service.later) == (1, 0)
        assert (await peer.request(KvsGet("decline"), 10)).lattice == b"later"
        await trio.testing.wait_all_tasks_blocked()  # the reader waits again
        # an error of the synchronous side is the request's error reply
        with pytest.raises(droplet.DropletError, match="refused at once"):
            await peer.request(KvsGet("raise"), 10)
        assert not peer.closed
        # a deferred request is answered later, by post_reply, to the right slot
        await trio.testing.wait_all_tasks_blocked()
        (slot,) = await peer.submit(KvsGet("defer"))
        (target, request_id), = service.deferred
        target.post_reply(request_id, Ok())
        assert slot.event.is_set() and type(slot.value) is Ok
        nursery.cancel_scope.cancel()


async def test_frames_queued_first_are_handled_first() -> None:
    """A reply sent while the reader has a frame queued goes behind it, not around it."""
    service = _Service()
    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, service, True)
        peer = await connect_peer(url, nursery)
        await trio.testing.wait_all_tasks_blocked()
        # Two requests in one write: the first is served at once, the second too
        # (the reader still waits with nothing queued after the first).
        slots = await peer.submit(KvsGet("a"), KvsGet("decline"), KvsGet("b"))
        # "decline" went to the queue; "b" must queue behind it, not be served now.
        assert service.now == 1
        with trio.fail_after(10):
            values = [(await peer.wait(s, 10, "KvsGet")).lattice for s in slots]
        assert values == [b"now", b"later", b"later"]
        assert (service.now, service.later) == (1, 2)
        # once the reader has drained the queue, offers resume
        await trio.testing.wait_all_tasks_blocked()
        assert (await peer.request(KvsGet("c"), 10)).lattice == b"now"
        nursery.cancel_scope.cancel()


async def test_the_inflight_limit_holds_for_requests_served_at_once() -> None:
    service = _Service()
    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, service, True, Limits(max_inflight=1))
        peer = await connect_peer(url, nursery)
        await trio.testing.wait_all_tasks_blocked()
        (first,) = await peer.submit(KvsGet("defer"))  # holds the one in-flight slot
        (second,) = await peer.submit(KvsGet("x"))  # cannot be served now: queued
        assert service.now == 0 and not second.event.is_set()
        (target, request_id), = service.deferred
        target.post_reply(request_id, Ok())  # frees the slot; the reader serves "x"
        with trio.fail_after(10):
            assert (await peer.wait(second, 10, "KvsGet")).lattice == b"later"
        assert first.event.is_set()
        nursery.cancel_scope.cancel()


async def test_an_error_reply_taken_at_once_raises_its_error() -> None:
    async def handler(peer: Peer, msg: Any, request_id: int) -> Any:
        return ErrorReply("RegistrationError", "no such thing")  # a reply, as handlers may

    async with trio.open_nursery() as nursery:
        url = await nursery.start(lambda task_status: serve_peers(
            "inproc://", handler, options=TransportOptions(skip_encoding=True),
            now=lambda p, m, r: ErrorReply("RegistrationError", "no such thing"),
            task_status=task_status))
        peer = await connect_peer(url, nursery)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(droplet.RegistrationError, match="no such thing"):
            await peer.request(KvsGet("k"), 10)
        assert not peer.closed
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- sync: from threads

_RELEASE = threading.Event()


def _sq(_: Any, x: int) -> int:
    return x * x


def _inc(_: Any, x: int) -> int:
    return x + 1


def _raises(_: Any, x: int) -> int:
    raise KeyError(f"missing {x}")


def _blocks(_: Any, x: int) -> int:
    _RELEASE.wait(30)
    return x


def _uses_the_store(lib: Any, key: str, x: int) -> Any:
    lib.put(key, x)
    return lib.get(key)


def _big(_: Any, n: int) -> bytes:
    return b"x" * n


def _stats(cluster: droplet.LocalCluster) -> list[Any]:
    """The executors' statistics, read in the cluster's loop (where they are kept)."""

    async def read() -> list[Any]:
        return [ex.statistics() for ex in cluster.node.executors]

    return cluster._portal.run(read)


def _thread_calls(cluster: droplet.LocalCluster) -> int:
    return sum(s.thread_calls for s in _stats(cluster))


@BOTH
def test_sync_calls_go_from_the_callers_thread_to_a_worker(skip: bool) -> None:
    with droplet.LocalCluster(2, skip_encoding=skip) as cluster:
        conn = cluster.connect()
        conn.register(_sq, "sq")
        conn.register(_inc, "inc")
        conn.register_dag("d", ["sq", "inc"], [("sq", "inc")])
        assert [conn.call_dag("d", {"sq": [i]}).get() for i in range(30)] == \
            [i * i + 1 for i in range(30)]
        assert conn.exec_func("sq", [6]).get() == 36
        stats = _stats(cluster)
        assert sum(s.invocations for s in stats) == 2 * 30 + 1  # counted, every function
        assert all(s.running == 0 and s.mailboxes == 0 for s in stats)
        assert _thread_calls(cluster) >= 28  # the first calls ask for a placement
        # One after another: they stay on one executor (least outstanding, with
        # affinity: _direct.py); the first went through the scheduler.
        assert max(s.invocations for s in stats) >= 2 * 29
        future = conn.call_dag("d", {"sq": [4]})
        assert future.get() == 17
        assert conn.get_object(future.obj_id) == 17  # the result key still works


@BOTH
def test_sync_errors_from_threads_are_the_calls_errors(skip: bool) -> None:
    with droplet.LocalCluster(1, skip_encoding=skip) as cluster:
        conn = cluster.connect()
        conn.register(_raises, "bad")
        conn.register(_sq, "sq")
        for _ in range(2):  # the first asks for the placement; the second goes from here
            with pytest.raises(droplet.FunctionError, match="missing 3"):
                conn.exec_func("bad", [3]).get()
        with pytest.raises(droplet.FunctionError, match="argument"):
            conn.exec_func("sq", [1, 2]).get()
        assert sum(s.failures for s in _stats(cluster)) == 3
        assert conn.exec_func("sq", [3]).get() == 9


def _warm_blocks(conn: Any) -> None:
    """One call of ``blocks`` that returns at once: its placement is cached after it."""
    _RELEASE.set()
    assert conn.exec_func("blocks", [0]).get() == 0
    _RELEASE.clear()


def test_a_sync_call_from_a_thread_times_out_and_its_result_still_comes() -> None:
    with droplet.LocalCluster(1, skip_encoding=True) as cluster:
        conn = cluster.connect()
        conn.register(_blocks, "blocks")
        _warm_blocks(conn)
        future = conn.exec_func("blocks", [7])
        with pytest.raises(droplet.TimeoutError):
            future.get(timeout=0.2)
        _RELEASE.set()
        assert future.get(timeout=30) == 7
        assert _thread_calls(cluster) >= 1  # the blocked one went from this thread


def test_a_sync_call_in_flight_hears_when_its_executor_connection_ends() -> None:
    with droplet.LocalCluster(1, skip_encoding=True) as cluster:
        conn = cluster.connect()
        conn.register(_blocks, "blocks")
        conn.register(_sq, "sq")
        _warm_blocks(conn)
        future = conn.exec_func("blocks", [1])
        client = conn._backend._client
        (peer,) = client._direct._peers.values()
        conn._portal.run(peer.aclose)  # type: ignore[union-attr]
        with pytest.raises(droplet.ConnectionError):
            future.get(timeout=30)
        _RELEASE.set()
        assert conn.exec_func("sq", [5]).get() == 25  # dials the executor again


def test_async_functions_from_a_sync_client_go_the_ordinary_way() -> None:
    with droplet.LocalCluster(1, skip_encoding=True) as cluster:
        conn = cluster.connect()
        conn.register(_square, "asq")
        assert [conn.exec_func("asq", [i]).get() for i in range(5)] == [0, 1, 4, 9, 16]
        stats = _stats(cluster)
        assert sum(s.thread_calls for s in stats) == 0
        assert sum(s.inline_calls for s in stats) >= 3
        assert conn._backend._client._declined_from_thread  # not asked every call


def test_functions_run_from_threads_use_the_store_and_concurrent_callers() -> None:
    with droplet.LocalCluster(2, skip_encoding=True) as cluster:
        conn = cluster.connect()
        conn.register(_uses_the_store, "store")
        conn.register(_sq, "sq")
        assert conn.exec_func("store", ["k", 1]).get() == 1
        assert conn.exec_func("store", ["k", 2]).get() == 2
        results: dict[int, list[int]] = {}

        def caller(n: int) -> None:
            results[n] = [conn.exec_func("sq", [n * 100 + i]).get() for i in range(40)]

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert results == {n: [(n * 100 + i) ** 2 for i in range(40)] for n in range(4)}
        assert _thread_calls(cluster) >= 100


def test_a_result_too_big_for_the_connection_is_an_error_naming_the_limit() -> None:
    with droplet.LocalCluster(1, skip_encoding=True, max_frame_size=256 * 1024) as cluster:
        conn = cluster.connect()
        conn.register(_big, "big")
        assert conn.exec_func("big", [10]).get() == b"x" * 10
        with pytest.raises(droplet.DropletError, match="too large|exceeds|max_frame_size"):
            conn.exec_func("big", [512 * 1024]).get(timeout=30)
        assert conn.exec_func("big", [3]).get() == b"xxx"
