"""Lattice laws, causal semantics and the wire codec (synchronous: no event loop).

Every lattice type is checked in two modes: Python mode (user values are
Python objects) and raw mode (user values are their pickled bytes, as on the
storage server). The laws must hold in both, and the two modes must agree.
"""

from __future__ import annotations

import math
import pickle
import threading
from collections.abc import Callable
from typing import Any

import cloudpickle  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import droplet.lattices as lat
from droplet.errors import LatticeTypeError, ProtocolError
from droplet.lattices import (
    RAW,
    Lattice,
    LWWLattice,
    MapLattice,
    MaxLattice,
    MultiKeyCausalLattice,
    OrderedSetLattice,
    PriorityLattice,
    SetLattice,
    SingleKeyCausalLattice,
    VectorClock,
    decode_lattice,
    encode_lattice,
    lattice_type_name,
    next_timestamp,
)
from droplet.protocol import values

LAWS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HOSTILE = settings(max_examples=100, deadline=None)

# --------------------------------------------------------------------------- strategies

# Python-mode values: small, so that ties and overlaps are common. No floats
# (NaN breaks ==) and no bools (True == 1 but pickles differently).
py_hashable = st.one_of(
    st.integers(-3, 3), st.text("ab", max_size=2), st.tuples(st.integers(0, 2), st.just("t"))
)
py_any = st.one_of(py_hashable, st.lists(st.integers(0, 2), max_size=2))
py_orderable = st.integers(-5, 5)
raw_value = st.binary(max_size=3)

timestamps = st.integers(0, 3)
writers = st.sampled_from(["", "a", "b"])
numbers = st.sampled_from([0, 1, 1.0, 2, 2.0, -0.0, 0.0, -1.5, math.inf, -math.inf, 2**70])
clocks = st.builds(VectorClock, st.dictionaries(st.sampled_from("abc"), st.integers(0, 3)))
dep_keys = st.sampled_from(["k1", "k2", 7, b"x"])


def lww(v: st.SearchStrategy[Any]) -> st.SearchStrategy[Lattice]:
    return st.builds(LWWLattice, timestamps, v, writers)


def sets(v: st.SearchStrategy[Any]) -> st.SearchStrategy[Lattice]:
    return st.builds(SetLattice, st.frozensets(v, max_size=4))


def ordered_sets(v: st.SearchStrategy[Any]) -> st.SearchStrategy[Lattice]:
    return st.builds(OrderedSetLattice, st.frozensets(v, max_size=4))


def maxes(v: st.SearchStrategy[Any]) -> st.SearchStrategy[Lattice]:
    return st.builds(MaxLattice, numbers)


def priorities(v: st.SearchStrategy[Any]) -> st.SearchStrategy[Lattice]:
    return st.builds(PriorityLattice, numbers.filter(lambda n: n != 2**70), v)


def vector_clocks(v: st.SearchStrategy[Any]) -> st.SearchStrategy[Lattice]:
    return clocks


def maps(v: st.SearchStrategy[Any]) -> st.SearchStrategy[Lattice]:
    # The key's type decides the value's lattice type, so two maps always
    # agree on the type under a shared key (as one application's data would).
    inner = st.builds(MapLattice, st.dictionaries(st.sampled_from(["s", "t"]), sets(v), max_size=2))
    return st.builds(
        MapLattice,
        st.one_of(
            st.dictionaries(st.sampled_from(["a", "b", "c"]), lww(v), max_size=3),
            st.dictionaries(st.integers(0, 2), maxes(v), max_size=3),
            st.dictionaries(st.sampled_from([b"m", b"n"]), inner, max_size=2),
        ),
    )


def single_causal(v: st.SearchStrategy[Any]) -> st.SearchStrategy[Lattice]:
    version = st.tuples(clocks, st.frozensets(v, max_size=2))
    return st.builds(SingleKeyCausalLattice.from_versions, st.lists(version, max_size=3))


def multi_causal(v: st.SearchStrategy[Any]) -> st.SearchStrategy[Lattice]:
    deps = st.dictionaries(dep_keys, clocks, max_size=2)
    version = st.tuples(clocks, deps, st.frozensets(v, max_size=2))
    return st.builds(MultiKeyCausalLattice.from_versions, st.lists(version, max_size=3))


# name -> (strategy builder, Python-mode value strategy)
KINDS: dict[str, tuple[Callable[[st.SearchStrategy[Any]], st.SearchStrategy[Lattice]], Any]] = {
    "LWW": (lww, py_any),
    "Set": (sets, py_hashable),
    "OrderedSet": (ordered_sets, py_orderable),
    "Max": (maxes, py_any),
    "Priority": (priorities, py_any),
    "VectorClock": (vector_clocks, py_any),
    "Map": (maps, py_hashable),
    "SingleKeyCausal": (single_causal, py_hashable),
    "MultiKeyCausal": (multi_causal, py_hashable),
}
MODES = ["python", "raw"]
CASES = [(kind, mode) for kind in KINDS for mode in MODES]


def strategy(kind: str, mode: str) -> st.SearchStrategy[Lattice]:
    build, py_values = KINDS[kind]
    return build(raw_value if mode == "raw" else py_values)


def dump_for(mode: str) -> Callable[[Any], bytes]:
    return RAW if mode == "raw" else cloudpickle.dumps  # type: ignore[no-any-return]


def load_for(mode: str) -> Callable[[bytes], Any]:
    return RAW if mode == "raw" else pickle.loads


# --------------------------------------------------------------------------- lattice laws


@pytest.mark.parametrize(("kind", "mode"), CASES)
@LAWS
@given(data=st.data())
def test_merge_is_associative(kind: str, mode: str, data: st.DataObject) -> None:
    s = strategy(kind, mode)
    a, b, c = data.draw(s), data.draw(s), data.draw(s)
    left = a.merge(b).merge(c)
    right = a.merge(b.merge(c))
    assert left == right
    dump = dump_for(mode)
    assert encode_lattice(left, dump) == encode_lattice(right, dump)


@pytest.mark.parametrize(("kind", "mode"), CASES)
@LAWS
@given(data=st.data())
def test_merge_is_commutative_and_does_not_mutate(
    kind: str, mode: str, data: st.DataObject
) -> None:
    s = strategy(kind, mode)
    a, b = data.draw(s), data.draw(s)
    dump = dump_for(mode)
    before = encode_lattice(a, dump), encode_lattice(b, dump)
    ab, ba = a.merge(b), b.merge(a)
    assert ab == ba
    assert encode_lattice(ab, dump) == encode_lattice(ba, dump)
    assert (encode_lattice(a, dump), encode_lattice(b, dump)) == before
    assert ab is not a and ab is not b


@pytest.mark.parametrize(("kind", "mode"), CASES)
@LAWS
@given(data=st.data())
def test_merge_is_idempotent(kind: str, mode: str, data: st.DataObject) -> None:
    s = strategy(kind, mode)
    a, b = data.draw(s), data.draw(s)
    assert a.merge(a) == a
    ab = a.merge(b)
    assert ab.merge(b) == ab
    assert ab.merge(a) == ab


@pytest.mark.parametrize(("kind", "mode"), CASES)
@LAWS
@given(data=st.data())
def test_encoding_round_trips(kind: str, mode: str, data: st.DataObject) -> None:
    a = data.draw(strategy(kind, mode))
    dump, load = dump_for(mode), load_for(mode)
    encoded = encode_lattice(a, dump)
    decoded = decode_lattice(encoded, load)
    assert type(decoded) is type(a)
    assert decoded == a
    assert encode_lattice(decoded, dump) == encoded
    assert lattice_type_name(encoded) == a.type_name == kind
    # The storage server's path: raw decode and raw encode give the bytes back.
    assert encode_lattice(decode_lattice(encoded, RAW), RAW) == encoded
    if mode == "raw":
        assert hash(decoded) == hash(a)


@pytest.mark.parametrize("kind", list(KINDS))
@LAWS
@given(data=st.data())
def test_raw_merge_agrees_with_python_merge(kind: str, data: st.DataObject) -> None:
    """A client merging objects and the store merging bytes reach the same state."""
    s = strategy(kind, "python")
    a, b = data.draw(s), data.draw(s)
    raw_a = decode_lattice(encode_lattice(a), RAW)
    raw_b = decode_lattice(encode_lattice(b), RAW)
    assert encode_lattice(raw_a.merge(raw_b), RAW) == encode_lattice(a.merge(b))
    assert decode_lattice(encode_lattice(raw_a.merge(raw_b), RAW)) == a.merge(b)


def test_equal_lattices_compare_and_hash_equal() -> None:
    assert SetLattice([1, 2]) == SetLattice((2, 1))
    assert hash(SetLattice([1, 2])) == hash(SetLattice((2, 1)))
    assert SetLattice([1]) != OrderedSetLattice([1])
    assert VectorClock({"a": 0, "b": 1}) == VectorClock({"b": 1})
    assert hash(VectorClock({"a": 0, "b": 1})) == hash(VectorClock({"b": 1}))
    assert MaxLattice(1) != MaxLattice(1.0)  # equal lattices must encode equally
    assert LWWLattice(1, "x", "w") == LWWLattice(1, "x", "w")
    assert LWWLattice(1, "x", "w") != LWWLattice(1, "x", "v")
    assert MapLattice({"k": MaxLattice(1)}) == MapLattice({"k": MaxLattice(1)})
    assert len({MapLattice({"k": MaxLattice(1)}), MapLattice({"k": MaxLattice(1)})}) == 1


# --------------------------------------------------------------------------- reveal and basics


def test_reveal_types() -> None:
    assert LWWLattice(1, [1, 2]).reveal() == [1, 2]
    assert SetLattice([2, 1]).reveal() == frozenset({1, 2})
    assert type(SetLattice().reveal()) is frozenset
    assert OrderedSetLattice([3, 1, 2]).reveal() == [1, 2, 3]
    assert MaxLattice(3).merge(MaxLattice(7.5)).reveal() == 7.5
    assert MapLattice({"a": LWWLattice(1, "x"), 2: SetLattice([1])}).reveal() == {
        "a": "x",
        2: frozenset({1}),
    }
    assert VectorClock({"n": 2}).reveal() == {"n": 2}
    assert SingleKeyCausalLattice({"a": 1}, ["v"]).reveal() == "v"
    assert SingleKeyCausalLattice().reveal() == frozenset()
    assert PriorityLattice(3, "far").merge(PriorityLattice(1, "near")).reveal() == "near"


def test_map_merge_keeps_one_sided_keys_and_joins_shared_ones() -> None:
    left = MapLattice({"a": MaxLattice(1), "b": MaxLattice(5)})
    right = MapLattice({"b": MaxLattice(7), "c": MaxLattice(0)})
    assert left.merge(right).reveal() == {"a": 1, "b": 7, "c": 0}
    assert left.reveal() == {"a": 1, "b": 5}  # operands untouched


def test_merging_different_types_is_a_lattice_type_error() -> None:
    with pytest.raises(LatticeTypeError):
        SetLattice([1]).merge(OrderedSetLattice([1]))  # type: ignore[arg-type]
    mixed = MapLattice({"k": SetLattice([1])})
    with pytest.raises(LatticeTypeError, match="LWW"):
        mixed.merge(MapLattice({"k": LWWLattice(1, "x")}))
    assert issubclass(LatticeTypeError, TypeError)


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: MaxLattice(True), TypeError),
        (lambda: MaxLattice("1"), TypeError),
        (lambda: MaxLattice(math.nan), ValueError),
        (lambda: PriorityLattice(math.nan, "x"), ValueError),
        (lambda: LWWLattice(1.5, "x"), TypeError),
        (lambda: LWWLattice(1, "x", writer=3), TypeError),
        (lambda: MapLattice({1.5: MaxLattice(1)}), TypeError),
        (lambda: MapLattice({True: MaxLattice(1)}), TypeError),
        (lambda: MapLattice({"k": 1}), TypeError),
        (lambda: VectorClock({"a": -1}), ValueError),
        (lambda: VectorClock({"a": 1.0}), TypeError),
        (lambda: VectorClock({1: 1}), TypeError),
        (lambda: OrderedSetLattice([1, "a"]), TypeError),
        (lambda: MultiKeyCausalLattice({}, {"k": 3}, []), TypeError),
    ],
)
def test_constructors_reject_misuse(build: Callable[[], object], error: type[Exception]) -> None:
    with pytest.raises(error):
        build()


def test_max_prefers_int_on_ties_and_normalizes_negative_zero() -> None:
    assert MaxLattice(1).merge(MaxLattice(1.0)).reveal() is not None
    assert type(MaxLattice(1).merge(MaxLattice(1.0)).value) is int
    assert type(MaxLattice(1.0).merge(MaxLattice(1)).value) is int
    assert math.copysign(1, MaxLattice(-0.0).value) == 1


# --------------------------------------------------------------------------- LWW ordering


def test_lww_greater_timestamp_then_writer_wins() -> None:
    old, new = LWWLattice(1, "old", "z"), LWWLattice(2, "new", "a")
    assert old.merge(new).reveal() == new.merge(old).reveal() == "new"
    a, b = LWWLattice(5, "from-a", "a"), LWWLattice(5, "from-b", "b")
    assert a.merge(b).reveal() == b.merge(a).reveal() == "from-b"


@pytest.mark.parametrize(("x", "y"), [(b"\x01", b"\x02"), ("apple", "banana"), (1, [1])])
def test_lww_full_tie_is_independent_of_argument_order(x: Any, y: Any) -> None:
    a, b = LWWLattice(7, x, "w"), LWWLattice(7, y, "w")
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).reveal() in (x, y)


def test_lww_raw_tie_break_is_by_bytes() -> None:
    a, b = LWWLattice(7, b"\x00\xff", "w"), LWWLattice(7, b"\x01", "w")
    assert a.merge(b).reveal() == b.merge(a).reveal() == b"\x01"


def test_lww_now_orders_puts_in_call_order() -> None:
    stamps = [LWWLattice.now(i) for i in range(200)]
    assert all(s.writer == lat.lww.WRITER_ID for s in stamps)
    assert [s.timestamp for s in stamps] == sorted({s.timestamp for s in stamps})
    merged = stamps[0]
    for s in reversed(stamps):
        merged = merged.merge(s)
    assert merged.reveal() == 199
    assert LWWLattice.now("x", writer="me").writer == "me"


def test_next_timestamp_is_unique_across_threads() -> None:
    results: list[list[int]] = [[] for _ in range(4)]

    def take(out: list[int]) -> None:
        out.extend(next_timestamp() for _ in range(2000))

    threads = [threading.Thread(target=take, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [ts for out in results for ts in out]
    assert len(set(flat)) == len(flat)
    assert all(out == sorted(out) for out in results)


def test_writer_id_is_random_hex() -> None:
    assert len(lat.WRITER_ID) == 16
    int(lat.WRITER_ID, 16)


# --------------------------------------------------------------------------- causal semantics


def test_vector_clock_compare() -> None:
    a1, b1 = VectorClock({"a": 1}), VectorClock({"b": 1})
    both = a1.merge(b1)
    assert both == VectorClock({"a": 1, "b": 1})
    assert a1.compare(both) == "before"
    assert both.compare(a1) == "after"
    assert a1.compare(b1) == "concurrent"
    assert a1.compare(VectorClock({"a": 1, "z": 0})) == "equal"
    assert both.dominates(a1) and not a1.dominates(both) and not a1.dominates(a1)
    assert a1.concurrent_with(b1) and not a1.concurrent_with(both)
    assert a1.increment("a") == VectorClock({"a": 2})
    assert a1.increment("b").dominates(a1)
    assert a1.get("zzz") == 0


def test_dominating_clock_replaces() -> None:
    first = SingleKeyCausalLattice({"a": 1}, ["v1"])
    second = SingleKeyCausalLattice(first.clock.increment("a"), ["v2"])
    for merged in (first.merge(second), second.merge(first)):
        assert merged.reveal() == "v2"
        assert merged.clock == VectorClock({"a": 2})


def test_concurrent_clocks_keep_both_values() -> None:
    base = VectorClock({"a": 1})
    left = SingleKeyCausalLattice(base.increment("a"), ["left"])
    right = SingleKeyCausalLattice(base.increment("b"), ["right"])
    merged = left.merge(right)
    assert merged == right.merge(left)
    assert merged.reveal() == frozenset({"left", "right"})
    assert merged.clock == VectorClock({"a": 2, "b": 1})
    # An older write that both saw changes nothing.
    assert merged.merge(SingleKeyCausalLattice(base, ["old"])) == merged


def test_equal_clocks_with_different_values_keep_both() -> None:
    a = SingleKeyCausalLattice({"a": 1}, ["x"])
    b = SingleKeyCausalLattice({"a": 1}, ["y"])
    assert a.merge(b).reveal() == b.merge(a).reveal() == frozenset({"x", "y"})


def test_later_write_that_saw_both_replaces_them() -> None:
    left = SingleKeyCausalLattice({"a": 1}, ["left"])
    right = SingleKeyCausalLattice({"b": 1}, ["right"])
    seen = left.merge(right)
    resolved = SingleKeyCausalLattice(seen.clock.increment("c"), ["resolved"])
    assert seen.merge(resolved).reveal() == "resolved"
    # Whatever order the three writes arrive in (Anna's single-clock merge
    # would keep "left" in some orders; this is the associativity fix).
    assert left.merge(resolved).merge(right).reveal() == "resolved"
    assert right.merge(left.merge(resolved)).reveal() == "resolved"
    # A write with exactly the joined clock also supersedes both.
    joined = SingleKeyCausalLattice(seen.clock, ["joined"])
    assert left.merge(right.merge(joined)) == left.merge(right).merge(joined)
    assert left.merge(right.merge(joined)).reveal() == "joined"


def test_multi_key_causal_semantics() -> None:
    left = MultiKeyCausalLattice({"a": 1}, {"x": {"a": 1}}, ["left"])
    right = MultiKeyCausalLattice({"b": 1}, {"x": {"b": 2}, "y": {"b": 1}}, ["right"])
    merged = left.merge(right)
    assert merged == right.merge(left)
    assert merged.reveal() == frozenset({"left", "right"})
    assert merged.dependencies.reveal() == {"x": {"a": 1, "b": 2}, "y": {"b": 1}}
    later = MultiKeyCausalLattice(merged.clock.increment("a"), {"z": {"c": 1}}, ["later"])
    assert merged.merge(later).reveal() == "later"
    assert merged.merge(later).dependencies.reveal() == {"z": {"c": 1}}
    # Equal clocks join dependencies key-wise (pointwise max).
    one = MultiKeyCausalLattice({"a": 1}, {"x": VectorClock({"a": 3})}, ["v"])
    two = MultiKeyCausalLattice({"a": 1}, MapLattice({"x": VectorClock({"b": 1})}), ["v"])
    assert one.merge(two).dependencies.reveal() == {"x": {"a": 3, "b": 1}}
    assert one.merge(two).reveal() == "v"


# --------------------------------------------------------------------------- codec details


def test_frame_is_plain_data_with_user_values_as_bytes() -> None:
    encoded = encode_lattice(LWWLattice(5, {"user": "object"}, "w"))
    plain = values.loads(encoded)
    assert plain[:3] == ["LWW", 5, "w"]
    assert pickle.loads(plain[3]) == {"user": "object"}
    clock = values.loads(encode_lattice(VectorClock({"b": 2, "a": 1})))
    assert clock == ["VectorClock", {"a": 1, "b": 2}]
    assert list(clock[1]) == ["a", "b"]  # canonical order


def test_raw_encode_refuses_python_values() -> None:
    with pytest.raises(TypeError, match="raw mode"):
        encode_lattice(LWWLattice(1, "not bytes"), RAW)


def test_unorderable_decoded_ordered_set_is_a_protocol_error() -> None:
    raw = OrderedSetLattice([cloudpickle.dumps(1), cloudpickle.dumps("a")])
    with pytest.raises(ProtocolError):
        decode_lattice(encode_lattice(raw, RAW))


def test_failing_user_loader_is_a_protocol_error() -> None:
    encoded = encode_lattice(LWWLattice(1, b"\x00garbage"), RAW)

    def explode(data: bytes) -> Any:
        raise KeyError("boom")

    with pytest.raises(ProtocolError, match="KeyError"):
        decode_lattice(encoded, explode)
    with pytest.raises(ProtocolError):
        decode_lattice(encoded)  # pickle.loads on garbage


def _frame(obj: Any) -> bytes:
    return values.dumps(obj)


@pytest.mark.parametrize(
    "plain",
    [
        [],
        "LWW",
        ["Nope"],
        [1, 2],
        ["LWW", 1, "w"],
        ["LWW", "1", "w", b""],
        ["LWW", True, "w", b""],
        ["LWW", 1, b"w", b""],
        ["LWW", 1, "w", "not bytes"],
        ["LWW", 1.0, "w", b""],
        ["Set", b"x"],
        ["Set", [1]],
        ["Set", [b"a"], []],
        ["OrderedSet", None],
        ["Max", "3"],
        ["Max", True],
        ["Max", None],
        ["Max", math.nan],
        ["Priority", math.nan, b""],
        ["Priority", 1, 2],
        ["VectorClock", {"a": -1}],
        ["VectorClock", {"a": 1.0}],
        ["VectorClock", {"a": True}],
        ["VectorClock", {1: 1}],
        ["VectorClock", [["a", 1]]],
        ["Map", {1.5: ["Max", 1]}],
        ["Map", {None: ["Max", 1]}],
        ["Map", {True: ["Max", 1]}],
        ["Map", {"k": 3}],
        ["Map", {"k": ["Map", {"j": ["Bad"]}]}],
        ["Map", [["k", ["Max", 1]]]],
        ["SingleKeyCausal", [[{}, [b"x"], 1]]],
        ["SingleKeyCausal", [[{"a": 1}, b"x"]]],
        ["SingleKeyCausal", [{"a": 1}]],
        ["SingleKeyCausal", {}],
        ["MultiKeyCausal", [[{"a": 1}, {1.5: {}}, []]]],
        ["MultiKeyCausal", [[{"a": 1}, {"k": {"a": "1"}}, []]]],
        ["MultiKeyCausal", [[{"a": 1}, [], []]]],
        ["MultiKeyCausal", [[{"a": 1}, {}]]],
    ],
)
def test_wrong_shapes_are_protocol_errors(plain: Any) -> None:
    data = _frame(plain)
    with pytest.raises(ProtocolError):
        decode_lattice(data, RAW)
    with pytest.raises(ProtocolError):
        decode_lattice(data, values.loads)
    # ...and the codec still works afterwards.
    assert decode_lattice(encode_lattice(MaxLattice(1))) == MaxLattice(1)


def test_non_canonical_input_is_accepted_and_canonicalized() -> None:
    messy = _frame(["Set", [b"b", b"a", b"b"]])
    decoded = decode_lattice(messy, RAW)
    assert decoded == SetLattice([b"a", b"b"])
    assert encode_lattice(decoded, RAW) == _frame(["Set", [b"a", b"b"]])
    dominated = _frame(["SingleKeyCausal", [[{"a": 1}, [b"old"]], [{"a": 2}, [b"new"]]]])
    assert decode_lattice(dominated, RAW).reveal() == b"new"


def test_causal_version_count_is_bounded() -> None:
    limit = lat.codec.MAX_CAUSAL_VERSIONS
    antichain = [[{f"n{i}": 1}, [b"v"]] for i in range(limit)]
    assert len(decode_lattice(_frame(["SingleKeyCausal", antichain]), RAW).versions) == limit
    too_many = antichain + [[{"extra": 1}, [b"v"]]]
    with pytest.raises(ProtocolError, match="MAX_CAUSAL_VERSIONS"):
        decode_lattice(_frame(["SingleKeyCausal", too_many]), RAW)


def test_lattice_type_name() -> None:
    for lattice in (LWWLattice(1, b""), MapLattice(), MultiKeyCausalLattice()):
        assert lattice_type_name(encode_lattice(lattice, RAW)) == lattice.type_name
    for bad in (b"", b"garbage", _frame(["Nope", 1]), _frame(["LWW", 1]), _frame("LWW")):
        with pytest.raises(ProtocolError):
            lattice_type_name(bad)


@HOSTILE
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    for load in (RAW, values.loads):
        try:
            decoded = decode_lattice(data, load)
        except ProtocolError:
            pass
        else:
            assert isinstance(decoded, Lattice)
    try:
        lattice_type_name(data)
    except ProtocolError:
        pass


def _mutate(data: bytes, how: str, pos: int, byte: int) -> bytes:
    pos %= len(data) + 1
    if how == "flip" and pos < len(data):
        return data[:pos] + bytes([data[pos] ^ (byte or 1)]) + data[pos + 1 :]
    if how == "insert":
        return data[:pos] + bytes([byte]) + data[pos:]
    if how == "delete":
        return data[:pos] + data[pos + 1 :]
    return data[:pos]  # truncate


@pytest.mark.parametrize("kind", list(KINDS))
@HOSTILE
@given(data=st.data())
def test_mutated_encodings_raise_only_protocol_error(kind: str, data: st.DataObject) -> None:
    # Python mode uses the plain-value codec for user values: a safe ``load``,
    # so mutated bytes can reach the user-value path without unpickling them.
    mode = data.draw(st.sampled_from(MODES))
    dump, load = (RAW, RAW) if mode == "raw" else (values.dumps, values.loads)
    build = KINDS[kind][0]
    original = data.draw(build(raw_value if mode == "raw" else st.integers(-3, 3)))
    encoded = encode_lattice(original, dump)
    mutated = encoded
    for _ in range(data.draw(st.integers(1, 3))):
        how = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        mutated = _mutate(
            mutated, how, data.draw(st.integers(0, 10_000)), data.draw(st.integers(0, 255))
        )
    try:
        decoded = decode_lattice(mutated, load)
    except ProtocolError:
        pass
    else:
        # Whatever decodes is a working lattice: it merges and re-encodes.
        assert decoded.merge(decoded) == decoded
        encode_lattice(decoded, dump)
    assert decode_lattice(encoded, load) == original


def test_public_surface() -> None:
    assert sorted(lat.__all__) == sorted(
        [
            "RAW",
            "WRITER_ID",
            "LWWLattice",
            "Lattice",
            "MapLattice",
            "MaxLattice",
            "MultiKeyCausalLattice",
            "OrderedSetLattice",
            "PriorityLattice",
            "SetLattice",
            "SingleKeyCausalLattice",
            "VectorClock",
            "decode_lattice",
            "encode_lattice",
            "lattice_type_name",
            "next_timestamp",
        ]
    )
    for name in lat.__all__:
        assert getattr(lat, name) is not None
    for cls in (LWWLattice, SetLattice, OrderedSetLattice, MaxLattice, MapLattice, VectorClock):
        assert issubclass(cls, Lattice) and cls.type_name
