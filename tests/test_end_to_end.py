"""Issue 2 end to end, embedded: register, call and compose functions on a LocalCluster.

Most tests use the async API (``droplet.open_local_cluster`` and
``cluster.client()``); a few drive the synchronous ``droplet.LocalCluster`` the
way a notebook would. Everything runs over ``inproc://`` (the same encoded
frames as TCP).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

import droplet
from droplet import AsyncDropletClient, DropletReference
from droplet.lattices import LWWLattice, SetLattice

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=[False, True], ids=["frames", "objects"])
def skip_encoding(request: pytest.FixtureRequest) -> bool:
    """Each embedded cluster both ways: encoded frames, and message objects."""
    value: bool = request.param
    return value


@pytest.fixture
async def cluster(storage: str | None, skip_encoding: bool) -> AsyncIterator[Any]:
    """A 2-executor cluster on each storage backend (in memory, and on Redis)."""
    async with droplet.open_local_cluster(executors=2, storage=storage,
                                          skip_encoding=skip_encoding) as running:
        yield running


@pytest.fixture
async def cloud(cluster: Any) -> AsyncIterator[AsyncDropletClient]:
    async with cluster.client() as client:
        yield client


@pytest.fixture(params=["locality", "spread"])
async def placed_cloud(request: pytest.FixtureRequest, skip_encoding: bool
                       ) -> AsyncIterator[AsyncDropletClient]:
    """A client of a 2-executor cluster under each placement policy.

    ``spread`` makes a DAG's results cross executors; ``locality`` keeps pipelines local.
    """
    async with droplet.open_local_cluster(executors=2, placement=request.param,
                                          skip_encoding=skip_encoding) as running:
        async with running.client() as client:
            yield client


@pytest.fixture
async def single_cloud(skip_encoding: bool) -> AsyncIterator[AsyncDropletClient]:
    """A client of a 1-executor cluster (every call lands on the same executor)."""
    async with droplet.open_local_cluster(executors=1, skip_encoding=skip_encoding
                                          ) as running:
        async with running.client() as client:
            yield client


async def call(cloud: AsyncDropletClient, name: str, *args: Any) -> Any:
    return await (await cloud.exec_func(name, list(args))).get()


# --------------------------------------------------------------------------- functions
# Module-level functions pickle by reference (this module imports on the executor,
# which runs in this process).


def square(_: Any, x: int) -> int:
    return x * x


def incr(_: Any, x: int) -> int:
    return x + 1


def collect(_: Any, *args: Any) -> tuple[Any, ...]:
    return args


def tagged(tag: str) -> Any:
    def fn(_: Any, *args: Any) -> tuple[Any, ...]:
        return (tag, *args)

    return fn


def total(_: Any, values: list[int]) -> int:
    return sum(values)


def fails(_: Any, x: Any) -> None:
    raise ValueError(f"bad value {x!r}")


class CustomError(Exception):
    pass


def fails_custom(_: Any) -> None:
    raise CustomError("custom trouble")


# --------------------------------------------------------------------------- the issue's example


async def test_issue_example(cloud: AsyncDropletClient) -> None:
    square_fn = await cloud.register(lambda _, x: x * x, "square")
    assert await (await square_fn(2)).get() == 4
    assert await cloud.register_dag("dag", ["square"], []) == (True, None)
    future = await cloud.call_dag("dag", {"square": 2})
    assert await future.get() == 4


def test_issue_example_sync_local_cluster() -> None:
    with droplet.LocalCluster(executors=2) as local:
        cloud = local.connect()
        assert isinstance(cloud, droplet.DropletConnection)
        square_fn = cloud.register(lambda _, x: x * x, "square")
        assert isinstance(square_fn, droplet.DropletFunction)
        future = square_fn(2)
        assert isinstance(future, droplet.DropletFuture)
        assert future.get() == 4
        assert future.done() is True
        assert cloud.register_dag("dag", ["square"], []) == (True, None)
        assert cloud.call_dag("dag", {"square": 2}).get() == 4
        assert cloud.call_dag("dag", {"square": 3}, direct_response=True) == 9


def test_sync_connection_is_a_context_manager() -> None:
    with droplet.LocalCluster(executors=1) as local:
        with local.connect() as cloud:
            cloud.register(incr, "incr")
            assert cloud.exec_func("incr", [1]).get() == 2
        # (a standalone connection raises RuntimeError; one sharing the cluster's
        # portal raises ConnectionError: API.md leaves the class open)
        with pytest.raises((RuntimeError, droplet.ConnectionError), match="closed"):
            cloud.list()
        # the cluster still serves other connections
        with local.connect() as other:
            assert other.list() == ["incr"]
    local.close()  # idempotent


async def test_awaiting_a_future_gives_its_result(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(square, "square")
    assert await (await fn(7)) == 49


# --------------------------------------------------------------------------- composition


async def test_two_function_dag(placed_cloud: AsyncDropletClient) -> None:
    cloud = placed_cloud
    await cloud.register(incr, "incr")
    await cloud.register(square, "square")
    assert await cloud.register_dag("pipe", ["incr", "square"], [("incr", "square")])
    assert await (await cloud.call_dag("pipe", {"incr": 1})).get() == 4
    assert await (await cloud.call_dag("pipe", {"incr": [2]})).get() == 9


async def test_ten_function_chain(placed_cloud: AsyncDropletClient) -> None:
    cloud = placed_cloud
    names = [f"step{i}" for i in range(10)]
    for i, name in enumerate(names):
        await cloud.register(lambda _, acc, i=i: [*acc, i], name)
    edges = list(zip(names, names[1:], strict=False))
    assert await cloud.register_dag("chain", names, edges)
    assert await (await cloud.call_dag("chain", {"step0": [[]]})).get() == list(range(10))


async def test_fan_in_receives_upstream_results_in_connections_order(
    placed_cloud: AsyncDropletClient,
) -> None:
    cloud = placed_cloud
    await cloud.register(tagged("a"), "a")
    await cloud.register(tagged("b"), "b")
    await cloud.register(collect, "d")
    # b's edge is listed first, so d gets b's result first; each upstream
    # result is a tuple, so it becomes two arguments (as in Cloudburst)
    await cloud.register_dag("fanin", ["a", "b", "d"], [("b", "d"), ("a", "d")])
    result = await (await cloud.call_dag("fanin", {"a": 1, "b": 2})).get()
    assert result == ("b", 2, "a", 1)
    # the sink's own arg_map arguments come first
    result = await (await cloud.call_dag("fanin", {"a": 1, "b": 2, "d": ["own", 0]})).get()
    assert result == ("own", 0, "b", 2, "a", 1)


async def test_fan_in_order_is_independent_of_the_functions_list(
    placed_cloud: AsyncDropletClient,
) -> None:
    cloud = placed_cloud
    for name in "abc":
        await cloud.register(tagged(name), name)
    await cloud.register(collect, "sink")
    await cloud.register_dag("fanin3", ["sink", "a", "b", "c"],
                             [("c", "sink"), ("a", "sink"), ("b", "sink")])
    for _ in range(3):
        result = await (await cloud.call_dag("fanin3", {"a": 1, "b": 2, "c": 3})).get()
        assert result == ("c", 3, "a", 1, "b", 2)  # each upstream tuple splats


async def test_fan_out_then_fan_in(placed_cloud: AsyncDropletClient) -> None:
    cloud = placed_cloud
    await cloud.register(incr, "src")
    await cloud.register(lambda _, x: x * 10, "times10")
    await cloud.register(lambda _, x: -x, "negate")
    await cloud.register(collect, "join")
    await cloud.register_dag(
        "diamond", ["src", "times10", "negate", "join"],
        [("src", "times10"), ("src", "negate"), ("negate", "join"), ("times10", "join")])
    result = await (await cloud.call_dag("diamond", {"src": 4})).get()
    assert result == (-5, 50)


async def test_two_sources_with_their_own_arguments(cloud: AsyncDropletClient) -> None:
    await cloud.register(lambda _, x, y: x - y, "sub")
    await cloud.register(lambda _, s: s * 2, "double")
    await cloud.register(collect, "both")
    await cloud.register_dag("two", ["sub", "double", "both"],
                             [("sub", "both"), ("double", "both")])
    assert await (await cloud.call_dag("two", {"sub": [10, 3], "double": "ab"})).get() == (
        7, "abab")


async def test_many_concurrent_dag_runs_keep_their_results_apart(
    placed_cloud: AsyncDropletClient,
) -> None:
    cloud = placed_cloud
    await cloud.register(tagged("a"), "a")
    await cloud.register(tagged("b"), "b")
    await cloud.register(collect, "d")
    await cloud.register_dag("fanin", ["a", "b", "d"], [("a", "d"), ("b", "d")])
    results: dict[int, Any] = {}

    async def run(i: int) -> None:
        results[i] = await (await cloud.call_dag("fanin", {"a": i, "b": -i})).get()

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(run, i)
    assert results == {i: ("a", i, "b", -i) for i in range(50)}


async def test_direct_response(cloud: AsyncDropletClient) -> None:
    await cloud.register(incr, "incr")
    await cloud.register(square, "square")
    await cloud.register_dag("pipe", ["incr", "square"], [("incr", "square")])
    assert await cloud.call_dag("pipe", {"incr": 2}, direct_response=True) == 9


async def test_direct_response_of_failing_dag_raises(cloud: AsyncDropletClient) -> None:
    await cloud.register(fails, "fails")
    await cloud.register(square, "square")
    await cloud.register_dag("bad", ["fails", "square"], [("fails", "square")])
    with pytest.raises(droplet.FunctionError) as info:
        await cloud.call_dag("bad", {"fails": 5}, direct_response=True)
    assert info.value.type_name == "ValueError"
    assert info.value.function == "fails"
    assert isinstance(info.value.__cause__, ValueError)
    await cloud.register(incr, "fails")  # the same DAG now succeeds
    assert await cloud.call_dag("bad", {"fails": 2}, direct_response=True) == 9


async def test_output_key(cloud: AsyncDropletClient) -> None:
    await cloud.register(square, "square")
    await cloud.register_dag("dag", ["square"], [])
    future = await cloud.call_dag("dag", {"square": 6}, output_key="answer")
    assert await future.get() == 36
    assert await cloud.get_object("answer") == 36
    assert await cloud.call_dag("dag", {"square": 7}, direct_response=True,
                                output_key="answer2") == 49
    assert await cloud.get_object("answer2") == 49


async def test_output_key_not_written_when_the_dag_fails(cloud: AsyncDropletClient) -> None:
    await cloud.register(fails, "fails")
    await cloud.register_dag("bad", ["fails"], [])
    future = await cloud.call_dag("bad", {"fails": 1}, output_key="out")
    with pytest.raises(droplet.FunctionError):
        await future.get()
    assert await cloud.get_object("out") is None


async def test_obj_id_is_the_key_of_the_result(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(square, "square")
    future = await fn(9)
    assert await future.get() == 81
    assert isinstance(future.obj_id, str) and future.obj_id
    assert await cloud.get_object(future.obj_id) == 81


@pytest.mark.parametrize("level", [droplet.NORMAL, droplet.REPEATABLE_READ, droplet.CAUSAL])
async def test_consistency_levels_are_accepted(cloud: AsyncDropletClient, level: str) -> None:
    await cloud.register(square, "square")
    await cloud.register_dag("dag", ["square"], [])
    future = await cloud.call_dag("dag", {"square": 3}, consistency=level, client_id="me")
    assert await future.get() == 9


async def test_unknown_consistency_level(cloud: AsyncDropletClient) -> None:
    await cloud.register(square, "square")
    await cloud.register_dag("dag", ["square"], [])
    with pytest.raises(droplet.DagError, match=r"'SOMETIMES'.*NORMAL"):
        await cloud.call_dag("dag", {"square": 3}, consistency="SOMETIMES")
    assert await cloud.call_dag("dag", {"square": 3}, direct_response=True) == 9


# --------------------------------------------------------------------------- references


async def test_reference_argument(cloud: AsyncDropletClient) -> None:
    await cloud.put_object("numbers", [1, 2, 3])
    fn = await cloud.register(total, "total")
    assert await (await fn(DropletReference("numbers"))).get() == 6


async def test_reference_in_arg_map(cloud: AsyncDropletClient) -> None:
    await cloud.put_object("numbers", [4, 5])
    await cloud.put_object("offset", 100)
    await cloud.register(total, "total")
    await cloud.register(lambda _, x, y: x + y, "add")
    await cloud.register_dag("refdag", ["total", "add"], [("total", "add")])
    result = await (await cloud.call_dag(
        "refdag", {"total": DropletReference("numbers"), "add": [DropletReference("offset")]}
    )).get()
    assert result == 109


async def test_reference_sees_the_latest_value(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(total, "total")
    await cloud.put_object("numbers", [1])
    assert await (await fn(DropletReference("numbers"))).get() == 1
    await cloud.put_object("numbers", [1, 1, 1])
    # the executor cache is kept fresh by the store's pushes
    assert await (await fn(DropletReference("numbers"))).get() == 3


async def test_reference_to_missing_key_is_none(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(lambda _, x: x is None, "is_none")
    assert await (await fn(DropletReference("absent"))).get() is True


async def test_reference_without_deserialize_gives_the_lattice(cloud: AsyncDropletClient
                                                               ) -> None:
    await cloud.put_object("plain", "text")
    fn = await cloud.register(lambda _, x: (type(x).__name__, x.reveal()), "inspect")
    assert await (await fn(DropletReference("plain", deserialize=False))).get() == (
        "LWWLattice", "text")
    kind = await cloud.register(lambda _, x: type(x).__name__, "kind")
    assert await (await kind(DropletReference("plain"))).get() == "str"


async def test_lattice_values_through_the_client(cloud: AsyncDropletClient) -> None:
    assert await cloud.get_object("missing") is None
    await cloud.put_object("s", SetLattice({1}))
    await cloud.put_object("s", SetLattice({2}))
    stored = await cloud.get_object("s")
    assert isinstance(stored, SetLattice) and stored.reveal() == {1, 2}
    fn = await cloud.register(lambda _, s: sorted(s.reveal()), "members")
    assert await (await fn(DropletReference("s"))).get() == [1, 2]
    with pytest.raises(droplet.LatticeTypeError):
        await cloud.put_object("s", "not a set")
    await cloud.put_object("v", LWWLattice(5, "five"))
    assert await cloud.get_object("v") == "five"


# --------------------------------------------------------------------------- classes

INSTANCES: list[Any] = []


class Counter:
    """Registered as (Counter, (start,)): built once per executor, run per call."""

    def __init__(self, lib: Any, start: int) -> None:
        INSTANCES.append(self)
        time.sleep(0.05)  # a slow constructor widens any construction race
        self.count = start

    def run(self, lib: Any, step: int) -> tuple[int, int]:
        self.count += step
        return id(self), self.count


class AsyncCounter:
    def __init__(self, lib: Any) -> None:
        self.calls = 0

    async def run(self, lib: Any, x: int) -> tuple[int, int]:
        await trio.lowlevel.checkpoint()
        self.calls += 1
        return self.calls, x * 2


async def test_class_instance_built_once_and_keeps_state(single_cloud: AsyncDropletClient
                                                         ) -> None:
    INSTANCES.clear()
    fn = await single_cloud.register((Counter, (100,)), "counter")
    results = [await (await fn(1)).get() for _ in range(5)]
    assert [count for _, count in results] == [101, 102, 103, 104, 105]
    assert len({ident for ident, _ in results}) == 1
    assert len(INSTANCES) == 1


async def test_class_instance_built_once_per_executor_even_when_first_calls_race(
    single_cloud: AsyncDropletClient,
) -> None:
    INSTANCES.clear()
    fn = await single_cloud.register((Counter, 0), "counter")  # one init arg, not a tuple
    futures = [await fn(1) for _ in range(8)]
    results = [await f.get() for f in futures]
    assert len(INSTANCES) == 1
    assert sorted(count for _, count in results) == list(range(1, 9))


async def test_class_instance_per_executor(cloud: AsyncDropletClient) -> None:
    INSTANCES.clear()
    fn = await cloud.register((Counter, (0,)), "counter")
    results = [await (await fn(1)).get() for _ in range(10)]
    by_instance: dict[int, list[int]] = {}
    for ident, count in results:
        by_instance.setdefault(ident, []).append(count)
    assert 1 <= len(INSTANCES) <= 2
    assert len(by_instance) == len(INSTANCES)
    for counts in by_instance.values():  # each instance counts its own calls
        assert counts == list(range(1, len(counts) + 1))


async def test_async_class_run(single_cloud: AsyncDropletClient) -> None:
    fn = await single_cloud.register((AsyncCounter, ()), "acounter")
    assert [await (await fn(i)).get() for i in range(3)] == [(1, 0), (2, 2), (3, 4)]


async def test_class_in_a_dag(single_cloud: AsyncDropletClient) -> None:
    INSTANCES.clear()
    await single_cloud.register((Counter, (10,)), "counter")
    # counter returns (id, count): a tuple result becomes two arguments downstream
    await single_cloud.register(lambda _, ident, count: count, "second")
    await single_cloud.register_dag("cdag", ["counter", "second"], [("counter", "second")])
    assert await (await single_cloud.call_dag("cdag", {"counter": 5})).get() == 15
    assert await (await single_cloud.call_dag("cdag", {"counter": 5})).get() == 20


async def test_bad_class_registration(cloud: AsyncDropletClient) -> None:
    with pytest.raises(droplet.RegistrationError, match=r"\(cls, init_args\)"):
        await cloud.register((Counter,), "c1")  # type: ignore[arg-type]
    with pytest.raises(droplet.RegistrationError, match=r"\(cls, init_args\)"):
        await cloud.register(("not a class", ()), "c2")  # type: ignore[arg-type]


async def test_class_without_run_is_refused_at_registration(cloud: AsyncDropletClient
                                                             ) -> None:
    class NoRun:
        def __init__(self, lib: Any) -> None:
            pass

    with pytest.raises(droplet.RegistrationError, match=r"NoRun has no run"):
        await cloud.register((NoRun, ()), "norun")
    assert await cloud.get_function("norun") is None


# --------------------------------------------------------------------------- user library


def sync_kvs(lib: Any, key: str, value: Any) -> Any:
    lib.put(key, value)
    return lib.get(key), lib.get_object(key), lib.get("never-written")


async def async_kvs(lib: Any, key: str, value: Any) -> Any:
    await lib.aput(key, value)
    return await lib.aget(key), await lib.aget("never-written")


async def test_user_library_in_sync_function(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(sync_kvs, "sync_kvs")
    assert await (await fn("k1", {"a": 1})).get() == ({"a": 1}, {"a": 1}, None)
    assert await cloud.get_object("k1") == {"a": 1}


async def test_user_library_in_async_function(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(async_kvs, "async_kvs")
    assert await (await fn("k2", [1, 2])).get() == ([1, 2], None)
    assert await cloud.get_object("k2") == [1, 2]


async def test_functions_read_what_the_client_and_other_functions_wrote(
    placed_cloud: AsyncDropletClient,
) -> None:
    cloud = placed_cloud
    await cloud.put_object("greeting", "hello")

    def writer(lib: Any, name: str) -> Any:
        lib.put_object("name", name)
        return lib.get("greeting")

    async def reader(lib: Any, greeting: str) -> str:
        return f"{greeting}, {await lib.aget('name')}"

    await cloud.register(writer, "writer")
    await cloud.register(reader, "reader")
    await cloud.register_dag("rw", ["writer", "reader"], [("writer", "reader")])
    assert await (await cloud.call_dag("rw", {"writer": "droplet"})).get() == "hello, droplet"
    assert await (await cloud.call_dag("rw", {"writer": "trio"})).get() == "hello, trio"


async def test_functions_put_lattices(cloud: AsyncDropletClient) -> None:
    def add_member(lib: Any, x: int) -> Any:
        return lib.put("members", SetLattice({x}))

    fn = await cloud.register(add_member, "add_member")
    assert [await (await fn(i)).get() for i in range(3)] == ["Set", "Set", "Set"]
    assert (await cloud.get_object("members")).reveal() == {0, 1, 2}


async def test_sync_library_call_needing_io_in_async_function_explains(
    cloud: AsyncDropletClient,
) -> None:
    async def wrong(lib: Any) -> Any:
        return lib.get("never-cached")

    fn = await cloud.register(wrong, "wrong")
    with pytest.raises(droplet.FunctionError, match=r"await lib.aget") as info:
        await (await fn()).get()
    assert info.value.type_name == "RuntimeError"


async def test_async_function_runs_as_a_trio_task(cloud: AsyncDropletClient) -> None:
    async def in_trio(lib: Any, x: int) -> str:
        await trio.lowlevel.checkpoint()
        return type(trio.lowlevel.current_task()).__name__ + str(x)

    fn = await cloud.register(in_trio, "in_trio")
    assert await (await fn(1)).get() == "Task1"


# --------------------------------------------------------------------------- messaging

POLL = 0.005
POLLS = 2000  # gives up after ~10 s: a hang becomes a clear failure


def sync_receiver(lib: Any, key: str) -> Any:
    lib.put(key, lib.getid())
    for _ in range(POLLS):
        messages = lib.recv()
        if messages:
            return lib.getid(), messages
        time.sleep(POLL)
    raise AssertionError("no message arrived")


def sync_sender(lib: Any, key: str) -> Any:
    for _ in range(POLLS):
        dest = lib.get(key)
        if dest is not None:
            lib.send(dest, b"hello from " + lib.get_id().encode())
            return lib.getid()
        time.sleep(POLL)
    raise AssertionError("the receiver never published its id")


async def async_receiver(lib: Any, key: str) -> Any:
    await lib.aput(key, lib.getid())
    for _ in range(POLLS):
        messages = lib.recv()
        if messages:
            return lib.getid(), messages
        await trio.sleep(POLL)
    raise AssertionError("no message arrived")


async def async_sender(lib: Any, key: str) -> Any:
    for _ in range(POLLS):
        dest = await lib.aget(key)
        if dest is not None:
            await lib.asend(dest, b"hello from " + lib.get_id().encode())
            return lib.getid()
        await trio.sleep(POLL)
    raise AssertionError("the receiver never published its id")


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_send_and_recv_between_functions_of_one_dag(
    placed_cloud: AsyncDropletClient, flavour: str
) -> None:
    cloud = placed_cloud
    receiver, sender = ((sync_receiver, sync_sender) if flavour == "sync"
                        else (async_receiver, async_sender))
    await cloud.register(receiver, "receiver")
    await cloud.register(sender, "sender")
    await cloud.register(collect, "meet")
    await cloud.register_dag("chat", ["receiver", "sender", "meet"],
                             [("receiver", "meet"), ("sender", "meet")])
    for run in range(2):
        key = f"chat-{flavour}-{run}"  # one rendezvous key per run
        result = await (await cloud.call_dag("chat", {"receiver": key, "sender": key})).get()
        receiver_id, messages, sender_id = result  # the receiver's tuple splats
        assert isinstance(receiver_id, str) and isinstance(sender_id, str)
        assert receiver_id != sender_id
        assert messages == [(sender_id, b"hello from " + sender_id.encode())]


async def test_recv_is_empty_without_messages(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(lambda lib: (lib.recv(), lib.getid() == lib.get_id()), "lonely")
    assert await (await fn()).get() == ([], True)


async def test_invocation_ids_are_unique(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(lambda lib: lib.getid(), "whoami")
    ids = [await (await fn()).get() for _ in range(6)]
    assert len(set(ids)) == 6


async def test_send_to_a_finished_invocation_is_dropped(cloud: AsyncDropletClient) -> None:
    who = await cloud.register(lambda lib: lib.getid(), "whoami")
    gone = await (await who()).get()

    def send(lib: Any, dest: str) -> str:
        lib.send(dest, b"anyone?")
        return "sent"

    fn = await cloud.register(send, "send")
    assert await (await fn(gone)).get() == "sent"


async def test_send_requires_a_picklable_object_and_a_real_id(cloud: AsyncDropletClient
                                                              ) -> None:
    def send_lock(lib: Any, dest: str) -> None:
        lib.send(dest, threading.Lock())

    fn = await cloud.register(send_lock, "send_lock")
    with pytest.raises(droplet.FunctionError, match=r"TypeError.*serialize"):
        await (await fn("x/1")).get()
    send = await cloud.register(lambda lib, dest, data: lib.send(dest, data), "send")
    with pytest.raises(droplet.FunctionError, match=r"not an invocation id"):
        await (await send("nonsense", b"x")).get()
    with pytest.raises(droplet.FunctionError, match=r"getid"):
        await (await send(7, b"x")).get()


# --------------------------------------------------------------------------- errors


async def test_function_error(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(fails, "fails")
    future = await fn(3)
    with pytest.raises(droplet.FunctionError) as info:
        await future.get()
    err = info.value
    assert "ValueError" in str(err) and "bad value 3" in str(err)
    assert err.type_name == "ValueError"
    assert err.remote_message == "bad value 3"
    assert err.function == "fails"
    raising_line = fails.__code__.co_firstlineno + 1
    assert f"line {raising_line}, in fails" in err.remote_traceback
    assert 'raise ValueError(f"bad value {x!r}")' in err.remote_traceback
    assert isinstance(err.__cause__, ValueError)
    assert err.__cause__.args == ("bad value 3",)
    # a finished-with-error future is done, and raises again
    assert await future.done() is True
    with pytest.raises(droplet.FunctionError):
        await future.get()
    # the executor keeps serving
    await cloud.register(square, "square")
    assert await call(cloud, "square", 5) == 25
    assert await call(cloud, "square", 6) == 36


async def test_custom_exception_is_the_cause(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(fails_custom, "custom")
    with pytest.raises(droplet.FunctionError) as info:
        await (await fn()).get()
    assert isinstance(info.value.__cause__, CustomError)
    assert info.value.type_name.endswith("CustomError")


async def test_unpicklable_exception_still_reports(cloud: AsyncDropletClient) -> None:
    class Unpicklable(Exception):
        def __init__(self, lock: Any) -> None:
            super().__init__("holds a lock")
            self.lock = lock

    def raise_it(_: Any) -> None:
        raise Unpicklable(threading.Lock())

    # raise_it pickles by value (as code in a script's __main__ does), so the
    # executor has no source file for it: the traceback names the line number.
    raising_line = raise_it.__code__.co_firstlineno + 1

    fn = await cloud.register(raise_it, "unpicklable")
    with pytest.raises(droplet.FunctionError, match=r"Unpicklable.*holds a lock") as info:
        await (await fn()).get()
    assert info.value.__cause__ is None
    assert info.value.cause_pickle is None
    assert f"line {raising_line}, in raise_it" in info.value.remote_traceback


async def test_async_function_error(cloud: AsyncDropletClient) -> None:
    async def afails(_: Any, x: int) -> None:
        await trio.lowlevel.checkpoint()
        raise KeyError(x)

    fn = await cloud.register(afails, "afails")
    with pytest.raises(droplet.FunctionError, match=r"KeyError") as info:
        await (await fn(7)).get()
    assert isinstance(info.value.__cause__, KeyError)


async def test_error_in_the_first_function_propagates_and_downstream_does_not_run(
    placed_cloud: AsyncDropletClient,
) -> None:
    cloud = placed_cloud

    def mark(lib: Any, x: Any) -> Any:
        lib.put("downstream-ran", True)
        return x

    await cloud.register(fails, "first")
    await cloud.register(mark, "second")
    await cloud.register(mark, "third")
    await cloud.register_dag("broken", ["first", "second", "third"],
                             [("first", "second"), ("second", "third")])
    with pytest.raises(droplet.FunctionError) as info:
        await (await cloud.call_dag("broken", {"first": "x"})).get()
    assert info.value.function == "first"
    assert "bad value 'x'" in str(info.value)
    assert await cloud.get_object("downstream-ran") is None


async def test_error_in_one_branch_of_a_fan_in(placed_cloud: AsyncDropletClient) -> None:
    cloud = placed_cloud
    await cloud.register(incr, "ok")
    await cloud.register(fails, "bad")
    await cloud.register(collect, "join")
    await cloud.register_dag("half", ["ok", "bad", "join"], [("ok", "join"), ("bad", "join")])
    with pytest.raises(droplet.FunctionError, match=r"bad value 2") as info:
        await (await cloud.call_dag("half", {"ok": 1, "bad": 2})).get()
    assert info.value.function == "bad"
    # and a good run right after
    await cloud.register(incr, "bad")
    assert await (await cloud.call_dag("half", {"ok": 1, "bad": 2})).get() == (2, 3)


async def test_wrong_arguments_are_a_function_error(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(square, "square")
    with pytest.raises(droplet.FunctionError, match=r"TypeError"):
        await (await fn(1, 2, 3)).get()
    assert await (await fn(3)).get() == 9


async def test_unserializable_result_is_a_function_error(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(lambda _: threading.Lock(), "lock")
    with pytest.raises(droplet.FunctionError, match=r"cannot be serialized"):
        await (await fn()).get()


async def test_unknown_function(cloud: AsyncDropletClient) -> None:
    with pytest.raises(droplet.RegistrationError, match=r"no function named 'nope'"):
        await cloud.exec_func("nope", [1])


async def test_unknown_dag(cloud: AsyncDropletClient) -> None:
    with pytest.raises(droplet.DagError, match=r"no DAG named 'nodag'"):
        await cloud.call_dag("nodag", {})


async def test_register_dag_errors(cloud: AsyncDropletClient) -> None:
    await cloud.register(incr, "a")
    await cloud.register(incr, "b")
    with pytest.raises(droplet.DagError, match=r"'zzz', which is not registered"):
        await cloud.register_dag("d", ["a", "zzz"], [("a", "zzz")])
    with pytest.raises(droplet.DagError, match=r"cycle"):
        await cloud.register_dag("d", ["a", "b"], [("a", "b"), ("b", "a")])
    with pytest.raises(droplet.DagError, match=r"exactly one sink"):
        await cloud.register_dag("d", ["a", "b"], [])
    with pytest.raises(droplet.DagError, match=r"not one of the DAG's functions"):
        await cloud.register_dag("d", ["a"], [("a", "b")])
    assert await cloud.register_dag("d", ["a", "b"], [("a", "b")])
    assert await cloud.register_dag("d", ["a", "b"], [("a", "b")])  # same shape: fine
    with pytest.raises(droplet.DagError, match=r"different DAG named 'd'"):
        await cloud.register_dag("d", ["a", "b"], [("b", "a")])
    with pytest.raises(droplet.DagError, match=r"'square', which is not in DAG 'd'"):
        await cloud.call_dag("d", {"square": 1})


async def test_get_function(cloud: AsyncDropletClient) -> None:
    assert await cloud.get_function("unknown") is None
    await cloud.register(square, "square")
    fn = await cloud.get_function("square")
    assert fn is not None and fn.name == "square"
    assert await (await fn(4)).get() == 16


async def test_list_is_sorted_and_filtered(cloud: AsyncDropletClient) -> None:
    assert await cloud.list() == []
    for name in ["b", "ab", "a", "c", "abc"]:
        await cloud.register(incr, name)
    assert await cloud.list() == ["a", "ab", "abc", "b", "c"]
    assert await cloud.list("ab") == ["ab", "abc"]
    assert await cloud.list("zz") == []


async def test_delete_dag(cloud: AsyncDropletClient) -> None:
    await cloud.register(incr, "a")
    await cloud.register(square, "b")
    await cloud.register_dag("d", ["a", "b"], [("a", "b")])
    assert await cloud.delete_dag("d") == (True, None)
    with pytest.raises(droplet.DagError, match=r"'d'"):
        await cloud.call_dag("d", {"a": 1})
    with pytest.raises(droplet.DagError, match=r"no DAG named 'd'"):
        await cloud.delete_dag("d")
    # the name is free again, for another shape
    assert await cloud.register_dag("d", ["b", "a"], [("b", "a")])
    assert await (await cloud.call_dag("d", {"b": 3})).get() == 10


async def test_reregistering_replaces_the_function(cloud: AsyncDropletClient) -> None:
    await cloud.register(lambda _, x: x + 1, "f")
    await cloud.register_dag("d", ["f"], [])
    for _ in range(3):  # warm both executors' copies
        assert await call(cloud, "f", 1) == 2
    await cloud.register(lambda _, x: x + 2, "f")
    for _ in range(3):
        assert await call(cloud, "f", 1) == 3
        assert await (await cloud.call_dag("d", {"f": 1})).get() == 3


async def test_registration_errors(cloud: AsyncDropletClient) -> None:
    with pytest.raises(droplet.RegistrationError, match=r"not callable"):
        await cloud.register(42, "answer")  # type: ignore[arg-type]
    with pytest.raises(droplet.RegistrationError, match=r"non-empty string"):
        await cloud.register(incr, "")
    with pytest.raises(droplet.RegistrationError, match=r"'/'"):
        await cloud.register(incr, "a/b")
    lock = threading.Lock()
    with pytest.raises(droplet.RegistrationError, match=r"'holds_lock'"):
        await cloud.register(lambda _: lock, "holds_lock")
    assert await cloud.list() == []


async def test_many_concurrent_async_callers(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(square, "square")
    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await (await fn(i)).get()

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    assert results == {i: i * i for i in range(200)}


# --------------------------------------------------------------------------- timeouts


async def sleeps_forever(_: Any) -> None:
    await trio.sleep_forever()


async def test_future_get_timeout(autojump_clock: trio.testing.MockClock) -> None:
    # Only async functions here: autojump must not fire while a worker thread runs.
    async with droplet.open_local_cluster(executors=1) as running, \
            running.client() as cloud:
        fn = await cloud.register(sleeps_forever, "forever")
        future = await fn()
        assert await future.done() is False
        start = trio.current_time()
        with pytest.raises(droplet.TimeoutError, match=future.obj_id):
            await future.get(timeout=2)
        assert trio.current_time() - start == pytest.approx(2)
        assert await future.done() is False
        await cloud.register_dag("never", ["forever"], [])
        with pytest.raises(droplet.TimeoutError, match=r"'never'.*3 s"):
            await cloud.call_dag("never", {}, direct_response=True, timeout=3)
        # an unfinished function does not block the executor
        async def aquick(_: Any) -> str:
            return "aquick"

        quick = await cloud.register(aquick, "aquick")
        assert await (await quick()).get() == "aquick"
    # leaving the cluster cancelled the function that never finishes


async def test_future_get_default_timeout_comes_from_the_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with droplet.open_local_cluster(executors=1) as running, \
            running.client() as cloud:
        await cloud.register(sleeps_forever, "forever")
        await cloud.register_dag("never", ["forever"], [])
        future = await cloud.call_dag("never", {}, timeout=4)
        start = trio.current_time()
        with pytest.raises(droplet.TimeoutError):
            await future.get()
        assert trio.current_time() - start == pytest.approx(4)


def test_sync_future_get_timeout_and_done() -> None:
    with droplet.LocalCluster(executors=1) as local:
        cloud = local.connect()
        fn = cloud.register(sleeps_forever, "forever")
        future = fn()
        assert future.done() is False
        with pytest.raises(droplet.TimeoutError):
            future.get(timeout=0.05)
        assert future.done() is False
        assert cloud.register(square, "square")(3).get() == 9


# --------------------------------------------------------------------------- sync client, threads


def test_200_concurrent_callers_from_threads() -> None:
    with droplet.LocalCluster(executors=2) as local:
        cloud = local.connect()
        fn = cloud.register(square, "square")
        cloud.register(incr, "incr")
        cloud.register_dag("pipe", ["incr", "square"], [("incr", "square")])
        results: dict[int, Any] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(200)

        def worker(i: int) -> None:
            try:
                start.wait()
                if i % 2:
                    results[i] = fn(i).get()
                else:
                    results[i] = cloud.call_dag("pipe", {"incr": i}).get()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert results == {i: i * i if i % 2 else (i + 1) ** 2 for i in range(200)}


def test_sync_errors_are_the_same_classes() -> None:
    with droplet.LocalCluster(executors=1) as local:
        cloud = local.connect()
        fn = cloud.register(fails, "fails")
        with pytest.raises(droplet.FunctionError) as info:
            fn(1).get()
        assert isinstance(info.value.__cause__, ValueError)
        with pytest.raises(droplet.RegistrationError):
            cloud.exec_func("nope", [])
        with pytest.raises(droplet.DagError):
            cloud.call_dag("nodag", {})
        with pytest.raises(droplet.DagError):
            cloud.delete_dag("nodag")
        assert cloud.get_function("nope") is None
        assert cloud.get_function("fails") is not None
        assert cloud.list() == ["fails"]
        cloud.put_object("k", {"v": 1})
        assert cloud.get_object("k") == {"v": 1}
        assert cloud.get_object("missing") is None


# --------------------------------------------------------------------------- connecting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_nothing_listens_async() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    with trio.fail_after(20):
        with pytest.raises(droplet.ConnectionError) as info:
            async with droplet.open_client(url, timeout=5):
                pass  # pragma: no cover
    assert url in str(info.value)
    assert "python -m droplet.node" in str(info.value)


def test_nothing_listens_sync() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(droplet.ConnectionError) as info:
        droplet.DropletConnection(url, "127.0.0.1", local=True, timeout=5)
    assert url in str(info.value)
    assert "python -m droplet.node" in str(info.value)
    assert isinstance(info.value, ConnectionError)  # the builtin, too


def test_bare_host_means_port_5000() -> None:
    from droplet.transports import normalize_address

    assert normalize_address("127.0.0.1") == "tcp://127.0.0.1:5000"


async def test_nothing_listens_inproc() -> None:
    with pytest.raises(droplet.ConnectionError, match=r"inproc://no-such-cluster"):
        async with droplet.open_client("inproc://no-such-cluster", timeout=5):
            pass  # pragma: no cover


async def test_cluster_with_token() -> None:
    async with droplet.open_local_cluster(executors=1, token="s3cret") as running:
        async with running.client() as cloud:
            fn = await cloud.register(square, "square")
            assert await (await fn(3)).get() == 9
        with pytest.raises(droplet.AuthenticationError):
            async with droplet.open_client(running.address):
                pass  # pragma: no cover
        with pytest.raises(droplet.AuthenticationError):
            async with droplet.open_client(running.address, token="wrong"):
                pass  # pragma: no cover


async def test_silent_tcp_listener_times_out_naming_the_address() -> None:
    """A port that accepts but never speaks Droplet: ConnectionError within the timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        with trio.fail_after(20):
            with pytest.raises(droplet.ConnectionError) as info:
                async with droplet.open_client(url, timeout=0.5):
                    pass  # pragma: no cover
    assert url in str(info.value)
    assert "python -m droplet.node" in str(info.value)


@pytest.mark.parametrize("settings", [{"placement": "nearest"}, {"executors": -1}],
                         ids=["placement", "executors"])
async def test_bad_cluster_settings_raise_plainly(settings: dict[str, Any]) -> None:
    # a plain ValueError naming the setting, never an ExceptionGroup
    with pytest.raises(ValueError, match=next(iter(settings))):
        async with droplet.open_local_cluster(**settings):
            pass  # pragma: no cover


def test_bad_sync_cluster_settings_raise_plainly() -> None:
    with pytest.raises(ValueError, match="placement"):
        droplet.LocalCluster(placement="nearest")
