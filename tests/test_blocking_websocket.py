"""The sync client's WebSocket wire: the sans-IO codec, then hostile servers on raw sockets.

The codec tests are synchronous (no sockets). The server tests run a fake
WebSocket node in threads (wsproto's server side, sans-IO, over a plain
socket) that answers Droplet's handshake and then misbehaves in one way;
every one ends with a normal call that succeeds. The ordinary client
behaviours over ws:// and wss:// are in tests/test_blocking_client.py.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

import droplet
from droplet import DropletConnection
from droplet.client._blocking import BlockingClient
from droplet.client._ws_codec import Upgrade, WsClientCodec, mask
from droplet.errors import ConnectionError, ProtocolError
from droplet.protocol import wsframes
from droplet.protocol.framing import BIG_FRAME, Gather
from droplet.protocol.handshake import VERSION, new_nonce
from droplet.protocol.messages import AuthChallenge, AuthResult, ClusterInfo, Names
from droplet.protocol.messages import decode as decode_message
from droplet.protocol.messages import encode as encode_message
from droplet.transports import TransportOptions

# --------------------------------------------------------------------------- the codec


def server_frame(payload: bytes, opcode: int = 0x2, fin: bool = True, rsv: int = 0,
                 masked: bool = False) -> bytes:
    """A frame as a server sends it (unmasked unless asked)."""
    size = len(payload)
    b0 = (0x80 if fin else 0) | rsv | opcode
    if size < 126:
        head = struct.pack(">BB", b0, size)
    elif size < 1 << 16:
        head = struct.pack(">BBH", b0, 126, size)
    else:
        head = struct.pack(">BBQ", b0, 127, size)
    if masked:
        head = bytes([head[0], head[1] | 0x80]) + head[2:] + b"abcd"
        payload = mask(payload, b"abcd")
    return head + payload


def unmask_client_frame(data: bytes) -> tuple[int, bytes]:
    """(opcode, payload) of one whole client frame, checking it is masked."""
    b0, b1 = data[0], data[1]
    assert b0 & 0x80 and b1 & 0x80, "a client frame is final and masked"
    size, pos = b1 & 0x7F, 2
    if size == 126:
        (size,), pos = struct.unpack_from(">H", data, 2), 4
    elif size == 127:
        (size,), pos = struct.unpack_from(">Q", data, 2), 10
    key = data[pos:pos + 4]
    assert len(data) == pos + 4 + size
    return b0 & 0x0F, mask(data[pos + 4:], key)


def drain(codec: WsClientCodec) -> list[bytes]:
    out = []
    while (message := codec.next_frame()) is not None:
        out.append(bytes(message))
    return out


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536, 300_000])
def test_client_frames_are_masked_and_round_trip(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    codec = WsClientCodec("ws://x:1")
    (data,) = codec.frame_parts(payload)
    assert unmask_client_frame(bytes(data)) == (0x2, payload)
    if size >= 8:  # a fresh key each frame: the bytes on the wire differ
        assert bytes(codec.frame_parts(payload)[0]) != bytes(data)


@pytest.mark.parametrize("with_numpy", [True, False])
def test_gathered_pieces_are_masked_in_one_buffer(with_numpy: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of odd sizes (the key's phase moves on), big and small, with and
    without numpy."""
    if not with_numpy:
        monkeypatch.setattr(wsframes, "_np", False)
    parts = [b"abc", bytes(range(256)) * 20 + b"q", memoryview(b"1234567"), b"\xff" * 70_001]
    (data,) = WsClientCodec("ws://x:1").frame_parts(Gather(parts))
    assert unmask_client_frame(bytes(data)) == (0x2, b"".join(parts))


@given(messages=st.lists(st.tuples(st.binary(max_size=3000), st.integers(1, 3),
                                   st.booleans()), max_size=8),
       cuts=st.lists(st.integers(1, 500), min_size=1, max_size=20))
def test_any_messages_any_splits_round_trip(messages: list[tuple[bytes, int, bool]],
                                            cuts: list[int]) -> None:
    """Messages in 1-3 fragments, a ping before some, cut into pieces anywhere."""
    stream = b""
    for data, pieces, ping in messages:
        if ping:
            stream += server_frame(b"p", opcode=0x9)
        step = len(data) // pieces + 1
        chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
        for i, chunk in enumerate(chunks):
            stream += server_frame(chunk, opcode=0x2 if i == 0 else 0x0,
                                   fin=i == len(chunks) - 1)
    codec = WsClientCodec("ws://x:1")
    got: list[bytes] = []
    pos = 0
    for cut in cuts * (len(stream) // sum(cuts) + 1):
        codec.feed(stream[pos:pos + cut])
        got += drain(codec)
        pos += cut
        if pos >= len(stream):
            break
    assert got == [data for data, _, _ in messages]
    owed = codec.take_output()  # one 7-byte pong per ping
    pongs = [owed[i:i + 7] for i in range(0, len(owed), 7)]
    assert [unmask_client_frame(p) for p in pongs] == [(0xA, b"p")] * sum(
        ping for _, _, ping in messages)


@given(st.binary(max_size=300))
def test_garbage_is_a_droplet_error_or_more_to_read(garbage: bytes) -> None:
    codec = WsClientCodec("ws://x:1", max_frame_size=1000)
    codec.feed(garbage)
    try:
        drain(codec)
    except (ProtocolError, ConnectionError) as exc:
        assert "ws://x:1" in str(exc)


def test_sending_over_the_limit_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="max_frame_size=10"):
        WsClientCodec("ws://x:1", max_frame_size=10).frame_parts(b"x" * 11)


def test_messages_split_at_every_byte() -> None:
    stream = (server_frame(b"hello") + server_frame(b"x" * 300)
              + server_frame(b"\x00" * 70_000))
    for split in range(1, 40):
        codec = WsClientCodec("ws://x:1")
        got: list[bytes] = []
        for i in range(0, len(stream), split):
            codec.feed(stream[i:i + split])
            got += drain(codec)
        assert got == [b"hello", b"x" * 300, b"\x00" * 70_000]


def test_a_big_message_is_received_into_its_own_buffer() -> None:
    payload = bytes(range(256)) * (BIG_FRAME // 256 + 3)
    data = server_frame(payload)
    codec = WsClientCodec("ws://x:1")
    codec.feed(data[:1000])
    assert codec.next_frame() is None
    target = codec.receive_buffer()
    assert target is not None and len(target) == len(data) - 1000
    target[:] = data[1000:]
    codec.received(len(target))
    message = codec.next_frame()
    assert isinstance(message, memoryview) and message.readonly
    assert bytes(message) == payload


def test_fragments_are_reassembled_and_control_frames_answered_between() -> None:
    codec = WsClientCodec("ws://x:1")
    codec.feed(server_frame(b"ab", fin=False) + server_frame(b"ping!", opcode=0x9)
               + server_frame(b"cd", opcode=0x0, fin=False) + server_frame(b"", opcode=0xA)
               + server_frame(b"ef", opcode=0x0))
    assert drain(codec) == [b"abcdef"]
    assert unmask_client_frame(codec.take_output()) == (0xA, b"ping!")
    assert codec.take_output() == b""


@pytest.mark.parametrize(("data", "error"), [
    (server_frame(b"hi", opcode=0x1), "text message"),
    (server_frame(b"hi", rsv=0x40), "reserved bit"),
    (server_frame(b"hi", masked=True), "masked frame"),
    (server_frame(b"hi", opcode=0x3), "unknown opcode"),
    (server_frame(b"hi", opcode=0x0), "continuation frame out of place"),
    (server_frame(b"x" * 126, opcode=0x9), "control frame"),
    (server_frame(b"hi", opcode=0x9, fin=False), "control frame"),
])
def test_broken_rules_are_protocol_errors_with_a_close_owed(data: bytes, error: str) -> None:
    codec = WsClientCodec("ws://x:1")
    codec.feed(data)
    with pytest.raises(ProtocolError, match=error) as info:
        codec.next_frame()
    assert "ws://x:1" in str(info.value)
    opcode, payload = unmask_client_frame(codec.goodbye())
    assert opcode == 0x8
    assert struct.unpack(">H", payload[:2])[0] in (1002, 1003)


def test_an_oversize_message_is_refused_on_its_declared_length() -> None:
    codec = WsClientCodec("ws://x:1", max_frame_size=1000)
    codec.feed(server_frame(b"x" * 1001)[:10])  # the header only
    with pytest.raises(ProtocolError, match="max_frame_size=1000"):
        codec.next_frame()
    codec = WsClientCodec("ws://x:1", max_frame_size=1000)
    codec.feed(server_frame(b"x" * 600, fin=False) + server_frame(b"x" * 600, opcode=0)[:4])
    with pytest.raises(ProtocolError, match="1200 bytes"):  # fragments count together
        drain(codec)


def test_a_close_frame_is_a_connection_error_naming_code_and_reason() -> None:
    codec = WsClientCodec("ws://x:1")
    codec.feed(server_frame(struct.pack(">H", 1011) + b"oops", opcode=0x8))
    with pytest.raises(ConnectionError, match="code 1011 \\(oops\\)"):
        codec.next_frame()
    assert unmask_client_frame(codec.goodbye())[0] == 0x8  # the close is answered


def _response(upgrade: Upgrade, status: int = 101, accept: bytes | None = None) -> bytes:
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(upgrade.request)
    (request,) = list(server.events())
    assert isinstance(request, Request) and request.host == "x:1"
    reply = server.send(AcceptConnection())
    if accept is not None:
        reply = reply.replace(reply.split(b"Sec-WebSocket-Accept: ")[1].split(b"\r\n")[0],
                              accept)
    if status != 101:
        reply = f"HTTP/1.1 {status} Nope\r\ncontent-length: 0\r\n\r\n".encode()
    return reply


def test_the_upgrade_returns_what_followed_it() -> None:
    upgrade = Upgrade("ws://x:1", "x:1")
    data = _response(upgrade) + server_frame(b"first")
    assert upgrade.receive(data[:20]) is None
    assert upgrade.receive(data[20:]) == server_frame(b"first")


@pytest.mark.parametrize(("status", "accept", "error"), [
    (404, None, "refused the WebSocket upgrade \\(HTTP 404\\)"),
    (101, b"AAAAAAAAAAAAAAAAAAAAAAAAAAA=", "wrong Sec-WebSocket-Accept"),
])
def test_a_refused_or_wrong_upgrade_is_a_connection_error(status: int, accept: bytes | None,
                                                           error: str) -> None:
    upgrade = Upgrade("ws://x:1", "x:1")
    with pytest.raises(ConnectionError, match=error):
        upgrade.receive(_response(upgrade, status, accept))


def test_garbage_instead_of_an_upgrade_is_a_connection_error() -> None:
    with pytest.raises(ConnectionError, match="ws://x:1 answered the WebSocket upgrade"):
        Upgrade("ws://x:1", "x:1").receive(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


# --------------------------------------------------------------------------- fake nodes

Behaviour = Callable[["_Peer", int], None]


class _Peer:
    """One client connection to the fake node: wsproto's server side over a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.SERVER)
        self.pongs: list[bytes] = []

    def write(self, event: Any) -> None:
        self.sock.sendall(self.ws.send(event))

    def next_event(self) -> Any:
        while True:
            for event in self.ws.events():
                if isinstance(event, Pong):
                    self.pongs.append(event.payload)
                    continue
                return event
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)

    def message(self) -> tuple[Any, int]:
        event = self.next_event()
        assert isinstance(event, BytesMessage), event
        msg, request_id, _ = decode_message(bytes(event.data))
        return msg, request_id

    def send_message(self, msg: Any, request_id: int = 0, reply: bool = False) -> None:
        self.write(BytesMessage(encode_message(msg, request_id, reply=reply)))

    def reply_names(self, request_id: int) -> None:
        self.send_message(Names(["fake-dag"]), request_id, reply=True)

    def open(self) -> None:
        assert isinstance(self.next_event(), Request)
        self.write(AcceptConnection())
        self.send_message(AuthChallenge(VERSION, new_nonce(), False))
        self.message()
        self.send_message(AuthResult(True, b"", ""))
        _, request_id = self.message()
        self.send_message(ClusterInfo("", "", "fake"), request_id, reply=True)


def _serve(listener: socket.socket, behave: Behaviour, stop: threading.Event) -> None:
    """The first connection gets ``behave``, later ones answer every request normally."""
    first = True
    while not stop.is_set():
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        sock.settimeout(20)
        peer, hostile, first = _Peer(sock), first, False

        def run(peer: _Peer = peer, hostile: bool = hostile) -> None:
            with peer.sock:
                try:
                    peer.open()
                    while True:
                        _, request_id = peer.message()
                        (behave if hostile else _Peer.reply_names)(peer, request_id)
                except (OSError, AssertionError):
                    pass  # the client hung up (or said goodbye)

        threading.Thread(target=run, daemon=True).start()


@pytest.fixture
def fake_node(request: pytest.FixtureRequest) -> Iterator[Callable[[Behaviour], str]]:
    stops: list[tuple[threading.Event, socket.socket]] = []

    def start(behave: Behaviour) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(30)
        stop = threading.Event()
        stops.append((stop, listener))
        threading.Thread(target=_serve, args=(listener, behave, stop), daemon=True).start()
        return f"ws://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for stop, listener in stops:
        stop.set()
        listener.close()


def _then_a_normal_call_succeeds(url: str) -> None:
    with DropletConnection(url, timeout=10) as conn:
        assert conn.list_dags() == ["fake-dag"]


def _ping_first(peer: _Peer, request_id: int) -> None:
    peer.write(Ping(b"are you there"))
    peer.reply_names(request_id)


def test_a_servers_ping_is_answered_mid_call(fake_node: Callable[[Behaviour], str]) -> None:
    answered: list[bytes] = []

    def behave(peer: _Peer, request_id: int) -> None:
        _ping_first(peer, request_id)
        answered.extend(peer.pongs)

    url = fake_node(behave)
    with DropletConnection(url, timeout=10) as conn:
        assert isinstance(conn._backend, BlockingClient)
        assert conn.list_dags() == ["fake-dag"]
        assert conn.list_dags() == ["fake-dag"]  # the next request follows the pong
    assert answered == [b"are you there"]


@pytest.mark.parametrize(("behave", "error", "match"), [
    (lambda p, i: p.write(TextMessage("hello")), ProtocolError, "text message"),
    (lambda p, i: p.write(BytesMessage(b"x" * 5000)), ProtocolError, "max_frame_size=4096"),
    (lambda p, i: p.sock.sendall(server_frame(b"")[:1] + b"\x7f" + b"\xff" * 8),
     ProtocolError, "max_frame_size=4096"),
    (lambda p, i: p.write(CloseConnection(1011, "server error")), ConnectionError,
     "code 1011 \\(server error\\)"),
    (lambda p, i: p.write(CloseConnection(1000)), ConnectionError, "closed the connection"),
    (lambda p, i: p.sock.shutdown(socket.SHUT_RDWR), ConnectionError, "closed the connection"),
])
def test_a_hostile_server_fails_the_call_clearly(
        fake_node: Callable[[Behaviour], str], behave: Behaviour,
        error: type[Exception], match: str) -> None:
    url = fake_node(behave)
    conn = DropletConnection(url, timeout=10, options=TransportOptions(max_frame_size=4096))
    with conn:
        with pytest.raises(error, match=match) as info:
            conn.list_dags()
        assert url in str(info.value)
        with pytest.raises(droplet.ConnectionError):  # the connection is done, and says so
            conn.list_dags()
    _then_a_normal_call_succeeds(url)


def test_many_threads_share_a_pinging_connection(fake_node: Callable[[Behaviour], str]
                                                 ) -> None:
    url = fake_node(_ping_first)
    results: dict[int, Any] = {}
    with DropletConnection(url, timeout=20) as conn:
        barrier = threading.Barrier(32)

        def worker(i: int) -> None:
            barrier.wait()
            results[i] = [conn.list_dags() for _ in range(5)]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == {i: [["fake-dag"]] * 5 for i in range(32)}
    _then_a_normal_call_succeeds(url)


def test_not_a_websocket_server_is_a_connection_error(fake_node: Callable[[Behaviour], str]
                                                      ) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"ws://127.0.0.1:{listener.getsockname()[1]}"

        def http() -> None:
            sock, _ = listener.accept()
            with sock:
                sock.recv(4096)
                sock.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")

        server = threading.Thread(target=http, daemon=True)
        server.start()
        with pytest.raises(ConnectionError, match="HTTP 404.*ws:// listener"):
            DropletConnection(url, timeout=10)
        server.join(10)
    _then_a_normal_call_succeeds(fake_node(_Peer.reply_names))


def test_a_silent_listener_fails_the_upgrade_within_the_timeout(
        fake_node: Callable[[Behaviour], str]) -> None:
    """A port that accepts and never answers the upgrade: a ConnectionError by the deadline."""
    outcome: dict[str, BaseException] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"ws://127.0.0.1:{listener.getsockname()[1]}"

        def connect() -> None:
            try:
                DropletConnection(url, timeout=0.3)
            except BaseException as exc:
                outcome["error"] = exc

        client = threading.Thread(target=connect, daemon=True)
        client.start()
        client.join(20)
        assert not client.is_alive(), "the upgrade ignored its timeout"
    error = outcome["error"]
    assert isinstance(error, ConnectionError)
    assert url in str(error) and "WebSocket handshake" in str(error)
    _then_a_normal_call_succeeds(fake_node(_Peer.reply_names))


def test_a_pong_waits_while_a_write_is_under_way(fake_node: Callable[[Behaviour], str]
                                                 ) -> None:
    """The reading thread never waits for the send lock to answer a ping (the
    writer may be waiting for a server that waits for us to read): the pong
    goes out on its next read after the write."""
    seen: list[list[bytes]] = []

    def behave(peer: _Peer, request_id: int) -> None:
        seen.append(list(peer.pongs))
        peer.reply_names(request_id)

    url = fake_node(behave)
    with DropletConnection(url, timeout=10) as conn:
        peer = conn._backend.scheduler
        peer._decoder.feed(server_frame(b"late", opcode=0x9))
        assert peer._decoder.next_frame() is None
        with peer._send_lock:  # a write under way
            peer._answer_control()
        assert peer._owed  # held back, not sent
        assert conn.list_dags() == ["fake-dag"]  # its read sends the pong
        assert conn.list_dags() == ["fake-dag"]
        assert not peer._owed
    assert seen == [[], [b"late"]]
