"""Cloudburst's client and user-library surface, on an embedded cluster."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio

import droplet
from droplet import AsyncDropletClient, DagError, DropletReference, FunctionError
from droplet.client.client import DropletConnection
from droplet.config import Config
from droplet.lattices import LWWLattice, SetLattice
from droplet.node import Node, serve_node
from droplet.protocol.messages import CallDag, RegisterDag

GUARD = 20


@pytest.fixture
async def cluster() -> AsyncIterator[Any]:
    async with droplet.open_local_cluster(executors=2) as running:
        yield running


@pytest.fixture
async def cloud(cluster: Any) -> AsyncIterator[AsyncDropletClient]:
    async with cluster.client() as client:
        yield client


@pytest.fixture(params=["locality", "spread"])
async def placed_cloud(request: pytest.FixtureRequest) -> AsyncIterator[AsyncDropletClient]:
    async with droplet.open_local_cluster(executors=2, placement=request.param) as running:
        async with running.client() as client:
            yield client


async def call(cloud: AsyncDropletClient, name: str, *args: Any) -> Any:
    with trio.fail_after(GUARD):
        return await (await cloud.exec_func(name, list(args))).get()


async def run_dag(cloud: AsyncDropletClient, name: str, arg_map: dict[str, Any],
                  **kwargs: Any) -> Any:
    with trio.fail_after(GUARD):
        return await (await cloud.call_dag(name, arg_map, **kwargs)).get()


def incr(_: Any, x: int) -> int:
    return x + 1


def square(_: Any, x: int) -> int:
    return x * x


# --------------------------------------------------------------------------- register_dag


async def test_register_and_delete_dag_return_cloudburst_shapes(cloud: AsyncDropletClient
                                                                ) -> None:
    await cloud.register(incr, "incr")
    success, error = await cloud.register_dag("d", ["incr"], [])
    assert (success, error) == (True, None)
    assert await cloud.delete_dag("d") == (True, None)
    with pytest.raises(DagError, match="no DAG named"):
        await cloud.delete_dag("d")


@pytest.fixture
def tcp_cluster() -> Iterator[droplet.LocalCluster]:
    with droplet.LocalCluster(executors=1, listen="tcp://127.0.0.1:0") as local:
        yield local


def test_the_connection_survives_malformed_register_dag(tcp_cluster: droplet.LocalCluster
                                                         ) -> None:
    with DropletConnection(tcp_cluster.address, timeout=10) as cloud:
        cloud.register(incr, "incr")
        cloud.register(square, "square")
        bad: list[tuple[Any, ...]] = [
            ("d", [1], []),
            ("d", ["incr", "square"], [("incr", 2)]),
            ("d", ["incr", b"square"], [("incr", b"square")]),
            (None, ["incr"], []),
            ("d", "incr", []),
        ]
        for args in bad:
            with pytest.raises(DagError):
                cloud.register_dag(*args)
        with pytest.raises(DagError, match="arg_map key 1"):
            cloud.call_dag("d", {1: [2]})
        with pytest.raises(DagError, match="must be a string"):
            cloud.delete_dag(3)  # type: ignore[arg-type]
        # the same connection carries on
        assert cloud.register_dag("d", ["incr", "square"], [("incr", "square")]) == (True, None)
        assert cloud.call_dag("d", {"incr": 1}).get(timeout=10) == 4
        assert cloud.call_dag("d", {"incr": 2}, direct_response=True) == 9


# --------------------------------------------------------------------------- user library


def read_many(lib: Any, keys: list[str]) -> Any:
    return lib.get(keys), lib.get(keys[0], deserialize=False)


async def test_get_of_a_list_of_keys_returns_a_dict(cloud: AsyncDropletClient) -> None:
    await cloud.put_object("a", 1)
    await cloud.put_object("b", "two")
    await cloud.register(read_many, "read_many")
    values, lattice = await call(cloud, "read_many", ["a", "b", "absent"])
    assert values == {"a": 1, "b": "two", "absent": None}
    assert list(values) == ["a", "b", "absent"]
    assert isinstance(lattice, LWWLattice) and lattice.reveal() == 1
    # cached and uncached keys, a repeated key and a reference, under each level
    for level in (droplet.NORMAL, droplet.REPEATABLE_READ):
        await cloud.register_dag(f"many-{level}", ["read_many"], [])
        values, _ = await run_dag(cloud, f"many-{level}",
                                  {"read_many": [["b", DropletReference("a"), "b", "c"]]},
                                  consistency=level)
        assert values == {"b": "two", "a": 1, "c": None}


async def test_async_get_of_a_list_of_keys(cloud: AsyncDropletClient) -> None:
    async def aread(lib: Any, keys: list[str]) -> Any:
        return await lib.aget(keys), await lib.aget(keys[0], deserialize=False)

    await cloud.put_object("a", 1)
    await cloud.register(aread, "aread")
    values, lattice = await call(cloud, "aread", ["a", "absent"])
    assert values == {"a": 1, "absent": None} and lattice.reveal() == 1


def add_to(lib: Any, key: str, value: Any) -> str:
    return lib.put(key, value)


async def test_two_concurrent_puts_of_sets_merge(placed_cloud: AsyncDropletClient) -> None:
    cloud = placed_cloud
    await cloud.register(add_to, "add_to")
    with trio.fail_after(GUARD):
        futures = [await cloud.exec_func("add_to", ["follows", {who}]) for who in "ab"]
        assert [await f.get() for f in futures] == ["Set", "Set"]
    stored = await cloud.get_object("follows")
    assert isinstance(stored, SetLattice) and stored.reveal() == {"a", "b"}


async def test_puts_of_lists_merge_into_an_ordered_list(cloud: AsyncDropletClient) -> None:
    await cloud.register(add_to, "add_to")
    await cloud.register(lambda lib, key: lib.get(key), "read")
    with trio.fail_after(GUARD):
        futures = [await cloud.exec_func("add_to", ["timeline", [item]])
                   for item in (b"2:post", b"1:post", b"2:post")]
        assert [await f.get() for f in futures] == ["OrderedSet"] * 3
    assert await call(cloud, "read", "timeline") == [b"1:post", b"2:post"]
    assert await cloud.get_object("timeline") == [b"1:post", b"2:post"]


async def test_other_values_are_last_writer_wins(cloud: AsyncDropletClient) -> None:
    await cloud.register(add_to, "add_to")
    assert await call(cloud, "add_to", "k", {"a": 1}) == "LWW"
    assert await call(cloud, "add_to", "k", (1, 2)) == "LWW"
    assert await cloud.get_object("k") == (1, 2)


def sender(lib: Any, key: str, obj: Any) -> str:
    for _ in range(2000):
        dest = lib.get(key)
        if dest is not None:
            lib.send(dest, obj)
            return "sent"
        time.sleep(0.005)
    raise AssertionError("no receiver")


def receiver(lib: Any, key: str, want: int) -> list[Any]:
    lib.put(key, lib.getid())
    got: list[Any] = []
    for _ in range(2000):
        got += [obj for _, obj in lib.recv()]
        if len(got) >= want:
            return got
        time.sleep(0.005)
    raise AssertionError(f"only {got!r} arrived")


async def test_send_carries_any_picklable_object(cloud: AsyncDropletClient) -> None:
    await cloud.register(sender, "sender")
    await cloud.register(receiver, "receiver")
    with trio.fail_after(GUARD):
        inbox = await cloud.exec_func("receiver", ["inbox", 3])
        sent = [await cloud.exec_func("sender", ["inbox", obj])
                for obj in (b"raw", "text", {"n": (1, 2)})]
        assert [await f.get() for f in sent] == ["sent"] * 3
        got = await inbox.get()
    assert sorted(map(repr, got)) == sorted(map(repr, [b"raw", "text", {"n": (1, 2)}]))


# --------------------------------------------------------------------------- kvs_client


async def test_kvs_client_gets_and_puts_lattices(cloud: AsyncDropletClient) -> None:
    kvs = cloud.kvs_client
    assert await kvs.put("model", LWWLattice(0, b"weights")) is True
    found = await kvs.get("model")
    assert list(found) == ["model"] and found["model"] is not None
    assert found["model"].reveal() == b"weights"
    both = await kvs.get(["model", "missing"])
    assert both["missing"] is None and both["model"] == found["model"]
    await kvs.put("tags", SetLattice({"a"}))
    await kvs.put("tags", SetLattice({"b"}))
    assert (await kvs.get("tags"))["tags"] == SetLattice({"a", "b"})
    # a function reads what kvs_client stored
    await cloud.register(lambda lib, k: lib.get(k), "read")
    assert await call(cloud, "read", "model") == b"weights"
    with pytest.raises(TypeError, match="takes a lattice"):
        await kvs.put("x", b"not a lattice")
    with pytest.raises(TypeError):
        await kvs.get(3)  # type: ignore[arg-type]


def test_kvs_client_on_the_blocking_connection(tcp_cluster: droplet.LocalCluster) -> None:
    with DropletConnection(tcp_cluster.address, timeout=10) as cloud:
        assert cloud.kvs_client.put("k", LWWLattice(0, b"v")) is True
        assert cloud.kvs_client.get(["k", "nope"])["nope"] is None
        assert cloud.kvs_client.get("k")["k"].reveal() == b"v"  # type: ignore[union-attr]
    with tcp_cluster.connect() as inproc:  # the portal-backed connection has one too
        assert inproc.kvs_client.get("k")["k"].reveal() == b"v"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- DAG results


def pair(_: Any, x: int) -> tuple[int, int]:
    return x, x * 10


def add(_: Any, a: int, b: int) -> int:
    return a + b


def stash(lib: Any, key: str, value: Any) -> DropletReference:
    lib.put(key, value)
    return DropletReference(key)


async def stash_async(lib: Any, key: str, value: Any) -> DropletReference:
    await lib.aput(key, value)
    return DropletReference(key, deserialize=False)


async def test_a_tuple_result_becomes_several_arguments(placed_cloud: AsyncDropletClient
                                                        ) -> None:
    cloud = placed_cloud
    await cloud.register(pair, "pair")
    await cloud.register(add, "add")
    await cloud.register_dag("splat", ["pair", "add"], [("pair", "add")])
    assert await run_dag(cloud, "splat", {"pair": 3}) == 33
    # a tuple at the sink is the result itself
    await cloud.register_dag("just_pair", ["pair"], [])
    assert await run_dag(cloud, "just_pair", {"pair": 3}) == (3, 30)


async def test_a_reference_result_is_resolved_downstream(placed_cloud: AsyncDropletClient
                                                         ) -> None:
    cloud = placed_cloud
    await cloud.register(stash, "stash")
    await cloud.register(stash_async, "stash_async")
    await cloud.register(lambda _, v: ("got", v), "show")
    await cloud.register(lambda _, v: type(v).__name__, "kind")
    await cloud.register_dag("ref", ["stash", "show"], [("stash", "show")])
    assert await run_dag(cloud, "ref", {"stash": ["k1", [1, 2]]}) == ("got", [1, 2])
    await cloud.register_dag("aref", ["stash_async", "kind"], [("stash_async", "kind")])
    assert await run_dag(cloud, "aref", {"stash_async": ["k2", "v"]}) == "LWWLattice"


# --------------------------------------------------------------------------- classes


class Model:
    def __init__(self, lib: Any, *init: Any) -> None:
        self.init = init

    def run(self, lib: Any, x: Any) -> Any:
        return self.init, x


@pytest.mark.parametrize(("init", "expected"), [
    ("weights", ("weights",)),  # a single init argument, not split into characters
    (5, (5,)),
    ([1, 2], ([1, 2],)),
    ((1, 2), (1, 2)),
    ((), ()),
])
async def test_class_init_arguments_as_in_cloudburst(cloud: AsyncDropletClient, init: Any,
                                                     expected: tuple[Any, ...]) -> None:
    await cloud.register((Model, init), "model")
    assert await call(cloud, "model", "x") == (expected, "x")


async def test_a_malformed_class_tuple_is_a_registration_error(cloud: AsyncDropletClient
                                                                ) -> None:
    for bad in ((Model,), (Model, 1, 2), ("Model", ())):
        with pytest.raises(droplet.RegistrationError, match=r"\(cls, init_args\)"):
            await cloud.register(bad, "bad")  # type: ignore[arg-type]
    assert await cloud.get_function("bad") is None


# --------------------------------------------------------------------------- multi-exec


def maybe(_: Any, x: Any) -> Any:
    return None if x < 0 else x


async def test_multiexec_forwards_the_first_valid_result(placed_cloud: AsyncDropletClient
                                                         ) -> None:
    cloud = placed_cloud
    await cloud.register(lambda _, x: x, "fast")
    await cloud.register(lambda _, x: x, "slow")
    await cloud.register(maybe, "pick")
    await cloud.register(lambda _, x: ("chosen", x), "sink")
    assert await cloud.register_dag(
        "race", ["fast", "slow", ("pick", [None]), "sink"],
        [("fast", "pick"), ("slow", "pick"), ("pick", "sink")]) == (True, None)
    # pick runs once per input, without waiting for the other: the invalid one goes nowhere
    assert await run_dag(cloud, "race", {"fast": -1, "slow": 7}) == ("chosen", 7)
    assert await run_dag(cloud, "race", {"fast": 4, "slow": -1}) == ("chosen", 4)
    # two valid results: one flows on
    assert await run_dag(cloud, "race", {"fast": 1, "slow": 1}) == ("chosen", 1)
    with pytest.raises(DagError, match="invalid results"):
        await run_dag(cloud, "race", {"fast": -1, "slow": -2})


async def test_multiexec_sink_and_source(cloud: AsyncDropletClient) -> None:
    await cloud.register(maybe, "maybe")
    await cloud.register_dag("solo", [("maybe", [None])], [])
    assert await run_dag(cloud, "solo", {"maybe": 3}) == 3
    with pytest.raises(DagError, match="invalid results"):
        await run_dag(cloud, "solo", {"maybe": -3})
    with pytest.raises(DagError, match="already registered"):
        await cloud.register_dag("solo", [("maybe", [0])], [])


async def test_invalid_results_that_do_not_unpickle_fail_the_call_not_the_node(
        cloud: AsyncDropletClient) -> None:
    await cloud.register(maybe, "maybe")
    # a hand-made request, as a client other than Droplet's could send
    await cloud._scheduler.request(
        RegisterDag("junk", ["maybe"], [], [], ["maybe"], [b"not a pickle"]), GUARD)
    with pytest.raises(FunctionError, match="maybe"):
        await run_dag(cloud, "junk", {"maybe": 1})
    assert await call(cloud, "maybe", 5) == 5  # the executors carry on


# --------------------------------------------------------------------------- batching


def batched_model(lib: Any, xs: list[int], scales: list[int]) -> list[tuple[int, int]]:
    return [(x * s, len(xs)) for x, s in zip(xs, scales, strict=True)]


async def test_batching_function_serves_calls_in_bounded_batches() -> None:
    async with droplet.open_local_cluster(executors=1, max_batch=3) as cluster:
        async with cluster.client() as cloud:
            await cloud.register(incr, "prep")
            await cloud.register(batched_model, "model")
            await cloud.register_dag("serve", ["prep", "model"], [("prep", "model")],
                                     batching_functions=["model"])
            with trio.fail_after(GUARD):
                futures = [await cloud.call_dag("serve", {"prep": i, "model": [10]})
                           for i in range(12)]
                results = [await f.get() for f in futures]
            assert [value for value, _ in results] == [(i + 1) * 10 for i in range(12)]
            assert all(1 <= size <= 3 for _, size in results)
            stats = cluster.node.executors[0].batcher.statistics()
            assert stats.calls == 12 and stats.largest <= 3


async def test_a_batching_function_that_breaks_the_contract_fails_each_call(
        cloud: AsyncDropletClient) -> None:
    await cloud.register(lambda _, xs: "not a list", "bad_model")
    await cloud.register_dag("bad", ["bad_model"], [], batching_functions=["bad_model"])
    with pytest.raises(FunctionError, match="must return a list of 1 results"):
        await run_dag(cloud, "bad", {"bad_model": 1})


# --------------------------------------------------------------------------- gpu functions


async def test_gpu_functions_run_only_on_gpu_executors() -> None:
    async with droplet.open_local_cluster(executors=2) as cluster:
        async with cluster.client() as cloud:
            await cloud.register(lambda lib: lib.getid().rpartition("/")[0], "where")
            await cloud.register_dag("on_gpu", ["where"], [], gpu_functions=["where"])
            with pytest.raises(DagError, match="needs a gpu executor"):
                await run_dag(cloud, "on_gpu", {})
            async with trio.open_nursery() as nursery:
                config = Config(role="executor", scheduler=cluster.address,
                                listen="inproc://gpu-executor", resources="gpu=1")
                gpu: Node = await nursery.start(functools.partial(serve_node, config))
                for _ in range(4):
                    assert await run_dag(cloud, "on_gpu", {}) == gpu.url
                nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- dry run, continuation


async def test_dry_run_returns_the_call_unsent(cluster: Any, cloud: AsyncDropletClient) -> None:
    await cloud.register(incr, "incr")
    await cloud.register_dag("d", ["incr"], [])
    before = cluster.node.scheduler.statistics().runs_started
    call_obj = await cloud.call_dag("d", {"incr": 1}, dry_run=True)
    assert isinstance(call_obj, CallDag) and call_obj.target == "d"
    assert cluster.node.scheduler.statistics().runs_started == before


async def test_a_continuation_runs_on_the_first_dags_result(placed_cloud: AsyncDropletClient
                                                            ) -> None:
    cloud = placed_cloud
    await cloud.register(incr, "incr")
    await cloud.register(square, "square")
    await cloud.register(add, "add")
    await cloud.register(pair, "pair")
    await cloud.register_dag("first", ["incr"], [])
    await cloud.register_dag("second", ["square"], [])
    await cloud.register_dag("with_own_args", ["add"], [])
    await cloud.register_dag("pairs", ["pair"], [])
    then = await cloud.call_dag("second", {}, dry_run=True)
    assert await run_dag(cloud, "first", {"incr": 2}, continuation=then) == 9
    # each call's output_key keeps its own DAG's result
    stored = await cloud.call_dag("second", {}, dry_run=True, output_key="cont-second")
    assert await run_dag(cloud, "first", {"incr": 3}, continuation=stored,
                         output_key="cont-first") == 16
    assert await cloud.get_object("cont-first") == 4
    assert await cloud.get_object("cont-second") == 16
    # the result comes after the continuation's own arguments
    own = await cloud.call_dag("with_own_args", {"add": [100]}, dry_run=True)
    assert await run_dag(cloud, "first", {"incr": 2}, continuation=own) == 103
    # a chain of continuations
    chained = await cloud.call_dag("second", {}, dry_run=True, continuation=then)
    assert await run_dag(cloud, "first", {"incr": 1}, continuation=chained) == 16
    direct = await cloud.call_dag("second", {}, direct_response=True, dry_run=True)
    with trio.fail_after(GUARD):
        assert await cloud.call_dag("first", {"incr": 3}, direct_response=True,
                                    continuation=direct) == 16
    # a tuple result is one argument of the continuation, as in Cloudburst
    await cloud.register(lambda _, p: p, "ident")
    await cloud.register_dag("ident", ["ident"], [])
    ident = await cloud.call_dag("ident", {}, dry_run=True)
    assert await run_dag(cloud, "pairs", {"pair": 2}, continuation=ident) == (2, 20)


async def test_continuation_errors(cloud: AsyncDropletClient) -> None:
    await cloud.register(incr, "incr")
    await cloud.register(lambda _, x: 1 / 0, "boom")
    await cloud.register_dag("first", ["incr"], [])
    await cloud.register_dag("boom", ["boom"], [])
    fails = await cloud.call_dag("boom", {}, dry_run=True)
    with pytest.raises(FunctionError, match="ZeroDivisionError"):
        await run_dag(cloud, "first", {"incr": 1}, continuation=fails)
    with pytest.raises(FunctionError, match="ZeroDivisionError"):
        await run_dag(cloud, "boom", {"boom": 1},
                      continuation=await cloud.call_dag("first", {}, dry_run=True))
    direct = await cloud.call_dag("first", {}, direct_response=True, dry_run=True)
    with pytest.raises(DagError, match="same direct_response"):
        await cloud.call_dag("first", {"incr": 1}, continuation=direct)
    with pytest.raises(DagError, match="dry_run=True"):
        await cloud.call_dag("first", {"incr": 1}, continuation="second")  # type: ignore[arg-type]
    missing = await cloud.call_dag("nope", {}, dry_run=True)
    with pytest.raises(DagError, match="no DAG named 'nope'"):
        await cloud.call_dag("first", {"incr": 1}, continuation=missing)
    chain = await cloud.call_dag("first", {}, dry_run=True)
    for _ in range(40):
        chain = await cloud.call_dag("first", {}, dry_run=True, continuation=chain)
    with pytest.raises(DagError, match="more than 32 chained continuations"):
        await cloud.call_dag("first", {"incr": 1}, continuation=chain)
    assert await run_dag(cloud, "first", {"incr": 1}) == 2  # the client carries on


def test_dry_run_and_continuation_on_blocking_connections(tcp_cluster: droplet.LocalCluster
                                                          ) -> None:
    with DropletConnection(tcp_cluster.address, timeout=10) as tcp, \
            tcp_cluster.connect(timeout=10) as inproc:
        for cloud in (tcp, inproc):
            cloud.register(incr, "incr")
            cloud.register(square, "square")
            cloud.register_dag("first", ["incr"], [])
            cloud.register_dag("second", ["square"], [])
            then = cloud.call_dag("second", {}, dry_run=True)
            assert isinstance(then, CallDag)
            assert cloud.call_dag("first", {"incr": 4}, continuation=then).get() == 25
            direct = cloud.call_dag("second", {}, True, dry_run=True)
            assert cloud.call_dag("first", {"incr": 1}, True, continuation=direct) == 4
