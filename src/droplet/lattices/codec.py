"""The wire form of lattices: plain data around opaque user-value bytes.

A lattice frame is one :mod:`droplet.protocol.values` encoding of a list whose
first item is the lattice's ``type_name``::

    ["LWW", timestamp, writer, value]
    ["Set", [element, ...]]            ["OrderedSet", [element, ...]]
    ["Max", number]                    ["Priority", priority, value]
    ["VectorClock", {node: counter}]
    ["Map", {key: <nested lattice list>}]
    ["SingleKeyCausal", [[{node: counter}, [value, ...]], ...]]
    ["MultiKeyCausal", [[{node: counter}, {key: {node: counter}}, [value, ...]], ...]]

Structure (timestamps, writers, clocks, numbers, map keys) is plain data, so
the frame itself is never pickled and decoding it can never run code. Only
user values (``value``, ``element``) are bytes, made by a ``dump`` function
(cloudpickle by default) and read back by ``load``.

Raw mode (``dump=RAW`` / ``load=RAW``) keeps user values as those bytes: the
storage server decodes, merges and re-encodes lattices without unpickling
anything. Encodings are canonical (elements sorted by their bytes, map keys,
clock entries and causal versions sorted), so equal lattices encode to equal
bytes and a raw decode followed by a raw encode returns a canonical input
unchanged; the store uses that to tell whether a put changed anything.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle

from ..errors import ProtocolError
from ..protocol import values
from .base import Lattice
from .causal import (
    MultiKeyCausalLattice,
    SingleKeyCausalLattice,
    VectorClock,
    clock_order,
)
from .lww import LWWLattice
from .maps import MapKey, MapLattice, check_map_key, map_key_order
from .priority import PriorityLattice
from .sets import MaxLattice, OrderedSetLattice, SetLattice

__all__ = ["MAX_CAUSAL_VERSIONS", "RAW", "decode_lattice", "encode_lattice", "lattice_type_name"]

MAX_CAUSAL_VERSIONS = 1024
"""Most concurrent versions a decoded causal lattice may carry.

Pruning versions compares clocks pairwise, so a hostile frame with millions of
versions would stall the storage server. Real keys hold a handful: one per
writer that raced without seeing the others.
"""

Dump = Callable[[Any], bytes]
Load = Callable[[bytes], Any]


def RAW(value: Any) -> bytes:  # noqa: N802 (a marker constant that is also a function)
    """The identity codec: user values are already their bytes.

    Pass it as ``dump`` or ``load`` to work in raw mode. As a ``dump`` it
    refuses anything but ``bytes``, which catches a Python-mode lattice handed
    to raw-mode code.
    """
    if type(value) is not bytes:
        raise TypeError(
            f"raw mode holds user values as bytes, not {type(value).__name__}; "
            "encode Python values with a dump function (the default pickles them)"
        )
    return value


def _default_dump(value: Any) -> bytes:
    data: bytes = cloudpickle.dumps(value)
    return data


# --------------------------------------------------------------------------- encoding


def encode_lattice(lattice: Lattice, dump: Dump = _default_dump) -> bytes:
    """The canonical wire bytes of ``lattice``.

    Args:
        lattice: any lattice from this package.
        dump: turns each user value into bytes; :data:`RAW` when the values
            already are bytes. Defaults to ``cloudpickle.dumps``.

    Raises:
        TypeError: not a lattice, or ``dump`` failed or returned non-bytes.
        ValueError: maps nested deeper than the plain-value encoding allows.
    """
    return values.dumps(_to_plain(lattice, dump))


def _to_plain(lattice: Lattice, dump: Dump) -> list[Any]:
    encoder = _ENCODERS.get(type(lattice))
    if encoder is None:
        raise TypeError(f"cannot encode {type(lattice).__name__}: not a droplet lattice")
    return [lattice.type_name, *encoder(lattice, dump)]


def _dump_one(value: Any, dump: Dump) -> bytes:
    data = dump(value)
    if type(data) is not bytes:
        raise TypeError(f"dump returned {type(data).__name__}, not bytes")
    return data


def _dump_many(items: Iterable[Any], dump: Dump) -> list[bytes]:
    return sorted({_dump_one(item, dump) for item in items})


def _plain_clock(clock: VectorClock) -> dict[str, int]:
    return clock.reveal()  # already sorted by node id


def _plain_map(entries: Iterable[tuple[MapKey, Any]]) -> dict[MapKey, Any]:
    return dict(sorted(entries, key=lambda item: map_key_order(item[0])))


def _plain_deps(deps: MapLattice) -> dict[MapKey, Any]:
    # MultiKeyCausalLattice only ever builds dependency maps of VectorClocks.
    return _plain_map((key, _plain_clock(dep)) for key, dep in deps.items())  # type: ignore[arg-type]


def _enc_lww(lat: LWWLattice, dump: Dump) -> list[Any]:
    return [lat.timestamp, lat.writer, _dump_one(lat.value, dump)]


def _enc_set(lat: SetLattice | OrderedSetLattice, dump: Dump) -> list[Any]:
    return [_dump_many(lat.elements, dump)]


def _enc_max(lat: MaxLattice, dump: Dump) -> list[Any]:
    return [lat.value]


def _enc_priority(lat: PriorityLattice, dump: Dump) -> list[Any]:
    return [lat.priority, _dump_one(lat.value, dump)]


def _enc_clock(lat: VectorClock, dump: Dump) -> list[Any]:
    return [_plain_clock(lat)]


def _enc_map(lat: MapLattice, dump: Dump) -> list[Any]:
    return [_plain_map((key, _to_plain(value, dump)) for key, value in lat.items())]


def _enc_single(lat: SingleKeyCausalLattice, dump: Dump) -> list[Any]:
    versions = sorted(lat.versions.items(), key=lambda item: clock_order(item[0]))
    return [[[_plain_clock(clock), _dump_many(vals, dump)] for clock, vals in versions]]


def _enc_multi(lat: MultiKeyCausalLattice, dump: Dump) -> list[Any]:
    versions = sorted(lat.versions.items(), key=lambda item: clock_order(item[0]))
    return [
        [
            [
                _plain_clock(clock),
                _plain_deps(deps),
                _dump_many(vals, dump),
            ]
            for clock, (deps, vals) in versions
        ]
    ]


_ENCODERS: dict[type[Lattice], Callable[[Any, Dump], list[Any]]] = {
    LWWLattice: _enc_lww,
    SetLattice: _enc_set,
    OrderedSetLattice: _enc_set,
    MaxLattice: _enc_max,
    PriorityLattice: _enc_priority,
    VectorClock: _enc_clock,
    MapLattice: _enc_map,
    SingleKeyCausalLattice: _enc_single,
    MultiKeyCausalLattice: _enc_multi,
}


# --------------------------------------------------------------------------- decoding


def decode_lattice(data: bytes, load: Load = pickle.loads) -> Lattice:
    """Decode a lattice frame from a peer, validating every field.

    Args:
        data: bytes from :func:`encode_lattice`, or anything a hostile peer sent.
        load: turns each user value's bytes back into a value; :data:`RAW`
            keeps the bytes (the storage server never unpickles). Defaults to
            ``pickle.loads``, which runs code: use it only on trusted data.

    Raises:
        ProtocolError: ``data`` is not a valid lattice encoding, including
            well-formed plain data of the wrong shape, or ``load`` failed.
        TypeError: ``data`` is not bytes-like (our misuse, not the peer's).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decode_lattice needs bytes, not {type(data).__name__}")
    plain = values.loads(bytes(data))
    try:
        return _from_plain(plain, load)
    except ProtocolError:
        raise
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        # Constructor validation (an unorderable OrderedSet element, a negative
        # counter) of peer data is the peer's fault, not ours.
        raise ProtocolError(f"invalid lattice encoding: {exc}") from exc


def _from_plain(plain: Any, load: Load) -> Lattice:
    if type(plain) is not list or not plain or type(plain[0]) is not str:
        raise ProtocolError("a lattice encodes as a list that starts with its type name")
    entry = _DECODERS.get(plain[0])
    if entry is None:
        raise ProtocolError(f"unknown lattice type {plain[0]!r}")
    arity, decoder = entry
    if len(plain) != arity + 1:
        raise ProtocolError(f"a {plain[0]} lattice has {arity} field(s), not {len(plain) - 1}")
    return decoder(plain[1:], load)


def _expect(value: Any, kind: type, what: str) -> Any:
    if type(value) is not kind:
        raise ProtocolError(f"{what} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _number(value: Any, what: str) -> int | float:
    if type(value) is not int and type(value) is not float:
        raise ProtocolError(f"{what} must be an int or float, not {type(value).__name__}")
    if value != value:
        raise ProtocolError(f"{what} is NaN")
    return value


def _load_one(raw: Any, load: Load, what: str) -> Any:
    _expect(raw, bytes, what)
    if load is RAW:
        return raw
    try:
        return load(raw)
    except Exception as exc:  # a user codec can fail in any way on hostile bytes
        raise ProtocolError(f"cannot load {what}: {type(exc).__name__}: {exc}") from exc


def _load_many(raw: Any, load: Load, what: str) -> list[Any]:
    return [_load_one(item, load, what) for item in _expect(raw, list, f"{what} list")]


def _clock(raw: Any) -> VectorClock:
    counters = _expect(raw, dict, "vector clock")
    for node, count in counters.items():
        _expect(node, str, "vector clock node id")
        _expect(count, int, f"counter of node {node!r}")
    return VectorClock(counters)


def _dec_lww(fields: list[Any], load: Load) -> Lattice:
    timestamp = _expect(fields[0], int, "LWW timestamp")
    writer = _expect(fields[1], str, "LWW writer")
    return LWWLattice(timestamp, _load_one(fields[2], load, "LWW value"), writer)


def _dec_set(fields: list[Any], load: Load) -> Lattice:
    return SetLattice(_load_many(fields[0], load, "set element"))


def _dec_ordered_set(fields: list[Any], load: Load) -> Lattice:
    return OrderedSetLattice(_load_many(fields[0], load, "ordered set element"))


def _dec_max(fields: list[Any], load: Load) -> Lattice:
    return MaxLattice(_number(fields[0], "Max value"))


def _dec_priority(fields: list[Any], load: Load) -> Lattice:
    priority = _number(fields[0], "priority")
    return PriorityLattice(priority, _load_one(fields[1], load, "priority value"))


def _dec_clock(fields: list[Any], load: Load) -> Lattice:
    return _clock(fields[0])


def _dec_map(fields: list[Any], load: Load) -> Lattice:
    entries: dict[MapKey, Lattice] = {}
    for key, value in _expect(fields[0], dict, "map entries").items():
        try:
            check_map_key(key)
        except TypeError as exc:
            raise ProtocolError(str(exc)) from None
        entries[key] = _from_plain(value, load)
    return MapLattice(entries)


def _version(raw: Any, size: int, what: str) -> list[Any]:
    version: list[Any] = _expect(raw, list, what)
    if len(version) != size:
        raise ProtocolError(f"{what} has {len(version)} fields, not {size}")
    return version


def _causal_versions(raw: Any) -> list[Any]:
    versions: list[Any] = _expect(raw, list, "causal versions")
    if len(versions) > MAX_CAUSAL_VERSIONS:
        raise ProtocolError(
            f"{len(versions)} causal versions exceed MAX_CAUSAL_VERSIONS={MAX_CAUSAL_VERSIONS}"
        )
    return versions


def _dec_single(fields: list[Any], load: Load) -> Lattice:
    versions = []
    for raw in _causal_versions(fields[0]):
        clock, vals = _version(raw, 2, "causal version")
        versions.append((_clock(clock), _load_many(vals, load, "causal value")))
    return SingleKeyCausalLattice.from_versions(versions)


def _dec_multi(fields: list[Any], load: Load) -> Lattice:
    versions = []
    for raw in _causal_versions(fields[0]):
        clock, deps, vals = _version(raw, 3, "causal version")
        dependencies: dict[MapKey, VectorClock] = {}
        for key, dep in _expect(deps, dict, "causal dependencies").items():
            try:
                check_map_key(key)
            except TypeError as exc:
                raise ProtocolError(str(exc)) from None
            dependencies[key] = _clock(dep)
        versions.append((_clock(clock), dependencies, _load_many(vals, load, "causal value")))
    return MultiKeyCausalLattice.from_versions(versions)


_DECODERS: dict[str, tuple[int, Callable[[list[Any], Load], Lattice]]] = {
    "LWW": (3, _dec_lww),
    "Set": (1, _dec_set),
    "OrderedSet": (1, _dec_ordered_set),
    "Max": (1, _dec_max),
    "Priority": (2, _dec_priority),
    "VectorClock": (1, _dec_clock),
    "Map": (1, _dec_map),
    "SingleKeyCausal": (1, _dec_single),
    "MultiKeyCausal": (1, _dec_multi),
}


# --------------------------------------------------------------------------- type sniffing

_U32 = struct.Struct(">I")
_LIST_TAG, _STR_TAG = ord("l"), ord("s")
_MAX_NAME = max(len(name) for name in _DECODERS)


def lattice_type_name(data: bytes) -> str:
    """The ``type_name`` of an encoded lattice, read from the first bytes only.

    Lets the store report a type mismatch (or route by type) without decoding
    a large frame. Only the prefix is checked: a valid name followed by garbage
    passes here and fails in :func:`decode_lattice`.

    Raises:
        ProtocolError: the prefix is not a list starting with a known type name.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"lattice_type_name needs bytes, not {type(data).__name__}")
    head = bytes(data[: 10 + _MAX_NAME])
    if len(head) < 10 or head[0] != _LIST_TAG or head[5] != _STR_TAG:
        raise ProtocolError("not a lattice encoding (expected a list starting with a type name)")
    (count,) = _U32.unpack_from(head, 1)
    (size,) = _U32.unpack_from(head, 6)
    name = head[10 : 10 + size]
    if count < 1 or size > _MAX_NAME or len(name) != size:
        raise ProtocolError("not a lattice encoding (bad type-name header)")
    text = name.decode("ascii", "replace")
    entry = _DECODERS.get(text)
    if entry is None:
        raise ProtocolError(f"unknown lattice type {text!r}")
    if count != entry[0] + 1:
        raise ProtocolError(f"a {text} lattice has {entry[0]} field(s), not {count - 1}")
    return text
