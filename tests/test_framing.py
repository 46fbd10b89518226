"""The sans-IO wire layer under hostile input: framing, messages, plain values.

Synchronous tests (no event loop), then Hypothesis: round-trips of valid data,
and random or mutated bytes that may only ever raise ProtocolError.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from droplet.errors import ProtocolError
from droplet.protocol import encoding, messages, values
from droplet.protocol.framing import HEADER_SIZE, FrameDecoder, frame

LEN = struct.Struct(">I")

# Deterministic (STYLE.md 12), no example database left in the tree, and sized
# so the whole module runs in a few seconds (a few thousand examples in all).
fuzz = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
round_trip = settings(fuzz, max_examples=150)


def drain(decoder: FrameDecoder) -> list[bytes]:
    frames = []
    while (payload := decoder.next_frame()) is not None:
        frames.append(payload)
    return frames


# --------------------------------------------------------------------------- framing

FRAMES = [b"hello", b"", b"x", b"\x00" * 300, b"", b"last"]
WIRE = b"".join(frame(f) for f in FRAMES)


def test_frame_prefixes_big_endian_length() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"") == b"\x00\x00\x00\x00"


def test_frame_refuses_payload_over_limit() -> None:
    assert frame(b"x" * 10, max_frame_size=10) == LEN.pack(10) + b"x" * 10
    with pytest.raises(ValueError, match="max_frame_size=10"):
        frame(b"x" * 11, max_frame_size=10)


def test_whole_stream_at_once() -> None:
    decoder = FrameDecoder()
    decoder.feed(WIRE)
    assert drain(decoder) == FRAMES
    assert decoder.buffered == 0 and not decoder.mid_frame


@pytest.mark.parametrize("split", range(len(WIRE) + 1))
def test_split_at_every_byte_boundary(split: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(WIRE[:split])
    got = drain(decoder)
    decoder.feed(WIRE[split:])
    got += drain(decoder)
    assert got == FRAMES
    assert not decoder.mid_frame


def test_one_byte_at_a_time() -> None:
    decoder = FrameDecoder()
    got = []
    for i in range(len(WIRE)):
        decoder.feed(WIRE[i : i + 1])
        got += drain(decoder)
        # mid_frame is exactly "some bytes of an unfinished frame are buffered".
        assert decoder.mid_frame == (decoder.buffered > 0)
    assert got == FRAMES


def test_partial_header_and_partial_payload_are_mid_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00")
    assert decoder.next_frame() is None and decoder.mid_frame
    decoder.feed(b"\x00\x05he")
    assert decoder.next_frame() is None and decoder.buffered == HEADER_SIZE + 2
    decoder.feed(b"llo")
    assert decoder.next_frame() == b"hello" and not decoder.mid_frame


def test_oversize_declared_length_raises_before_payload_arrives() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    decoder.feed(LEN.pack(11))  # the header alone: not one payload byte sent
    with pytest.raises(ProtocolError, match="11-byte frame; the limit is 10"):
        decoder.next_frame()
    assert decoder.buffered == HEADER_SIZE  # nothing was allocated for the claim


def test_huge_declared_length_raises_at_once() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\xff\xff\xff\xff" + b"tiny")
    with pytest.raises(ProtocolError, match="4294967295-byte frame"):
        decoder.next_frame()


def test_oversize_frame_after_good_frames_raises_after_them() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    decoder.feed(frame(b"ok") + LEN.pack(1000))
    assert decoder.next_frame() == b"ok"
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    decoder.feed(frame(b"0123456789"))
    assert decoder.next_frame() == b"0123456789"


def test_zero_limit_allows_only_empty_frames() -> None:
    decoder = FrameDecoder(max_frame_size=0)
    decoder.feed(frame(b"") + LEN.pack(1))
    assert decoder.next_frame() == b""
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_many_frames_past_the_compaction_threshold() -> None:
    payloads = [bytes([i % 256]) * (i * 13 % 5000) for i in range(200)]  # ~500 KB
    decoder = FrameDecoder()
    wire = b"".join(frame(p) for p in payloads)
    got = []
    for start in range(0, len(wire), 7001):  # chunks that never align with frames
        decoder.feed(wire[start : start + 7001])
        got += drain(decoder)
    assert got == payloads
    assert decoder.buffered == 0


def test_accepts_bytearray_and_returns_bytes() -> None:
    decoder = FrameDecoder()
    decoder.feed(bytearray(frame(b"abc")))
    payload = decoder.next_frame()
    assert payload == b"abc" and type(payload) is bytes


@round_trip
@given(
    payloads=st.lists(st.binary(max_size=200), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=10),
)
def test_frames_survive_any_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frame(p) for p in payloads)
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    decoder = FrameDecoder(max_frame_size=200)
    got = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        decoder.feed(wire[start:end])
        got += drain(decoder)
    assert got == payloads
    assert not decoder.mid_frame


@fuzz
@given(chunks=st.lists(st.binary(max_size=64), max_size=30), limit=st.integers(0, 64))
def test_frame_decoder_garbage_only_raises_protocol_error(
    chunks: list[bytes], limit: int
) -> None:
    decoder = FrameDecoder(max_frame_size=limit)
    fed = 0
    for chunk in chunks:
        decoder.feed(chunk)
        fed += len(chunk)
        try:
            frames = drain(decoder)
        except ProtocolError:
            return
        assert all(len(f) <= limit for f in frames)
        assert decoder.buffered <= fed


# --------------------------------------------------------------------------- strategies

_names = st.text(max_size=20)
# Strings as JSON can carry them: including lone surrogates, which "\\udXXX" escapes
# can smuggle into a decoded str although no UTF-8 encoder will take them back.
json_text = st.lists(
    st.characters() | st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]), max_size=5
).map("".join)
_KIND_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "str": _names,
    "int": st.integers(-(2**70), 2**70),
    "bool": st.booleans(),
    "float": st.floats(allow_nan=False),
    "bytes": st.binary(max_size=50),
    "str | None": st.none() | _names,
    "int | None": st.none() | st.integers(-(2**40), 2**40),
    "float | None": st.none() | st.floats(allow_nan=False),
    "bytes | None": st.none() | st.binary(max_size=50),
    "list[str]": st.lists(_names, max_size=4),
    "list[int]": st.lists(st.integers(-(2**40), 2**40), max_size=4),
    "list[bytes]": st.lists(st.binary(max_size=20), max_size=4),
    "list[list[str]]": st.lists(st.lists(_names, max_size=3), max_size=3),
    "dict[str, int]": st.dictionaries(_names, st.integers(-(2**40), 2**40), max_size=3),
}


def _message_strategy(cls: type[Any], **overrides: Any) -> st.SearchStrategy[Any]:
    kinds = {**_KIND_STRATEGIES, **overrides}
    schema = cls._schema
    missing = [k for k in schema.kinds if k not in kinds]
    assert not missing, f"{cls.__name__} uses field kinds this test cannot generate: {missing}"
    return st.builds(cls, *(kinds[k] for k in schema.kinds))


MESSAGE_CLASSES = [messages.MESSAGES[tag] for tag in sorted(messages.MESSAGES)]
any_message = st.one_of([_message_strategy(cls) for cls in MESSAGE_CLASSES])
request_ids = st.integers(0, 2**32 - 1)

plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8),
        children,
        max_size=4,
    ),
    max_leaves=20,
)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """Valid bytes with a few targeted corruptions: the interesting garbage."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "length":  # a plausible-looking huge length or count
            data[at : at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                                                      b"\x00\x01\x00\x00", b"\x00\x00\x00\x00"]))
    return bytes(data)


def _encoded_message(draw_msg: Any) -> bytes:
    msg, request_id, reply = draw_msg
    return messages.encode(msg, request_id, reply)


encoded_messages = st.tuples(any_message, request_ids, st.booleans()).map(_encoded_message)
encoded_values = plain_values.map(values.dumps)


# --------------------------------------------------------------------------- messages


@round_trip
@given(msg=any_message, request_id=request_ids, reply=st.booleans())
def test_messages_round_trip(msg: Any, request_id: int, reply: bool) -> None:
    """Every message decodes to itself, or (values that do not fit together, such as
    a Trigger naming a function not in its run) is refused as InvalidMessage."""
    payload = messages.encode(msg, request_id, reply)
    try:
        back = messages.decode(payload)
    except messages.InvalidMessage as exc:
        assert type(msg) in encoding._VALIDATORS
        assert (exc.request_id, exc.is_reply) == (request_id, reply)
    else:
        assert back == (msg, request_id, reply)


def _decode_or_protocol_error(payload: bytes) -> None:
    """Only ProtocolError may escape; what decodes must encode again unchanged.

    The second half matters because services echo fields into replies (a key
    into KvsValue): a value that decodes but cannot be encoded would blow up in
    the reply path, outside any ProtocolError handling.
    """
    try:
        msg, request_id, reply = messages.decode(payload)
    except ProtocolError:
        return
    assert messages.decode(messages.encode(msg, request_id, reply)) == (msg, request_id, reply)


@fuzz
@given(payload=st.binary(max_size=200))
def test_message_decode_random_bytes(payload: bytes) -> None:
    _decode_or_protocol_error(payload)


@fuzz
@given(tag=st.sampled_from(sorted(messages.MESSAGES)), rest=st.binary(max_size=100))
def test_message_decode_known_tag_random_body(tag: int, rest: bytes) -> None:
    _decode_or_protocol_error(bytes([tag]) + rest)


@fuzz
@given(payload=mutated(encoded_messages))
def test_message_decode_mutated(payload: bytes) -> None:
    _decode_or_protocol_error(payload)


@settings(fuzz, max_examples=200)
@given(
    tag=st.sampled_from(sorted(messages.MESSAGES)),
    header=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | json_text,
        lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=12,
    ),
    blobs=st.binary(max_size=30),
)
def test_message_decode_wrong_field_types(tag: int, header: Any, blobs: bytes) -> None:
    """Well-formed JSON headers with arbitrary shapes: field validation catches them."""
    head = json.dumps(header).encode()
    _decode_or_protocol_error(struct.pack(">BBII", tag, 0, 1, len(head)) + head + blobs)


HEADER_ONLY = [c for c in MESSAGE_CLASSES if not c._schema.blob_fields]
any_text = {"str": json_text, "str | None": st.none() | json_text}


@fuzz
@given(msg=st.one_of([_message_strategy(c, **any_text) for c in HEADER_ONLY]))
def test_message_decode_escaped_strings(msg: Any) -> None:
    """Headers written by another JSON encoder, escaping every non-ASCII character."""
    header = [getattr(msg, name) for name in msg._schema.names]
    head = json.dumps(header, ensure_ascii=True).encode()
    _decode_or_protocol_error(struct.pack(">BBII", msg._schema.tag, 0, 7, len(head)) + head)


@pytest.mark.parametrize(
    "header",
    [
        b'["\\ud800", null, false]',
        b'["\\uDFFF", null, false]',
        b"[" * 100_000,
        b'["' + b"\xff" * 10 + b'"]',
        b"[" + b"9" * 5000 + b"]",
        b"NaN",
    ],
    ids=["lone-surrogate", "lone-low-surrogate", "deep-nesting", "bad-utf8", "huge-int",
         "not-a-list"],
)
def test_message_decode_hostile_headers(header: bytes) -> None:
    payload = struct.pack(">BBII", 10, 0, 1, len(header)) + header  # KvsGet
    with pytest.raises(ProtocolError):
        messages.decode(payload)


# --------------------------------------------------------------------------- values


@round_trip
@given(value=plain_values)
def test_values_round_trip(value: Any) -> None:
    assert values.loads(values.dumps(value)) == value


def _loads_or_protocol_error(data: bytes) -> None:
    try:
        values.loads(data)
    except ProtocolError:
        pass


@fuzz
@given(data=st.binary(max_size=200))
def test_values_loads_random_bytes(data: bytes) -> None:
    _loads_or_protocol_error(data)


@fuzz
@given(data=mutated(encoded_values))
def test_values_loads_mutated(data: bytes) -> None:
    _loads_or_protocol_error(data)


@pytest.mark.parametrize(
    "data",
    [
        b"l\x00\x00\x00\x01" * 40 + b"N",  # lists nested deeper than MAX_DEPTH
        b"l\xff\xff\xff\xff",  # a count the data cannot hold
        b"s\x00\x00\x00\x02\xff\xfe",  # invalid UTF-8
        b"d\x00\x00\x00\x01l\x00\x00\x00\x00N",  # unhashable dict key
        b"i\x00\x00",  # truncated int
        b"NN",  # trailing bytes
        b"",
    ],
)
def test_values_loads_hostile(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        values.loads(data)
