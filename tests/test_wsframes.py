"""The WebSocket frame codec in the server role (the client role is in
test_blocking_websocket.py), synchronously, and against wsproto's frames."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection as WsprotoConnection
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong

from droplet.errors import ProtocolError
from droplet.protocol import wsframes
from droplet.protocol.framing import BIG_FRAME, Gather
from droplet.protocol.wsframes import PeerClosed, WsCodec, encode_frame


def server() -> WsCodec:
    return WsCodec("ws://peer:1", client=False)


def drain(codec: WsCodec) -> list[bytes]:
    out = []
    while (frame := codec.next_frame()) is not None:
        out.append(bytes(frame))
    return out


@given(messages=st.lists(st.binary(max_size=2000), max_size=6),
       cut=st.integers(1, 700))
def test_masked_client_frames_round_trip_in_any_pieces(messages: list[bytes], cut: int) -> None:
    wire = b"".join(bytes(encode_frame(m)) for m in messages)
    codec = server()
    got = []
    for i in range(0, len(wire), cut):
        codec.feed(wire[i:i + cut])
        got += drain(codec)
    assert got == messages
    assert not codec.mid_frame


@pytest.mark.parametrize("with_numpy", [True, False])
def test_a_big_masked_message_is_unmasked_in_its_own_buffer(
        with_numpy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not with_numpy:
        monkeypatch.setattr(wsframes, "_np", False)
    payload = bytes(range(251)) * (BIG_FRAME // 251 + 2) + b"odd"
    wire = bytes(encode_frame(payload))
    codec = server()
    codec.feed(wire[:1000])
    assert codec.next_frame() is None and codec.mid_frame
    target = codec.receive_buffer()
    assert target is not None and len(target) == len(wire) - 1000
    target[:] = wire[1000:]
    codec.received(len(target))
    message = codec.next_frame()
    assert isinstance(message, memoryview) and message.readonly
    assert bytes(message) == payload


def test_server_frames_are_unmasked_and_read_by_wsproto() -> None:
    client = WsprotoConnection(ConnectionType.CLIENT)
    codec = server()
    big = bytes(range(256)) * 1100
    client.receive_data(b"".join(
        bytes(p) for m in (b"", b"small", big, Gather([b"ab", memoryview(b"cd")]))
        for p in codec.frame_parts(m)))
    got = [e.data for e in client.events() if isinstance(e, BytesMessage)]
    assert got == [b"", b"small", big, b"abcd"]


def test_wsproto_client_frames_ping_and_close_reach_the_codec() -> None:
    client = WsprotoConnection(ConnectionType.CLIENT)
    codec = server()
    codec.feed(client.send(BytesMessage(b"part one, ", message_finished=False))
               + client.send(Ping(b"hi"))
               + client.send(BytesMessage(b"part two", message_finished=True)))
    assert drain(codec) == [b"part one, part two"]
    client.receive_data(codec.take_output())  # the pong, unmasked
    assert [type(e) for e in client.events()] == [Pong]
    codec.feed(client.send(CloseConnection(1000, "bye")))
    with pytest.raises(PeerClosed) as info:
        codec.next_frame()
    assert info.value.clean and info.value.reason == "bye"
    client.receive_data(codec.take_output())  # the close reply
    assert [type(e) for e in client.events()] == [CloseConnection]


def _masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + b"\0" * 4 + payload


@pytest.mark.parametrize(("wire", "error", "code"), [
    (bytes([0x82, 5]) + b"plain", "unmasked frame", 1002),
    (_masked(0x1, b"text"), "text message", 1003),
    (_masked(0x2, b"a", fin=False) + _masked(0x2, b"b"), "continuation", 1002),
    (_masked(0x0, b"stray"), "continuation", 1002),
    (_masked(0x8, b"\x03"), "one-byte body", 1002),
    (_masked(0x8, struct.pack(">H", 999)), "invalid code 999", 1002),
    (_masked(0x8, struct.pack(">H", 1000) + b"\xc3"), "not UTF-8", 1007),
    (_masked(0xB, b""), "unknown opcode", 1002),
])
def test_a_server_refuses_with_the_rfc_close_code(wire: bytes, error: str, code: int) -> None:
    codec = server()
    codec.feed(wire)
    with pytest.raises(ProtocolError, match=error) as info:
        drain(codec)
    assert "ws://peer:1" in str(info.value)
    close = codec.take_output()
    assert close[0] == 0x88 and not close[1] & 0x80  # a server's close: unmasked
    assert struct.unpack(">H", close[2:4])[0] == code


def test_an_error_close_names_its_code_and_reason() -> None:
    codec = server()
    codec.feed(_masked(0x8, struct.pack(">H", 4000) + b"app says no"))
    with pytest.raises(PeerClosed, match=r"code 4000 \(app says no\)") as info:
        codec.next_frame()
    assert not info.value.clean and info.value.code == 4000


def test_the_limit_applies_to_the_declared_length_and_can_change() -> None:
    codec = server()
    codec.max_frame_size = 100  # as limit_incoming does before authentication
    codec.feed(bytes([0x82, 0x80 | 126]) + struct.pack(">H", 101))  # the header alone
    with pytest.raises(ProtocolError, match="max_frame_size=100"):
        codec.next_frame()
