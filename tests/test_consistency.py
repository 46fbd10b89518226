"""Lattice state and the three consistency levels, on an embedded cluster.

Every test runs a two-executor cluster with ``placement="spread"``, so the two
functions of a two-function DAG run on different executors (each with its own
cache); tests that depend on that check it through the invocation ids from
``lib.getid()`` (``<executor url>/<n>``).

No test depends on timing: functions that must wait for the test block on a
message (``lib.recv()``) sent when the test is ready, and anything the cluster
does after a result is returned (pin release, cache pushes) is awaited with a
bounded polling loop under ``trio.fail_after``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

import droplet
from droplet import CAUSAL, NORMAL, REPEATABLE_READ, DropletReference
from droplet.client.aio import AsyncDropletClient
from droplet.errors import DropletError, FunctionError, LatticeTypeError
from droplet.executor.service import ExecutorService
from droplet.lattices import LWWLattice, MapLattice, MaxLattice, SetLattice

GUARD = 15  # seconds: a bound for each wait, never an expected duration


# ---------------------------------------------------------------- helpers


@pytest.fixture
async def cluster(storage: str | None) -> AsyncIterator[Any]:
    """A 2-executor cluster on each storage backend (in memory, and on Redis)."""
    async with droplet.open_local_cluster(2, placement="spread", storage=storage) as running:
        yield running


@pytest.fixture
async def cloud(cluster: Any) -> AsyncIterator[AsyncDropletClient]:
    async with cluster.client() as client:
        yield client


def executor_of(invocation_id: str) -> str:
    """The executor URL in an invocation id (``<executor url>/<n>``)."""
    url, _, local = invocation_id.rpartition("/")
    assert url and local.isdigit(), invocation_id
    return url


def fresh(name: str) -> str:
    """A key no earlier call has read, so no executor has it cached."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def poll(check: Callable[[], Any], what: str) -> None:
    """Wait (bounded) until ``await check()`` is true."""
    try:
        with trio.fail_after(GUARD):
            while True:
                if await check():
                    return
                await trio.sleep(0.005)
    except trio.TooSlowError:
        raise AssertionError(f"gave up waiting for {what} after {GUARD} s") from None


async def settle(cluster: Any) -> None:
    """Wait until no run is in flight and the KVS holds no pinned versions.

    A run's bookkeeping (scheduler load, REPEATABLE_READ pins) is released by a
    one-way message after its result is stored, so it can lag the result.
    Placement counts in-flight runs, so tests that need two executors settle first.
    """
    async def idle() -> bool:
        return (cluster.node.scheduler.statistics().runs_in_flight == 0
                and cluster.node.kvs.statistics().pinned_runs == 0)
    await poll(idle, "the cluster to settle")


# Functions run on executors; they are pickled by value with cloudpickle.

def wait_for_go(lib: Any) -> None:
    """Block this invocation until someone sends it b"go" (bounded, so a bug fails loudly)."""
    for _ in range(3000):
        if any(data == b"go" for _, data in lib.recv()):
            return
        time.sleep(0.005)
    raise RuntimeError("no go message arrived")


def race_first(lib: Any, key: str, ready_key: str) -> tuple[Any, str]:
    seen = lib.get(key)
    lib.put(ready_key, lib.getid())  # tells the test where to send b"go"
    wait_for_go(lib)
    return seen, lib.getid()


def race_second(lib: Any, key: str, by_reference: Any, first_read: Any, first_id: str
                ) -> dict[str, Any]:
    # race_first's (seen, id) tuple arrives as two arguments
    return {"first": first_read, "first_id": first_id, "second": lib.get(key),
            "again": lib.get(key), "reference": by_reference, "second_id": lib.getid()}


def signal(lib: Any, dest: str) -> None:
    lib.send(dest, b"go")


def write(lib: Any, key: str, value: Any) -> str:
    lib.put(key, value)
    return lib.getid()


def read(lib: Any, key: str) -> Any:
    return lib.get(key)


def echo(lib: Any, value: Any) -> Any:
    return value


def read_where(lib: Any, key: str) -> tuple[Any, str]:
    return lib.get(key), lib.getid()


def read_where_after(lib: Any, key: str, *upstream: Any
                     ) -> tuple[tuple[Any, ...], tuple[Any, str]]:
    # read_where's (value, id) tuple arrives as two arguments
    return upstream, (lib.get(key), lib.getid())


async def register_all(cloud: AsyncDropletClient) -> None:
    for fn in (race_first, race_second, signal, write, read, echo, read_where,
               read_where_after):
        await cloud.register(fn, fn.__name__)
    await cloud.register_dag("race", ["race_first", "race_second"],
                             [("race_first", "race_second")])
    await cloud.register_dag("write", ["write"], [])
    await cloud.register_dag("read", ["read"], [])
    await cloud.register_dag("echo", ["echo"], [])
    # Two reads of one key in one run, on the two executors (spread placement).
    await cloud.register_dag("read_both", ["read_where", "read_where_after"],
                             [("read_where", "read_where_after")])


async def run(cloud: AsyncDropletClient, dag: str, args: dict[str, Any], level: str = NORMAL,
              session: str | None = None) -> Any:
    future = await cloud.call_dag(dag, args, consistency=level, client_id=session)
    with trio.fail_after(GUARD):
        return await future.get()


async def read_on_both(cluster: Any, cloud: AsyncDropletClient, key: str,
                       level: str = NORMAL, session: str | None = None) -> tuple[Any, Any]:
    """Read ``key`` on each executor, in one run; returns the two values."""
    await settle(cluster)
    (a, a_id), (b, b_id) = await run(
        cloud, "read_both", {"read_where": [key], "read_where_after": [key]}, level, session)
    assert executor_of(a_id) != executor_of(b_id)
    return a, b


# ---------------------------------------------------------------- the race


async def wait_until_ready(cloud: AsyncDropletClient, ready_key: str) -> str:
    """The invocation id ``race_first`` writes to ``ready_key`` once it has read x."""
    async def ready() -> Any:
        return await cloud.get_object(ready_key)
    await poll(ready, "the first function's read")
    first_id = await cloud.get_object(ready_key)
    assert isinstance(first_id, str)
    return first_id


async def release(cloud: AsyncDropletClient, first_id: str) -> None:
    """Let ``race_first`` return (also when the test failed, so teardown is quick)."""
    with trio.fail_after(GUARD):
        await (await cloud.exec_func("signal", [first_id])).get()


@pytest.mark.parametrize(("level", "expected"), [(NORMAL, "new"), (REPEATABLE_READ, "old")])
async def test_overwrite_between_two_functions_of_one_run(
        cluster: Any, cloud: AsyncDropletClient, level: str, expected: str) -> None:
    """The first function reads x; the client overwrites x; the second reads x again.

    NORMAL reads the latest value; REPEATABLE_READ gives every function of the run
    the version the run first read, also on another executor and for references.
    x is a fresh key, so under NORMAL the second executor misses its cache and
    reads the store: "new" does not depend on when a cache push arrives.

    The first function waits for a message rather than polling a "go" key: under
    REPEATABLE_READ that key's first read would be pinned, and the poll would
    never see the change.
    """
    await register_all(cloud)
    x, ready = fresh("x"), fresh("ready")
    await cloud.put_object(x, "old")
    await settle(cluster)
    future = await cloud.call_dag(
        "race", {"race_first": [x, ready], "race_second": [x, DropletReference(x)]},
        consistency=level)

    first_id = await wait_until_ready(cloud, ready)
    try:
        # The first function has read x: under REPEATABLE_READ its version is pinned.
        pins = cluster.node.kvs.statistics().pinned_runs
        assert pins == (1 if level == REPEATABLE_READ else 0)
        await cloud.put_object(x, "new")
    finally:
        await release(cloud, first_id)
    with trio.fail_after(GUARD):
        result = await future.get()

    assert result["first_id"] == first_id
    assert executor_of(result["first_id"]) != executor_of(result["second_id"])
    assert result["first"] == "old"
    assert result["second"] == result["again"] == result["reference"] == expected
    assert await cloud.get_object(x) == "new"
    # The scheduler releases the run's pins once its result is stored.
    await settle(cluster)
    assert cluster.node.kvs.statistics().pinned_runs == 0


async def test_repeatable_read_pins_an_absent_key_as_absent(
        cluster: Any, cloud: AsyncDropletClient) -> None:
    await register_all(cloud)
    x, ready = fresh("x"), fresh("ready")
    await settle(cluster)
    future = await cloud.call_dag(
        "race", {"race_first": [x, ready], "race_second": [x, DropletReference(x)]},
        consistency=REPEATABLE_READ)

    first_id = await wait_until_ready(cloud, ready)
    try:
        await cloud.put_object(x, "created meanwhile")
    finally:
        await release(cloud, first_id)
    with trio.fail_after(GUARD):
        result = await future.get()
    assert result["first"] is None
    assert result["second"] is None and result["reference"] is None
    await settle(cluster)


async def test_repeatable_read_after_the_runs_own_write(
        cluster: Any, cloud: AsyncDropletClient) -> None:
    """A key read before the run's own write keeps the pinned version; an unread one does not."""
    def read_write_read(lib: Any, read_first: str, write_only: str) -> list[Any]:
        before = lib.get(read_first)
        lib.put(read_first, "mine")
        lib.put(write_only, "mine")
        return [before, lib.get(read_first), lib.get(write_only)]

    await cloud.register(read_write_read, "rwr")
    await cloud.register_dag("rwr", ["rwr"], [])
    a, b = fresh("a"), fresh("b")
    await cloud.put_object(a, "old")
    await cloud.put_object(b, "old")
    assert await run(cloud, "rwr", {"rwr": [a, b]}, REPEATABLE_READ) == ["old", "old", "mine"]
    assert await cloud.get_object(a) == "mine"  # the write itself went through
    await settle(cluster)


async def test_pins_are_released_when_a_run_fails(cluster: Any, cloud: AsyncDropletClient) -> None:
    def read_then_fail(lib: Any, key: str) -> None:
        lib.get(key)
        raise ValueError("boom")

    await cloud.register(read_then_fail, "read_then_fail")
    await cloud.register_dag("fails", ["read_then_fail"], [])
    key = fresh("k")
    await cloud.put_object(key, 1)
    with pytest.raises(FunctionError, match="boom"):
        await run(cloud, "fails", {"read_then_fail": [key]}, REPEATABLE_READ)
    await settle(cluster)
    assert cluster.node.kvs.statistics().pinned_runs == 0


# ---------------------------------------------------------------- CAUSAL


async def test_concurrent_session_writes_are_kept_until_a_write_that_saw_them(
        cluster: Any, cloud: AsyncDropletClient) -> None:
    await register_all(cloud)
    key = fresh("c")
    # Sessions A and B write at the same time; neither saw the other's write.
    futures = [await cloud.call_dag("write", {"write": [key, value]}, consistency=CAUSAL,
                                    client_id=session)
               for session, value in (("A", "a"), ("B", "b"))]
    with trio.fail_after(GUARD):
        for future in futures:
            await future.get()
    both = frozenset({"a", "b"})
    assert await cloud.get_object(key) == both
    assert await run(cloud, "read", {"read": [key]}, CAUSAL, "C") == both
    assert await run(cloud, "read", {"read": [key]}, CAUSAL, "A") == both

    # A blind write (session E saw nothing) is concurrent with both: three values.
    await run(cloud, "write", {"write": [key, "e"]}, CAUSAL, "E")
    assert await cloud.get_object(key) == frozenset({"a", "b", "e"})

    # C read a and b in an earlier call; its write replaces them, but not e.
    await run(cloud, "write", {"write": [key, "c"]}, CAUSAL, "C")
    assert await cloud.get_object(key) == frozenset({"c", "e"})

    # A session that read everything replaces everything: one value afterwards.
    assert await run(cloud, "read", {"read": [key]}, CAUSAL, "F") == frozenset({"c", "e"})
    await run(cloud, "write", {"write": [key, "f"]}, CAUSAL, "F")
    assert await cloud.get_object(key) == "f"
    for session in ("A", "B", "C", "E", "F", "new"):
        assert await run(cloud, "read", {"read": [key]}, CAUSAL, session) == "f"
    assert await read_on_both(cluster, cloud, key, CAUSAL, "G") == ("f", "f")


async def test_read_and_write_of_both_values_in_one_call_replaces_them(
        cluster: Any, cloud: AsyncDropletClient) -> None:
    def read_and_write(lib: Any, key: str, value: Any) -> Any:
        seen = lib.get(key)
        lib.put(key, value)
        return seen

    await register_all(cloud)
    await cloud.register(read_and_write, "rw")
    await cloud.register_dag("rw", ["rw"], [])
    key = fresh("c")
    await run(cloud, "write", {"write": [key, 1]}, CAUSAL, "A")
    await run(cloud, "write", {"write": [key, 2]}, CAUSAL, "B")
    assert await run(cloud, "rw", {"rw": [key, 3]}, CAUSAL, "C") == frozenset({1, 2})
    assert await cloud.get_object(key) == 3


def _make_stale(executors: list[ExecutorService], key: str, data: bytes) -> None:
    """Put an old version back into every executor cache, as if a push were late.

    White-box: the caches are kept fresh by pushes from the KVS, so a stale
    read cannot be provoked deterministically from outside.
    """
    for executor in executors:
        executor.cache.replace(key, data)


async def test_a_session_reads_its_writes_and_never_goes_back_in_time(
        cluster: Any, cloud: AsyncDropletClient) -> None:
    await register_all(cloud)
    executors: list[ExecutorService] = cluster.node.executors
    assert len(executors) == 2
    key = fresh("s")
    await run(cloud, "write", {"write": [key, "v1"]}, CAUSAL, "A")
    # Both executors read the key, so both cache v1 (and subscribe to it).
    assert await read_on_both(cluster, cloud, key) == ("v1", "v1")
    v1 = [ex.cache.peek(key) for ex in executors]
    assert v1[0] is not None and v1[0] == v1[1]

    writer_id = await run(cloud, "write", {"write": [key, "v2"]}, CAUSAL, "A")
    assert await run(cloud, "read", {"read": [key]}, CAUSAL, "A") == "v2"

    async def pushed() -> bool:
        return all(ex.cache.peek(key) not in (None, v1[0]) for ex in executors)
    await poll(pushed, "v2 to reach both caches")

    # Now make both caches stale. A NORMAL read shows it: it gets v1 on both.
    _make_stale(executors, key, v1[0])
    assert await read_on_both(cluster, cloud, key) == ("v1", "v1")
    # Session A wrote v2 (through one executor); it reads v2 on either executor.
    assert await read_on_both(cluster, cloud, key, CAUSAL, "A") == ("v2", "v2")
    assert writer_id.rpartition("/")[0] in {ex.url for ex in executors}

    # Monotonic reads: session R reads v2, then the caches go stale again; R still reads v2.
    assert await run(cloud, "read", {"read": [key]}, CAUSAL, "R") == "v2"
    _make_stale(executors, key, v1[0])
    assert await read_on_both(cluster, cloud, key, CAUSAL, "R") == ("v2", "v2")

    # A session's later write supersedes its earlier ones, wherever it lands.
    await run(cloud, "write", {"write": [key, "v3"]}, CAUSAL, "A")
    assert await cloud.get_object(key) == "v3"
    assert await read_on_both(cluster, cloud, key, CAUSAL, "A") == ("v3", "v3")


async def test_a_session_that_outgrew_its_context_still_reads_its_writes(
        cluster: Any, cloud: AsyncDropletClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bounded context forgets old keys, and then reads them from the store."""
    import droplet.consistency

    monkeypatch.setattr(droplet.consistency, "MAX_CONTEXT_KEYS", 4)

    def write_many(lib: Any, keys: list[str]) -> None:
        for key in keys:
            lib.put(key, key)

    await register_all(cloud)
    await cloud.register(write_many, "write_many")
    await cloud.register_dag("write_many", ["write_many"], [])
    executors: list[ExecutorService] = cluster.node.executors
    key = fresh("s")
    await run(cloud, "write", {"write": [key, "v1"]}, CAUSAL, "A")
    assert await read_on_both(cluster, cloud, key) == ("v1", "v1")
    v1 = executors[0].cache.peek(key)
    assert v1 is not None
    await run(cloud, "write", {"write": [key, "v2"]}, CAUSAL, "A")

    async def pushed() -> bool:
        return all(ex.cache.peek(key) not in (None, v1) for ex in executors)
    await poll(pushed, "v2 to reach both caches")

    # Session A now writes 4 other keys: its context (at most 4 keys) forgets `key`.
    others = [fresh(f"o{i}") for i in range(4)]
    await run(cloud, "write_many", {"write_many": [others]}, CAUSAL, "A")
    session = cloud._core.sessions["A"]
    assert session.truncated and sorted(session.clocks) == sorted(others)
    # The caches go stale; A must still read v2, which only the store has now.
    _make_stale(executors, key, v1)
    assert await read_on_both(cluster, cloud, key) == ("v1", "v1")  # NORMAL: stale
    _make_stale(executors, key, v1)
    assert await read_on_both(cluster, cloud, key, CAUSAL, "A") == ("v2", "v2")
    assert len(cloud._core.sessions["A"].clocks) <= 4


async def test_a_read_pulls_in_the_dependencies_of_what_it_read(
        cluster: Any, cloud: AsyncDropletClient) -> None:
    """Causal snapshot: after reading y, a read of x sees at least the x that y's writer saw."""
    def read_many(lib: Any, keys: list[str]) -> list[Any]:
        return [lib.get(key) for key in keys]

    await register_all(cloud)
    await cloud.register(read_many, "read_many")
    await cloud.register_dag("read_many", ["read_many"], [])
    executors: list[ExecutorService] = cluster.node.executors
    x, y = fresh("x"), fresh("y")
    await run(cloud, "write", {"write": [x, "x1"]}, CAUSAL, "A")
    assert await read_on_both(cluster, cloud, x) == ("x1", "x1")
    x1 = executors[0].cache.peek(x)
    assert x1 is not None
    await run(cloud, "write", {"write": [x, "x2"]}, CAUSAL, "A")
    await run(cloud, "write", {"write": [y, "y after x2"]}, CAUSAL, "A")  # depends on x2

    async def pushed() -> bool:
        return all(ex.cache.peek(x) not in (None, x1) for ex in executors)
    await poll(pushed, "x2 to reach both caches")
    _make_stale(executors, x, x1)
    # Without reading y, a fresh session may see the stale x ...
    assert await run(cloud, "read_many", {"read_many": [[x]]}, CAUSAL, "R1") == ["x1"]
    # ... but once it read y, it must see the x that y depended on.
    _make_stale(executors, x, x1)
    assert await run(cloud, "read_many", {"read_many": [[y, x]]}, CAUSAL, "R2") == [
        "y after x2", "x2"]
    # Also when the two reads are in different calls of one session.
    _make_stale(executors, x, x1)
    assert await run(cloud, "read", {"read": [y]}, CAUSAL, "R3") == "y after x2"
    assert await read_on_both(cluster, cloud, x, CAUSAL, "R3") == ("x2", "x2")


async def test_a_write_then_a_read_on_another_executor_in_one_run(
        cluster: Any, cloud: AsyncDropletClient) -> None:
    """The causal context travels with the run from executor to executor."""
    def put_here(lib: Any, key: str, value: Any) -> str:
        lib.put(key, value)
        return lib.getid()

    def get_there(lib: Any, key: str, writer_id: str) -> tuple[str, Any, str]:
        return writer_id, lib.get(key), lib.getid()

    await cloud.register(put_here, "put_here")
    await cloud.register(get_there, "get_there")
    await cloud.register_dag("wr", ["put_here", "get_there"], [("put_here", "get_there")])
    key = fresh("w")
    for i in range(3):
        await settle(cluster)
        writer, seen, reader = await run(
            cloud, "wr", {"put_here": [key, i], "get_there": [key]}, CAUSAL, "S")
        assert executor_of(writer) != executor_of(reader)
        assert seen == i


# ---------------------------------------------------------------- the store merges


async def test_set_lattices_merge(cloud: AsyncDropletClient) -> None:
    key = fresh("set")
    await cloud.put_object(key, SetLattice({1, 2}))
    await cloud.put_object(key, SetLattice({2, 3}))
    stored = await cloud.get_object(key)
    assert isinstance(stored, SetLattice)
    assert stored == SetLattice({1, 2, 3})
    assert stored.reveal() == frozenset({1, 2, 3})


async def test_get_object_returns_lattices_as_lattices_and_plain_values_plain(
        cluster: Any, cloud: AsyncDropletClient) -> None:
    await register_all(cloud)
    stored = {
        fresh("plain"): [1, "two", {"three": 3}],
        fresh("lww"): LWWLattice(5, "explicit"),
        fresh("set"): SetLattice({"a"}),
        fresh("max"): MaxLattice(7),
        fresh("map"): MapLattice({"n": MaxLattice(1), "s": SetLattice({2})}),
    }
    for key, value in stored.items():
        await cloud.put_object(key, value)
    expected = [[1, "two", {"three": 3}], "explicit", SetLattice({"a"}), MaxLattice(7),
                MapLattice({"n": MaxLattice(1), "s": SetLattice({2})})]
    for key, want in zip(stored, expected, strict=True):
        assert await cloud.get_object(key) == want
        assert type(await cloud.get_object(key)) is type(want)
        # Functions see the same, through lib.get and through references.
        assert await run(cloud, "read", {"read": [key]}) == want
        assert await run(cloud, "echo", {"echo": [DropletReference(key)]}) == want
    assert await cloud.get_object(fresh("absent")) is None


@pytest.mark.parametrize("order", ["plain first", "lattice first"])
async def test_a_key_keeps_its_lattice_type(
        cluster: Any, cloud: AsyncDropletClient, order: str) -> None:
    key = fresh("typed")
    first: Any = "plain" if order == "plain first" else SetLattice({1})
    second: Any = SetLattice({1}) if order == "plain first" else "plain"
    await cloud.put_object(key, first)
    with pytest.raises(LatticeTypeError) as info:
        await cloud.put_object(key, second)
    assert isinstance(info.value, DropletError)
    message = str(info.value)
    assert "LWW" in message and "Set" in message and repr(key) in message

    # The node keeps serving, and the key keeps its value.
    assert await cloud.get_object(key) == first
    await cloud.put_object(key, first)
    await register_all(cloud)
    assert await run(cloud, "read", {"read": [key]}) == first


async def test_a_mismatched_put_in_a_function_fails_that_call_only(
        cluster: Any, cloud: AsyncDropletClient) -> None:
    await register_all(cloud)
    key = fresh("typed")
    await cloud.put_object(key, "plain")
    with pytest.raises(FunctionError) as info:
        await run(cloud, "write", {"write": [key, SetLattice({1})]})
    assert "LatticeTypeError" in info.value.type_name
    assert "LWW" in info.value.remote_message and "Set" in info.value.remote_message
    # Mixing levels on a key is the same mistake: CAUSAL writes are causal lattices.
    with pytest.raises(FunctionError, match="MultiKeyCausal"):
        await run(cloud, "write", {"write": [key, "causal"]}, CAUSAL, "A")
    assert await run(cloud, "read", {"read": [key]}) == "plain"


async def test_a_shared_counter_of_per_writer_maxima(cloud: AsyncDropletClient) -> None:
    """Each call owns one entry of a MapLattice and raises its MaxLattice; no locks."""
    def bump(lib: Any, key: str, writer: str, times: int) -> int:
        for n in range(1, times + 1):
            lib.put(key, MapLattice({writer: MaxLattice(n)}))
        lib.put(key, MapLattice({writer: MaxLattice(1)}))  # a stale retry changes nothing
        return times

    def total(lib: Any, key: str) -> int:
        counter = lib.get(key)
        assert isinstance(counter, MapLattice)
        return sum(counter.reveal().values())

    await cloud.register(bump, "bump")
    await cloud.register(total, "total")
    key = fresh("counter")
    futures = [await cloud.exec_func("bump", [key, f"w{i}", i + 1]) for i in range(8)]
    with trio.fail_after(GUARD):
        counts = [await future.get() for future in futures]
    expected = sum(counts)
    assert expected == 36

    counter = await cloud.get_object(key)
    assert isinstance(counter, MapLattice)
    assert counter.reveal() == {f"w{i}": i + 1 for i in range(8)}
    assert sum(counter.reveal().values()) == expected
    with trio.fail_after(GUARD):
        assert await (await cloud.exec_func("total", [key])).get() == expected


# ---------------------------------------------------------------- last writer wins


async def test_puts_from_one_client_order_in_call_order(
        cluster: Any, cloud: AsyncDropletClient) -> None:
    def put_twice(lib: Any, key: str) -> None:
        lib.put(key, "first")
        lib.put(key, "second")

    await register_all(cloud)
    await cloud.register(put_twice, "put_twice")
    key = fresh("lww")
    for i in range(50):
        await cloud.put_object(key, i)
        assert await cloud.get_object(key) == i
    with trio.fail_after(GUARD):
        await (await cloud.exec_func("put_twice", [key])).get()
    assert await cloud.get_object(key) == "second"
    assert await run(cloud, "read", {"read": [key]}) == "second"


async def test_equal_timestamps_are_ordered_by_writer(cloud: AsyncDropletClient) -> None:
    one, two = fresh("tie"), fresh("tie")
    await cloud.put_object(one, LWWLattice(1000, "from w1", writer="w1"))
    await cloud.put_object(one, LWWLattice(1000, "from w2", writer="w2"))
    await cloud.put_object(two, LWWLattice(1000, "from w2", writer="w2"))
    await cloud.put_object(two, LWWLattice(1000, "from w1", writer="w1"))
    assert await cloud.get_object(one) == await cloud.get_object(two) == "from w2"
    # A later timestamp wins whatever the arrival order; an earlier one arriving late loses.
    await cloud.put_object(one, LWWLattice(999, "late but old", writer="zzz"))
    assert await cloud.get_object(one) == "from w2"


async def test_puts_from_two_clients_converge_everywhere(
        cluster: Any, cloud: AsyncDropletClient) -> None:
    await register_all(cloud)
    key = fresh("lww2")
    await cloud.put_object(key, "start")
    # Both executors cache the key (and are pushed its changes).
    assert await read_on_both(cluster, cloud, key) == ("start", "start")

    async with cluster.client() as other:
        async def writes(client: AsyncDropletClient, name: str) -> None:
            for i in range(30):
                await client.put_object(key, (name, i))

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writes, cloud, "one")
                nursery.start_soon(writes, other, "two")
        final = await cloud.get_object(key)
        assert final in {("one", 29), ("two", 29)}
        assert await other.get_object(key) == final

    async def executors_agree() -> bool:
        return await read_on_both(cluster, cloud, key) == (final, final)
    await poll(executors_agree, "both executor caches to converge")


async def test_causal_values_need_not_be_hashable(cluster: Any, cloud: AsyncDropletClient) -> None:
    await register_all(cloud)
    key = fresh("unhashable")
    await run(cloud, "write", {"write": [key, {"items": [1, 2]}]}, CAUSAL, "A")
    assert await run(cloud, "read", {"read": [key]}, CAUSAL, "A") == {"items": [1, 2]}
    assert await cloud.get_object(key) == {"items": [1, 2]}
    # A concurrent unhashable value from another session: both come back, as a list.
    await run(cloud, "write", {"write": [key, [3]]}, CAUSAL, "B")
    both = await cloud.get_object(key)
    assert isinstance(both, list) and sorted(map(repr, both)) == ["[3]", "{'items': [1, 2]}"]
