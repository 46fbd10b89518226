"""How a message class becomes bytes and back (its messages: :mod:`droplet.protocol.messages`).


A message is a frozen attrs class registered under a one-byte tag. On the wire
(inside one frame)::

    u8 tag | u8 flags | u32 request id | u32 header length | header | blobs

The header is a JSON array of the message's non-``bytes`` fields in order
(C-accelerated in both directions, which matters on every hop); ``bytes``
fields travel after it as ``u32 length | raw`` blobs, so pickled arguments and
lattice frames are never base64'd or copied through a parser. A
``list[bytes]`` field puts its element count in the header.

Big blobs are never copied here: :func:`encode_gather` returns a message with
one as a :class:`~droplet.protocol.framing.Gather` of the header and the
blobs' own buffers, and :func:`decode` of a big frame (a ``memoryview``)
leaves the pickled values of a call (:data:`Blob` fields) as views into it.

Decoding validates every field's type against the class's annotations, so a
well-formed frame with wrong field types is a ProtocolError here and never
reaches a service.
"""

from __future__ import annotations

import functools
import json
import operator
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from ..errors import ProtocolError
from .framing import BIG_FRAME, Buffer, Gather, Payload

__all__ = ["FLAG_REPLY", "MESSAGES", "Blob", "InvalidMessage", "decode", "encode",
           "encode_gather", "message"]

FLAG_REPLY = 0x01
_ENVELOPE = struct.Struct(">BBII")
_U32 = struct.Struct(">I")
def _join_chunks(chunks: Callable[[Any, int], Any], header: Any) -> str:
    return "".join(chunks(header, 0))


_json_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_json_encode = _json_encoder.encode
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
#: A header's JSON text: what ``_json_encode`` runs inside, made once instead of
#: per call (no circular-reference markers: a header is lists of plain values).
_json_header: Callable[[Any], str] = _json_encode
if _c_make_encoder is not None:
    _header_chunks = _c_make_encoder(None, _json_encoder.default, json.encoder.encode_basestring,
                                     None, ":", ",", False, False, True)
    _json_header = functools.partial(_join_chunks, _header_chunks)
_json_decoder = json.JSONDecoder()
_json_decode = _json_decoder.decode
#: The decoder's own scanner (C): a header as our encoder writes it (no
#: whitespace around it) is read with no Python frames in between; anything
#: else goes through ``_json_decode``, which says what is wrong.
_json_scan: Callable[[str, int], tuple[Any, int]] = getattr(_json_decoder, "scan_once")  # noqa: B009 - not in the stubs

MESSAGES: dict[int, type[Any]] = {}
T = TypeVar("T")

#: A field holding a pickled call value (an argument list, a result): read
#: only by ``serialization.loads`` or passed on as it is, so a big one decodes to
#: a read-only ``memoryview`` of the frame instead of a copy, and may be sent
#: as a :class:`~droplet.protocol.framing.Gather` (a pickle with out-of-band
#: buffers). Every ``bytes`` field decodes to ``bytes``.
Blob = bytes | memoryview | Gather

_BLOB_KINDS = {"bytes", "bytes | None", "list[bytes]"}
#: Field kinds that may decode to views (see :data:`Blob`).
VIEW_KINDS = frozenset({"Blob", "Blob | None", "list[Blob]"})
#: Blobs smaller than this are copied out as ``bytes`` even in a ``Blob`` field.
VIEW_MIN = 64 * 1024


def _is_str_list(v: Any) -> bool:
    return type(v) is list and all(type(x) is str for x in v)


def _check(kind: str) -> Callable[[Any], bool]:
    return {
        "str": lambda v: type(v) is str,
        "int": lambda v: type(v) is int,
        "bool": lambda v: type(v) is bool,
        "float": lambda v: type(v) in (float, int),
        "str | None": lambda v: v is None or type(v) is str,
        "int | None": lambda v: v is None or type(v) is int,
        "float | None": lambda v: v is None or type(v) in (float, int),
        "list[str]": _is_str_list,
        "list[int]": lambda v: type(v) is list and all(type(x) is int for x in v),
        "list[list[str]]": lambda v: type(v) is list and all(_is_str_list(x) for x in v),
        "dict[str, int]": lambda v: type(v) is dict
        and all(type(x) is int for x in v.values()),
    }[kind]


#: The type test of each header field kind, as an expression on ``v`` (see
#: :func:`_compile_checks`); the same tests as :func:`_check`, inlined.
_CHECK_EXPR = {
    "str": "type(v) is str",
    "int": "type(v) is int",
    "bool": "type(v) is bool",
    "float": "type(v) is float or type(v) is int",
    "str | None": "v is None or type(v) is str",
    "int | None": "v is None or type(v) is int",
    "float | None": "v is None or type(v) is float or type(v) is int",
    "list[str]": "type(v) is list and _STR.issuperset(map(type, v))",
    "list[int]": "type(v) is list and _INT.issuperset(map(type, v))",
    "list[list[str]]": "type(v) is list and all(type(x) is list and "
                       "_STR.issuperset(map(type, x)) for x in v)",
    "dict[str, int]": "type(v) is dict and _INT.issuperset(map(type, v.values()))",
}


def _compile_checks(fields: list[tuple[int, str, Callable[[Any], bool]]],
                    kinds: list[str]) -> Callable[[list[Any]], int]:
    """One function testing every header field of a full-length header, inline:
    the index of the first field of the wrong type, or -1. (A call per field
    costs more than the tests on a small machine, and every message pays it.)"""
    lines = ["def check(h):"]
    for i, _, _ in fields:
        lines += [f"    v = h[{i}]", f"    if not ({_CHECK_EXPR[kinds[i]]}):",
                  f"        return {i}"]
    lines.append("    return -1")
    namespace: dict[str, Any] = {"_STR": frozenset({str}), "_INT": frozenset({int})}
    exec("\n".join(lines), namespace)  # noqa: S102 - our own field kinds, no input
    check: Callable[[list[Any]], int] = namespace["check"]
    return check


class _Schema:
    __slots__ = ("blob_at", "blob_fields", "check_all", "checks", "cls", "kinds", "names",
                 "header_fields", "min_fields", "tag", "values", "views")

    def __init__(self, cls: type[Any], tag: int) -> None:
        self.cls = cls
        self.tag = tag
        fields = attrs.fields(cls)
        self.names = [f.name for f in fields]
        #: an older peer may leave out the last OPTIONAL_TAIL fields (their defaults).
        self.min_fields = len(self.names) - getattr(cls, "OPTIONAL_TAIL", 0)
        # A Blob field is a bytes field on the wire; it only decodes differently.
        self.kinds = [str(f.type).replace("Blob", "bytes") for f in fields]
        self.views = frozenset(f.name for f in fields if str(f.type) in VIEW_KINDS)
        self.header_fields = [
            (i, name, _check(kind))
            for i, (name, kind) in enumerate(zip(self.names, self.kinds, strict=True))
            if kind not in _BLOB_KINDS
        ]
        self.blob_fields = [
            (i, name, kind)
            for i, (name, kind) in enumerate(zip(self.names, self.kinds, strict=True))
            if kind in _BLOB_KINDS]
        self.check_all = _compile_checks(self.header_fields, self.kinds)
        #: the blob fields' kinds by index (encode)
        self.blob_at = {i: kind for i, _, kind in self.blob_fields}
        #: a message's field values, in order, as a tuple (one C call)
        self.values: Callable[[Any], tuple[Any, ...]]
        if len(self.names) > 1:
            self.values = operator.attrgetter(*self.names)
        elif self.names:
            self.values = functools.partial(_one_value, self.names[0])
        else:
            self.values = _no_values


def _one_value(name: str, msg: Any) -> tuple[Any, ...]:
    return (getattr(msg, name),)


def _no_values(msg: Any) -> tuple[Any, ...]:
    return ()


def message(tag: int) -> Callable[[type[T]], type[T]]:
    """Register a frozen attrs class as the message with wire tag ``tag``."""

    def register(cls: type[T]) -> type[T]:
        if tag in MESSAGES:
            raise ValueError(f"message tag {tag} already used by {MESSAGES[tag].__name__}")
        schema = _Schema(cls, tag)
        cls._schema = schema  # type: ignore[attr-defined]
        MESSAGES[tag] = cls
        return cls

    return register


def encode(msg: Any, request_id: int = 0, reply: bool = False) -> bytes:
    """Encode a message into one frame payload (without the length prefix)."""
    payload = encode_gather(msg, request_id, reply)
    return payload if type(payload) is bytes else bytes(payload)


def encode_gather(msg: Any, request_id: int = 0, reply: bool = False) -> Payload:
    """:func:`encode`, but a message with big blobs comes back as a
    :class:`~droplet.protocol.framing.Gather` of its pieces instead of joined.

    A blob may itself be a ``Gather`` (a pickled value with out-of-band
    buffers) or a ``memoryview``; either is written as it is.
    """
    schema: _Schema = msg._schema
    values = schema.values(msg)
    header: Any = values  # a tuple is a JSON array too
    blobs: list[Buffer | Gather] = []
    if schema.blob_fields:
        blob_at = schema.blob_at
        header = []
        for i, value in enumerate(values):
            kind = blob_at.get(i)
            if kind is None:
                header.append(value)
            elif kind == "list[bytes]":
                header.append(len(value))
                blobs.extend(value)
            elif value is None:
                header.append(None)
            else:
                header.append(0)
                blobs.append(value)
    head = _json_header(header).encode("utf-8")
    parts: list[Buffer] = [
        _ENVELOPE.pack(schema.tag, FLAG_REPLY if reply else 0, request_id, len(head)), head]
    size = 0
    for blob in blobs:
        if isinstance(blob, Gather):
            parts.append(_U32.pack(blob.nbytes))
            parts.extend(blob.parts)
            size += blob.nbytes
        else:
            n = blob.nbytes if type(blob) is memoryview else len(blob)
            parts.append(_U32.pack(n))
            parts.append(blob)
            size += n
    if size >= BIG_FRAME:
        return Gather(parts)
    return b"".join(parts)


def decode(payload: bytes | memoryview) -> tuple[Any, int, bool]:
    """Decode one frame payload into ``(message, request_id, is_reply)``.

    In a big frame (a read-only ``memoryview`` from a socket, or ``bytes``)
    the big values of :data:`Blob` fields stay views of it, and every other
    blob is copied out as ``bytes``.

    Anything that is not a valid message raises ProtocolError naming the problem.
    """
    size = payload.nbytes if type(payload) is memoryview else len(payload)
    if size < _ENVELOPE.size:
        raise ProtocolError(f"frame of {size} bytes is too short for a message envelope")
    tag, flags, request_id, head_len = _ENVELOPE.unpack_from(payload)
    cls = MESSAGES.get(tag)
    if cls is None:
        raise ProtocolError(f"unknown message type {tag}")
    schema: _Schema = cls._schema
    pos = _ENVELOPE.size
    end = pos + head_len
    if end > size:
        raise ProtocolError(f"{cls.__name__}: header length {head_len} exceeds the frame")
    try:
        text = str(payload[pos:end], "utf-8")
        try:
            header, stop = _json_scan(text, 0)
        except StopIteration:
            stop = -1
        if stop != len(text):  # whitespace around it, or not JSON: the full decoder
            header = _json_decode(text)
        if "\\u" in text:
            # A "\udXXX" escape can smuggle a lone surrogate into a str, which no
            # reply could carry back (encode would raise): refuse it here.
            _json_encode(header).encode("utf-8")
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{cls.__name__}: header is not valid JSON ({exc})") from None
    blob_fields = schema.blob_fields
    if type(header) is list and len(header) == len(schema.names):
        bad = schema.check_all(header)
        if bad >= 0:
            raise ProtocolError(
                f"{cls.__name__}.{schema.names[bad]} must be {schema.kinds[bad]}, "
                f"got {type(header[bad]).__name__}"
            )
    else:
        if (type(header) is not list
                or not schema.min_fields <= len(header) < len(schema.names)):
            raise ProtocolError(
                f"{cls.__name__}: header must be a list of {len(schema.names)} fields"
            )
        # an older peer's message: the fields it leaves out keep their defaults
        blob_fields = [f for f in blob_fields if f[0] < len(header)]
        for i, name, check in schema.header_fields:
            if i < len(header) and not check(header[i]):
                raise ProtocolError(
                    f"{cls.__name__}.{name} must be {schema.kinds[i]}, "
                    f"got {type(header[i]).__name__}"
                )
    pos = end
    if size >= BIG_FRAME and type(payload) is bytes:
        payload = memoryview(payload)  # big blobs as views of these (immutable) bytes
    is_view = type(payload) is memoryview
    for i, name, kind in blob_fields:
        marker = header[i]
        keep = is_view and name in schema.views
        if kind[0] == "l":  # list[bytes], list[Blob]
            if type(marker) is not int or marker < 0 or marker > size:
                raise ProtocolError(f"{cls.__name__}.{name}: bad blob count {marker!r}")
            items = []
            for _ in range(marker):
                blob, pos = _take_blob(payload, pos, cls, name, keep)
                items.append(blob)
            header[i] = items
        elif marker is None and kind.endswith("| None"):
            continue
        elif marker == 0 and type(marker) is int:
            header[i], pos = _take_blob(payload, pos, cls, name, keep)
        else:
            raise ProtocolError(f"{cls.__name__}.{name} must be {kind}")
    if pos != size:
        raise ProtocolError(f"{cls.__name__}: {size - pos} trailing bytes")
    msg = cls(*header)
    validate = _VALIDATORS.get(cls)
    if validate is not None:
        try:
            validate(msg)
        except ProtocolError as exc:
            raise InvalidMessage(str(exc), request_id, bool(flags & FLAG_REPLY)) from None
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            # A check tripped over a value: still the peer's bad value, never a crash.
            raise InvalidMessage(f"{cls.__name__}: {type(exc).__name__}: {exc}", request_id,
                                 bool(flags & FLAG_REPLY)) from None
    return msg, request_id, bool(flags & FLAG_REPLY)


class InvalidMessage(ProtocolError):
    """A well-framed message whose field values do not fit together.

    Unlike garbage, it leaves the stream intact: the receiver answers the
    request (``request_id``) with this error, or drops a one-way message, and
    keeps the connection.
    """

    def __init__(self, message: str, request_id: int, is_reply: bool) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.is_reply = is_reply


#: Checks beyond field types (lengths that must agree, names that must exist),
#: run on every decoded message of the class: a service never sees one that fails.
_VALIDATORS: dict[type[Any], Callable[[Any], None]] = {}


def _validator(cls: type[Any]) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    def register(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        _VALIDATORS[cls] = fn
        return fn

    return register


def _take_blob(payload: bytes | memoryview, pos: int, cls: type[Any], name: str,
               keep_view: bool) -> tuple[bytes | memoryview, int]:
    """The blob at ``pos``: a view of a big frame only for a big value in a view field."""
    size = len(payload)  # a frame's memoryview is one-dimensional bytes
    if pos + 4 > size:
        raise ProtocolError(f"{cls.__name__}.{name}: truncated blob length")
    (n,) = _U32.unpack_from(payload, pos)
    pos += 4
    if pos + n > size:
        raise ProtocolError(f"{cls.__name__}.{name}: blob of {n} bytes exceeds the frame")
    blob = payload[pos : pos + n]
    if type(blob) is memoryview and not (keep_view and n >= VIEW_MIN):
        return bytes(blob), pos + n
    return blob, pos + n
