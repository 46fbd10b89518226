"""Issue 7, embedded: a node survives what a client, a peer or a function does.

Peer input that used to kill an executor (a garbage causal context, a trigger
naming a function not in its run), functions sharing one input object, and a
public address without a token. Every test ends with a normal call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.lowlevel

import droplet
from droplet.protocol.messages import (
    AuthChallenge,
    AuthResponse,
    AuthResult,
    CallDag,
    ErrorReply,
    Trigger,
)
from droplet.protocol.messages import decode as decode_message
from droplet.protocol.messages import encode as encode_message
from droplet.transports import TransportOptions, get_transport
from droplet.transports.base import Connection

TIMEOUT = 30.0


async def raw_connection(url: str, nursery: trio.Nursery) -> Connection:
    """An authenticated connection driven by hand (no reader task of ours)."""
    conn = await get_transport(url).connect(url, TransportOptions(), nursery)
    challenge, _, _ = decode_message(await conn.receive())
    assert type(challenge) is AuthChallenge
    await conn.send(encode_message(AuthResponse(b"", b"c" * 32)))
    result, _, _ = decode_message(await conn.receive())
    assert type(result) is AuthResult and result.ok
    return conn


async def reply_to(conn: Connection, request_id: int) -> Any:
    while True:
        msg, rid, is_reply = decode_message(await conn.receive())
        if is_reply and rid == request_id:
            return msg


async def assert_serves(cluster: Any, name: str = "still_serving") -> None:
    async with cluster.client() as cloud:
        fn = await cloud.register(lambda _, x: x + 1, name)
        assert await (await fn(41)).get() == 42


@pytest.fixture
async def cluster() -> AsyncIterator[Any]:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(2, placement="spread") as running:
            yield running


# --------------------------------------------------------------------------- peer input


async def test_a_call_with_a_garbage_causal_context_is_refused_and_the_node_serves(
        cluster: Any) -> None:
    """Regression: the executor decoded the context in a task of its nursery and the
    whole embedded cluster died with a raw ExceptionGroup."""
    with trio.fail_after(TIMEOUT):
        async with cluster.client() as cloud:
            await cloud.register(lambda _, x: x, "echo")
        async with trio.open_nursery() as nursery:
            conn = await raw_connection(cluster.address, nursery)
            await conn.send(encode_message(
                CallDag("echo", True, [], [], "CAUSAL", causal=b"\xffgarbage"), 5))
            reply = await reply_to(conn, 5)
            assert type(reply) is ErrorReply and reply.kind == "ProtocolError"
            assert "causal" in reply.message
            await conn.aclose()
        await assert_serves(cluster)


def _trigger(**changes: Any) -> Trigger:
    fields: dict[str, Any] = dict(
        run_id="r1", function="echo", functions=["echo"], versions=["v"],
        placement=["inproc://nowhere"], edges=[], arg_fns=[], arg_blobs=[], source=None,
        result=None, failed=False, result_key="__droplet/results/r1", output_key=None,
        direct=False, consistency="NORMAL", client_id=None, deadline=None, scheduler="")
    fields.update(changes)
    return Trigger(**fields)


@pytest.mark.parametrize("trigger", [
    # well framed, but names a function the run does not have
    _trigger(edges=[["echo", "ghost"]]),
    # consistent, but the causal bytes are garbage
    _trigger(consistency="CAUSAL", causal=b"\x00\x01\x02"),
    # a fan-in input from a function that does not feed the target
    _trigger(functions=["echo", "other"], versions=["v", "v"],
             placement=["inproc://a", "inproc://b"], source="other", result=b"x"),
    # an unknown consistency level
    _trigger(consistency="SERIALIZABLE"),
], ids=["unknown-edge", "garbage-causal", "stray-input", "unknown-level"])
async def test_hostile_triggers_sent_straight_to_an_executor(cluster: Any, trigger: Trigger
                                                            ) -> None:
    """Regression: ``functions.index(...)`` on a name not in the run, or the causal
    decode, raised in the executor's nursery and took the embedded cluster down."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for executor in cluster.node.executors:
                conn = await raw_connection(executor.url, nursery)
                await conn.send(encode_message(trigger))
                await conn.aclose()
        await trio.sleep(0.1)  # let the executors act on it (or fail to)
        await assert_serves(cluster)
        assert len(cluster.node.executors) == 2


# --------------------------------------------------------------------------- private inputs


def _source(_: Any) -> dict[str, list[int]]:
    return {"items": [1, 2, 3]}


def _mutate(_: Any, value: dict[str, list[int]]) -> list[int]:
    value["items"].append(99)
    return value["items"]


def _observe(_: Any, value: dict[str, list[int]]) -> list[int]:
    return list(value["items"])


async def _observe_async(_: Any, value: dict[str, list[int]]) -> list[int]:
    await trio.lowlevel.checkpoint()
    return list(value["items"])


def _join(_: Any, mutated: list[int], seen: list[int]) -> tuple[list[int], list[int]]:
    return mutated, seen


@pytest.mark.parametrize("executors", [1, 2])
@pytest.mark.parametrize("placement", ["locality", "spread"])
@pytest.mark.parametrize("observer", [_observe, _observe_async], ids=["sync", "async"])
@pytest.mark.parametrize("skip", [False, True], ids=["frames", "objects"])
async def test_each_branch_of_a_diamond_gets_its_own_copy(
        executors: int, placement: str, observer: Any, skip: bool) -> None:
    """Regression: with one executor both branches got the same object, so one
    branch saw the other's mutation; with two they did not."""
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(executors, placement=placement,
                                              skip_encoding=skip) as cluster:
            async with cluster.client() as cloud:
                await cloud.register(_source, "src")
                await cloud.register(_mutate, "mutate")
                await cloud.register(observer, "observe")
                await cloud.register(_join, "join")
                await cloud.register_dag(
                    "diamond", ["src", "mutate", "observe", "join"],
                    [("src", "mutate"), ("src", "observe"), ("mutate", "join"),
                     ("observe", "join")])
                for _ in range(3):
                    result = await (await cloud.call_dag("diamond", {})).get()
                    assert result == ([1, 2, 3, 99], [1, 2, 3])


class _Keeper:
    """A class registration that returns (and keeps) its own state."""

    def __init__(self, _: Any) -> None:
        self.state: list[int] = []

    def run(self, _: Any) -> list[int]:
        return self.state


def _append(_: Any, value: list[int]) -> int:
    value.append(1)
    return len(value)


@pytest.mark.parametrize("placement", ["locality", "spread"])
@pytest.mark.parametrize("skip", [False, True], ids=["frames", "objects"])
async def test_a_pipeline_step_cannot_mutate_the_previous_steps_state(placement: str,
                                                                     skip: bool) -> None:
    """The local pipeline (one thread hand-off for a chain of sync functions) copies
    too: the next step cannot reach into a class instance's state."""
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1, placement=placement,
                                              skip_encoding=skip) as cluster:
            async with cluster.client() as cloud:
                await cloud.register((_Keeper, ()), "keeper")
                await cloud.register(_append, "append")
                await cloud.register_dag("chain", ["keeper", "append"],
                                         [("keeper", "append")])
                for _ in range(3):
                    assert await (await cloud.call_dag("chain", {})).get() == 1


# --------------------------------------------------------------------------- exposure


@pytest.mark.parametrize("listen", ["tcp://0.0.0.0:0", "ws://0.0.0.0:0"])
def test_local_cluster_refuses_a_public_address_without_a_token(listen: str) -> None:
    with pytest.raises(ValueError, match="without a cluster token") as info:
        droplet.LocalCluster(1, listen=listen)
    assert "token=" in str(info.value) and "insecure=True" in str(info.value)


async def test_open_local_cluster_and_serve_node_refuse_it_too() -> None:
    from droplet.config import Config
    from droplet.node import serve_node

    with pytest.raises(ValueError, match="without a cluster token"):
        async with droplet.open_local_cluster(1, listen="tcp://0.0.0.0:0"):
            pass  # pragma: no cover - never reached
    with pytest.raises(ValueError, match="without a cluster token"):
        await serve_node(Config(role="kvs", listen="tcp://0.0.0.0:0"))
