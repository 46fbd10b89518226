"""How user objects become bytes: cloudpickle out, pickle in.

Only authenticated peers' bytes are ever unpickled (see the Security page):
the wire layer itself never unpickles; user values travel as opaque blobs.

Call arguments and results go through :func:`dumps_value`, which keeps big
buffers out of the pickle (pickle protocol 5, out-of-band buffers): a big
``bytes``/``bytearray`` argument or result, or a NumPy array anywhere in one,
is not copied into the pickle stream but travels next to it, as its own piece
of a :class:`~droplet.protocol.framing.Gather` that the socket writes as it
is. Such a value's wire form (its *out-of-band form*) is::

    u8 0 | u32 buffers | u32 stream length | per buffer: u64 length, u8 read-only
         | pickle stream | buffer | buffer ...

(its integers little-endian, unlike the big-endian frame and message envelope).

A plain pickle starts with the ``PROTO`` opcode (``0x80``), never ``0``, so
:func:`loads` takes either form. On the receiving side the buffers are views
of the received frame: a read-only one (``bytes``) is copied once into the
rebuilt object, a writable one (``bytearray``, a writable array) is first
copied into a private ``bytearray``, so every function still gets its own,
writable-as-before copy.
"""

from __future__ import annotations

import pickle
import re
import struct
from typing import Any

import cloudpickle

from .protocol.framing import Buffer, Gather, immutable

__all__ = ["OUT_OF_BAND_MIN", "dumps", "dumps_code", "dumps_value", "loads", "mentions"]

#: Buffers at least this big travel out of band (smaller ones are cheaper to copy).
OUT_OF_BAND_MIN = 64 * 1024
_HEAD = struct.Struct("<BII")
_BUF = struct.Struct("<QB")


def dumps(obj: Any) -> bytes:
    """Serialize a user object (functions, closures, values).

    Plain data goes through the C pickler (about 8x faster than cloudpickle's
    Python subclass, and it is on every call's path); anything it refuses, or
    that refers to ``__main__`` (which the executor cannot import), goes
    through cloudpickle, which pickles such code by value.
    """
    if not callable(obj):
        try:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            pass
        else:
            if b"__main__" not in data:
                return data
    return dumps_code(obj)


def dumps_code(obj: Any) -> bytes:
    """Serialize with cloudpickle only: for functions and classes being registered.

    Code always takes this path so that cloudpickle decides by-value versus
    by-reference (``cloudpickle.register_pickle_by_value`` is honoured).
    """
    try:
        data = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(f"cannot serialize {type(obj).__name__} object: {exc}") from exc
    assert isinstance(data, bytes)
    return data


class _Raw:
    """Stands in for a big ``bytes``/``bytearray`` so that it pickles out of band
    (the C pickler writes those two types in-band, whatever the protocol)."""

    __slots__ = ("data", "kind")

    def __init__(self, data: bytes | bytearray, kind: type) -> None:
        self.data = data
        self.kind = kind

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Read-only either way: ``bytearray(view)`` is already the one private copy.
        return self.kind, (pickle.PickleBuffer(memoryview(self.data).toreadonly()),)


_immutable = immutable


def _whole_bytes(view: Buffer) -> Buffer:
    """The ``bytes`` object ``view`` (immutable, see :func:`_immutable`) shows all
    of, else ``view`` itself."""
    obj: Any = view
    while type(obj) is memoryview:
        obj = obj.obj
    if type(obj) is bytes and (type(view) is bytes or (
            view.nbytes == len(obj) and view.c_contiguous)):  # type: ignore[union-attr]
        return obj
    return view


def _is_big_raw(value: Any) -> bool:
    kind = type(value)
    return (kind is bytes or kind is bytearray) and len(value) >= OUT_OF_BAND_MIN


def _raw(value: bytes | bytearray, snapshot: bool) -> _Raw:
    kind = type(value)
    return _Raw(bytes(value) if snapshot and kind is bytearray else value, kind)


def _lift(obj: Any, snapshot: bool) -> Any:
    """``obj`` with its big ``bytes``/``bytearray`` (itself, or the items of a
    list or tuple) wrapped to pickle out of band; the same object repeated stays
    one object."""
    if _is_big_raw(obj):
        return _raw(obj, snapshot)
    kind = type(obj)
    if (kind is list or kind is tuple) and any(_is_big_raw(v) for v in obj) \
            and not any(v is obj for v in obj):
        wrapped: dict[int, _Raw] = {}
        return kind(wrapped.setdefault(id(v), _raw(v, snapshot)) if _is_big_raw(v) else v
                    for v in obj)
    return obj


def dumps_value(obj: Any, *, snapshot: bool = False) -> bytes | Gather:
    """:func:`dumps` for a call's arguments or result: big buffers out of band.

    Returns plain pickle ``bytes`` when nothing big is in ``obj``, else the
    out-of-band form as a :class:`~droplet.protocol.framing.Gather` whose
    pieces are the header, the pickle stream and the buffers themselves:
    views of immutable ``bytes`` as they are, and of writable buffers (a
    ``bytearray``, an array, even a read-only view of one) too unless
    ``snapshot``, which copies those (once)
    for a sender that cannot promise nobody changes them before the message is
    written (an executor, whose function may keep a result it returned).
    """
    buffers: list[tuple[Buffer, bool]] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: in band
            return True
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True
        readonly = raw.readonly
        buffers.append((raw.tobytes() if snapshot and not _immutable(raw) else raw, readonly))
        return False

    target = _lift(obj, snapshot)
    data: bytes | None = None
    if not callable(obj):
        try:
            data = pickle.dumps(target, protocol=5, buffer_callback=out_of_band)
        except Exception:
            data = None
        else:
            if b"__main__" in data:
                data = None
    if data is None:
        buffers.clear()
        try:
            data = cloudpickle.dumps(target, protocol=5, buffer_callback=out_of_band)
        except Exception as exc:
            raise TypeError(f"cannot serialize {type(obj).__name__} object: {exc}") from exc
    assert isinstance(data, bytes)
    if not buffers:
        return data
    head = [_HEAD.pack(0, len(buffers), len(data))]
    head += [_BUF.pack(len(b), readonly) for b, readonly in buffers]
    return Gather([b"".join(head), data, *(b for b, _ in buffers)])


def _split(blob: Buffer, private: bool = True) -> tuple[memoryview, list[Buffer]]:
    """The pickle stream and the buffers of a value in out-of-band form
    (``private``: writable buffers copied, as the unpickled value's own)."""
    view = memoryview(blob)
    try:
        _, count, stream_len = _HEAD.unpack_from(view)
        pos = _HEAD.size
        if count * _BUF.size > len(view) - pos:  # before reading (and keeping) each one
            raise pickle.UnpicklingError(
                f"out-of-band value of {len(view)} bytes cannot hold {count} buffers")
        sizes = []
        for _ in range(count):
            sizes.append(_BUF.unpack_from(view, pos))
            pos += _BUF.size
    except struct.error as exc:
        raise pickle.UnpicklingError(f"truncated out-of-band value: {exc}") from None
    stream = view[pos:pos + stream_len]
    pos += stream_len
    buffers: list[Buffer] = []
    for size, readonly in sizes:
        buffer = view[pos:pos + size]
        pos += size
        buffers.append(buffer if readonly or not private else bytearray(buffer))
    if pos != len(view):
        raise pickle.UnpicklingError(
            f"out-of-band value of {len(view)} bytes does not match its header ({pos})")
    return stream, buffers


def loads(blob: Buffer | Gather) -> Any:
    """Unpickle a value: plain pickle bytes, or the out-of-band form of :func:`dumps_value`
    (received as bytes or a view of the frame, or still the ``Gather`` made in this
    process)."""
    if isinstance(blob, Gather):  # not sent: made in this process, in pieces
        head, stream, *buffers = blob.parts
        flags = [_BUF.unpack_from(head, _HEAD.size + i * _BUF.size)[1]
                 for i in range(len(buffers))]
        # Shared as they are only if the value rebuilt from them cannot see a
        # change: immutable bytes, or our own views of a bytes/bytearray (which
        # bytes()/bytearray() copy); anything else (an array) gets its own copy.
        # A view of a whole ``bytes`` object is handed over as that object:
        # ``bytes(b) is b``, so a big ``bytes`` value is rebuilt without a copy.
        return pickle.loads(stream, buffers=[
            _whole_bytes(b) if readonly and _immutable(b)
            else b if readonly and type(getattr(b, "obj", None)) is memoryview
            else bytearray(b)
            for b, readonly in zip(buffers, flags, strict=True)])
    if len(blob) and blob[0] == 0:
        stream, buffers = _split(blob)
        return pickle.loads(stream, buffers=buffers)
    return pickle.loads(blob)


def mentions(blob: Buffer | Gather, needle: bytes) -> bool:
    """Whether a pickled value's stream contains ``needle`` (a class name, say),
    without copying a big value to look (out-of-band buffers are raw data and
    are not searched). Conservative: never raises, and a malformed value
    "mentions" everything."""
    if isinstance(blob, Gather):
        return needle in blob.parts[1]
    if len(blob) and blob[0] == 0:
        try:
            blob = _split(blob, private=False)[0]
        except pickle.UnpicklingError:
            return True  # malformed: "maybe" (loads, later, says what is wrong)
    if type(blob) is bytes:
        return needle in blob
    return re.search(re.escape(needle), blob) is not None
