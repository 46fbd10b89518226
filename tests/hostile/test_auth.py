"""The cluster token: who may talk to a node, and what never crosses the wire.

Real node processes (``--token`` on the command line, or ``DROPLET_TOKEN`` in
the environment), a multi-process cluster whose executors must present the
token to join, the refusal to listen beyond loopback without one, and a fake
server that records everything a client sends during the handshake.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import droplet
from droplet import DropletConnection
from droplet.config import Config
from droplet.node._main import main as node_main
from droplet.protocol import handshake
from droplet.protocol.framing import FrameDecoder, frame
from droplet.protocol.messages import AuthChallenge, AuthResponse, AuthResult
from droplet.protocol.messages import decode as decode_message
from droplet.protocol.messages import encode as encode_message
from droplet.testing.nodes import NodeProcess, free_port, start_node

from .conftest import TIMEOUT, assert_serves, raw_peer, wait_for_log

TOKEN = "correct-horse-battery-staple-9f2c"


# --------------------------------------------------------------------------- a node with a token


@pytest.fixture(scope="module", params=["flag", "env"])
def token_node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[NodeProcess]:
    """An all-in-one node requiring TOKEN, given as ``--token`` or as ``DROPLET_TOKEN``."""
    log = tmp_path_factory.mktemp(f"token-{request.param}") / "node.log"
    if request.param == "flag":
        starting = start_node("--executors", "1", "--token", TOKEN, log_path=log, wait=False)
    else:
        starting = start_node("--executors", "1", log_path=log, token=TOKEN, wait=False)
    with starting as node:
        node.token = TOKEN  # for the readiness probe
        node.wait_ready()
        yield node
        assert TOKEN not in node.log_text()
        assert "Traceback" not in node.log_text(), node.log_text()


@pytest.mark.slow
async def test_client_without_a_token_is_refused_clearly(token_node: NodeProcess) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(droplet.AuthenticationError) as info:
        async with droplet.open_client(token_node.url, timeout=TIMEOUT):
            pass
    message = str(info.value)
    assert token_node.url in message
    assert "requires the cluster token" in message
    assert "DROPLET_TOKEN" in message


@pytest.mark.slow
async def test_client_with_the_wrong_token_is_refused(token_node: NodeProcess) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(droplet.AuthenticationError,
                                                 match="wrong cluster token") as info:
        async with droplet.open_client(token_node.url, token="not-" + TOKEN, timeout=TIMEOUT):
            pass
    assert TOKEN not in str(info.value)


@pytest.mark.slow
async def test_client_with_the_right_token_works(token_node: NodeProcess) -> None:
    with trio.fail_after(TIMEOUT):
        await assert_serves(token_node.url, token=TOKEN)


@pytest.mark.slow
async def test_client_takes_the_token_from_the_environment(
    token_node: NodeProcess, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DROPLET_TOKEN", TOKEN)
    with trio.fail_after(TIMEOUT):
        await assert_serves(token_node.url)


@pytest.mark.slow
@pytest.mark.parametrize(("token", "reason"), [
    (None, "this node requires the cluster token"),
    ("guess", "wrong cluster token"),
])
async def test_the_node_logs_each_refusal_with_the_peer_address(
    token_node: NodeProcess, token: str | None, reason: str,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_peer(token_node.url) as raw:
            result = await raw.handshake(token)
            assert not result.ok
            assert reason in result.message
            assert await raw.closed_by_peer() == []
            await wait_for_log(token_node, rf"refused connection from "
                               rf"{re.escape(raw.address)}: {reason}")
        # Refused peers cost nothing: the node keeps serving.
        await assert_serves(token_node.url, token=TOKEN)


@pytest.mark.slow
def test_workers_get_the_token_in_their_environment_not_their_command_line(
    token_node: NodeProcess,
) -> None:
    """``ps`` shows every user a process's arguments; the executor workers' must not hold it."""
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc to read other processes' command lines")
    workers = _children(token_node.pid)
    assert workers, "the all-in-one node should run an executor worker process"
    for pid in workers:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"--role\x00executor" in cmdline
        assert TOKEN.encode() not in cmdline


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


# --------------------------------------------------------------------------- node to node


@pytest.mark.slow
def test_executors_need_the_token_to_join_a_cluster(tmp_path: Path) -> None:
    """kvs + scheduler with a token: a wrong-token executor fails, a right one joins and runs.

    Synchronous: ``start_node`` probes readiness with its own ``trio.run``.
    """

    def log(name: str) -> Path:
        return tmp_path / f"{name}.log"

    with (start_node(role="kvs", token=TOKEN, log_path=log("kvs")) as kvs,
          start_node("--kvs", kvs.url, role="scheduler", token=TOKEN,
                     log_path=log("scheduler")) as scheduler):
        with start_node("--scheduler", scheduler.url, role="executor", token="wrong",
                        log_path=log("intruder"), wait=False) as intruder:
            assert intruder.proc.wait(TIMEOUT) == 1
            assert re.search(r"could not start: .*refused the connection: wrong cluster token",
                             intruder.log_text()), intruder.log_text()
            assert "Traceback" not in intruder.log_text()
        with start_node("--scheduler", scheduler.url, role="executor", token=TOKEN,
                        log_path=log("executor")) as executor:
            scheduler.wait_for_log(rf"executor {re.escape(executor.url)} joined", TIMEOUT)
            with DropletConnection(scheduler.url, token=TOKEN, timeout=TIMEOUT) as cloud:
                assert cloud.register(lambda _, x: x * 2, "double")(21).get() == 42
            # The scheduler refused the intruder and never listed it: one executor joined.
            text = scheduler.log_text()
            assert re.search(r"refused connection from tcp://127\.0\.0\.1:\d+: "
                             r"wrong cluster token", text)
            assert len(re.findall(r"executor \S+ joined", text)) == 1
        for node in (kvs, scheduler, executor):
            assert TOKEN not in node.log_text()
            assert "Traceback" not in node.log_text()


# --------------------------------------------------------------------------- exposure


@pytest.mark.parametrize("listen", [
    "tcp://0.0.0.0:{port}",
    "ws://0.0.0.0:{port}",
    "tcp://[::]:{port}",
    "tcp://127.example.com:{port}",  # a name, not an address: it may resolve anywhere
])
def test_refuses_to_listen_beyond_loopback_without_a_token(
    listen: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert node_main(["--listen", listen.format(port=free_port())]) == 2
    err = capsys.readouterr().err
    assert "--token" in err
    assert "--insecure" in err
    assert "DROPLET_TOKEN" in err


@pytest.mark.parametrize(("settings", "environ"), [
    ({"token": "t"}, {}),
    ({}, {"DROPLET_TOKEN": "t"}),
    ({"insecure": True}, {}),
])
def test_a_token_or_insecure_allows_any_address(settings: dict[str, Any],
                                                environ: dict[str, str]) -> None:
    # Checked on the Config, so the test never binds 0.0.0.0.
    Config.load({"listen": "tcp://0.0.0.0:5000", **settings}, environ=environ).check_exposure()


@pytest.mark.parametrize("listen", [
    "tcp://127.0.0.1:5000", "tcp://127.1.2.3:1", "tcp://localhost:5000", "ws://[::1]:80",
    "inproc://x",
])
def test_loopback_needs_no_token(listen: str) -> None:
    Config.load({"listen": listen}, environ={}).check_exposure()


# --------------------------------------------------------------------------- on the wire


async def _fake_server(
    captured: bytearray, result: Any, required: bool,
    *, task_status: trio.TaskStatus[tuple[int, bytes]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Challenge one client, record what it sends, answer ``result(server_nonce,
    client_nonce)``; hang up at its next frame (or when it does)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nonce = handshake.new_nonce()
    task_status.started((listeners[0].socket.getsockname()[1], nonce))
    stream = await listeners[0].accept()
    async with stream:
        await stream.send_all(frame(encode_message(
            AuthChallenge(handshake.VERSION, nonce, required))))
        decoder = FrameDecoder()
        answered = False
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            captured += data
            decoder.feed(data)
            payload = decoder.next_frame()
            if payload is None:
                continue
            if answered:
                break  # the client believed us and sent a request
            response, _, _ = decode_message(payload)
            assert type(response) is AuthResponse
            await stream.send_all(frame(encode_message(result(nonce, response.nonce))))
            answered = True
    await listeners[0].aclose()


async def _handshake_with(result: Any, *, required: bool = True) -> tuple[bytearray, bytes,
                                                                          BaseException | None]:
    captured = bytearray()
    error: BaseException | None = None
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port, nonce = await nursery.start(_fake_server, captured, result, required)
            try:
                async with droplet.open_client(f"tcp://127.0.0.1:{port}", token=TOKEN,
                                               timeout=5):
                    pass
            except droplet.DropletError as exc:
                error = exc
            nursery.cancel_scope.cancel()
    return captured, nonce, error


async def test_the_handshake_never_sends_the_token() -> None:
    captured, server_nonce, error = await _handshake_with(
        lambda s, c: AuthResult(False, b"", "no thanks"))
    assert isinstance(error, droplet.AuthenticationError)
    assert captured, "the client sent nothing"
    for form in (TOKEN.encode(), TOKEN.encode().hex().encode(), TOKEN.encode("utf-16-le")):
        assert form not in captured
    # What it sent instead: an HMAC proof bound to this server's fresh nonce.
    response, _, _ = decode_message(_first_frame(bytes(captured)))
    assert type(response) is AuthResponse
    assert response.mac == handshake.client_mac(TOKEN, server_nonce, response.nonce)
    assert len(response.nonce) == handshake.NONCE_SIZE


def _first_frame(data: bytes) -> bytes:
    decoder = FrameDecoder()
    decoder.feed(data)
    payload = decoder.next_frame()
    assert payload is not None
    return payload


async def test_client_refuses_a_server_that_cannot_prove_it_holds_the_token() -> None:
    """Mutual: an impostor accepting us without the server proof is refused by the client."""
    _, _, error = await _handshake_with(lambda s, c: AuthResult(True, b"\0" * 32, ""))
    assert isinstance(error, droplet.AuthenticationError)
    assert "could not prove it holds the cluster token" in str(error)


async def test_client_refuses_a_server_proof_for_other_nonces() -> None:
    """A proof replayed from another connection (other nonces) is worthless."""
    stale = handshake.server_mac(TOKEN, b"s" * 32, b"c" * 32)
    _, _, error = await _handshake_with(lambda s, c: AuthResult(True, stale, ""))
    assert isinstance(error, droplet.AuthenticationError)


async def test_client_with_a_token_refuses_a_server_that_requires_none() -> None:
    _, _, error = await _handshake_with(lambda s, c: AuthResult(True, b"", ""), required=False)
    assert isinstance(error, droplet.AuthenticationError)


def test_token_is_never_in_a_config_repr() -> None:
    """Config reprs end up in logs and tracebacks."""
    config = Config.load({"token": TOKEN}, environ={})
    assert config.token == TOKEN
    assert TOKEN not in repr(config)

