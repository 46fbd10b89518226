"""The blocking-socket backend of DropletConnection (tcp:// addresses).

The cluster runs embedded (in its own thread) behind a real loopback TCP
listener; the connection under test is driven by plain threads, no event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import droplet
from droplet import DropletConnection
from droplet.client._blocking import BlockingClient


@pytest.fixture(scope="module")
def cluster() -> Iterator[droplet.LocalCluster]:
    with droplet.LocalCluster(executors=2, listen="tcp://127.0.0.1:0",
                              max_frame_size=256 * 1024) as running:
        yield running


@pytest.fixture
def cloud(cluster: droplet.LocalCluster) -> Iterator[DropletConnection]:
    with DropletConnection(cluster.address, timeout=30) as conn:
        assert isinstance(conn._backend, BlockingClient)  # the path under test
        yield conn


def test_calls_dags_and_state(cloud: DropletConnection) -> None:
    square = cloud.register(lambda _, x: x * x, "b_square")
    cloud.register(lambda _, x: x + 1, "b_inc")
    assert square(7).get() == 49
    assert cloud.register_dag("b_dag", ["b_square", "b_inc"], [("b_square", "b_inc")])
    assert cloud.call_dag("b_dag", {"b_square": 3}).get() == 10
    assert cloud.call_dag("b_dag", {"b_square": 3}, direct_response=True) == 10
    cloud.put_object("b_key", {"a": 1})
    assert cloud.get_object("b_key") == {"a": 1}
    assert cloud.get_function("b_square") is not None
    assert cloud.get_function("b_nope") is None
    assert "b_square" in cloud.list("b_")
    with pytest.raises(droplet.DagError):
        cloud.call_dag("b_missing", {})


def test_many_threads_share_one_socket(cloud: DropletConnection) -> None:
    cloud.register(lambda _, x: x * 3, "b_triple")
    barrier = threading.Barrier(64)
    results: dict[int, Any] = {}

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = cloud.exec_func("b_triple", [i]).get(timeout=30)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: 3 * i for i in range(64)}


def test_a_waiting_reader_does_not_hold_up_other_threads(cloud: DropletConnection) -> None:
    """One thread waits (and reads) for a slow result; others' replies still flow."""
    async def gated(lib: Any, key: str) -> str:
        import trio

        while not await lib.aget(key):  # noqa: ASYNC110 (polls the KVS, not a local flag)
            await trio.sleep(0.01)
        return "released"

    cloud.register(gated, "b_gated")
    cloud.register(lambda _, x: x, "b_echo")
    cloud.put_object("b_gate", False)
    slow = cloud.exec_func("b_gated", ["b_gate"])
    outcome: dict[str, Any] = {}

    def wait_slow() -> None:
        outcome["slow"] = slow.get(timeout=30)

    waiter = threading.Thread(target=wait_slow)
    waiter.start()
    # While the waiter is blocked reading, this thread's calls must complete.
    assert [cloud.exec_func("b_echo", [i]).get(timeout=30) for i in range(20)] == list(range(20))
    assert "slow" not in outcome
    cloud.put_object("b_gate", True)
    waiter.join(30)
    assert outcome["slow"] == "released"


def test_timeouts_leave_the_connection_usable(cloud: DropletConnection) -> None:
    async def forever(_: Any) -> None:
        import trio

        await trio.sleep_forever()

    cloud.register(forever, "b_forever")
    future = cloud.exec_func("b_forever", [])
    with pytest.raises(droplet.TimeoutError):
        future.get(timeout=0.2)
    assert not future.done()
    assert cloud.register(lambda _, x: -x, "b_neg")(5).get() == -5


def test_node_hanging_up_fails_waiters_instead_of_hanging(
        cluster: droplet.LocalCluster) -> None:
    with DropletConnection(cluster.address, timeout=30) as conn:
        with pytest.raises((droplet.ProtocolError, droplet.ConnectionError)):
            conn.put_object("b_big", b"x" * (512 * 1024))  # over the node's frame limit
        with pytest.raises(droplet.ConnectionError):
            conn.get_object("b_big")
    with DropletConnection(cluster.address, timeout=30) as conn:  # the node still serves
        assert conn.get_object("b_big") is None


def test_nothing_listening_is_a_clear_error() -> None:
    with pytest.raises(droplet.ConnectionError, match="python -m droplet.node"):
        DropletConnection("tcp://127.0.0.1:9", timeout=5)
