"""Hostile peers on ``ws://``: the Droplet-message fuzzer, WebSocket-level garbage, the
pre-authentication limit and the token, against an embedded cluster listening on ws.

Raw sockets speak the WebSocket protocol by hand here (frames built byte by
byte), so the node's side is the only WebSocket implementation under test.
Every test ends with a normal client that must still be served.
"""

from __future__ import annotations

import logging
import random
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

import droplet
from droplet.protocol import handshake
from droplet.protocol.messages import AuthChallenge, AuthResponse, AuthResult
from droplet.protocol.messages import decode as decode_message
from droplet.protocol.messages import encode as encode_message
from droplet.transports import parse_address

from .conftest import TIMEOUT, assert_serves
from .fuzz import cases
from .test_fuzz_links import CASES, RawLink

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
#: Frames per seeded WebSocket-level case, and cases per phase (before/after auth).
WS_CASES = 60


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = b"\0" * 4,
             rsv: int = 0, declared: int | None = None) -> bytes:
    """One client frame; ``declared`` may lie about the payload length."""
    n = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    if mask is None:
        return head + payload
    key = (mask * (len(payload) // 4 + 1))[:len(payload)]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
        len(payload), "big")
    return head + mask + masked


class RawWebSocket:
    """A client socket that did the HTTP upgrade by hand and reads server frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _fill(self, n: int) -> None:
        while len(self.buffer) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the node hung up")
            self.buffer += data

    async def receive_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame (servers never mask)."""
        await self._fill(2)
        opcode, n = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
        offset = 2
        if n == 126:
            await self._fill(4)
            n, offset = struct.unpack_from(">H", self.buffer, 2)[0], 4
        elif n == 127:
            await self._fill(10)
            n, offset = struct.unpack_from(">Q", self.buffer, 2)[0], 10
        await self._fill(offset + n)
        payload = bytes(self.buffer[offset:offset + n])
        del self.buffer[:offset + n]
        return opcode, payload

    async def receive_message(self) -> Any:
        opcode, payload = await self.receive_frame()
        assert opcode == 0x2, f"expected a binary message, got opcode {opcode}"
        return decode_message(payload)[0]

    async def send_message(self, msg: Any) -> None:
        await self.stream.send_all(ws_frame(0x2, encode_message(msg)))

    async def handshake(self, token: str | None = None) -> AuthResult:
        challenge = await self.receive_message()
        assert type(challenge) is AuthChallenge
        nonce = handshake.new_nonce()
        mac = handshake.client_mac(token, challenge.nonce, nonce) if token else b""
        await self.send_message(AuthResponse(mac, nonce))
        result = await self.receive_message()
        assert type(result) is AuthResult
        return result

    async def closed_by_peer(self) -> bytes:
        """Read until the node hangs up; the bytes it sent first."""
        received = bytes(self.buffer)
        try:
            while data := await self.stream.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            pass
        return received


@asynccontextmanager
async def raw_ws(url: str) -> AsyncIterator[RawWebSocket]:
    _, host, port = parse_address(url)
    assert port is not None
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(UPGRADE)
        response = b""
        while b"\r\n\r\n" not in response:
            response += await stream.receive_some(4096)
        assert response.startswith(b"HTTP/1.1 101 "), response
        ws = RawWebSocket(stream)
        ws.buffer += response.split(b"\r\n\r\n", 1)[1]
        yield ws


@asynccontextmanager
async def ws_cluster(**settings: Any) -> AsyncIterator[Any]:
    async with droplet.open_local_cluster(1, listen="ws://127.0.0.1:0", **settings) as cluster:
        assert cluster.address.startswith("ws://")
        yield cluster


def _ws_garbage(rng: random.Random) -> bytes:
    """A few WebSocket frames, each likely to break a rule of RFC 6455 or of Droplet."""
    out = b""
    for _ in range(rng.randrange(1, 5)):
        roll = rng.randrange(10)
        payload = rng.randbytes(rng.randrange(0, 300))
        mask = None if rng.random() < 0.1 else rng.randbytes(4)
        if roll == 0:  # text, valid or not as UTF-8
            text = b"hello" if rng.random() < 0.5 else b"\xff\xfe"
            out += ws_frame(0x1, text, mask=mask)
        elif roll == 1:  # a reserved opcode, or reserved bits
            out += ws_frame(rng.choice([0x3, 0x7, 0xB, 0xF]), payload, mask=mask,
                            rsv=rng.randrange(8))
        elif roll == 2:  # a continuation with nothing to continue, or a message never ended
            out += ws_frame(0x0, payload, fin=rng.random() < 0.5, mask=mask)
        elif roll == 3:  # ping: legal, or over the 125-byte limit of control frames
            out += ws_frame(0x9, rng.randbytes(rng.choice([0, 5, 125, 126, 300])), mask=mask)
        elif roll == 4:  # close with a random code and reason
            out += ws_frame(0x8, struct.pack(">H", rng.randrange(65536)) + payload[:20],
                            mask=mask)
        elif roll == 5:  # a length that lies (huge, or longer than what follows)
            out += ws_frame(0x2, payload, mask=mask,
                            declared=rng.choice([2**63 - 1, 2**32, len(payload) + 50]))
        elif roll == 6:  # a binary message of random bytes (not a Droplet frame)
            out += ws_frame(0x2, payload, mask=mask)
        elif roll == 7:  # a fragmented binary message, interleaved with a pong
            out += (ws_frame(0x2, payload[:10], fin=False, mask=mask)
                    + ws_frame(0xA, b"pong", mask=mask)
                    + ws_frame(0x0, payload[10:], mask=mask))
        elif roll == 8:  # raw bytes
            out += payload
        else:  # a message over the pre-authentication limit (4 KiB)
            out += ws_frame(0x2, rng.randbytes(5000), mask=mask)
    return out


# --------------------------------------------------------------------------- tests


async def test_fuzz_droplet_messages_over_ws() -> None:
    """The seeded Droplet-message fuzzer (well framed, hostile values) over ws://."""
    with trio.fail_after(TIMEOUT * 3):
        async with ws_cluster() as cluster, trio.open_nursery() as nursery:
            link = RawLink(cluster.address, nursery)
            for _, payload in cases(7, CASES):
                await link.send(payload)
            await link.aclose()
            await assert_serves(cluster.address)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("authenticated", [False, True], ids=["pre-auth", "post-auth"])
async def test_fuzz_websocket_frames(authenticated: bool, caplog: pytest.LogCaptureFixture
                                     ) -> None:
    """Seeded WebSocket-level garbage, before and after the Droplet handshake."""
    caplog.set_level(logging.WARNING)
    rng = random.Random(1234 + authenticated)
    with trio.fail_after(TIMEOUT * 3):
        async with ws_cluster() as cluster:
            for _ in range(WS_CASES):
                async with raw_ws(cluster.address) as ws:
                    if authenticated:
                        assert (await ws.handshake()).ok
                    try:
                        await ws.stream.send_all(_ws_garbage(rng))
                    except trio.BrokenResourceError:
                        pass  # the node hung up on an earlier frame of the case
            await assert_serves(cluster.address)
    assert "unexpected error" not in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("size", [4097, 100_000, 3_000_000])
async def test_a_big_message_before_the_handshake_is_refused(size: int) -> None:
    """The pre-authentication limit (4 KiB) holds on ws://: a bigger message sent
    right after the upgrade, before answering the challenge, closes the connection."""
    with trio.fail_after(TIMEOUT):
        async with ws_cluster() as cluster:
            async with raw_ws(cluster.address) as ws:
                try:
                    await ws.stream.send_all(ws_frame(0x2, b"\x01" * size))
                except trio.BrokenResourceError:
                    pass  # refused (and reset) before we finished sending
                assert type(await ws.receive_message()) is AuthChallenge
                # Then a close frame saying why (1009: message too big), never an
                # AuthResult (or the node hung up without one).
                try:
                    opcode, payload = await ws.receive_frame()
                except (EOFError, trio.BrokenResourceError):
                    pass
                else:
                    assert (opcode, payload[:2]) == (0x8, struct.pack(">H", 1009)), payload
            await assert_serves(cluster.address)


async def test_a_text_message_gets_a_close_frame_and_the_node_serves() -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_cluster() as cluster:
            async with raw_ws(cluster.address) as ws:
                assert (await ws.handshake()).ok
                await ws.stream.send_all(ws_frame(0x1, b'{"json": "is not a frame"}'))
                opcode, payload = await ws.receive_frame()
                assert opcode == 0x8 and payload[:2] == struct.pack(">H", 1003)
                assert b"text message" in payload
            await assert_serves(cluster.address)


async def test_token_rules_over_ws() -> None:
    token = "ws-token-8c1f"
    with trio.fail_after(TIMEOUT):
        async with ws_cluster(token=token) as cluster:
            with pytest.raises(droplet.AuthenticationError, match="token"):
                async with droplet.open_client(cluster.address, timeout=TIMEOUT):
                    pass
            with pytest.raises(droplet.AuthenticationError, match="wrong cluster token"):
                async with droplet.open_client(cluster.address, token="not-it",
                                               timeout=TIMEOUT):
                    pass
            async with raw_ws(cluster.address) as ws:  # no token: refused, then closed
                assert not (await ws.handshake()).ok
            await assert_serves(cluster.address, token=token)


def test_listening_beyond_loopback_on_ws_needs_a_token() -> None:
    with pytest.raises(ValueError, match="token"):
        droplet.LocalCluster(1, listen="ws://0.0.0.0:0")
