"""A compact, self-describing binary encoding of plain data.

This is the wire form of message bodies and lattice frames. It carries only
``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, lists (tuples encode
as lists) and dicts, so decoding peer bytes can never run code: user objects
travel as opaque ``bytes`` (pickled by the layer that owns them).

The decoder treats its input as hostile: every length is checked against the
bytes actually present before anything is sliced, nesting depth is bounded,
and every failure is a :class:`~droplet.errors.ProtocolError`.

>>> loads(dumps({"a": [1, 2.5, b"x", None, True]}))
{'a': [1, 2.5, b'x', None, True]}
"""

from __future__ import annotations

import struct
from typing import Any

from ..errors import ProtocolError

__all__ = ["MAX_DEPTH", "dumps", "loads"]

MAX_DEPTH = 32

_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")
_U32 = struct.Struct(">I")
_pack_i64 = _I64.pack
_pack_f64 = _F64.pack
_pack_u32 = _U32.pack
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def dumps(obj: Any) -> bytes:
    """Encode plain data. Raises ``TypeError`` for anything else (our misuse)."""
    out: list[bytes] = []
    _encode(obj, out.append, 0)
    return b"".join(out)


def _encode(obj: Any, emit: Any, depth: int) -> None:
    t = type(obj)
    if t is str:
        raw = obj.encode("utf-8", "surrogatepass")
        emit(b"s" + _pack_u32(len(raw)))
        emit(raw)
    elif t is bytes or t is bytearray or t is memoryview:
        raw = bytes(obj)
        emit(b"b" + _pack_u32(len(raw)))
        emit(raw)
    elif t is int:
        if _INT_MIN <= obj <= _INT_MAX:
            emit(b"i" + _pack_i64(obj))
        else:
            raw = obj.to_bytes((obj.bit_length() + 8) // 8, "big", signed=True)
            emit(b"I" + _pack_u32(len(raw)))
            emit(raw)
    elif obj is None:
        emit(b"N")
    elif obj is True:
        emit(b"T")
    elif obj is False:
        emit(b"F")
    elif t is float:
        emit(b"f" + _pack_f64(obj))
    elif t is list or t is tuple:
        if depth >= MAX_DEPTH:
            raise ValueError(f"plain data nested deeper than {MAX_DEPTH} levels")
        emit(b"l" + _pack_u32(len(obj)))
        for item in obj:
            _encode(item, emit, depth + 1)
    elif t is dict:
        if depth >= MAX_DEPTH:
            raise ValueError(f"plain data nested deeper than {MAX_DEPTH} levels")
        emit(b"d" + _pack_u32(len(obj)))
        for key, value in obj.items():
            _encode(key, emit, depth + 1)
            _encode(value, emit, depth + 1)
    else:
        raise TypeError(
            f"cannot encode {t.__qualname__} as plain data; "
            "pickle it into bytes first (only None/bool/int/float/str/bytes/list/dict travel)"
        )


def loads(data: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Decode bytes produced by :func:`dumps`; anything else is a ``ProtocolError``."""
    try:
        value, end = _decode(data, 0, max_depth)
    except ProtocolError:
        raise
    except (struct.error, UnicodeDecodeError, TypeError, ValueError, IndexError) as exc:
        raise ProtocolError(f"malformed value encoding: {exc}") from exc
    if end != len(data):
        raise ProtocolError(f"{len(data) - end} trailing bytes after encoded value")
    return value


def _decode(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    if pos >= len(data):
        raise ProtocolError("truncated value encoding")
    tag = data[pos]
    pos += 1
    if tag == 0x73 or tag == 0x62 or tag == 0x49:  # s, b, I: length-prefixed
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        end = pos + n
        if end > len(data):
            raise ProtocolError(f"declared length {n} exceeds the {len(data) - pos} bytes left")
        raw = data[pos:end]
        if tag == 0x73:
            return raw.decode("utf-8", "surrogatepass"), end
        if tag == 0x62:
            return bytes(raw), end
        return int.from_bytes(raw, "big", signed=True), end
    if tag == 0x69:  # i
        return _I64.unpack_from(data, pos)[0], pos + 8
    if tag == 0x4E:  # N
        return None, pos
    if tag == 0x54:  # T
        return True, pos
    if tag == 0x46:  # F
        return False, pos
    if tag == 0x66:  # f
        return _F64.unpack_from(data, pos)[0], pos + 8
    if tag == 0x6C or tag == 0x64:  # l, d
        if depth <= 0:
            raise ProtocolError("value nested too deeply")
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        # Every element takes at least one byte: refuse counts the data cannot hold
        # before building anything.
        if n > len(data) - pos:
            raise ProtocolError(f"declared count {n} exceeds the {len(data) - pos} bytes left")
        if tag == 0x6C:
            items = []
            for _ in range(n):
                item, pos = _decode(data, pos, depth - 1)
                items.append(item)
            return items, pos
        result = {}
        for _ in range(n):
            key, pos = _decode(data, pos, depth - 1)
            if type(key) in (list, dict):
                raise ProtocolError("dict key must be a scalar")
            result[key], pos = _decode(data, pos, depth - 1)
        return result, pos
    raise ProtocolError(f"unknown value tag 0x{tag:02x}")
