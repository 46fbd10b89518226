"""Hostile input against a real ``python -m droplet.node``: it drops that connection, logs why,
and keeps serving everyone else.

The node (module scope, see ``conftest.hostile_node``) runs with small limits:
``--max-frame-size 65536``, and from a TOML file ``read_timeout = 1.0`` and
``max_inflight = 16``. Every test speaks raw bytes on its own socket, checks
that the node hung up on *that* socket with a reason in its log naming the
socket's address, and ends with a normal client call that must succeed.

Then the client side (a node hanging up on a waiting client raises, never
hangs), per-connection limits, and, embedded in this process, hostile values
in well-formed messages (Hypothesis) and a timeout test in virtual time.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterator
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import droplet
from droplet.links import HANDSHAKE_MAX_FRAME, HANDSHAKE_TIMEOUT, serve_peers
from droplet.protocol import messages
from droplet.protocol.framing import frame
from droplet.protocol.messages import (
    AuthChallenge,
    AuthResponse,
    AuthResult,
    ErrorReply,
    ExecutorJoin,
    KvsGet,
    ListFunctions,
    Names,
)
from droplet.protocol.messages import decode as decode_message
from droplet.protocol.messages import encode as encode_message
from droplet.testing.nodes import NodeProcess
from droplet.transports import TransportOptions, get_transport

from .conftest import (
    MAX_FRAME_SIZE,
    READ_TIMEOUT,
    TIMEOUT,
    RawPeer,
    assert_serves,
    raw_peer,
    wait_for_log,
)

LEN = struct.Struct(">I")
ENVELOPE = struct.Struct(">BBII")


def header_only(tag: int, header: bytes, request_id: int = 1) -> bytes:
    """A message payload with a hand-written JSON header and no blobs."""
    return ENVELOPE.pack(tag, 0, request_id, len(header)) + header


def goodbye_kinds(received: list[Any]) -> list[str]:
    return [m.kind for m in received if type(m) is ErrorReply]


def closed_pattern(peer: RawPeer, reason: str) -> str:
    """The node's log line for a connection it dropped (before or after the handshake)."""
    return rf"(closing|dropped) connection from {re.escape(peer.address)}\b.*{reason}"


# --------------------------------------------------------------------------- hostile bytes


@pytest.mark.slow
@pytest.mark.parametrize("authenticated", [False, True], ids=["before-auth", "after-auth"])
async def test_frame_over_the_size_limit(hostile_node: NodeProcess, authenticated: bool
                                         ) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_peer(hostile_node.url) as raw:
            if authenticated:
                assert (await raw.handshake()).ok
            else:
                await raw.challenge()
            # Until it authenticates, a peer may only send handshake-sized frames.
            limit = MAX_FRAME_SIZE if authenticated else HANDSHAKE_MAX_FRAME
            # Only the length and a few bytes: the node must refuse what is *declared*.
            await raw.send_raw(LEN.pack(limit + 1) + b"abc")
            received = await raw.closed_by_peer()
            if authenticated:  # a peer that passed the handshake is told why
                assert goodbye_kinds(received) == ["ProtocolError"]
            await wait_for_log(hostile_node, closed_pattern(
                raw, rf"{limit + 1}-byte frame; the limit is {limit}"))
        await assert_serves(hostile_node.url)


@pytest.mark.slow
@pytest.mark.parametrize("authenticated", [False, True], ids=["before-auth", "after-auth"])
async def test_truncated_frame_then_close(hostile_node: NodeProcess, authenticated: bool
                                          ) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_peer(hostile_node.url) as raw:
            if authenticated:
                assert (await raw.handshake()).ok
            else:
                await raw.challenge()
            await raw.send_raw(LEN.pack(100) + b"only ten b")
            await raw.stream.send_eof()
            await raw.closed_by_peer()
            await wait_for_log(hostile_node, closed_pattern(raw, "closed the connection mid-frame"))
        await assert_serves(hostile_node.url)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("authenticated", "garbage", "reason"),
    [
        (False, frame(b"\xfe\x00garbage that is no message"), "unknown message type 254"),
        (True, frame(b"\xfe\x00garbage that is no message"), "unknown message type 254"),
        (True, b"\xde\xad\xbe\xef" * 8, "declared a 3735928559-byte frame"),
        (True, frame(b"\x01"), "too short for a message envelope"),
        (True, frame(header_only(1, b"{not json")), "header is not valid JSON"),
    ],
    ids=["framed-before-auth", "framed", "unframed", "short-frame", "bad-json"],
)
async def test_garbage(hostile_node: NodeProcess, authenticated: bool, garbage: bytes,
                       reason: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_peer(hostile_node.url) as raw:
            if authenticated:
                assert (await raw.handshake()).ok
            else:
                await raw.challenge()
            await raw.send_raw(garbage)
            received = await raw.closed_by_peer()
            if authenticated:
                assert goodbye_kinds(received) == ["ProtocolError"]
            await wait_for_log(hostile_node, closed_pattern(raw, reason))
        await assert_serves(hostile_node.url)


@pytest.mark.slow
async def test_http_request_on_the_tcp_port(hostile_node: NodeProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_peer(hostile_node.url) as raw:
            await raw.send_raw(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            received = await raw.closed_by_peer()
            # The node spoke first (its challenge), then hung up: no HTTP answer.
            assert [type(m) for m in received] == [AuthChallenge]
            # "GET " read as a length is 1.2 GB: refused before any allocation.
            await wait_for_log(hostile_node, closed_pattern(raw, "1195725856-byte frame"))
        await assert_serves(hostile_node.url)


@pytest.mark.slow
async def test_unknown_message_type_after_the_handshake(hostile_node: NodeProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_peer(hostile_node.url) as raw:
            assert (await raw.handshake()).ok
            await raw.send_frame(header_only(250, b"[]"))
            assert goodbye_kinds(await raw.closed_by_peer()) == ["ProtocolError"]
            await wait_for_log(hostile_node, closed_pattern(raw, "unknown message type 250"))
        await assert_serves(hostile_node.url)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (header_only(21, b"[555]"), r"ListFunctions\.prefix must be str \| None, got int"),
        (header_only(10, b'["k","soon",false,null]'), r"KvsGet\.wait must be float \| None"),
        (header_only(21, b'{"prefix":"p"}'), "header must be a list of 1 fields"),
        (header_only(20, b'["f",7]'), r"RegisterFunction\.code must be bytes"),
    ],
    ids=["int-for-str", "str-for-float", "object-for-list", "int-for-bytes"],
)
async def test_wrong_field_types_after_the_handshake(hostile_node: NodeProcess, payload: bytes,
                                                     reason: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_peer(hostile_node.url) as raw:
            assert (await raw.handshake()).ok
            await raw.send_frame(payload)
            assert goodbye_kinds(await raw.closed_by_peer()) == ["ProtocolError"]
            await wait_for_log(hostile_node, closed_pattern(raw, reason))
        await assert_serves(hostile_node.url)


@pytest.mark.slow
@pytest.mark.parametrize("authenticated", [False, True], ids=["before-auth", "after-auth"])
async def test_slow_sender_is_cut_off_after_read_timeout(hostile_node: NodeProcess,
                                                         authenticated: bool) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_peer(hostile_node.url) as raw:
            if authenticated:
                assert (await raw.handshake()).ok
            else:
                await raw.challenge()
            await raw.send_raw(LEN.pack(1000) + b"0123456789")  # ...and never the rest
            await raw.closed_by_peer()
            await wait_for_log(hostile_node, closed_pattern(
                raw, f"left a frame unfinished for {READ_TIMEOUT:g} s"))
        await assert_serves(hostile_node.url)


@pytest.mark.slow
async def test_a_message_the_node_does_not_serve_is_answered_and_the_connection_stays(
    hostile_node: NodeProcess,
) -> None:
    """Well-formed but unexpected (a handshake message after the handshake): a bad request."""
    with trio.fail_after(TIMEOUT):
        async with raw_peer(hostile_node.url) as raw:
            assert (await raw.handshake()).ok
            await raw.send_message(AuthChallenge(1, b"n" * 32, True), 5)
            error = await raw.reply_to(5)
            assert type(error) is ErrorReply
            assert error.kind == "ProtocolError"
            assert "does not serve AuthChallenge" in error.message
            await raw.send_message(ListFunctions("no-such-prefix"), 6)
            assert await raw.reply_to(6) == Names([])
        await assert_serves(hostile_node.url)


@pytest.mark.slow
async def test_client_resetting_with_replies_pending(hostile_node: NodeProcess) -> None:
    """Regression: a reply to a peer that reset the connection used to crash the node."""
    with trio.fail_after(TIMEOUT):
        for _ in range(3):
            async with raw_peer(hostile_node.url) as raw:
                assert (await raw.handshake()).ok
                await raw.send_raw(b"".join(
                    frame(encode_message(ListFunctions(None), i)) for i in range(1, 2001)))
                # SO_LINGER 0: close sends a reset, so the node's replies hit a dead socket.
                raw.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
        await assert_serves(hostile_node.url)
        assert hostile_node.running()


# --------------------------------------------------------------------------- the client side


@pytest.mark.slow
async def test_client_gets_an_error_when_the_node_hangs_up_on_its_request(
    hostile_node: NodeProcess,
) -> None:
    """A request over the node's frame limit: the node hangs up; the waiting client raises."""
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(hostile_node.url, timeout=TIMEOUT) as cloud:
            with pytest.raises((droplet.ProtocolError, droplet.ConnectionError)):
                await cloud.put_object("too-big", b"x" * 200_000)
            # The connection is gone, and says so at once.
            with pytest.raises(droplet.ConnectionError):
                await cloud.get_object("too-big")
        await wait_for_log(hostile_node, r"closing connection from tcp://127\.0\.0\.1:\d+: "
                           rf"peer declared a 2\d{{5}}-byte frame; the limit is {MAX_FRAME_SIZE}")
        await assert_serves(hostile_node.url)


@pytest.mark.slow
async def test_reply_over_the_frame_limit_is_an_error_not_a_hang(hostile_node: NodeProcess
                                                                ) -> None:
    """A result bigger than the node may send: the caller gets an error naming the limit."""
    with trio.fail_after(TIMEOUT):
        async with droplet.open_client(hostile_node.url, timeout=TIMEOUT) as cloud:
            big = await cloud.register(lambda _, n: b"x" * n, "big_result")
            future = await big(200_000)
            with pytest.raises(droplet.DropletError, match="max_frame_size=65536"):
                await future.get()
            with pytest.raises(droplet.DropletError, match="max_frame_size=65536"):
                await cloud.get_object(future.obj_id)
            await cloud.register_dag("big_dag", ["big_result"], [])
            with pytest.raises(droplet.DropletError, match="max_frame_size=65536"):
                await cloud.call_dag("big_dag", {"big_result": 200_000}, direct_response=True)
            # Same connection, small results: fine.
            assert await (await big(3)).get() == b"xxx"
        await assert_serves(hostile_node.url)


@pytest.mark.slow
async def test_thousands_of_waiting_requests_on_one_connection_do_not_starve_others(
    hostile_node: NodeProcess,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_peer(hostile_node.url) as flood, trio.open_nursery() as nursery:
            assert (await flood.handshake()).ok
            requests = b"".join(frame(encode_message(KvsGet(f"never-{i}", 30.0), i + 1))
                                for i in range(5000))
            # The node reads MAX_INFLIGHT (16) of these, then leaves the rest in
            # the socket (backpressure): sending may block, so do it on the side.
            nursery.start_soon(flood.send_raw, requests)
            for _ in range(3):
                await assert_serves(hostile_node.url)
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- embedded


async def _raw_inproc(url: str, nursery: trio.Nursery) -> Any:
    """An authenticated inproc connection driven by hand (no reader task of ours)."""
    conn = await get_transport(url).connect(url, TransportOptions(), nursery)
    challenge, _, _ = decode_message(await conn.receive())
    assert type(challenge) is AuthChallenge
    await conn.send(encode_message(AuthResponse(b"", b"c" * 32)))
    result, _, _ = decode_message(await conn.receive())
    assert type(result) is AuthResult and result.ok
    return conn


async def test_client_hanging_up_with_a_request_pending_does_not_stop_the_node() -> None:
    """Regression, deterministic over inproc: the node's reply to a vanished client
    raised ConnectionError out of the listener and stopped the node."""
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1) as cluster:
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    conn = await _raw_inproc(cluster.address, nursery)
                    await conn.send(encode_message(ListFunctions(None), 1))
                    await conn.aclose()
            async with cluster.client() as cloud:
                await cloud.put_object("k", 1)
                assert await cloud.get_object("k") == 1


async def test_silent_client_is_dropped_after_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    async def unreachable(*_: Any) -> None:
        raise AssertionError("no message may reach a service before the handshake")

    with trio.fail_after(HANDSHAKE_TIMEOUT + 5):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve_peers, "inproc://hostile-silent",
                                              unreachable))
            conn = await get_transport(url).connect(url, TransportOptions(), nursery)
            challenge, _, _ = decode_message(await conn.receive())
            assert type(challenge) is AuthChallenge
            with pytest.raises(trio.EndOfChannel):  # ...and we never answer
                await conn.receive()
            assert trio.current_time() >= HANDSHAKE_TIMEOUT
            nursery.cancel_scope.cancel()
    assert "dropped connection from inproc://client during handshake" in caplog.text


def _with_header(msg: Any, header: bytes) -> bytes:
    """``msg`` encoded, its JSON header replaced (to send values JSON allows, we don't)."""
    payload = encode_message(msg, 1)
    tag, flags, rid, head_len = ENVELOPE.unpack_from(payload)
    return ENVELOPE.pack(tag, flags, rid, len(header)) + header + payload[10 + head_len:]


@pytest.mark.parametrize("wait", [b"NaN", b"1" + b"0" * 400], ids=["nan", "huge-int"])
async def test_waiting_get_with_a_wait_json_allows_but_trio_does_not(wait: bytes) -> None:
    """Regression: NaN, or an int past float range, as KvsGet.wait stopped the whole node
    (trio.move_on_after / float() raised in a task of the KVS service's nursery)."""
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1) as cluster, trio.open_nursery() as nursery:
            conn = await _raw_inproc(cluster.address, nursery)
            await conn.send(_with_header(KvsGet("absent"), b'["absent",' + wait + b",false,null]"))
            async with cluster.client() as cloud:
                await cloud.put_object("k", 1)
                assert await cloud.get_object("k") == 1
            await conn.aclose()


# --------------------------------------------------------------------------- hostile values

# Field values a decoder accepts (the right JSON type) but a service may not
# expect: NaN, infinities, ints far beyond float range, empty and odd strings.
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_ints = st.one_of(st.integers(-(2**64), 2**64), st.sampled_from([0, -1, 10**400, -(10**400)]))
_floats = st.one_of(st.floats(), _ints)
_KINDS: dict[str, st.SearchStrategy[Any]] = {
    "str": _text,
    "int": _ints,
    "bool": st.booleans(),
    "float": _floats,
    "bytes": st.binary(max_size=40),
    "list[bytes]": st.lists(st.binary(max_size=20), max_size=3),
    "list[str]": st.lists(_text, max_size=3),
    "list[int]": st.lists(_ints, max_size=3),
    "list[list[str]]": st.lists(st.lists(_text, max_size=3), max_size=3),
    "dict[str, int]": st.dictionaries(_text, _ints, max_size=3),
}


def _field(cls: type[Any], field: attrs.Attribute[Any]) -> st.SearchStrategy[Any]:
    kind = str(field.type).replace("Blob", "bytes")  # Blob fields are bytes on the wire
    if kind.endswith(" | None"):
        return st.none() | _KINDS[kind.removesuffix(" | None")]
    return _KINDS[kind]


# Every message but ExecutorJoin: joining as an executor is a capability every
# authenticated peer has by design, not a value to validate.
_CLASSES = [cls for _, cls in sorted(messages.MESSAGES.items()) if cls is not ExecutorJoin]
hostile_messages = st.sampled_from(_CLASSES).flatmap(
    lambda cls: st.builds(cls, *[_field(cls, f) for f in attrs.fields(cls)]))
PROBE = 0x7FFFFFFF


@pytest.fixture(scope="module")
def embedded_node() -> Iterator[str]:
    """A LocalCluster reachable over TCP from any trio.run of the test."""
    with droplet.LocalCluster(1, listen="tcp://127.0.0.1:0") as cluster:
        yield cluster.address


async def _exchange(url: str, msg: Any, request_id: int, reply: bool) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_peer(url) as raw:
            assert (await raw.handshake()).ok
            await raw.send_message(msg, request_id, reply=reply)
            await raw.send_message(ListFunctions("probe/"), PROBE)
            if reply and request_id == 0 and type(msg) is ErrorReply:
                # A one-way ErrorReply is how a peer says goodbye: the node hangs up.
                await raw.closed_by_peer()
            else:
                # Anything else well-formed: answered or not, the connection lives on.
                assert await raw.reply_to(PROBE) == Names([])
        async with raw_peer(url) as fresh:
            assert (await fresh.handshake()).ok
            await fresh.send_message(ListFunctions("probe/"), 1)
            assert await fresh.reply_to(1) == Names([])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(msg=hostile_messages, request_id=st.sampled_from([0, 1, 2**32 - 1]),
       reply=st.booleans())
def test_well_formed_messages_with_hostile_values_never_stop_the_node(
    embedded_node: str, msg: Any, request_id: int, reply: bool,
) -> None:
    trio.run(_exchange, embedded_node, msg, request_id, reply)
