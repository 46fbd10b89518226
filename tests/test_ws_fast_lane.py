"""Executors reached over ``ws://`` and ``wss://``: calls on Droplet's WebSocket frame
path, the fast lane over ``ws://``, and hostile bytes at an executor's ws listener.

A KVS+scheduler node and two executor nodes run in this process over loopback,
all on one scheme, so each executor's statistics (``fast_calls``) can be read.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

import droplet
from droplet import DropletConnection
from droplet.config import Config
from droplet.links import HANDSHAKE_MAX_FRAME
from droplet.node import Node, serve_node
from droplet.transports import parse_address

TIMEOUT = 30
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def inc(_: Any, x: int) -> int:
    return x + 1


class _Cluster:
    def __init__(self, main: Node, workers: list[Node], client_args: dict[str, Any]) -> None:
        self.url = main.url
        self.worker_urls = [w.url for w in workers]
        self.executors = [w.executors[0] for w in workers]
        self.client_args = client_args

    def fast_calls(self) -> int:
        return sum(ex.statistics().fast_calls for ex in self.executors)


@asynccontextmanager
async def _open_cluster(scheme: str, tmp_path: Path, tls_ca: trustme.CA
                        ) -> AsyncIterator[_Cluster]:
    tls: dict[str, Any] = {}
    client_args: dict[str, Any] = {}
    if scheme == "wss":
        pem, ca = tmp_path / "node.pem", tmp_path / "ca.pem"
        tls_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
        tls_ca.cert_pem.write_to_path(str(ca))
        tls = {"tls_cert": str(pem), "tls_key": str(pem), "tls_ca": str(ca)}
        client_args = {"tls_ca": str(ca)}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            main: Node = await nursery.start(functools.partial(serve_node, Config(
                listen=f"{scheme}://127.0.0.1:0", executors=0, placement="spread", **tls)))
            workers = [await nursery.start(functools.partial(serve_node, Config(
                role="executor", listen=f"{scheme}://127.0.0.1:0", scheduler=main.url,
                **tls))) for _ in range(2)]
            yield _Cluster(main, workers, client_args)
            nursery.cancel_scope.cancel()


@pytest.fixture(params=["ws", "wss"])
async def cluster(request: pytest.FixtureRequest, tmp_path: Path,
                  tls_ca: trustme.CA) -> AsyncIterator[_Cluster]:
    async with _open_cluster(request.param, tmp_path, tls_ca) as running:
        yield running


@pytest.fixture
async def ws_cluster(tmp_path: Path, tls_ca: trustme.CA) -> AsyncIterator[_Cluster]:
    async with _open_cluster("ws", tmp_path, tls_ca) as running:
        yield running


def _expect_fast(cluster: _Cluster) -> bool:
    """The fast lane needs connections a worker thread can write: plain ws, not wss."""
    return cluster.url.startswith("ws://")


async def test_direct_calls_over_websocket(cluster: _Cluster) -> None:
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(cluster.url, **cluster.client_args) as cloud:
            f = await cloud.register(inc, "inc")
            await (await f(0)).get()  # warm: loaded, direct placement known
            before = cluster.fast_calls()
            futures = [await f(i) for i in range(20)]
            assert [await fut.get() for fut in futures] == list(range(1, 21))
            if _expect_fast(cluster):
                assert cluster.fast_calls() >= before + 20
            else:
                assert cluster.fast_calls() == before
            assert await cloud.get_object(futures[-1].obj_id) == 20


async def test_a_dag_across_two_executors_over_websocket(cluster: _Cluster) -> None:
    """The trigger goes executor to executor on a client-side (masked) ws connection."""
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(cluster.url, **cluster.client_args) as cloud:
            await cloud.register(inc, "a")
            await cloud.register(inc, "b")
            await cloud.register_dag("ab", ["a", "b"], [("a", "b")])
            for i in range(5):  # warm: code loaded, executors connected to each other
                assert await (await cloud.call_dag("ab", {"a": i})).get() == i + 2
            before = cluster.fast_calls()
            for i in range(10):
                assert await cloud.call_dag("ab", {"a": i}, direct_response=True) == i + 2
                assert await (await cloud.call_dag("ab", {"a": i})).get() == i + 2
            if _expect_fast(cluster):
                assert cluster.fast_calls() >= before + 20


async def test_the_blocking_client_over_websocket(cluster: _Cluster) -> None:
    def calls() -> list[int]:
        with DropletConnection(cluster.url, timeout=TIMEOUT, **cluster.client_args) as conn:
            f = conn.register(inc, "sync_inc")
            return [f(i).get() for i in range(20)]

    with trio.fail_after(TIMEOUT):
        before = cluster.fast_calls()
        assert await trio.to_thread.run_sync(calls) == list(range(1, 21))
        if _expect_fast(cluster):
            assert cluster.fast_calls() >= before + 10


# --------------------------------------------------------------------------- hostile bytes


def _client_frame(opcode: int, payload: bytes, *, declared: int | None = None) -> bytes:
    """A masked client frame (zero key: the payload reads as sent)."""
    n = len(payload) if declared is None else declared
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + b"\0\0\0\0" + payload


async def _hang_up_reply(url: str, upgrade: bytes, wire: bytes) -> bytes:
    """Upgrade (if ``upgrade``), send ``wire``, read until the node hangs up."""
    _, host, port = parse_address(url)
    assert port is not None
    received = b""
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(upgrade + wire)
        try:
            while data := await stream.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            pass
    return received


def _close_frame(received: bytes) -> tuple[int, str]:
    head, _, frames = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    # Skip the node's first message (its AuthChallenge), then the close frame.
    while frames:
        opcode, size = frames[0] & 0x0F, frames[1] & 0x7F
        start = 2
        if size == 126:
            size, start = struct.unpack_from(">H", frames, 2)[0], 4
        if opcode == 0x8:
            code: int = struct.unpack_from(">H", frames, start)[0]
            return code, frames[start + 2:start + size].decode()
        frames = frames[start + size:]
    raise AssertionError(f"no close frame in {received!r}")


@pytest.mark.parametrize(("wire", "code", "why"), [
    # over the pre-authentication limit: refused on the declared length alone
    (_client_frame(0x2, b"", declared=HANDSHAKE_MAX_FRAME + 1), 1009,
     f"max_frame_size={HANDSHAKE_MAX_FRAME}"),
    (_client_frame(0x2, b"x" * (HANDSHAKE_MAX_FRAME + 1)), 1009,
     f"max_frame_size={HANDSHAKE_MAX_FRAME}"),
    (_client_frame(0x1, b"hello"), 1003, "text message"),
    (b"\x7f\xff garbage \x00\x01\x02 not a frame", 1002, "reserved bit"),
    (_client_frame(0x2, b"not a Droplet message"), 0, ""),  # a valid frame of garbage
], ids=["declared-oversize", "oversize", "text", "garbage-bytes", "garbage-message"])
async def test_hostile_bytes_at_an_executors_listener(
        ws_cluster: _Cluster, wire: bytes, code: int, why: str) -> None:
    cluster = ws_cluster
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(cluster.url, **cluster.client_args) as cloud:
            f = await cloud.register(inc, "inc")
            assert await (await f(1)).get() == 2
            for url in cluster.worker_urls:
                received = await _hang_up_reply(url, UPGRADE, wire)
                if code:
                    got, reason = _close_frame(received)
                    assert got == code and why in reason
                else:  # a frame that is not a Droplet message: refused, hung up
                    assert received.startswith(b"HTTP/1.1 101 ")
            before = cluster.fast_calls()
            assert [await (await f(i)).get() for i in range(10)] == list(range(1, 11))
            assert cluster.fast_calls() >= before + 10  # the executors still serve, fast


async def test_garbage_instead_of_an_upgrade_at_an_executors_listener(
        ws_cluster: _Cluster) -> None:
    cluster = ws_cluster
    with trio.fail_after(TIMEOUT):
        for url in cluster.worker_urls:
            received = await _hang_up_reply(url, b"", b"\x16\x03\x01 not http\r\n\r\n")
            assert received.startswith(b"HTTP/1.1 400 ")
        async with droplet.open_client(cluster.url, **cluster.client_args) as cloud:
            f = await cloud.register(inc, "inc")
            assert await (await f(1)).get() == 2
