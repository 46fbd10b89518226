"""Turning cached encodings into the values functions receive, copying as little as possible.

A cached value is an encoded lattice (:mod:`droplet.lattices.codec`). For the
common case, a last-writer-wins value stored with ``put_object``,
:func:`lww_payload` finds the pickled user value inside the encoding without
copying it, so a value mapped from shared memory is unpickled straight from
the mapping (the only copy is the one ``pickle`` makes to build the object).

:class:`DecodedValues` then keeps the decoded object of *immutable* values
(bytes, str, numbers, small tuples of those: see
:func:`droplet.executor.copies.is_immutable`) keyed by ``(key, version)``, and
hands the same object to every later reader of that version: a warm read of a
10 MiB ``bytes`` value copies nothing. A numpy array (of plain, non-object
elements) is made read-only and shared the same way, as Ray does: a function
that wants to change it copies it first (``array.copy()``). Other mutable
values (lists, dicts, bytearrays) are unpickled again for every reader, so
each invocation still gets its private copy.
"""

from __future__ import annotations

import pickle
import struct
import threading
from collections import OrderedDict
from typing import Any

from .copies import is_immutable
from .user_library import reveal_stored

__all__ = ["DEFAULT_DECODED_BYTES", "DecodedValues", "decode_value", "lww_payload", "shareable"]

#: Bytes of decoded immutable values one process keeps (about their pickled size).
DEFAULT_DECODED_BYTES = 256 * 1024 * 1024

# ["LWW", timestamp, writer, value] in droplet.protocol.values' encoding.
_LWW_HEAD = b"l\x00\x00\x00\x04s\x00\x00\x00\x03LWWi"
_U32 = struct.Struct(">I")


def lww_payload(data: bytes | memoryview) -> memoryview | None:
    """The pickled value inside an encoded LWW lattice, as a view (no copy); else None.

    >>> from droplet.lattices import LWWLattice, RAW, encode_lattice
    >>> bytes(lww_payload(encode_lattice(LWWLattice(1, b"pickle"), dump=RAW)))
    b'pickle'
    >>> lww_payload(b"not a lattice") is None
    True
    """
    view = memoryview(data)
    head = len(_LWW_HEAD)
    if view[:head] != _LWW_HEAD:
        return None
    pos = head + 8  # the timestamp
    if len(view) < pos + 5 or view[pos] != 0x73:  # s: the writer
        return None
    (n,) = _U32.unpack_from(view, pos + 1)
    pos += 5 + n
    if len(view) < pos + 5 or view[pos] != 0x62:  # b: the value
        return None
    (n,) = _U32.unpack_from(view, pos + 1)
    pos += 5
    if pos + n != len(view):
        return None
    return view[pos:pos + n]


def shareable(value: Any) -> bool:
    """Whether every reader may get ``value`` itself: immutable, or a numpy array made so.

    A numpy array of plain elements is set read-only here (it was just
    decoded, so nobody else holds it yet).
    """
    if is_immutable(value):
        return True
    kind = type(value)
    if kind.__name__ == "ndarray" and kind.__module__ == "numpy" \
            and not value.dtype.hasobject:
        value.flags.writeable = False
        return True
    return False


def decode_value(data: bytes | memoryview | None, deserialize: bool = True) -> Any:
    """What a function receives for a stored encoding (as ``reveal_stored``), minimal copies."""
    if data is None:
        return None
    if deserialize:
        payload = lww_payload(data)
        if payload is not None:
            return pickle.loads(payload)
    return reveal_stored(bytes(data), deserialize)


class DecodedValues:
    """Decoded immutable values by ``(key, version)``, bounded in bytes (LRU)."""

    def __init__(self, max_bytes: int = DEFAULT_DECODED_BYTES) -> None:
        self.max_bytes = max_bytes
        self._values: OrderedDict[str, tuple[int, Any, int]] = OrderedDict()
        self.bytes = 0
        # Worker threads read (sync ``lib.get``) while the event loop decodes.
        self._lock = threading.Lock()
        #: reads answered with an already decoded object (no unpickling).
        self.hits = 0

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: str, version: int) -> tuple[bool, Any]:
        """``(True, value)`` when ``key`` at ``version`` was decoded and kept."""
        found = self._values.get(key)
        if found is None or found[0] != version:
            return False, None
        with self._lock:
            self.hits += 1
            if key in self._values:
                self._values.move_to_end(key)
        return True, found[1]

    def decode(self, key: str, version: int, data: bytes | memoryview) -> Any:
        """Decode ``data`` (``key`` at ``version``); keep the value when it is immutable."""
        return self.keep(key, version, decode_value(data), len(data))

    def keep(self, key: str, version: int, value: Any, size: int) -> Any:
        """Keep ``value`` (``key`` at ``version``, about ``size`` bytes) if it is shareable."""
        if size <= self.max_bytes and shareable(value):
            with self._lock:
                self._forget(key)
                self._values[key] = (version, value, size)
                self.bytes += size
                while self.bytes > self.max_bytes and self._values:
                    _, (_, _, gone) = self._values.popitem(last=False)
                    self.bytes -= gone
        return value

    def forget(self, key: str) -> None:
        with self._lock:
            self._forget(key)

    def _forget(self, key: str) -> None:
        found = self._values.pop(key, None)
        if found is not None:
            self.bytes -= found[2]

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self.bytes = 0
