"""Numpy arrays in shared memory: pickle protocol 5 with out-of-band buffers.

A value stored with ``put_object`` is an ordinary (in-band) pickle: unpickling
a 10 MiB array copies its 10 MiB. When the node cache writes such a value into
a shared-memory segment for its worker processes, it lays it out instead as a
protocol-5 pickle stream plus the arrays' raw buffers (:func:`out_of_band`);
a worker then unpickles it with those buffers taken straight from its
read-only mapping (:func:`load_out_of_band`), so each array is a read-only
view of the one copy the node holds: no copy at all, in any worker.

Only numpy arrays give out-of-band buffers (``bytes`` and ``bytearray`` are
always in-band in CPython's pickle), so only values that look like numpy are
converted.

This is the one place a Droplet server process unpickles a user's value, an
exception to "storage never unpickles user values": the node process of an
all-in-one node (which also runs the store and the scheduler) does it, when a
worker process first asks for a cached value of ``SEGMENT_THRESHOLD`` bytes or
more that is a last-writer-wins ``put_object`` value whose pickle names
``numpy`` in its first 64 bytes. It is loaded (importing numpy into the node on
first use) with an unpickler that resolves no global but these, each narrowed:

- ``numpy.ndarray``: only as ``_reconstruct``'s argument, never called;
- ``_reconstruct``: only as numpy pickles an array, ``(ndarray, (0,), code)``,
  allocating nothing (the array's state then brings its data, which numpy
  checks against the shape);
- ``numpy.dtype``: any dtype but one holding Python objects;
- ``_frombuffer``: a view of bytes the pickle itself holds.

No other code runs, memory grows with the pickle's size only, and a layout whose
buffers add up to more bytes than the pickle had is refused. Anything refused,
or failing, is kept as it is (in-band, unpickled by the worker only).
"""

from __future__ import annotations

import functools
import io
import pickle
import struct
from typing import Any

__all__ = ["load_out_of_band", "out_of_band"]

_MAGIC = b"DOOB"
_HEAD = struct.Struct(">4sIQ")  # magic, buffer count, stream length
_LEN = struct.Struct(">Q")
_ALIGN = 64
#: The globals a numpy array's pickle needs (numpy 1.x and 2.x names).
_ALLOWED = frozenset({
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
})
#: How far into a pickle a top-level numpy array names its module.
_SNIFF = 64


class _ArrayType:
    """What ``numpy.ndarray`` resolves to here: an argument of ``_reconstruct``, never
    a callable (called, ``ndarray(shape, dtype)`` would allocate whatever it is told)."""


_ARRAY = _ArrayType()


def _reconstruct(real: Any, subtype: Any, shape: Any, typecode: Any) -> Any:
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') and then its
    # state, whose data numpy checks against the shape: refuse anything else.
    if subtype is not _ARRAY or shape != (0,):
        raise pickle.UnpicklingError("not a numpy array's pickle (_reconstruct)")
    import numpy

    return real(numpy.ndarray, (0,), typecode)


def _plain_dtype(*args: Any) -> Any:
    import numpy

    dtype = numpy.dtype(*args)
    if dtype.hasobject:  # Python objects: nothing to share, and no user code here
        raise pickle.UnpicklingError("an array of Python objects is not loaded here")
    return dtype


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"not a numpy array: {module}.{name}")
        found = super().find_class(module, name)
        if name == "ndarray":
            return _ARRAY
        if name == "_reconstruct":
            return functools.partial(_reconstruct, found)
        if name == "dtype":
            return _plain_dtype
        return found  # _frombuffer: a view of bytes the pickle itself holds


def _pad(n: int) -> bytes:
    return bytes(-n % _ALIGN)


def out_of_band(payload: bytes | memoryview) -> list[bytes | memoryview] | None:
    """The parts of the out-of-band layout of a pickled numpy array, or None.

    None when ``payload`` is not a pickle of numpy arrays only (then the value
    is kept as it is). Write the parts one after the other (no join, no copy).
    """
    if b"numpy" not in bytes(memoryview(payload)[:_SNIFF]):
        return None
    try:
        value = _NumpyOnly(io.BytesIO(payload)).load()
        buffers: list[pickle.PickleBuffer] = []
        stream = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        views = [b.raw() for b in buffers]
    except Exception:  # anything else (or a non-contiguous array): keep it in-band
        return None
    if not views or sum(len(v) for v in views) > len(payload):
        return None  # nothing to share, or more than the pickle held (never legitimately)
    head = _HEAD.pack(_MAGIC, len(views), len(stream))
    lengths = b"".join(_LEN.pack(len(v)) for v in views)
    parts: list[bytes | memoryview] = [head, lengths, stream]
    used = len(head) + len(lengths) + len(stream)
    for view in views:
        parts.append(_pad(used))
        used += -used % _ALIGN
        parts.append(view)
        used += len(view)
    return parts


def load_out_of_band(data: bytes | memoryview) -> Any:
    """Unpickle an out-of-band layout; arrays are views of ``data`` (read-only if it is).

    Raises ValueError when ``data`` is not such a layout.
    """
    view = memoryview(data)
    if len(view) < _HEAD.size:
        raise ValueError("too short for an out-of-band layout")
    magic, count, size = _HEAD.unpack_from(view)
    if magic != _MAGIC:
        raise ValueError("not an out-of-band layout")
    pos = _HEAD.size
    lengths = [_LEN.unpack_from(view, pos + 8 * i)[0] for i in range(count)]
    pos += 8 * count
    stream = view[pos:pos + size]
    pos += size
    buffers = []
    for n in lengths:
        pos += -pos % _ALIGN
        if pos + n > len(view):
            raise ValueError("an out-of-band buffer runs past the end of its segment")
        buffers.append(view[pos:pos + n])
        pos += n
    return pickle.loads(stream, buffers=buffers)
