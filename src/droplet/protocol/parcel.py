"""Messages that cross as Python objects: the encoding-free ``inproc://`` mode.

Inside one process an ``inproc://`` connection may carry a :class:`Parcel` (a
message object, its request id and reply flag) instead of an encoded frame,
skipping the JSON header, the blob framing and the decoder. Only the
*envelope* encoding is skipped; the semantics stay those of the wire:

- **Isolation.** Values (pickled arguments and results) are ``bytes``, which
  nobody can change; a value that is a view of someone's buffer (a
  :class:`~droplet.protocol.framing.Gather` of a pickle's out-of-band buffers,
  a writable ``memoryview``) is copied into ``bytes`` here, as a socket would
  copy it, so a caller changing its object after the call never changes what
  the function receives. List and dict fields are copied (shallowly; their
  items are immutable), so neither end can change the other's message.
- **Validation.** :func:`unpack` checks every field's type against the class's
  annotations and runs the class's checks, as :func:`~droplet.protocol.messages.decode`
  does: a bad value is the same :class:`~droplet.protocol.messages.InvalidMessage`
  either way, and never reaches a service.
- **Limits.** ``len(parcel)`` is the size of its values plus the envelope, so a
  connection's ``max_frame_size`` still refuses an oversize value.

Pure code: no trio, no I/O (STYLE.md 4).
"""

from __future__ import annotations

from typing import Any

from ..errors import ProtocolError
from .framing import Gather
from .messages import _VALIDATORS, InvalidMessage, _Schema

__all__ = ["ENVELOPE_BYTES", "Parcel", "pack", "unpack"]

#: What ``len()`` counts for a parcel's envelope and non-value fields (the
#: binary envelope plus a typical JSON header).
ENVELOPE_BYTES = 64

_BYTES = (bytes,)
_VIEWABLE = (bytes, memoryview)


class Parcel:
    """One message in flight as an object: ``(msg, request_id, reply)``.

    ``len()`` is the bytes its values take (plus :data:`ENVELOPE_BYTES`), which
    transports compare with ``max_frame_size`` as they would a frame's length.
    """

    __slots__ = ("msg", "nbytes", "reply", "request_id")

    def __init__(self, msg: Any, request_id: int, reply: bool, nbytes: int) -> None:
        self.msg = msg
        self.request_id = request_id
        self.reply = reply
        self.nbytes = nbytes

    def __len__(self) -> int:
        return self.nbytes

    def __repr__(self) -> str:
        kind = "reply" if self.reply else "message"
        return (f"<Parcel {kind} {type(self.msg).__name__} #{self.request_id}, "
                f"{self.nbytes} bytes>")


def _own(value: Any, view_ok: bool) -> tuple[Any, int]:
    """``value`` as immutable ``bytes`` (or an immutable view), and its size."""
    kind = type(value)
    if kind is bytes:
        return value, len(value)
    if kind is memoryview:
        if view_ok and value.readonly and type(value.obj) is bytes:  # immutable
            return value, value.nbytes
        data = value.tobytes()
        return data, len(data)
    if kind is Gather:
        data = bytes(value)
        return data, len(data)
    if kind is bytearray:
        data = bytes(value)
        return data, len(data)
    return value, 0  # not a value: unpack's type check names it


def pack(msg: Any, request_id: int = 0, reply: bool = False) -> Parcel:
    """A :class:`Parcel` of ``msg`` that shares nothing mutable with the caller.

    Fields are copied only where they must be (see the module docstring); a
    message of immutable fields is sent as it is.
    """
    schema: _Schema = msg._schema
    size = 0
    changed: dict[str, Any] | None = None
    for _, name, kind in schema.blob_fields:
        value = getattr(msg, name)
        if value is None:
            continue
        if kind == "list[bytes]":
            if type(value) is not list:
                continue  # unpack's type check names it
            owned = []
            view_ok = name in schema.views
            for item in value:
                item, n = _own(item, view_ok)
                owned.append(item)
                size += n
            new: Any = owned
        else:
            new, n = _own(value, name in schema.views)
            size += n
            if new is value:
                continue
        if changed is None:
            changed = {}
        changed[name] = new
    for i, name, _ in schema.header_fields:
        value = getattr(msg, name)
        kind = type(value)
        if kind is list:
            if schema.kinds[i] == "list[list[str]]":
                new = [list(x) if type(x) is list else x for x in value]
            else:
                new = list(value)
        elif kind is dict:
            new = dict(value)
        else:
            continue
        if changed is None:
            changed = {}
        changed[name] = new
    if changed is not None:
        # A new instance: frozen attrs classes are not ours to change in place.
        msg = _evolve(msg, schema, changed)
    return Parcel(msg, request_id, reply, size + ENVELOPE_BYTES)


def _evolve(msg: Any, schema: _Schema, changed: dict[str, Any]) -> Any:
    values = [changed[name] if name in changed else getattr(msg, name)
              for name in schema.names]
    new = object.__new__(type(msg))
    for name, value in zip(schema.names, values, strict=True):
        object.__setattr__(new, name, value)
    return new


def unpack(parcel: Parcel) -> tuple[Any, int, bool]:
    """``(message, request_id, is_reply)``, validated as :func:`decode` validates.

    Raises :class:`~droplet.protocol.messages.InvalidMessage` for a field of
    the wrong type or values that do not fit together, exactly as a frame
    with those values would.
    """
    msg = parcel.msg
    schema: _Schema | None = getattr(msg, "_schema", None)
    if schema is None:
        raise InvalidMessage(f"{type(msg).__name__} is not a Droplet message",
                             parcel.request_id, parcel.reply)
    for i, name, check in schema.header_fields:
        value = getattr(msg, name)
        if not check(value):
            raise InvalidMessage(
                f"{schema.cls.__name__}.{name} must be {schema.kinds[i]}, "
                f"got {type(value).__name__}", parcel.request_id, parcel.reply)
    for _, name, kind in schema.blob_fields:
        value = getattr(msg, name)
        allowed = _VIEWABLE if name in schema.views else _BYTES
        if kind == "list[bytes]":
            ok = type(value) is list and all(type(x) in allowed for x in value)
        elif value is None:
            ok = kind.endswith("| None")
        else:
            ok = type(value) in allowed
        if not ok:
            raise InvalidMessage(f"{schema.cls.__name__}.{name} must be {kind}, "
                                 f"got {type(value).__name__}", parcel.request_id, parcel.reply)
    validate = _VALIDATORS.get(type(msg))
    if validate is not None:
        try:
            validate(msg)
        except ProtocolError as exc:
            raise InvalidMessage(str(exc), parcel.request_id, parcel.reply) from None
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            # A check tripped over a value: still a bad value, never a crash.
            raise InvalidMessage(f"{schema.cls.__name__}: {type(exc).__name__}: {exc}",
                                 parcel.request_id, parcel.reply) from None
    return msg, parcel.request_id, parcel.reply
