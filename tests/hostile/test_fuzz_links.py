"""Issue 7: a fuzzer that reaches every listener and link, post-handshake.

Seeded cases (see ``fuzz.py``) go to:

- client -> scheduler/store: the node's public listener;
- executor -> executor: each executor's own listener;
- scheduler -> executor (and store -> executor): the link an executor opened
  to its scheduler, played by a fake scheduler that proxies store requests to
  the real node;
- executor -> store: a store connection of the same kind an executor opens.

Afterwards every executor (the same worker processes, for a real node) still
runs calls. Embedded here; against a real node process in the slow test.
"""

from __future__ import annotations

import pickle
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

import droplet
from droplet.config import Config
from droplet.errors import ProtocolError
from droplet.links import connect_peer, serve_peers
from droplet.node import _start_executor
from droplet.protocol.messages import (
    AuthChallenge,
    AuthResponse,
    AuthResult,
    ClusterInfo,
    ErrorReply,
    ExecutorJoin,
    Hello,
    InvalidMessage,
    KvsGet,
    KvsPut,
    KvsRelease,
    KvsUnsubscribe,
    KvsUpdate,
    RunDone,
    Trigger,
    decode,
    encode,
)
from droplet.rpc import Limits, Peer
from droplet.serialization import dumps
from droplet.testing.nodes import NodeProcess, start_node
from droplet.transports import TransportOptions, get_transport
from droplet.transports.base import Connection

from .conftest import TIMEOUT, assert_serves
from .fuzz import EXECUTOR_CLASSES, cases

#: Cases per target (CI); the slow real-node test uses as many.
CASES = 150


#: A lambda, so cloudpickle ships it by value (worker processes cannot import tests).
echo = lambda _, x: x  # noqa: E731


def keeps_the_link(payload: bytes) -> bool:
    """Whether the receiver keeps a connection after this frame (it decodes, or is
    merely refused as InvalidMessage, and is not a goodbye)."""
    try:
        msg, request_id, is_reply = decode(payload)
    except InvalidMessage:
        return True
    except ProtocolError:
        return False
    return not (is_reply and request_id == 0 and type(msg) is ErrorReply)


class RawLink:
    """An authenticated connection that is reopened whenever the node hangs up on it,
    with a task discarding whatever the node sends back."""

    def __init__(self, url: str, nursery: trio.Nursery) -> None:
        self.url = url
        self.nursery = nursery
        self.conn: Connection | None = None
        self.reconnects = 0

    async def _open(self) -> Connection:
        conn = await get_transport(self.url).connect(self.url, TransportOptions(), self.nursery)
        challenge, _, _ = decode(await conn.receive())
        assert type(challenge) is AuthChallenge
        await conn.send(encode(AuthResponse(b"", b"f" * 32)))
        result, _, _ = decode(await conn.receive())
        assert type(result) is AuthResult and result.ok
        self.nursery.start_soon(self._drain, conn)
        return conn

    @staticmethod
    async def _drain(conn: Connection) -> None:
        try:
            while True:
                await conn.receive()
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError,
                ProtocolError):
            pass

    async def send(self, payload: bytes) -> None:
        for _ in range(2):
            if self.conn is None:
                self.conn = await self._open()
                self.reconnects += 1
            try:
                await self.conn.send(payload)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.conn = None  # the node hung up on an earlier case: reconnect

    async def aclose(self) -> None:
        if self.conn is not None:
            await self.conn.aclose()


class FakeScheduler:
    """Plays scheduler and store for one executor; store requests go to a real node."""

    def __init__(self) -> None:
        self.link: Peer | None = None
        self.joined = trio.Event()
        self.done: dict[str, RunDone] = {}
        self.done_changed = trio.Event()
        self.store: Peer | None = None

    async def handle(self, peer: Peer, msg: Any, request_id: int) -> Any:
        kind = type(msg)
        if kind is Hello:  # an executor asks where the store is before it joins
            return ClusterInfo("", "", "fake")
        if kind is ExecutorJoin:
            self.link = peer
            self.joined.set()
            return ClusterInfo("", "", "fake")  # "" : I am your store too
        if kind is RunDone:
            self.done[msg.run_id] = msg
            self.done_changed.set()
            self.done_changed = trio.Event()
            return None
        assert self.store is not None
        if kind in (KvsGet, KvsPut):
            return await self.store.request(msg, TIMEOUT)
        if kind in (KvsUnsubscribe, KvsRelease):
            await self.store.send(msg)
            return None
        raise ProtocolError(f"the fake scheduler does not serve {kind.__name__}")

    async def forward_update(self, peer: Peer, msg: Any, request_id: int) -> Any:
        """Pushes from the real store reach the executor over the fake's link."""
        if type(msg) is KvsUpdate and self.link is not None and not self.link.closed:
            self.link.post(msg)

    async def run_done(self, run_id: str) -> RunDone:
        while run_id not in self.done:
            await self.done_changed.wait()
        return self.done.pop(run_id)


def _check_trigger(run_id: str, executor_url: str, value: Any) -> Trigger:
    return Trigger(run_id, "echo", ["echo"], ["v1"], [executor_url], [], ["echo"],
                   [dumps([value])], None, None, False, f"rk-{run_id}", None, True,
                   "NORMAL", None, None, "")


async def test_fuzz_every_listener_and_link_of_an_embedded_cluster() -> None:
    name = uuid.uuid4().hex[:8]
    with trio.fail_after(TIMEOUT * 6):
        async with droplet.open_local_cluster(2, placement="spread") as cluster:
            async with cluster.client() as cloud:
                await cloud.register(echo, "echo")
            fake = FakeScheduler()
            async with trio.open_nursery() as nursery:
                fake.store = await connect_peer(cluster.address, nursery,
                                                handler=fake.forward_update)
                fake_url = await nursery.start(serve_peers, f"inproc://fake-{name}",
                                               fake.handle)
                lone = await _start_executor(
                    nursery, Config(role="executor", scheduler=fake_url),
                    f"inproc://lone-executor-{name}", None, None, None, Limits())
                await fake.joined.wait()
                assert fake.link is not None
                executors = [*cluster.node.executors, *lone.executors]

                # Listeners: the public one, and every executor's.
                listeners = [cluster.address, *(ex.url for ex in executors)]
                for seed, url in enumerate(listeners):
                    link = RawLink(url, nursery)
                    classes = None if url == cluster.address else EXECUTOR_CLASSES
                    for _, payload in cases(seed, CASES, classes):
                        await link.send(payload)
                    await link.aclose()
                # Links: scheduler -> executor (and store -> executor) and
                # executor -> store, with every frame that keeps a connection.
                for seed, peer, classes in [(100, fake.link, EXECUTOR_CLASSES),
                                            (101, fake.store, None)]:
                    for _, payload in cases(seed, CASES, classes):
                        if keeps_the_link(payload):
                            await peer.conn.send(payload)
                    assert not peer.closed
                await trio.sleep(0.2)  # let the executors act on the last cases

                # Everyone still serves: the embedded executors take calls...
                assert len(cluster.node.executors) == 2
                async with cluster.client() as cloud:
                    fn = await cloud.register(echo, "echo")  # fuzzing may have replaced it
                    for i in range(4):  # spread: calls land on both executors
                        assert await (await fn(i)).get() == i
                await assert_serves(cluster.address)
                # ...and so does the one behind the fuzzed scheduler link.
                fake.link.post(_check_trigger("check", lone.url, 42))
                done = await fake.run_done("check")
                assert (pickle.loads(done.value), done.failed) == (42, False)
                nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- real processes


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(p) for p in (task / "children").read_text().split())
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_fuzz_a_real_node_and_its_worker_processes(tmp_path: Path) -> None:
    with start_node("--executors", "2", log_path=tmp_path / "node.log") as node:
        trio.run(_fuzz_real_node, node)


async def _fuzz_real_node(node: NodeProcess) -> None:
    workers = _children(node.pid)
    assert len(workers) == 2, node.log_text()
    executor_urls = re.findall(r"executor (tcp://\S+) joined", node.log_text())
    assert len(executor_urls) == 2, node.log_text()
    name = uuid.uuid4().hex[:8]
    with trio.fail_after(TIMEOUT * 6):
        async with droplet.open_client(node.url, timeout=TIMEOUT) as cloud:
            await cloud.register(echo, "echo")
        fake = FakeScheduler()
        async with trio.open_nursery() as nursery:
            # A third executor, in this process, behind a fake scheduler link.
            fake.store = await connect_peer(node.url, nursery, handler=fake.forward_update)
            fake_url = await nursery.start(serve_peers, f"inproc://fake-{name}", fake.handle)
            lone = await _start_executor(
                nursery, Config(role="executor", scheduler=fake_url),
                "tcp://127.0.0.1:0", None, None, None, Limits())
            await fake.joined.wait()
            assert fake.link is not None
            for seed, url in enumerate([node.url, *executor_urls, lone.url]):
                link = RawLink(url, nursery)
                classes = None if url == node.url else EXECUTOR_CLASSES
                for _, payload in cases(seed, CASES, classes):
                    await link.send(payload)
                await link.aclose()
            for seed, peer, classes in [(100, fake.link, EXECUTOR_CLASSES),
                                        (101, fake.store, None)]:
                for _, payload in cases(seed, CASES, classes):
                    if keeps_the_link(payload):
                        await peer.conn.send(payload)
            await trio.sleep(0.5)
            # The same worker processes are alive, and calls succeed on them.
            assert _children(node.pid) == workers, node.log_text()
            async with droplet.open_client(node.url, timeout=TIMEOUT) as cloud:
                fn = await cloud.register(echo, "echo")
                for i in range(6):
                    assert await (await fn(i)).get() == i
            await assert_serves(node.url)
            fake.link.post(_check_trigger("check", lone.url, 42))
            done = await fake.run_done("check")
            assert (pickle.loads(done.value), done.failed) == (42, False)
            nursery.cancel_scope.cancel()
    assert "Traceback" not in node.log_text(), node.log_text()
