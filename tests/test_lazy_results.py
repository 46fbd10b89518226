"""Direct results are stored only when their key is asked for (Ray's ownership model).

A call a client sends straight to an executor is answered to that client
alone (``Trigger.store_result=False``): the executor writes no result key, and
nothing is released for it. Reading ``future.obj_id`` makes the client store
the result (or the call's error) itself, and returns once the store holds it,
so ``get_object(obj_id)`` works from any connection.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

import droplet
from droplet.client._blocking import BlockingClient
from droplet.config import Config
from droplet.kvs.keys import RESULT_PREFIX
from droplet.kvs.service import KvsService
from droplet.node import serve_node
from droplet.protocol import encoding as wire
from droplet.protocol.messages import InvalidMessage, Trigger, decode, encode

TIMEOUT = 20.0


def square(_: object, x: int) -> int:
    return x * x


def fail(_: object) -> None:
    raise ValueError("boom")


def _eventually(condition: Callable[[], bool], what: str) -> None:
    for _ in range(400):  # bounded: about 20 s
        gc.collect()
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never became true: {what}")


def _results(kvs: KvsService) -> int:
    store = kvs.backend.store  # type: ignore[attr-defined]  # the in-memory backend's
    return sum(1 for key in store._data if key.startswith(RESULT_PREFIX))


def _tcp(running: Any, timeout: float = TIMEOUT) -> droplet.DropletConnection:
    conn = droplet.DropletConnection(running.address, timeout=timeout)
    assert isinstance(conn._backend, BlockingClient)
    return conn


# --------------------------------------------------------------------------- the wire


def _trigger(**changes: Any) -> Trigger:
    base = Trigger("r1", "f", ["f"], ["v"], ["tcp://e:1"], [], [], [], None, None, False,
                   RESULT_PREFIX + "k", None, False, "NORMAL", None, None, "")
    return attrs.evolve(base, **changes)


def _rewrite_header(frame: bytes, change: Callable[[list[Any]], list[Any]]) -> bytes:
    tag, flags, rid, head_len = wire._ENVELOPE.unpack_from(frame)
    start = wire._ENVELOPE.size
    header = change(wire._json_decode(frame[start:start + head_len].decode()))
    head = wire._json_encode(header).encode()
    return wire._ENVELOPE.pack(tag, flags, rid, len(head)) + head + frame[start + head_len:]


def test_a_trigger_from_an_older_client_keeps_storing_the_result() -> None:
    frame = encode(_trigger(store_result=False))
    msg, _, _ = decode(frame)
    assert msg.store_result is False
    # An older client's trigger has no store_result (nor whole_run) field: the old behaviour.
    msg, _, _ = decode(_rewrite_header(frame, lambda h: h[:-2]))
    assert msg == _trigger()
    assert msg.store_result is True
    with pytest.raises(droplet.ProtocolError, match="header must be a list of"):
        decode(_rewrite_header(frame, lambda h: h[:-3]))  # only the last two may be left out


@pytest.mark.parametrize(("changes", "match"), [
    ({"output_key": "out"}, "store_result may be false only"),
    ({"direct": True}, "store_result may be false only"),
    ({"consistency": "CAUSAL"}, "store_result may be false only"),
    ({"scheduler": "tcp://s:1"}, "store_result may be false only"),
])
def test_store_result_false_is_only_for_plain_client_runs(changes: dict[str, Any],
                                                         match: str) -> None:
    with pytest.raises(InvalidMessage, match=match):
        decode(encode(_trigger(store_result=False, **changes)))


def test_store_result_must_be_a_bool() -> None:
    bad = _rewrite_header(encode(_trigger()), lambda h: [*h[:-2], "no", h[-1]])
    with pytest.raises(droplet.ProtocolError, match=r"Trigger.store_result must be bool"):
        decode(bad)


# --------------------------------------------------------------------------- blocking client


@asynccontextmanager
async def tcp_cluster(**settings: Any) -> AsyncIterator[Any]:
    """An embedded cluster on TCP plus an executor listening on TCP (in this
    process), which the blocking client can send calls to straight."""
    async with droplet.open_local_cluster(executors=1, listen="tcp://127.0.0.1:0",
                                          **settings) as running, trio.open_nursery() as nursery:
        config = Config(role="executor", scheduler=running.address,
                        listen="tcp://127.0.0.1:0", threads=4)
        await nursery.start(functools.partial(serve_node, config))
        yield running
        nursery.cancel_scope.cancel()


async def in_thread(body: Callable[[], None]) -> None:
    with trio.fail_after(60):
        await trio.to_thread.run_sync(body)


async def test_unread_direct_results_cost_the_store_nothing() -> None:
    async with tcp_cluster() as running:
        kvs = running.node.kvs

        def body() -> None:
            with _tcp(running) as cloud:
                f = cloud.register(square, "sq")
                failed = cloud.register(fail, "fail")
                assert f(2).get() == 4
                before = kvs.statistics()
                futures = [f(i) for i in range(50)]
                assert [x.get() for x in futures] == [i * i for i in range(50)]
                with pytest.raises(droplet.FunctionError):
                    failed().get()  # an error nobody asks the key of
                del futures
                gc.collect()
                cloud._backend.flush_releases()
                assert kvs.statistics().puts == before.puts
                assert running.node.scheduler.statistics().runs_started == 0

        await in_thread(body)
        await trio.sleep(0.3)  # a release from close() would have arrived
        assert kvs.statistics().early_releases == 0
        assert kvs.statistics().results == 0 and _results(kvs) == 0


async def test_obj_id_stores_the_result_for_every_connection() -> None:
    async with tcp_cluster() as running:
        kvs = running.node.kvs

        def body() -> None:
            cloud, other = _tcp(running), _tcp(running)
            with other:
                f = cloud.register(square, "sq")
                assert f(1).get() == 1
                future = f(7)
                assert future.get() == 49
                puts = kvs.statistics().puts
                key = future.obj_id
                assert kvs.statistics().puts == puts + 1  # stored and acknowledged
                assert kvs.statistics().results == 1  # kept for result_ttl, as any result
                assert other.get_object(key) == 49
                assert future.obj_id == key and kvs.statistics().puts == puts + 1  # once
                # usable as a reference, by this connection and another
                assert f(droplet.DropletReference(key)).get() == 49 * 49
                assert other.exec_func("sq", [droplet.DropletReference(key)]).get() == 2401
                del future
                gc.collect()
                cloud._backend.flush_releases()
                assert other.get_object(key) == 49  # handed out: kept until close
                cloud.close()
                _eventually(lambda: other.get_object(key) is None, "released at close")

        await in_thread(body)


async def test_obj_id_before_the_result_waits_for_it() -> None:
    async def slow(_: object, x: int) -> int:
        await trio.sleep(0.3)
        return x + 1

    async with tcp_cluster() as running:
        def body() -> None:
            with _tcp(running) as cloud, _tcp(running) as other:
                f = cloud.register(slow, "slow")
                assert f(0).get() == 1
                future = f(41)
                key = future.obj_id  # not in yet: waits for it, then stores it
                assert future.done()
                assert other.get_object(key) == 42
                assert future.get() == 42

        await in_thread(body)


async def test_obj_id_past_the_timeout_stores_the_result_when_it_comes() -> None:
    async def slower(_: object, x: int) -> int:
        await trio.sleep(1.0)
        return x + 1

    async with tcp_cluster() as running:
        def body() -> None:
            with _tcp(running, timeout=0.3) as cloud, _tcp(running) as other:
                f = cloud.register(slower, "slower")
                assert f(0).get(timeout=TIMEOUT) == 1
                future = f(1)
                key = future.obj_id  # gave up waiting after the call's timeout
                assert other.get_object(key) is None
                assert future.get(timeout=TIMEOUT) == 2
                _eventually(lambda: other.get_object(key) == 2, "stored on arrival")

        await in_thread(body)


async def test_obj_id_of_a_call_that_raised_stores_the_error() -> None:
    async with tcp_cluster() as running:
        def body() -> None:
            with _tcp(running) as cloud, _tcp(running) as other:
                failing = cloud.register(fail, "fail")
                with pytest.raises(droplet.FunctionError, match="ValueError"):
                    failing().get()
                future = failing()
                with pytest.raises(droplet.FunctionError, match="boom"):
                    future.get()
                key = future.obj_id
                with pytest.raises(droplet.FunctionError, match="boom"):
                    other.get_object(key)
                key = failing().obj_id  # before the failure arrived: the same
                with pytest.raises(droplet.FunctionError, match="boom"):
                    other.get_object(key)

        await in_thread(body)


async def test_dag_runs_map_and_continuations_keep_their_keys() -> None:
    async with tcp_cluster() as running:
        def body() -> None:
            with _tcp(running) as cloud, _tcp(running) as other:
                cloud.register(square, "sq")
                cloud.register(lambda _, x: x + 1, "inc")
                cloud.register_dag("d", ["sq", "inc"], [("sq", "inc")])
                assert cloud.call_dag("d", {"sq": 2}).get() == 5
                run = cloud.call_dag("d", {"sq": 3})  # straight to the executor
                assert other.get_object(run.obj_id) == 10
                cloud.register_dag("d2", ["inc"], [])
                then = cloud.call_dag("d2", {}, dry_run=True)
                chained = cloud.call_dag("d", {"sq": 4}, continuation=then)  # via the scheduler
                assert chained.get() == 18
                assert other.get_object(chained.obj_id) == 18
                mapped = cloud.map("sq", range(5))
                assert [x.get() for x in mapped] == [0, 1, 4, 9, 16]
                assert other.get_object(mapped[3].obj_id) == 9

        await in_thread(body)


async def test_closing_with_a_store_pending_is_quiet() -> None:
    async def slower(_: object) -> int:
        await trio.sleep(0.5)
        return 1

    async with tcp_cluster() as running:
        kvs = running.node.kvs

        def body() -> None:
            cloud = _tcp(running, timeout=0.1)
            f = cloud.register(slower, "slower")
            assert f().get(timeout=TIMEOUT) == 1
            future = f()
            future.obj_id  # noqa: B018  # gives up waiting: stored on arrival...
            cloud.close()  # ...which never comes: the connection is closed
            with pytest.raises(droplet.ConnectionError):
                future.get(timeout=TIMEOUT)

        await in_thread(body)
        await trio.sleep(0.7)
        assert _results(kvs) == 0

        def again() -> None:
            with _tcp(running) as conn:
                assert conn.exec_func("slower", []).get() == 1  # the node still serves

        await in_thread(again)


# --------------------------------------------------------------------------- async, portal


async def test_async_client_stores_only_what_is_handed_out(
        autojump_clock: trio.testing.MockClock) -> None:
    async with droplet.open_local_cluster(executors=1) as running, \
            running.client() as cloud, running.client() as other:
        kvs = running.node.kvs
        assert kvs is not None

        async def triple(_: Any, x: int) -> int:
            return 3 * x

        async def afail(_: Any) -> None:
            raise ValueError("boom")

        fn = await cloud.register(triple, "triple")
        bad = await cloud.register(afail, "afail")
        assert await (await fn(0)).get() == 0
        with pytest.raises(droplet.FunctionError, match="boom"):
            await (await bad()).get()
        puts = kvs.statistics().puts
        futures = [await fn(i) for i in range(20)]
        assert [await x for x in futures] == [3 * i for i in range(20)]
        del futures
        gc.collect()
        await trio.sleep(1)  # any release would be flushed by now
        assert kvs.statistics().puts == puts
        assert kvs.statistics().early_releases == 0
        future = await fn(5)
        key = future.obj_id  # before the result: stored when it arrives
        assert await future == 15
        assert await cloud.get_object(key) == 15  # waits for the store's ack first
        assert await other.get_object(key) == 15
        failed = await bad()
        with pytest.raises(droplet.FunctionError, match="boom"):
            await failed.get()
        key = failed.obj_id
        assert await (await fn(1)).get() == 3  # a call waits for the stores too
        with pytest.raises(droplet.FunctionError, match="boom"):
            await other.get_object(key)
    assert _results(kvs) == 0  # the handed-out keys were released at close


def test_sync_embedded_obj_id_is_readable_by_others_at_once() -> None:
    with droplet.LocalCluster(executors=1) as local:
        cloud, other = local.connect(), local.connect()
        f = cloud.register(square, "sq")
        assert f(2).get() == 4
        future = f(9)  # posted straight to the executor
        key = future.obj_id
        assert other.get_object(key) == 81
        assert future.get() == 81


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize("arg_map", [{"a": 1}, {"a": [1, "x"], "b": [b"y" * 100]}, {}],
                         ids=["one", "two-sources", "none"])
def test_template_encoded_triggers_are_what_encode_writes(arg_map: dict[str, Any]) -> None:
    """The blocking client's fast path writes exactly the triggers triggers_for makes."""
    from droplet.client._core import ClientCore
    from droplet.client._direct import triggers_for
    from droplet.client._wire import TriggerTemplates
    from droplet.protocol.messages import CallPlaced

    plan = CallPlaced("d", False, ["a", "b", "c"], ["1", "2", "3"], [["a", "c"], ["b", "c"]],
                      ["tcp://127.0.0.1:9"], 5.0)
    templates = TriggerTemplates()
    for _ in range(3):  # the first makes the template, later ones reuse it
        call = ClientCore().dag_call("d", arg_map, False, "NORMAL", None, None, None)
        encoded = templates.encode(call, plan, "tcp://127.0.0.1:9")
        # one trigger, for source a, that starts both sources a and b
        assert encoded is not None and len(encoded) == 1
        decoded = [decode(e.payload(7 if i == 0 else 0)) for i, e in enumerate(encoded)]
        assert decoded[0][0].function == "a" and decoded[0][0].whole_run
        run_id = decoded[0][0].run_id
        expected = triggers_for(call, plan, "tcp://127.0.0.1:9")
        assert expected is not None
        for (msg, rid, _), want, e in zip(decoded, expected, encoded, strict=True):
            assert msg == attrs.evolve(want, run_id=run_id)
            assert e.payload(rid) == encode(attrs.evolve(want, run_id=run_id), rid)
        assert decoded[0][1] == 7
    assert len({d[0].run_id for d in decoded}) == 1
    # big (out-of-band) arguments and references take the ordinary path
    big = ClientCore().dag_call("d", {"a": [b"z" * 2_000_000]}, False, "NORMAL", None, None,
                                None)
    assert templates.encode(big, plan, "tcp://127.0.0.1:9") is None
    ref = ClientCore().dag_call("d", {"a": [droplet.DropletReference("k")]}, False, "NORMAL",
                                None, None, None)
    assert templates.encode(ref, plan, "tcp://127.0.0.1:9") is None


async def test_async_client_closing_with_stores_pending(
        autojump_clock: trio.testing.MockClock) -> None:
    async def slow(_: Any) -> int:
        await trio.sleep(5)
        return 1

    async with droplet.open_local_cluster(executors=1) as running:
        kvs = running.node.kvs
        assert kvs is not None
        async with running.client() as cloud:
            fn = await cloud.register(slow, "slow")
            assert await (await fn()).get() == 1
            future = await fn()
            future.obj_id  # noqa: B018  # stored when it arrives, which is after close
        await trio.sleep(10)  # the result came back to a closed client
        assert _results(kvs) == 0
        async with running.client() as again:
            assert await (await again.exec_func("slow", [])).get() == 1


def test_sync_embedded_obj_id_before_the_result_waits_for_it() -> None:
    async def slow(_: object, x: int) -> int:
        await trio.sleep(0.3)
        return x + 1

    with droplet.LocalCluster(executors=1) as local:
        cloud, other = local.connect(), local.connect()
        f = cloud.register(slow, "slow")
        assert f(0).get() == 1
        future = f(1)
        key = future.obj_id  # waits for the result, then for the store's ack
        assert other.get_object(key) == 2


def test_what_a_client_stores_for_a_direct_call() -> None:
    """The result, or the call's error (even one that does not pickle, or the
    executor's connection breaking)."""
    import threading

    from droplet.client._core import ClientCore, direct_result_lattice
    from droplet.protocol.messages import KvsValue
    from droplet.serialization import dumps_value

    class Unpicklable(droplet.DropletError):
        def __init__(self, message: str, extra: int) -> None:
            super().__init__(message)
            self.lock = threading.Lock()

    def stored(lattice: bytes | None) -> Any:
        assert lattice is not None
        return ClientCore.stored_object(KvsValue("k", lattice))

    assert stored(direct_result_lattice(dumps_value({"a": 1}), None)) == {"a": 1}
    with pytest.raises(droplet.TimeoutError, match="too slow"):
        stored(direct_result_lattice(None, droplet.TimeoutError("too slow")))
    with pytest.raises(droplet.DropletError, match="Unpicklable: odd"):
        stored(direct_result_lattice(None, Unpicklable("odd", 1)))
    # The executor's connection broke: the reader learns so, as through the scheduler.
    with pytest.raises(droplet.ConnectionError, match="gone"):
        stored(direct_result_lattice(None, droplet.ConnectionError("gone")))
    assert direct_result_lattice(None, None) is None  # nothing yet


def test_a_direct_result_too_big_to_store_is_stored_as_a_failure_saying_so() -> None:
    from droplet.client._core import ClientCore, direct_result_lattice, result_put
    from droplet.protocol.messages import KvsValue
    from droplet.serialization import dumps_value

    lattice = direct_result_lattice(dumps_value(b"x" * 9000), None)
    assert lattice is not None
    assert result_put("k", lattice, None).lattice == lattice  # no limit known
    assert result_put("k", lattice, 1 << 20).lattice == lattice  # far below the limit
    put = result_put("k", lattice, len(lattice) + 8)  # the reply fit; the write does not
    with pytest.raises(droplet.DropletError,
                       match=r"the result under 'k' could not be stored: .*max_frame_size="):
        ClientCore.stored_object(KvsValue("k", put.lattice))


async def test_an_executor_refuses_a_bad_store_result_and_keeps_serving() -> None:
    from droplet.client._core import ClientCore
    from droplet.client._direct import triggers_for

    async with droplet.open_local_cluster(executors=1) as running, \
            running.client() as cloud:
        fn = await cloud.register(square, "sq")
        assert await (await fn(3)).get() == 9
        found = await cloud._direct.target("sq", True)
        assert found is not None
        peer, plan = found
        call = ClientCore.function_call("sq", [4])
        triggers = triggers_for(call, plan, peer.remote)
        assert triggers is not None
        bad = attrs.evolve(triggers[0], output_key="mine")  # with store_result=False
        with trio.fail_after(10):
            with pytest.raises(droplet.ProtocolError, match="store_result may be false only"):
                await peer.request(bad, 5)
        assert await (await fn(5)).get() == 25  # the same connection still serves
