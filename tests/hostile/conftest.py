"""Fixtures for hostile-input tests: real node processes and raw Droplet sockets.

Socket tests, so no MockClock: every wait has a ``trio.fail_after`` guard and
``faulthandler_timeout`` turns a hang into a stack dump. Nothing here asserts
how long anything took.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trustme

import droplet
from droplet.protocol import handshake
from droplet.protocol.framing import FrameDecoder, frame
from droplet.protocol.messages import AuthChallenge, AuthResponse, AuthResult
from droplet.protocol.messages import decode as decode_message
from droplet.protocol.messages import encode as encode_message
from droplet.testing.nodes import NodeProcess, start_node
from droplet.transports import parse_address

#: Seconds: bounds every request, result wait and socket read of a test.
TIMEOUT = 20.0
#: The hostile node's limits (small, so tests reach them quickly).
MAX_FRAME_SIZE = 65536
READ_TIMEOUT = 1.0
MAX_INFLIGHT = 16


@pytest.fixture(autouse=True)
def _no_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Clients default to $DROPLET_TOKEN; the tests say which token they use.
    monkeypatch.delenv("DROPLET_TOKEN", raising=False)


@pytest.fixture(scope="module")
def hostile_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One all-in-one node with small limits, shared by a module's tests."""
    where = tmp_path_factory.mktemp("hostile-node")
    config = where / "node.toml"
    config.write_text(f"read_timeout = {READ_TIMEOUT}\nmax_inflight = {MAX_INFLIGHT}\n")
    with start_node("--executors", "1", "--max-frame-size", str(MAX_FRAME_SIZE),
                    "--config", str(config), log_path=where / "node.log") as node:
        yield node
        # Hostile input is logged as one line; a traceback means something escaped.
        assert "Traceback" not in node.log_text(), node.log_text()
    assert node.proc.returncode == 0, node.log_text()


@attrs.frozen
class TlsFiles:
    """PEM files of a throwaway CA and a certificate for 127.0.0.1/localhost."""

    cert: str
    key: str
    ca: str


@pytest.fixture(scope="session")
def tls_files(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    where = tmp_path_factory.mktemp("tls")
    issued = tls_ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca = where / "cert.pem", where / "key.pem", where / "ca.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    tls_ca.cert_pem.write_to_path(str(ca))
    return TlsFiles(str(cert), str(key), str(ca))


# --------------------------------------------------------------------------- raw sockets


class RawPeer:
    """A Droplet connection driven by hand over a plain TCP socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(2**31)
        host, port = stream.socket.getsockname()[:2]
        #: How the node names this connection in its log.
        self.address = f"tcp://{host}:{port}"

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_frame(self, payload: bytes) -> None:
        await self.stream.send_all(frame(payload, 2**32 - 1))

    async def send_message(self, msg: Any, request_id: int = 0, *, reply: bool = False
                           ) -> None:
        await self.send_frame(encode_message(msg, request_id, reply))

    async def receive_message(self) -> tuple[Any, int, bool]:
        """The next message; EOFError when the node closed the connection."""
        while True:
            payload = self.decoder.next_frame()
            if payload is not None:
                return decode_message(payload)
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError as exc:  # reset
                raise EOFError("connection reset") from exc
            if not data:
                raise EOFError("connection closed")
            self.decoder.feed(data)

    async def reply_to(self, request_id: int) -> Any:
        """The reply to ``request_id`` (skipping any other message)."""
        while True:
            msg, rid, is_reply = await self.receive_message()
            if is_reply and rid == request_id:
                return msg

    async def challenge(self) -> AuthChallenge:
        msg, _, _ = await self.receive_message()
        assert type(msg) is AuthChallenge
        return msg

    async def handshake(self, token: str | None = None) -> AuthResult:
        challenge = await self.challenge()
        nonce = handshake.new_nonce()
        mac = handshake.client_mac(token, challenge.nonce, nonce) if token else b""
        await self.send_message(AuthResponse(mac, nonce))
        result, _, _ = await self.receive_message()
        assert type(result) is AuthResult
        return result

    async def closed_by_peer(self) -> list[Any]:
        """Read until the node hangs up (EOF or reset); the messages it sent first.

        Frames that are not valid messages (there should be none) fail the test.
        """
        received = []
        while True:
            try:
                received.append((await self.receive_message())[0])
            except EOFError:
                return received

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def raw_peer(url: str) -> AsyncIterator[RawPeer]:
    _, host, port = parse_address(url)
    assert port is not None
    stream = await trio.open_tcp_stream(host, port)
    peer = RawPeer(stream)
    try:
        yield peer
    finally:
        await peer.aclose()


# --------------------------------------------------------------------------- checks


async def wait_for_log(node: NodeProcess, pattern: str) -> re.Match[str]:
    """Wait (under the caller's guard) until the node's log matches ``pattern``."""
    regex = re.compile(pattern)
    while True:
        found = regex.search(node.log_text())
        if found:
            return found
        if not node.running():
            raise AssertionError(f"the node exited; log:\n{node.log_text()}")
        await trio.sleep(0.02)


_calls = itertools.count()


async def assert_serves(url: str, **client_args: Any) -> None:
    """A normal client registers and calls a function: the node still serves."""
    name = f"still_serving_{next(_calls)}"
    async with droplet.open_client(url, timeout=TIMEOUT, **client_args) as cloud:
        fn = await cloud.register(lambda _, x: x + 1, name)
        assert await (await fn(41)).get() == 42
