"""Big arguments and results end to end: over tcp:// (both clients), tls:// and inproc://.

The bytes are checked, not the speed (benchmarks/ measures that): big frames
sent as gathered pieces and received into buffers of their own, big values
pickled out of band, a function's own copy of what it receives.
"""

from __future__ import annotations

import pickle
import socket
import ssl
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trustme

import droplet
from droplet import DropletConnection
from droplet.client._blocking import BlockingClient
from droplet.client._core import unwrap_result
from droplet.cluster import open_local_cluster
from droplet.errors import ProtocolError
from droplet.protocol.framing import BIG_FRAME, Gather
from droplet.protocol.messages import CallDag, DagResult
from droplet.transports.base import Connection, TransportOptions
from droplet.transports.registry import get_transport, parse_address

MIB = 1024 * 1024
DATA = bytes(range(256)) * (3 * MIB // 256)  # 3 MiB, well over BIG_FRAME
LEN = struct.Struct(">I")


def identity(_: Any, x: Any) -> Any:
    return x


def length(_: Any, x: Any) -> int:
    return len(x)


def scribble(_: Any, x: bytearray) -> bytes:
    x[0] ^= 0xFF  # its own copy: nobody else may see this
    return bytes(x[:4])


# --------------------------------------------------------------------------- transports

async def echo(conn: Connection) -> None:
    while True:
        try:
            frame = await conn.receive()
        except (trio.EndOfChannel, ProtocolError):
            return
        await conn.send(frame)  # type: ignore[arg-type]  (a big frame is a view)


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
async def test_gathered_frames_arrive_whole(
    scheme: str, tls_server_context: ssl.SSLContext, tls_client_context: ssl.SSLContext,
) -> None:
    secure = scheme == "tls"
    server = TransportOptions(ssl_context=tls_server_context if secure else None)
    client = TransportOptions(ssl_context=tls_client_context if secure else None)
    url = f"{scheme}://127.0.0.1:0"
    pieces = [b"head", memoryview(DATA)[1:], b"", DATA[:BIG_FRAME]]
    expected = b"".join(pieces)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(get_transport(url).serve, url, echo, server)
            async with await get_transport(url).connect(bound, client, nursery) as conn:

                async def send() -> None:  # while reading the echoes (else both stall)
                    await conn.send(Gather(pieces))  # type: ignore[arg-type]
                    await conn.send_many([b"small", Gather(pieces), b"x"])  # type: ignore[list-item]

                nursery.start_soon(send)
                got = [await conn.receive() for _ in range(4)]
            nursery.cancel_scope.cancel()
    assert got == [expected, b"small", expected, b"x"]
    assert type(got[0]) is memoryview and got[0].readonly


class _CountingSocket:
    """A trio socket that counts the reads it had to wait for (trips through the loop)."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.waits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    async def recv_into(self, *args: Any) -> int:
        self.waits += 1
        n: int = await self._sock.recv_into(*args)
        return n


async def test_a_big_tcp_frame_takes_a_few_trips_through_the_loop() -> None:
    """16 MiB arrive in a handful of waits for the socket (SO_RCVLOWAT: woken
    for MiBs at a time; without it, 10 to 60 here), not one per segment; and a
    small frame after it is not held back."""
    big = bytes(range(256)) * (16 * MIB // 256)
    received: list[Any] = []
    counted: list[_CountingSocket] = []
    done = trio.Event()

    async def handler(conn: Connection) -> None:
        counter = _CountingSocket(conn._sock)  # type: ignore[attr-defined]
        conn._sock = counter  # type: ignore[attr-defined]
        counted.append(counter)
        for _ in range(2):
            received.append(await conn.receive())
        done.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(get_transport("tcp").serve, "tcp://127.0.0.1:0",
                                      handler, TransportOptions())
            async with await get_transport("tcp").connect(url, TransportOptions(),
                                                          nursery) as conn:
                await conn.send(Gather([b"h", memoryview(big)]))  # type: ignore[arg-type]
                await conn.send(b"after")
                await done.wait()
            nursery.cancel_scope.cancel()
    assert received[0] == b"h" + big and received[1] == b"after"
    assert counted[0].waits <= 8, counted[0].waits


async def test_a_big_frame_left_unfinished_times_out() -> None:
    options = TransportOptions(read_timeout=0.2)
    send_outcome, outcomes = trio.open_memory_channel[BaseException](2)

    async def handler(conn: Connection) -> None:
        try:
            await conn.receive()
        except ProtocolError as exc:
            await send_outcome.send(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(get_transport("tcp").serve, "tcp://127.0.0.1:0",
                                      handler, options)
            _, host, port = parse_address(url)
            assert port is not None
            async with await trio.open_tcp_stream(host, port) as raw:
                await raw.send_all(LEN.pack(len(DATA)) + DATA[:BIG_FRAME])
                stalled = await outcomes.receive()
            async with await trio.open_tcp_stream(host, port) as raw:
                await raw.send_all(LEN.pack(len(DATA)) + DATA[:100])  # then hangs up
            cut = await outcomes.receive()
            nursery.cancel_scope.cancel()
    assert "unfinished" in str(stalled) and "mid-frame" in str(cut)


# --------------------------------------------------------------------------- async client

@pytest.mark.parametrize(("listen", "skip"), [(None, False), (None, True),
                                             ("tcp://127.0.0.1:0", False)],
                         ids=["inproc", "inproc-objects", "tcp"])
async def test_big_arguments_and_results_async(listen: str | None, skip: bool) -> None:
    with trio.fail_after(60):
        async with open_local_cluster(2, listen=listen, skip_encoding=skip) as cluster:
            async with cluster.client() as cloud:
                await cloud.register(identity, "big_id")
                await cloud.register(length, "big_len")
                await cloud.register(scribble, "big_scribble")
                await cloud.register_dag("big_dag", ["big_id", "big_len"],
                                         [("big_id", "big_len")])
                await cloud.register_dag("big_echo", ["big_id"], [])
                call = await cloud.call_dag("big_dag", {"big_id": DATA})
                assert await call.get() == len(DATA)
                echoed = await (await cloud.call_dag("big_echo", {"big_id": DATA})).get()
                assert echoed == DATA and type(echoed) is bytes
                direct = await cloud.call_dag("big_echo", {"big_id": [DATA]},
                                              direct_response=True)
                assert direct == DATA
                mine = bytearray(DATA)
                scribbled = await (await cloud.exec_func("big_scribble", [mine])).get()
                assert scribbled == bytes([DATA[0] ^ 0xFF]) + DATA[1:4] and mine == DATA


# --------------------------------------------------------------------------- blocking client

@pytest.fixture(scope="module")
def tcp_cluster() -> Iterator[droplet.LocalCluster]:
    with droplet.LocalCluster(executors=2, listen="tcp://127.0.0.1:0") as running:
        yield running


def test_big_arguments_and_results_blocking(tcp_cluster: droplet.LocalCluster) -> None:
    with DropletConnection(tcp_cluster.address, timeout=60) as cloud:
        assert isinstance(cloud._backend, BlockingClient)  # the path under test
        cloud.register(identity, "bb_id")
        cloud.register(length, "bb_len")
        cloud.register_dag("bb_dag", ["bb_id", "bb_len"], [("bb_id", "bb_len")])
        cloud.register_dag("bb_echo", ["bb_id"], [])
        for _ in range(3):  # the receive buffers are reused from the second call on
            assert cloud.call_dag("bb_dag", {"bb_id": DATA}).get() == len(DATA)
        assert cloud.call_dag("bb_echo", {"bb_id": DATA}).get() == DATA
        assert cloud.call_dag("bb_echo", {"bb_id": DATA}, direct_response=True) == DATA
        future = cloud.call_dag("bb_echo", {"bb_id": [DATA]})
        assert future.get() == DATA
        assert cloud.get_object(future.obj_id) == DATA  # the result key holds it too
        cloud.put_object("bb_key", DATA)
        assert cloud.get_object("bb_key") == DATA


@pytest.mark.parametrize("skip", [False, True], ids=["frames", "objects"])
def test_big_arguments_embedded_blocking(skip: bool) -> None:
    """The sync client of an embedded cluster (inproc://, both encodings): the
    bytes arrive intact call after call, and a bytearray changed after the call
    does not change what the function got."""
    with droplet.LocalCluster(executors=2, skip_encoding=skip) as cluster:
        cloud = cluster.connect(timeout=60)
        cloud.register(identity, "eb_id")
        cloud.register(length, "eb_len")
        cloud.register_dag("eb_dag", ["eb_id", "eb_len"], [("eb_id", "eb_len")])
        cloud.register_dag("eb_echo", ["eb_id"], [])
        for i in range(4):  # frames' buffers come back to the pool between calls
            assert cloud.call_dag("eb_dag", {"eb_id": DATA[i:]}).get() == len(DATA) - i
        echoed = cloud.call_dag("eb_echo", {"eb_id": DATA}).get()
        assert echoed == DATA and type(echoed) is bytes
        mine = bytearray(DATA)
        future = cloud.call_dag("eb_echo", {"eb_id": mine})
        mine[0] ^= 0xFF
        got = future.get()
        assert got == DATA and type(got) is bytearray
        future = cloud.exec_func("eb_id", [mine])
        mine[0] ^= 0xFF  # back to DATA[0], after the call
        assert future.get() == bytes([DATA[0] ^ 0xFF]) + DATA[1:]


@pytest.mark.parametrize("skip", [False, True], ids=["frames", "objects"])
async def test_an_embedded_function_gets_the_callers_own_bytes(skip: bool) -> None:
    """In one process a big ``bytes`` argument (nobody can change it) is handed
    over as it is, both ways: no copy of it, and its result neither."""
    def object_id(_: Any, x: bytes) -> int:
        return id(x)

    with trio.fail_after(60):
        async with open_local_cluster(2, skip_encoding=skip) as cluster:
            async with cluster.client() as cloud:
                await cloud.register(object_id, "own_id")
                await cloud.register(identity, "own_echo")
                assert await (await cloud.exec_func("own_id", [DATA])).get() == id(DATA)
                assert await (await cloud.exec_func("own_echo", [DATA])).get() is DATA
                mine = bytearray(DATA)  # but a buffer that can change is copied
                assert await (await cloud.exec_func("own_id", [mine])).get() != id(mine)


@pytest.mark.parametrize("skip", [False, True], ids=["frames", "objects"])
async def test_an_embedded_argument_over_the_frame_limit_is_a_clear_error(skip: bool) -> None:
    with trio.fail_after(60):
        async with open_local_cluster(1, skip_encoding=skip,
                                      max_frame_size=MIB) as cluster:
            async with cluster.client() as cloud:
                await cloud.register(identity, "limit_echo")
                with pytest.raises(ProtocolError, match="exceeds the limit 1048576"):
                    await (await cloud.exec_func("limit_echo", [DATA])).get()
                assert await (await cloud.exec_func("limit_echo", [b"ok"])).get() == b"ok"


async def test_two_sources_and_a_sink_each_get_their_own_big_arguments() -> None:
    def source(_: Any, x: bytes) -> int:
        return x[0]

    def sink(_: Any, own: bytes, a: int, b: int) -> tuple[int, int, int, int]:
        return len(own), own[0], a, b

    with trio.fail_after(60):
        async with open_local_cluster(2, placement="spread") as cluster:
            async with cluster.client() as cloud:
                await cloud.register(source, "two_a")
                await cloud.register(source, "two_b")
                await cloud.register(sink, "two_sink")
                await cloud.register_dag("two", ["two_a", "two_b", "two_sink"],
                                         [("two_a", "two_sink"), ("two_b", "two_sink")])
                args = {"two_a": b"\x01" + DATA, "two_b": b"\x02" + DATA,
                        "two_sink": b"\x03" + DATA}
                result = await (await cloud.call_dag("two", args)).get()
    assert result == (len(DATA) + 1, 3, 1, 2)


def test_big_arguments_over_tls_blocking(tls_ca: trustme.CA,
                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    """The blocking client's TLS socket: ``recv_into`` and plain sends, no sendmsg."""
    where = tmp_path_factory.mktemp("tls-big")
    issued = tls_ca.issue_cert("127.0.0.1")
    cert, key, ca = where / "cert.pem", where / "key.pem", where / "ca.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    tls_ca.cert_pem.write_to_path(str(ca))
    with droplet.LocalCluster(executors=1, listen="tls://127.0.0.1:0", tls_cert=str(cert),
                              tls_key=str(key)) as cluster:
        with DropletConnection(cluster.address, timeout=60, tls_ca=str(ca)) as cloud:
            assert isinstance(cloud._backend, BlockingClient)  # the path under test
            cloud.register(identity, "tb_id")
            cloud.register_dag("tb_echo", ["tb_id"], [])
            assert cloud.call_dag("tb_echo", {"tb_id": DATA}).get() == DATA
            assert cloud.call_dag("tb_echo", {"tb_id": DATA}, direct_response=True) == DATA


async def test_a_malformed_argument_further_down_a_pipeline_fails_the_call() -> None:
    """An executor looks at the next function's arguments to decide whether it
    may run in the same segment: a malformed out-of-band value there is the
    call's error, not a run that dies unanswered until the caller times out."""
    def first(_: Any, x: Any) -> Any:
        return x

    def second(_: Any, x: Any, y: Any) -> Any:
        return x, y

    with trio.fail_after(60):
        async with open_local_cluster(1) as cluster:
            async with cluster.client() as cloud:
                await cloud.register(first, "mal_first")
                await cloud.register(second, "mal_second")
                await cloud.register_dag("mal", ["mal_first", "mal_second"],
                                         [("mal_first", "mal_second")])
                bad = b"\x00\xff\xff\xff"  # the out-of-band form's marker, then junk
                call = CallDag("mal", False, ["mal_first", "mal_second"],
                               [pickle.dumps([1]), bad], direct=True)
                reply = await cloud._scheduler.request(call, 20)
    assert type(reply) is DagResult and reply.failed
    with pytest.raises(droplet.FunctionError, match="out-of-band"):
        unwrap_result(reply.value)


# --------------------------------------------------------------------------- no sendmsg

async def test_gathered_frames_without_sendmsg(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where sockets have no ``sendmsg`` (Windows), big frames go out part by part."""
    with trio.socket.socket() as sock:
        for cls in (trio.socket.SocketType, type(sock)):
            monkeypatch.delattr(cls, "sendmsg", raising=False)
    url = "tcp://127.0.0.1:0"
    pieces = [b"head", memoryview(DATA)[1:], DATA[:BIG_FRAME]]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(get_transport(url).serve, url, echo, TransportOptions())
            async with await get_transport(url).connect(bound, TransportOptions(), nursery) as conn:
                nursery.start_soon(conn.send, Gather(pieces))
                got = await conn.receive()
            nursery.cancel_scope.cancel()
    assert got == b"".join(pieces)


class _NoSendmsg(socket.socket):
    __slots__ = ()

    @property
    def sendmsg(self) -> Any:  # type: ignore[override]
        raise AttributeError("sendmsg")


def test_blocking_client_without_sendmsg(tcp_cluster: droplet.LocalCluster) -> None:
    with DropletConnection(tcp_cluster.address, timeout=60) as cloud:
        backend = cloud._backend
        assert isinstance(backend, BlockingClient)
        cloud.register(identity, "ns_id")
        cloud.register_dag("ns_echo", ["ns_id"], [])
        for peer in {id(p): p for p in (backend.scheduler, backend.kvs)}.values():
            peer._sock.__class__ = _NoSendmsg  # as on a platform without sendmsg
        assert not hasattr(backend.scheduler._sock, "sendmsg")
        assert cloud.call_dag("ns_echo", {"ns_id": DATA}, direct_response=True) == DATA
