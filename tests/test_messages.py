"""The message codec (protocol/messages.py) and plain values (protocol/values.py).

Synchronous, no event loop: the wire layer is sans-IO.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any

import attrs
import pytest

from droplet.errors import ProtocolError
from droplet.latency import BUCKETS
from droplet.protocol import encoding as wire
from droplet.protocol import messages as m
from droplet.protocol import values
from droplet.protocol.messages import MESSAGES, decode, encode

ENVELOPE = struct.Struct(">BBII")

#: A causal context as the services send it (garbage there is refused, see below).
_CTX = values.dumps({"k": {"node": 1}})


# One or more representative instances of every registered message class.
SAMPLES: list[Any] = [
    m.Ok(),
    m.ErrorReply("DagError", "no DAG named 'x'"),
    m.ErrorReply("DropletError", "internal error: boom", "Traceback (most recent call last):\n"),
    m.Hello("client", "abc123"),
    m.Hello("executor", "n1", "tcp://127.0.0.1:7001"),
    m.ClusterInfo("tcp://127.0.0.1:5001", "", "node-1"),
    m.AuthChallenge(1, b"\x00" * 32, True),
    m.AuthChallenge(1, b"", False),
    m.AuthResponse(b"\x01mac", b"nonce\xff"),
    m.AuthResult(True, b"servermac", ""),
    m.AuthResult(False, b"", "wrong cluster token"),
    m.BoolReply(True),
    m.BoolReply(False),
    m.Names([]),
    m.Names(["a", "b", "ünïcode ☃"]),
    m.KvsGet("k"),
    m.KvsGet("k", 2.5, True),
    m.KvsGet("k", 3),
    m.KvsValue("k", None),
    m.KvsValue("k", b"\x00lattice"),
    m.KvsValue("k", b""),
    m.KvsPut("key", b"lattice bytes", False),
    m.KvsPut("key", b"", True),
    m.KvsStored("LWWLattice"),
    m.KvsUpdate("key", b"\x01\x02"),
    m.KvsUnsubscribe("key"),
    m.RegisterFunction("square", b"\x80\x05cloudpickle"),
    m.ListFunctions(),
    m.ListFunctions("sq"),
    m.FunctionExists("square"),
    m.RegisterDag("dag", ["a", "b", "c"], [["a", "b"], ["b", "c"]], ["a"]),

    m.RegisterDag("one", ["a"], [], []),
    m.DeleteDag("dag"),
    m.CallDag("square", True, ["square"], [b"args"]),
    m.CallDag("dag", False, ["a", "b"], [b"x", b""], "CAUSAL", "out", "client-1", True, 1.5),
    m.CallDag("dag", False, [], []),
    m.CallAccepted("run-1", "__droplet/results/run-1"),
    m.DagResult("run-1", b"value", False),
    m.DagResult("run-1", b"", True),
    m.RunDone("run-1", None, False),
    m.RunDone("run-1", b"v", True),
    m.ExecutorJoin("tcp://127.0.0.1:7001", "n1", 32),
    m.Trigger(
        "run-1", "b", ["a", "b"], ["v1", "v2"], ["tcp://e1", "tcp://e2"], [["a", "b"]],
        ["a"], [b"args"], "a", b"result", False, "__droplet/results/run-1", "out", True,
        "REPEATABLE_READ", "client", 1700000000.25, "tcp://sched",
    ),
    m.Trigger(
        "run-2", "a", ["a"], ["v1"], ["inproc://e"], [], [], [], None, None, True,
        "rk", None, False, "NORMAL", None, None, "",
    ),
    m.Mail("tcp://e1/3", "tcp://e2/1", b"hello"),
    m.Mail("inproc://x/1", "inproc://x/2", b""),
    m.KvsGet("k", 1.0, True, "run-1"),
    m.KvsRelease("run-1"),
    m.CallDag("dag", False, ["a"], [b"x"], "CAUSAL", None, "c", False, None, "rk", _CTX),
    m.Trigger(
        "run-3", "a", ["a"], ["v1"], ["tcp://e"], [], [], [], None, None, False,
        "rk", None, False, "CAUSAL", "client", None, "", _CTX,
    ),
    m.ExecutorReport("tcp://e1", 32, 1, 0, 1, 2, 300, 5, 1, ["f", "g"], [2, 0], [1, 0],
                     [1] * 2 + [0] * (2 * BUCKETS - 2), [1500, 0]),
    m.ExecutorReport("inproc://e", 1, 0, 0, 0, 0, 0, 0, 0, [], [], [], [], []),
    m.ExecutorReport("inproc://e", 1, 0, 0, 0, 0, 0, 0, 0, [], [], [], [], [], 3,
                     ["big", "bigger"], [70_000, 10_000_000], ["gone"], True),
    m.CacheGet("k"),
    m.CacheGet("k", 7, True, True),
    m.CacheValue("k", 0, False),
    m.CacheValue("k", 3, True, 5, b"lattice"),
    m.CacheValue("k", 4, False, 100_000, None, "droplet-1-0123abcd-1"),
    m.CachePut("k", b"lattice"),
    m.PoolQuery("ab12-w"),
    m.PoolReply(["ab12-w0"], ["tcp://127.0.0.1:7001"], [1], [3], [4], [4], [17]),
    m.PoolReply([], [], [], [], [], [], []),
    m.DrainExecutor("tcp://127.0.0.1:7001"),
    m.PlaceCall("f", True),
    m.PlaceCall("dag", False, ["big-a", "big-b"]),
    m.PlaceCall("f", True, ["big-a"], 500),
    m.CallPlaced("f", True, ["f"], ["v1"], [], ["tcp://e1", "tcp://e2"], 2.0),
    m.CallPlaced("f", True, ["f"], ["v1"], [], ["tcp://e1", "tcp://e2"], 2.0, 1),
    m.CallPlaced("dag", False, ["a", "b"], ["v1", "v2"], [["a", "b"]], [], 2.0, 0),
    m.StatusReply('{"scheduler":"s","rate_window":10.0,"executors":[],"functions":[],'
                  '"dags":["d"]}'),
]

# Field values by declared kind: every field set, then every optional field None.
FILLED = {
    "str": "s☃", "int": 2**40, "bool": True, "float": 0.25, "str | None": "opt",
    "int | None": -3, "float | None": 1e-3, "list[str]": ["x", ""], "list[int]": [0, -1],
    "list[list[str]]": [["a", "b"], []], "dict[str, int]": {"n": 1},
    "bytes": b"\x00blob", "bytes | None": b"", "list[bytes]": [b"one", b"", b"\xff"],
}


def generated_samples() -> list[Any]:
    samples = []
    for cls in MESSAGES.values():
        kinds = cls._schema.kinds  # Blob fields are bytes fields on the wire
        samples.append(cls(*[FILLED[k] for k in kinds]))
        samples.append(cls(*[None if k.endswith("| None") else FILLED[k] for k in kinds]))
    # Filled with arbitrary values, these do not fit together: see the
    # InvalidMessage tests at the end (hand-written samples above cover them).
    return [s for s in samples if type(s) not in wire._VALIDATORS]


SAMPLES += generated_samples()


def test_every_message_class_has_a_sample() -> None:
    assert {type(s) for s in SAMPLES} == set(MESSAGES.values())


def test_tags_are_unique_and_fit_a_byte() -> None:
    for tag, cls in MESSAGES.items():
        assert 0 <= tag <= 255
        assert cls._schema.tag == tag


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(msg: Any) -> None:
    frame = encode(msg)
    back, request_id, is_reply = decode(frame)
    assert back == msg
    assert type(back) is type(msg)
    assert (request_id, is_reply) == (0, False)


@pytest.mark.parametrize("msg", SAMPLES[:6], ids=lambda s: type(s).__name__)
def test_request_id_and_reply_flag_round_trip(msg: Any) -> None:
    back, request_id, is_reply = decode(encode(msg, 4_000_000_000, reply=True))
    assert (back, request_id, is_reply) == (msg, 4_000_000_000, True)
    assert decode(encode(msg, 7))[1:] == (7, False)


def test_messages_are_frozen() -> None:
    msg = m.KvsGet("k")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        msg.key = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- hostile frames


def split(frame: bytes) -> tuple[int, int, int, list[Any], bytes]:
    tag, flags, request_id, head_len = ENVELOPE.unpack_from(frame)
    head = json.loads(frame[ENVELOPE.size:ENVELOPE.size + head_len])
    return tag, flags, request_id, head, frame[ENVELOPE.size + head_len:]


def join(tag: int, flags: int, request_id: int, header: Any, tail: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return ENVELOPE.pack(tag, flags, request_id, len(head)) + head + tail


WRONG_VALUES: dict[str, list[Any]] = {
    "str": [5, None, ["x"], True],
    "int": ["1", 1.5, True, None],
    "bool": [1, 0, "true", None],
    "float": ["1.0", True, None, [1.0]],
    "str | None": [5, False, ["x"]],
    "int | None": ["5", 1.5, True],
    "float | None": ["1", True, {}],
    "list[str]": ["ab", [1], [None], None, {"a": "b"}],
    "list[int]": [[1, "2"], 1, [True], None],
    "list[list[str]]": [["a", "b"], [[1]], [["a"], "b"], None],
    "dict[str, int]": [[], {"a": "1"}, None],
}


def wrong_field_cases() -> list[Any]:
    cases = []
    for msg in SAMPLES:
        schema = type(msg)._schema
        for i, name, _ in schema.header_fields:
            kind = schema.kinds[i]
            for bad in WRONG_VALUES[kind]:
                cases.append(pytest.param(msg, i, name, bad,
                                          id=f"{type(msg).__name__}.{name}={bad!r}"))
    # deduplicate per (class, field, value): samples repeat classes
    seen, unique = set(), []
    for case in cases:
        if case.id not in seen:
            seen.add(case.id)
            unique.append(case)
    return unique


@pytest.mark.parametrize(("msg", "index", "name", "bad"), wrong_field_cases())
def test_wrong_header_field_type_names_the_field(msg: Any, index: int, name: str,
                                                 bad: Any) -> None:
    tag, flags, request_id, header, tail = split(encode(msg))
    header[index] = bad
    with pytest.raises(ProtocolError, match=rf"{type(msg).__name__}\.{name} must be"):
        decode(join(tag, flags, request_id, header, tail))


def blob_field_cases() -> list[Any]:
    cases = []
    for msg in SAMPLES:
        schema = type(msg)._schema
        for i, name, kind in schema.blob_fields:
            bad_markers: list[Any] = ["x", 1.5, [0]] if kind != "list[bytes]" else ["2", -1, None]
            if kind == "bytes":
                bad_markers.append(None)
            for bad in bad_markers:
                case_id = f"{type(msg).__name__}.{name}={bad!r}"
                cases.append(pytest.param(msg, i, name, bad, id=case_id))
    seen, unique = set(), []
    for case in cases:
        if case.id not in seen:
            seen.add(case.id)
            unique.append(case)
    return unique


@pytest.mark.parametrize(("msg", "index", "name", "bad"), blob_field_cases())
def test_wrong_blob_marker_names_the_field(msg: Any, index: int, name: str, bad: Any) -> None:
    tag, flags, request_id, header, tail = split(encode(msg))
    header[index] = bad
    with pytest.raises(ProtocolError, match=rf"{type(msg).__name__}\.{name}"):
        decode(join(tag, flags, request_id, header, tail))


def test_unknown_tag() -> None:
    unused = next(t for t in range(256) if t not in MESSAGES)
    with pytest.raises(ProtocolError, match=rf"unknown message type {unused}"):
        decode(join(unused, 0, 0, []))


def test_trailing_bytes() -> None:
    with pytest.raises(ProtocolError, match=r"KvsGet: 3 trailing bytes"):
        decode(encode(m.KvsGet("k")) + b"xyz")
    with pytest.raises(ProtocolError, match=r"trailing bytes"):
        decode(encode(m.KvsPut("k", b"abc")) + b"\x00")


@pytest.mark.parametrize("size", range(ENVELOPE.size))
def test_too_short_for_an_envelope(size: int) -> None:
    with pytest.raises(ProtocolError, match=r"too short"):
        decode(encode(m.Ok())[:size])


def test_header_length_beyond_the_frame() -> None:
    frame = bytearray(encode(m.KvsGet("k")))
    struct.pack_into(">I", frame, 6, 10_000)
    with pytest.raises(ProtocolError, match=r"header length 10000 exceeds the frame"):
        decode(bytes(frame))


@pytest.mark.parametrize("head", [b"[1,", b"\xff\xfe", b"nope", b"[" * 5000])
def test_header_not_json(head: bytes) -> None:
    frame = ENVELOPE.pack(10, 0, 0, len(head)) + head
    with pytest.raises(ProtocolError, match=r"KvsGet: header"):
        decode(frame)


KVSGET_FIELDS = len(attrs.fields(m.KvsGet))


@pytest.mark.parametrize("header", [
    {}, "k", None, ["k"] * (KVSGET_FIELDS - 1), ["k"] * (KVSGET_FIELDS + 1),
], ids=["dict", "str", "null", "short", "long"])
def test_header_wrong_shape(header: Any) -> None:
    with pytest.raises(ProtocolError,
                       match=rf"KvsGet: header must be a list of {KVSGET_FIELDS} fields"):
        decode(join(10, 0, 0, header))


def test_truncated_blob_length() -> None:
    frame = encode(m.KvsPut("k", b"abcdef"))
    with pytest.raises(ProtocolError, match=r"KvsPut.lattice: truncated blob length"):
        decode(frame[:-8])


def test_blob_longer_than_the_frame() -> None:
    frame = encode(m.KvsPut("k", b"abcdef"))
    with pytest.raises(ProtocolError, match=r"KvsPut.lattice: blob of 6 bytes exceeds"):
        decode(frame[:-1])


def test_blob_count_larger_than_the_frame_is_refused_before_reading() -> None:
    tag, flags, request_id, header, tail = split(encode(m.CallDag("f", True, ["f"], [b"x"])))
    header[3] = 10**9
    with pytest.raises(ProtocolError, match=r"CallDag.arg_blobs: bad blob count"):
        decode(join(tag, flags, request_id, header, tail))


def test_missing_blobs() -> None:
    tag, flags, request_id, header, tail = split(encode(m.CallDag("f", True, ["f"], [b"x"])))
    header[3] = 3
    with pytest.raises(ProtocolError, match=r"CallDag.arg_blobs"):
        decode(join(tag, flags, request_id, header, tail))


def test_encode_is_decode_inverse_for_bytes_with_any_content() -> None:
    blob = bytes(range(256)) * 10
    msg = m.KvsUpdate("k", blob)
    assert decode(encode(msg))[0].lattice == blob


# --------------------------------------------------------------------------- values

VALUES = [
    None, True, False, 0, 1, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**40, -(10**40),
    0.0, -2.5, 1e300, math.inf, -math.inf, "", "text", "ünïcode ☃ \U0001f600", "\ud800",
    b"", b"\x00\xff" * 100, [], [1, "a", None, [b"x", [2.5]]], {}, {"a": 1, 2: [3], b"k": None},
    {"nested": {"deep": [{"x": [1, 2, {"y": b"z"}]}]}},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_values_round_trip(value: Any) -> None:
    back = values.loads(values.dumps(value))
    assert back == value
    assert type(back) is type(value)


def test_values_nan_round_trip() -> None:
    assert math.isnan(values.loads(values.dumps(math.nan)))


def test_values_tuples_become_lists_and_bytes_likes_bytes() -> None:
    assert values.loads(values.dumps((1, (2, 3)))) == [1, [2, 3]]
    assert values.loads(values.dumps(bytearray(b"ab"))) == b"ab"
    assert values.loads(values.dumps(memoryview(b"cd"))) == b"cd"


@pytest.mark.parametrize("value", [object(), {1, 2}, 1j, frozenset()], ids=repr)
def test_values_refuse_non_plain_data(value: Any) -> None:
    with pytest.raises(TypeError, match=r"cannot encode .* as plain data"):
        values.dumps(value)


def test_values_refuse_deep_nesting_when_encoding() -> None:
    deep: Any = []
    for _ in range(values.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValueError, match=r"nested deeper"):
        values.dumps(deep)


def test_values_refuse_deep_nesting_when_decoding() -> None:
    data = b"l\x00\x00\x00\x01" * (values.MAX_DEPTH + 5) + b"N"
    with pytest.raises(ProtocolError, match=r"nested too deeply"):
        values.loads(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", r"truncated"),
        (b"N\x00", r"1 trailing bytes"),
        (b"Z", r"unknown value tag 0x5a"),
        (b"s\x00\x00\x00\x10abc", r"declared length 16 exceeds"),
        (b"b\xff\xff\xff\xff", r"declared length"),
        (b"l\xff\xff\xff\xff", r"declared count"),
        (b"d\x00\x00\x00\x01l\x00\x00\x00\x00N", r"dict key must be a scalar"),
        (b"i\x00\x00", r"malformed"),
        (b"s\x00\x00\x00\x01\xff", r"malformed"),
        (b"l\x00\x00\x00\x02N", r"declared count 2 exceeds the 1 bytes left"),
        (b"d\x00\x00\x00\x01N", r"truncated"),
    ],
)
def test_values_garbage_is_protocol_error(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        values.loads(data)


# --------------------------------------------------------------------------- field values


def _trigger(**changes: Any) -> m.Trigger:
    base = m.Trigger(
        "run-1", "b", ["a", "b"], ["v1", "v2"], ["tcp://e1", "tcp://e2"], [["a", "b"]],
        ["a"], [b"args"], "a", b"result", False, "rk", None, False, "NORMAL", None, None, "")
    return attrs.evolve(base, **changes)


@pytest.mark.parametrize(("msg", "complaint"), [
    (_trigger(function="zzz"), "function 'zzz' is not in the run"),
    (_trigger(source="zzz"), "source 'zzz' is not in the run"),
    (_trigger(edges=[["a", "nope"]]), "is not a pair of the run's functions"),
    (_trigger(edges=[["a", "b", "c"]]), "is not a pair"),
    (_trigger(placement=["tcp://e1"]), "2 functions but 2 versions and 1 placements"),
    (_trigger(versions=[]), "2 functions but 0 versions"),
    (_trigger(arg_fns=["a", "b"]), "2 arg_fns but 1 arg_blobs"),
    (_trigger(arg_fns=["x"]), "arguments for 'x'"),
    (_trigger(source=None), "a result needs a source"),
    (_trigger(causal=b"garbage"), "Trigger.causal"),
    (_trigger(deadline=math.inf), "Trigger.deadline"),
    (m.CallDag("f", True, ["f"], []), "1 arg_fns but 0 arg_blobs"),
    (m.PlaceCall("f", True, ["k"] * (m.MAX_CALL_REFERENCES + 1)), "PlaceCall: more than"),
    (m.CallPlaced("f", True, ["f"], ["v"], [], ["tcp://e"], 2.0, 2), "preferred must be 0..1"),
    (m.PlaceCall("f", True, [], 0), "PlaceCall.calls must be at least 1"),
    (m.CallPlaced("f", True, ["f"], ["v"], [], [], 2.0, -1), "preferred must be 0..0"),
    (m.CallDag("f", True, [], [], causal=b"\xff\x00"), "CallDag.causal"),
    (m.CallDag("f", True, [], [], timeout=-1.0), "CallDag.timeout"),
    (m.CallDag("f", True, [], [], timeout=1e300), "CallDag.timeout"),
    (m.CallDag("f", True, [], [], timeout=10**400), "CallDag.timeout"),
    (m.KvsGet("k", math.nan), "NaN"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_field_values_that_do_not_fit_together_are_refused_at_decode(
        msg: Any, complaint: str) -> None:
    """Regression: a garbage causal context or a trigger naming a function not in its
    run passed decode and killed the executor that acted on it."""
    with pytest.raises(m.InvalidMessage, match=re.escape(complaint)) as info:
        decode(encode(msg, 7))
    assert info.value.request_id == 7 and not info.value.is_reply


@pytest.mark.parametrize("around", [(b" ", b""), (b"", b"\n "), (b"\t", b" ")])
def test_a_header_with_whitespace_around_it_still_decodes(around: tuple[bytes, bytes]) -> None:
    """Our encoder writes none, but JSON allows it: the full decoder reads it."""
    msg = m.DagResult("run", b"value", False)
    payload = encode(msg, 3, True)
    tag, flags, rid, size = wire._ENVELOPE.unpack_from(payload)
    start = wire._ENVELOPE.size
    head = around[0] + payload[start:start + size] + around[1]
    assert decode(wire._ENVELOPE.pack(tag, flags, rid, len(head)) + head
                  + payload[start + size:]) == (msg, 3, True)


@pytest.mark.parametrize("head", [b'["run",0,false]]', b'["run",0,false] x', b"x", b"",
                                  b'["run",0,'])
def test_a_header_with_anything_after_the_json_is_refused(head: bytes) -> None:
    payload = wire._ENVELOPE.pack(27, 1, 3, len(head)) + head + struct.pack(">I", 1) + b"v"
    with pytest.raises(ProtocolError, match="not valid JSON"):
        decode(payload)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_the_header_is_the_json_the_standard_encoder_writes(msg: Any) -> None:
    """encode_gather's cached C encoder writes byte for byte what json.dumps does."""
    payload = encode(msg, 9, True)
    _, _, _, size = wire._ENVELOPE.unpack_from(payload)
    header = json.loads(payload[wire._ENVELOPE.size:wire._ENVELOPE.size + size])
    assert payload[wire._ENVELOPE.size:wire._ENVELOPE.size + size] == json.dumps(
        header, separators=(",", ":"), ensure_ascii=False).encode()


def test_a_header_value_json_cannot_write_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        encode(m.DeleteDag(object()))  # type: ignore[arg-type]
    assert decode(encode(m.DeleteDag("d"))) == (m.DeleteDag("d"), 0, False)  # still fine
