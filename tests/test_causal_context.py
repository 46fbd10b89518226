"""The pure core of the consistency levels (droplet/consistency.py): synchronous.

:class:`CausalContext` is what a CAUSAL run (and a client session) knows: the
newest vector clock it has seen per key. The executor asks it whether a cached
version is fresh enough, tells it what was read, and asks it to stamp writes;
the context travels between executors and back to the client as bytes.
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle  # type: ignore[import-untyped]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from droplet.client._core import ClientCore
from droplet.consistency import (
    CAUSAL,
    CONSISTENCY_LEVELS,
    MAX_CONTEXT_KEYS,
    NORMAL,
    REPEATABLE_READ,
    CausalContext,
    SessionResult,
    check_level,
)
from droplet.errors import ProtocolError
from droplet.lattices import (
    RAW,
    LWWLattice,
    MapLattice,
    MultiKeyCausalLattice,
    SetLattice,
    SingleKeyCausalLattice,
    VectorClock,
    decode_lattice,
    encode_lattice,
)
from droplet.protocol import values


def vc(**counters: int) -> VectorClock:
    return VectorClock(counters)


def causal(clock: VectorClock, value: Any = "v", deps: dict[Any, VectorClock] | None = None
           ) -> MultiKeyCausalLattice:
    return MultiKeyCausalLattice(clock, deps or {}, [value])


# ---------------------------------------------------------------- levels


def test_levels() -> None:
    assert CONSISTENCY_LEVELS == (NORMAL, REPEATABLE_READ, CAUSAL)
    for level in CONSISTENCY_LEVELS:
        assert check_level(level) == level


def test_unknown_level_is_a_value_error_naming_the_levels() -> None:
    with pytest.raises(ValueError, match=r"'STRONG'.*NORMAL, REPEATABLE_READ, CAUSAL"):
        check_level("STRONG")


# ---------------------------------------------------------------- fresh_enough


def test_an_empty_context_accepts_any_version() -> None:
    ctx = CausalContext()
    assert ctx.required("k") == VectorClock()
    for lattice in (None, LWWLattice(1, "x"), causal(vc(a=1)), SetLattice({1})):
        assert ctx.fresh_enough("k", lattice)


def test_fresh_enough_needs_a_version_at_or_after_the_seen_clock() -> None:
    ctx = CausalContext({"k": vc(a=2, b=1)})
    assert ctx.fresh_enough("k", causal(vc(a=2, b=1)))  # equal
    assert ctx.fresh_enough("k", causal(vc(a=3, b=1)))  # after
    assert ctx.fresh_enough("k", causal(vc(a=2, b=1, c=1)))  # after, new node
    assert not ctx.fresh_enough("k", causal(vc(a=1, b=1)))  # before: stale
    assert not ctx.fresh_enough("k", causal(vc(a=1, b=5)))  # concurrent: not a successor
    assert not ctx.fresh_enough("k", None)  # absent, but the context saw a version
    assert not ctx.fresh_enough("k", LWWLattice(1, "x"))  # no clock to compare
    assert ctx.fresh_enough("other", None)  # keys the context never saw are unconstrained


def test_fresh_enough_accepts_single_key_causal_lattices() -> None:
    ctx = CausalContext({"k": vc(a=1)})
    assert ctx.fresh_enough("k", SingleKeyCausalLattice(vc(a=1), ["x"]))
    assert not ctx.fresh_enough("k", SingleKeyCausalLattice(vc(b=1), ["x"]))


def test_fresh_enough_with_concurrent_versions_uses_their_joined_clock() -> None:
    both = causal(vc(a=1), "x").merge(causal(vc(b=1), "y"))
    assert CausalContext({"k": vc(a=1)}).fresh_enough("k", both)
    assert CausalContext({"k": vc(a=1, b=1)}).fresh_enough("k", both)
    assert not CausalContext({"k": vc(a=2)}).fresh_enough("k", both)


# ---------------------------------------------------------------- observe


def test_observe_records_the_clock_and_the_dependencies() -> None:
    ctx = CausalContext()
    ctx.observe("k", causal(vc(a=1), deps={"x": vc(b=2), "y": vc(c=1)}))
    assert ctx.clocks == {"k": vc(a=1), "x": vc(b=2), "y": vc(c=1)}
    # Whatever was observed is now required: an older version is stale.
    assert not ctx.fresh_enough("x", causal(vc(b=1)))
    assert ctx.fresh_enough("x", causal(vc(b=2)))


def test_observe_only_moves_forward() -> None:
    ctx = CausalContext({"k": vc(a=3), "x": vc(b=2)})
    ctx.observe("k", causal(vc(a=1, c=1), deps={"x": vc(b=1, d=4)}))
    assert ctx.clocks == {"k": vc(a=3, c=1), "x": vc(b=2, d=4)}  # pointwise maximum


def test_observe_ignores_what_carries_no_clock() -> None:
    ctx = CausalContext({"k": vc(a=1)})
    for lattice in (None, LWWLattice(5, "x"), SetLattice({1}), MapLattice()):
        ctx.observe("k", lattice)
        ctx.observe("new", lattice)
    assert ctx.clocks == {"k": vc(a=1)}


def test_observe_skips_dependencies_under_non_string_keys() -> None:
    # A MultiKeyCausalLattice written by hand may use int or bytes dependency keys;
    # KVS keys are strings, so those cannot be required of any read.
    ctx = CausalContext()
    ctx.observe("k", causal(vc(a=1), deps={1: vc(b=1), b"x": vc(c=1), "y": vc(d=1)}))
    assert ctx.clocks == {"k": vc(a=1), "y": vc(d=1)}


def test_observe_of_a_single_key_lattice_records_no_dependencies() -> None:
    ctx = CausalContext()
    ctx.observe("k", SingleKeyCausalLattice(vc(a=2), ["x"]))
    assert ctx.clocks == {"k": vc(a=2)}


# ---------------------------------------------------------------- stamp


def test_stamp_of_an_unseen_key_starts_the_writers_counter() -> None:
    write = CausalContext().stamp("k", "A", "v1")
    assert write.clock == vc(A=1)
    assert write.reveal() == "v1"
    assert write.dependencies == MapLattice()


def test_stamp_dominates_everything_observed_for_the_key() -> None:
    ctx = CausalContext()
    seen = causal(vc(a=1), "x").merge(causal(vc(b=1), "y"))  # two concurrent values
    ctx.observe("k", seen)
    write = ctx.stamp("k", "C", "z")
    assert write.clock.dominates(vc(a=1))
    assert write.clock.dominates(vc(b=1))
    assert write.clock.dominates(seen.clock)
    assert write.clock.compare(ctx.required("k")) == "after"
    assert write.clock == vc(a=1, b=1, C=1)
    # Merged into the store, the write replaces both concurrent values.
    assert seen.merge(write).reveal() == "z"
    assert write.merge(seen).reveal() == "z"


def test_stamp_records_every_other_observed_key_as_a_dependency() -> None:
    ctx = CausalContext({"x": vc(a=1), "y": vc(b=2), "k": vc(c=1)})
    write = ctx.stamp("k", "W", 42)
    assert write.dependencies == MapLattice({"x": vc(a=1), "y": vc(b=2)})
    assert write.clock == vc(c=1, W=1)
    # A reader of the write inherits its dependencies.
    reader = CausalContext()
    reader.observe("k", write)
    assert reader.clocks == {"k": vc(c=1, W=1), "x": vc(a=1), "y": vc(b=2)}


def test_stamp_does_not_change_the_context() -> None:
    ctx = CausalContext({"k": vc(a=1)})
    ctx.stamp("k", "A", "v")
    ctx.stamp("other", "A", "v")
    assert ctx.clocks == {"k": vc(a=1)}


def test_a_session_that_observes_its_writes_keeps_superseding_them() -> None:
    ctx = CausalContext()
    stored: MultiKeyCausalLattice | None = None
    for i in range(1, 4):
        write = ctx.stamp("k", "A", f"v{i}")
        ctx.observe("k", write)  # what the executor does after a write
        stored = write if stored is None else stored.merge(write)
        assert write.clock == vc(A=i)
        assert stored.reveal() == f"v{i}"
    # And the latest write is the only version fresh enough for the session.
    assert not ctx.fresh_enough("k", causal(vc(A=2)))
    assert ctx.fresh_enough("k", stored)


def test_writers_that_did_not_see_each_other_are_both_kept() -> None:
    a = CausalContext().stamp("k", "A", "a")
    b = CausalContext().stamp("k", "B", "b")
    assert a.clock.concurrent_with(b.clock)
    assert a.merge(b).reveal() == frozenset({"a", "b"})
    # A session that read both (the merged context) supersedes both with one write.
    reader = CausalContext()
    reader.observe("k", a.merge(b))
    c = reader.stamp("k", "C", "c")
    assert a.merge(b).merge(c).reveal() == "c"
    assert c.merge(b).merge(a).reveal() == "c"


# ---------------------------------------------------------------- merge


def test_merge_is_the_pointwise_maximum_and_leaves_operands_alone() -> None:
    left = CausalContext({"k": vc(a=2), "x": vc(b=1)})
    right = CausalContext({"k": vc(a=1, c=3), "y": vc(d=1)})
    merged = left.merge(right)
    assert merged.clocks == {"k": vc(a=2, c=3), "x": vc(b=1), "y": vc(d=1)}
    assert right.merge(left) == merged
    assert merged.merge(merged) == merged
    assert left.clocks == {"k": vc(a=2), "x": vc(b=1)}
    assert right.clocks == {"k": vc(a=1, c=3), "y": vc(d=1)}


def test_merge_all() -> None:
    parts = [CausalContext({"k": vc(a=i)}) for i in range(1, 4)] + [CausalContext({"x": vc(b=1)})]
    assert CausalContext.merge_all(parts) == CausalContext({"k": vc(a=3), "x": vc(b=1)})
    assert CausalContext.merge_all([]) == CausalContext()


def test_the_constructor_copies_the_mapping() -> None:
    clocks = {"k": vc(a=1)}
    ctx = CausalContext(clocks)
    ctx.observe("x", causal(vc(b=1)))
    assert clocks == {"k": vc(a=1)}


def test_equality_and_repr() -> None:
    assert CausalContext({"k": vc(a=1)}) == CausalContext({"k": vc(a=1)})
    assert CausalContext({"k": vc(a=1)}) != CausalContext({"k": vc(a=2)})
    assert CausalContext() != {}
    assert "VectorClock" in repr(CausalContext({"k": vc(a=1)}))


# ---------------------------------------------------------------- encode/decode


def test_encode_decode_round_trip() -> None:
    ctx = CausalContext({"k": vc(a=2, b=1), "x": vc(c=7), "": vc(z=1)})
    assert CausalContext.decode(ctx.encode()) == ctx
    assert CausalContext.decode(CausalContext().encode()) == CausalContext()


def test_encoding_is_canonical() -> None:
    one = CausalContext({"a": vc(x=1), "b": vc(y=2)})
    two = CausalContext({"b": vc(y=2), "a": vc(x=1)})
    assert one.encode() == two.encode()


def test_decode_of_nothing_is_an_empty_context() -> None:
    assert CausalContext.decode(None) == CausalContext()
    assert CausalContext.decode(b"") == CausalContext()


@pytest.mark.parametrize("plain", [
    [],
    "clocks",
    42,
    None,
    {"k": 1},
    {"k": [1, 2]},
    {1: {"a": 1}},
    {b"k": {"a": 1}},
    {"k": {"a": "1"}},
    {"k": {"a": 1.5}},
    {"k": {"a": True}},
    {"k": {"a": -1}},
    {"k": {2: 1}},
    {"k": {"a": None}},
])
def test_decode_of_a_well_formed_but_wrong_shape_is_a_protocol_error(plain: Any) -> None:
    with pytest.raises(ProtocolError):
        CausalContext.decode(values.dumps(plain))


@pytest.mark.parametrize("data", [b"\x00", b"d", b"d\x00\x00\x00\x05", b"x" * 100,
                                  values.dumps({"k": {"a": 1}}) + b"\x00"])
def test_decode_of_garbage_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        CausalContext.decode(data)


@given(st.binary(max_size=200))
def test_decode_of_arbitrary_bytes_raises_nothing_but_protocol_error(data: bytes) -> None:
    try:
        ctx = CausalContext.decode(data)
    except ProtocolError:
        return
    assert isinstance(ctx, CausalContext)
    assert CausalContext.decode(ctx.encode()) == ctx


_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=3) | st.binary(max_size=3),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=2) | st.integers(0, 3), inner, max_size=3),
    max_leaves=10,
)


@given(_plain)
def test_decode_of_arbitrary_plain_data_is_a_context_or_a_protocol_error(plain: Any) -> None:
    try:
        ctx = CausalContext.decode(values.dumps(plain))
    except ProtocolError:
        return
    assert CausalContext.decode(ctx.encode()) == ctx


_clocks = st.dictionaries(st.sampled_from("abcd"), st.integers(0, 5), max_size=4).map(VectorClock)
_contexts = st.dictionaries(st.text(max_size=4), _clocks, max_size=4).map(CausalContext)


@given(_contexts)
def test_any_context_round_trips(ctx: CausalContext) -> None:
    assert CausalContext.decode(ctx.encode()) == ctx


@given(_contexts, _contexts, _contexts)
def test_merge_is_associative_commutative_idempotent(
        a: CausalContext, b: CausalContext, c: CausalContext) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a


@given(_contexts, st.text(max_size=4), st.sampled_from(["A", "B", "a"]))
def test_stamp_always_supersedes_the_required_clock(
        ctx: CausalContext, key: str, writer: str) -> None:
    write = ctx.stamp(key, writer, "v")
    assert write.clock.dominates(ctx.required(key))
    assert ctx.fresh_enough(key, write)
    # The write survives the store's raw codec with its clock and dependencies.
    stored = decode_lattice(encode_lattice(write), load=RAW)
    assert isinstance(stored, MultiKeyCausalLattice)
    assert stored.clock == write.clock
    assert stored.dependencies == write.dependencies
    after = CausalContext()
    after.observe(key, stored)
    for other, clock in ctx.clocks.items():
        if other != key:
            assert after.required(other).compare(clock) in ("after", "equal")


# ---------------------------------------------------------------- SessionResult


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_session_result_pickles(dumps: Any) -> None:
    ctx = CausalContext({"k": vc(A=2)})
    result = SessionResult({"answer": [1, frozenset({"a", "b"})]}, ctx.encode())
    back = pickle.loads(dumps(result))
    assert isinstance(back, SessionResult)
    assert back.value == {"answer": [1, frozenset({"a", "b"})]}
    assert back.causal == result.causal
    assert CausalContext.decode(back.causal) == ctx


def test_session_result_pickles_with_every_protocol() -> None:
    result = SessionResult(None, b"")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(result, protocol=protocol))
        assert back.value is None and back.causal == b""


# ---------------------------------------------------------------- bounds


def _clock(n: int) -> VectorClock:
    return vc(w=n)


def test_a_context_keeps_the_most_recently_touched_keys_and_says_it_forgot() -> None:
    ctx = CausalContext(max_keys=3)
    for i in range(3):
        ctx.observe(f"k{i}", causal(_clock(1)))
    assert not ctx.truncated
    ctx.observe("k0", causal(_clock(2)))  # touched again: now the newest
    ctx.observe("k3", causal(_clock(1)))
    assert list(ctx.clocks) == ["k2", "k0", "k3"] and ctx.truncated
    # A write's dependencies are bounded by the context.
    assert len(ctx.stamp("new", "w", b"v").dependencies) == 3


def test_a_truncated_context_trusts_only_the_store_for_keys_it_does_not_list() -> None:
    ctx = CausalContext(max_keys=1)
    ctx.observe("a", causal(_clock(1)))
    assert ctx.fresh_enough("b", None) and ctx.fresh_enough("b", LWWLattice(1, b"x"))
    ctx.observe("b", causal(_clock(1)))  # forgets "a"
    assert ctx.truncated
    assert not ctx.fresh_enough("a", causal(_clock(5)))  # maybe forgotten: ask the store
    ctx.observe("a", LWWLattice(1, b"x"))  # read from the store: listed again
    assert ctx.fresh_enough("a", LWWLattice(1, b"x"))


def test_truncation_survives_encoding_and_merging() -> None:
    ctx = CausalContext({"a": _clock(1)}, truncated=True)
    assert CausalContext.decode(ctx.encode()) == ctx
    assert CausalContext.decode(ctx.encode()) != CausalContext({"a": _clock(1)})
    assert CausalContext().merge(ctx).truncated and ctx.merge(CausalContext()).truncated


def test_decode_refuses_a_context_over_the_bound() -> None:
    plain = {f"k{i}": {"w": 1} for i in range(MAX_CONTEXT_KEYS + 1)}
    with pytest.raises(ProtocolError, match="at most"):
        CausalContext.decode(values.dumps(plain))


def test_a_client_keeps_a_bounded_number_of_sessions() -> None:
    core = ClientCore(max_sessions=2)
    seen = CausalContext({"k": _clock(1)}).encode()
    for session in ("s1", "s2", "s3"):
        core.finish(SessionResult(None, seen), session)
    assert list(core.sessions) == ["s2", "s3"] and core.forgot_sessions
    # A session the client may have forgotten starts truncated; a known one as it was.
    forgotten = core.dag_call("d", {}, False, CAUSAL, None, "s1", None)
    assert CausalContext.decode(forgotten.causal).truncated
    known = core.dag_call("d", {}, False, CAUSAL, None, "s3", None)
    assert CausalContext.decode(known.causal) == CausalContext({"k": _clock(1)})
