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
  the function receives. A ``Gather`` whose pieces are all ``bytes`` (or views
  of ``bytes``: a big ``bytes`` argument's out-of-band form) is passed as it
  is: nobody can change it, and a ``bytes`` value is then rebuilt as the very
  same object (:func:`~droplet.serialization.loads`), no copy at all. List and
  dict fields are copied (shallowly; their items are immutable), so neither end
  can change the other's message.
- **Validation.** :func:`unpack` checks every field's type against the class's
  annotations and runs the class's checks, as :func:`~droplet.protocol.messages.decode`
  does, so a bad value never reaches a service. Values that do not fit
  together are the same :class:`~droplet.protocol.messages.InvalidMessage`
  either way; a field of the wrong type is one too (the request is refused,
  the connection kept), where in a frame it is a ProtocolError that closes
  the connection (a frame that lies about its types may lie about more).
- **Limits.** ``len(parcel)`` is the size of its values plus the envelope, so a
  connection's ``max_frame_size`` still refuses an oversize value.

Pure code: no trio, no I/O (STYLE.md 4).
"""

from __future__ import annotations

from typing import Any

from ..errors import ProtocolError
from .encoding import _VALIDATORS, InvalidMessage, _Schema
from .framing import Gather, all_immutable

__all__ = ["ENVELOPE_BYTES", "Parcel", "pack", "unpack"]

#: What ``len()`` counts for a parcel's envelope and non-value fields (the
#: binary envelope plus a typical JSON header).
ENVELOPE_BYTES = 64


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
        if view_ok and all_immutable(value):  # pickle + views of bytes: nothing can change
            return value, value.nbytes
        data = bytes(value)
        return data, len(data)
    if kind is bytearray:
        data = bytes(value)
        return data, len(data)
    return value, 0  # not a value: unpack's type check names it


def _own_list(values: Any, view_ok: bool) -> tuple[Any, int]:
    if type(values) is not list and type(values) is not tuple:
        return values, 0  # unpack's type check names it
    owned = []
    size = 0
    for value in values:
        value, n = _own(value, view_ok)
        owned.append(value)
        size += n
    return owned, size


def _copy_nested(value: Any) -> Any:
    if type(value) is not list and type(value) is not tuple:
        return value
    return [list(x) if type(x) is list or type(x) is tuple else x for x in value]


# Per message class, generated once (as attrs generates its methods): straight
# attribute reads and type tests, no per-field function calls, which on this
# path cost more than the encoding they replace.

_TYPE_TESTS = {
    "str": "type({v}) is str",
    "int": "type({v}) is int",
    "bool": "type({v}) is bool",
    "float": "type({v}) is float or type({v}) is int",
    "str | None": "{v} is None or type({v}) is str",
    "int | None": "{v} is None or type({v}) is int",
    "float | None": "{v} is None or type({v}) is float or type({v}) is int",
    "list[str]": "type({v}) is list and all([type(x) is str for x in {v}])",
    "list[int]": "type({v}) is list and all([type(x) is int for x in {v}])",
    "list[list[str]]": ("type({v}) is list and all([type(x) is list and "
                        "all([type(y) is str for y in x]) for x in {v}])"),
    "dict[str, int]": "type({v}) is dict and all([type(x) is int for x in {v}.values()])",
    "bytes": "type({v}) is bytes",
    "bytes | None": "{v} is None or type({v}) is bytes",
    "list[bytes]": "type({v}) is list and all([type(x) is bytes for x in {v}])",
    # the same kinds in a Blob field (a big value may stay a view)
    "view:bytes": "type({v}) is bytes or type({v}) is memoryview or type({v}) is Gather",
    "view:bytes | None": ("{v} is None or type({v}) is bytes or type({v}) is memoryview "
                          "or type({v}) is Gather"),
    "view:list[bytes]": ("type({v}) is list and all([type(x) is bytes or type(x) is "
                         "memoryview or type(x) is Gather for x in {v}])"),
}


def _compile(schema: _Schema) -> tuple[Any, Any]:
    """``(pack, check)`` for one message class (see :func:`pack`, :func:`unpack`)."""
    cls = schema.cls
    fields = list(zip(schema.names, schema.kinds, strict=True))
    lines = ["def pack(msg, request_id=0, reply=False):", "    size = ENVELOPE_BYTES",
             "    changed = False"]
    always = False  # a list or dict field: always a new message with copies
    for i, (name, kind) in enumerate(fields):
        v = f"v{i}"
        view = name in schema.views
        lines.append(f"    {v} = msg.{name}")
        if kind in ("bytes", "bytes | None"):
            if kind == "bytes":
                lines.append(f"    if type({v}) is bytes:")
                lines.append(f"        size += len({v})")
            else:
                lines.append(f"    if {v} is None:")
                lines.append("        pass")
                lines.append(f"    elif type({v}) is bytes:")
                lines.append(f"        size += len({v})")
            lines.append("    else:")
            lines.append(f"        {v}, n = _own({v}, {view})")
            lines.append("        size += n")
            lines.append("        changed = True")
        elif kind == "list[bytes]":
            lines.append(f"    {v}, n = _own_list({v}, {view})")
            lines.append("    size += n")
            always = True
        elif kind == "list[list[str]]":
            lines.append(f"    {v} = _copy_nested({v})")
            always = True
        elif kind.startswith("list["):
            lines.append(f"    if type({v}) is list:")
            lines.append(f"        {v} = {v}[:]")
            # a tuple travels as a list, as JSON would carry it
            lines.append(f"    elif type({v}) is tuple:")
            lines.append(f"        {v} = list({v})")
            always = True
        elif kind.startswith("dict["):
            lines.append(f"    if type({v}) is dict:")
            lines.append(f"        {v} = {v}.copy()")
            always = True
    args = ", ".join(f"v{i}" for i in range(len(fields)))
    if not always:
        lines.append("    if not changed:")
        lines.append("        return Parcel(msg, request_id, reply, size)")
    lines.append(f"    return Parcel(cls({args}), request_id, reply, size)")
    lines.append("")
    lines.append("def check(msg):")
    for name, kind in fields:
        key = f"view:{kind}" if name in schema.views else kind
        test = _TYPE_TESTS[key].format(v="v")
        lines.append(f"    v = msg.{name}")
        lines.append(f"    if not ({test}):")
        lines.append(f"        return {name!r}, {kind!r}, v")
    lines.append("    return None")
    namespace: dict[str, Any] = {
        "ENVELOPE_BYTES": ENVELOPE_BYTES, "Parcel": Parcel, "_own": _own,
        "_own_list": _own_list, "_copy_nested": _copy_nested, "cls": cls, "Gather": Gather,
    }
    exec(compile("\n".join(lines), f"<parcel {cls.__name__}>", "exec"), namespace)
    return namespace["pack"], namespace["check"]


_CODE: dict[type[Any], tuple[Any, Any]] = {}


def _code(cls: type[Any]) -> tuple[Any, Any]:
    code = _CODE.get(cls)
    if code is None:
        schema: _Schema | None = getattr(cls, "_schema", None)
        if schema is None or schema.cls is not cls:
            raise TypeError(f"{cls.__name__} is not a Droplet message")
        code = _CODE[cls] = _compile(schema)
    return code


def pack(msg: Any, request_id: int = 0, reply: bool = False) -> Parcel:
    """A :class:`Parcel` of ``msg`` that shares nothing mutable with the caller.

    Fields are copied only where they must be (see the module docstring); a
    message of immutable fields is sent as it is.
    """
    code = _CODE.get(type(msg))
    if code is None:
        code = _code(type(msg))
    parcel: Parcel = code[0](msg, request_id, reply)
    return parcel


def unpack(parcel: Parcel) -> tuple[Any, int, bool]:
    """``(message, request_id, is_reply)``, validated as :func:`decode` validates.

    Raises :class:`~droplet.protocol.messages.InvalidMessage` for a field of
    the wrong type or values that do not fit together, exactly as a frame
    with those values would.
    """
    msg = parcel.msg
    cls = type(msg)
    code = _CODE.get(cls)
    if code is None:
        try:
            code = _code(cls)
        except TypeError as exc:
            raise InvalidMessage(str(exc), parcel.request_id, parcel.reply) from None
    wrong = code[1](msg)
    if wrong is not None:
        name, kind, value = wrong
        raise InvalidMessage(f"{cls.__name__}.{name} must be {kind}, "
                             f"got {type(value).__name__}", parcel.request_id, parcel.reply)
    validate = _VALIDATORS.get(cls)
    if validate is not None:
        try:
            validate(msg)
        except ProtocolError as exc:
            raise InvalidMessage(str(exc), parcel.request_id, parcel.reply) from None
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            # A check tripped over a value: still a bad value, never a crash.
            raise InvalidMessage(f"{cls.__name__}: {type(exc).__name__}: {exc}",
                                 parcel.request_id, parcel.reply) from None
    return msg, parcel.request_id, parcel.reply
