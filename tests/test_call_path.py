"""The fast call path: calls that skip the wait for CallAccepted.

A client waits for the scheduler's acceptance only for the first call of a
given shape; later calls of that shape go one-way and a refusal reaches the
future's ``get()`` through the result key. Checked on both client backends
(async over inproc, and the blocking-socket client over TCP).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

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
    async with droplet.open_local_cluster(executors=2) as running:
        async with running.client() as client:
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
    with DropletConnection(tcp_cluster.address, timeout=30) as connection:
        assert isinstance(connection._backend, BlockingClient)
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
