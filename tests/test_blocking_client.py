"""The blocking-socket backend of DropletConnection (tcp://, ws:// and wss://).

The cluster runs embedded (in its own thread) behind a real loopback listener
of each scheme; the connection under test is driven by plain threads, no event
loop. Hostile WebSocket servers: tests/test_blocking_websocket.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

import droplet
from droplet import DropletConnection
from droplet.client._blocking import BlockingClient
from droplet.protocol.framing import FrameDecoder, frame
from droplet.protocol.handshake import VERSION, new_nonce
from droplet.protocol.messages import AuthChallenge, AuthResult, ClusterInfo
from droplet.protocol.messages import decode as decode_message
from droplet.protocol.messages import encode as encode_message


@pytest.fixture(scope="module")
def pem_files(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    where = tmp_path_factory.mktemp("blocking-tls")
    issued = tls_ca.issue_cert("127.0.0.1")
    files = {"tls_cert": where / "cert.pem", "tls_key": where / "key.pem", "ca": where / "ca.pem"}
    files["tls_cert"].write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(files["tls_key"]))
    tls_ca.cert_pem.write_to_path(str(files["ca"]))
    return {name: str(path) for name, path in files.items()}


@pytest.fixture(scope="module", params=["tcp", "ws", "wss"])
def cluster(request: pytest.FixtureRequest) -> Iterator[droplet.LocalCluster]:
    scheme: str = request.param
    tls: dict[str, str] = {}
    if scheme == "wss":
        pem = request.getfixturevalue("pem_files")
        tls = {"tls_cert": pem["tls_cert"], "tls_key": pem["tls_key"]}
    with droplet.LocalCluster(executors=2, listen=f"{scheme}://127.0.0.1:0",
                              max_frame_size=256 * 1024, **tls) as running:
        running.tls_ca = request.getfixturevalue("pem_files")["ca"] if tls else None  # type: ignore[attr-defined]
        yield running


def _open(cluster: droplet.LocalCluster) -> DropletConnection:
    return DropletConnection(cluster.address, timeout=30, tls_ca=cluster.tls_ca)  # type: ignore[attr-defined]


@pytest.fixture
def cloud(cluster: droplet.LocalCluster) -> Iterator[DropletConnection]:
    with _open(cluster) as conn:
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
    with _open(cluster) as conn:
        with pytest.raises((droplet.ProtocolError, droplet.ConnectionError)):
            conn.put_object("b_big", b"x" * (512 * 1024))  # over the node's frame limit
        with pytest.raises(droplet.ConnectionError):
            conn.get_object("b_big")
    with _open(cluster) as conn:  # the node still serves
        assert conn.get_object("b_big") is None


def test_nothing_listening_is_a_clear_error() -> None:
    with pytest.raises(droplet.ConnectionError, match="python -m droplet.node"):
        DropletConnection("tcp://127.0.0.1:9", timeout=5)


# --------------------------------------------------------------------------- deadlines


def _in_thread(fn: Any, limit: float = 20.0) -> BaseException | Any:
    """Run ``fn`` in a thread: its result or exception; fail if it still runs at ``limit``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), "the call ignored its timeout"
    return outcome.get("error", outcome.get("value"))


def test_silent_listener_is_a_connection_error_within_the_timeout() -> None:
    """A port that accepts and never answers (another service; wss:// dialled as tcp://)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        error = _in_thread(lambda: DropletConnection(url, timeout=0.3))
    assert isinstance(error, droplet.ConnectionError)
    assert url in str(error)
    assert "python -m droplet.node" in str(error)


def test_another_service_is_a_connection_error_naming_the_address() -> None:
    """A port whose service talks first, and not Droplet (an SSH banner)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"

        def banner() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                conn.recv(1024)

        server = threading.Thread(target=banner, daemon=True)
        server.start()
        error = _in_thread(lambda: DropletConnection(url, timeout=5))
        server.join(10)
    assert isinstance(error, droplet.ConnectionError)
    assert url in str(error)


def _fake_node(listener: socket.socket, stop: threading.Event) -> None:
    """Accept one client, complete the handshake and Hello, then never read again."""
    conn, _ = listener.accept()
    with conn:
        decoder = FrameDecoder()

        def receive() -> Any:
            while (payload := decoder.next_frame()) is None:
                decoder.feed(conn.recv(65536))
            return decode_message(payload)

        conn.sendall(frame(encode_message(AuthChallenge(VERSION, new_nonce(), False))))
        receive()
        conn.sendall(frame(encode_message(AuthResult(True, b"", ""))))
        _, request_id, _ = receive()
        conn.sendall(frame(encode_message(ClusterInfo("", "", "fake"), request_id, reply=True)))
        stop.wait(30)  # stalled: reads nothing more


def test_a_node_that_stops_reading_cannot_hang_a_send() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        stop = threading.Event()
        server = threading.Thread(target=_fake_node, args=(listener, stop), daemon=True)
        server.start()
        try:
            conn = DropletConnection(f"tcp://127.0.0.1:{listener.getsockname()[1]}",
                                     timeout=0.5)
            with conn:
                # far more than the socket buffers hold: the write cannot finish
                error = _in_thread(lambda: conn.put_object("k", b"x" * (32 * 1024 * 1024)))
                assert isinstance(error, droplet.TimeoutError)
                assert "127.0.0.1" in str(error)
                # half a request went out: the connection is failed, and says so
                error = _in_thread(lambda: conn.get_object("k"))
                assert isinstance(error, droplet.DropletError)
        finally:
            stop.set()
            server.join(10)


def test_done_reads_the_socket(cloud: DropletConnection) -> None:
    future = cloud.register(lambda _, x: x + 100, "b_add")(1)
    for _ in range(2000):  # bounded: about 20 s at most
        if future.done():
            break
        time.sleep(0.01)
    assert future.done()
    assert future.get(timeout=0) == 101


def test_get_rejects_a_negative_timeout(cloud: DropletConnection) -> None:
    future = cloud.register(lambda _, x: x, "b_id")(1)
    with pytest.raises(ValueError, match="timeout"):
        future.get(timeout=-1)
    assert future.get() == 1


def test_closing_wakes_threads_waiting_on_the_socket(cloud: DropletConnection) -> None:
    """close() (or a failure) shuts the socket down: waiters in select() wake at once."""
    async def forever(_: Any) -> None:
        import trio

        await trio.sleep_forever()

    cloud.register(forever, "b_forever2")
    future = cloud.exec_func("b_forever2", [])
    started = threading.Event()

    def wait() -> Any:
        started.set()
        return future.get(timeout=120)

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = wait()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    time.sleep(0.2)  # let it reach select()
    cloud._backend.kvs._fail(droplet.ConnectionError("test: the node went away"))
    thread.join(20)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], droplet.ConnectionError)
