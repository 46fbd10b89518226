"""The fast call path: calls that skip the wait for CallAccepted.

A client waits for the scheduler's acceptance only for the first call of a
given shape; later calls of that shape go one-way and a refusal reaches the
future's ``get()`` through the result key. Checked on both client backends
(async over inproc, and the blocking-socket client over TCP).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio
import trio.testing

import droplet
from droplet import AsyncDropletClient, DropletConnection
from droplet.client._blocking import BlockingClient
from droplet.client._core import AcceptedCalls, ClientCore
from droplet.executor.service import ExecutorService
from droplet.protocol.messages import CallDag


def noop(_: object, x: object) -> object:
    return x


def square(_: object, x: int) -> int:
    return x * x


# --------------------------------------------------------------------------- the pure core


def test_accepted_calls_remember_shapes_and_forget_refusals() -> None:
    accepted = AcceptedCalls(limit=2)
    a = ClientCore.function_call("a", [1])
    assert not accepted.known(a)
    accepted.accepted(a)
    assert accepted.known(ClientCore.function_call("a", [2]))  # same shape, other args
    assert not accepted.known(ClientCore.function_call("b", [1]))
    accepted.accepted(ClientCore.function_call("b", [1]))
    accepted.accepted(ClientCore.function_call("c", [1]))  # over the limit: "a" goes
    assert not accepted.known(a)
    accepted.refused(ClientCore.function_call("c", [1]))
    assert not accepted.known(ClientCore.function_call("c", [1]))


def test_continuations_and_direct_calls_always_wait() -> None:
    core = ClientCore()
    nxt = core.dag_call("d2", {}, False, "NORMAL", None, None, None)
    then = core.dag_call("d1", {"f": 1}, False, "NORMAL", None, None, None, nxt)
    direct = core.dag_call("d1", {"f": 1}, True, "NORMAL", None, None, None)
    for call in (then, direct):
        core.accepted.accepted(call)
        assert not core.accepted.known(call)
    plain = core.dag_call("d1", {"f": 1}, False, "NORMAL", None, None, None)
    core.accepted.accepted(plain)
    assert core.accepted.known(plain)
    # Another set of functions given arguments is another shape (it may be refused).
    assert not core.accepted.known(core.dag_call("d1", {"g": 1}, False, "NORMAL", None,
                                                 None, None))
    assert isinstance(plain, CallDag)


# --------------------------------------------------------------------------- async client


@pytest.fixture
async def cloud() -> AsyncIterator[AsyncDropletClient]:
    """A client whose calls go through the scheduler (direct calls off)."""
    async with droplet.open_local_cluster(executors=2) as running:
        async with running.client() as client:
            client._direct.enabled = False
            yield client


async def test_later_calls_skip_the_acceptance(cloud: AsyncDropletClient) -> None:
    f = await cloud.register(noop, "p_noop")
    assert await (await f(1)).get() == 1
    assert cloud._core.accepted.known(ClientCore.function_call("p_noop", []))
    futures = [await f(i) for i in range(20)]
    assert [await fut.get() for fut in futures] == list(range(20))


async def test_a_refusal_after_acceptance_reaches_get(cloud: AsyncDropletClient) -> None:
    await cloud.register(square, "p_sq")
    await cloud.register(noop, "p_id")
    await cloud.register_dag("p_dag", ["p_sq", "p_id"], [("p_sq", "p_id")])
    assert await (await cloud.call_dag("p_dag", {"p_sq": 3})).get() == 9
    await cloud.delete_dag("p_dag")
    # The client no longer waits for the acceptance of this shape: the refusal
    # is the future's error, read from the result key.
    future = await cloud.call_dag("p_dag", {"p_sq": 3})
    with pytest.raises(droplet.DagError, match="no DAG named 'p_dag'"):
        await future.get(timeout=10)
    # A new call of an unknown shape is still refused at once.
    with pytest.raises(droplet.RegistrationError, match="no function named 'p_nope'"):
        await cloud.exec_func("p_nope", [1])
    # Registered again, the same shape runs again.
    await cloud.register_dag("p_dag", ["p_sq", "p_id"], [("p_sq", "p_id")])
    assert await (await cloud.call_dag("p_dag", {"p_sq": 4})).get() == 16


# --------------------------------------------------------------------------- blocking client


@pytest.fixture(scope="module")
def tcp_cluster() -> Iterator[droplet.LocalCluster]:
    with droplet.LocalCluster(executors=2, listen="tcp://127.0.0.1:0") as running:
        yield running


@pytest.fixture
def conn(tcp_cluster: droplet.LocalCluster) -> Iterator[DropletConnection]:
    """Calls through the scheduler (direct calls over TCP: e2e/test_direct_calls.py)."""
    with DropletConnection(tcp_cluster.address, timeout=30) as connection:
        assert isinstance(connection._backend, BlockingClient)
        connection._backend.direct.enabled = False
        yield connection


def test_blocking_calls_skip_the_acceptance(conn: DropletConnection) -> None:
    f = conn.register(noop, "b_noop")
    assert f(1).get() == 1
    futures = [f(i) for i in range(200)]  # one-way: no round trip each
    assert [fut.get() for fut in futures] == list(range(200))


def test_blocking_refusal_after_acceptance_reaches_get(conn: DropletConnection) -> None:
    conn.register(square, "b_sq")
    conn.register(noop, "b_id")
    conn.register_dag("b_dag", ["b_sq", "b_id"], [("b_sq", "b_id")])
    assert conn.call_dag("b_dag", {"b_sq": 3}).get() == 9
    conn.delete_dag("b_dag")
    future = conn.call_dag("b_dag", {"b_sq": 3})
    with pytest.raises(droplet.DagError, match="no DAG named 'b_dag'"):
        future.get(timeout=10)
    with pytest.raises(droplet.DagError, match="no DAG named 'b_other'"):
        conn.call_dag("b_other", {})


# --------------------------------------------------------------------------- prefetch


async def test_functions_are_loaded_at_registration_not_first_call() -> None:
    async with droplet.open_local_cluster(executors=2) as running:
        async with running.client() as client:
            await client.register(square, "pf_square")
            await trio.testing.wait_all_tasks_blocked()
            for executor in running.node.executors:
                assert executor.statistics().functions_loaded == 1
            assert await (await client.exec_func("pf_square", [3])).get() == 9


async def test_an_executor_joining_loads_what_is_registered() -> None:
    async with droplet.open_local_cluster(executors=1) as running:
        async with running.client() as client:
            await client.register(square, "pj_square")
            await client.register(noop, "pj_noop")
        node = running.node
        async with trio.open_nursery() as nursery:
            assert node.scheduler is not None
            joined = await ExecutorService.join(
                nursery, url="inproc://late-executor", scheduler_url=running.address,
                workers=1, token=None, threads=1)
            await trio.testing.wait_all_tasks_blocked()
            assert joined.statistics().functions_loaded == 2
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- direct calls


@pytest.fixture
async def direct() -> AsyncIterator[tuple[Any, AsyncDropletClient]]:
    async with droplet.open_local_cluster(executors=2) as running:
        async with running.client() as client:
            yield running, client


async def test_embedded_calls_go_straight_to_executors(
        direct: tuple[Any, AsyncDropletClient]) -> None:
    running, client = direct
    f = await client.register(square, "d_sq")
    await client.register(noop, "d_id")
    await client.register_dag("d_dag", ["d_sq", "d_id"], [("d_sq", "d_id")])
    assert [await (await f(i)).get() for i in range(6)] == [i * i for i in range(6)]
    assert sorted(client._direct.placed("d_sq")) == sorted(
        ex.url for ex in running.node.executors)
    # The scheduler placed none of these runs: the executors answered them.
    assert running.node.scheduler.statistics().runs_started == 0
    future = await client.call_dag("d_dag", {"d_sq": 5})
    assert await future.get() == 25
    assert client._direct.placed("d_dag", False)
    # The key is readable once handed out, and usable as a reference.
    key = future.obj_id
    assert await client.get_object(key) == 25
    assert await (await f(droplet.DropletReference(key))).get() == 625
    dag_ref = await client.call_dag("d_dag", {"d_sq": droplet.DropletReference(key)})
    assert await dag_ref.get() == 625
    assert client._direct.placed("d_dag", False, (key,))
    failing = await client.register(lambda _: 1 / 0, "d_fail")
    bad = await failing()
    with pytest.raises(droplet.FunctionError, match="ZeroDivisionError"):
        await bad.get()
    with pytest.raises(droplet.FunctionError, match="ZeroDivisionError"):
        await client.get_object(bad.obj_id)
    with pytest.raises(droplet.RegistrationError, match="no function named 'd_nope'"):
        await client.exec_func("d_nope", [1])
    # The call with a reference went direct too, placed by its data (its own placement).
    assert running.node.scheduler.statistics().runs_started == 0
    assert client._direct.placed("d_sq", True, (key,))


async def test_cached_placement_is_dropped_when_a_connection_ends(
        direct: tuple[Any, AsyncDropletClient]) -> None:
    running, client = direct
    f = await client.register(square, "c_sq")
    for i in range(4):
        assert await (await f(i)).get() == i * i
    cached = client._direct.placed("c_sq")
    assert len(cached) == 2
    gone = client._direct._peers[cached[0]]
    await gone.aclose()  # as when its executor leaves
    assert client._direct.placed("c_sq") == []  # the placement naming it went too
    assert cached[0] not in client._direct._peers
    assert [await (await f(i)).get() for i in range(4)] == [0, 1, 4, 9]
    assert len(client._direct.placed("c_sq")) == 2  # asked again, dialled again


def test_sync_embedded_calls_go_straight_to_executors() -> None:
    with droplet.LocalCluster(executors=2) as running:
        conn = running.connect()
        f = conn.register(square, "s_sq")
        futures = [f(i) for i in range(50)]  # after the first: posted, no wait
        assert [x.get() for x in futures] == [i * i for i in range(50)]
        key = futures[7].obj_id
        assert conn.get_object(key) == 49
        # with a reference: placed for it (first call), then posted
        by_ref = [f(droplet.DropletReference(key)) for _ in range(5)]
        assert [x.get() for x in by_ref] == [49 * 49] * 5
        assert [x.get() for x in f.map([droplet.DropletReference(key)] * 5)] == [49 * 49] * 5
        assert running.node.scheduler.statistics().runs_started == 0
        with pytest.raises(droplet.RegistrationError):
            conn.exec_func("s_nope", [])


def test_sync_embedded_dag_calls_are_posted_and_refusals_reach_get(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Calls naming a key this client just wrote go through the scheduler for a
    # second (tested in test_handout.py); here they are to go direct at once.
    monkeypatch.setattr("droplet.client._direct.WRITE_SETTLE", 0.0)
    with droplet.LocalCluster(executors=2) as running:
        conn = running.connect()
        conn.register(square, "t_sq")
        conn.register(noop, "t_id")
        conn.register_dag("t_dag", ["t_sq", "t_id"], [("t_sq", "t_id")])
        assert conn.call_dag("t_dag", {"t_sq": 2}).get() == 4  # places it
        futures = [conn.call_dag("t_dag", {"t_sq": i}) for i in range(20)]
        assert [f.get() for f in futures] == [i * i for i in range(20)]
        conn.put_object("t_key", 7)
        by_ref = [conn.call_dag("t_dag", {"t_sq": droplet.DropletReference("t_key")})
                  for _ in range(5)]
        assert [f.get() for f in by_ref] == [49] * 5
        assert running.node.scheduler.statistics().runs_started == 0
        # Arguments for a function outside the DAG: sent one-way, refused, in get().
        with pytest.raises(droplet.DagError, match="not in DAG 't_dag'"):
            conn.call_dag("t_dag", {"t_zz": 1}).get(timeout=10)
        with pytest.raises(droplet.DagError, match="dry_run=True"):
            conn.call_dag("t_dag", {"t_sq": 1}, continuation=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- held-back writes


def test_blocking_peer_holds_frames_back_under_load_and_keeps_their_order(
        tcp_cluster: droplet.LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from droplet.client import _blocking_peer
    from droplet.lattices import LWWLattice, encode_lattice
    from droplet.protocol.messages import KvsGet, KvsPut, KvsValue

    peer = _blocking_peer.BlockingPeer(tcp_cluster.address, token=None, timeout=10)
    woken: list[int] = []
    monkeypatch.setattr(peer, "_wake_writer", lambda: woken.append(1))  # no writer thread
    try:
        # Nothing in flight: written at once.
        (first,) = peer.submit(KvsGet("held/missing", 30.0), timeout=10, batch=True)
        assert not peer._outgoing
        # One request in flight: later ones are held back, in order.
        slots = [peer.submit(KvsPut(f"held/{i}", encode_lattice(LWWLattice.now(i))),
                             timeout=10, batch=True)[0] for i in range(5)]
        (read,) = peer.submit(KvsGet("held/4"), timeout=10, batch=True)
        # the writer is woken once, for the first frame held: it writes them all
        assert len(peer._outgoing) == 6 and len(woken) == 1
        # Waiting for a reply writes what is held first.
        reply = peer.wait(read, 10, "KvsGet")
        assert isinstance(reply, KvsValue) and reply.lattice is not None
        assert not peer._outgoing
        assert all(peer.wait(s, 10, "KvsPut") is not None for s in slots)
        # BATCH_FRAMES held: the submitting thread writes them itself.
        many = [peer.submit(KvsGet(f"held/{i % 5}"), timeout=10, batch=True)[0]
                for i in range(_blocking_peer.BATCH_FRAMES)]
        assert not peer._outgoing
        assert all(peer.wait(s, 10, "KvsGet").lattice is not None for s in many)
        assert not first.done  # still waiting for its key
    finally:
        peer.close()


def test_a_zero_timeout_wait_never_fails_the_connection_over_held_frames(
        tcp_cluster: droplet.LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """wait_any(..., 0) (as wait/as_completed poll each executor) while another
    thread holds the write lock: the held frames go later, the connection stays."""
    from droplet.client import _blocking_peer
    from droplet.protocol.messages import KvsGet, KvsValue

    peer = _blocking_peer.BlockingPeer(tcp_cluster.address, token=None, timeout=10)
    woken: list[int] = []
    monkeypatch.setattr(peer, "_wake_writer", lambda: woken.append(1))  # no writer thread
    try:
        (first,) = peer.submit(KvsGet("held/missing", 30.0), timeout=10, batch=True)
        (held,) = peer.submit(KvsGet("held/other"), timeout=10, batch=True)
        assert len(peer._outgoing) == 1
        with peer._send_lock:  # as if the writer thread were writing right now
            assert not peer.wait_any([held], 0)
        assert peer._failure is None and woken  # handed to the writer, not failed
        assert len(peer._outgoing) == 1
        reply = peer.wait(held, 10, "KvsGet")
        assert isinstance(reply, KvsValue) and reply.lattice is None
        assert not first.done
    finally:
        peer.close()


# --------------------------------------------------------------------------- draining


def gated(lib: Any, x: int) -> int:
    import time

    while not lib.get("gate"):
        time.sleep(0.005)
    return x * 2


async def test_draining_waits_for_direct_runs_and_is_no_longer_handed_out() -> None:
    async with droplet.open_local_cluster((1, 2), threads=2, report_interval=0.05,
                                          scale_up_after=1e6, scale_down_after=1e6
                                          ) as cluster, cluster.client() as cloud:
        pool = cluster.node.pool
        scheduler = cluster.node.scheduler
        assert pool is not None and scheduler is not None
        await cloud.put_object("gate", False)
        fn = await cloud.register(gated, "d_gated")
        second = pool.scale_up()
        with trio.fail_after(30):
            while scheduler.executor_url(second) is None:
                await scheduler.executors_changed.wait()
        url = scheduler.executor_url(second)
        assert url is not None
        futures = [await fn(i) for i in range(6)]  # straight to both executors, in turn
        assert url in cloud._direct.placed("d_gated")
        assert scheduler.executor_load(url) == (0, 0)  # none placed by the scheduler
        pool.scale_down(second)
        await trio.sleep(0.2)
        assert pool.slots[second] == "draining"
        # A new placement leaves it out; the drain waits for the runs sent there.
        cloud._direct.forget("d_gated", True)
        futures += [await fn(i) for i in range(6, 8)]
        assert url not in cloud._direct.placed("d_gated")
        await trio.sleep(3)  # past the placement lease: still running there, not retired
        assert url in scheduler.executor_urls
        await cloud.put_object("gate", True)
        with trio.fail_after(30):
            assert [await f.get() for f in futures] == [2 * i for i in range(8)]
            while pool.status().draining:
                await pool.changed.wait()
        assert url not in scheduler.executor_urls


async def test_draining_judges_direct_runs_by_a_report_after_the_leases(
        autojump_clock: trio.testing.MockClock) -> None:
    """A report sent before the placement leases ended may predate a run a client
    sent just before its lease ran out: the drain waits for a later report."""
    from types import SimpleNamespace

    from droplet.latency import BUCKETS
    from droplet.protocol.messages import ExecutorReport
    from droplet.scheduler.reports import ClusterView
    from droplet.scheduler.service import SchedulerService

    url = "tcp://127.0.0.1:1"

    def report(running: int) -> ExecutorReport:
        return ExecutorReport(url, 2, running, 0, running, 0, 0, 0, 0, [], [], [],
                              [0] * BUCKETS, [])

    view = ClusterView()
    view.join(url, 2)
    ex = SimpleNamespace(url=url, reported=trio.Event())
    scheduler = SimpleNamespace(_executors={url: ex}, view=view)

    def reported(running: int) -> None:
        view.report(report(running), trio.current_time())
        ex.reported.set()
        ex.reported = trio.Event()

    done = trio.Event()

    async def drain() -> None:
        await SchedulerService._direct_runs_done(scheduler, ex, trio.current_time() + 2)
        done.set()

    async with trio.open_nursery() as nursery:
        reported(0)  # idle when the drain began
        nursery.start_soon(drain)
        await trio.sleep(2.5)  # the leases ended; a run sent just before is still going
        assert not done.is_set()
        reported(1)  # the next report shows it
        await trio.sleep(0.1)
        assert not done.is_set()
        reported(0)
        with trio.fail_after(1):
            await done.wait()


async def test_a_cached_placement_runs_code_registered_since_by_another_client(
        direct: tuple[Any, AsyncDropletClient]) -> None:
    running, client = direct
    f = await client.register(square, "r_fn")
    assert [await (await f(i)).get() for i in range(4)] == [0, 1, 4, 9]  # both executors
    assert len(client._direct.placed("r_fn")) == 2
    async with running.client() as other:
        await other.register(noop, "r_fn")
    # This client's lease still stands, with the old version: the new code runs.
    assert len(client._direct.placed("r_fn")) == 2
    assert [await (await f(i)).get() for i in range(4)] == [0, 1, 2, 3]
    assert running.node.scheduler.statistics().runs_started == 0


async def test_a_shape_called_directly_needs_no_acceptance_through_the_scheduler(
        direct: tuple[Any, AsyncDropletClient]) -> None:
    running, client = direct
    f = await client.register(square, "a_sq")
    assert await (await f(3)).get() == 9  # straight to an executor
    # Its shape was placed, hence accepted: later calls through the scheduler
    # (here, direct calls turned off) go one-way instead of each waiting for
    # CallAccepted (a burst of thousands once took the old path's time).
    assert client._core.accepted.known(ClientCore.function_call("a_sq", []))
    client._direct.enabled = False
    futures = [await f(i) for i in range(10)]
    assert [await x.get() for x in futures] == [i * i for i in range(10)]
    assert running.node.scheduler.statistics().runs_started == 10


def test_a_posted_call_to_an_executor_gone_meanwhile_goes_through_the_scheduler(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from droplet.errors import ConnectionError as DropletConnectionError
    from droplet.rpc import Peer

    with droplet.LocalCluster(executors=2) as running:
        conn = running.connect()
        f = conn.register(square, "g_sq")
        assert f(3).get() == 9  # placed: later calls are posted straight to executors

        async def gone(self: Peer, *msgs: Any, oneway: Any = ()) -> Any:
            if self.remote.startswith("inproc://") and self.remote in placed:
                raise DropletConnectionError(f"connection to {self.remote} is closed")
            return await real(self, *msgs, oneway=oneway)

        client = conn._backend._client
        placed = set(client._direct.placed("g_sq"))
        real = Peer.submit
        monkeypatch.setattr(Peer, "submit", gone)
        # Posted to the loop (not handed over from this thread), whichever executor
        # the call sticks to: the executor's connection is found gone there.
        monkeypatch.setattr(Peer, "takes_from_threads", property(lambda self: False))
        assert f(4).get(timeout=10) == 16  # through the scheduler, not a ConnectionError
        assert client._direct.placed("g_sq") == []
        assert running.node.scheduler.statistics().runs_started == 1


async def test_map_and_kvs_reads_wait_for_handed_out_direct_keys(
        direct: tuple[Any, AsyncDropletClient]) -> None:
    _, client = direct
    f = await client.register(square, "k_sq")
    await client.register(noop, "k_id")

    async def handed_out(x: int) -> str:
        future = await f(x)
        assert await future.get() == x * x
        key = future.obj_id
        # answered to this client alone: it stores the result now, acked later
        assert [x._key for x in client._to_store] == [key]
        return key

    key = await handed_out(3)
    futures = await client.map("k_id", [droplet.DropletReference(key)])
    assert not client._to_store and not client._storing  # stored before the calls went out
    assert await futures[0].get() == 9
    key = await handed_out(4)
    assert (await client.kvs_client.get([key]))[key] is not None
    assert not client._to_store and not client._storing


class _Failing:
    broken = False


def test_a_one_way_call_that_fails_unexpectedly_reaches_get() -> None:
    from collections.abc import Sequence

    from droplet.scheduler import placement
    from droplet.scheduler.placement import Candidate, Context, PlacementPolicy, register_policy

    @register_policy
    class Flaky(PlacementPolicy):
        name = "flaky-test"

        def choose(self, pool: Sequence[Candidate], context: Context) -> str:
            if _Failing.broken:
                raise RuntimeError("policy bug")
            return pool[0].url

    try:
        with droplet.LocalCluster(executors=1, placement="flaky-test") as running:
            conn = running.connect()
            f = conn.register(square, "u_sq")
            assert f(3).get() == 9  # accepted: later calls of it go one-way
            _Failing.broken = True
            with pytest.raises(droplet.DropletError, match="internal error.*policy bug"):
                f(4).get(timeout=10)
    finally:
        _Failing.broken = False
        placement._REGISTRY.pop("flaky-test", None)  # other tests list the policies


async def test_async_map_goes_direct_and_survives_an_executor_leaving(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Calls naming a key this client just wrote go through the scheduler for a
    # second (tested in test_handout.py); here they are to go direct at once.
    monkeypatch.setattr("droplet.client._direct.WRITE_SETTLE", 0.0)
    async with droplet.open_local_cluster(executors=2, threads=2) as running, \
            running.client() as cloud:
        scheduler = running.node.scheduler
        await cloud.put_object("gate", False)
        fn = await cloud.register(gated, "m_gated")
        futures = await fn.map(range(12), chunksize=4)
        placed = cloud._direct.placed("m_gated")
        assert len(placed) == 2 and set(cloud._direct._peers) == set(placed)
        gone = cloud._direct._peers[placed[1]]
        await gone.aclose()  # as when its executor leaves mid-map
        await cloud.put_object("gate", True)
        outcomes: list[Any] = []
        with trio.fail_after(30):  # none hangs: each gets its result or a clear error
            for future in futures:
                try:
                    outcomes.append(await future.get())
                except droplet.ConnectionError:
                    outcomes.append("lost")
        # the first half went to the executor still there, the second to the one gone
        assert outcomes == [2 * i for i in range(6)] + ["lost"] * 6
        assert placed[1] not in cloud._direct._peers
        with trio.fail_after(30):
            assert [await f.get() for f in await fn.map(range(4))] == [0, 2, 4, 6]
        # references too: nothing went through the scheduler
        refs = await fn.map([droplet.DropletReference("gate")] * 2)
        with trio.fail_after(30):
            assert [await f.get() for f in refs] == [2, 2]  # True * 2
            assert await (await fn(droplet.DropletReference("gate"))).get() == 2
        assert cloud._direct.placed("m_gated", True, ("gate",))  # cached for single calls
        assert scheduler.statistics().runs_started == 0
