"""Consistency levels end to end, against a real ``python -m droplet.node`` over TCP.

The node runs two executor worker processes with ``--placement spread``, so
the two functions of a two-function DAG run in different processes, each with
its own cache. User functions are defined inside the tests so they pickle by
value (the node's processes cannot import this module).

Socket tests: every request and ``get()`` is bounded by the connection's
``timeout``, and the few waits for the cluster are bounded polling loops.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import droplet
from droplet import CAUSAL, NORMAL, REPEATABLE_READ, DropletConnection, DropletReference
from droplet.errors import LatticeTypeError
from droplet.lattices import MapLattice, MaxLattice, SetLattice
from droplet.testing.nodes import NodeProcess, poll_until, start_node

pytestmark = pytest.mark.slow

TIMEOUT = 20.0  # seconds: bounds every request, result wait and polling loop


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    log = tmp_path_factory.mktemp("node") / "node.log"
    with start_node("--executors", "2", "--placement", "spread", log_path=log) as running:
        yield running
        assert "Traceback" not in running.log_text(), running.log_text()


@pytest.fixture(scope="module")
def cloud(node: NodeProcess) -> Iterator[DropletConnection]:
    with DropletConnection(node.url, timeout=TIMEOUT) as conn:
        yield conn


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def executor_of(invocation_id: str) -> str:
    return invocation_id.rpartition("/")[0]


poll = functools.partial(poll_until, timeout=TIMEOUT, interval=0.01)


@pytest.mark.parametrize(("level", "expected"), [(NORMAL, "new"), (REPEATABLE_READ, "old")])
def test_overwrite_between_two_functions_of_one_run(
        cloud: DropletConnection, level: str, expected: str) -> None:
    def first(lib: Any, key: str, ready_key: str) -> tuple[Any, str]:

        seen = lib.get(key)
        lib.put(ready_key, lib.getid())
        for _ in range(4000):
            if any(data == b"go" for _, data in lib.recv()):
                return seen, lib.getid()
            time.sleep(0.005)
        raise RuntimeError("no go message arrived")

    def second(lib: Any, key: str, by_reference: Any, seen: Any, first_id: str
               ) -> tuple[Any, str, Any, Any, str]:
        # first's (seen, id) tuple arrives as two arguments
        return seen, first_id, lib.get(key), by_reference, lib.getid()

    def signal(lib: Any, dest: str) -> None:
        lib.send(dest, b"go")

    cloud.register(first, "cons_first")
    cloud.register(second, "cons_second")
    cloud.register(signal, "cons_signal")
    cloud.register_dag("cons_race", ["cons_first", "cons_second"],
                       [("cons_first", "cons_second")])
    x, ready = fresh("x"), fresh("ready")
    cloud.put_object(x, "old")
    future = cloud.call_dag(
        "cons_race", {"cons_first": [x, ready], "cons_second": [x, DropletReference(x)]},
        consistency=level)
    first_id = poll(lambda: cloud.get_object(ready), "the first function's read")
    try:
        cloud.put_object(x, "new")
    finally:
        cloud.exec_func("cons_signal", [first_id]).get()
    seen, first_id_again, second_read, by_reference, second_id = future.get()
    assert first_id_again == first_id
    assert executor_of(first_id) != executor_of(second_id)
    assert seen == "old"
    assert second_read == by_reference == expected


def test_causal_sessions(cloud: DropletConnection) -> None:
    def put(lib: Any, key: str, value: Any) -> None:
        lib.put(key, value)

    def get(lib: Any, key: str) -> Any:
        return lib.get(key)

    cloud.register(put, "cons_put")
    cloud.register(get, "cons_get")
    cloud.register_dag("cons_put", ["cons_put"], [])
    cloud.register_dag("cons_get", ["cons_get"], [])

    def call(dag: str, args: list[Any], session: str) -> Any:
        return cloud.call_dag(dag, {dag: args}, consistency=CAUSAL, client_id=session).get()

    key = fresh("doc")
    futures = [cloud.call_dag("cons_put", {"cons_put": [key, value]}, consistency=CAUSAL,
                              client_id=session) for session, value in (("A", "a"), ("B", "b"))]
    for future in futures:
        future.get()
    assert call("cons_get", [key], "C") == frozenset({"a", "b"})
    assert cloud.get_object(key) == frozenset({"a", "b"})
    call("cons_put", [key, "c"], "C")
    assert cloud.get_object(key) == "c"
    # A write by a session that has not read c is concurrent with it: both are kept.
    call("cons_put", [key, "blind"], "D")
    assert cloud.get_object(key) == frozenset({"c", "blind"})
    # Session A reads both, then reads its own later writes, on whichever executor.
    assert call("cons_get", [key], "A") == frozenset({"c", "blind"})
    for i in range(6):
        call("cons_put", [key, f"a{i}"], "A")
        assert call("cons_get", [key], "A") == f"a{i}"


def test_two_connections_converge_and_types_are_kept(
        node: NodeProcess, cloud: DropletConnection) -> None:
    key = fresh("lww")
    with DropletConnection(node.url, timeout=TIMEOUT) as other:
        for i in range(10):
            cloud.put_object(key, ("one", i))
            other.put_object(key, ("two", i))
        assert cloud.get_object(key) == other.get_object(key) == ("two", 9)

        with pytest.raises(LatticeTypeError, match=r"LWW.*Set") as info:
            other.put_object(key, SetLattice({1}))
        assert isinstance(info.value, droplet.DropletError)
        assert cloud.get_object(key) == ("two", 9)  # unchanged; the node keeps serving

    counter = fresh("counter")

    def bump(lib: Any, key: str, writer: str, times: int) -> None:
        from droplet.lattices import MapLattice, MaxLattice

        for n in range(1, times + 1):
            lib.put(key, MapLattice({writer: MaxLattice(n)}))

    cloud.register(bump, "cons_bump")
    futures = [cloud.exec_func("cons_bump", [counter, f"w{i}", i + 1]) for i in range(6)]
    for future in futures:
        future.get()
    stored = cloud.get_object(counter)
    assert isinstance(stored, MapLattice)
    assert stored == MapLattice({f"w{i}": MaxLattice(i + 1) for i in range(6)})
    assert sum(stored.reveal().values()) == 21
