"""The pure parts of Cloudburst compatibility: DAG argument checks, multi-exec, batching."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import trio
import trio.testing

from droplet.config import Config, parse_resources
from droplet.errors import DagError, FunctionError, _Failure
from droplet.executor.batching import Batcher
from droplet.executor.multiexec import MultiExec, is_invalid, spread
from droplet.executor.user_library import reveal_stored, user_lattice
from droplet.lattices import RAW, OrderedSetLattice, SetLattice, encode_lattice
from droplet.scheduler.dags import build_dag, check_dag_arguments

# --------------------------------------------------------------------------- register_dag


def test_functions_may_be_names_or_multiexec_pairs() -> None:
    args = check_dag_arguments("d", ["a", ("b", [None, -1])], [("a", "b")], ["a"], ["b"], ["a"])
    assert args.functions == ["a", "b"]
    assert args.multiexec == {"b": [None, -1]}
    assert args.connections == [["a", "b"]]
    assert (args.colocated, args.gpu_functions, args.batching_functions) == (["a"], ["b"], ["a"])


@pytest.mark.parametrize(("call", "match"), [
    (lambda: check_dag_arguments(3, ["a"], []), "DAG name"),
    (lambda: check_dag_arguments("d", "ab", []), "functions must be a list"),
    (lambda: check_dag_arguments("d", ["a", 7], []), "function 7 is not a function name"),
    (lambda: check_dag_arguments("d", [("a",)], []), r"\(name, invalid_results\)"),
    (lambda: check_dag_arguments("d", [("a", None)], []), "invalid results of 'a'"),
    (lambda: check_dag_arguments("d", ["a", "b"], [("a", 2)]), "names 2"),
    (lambda: check_dag_arguments("d", ["a", "b"], [("a", "b", "c")]), "not a .source, sink"),
    (lambda: check_dag_arguments("d", ["a", "b"], "ab"), "connections must be a list"),
    (lambda: check_dag_arguments("d", ["a"], [], colocated="a"), "colocated must be a list"),
    (lambda: check_dag_arguments("d", ["a"], [], gpu_functions=[1]), "gpu_functions entry 1"),
])
def test_wrong_argument_types_are_dag_errors_naming_them(call: Any, match: str) -> None:
    with pytest.raises(DagError, match=match):
        call()


def test_extra_function_lists_must_name_dag_functions() -> None:
    with pytest.raises(DagError, match="gpu function 'x' is not in the DAG"):
        build_dag("d", ["a"], [], (), {"a"}, gpu_functions=["x"])
    with pytest.raises(DagError, match="batching function 'x'"):
        build_dag("d", ["a"], [], (), {"a"}, batching_functions=["x"])
    with pytest.raises(DagError, match="multi-exec function 'x'"):
        build_dag("d", ["a"], [], (), {"a"}, multiexec=["x"], invalid_results=[b""])


def test_a_dag_with_other_multiexec_results_is_another_shape() -> None:
    one = build_dag("d", ["a"], [], (), {"a"}, multiexec=["a"],
                    invalid_results=[pickle.dumps([None])])
    two = build_dag("d", ["a"], [], (), {"a"}, multiexec=["a"],
                    invalid_results=[pickle.dumps([0])])
    assert one.same_shape(one) and not one.same_shape(two)
    assert not one.same_shape(build_dag("d", ["a"], [], (), {"a"}))


# --------------------------------------------------------------------------- results downstream


def test_a_tuple_result_spreads_into_arguments() -> None:
    assert spread((1, 2)) == [1, 2]
    assert spread([1, 2]) == [[1, 2]]
    assert spread(None) == [None]
    assert spread(()) == []


def test_invalid_results_compare_by_value_and_fall_back_to_pickles() -> None:
    assert is_invalid(None, [None])
    assert not is_invalid(0, [None, False])  # 0 == False, but not the same type
    assert is_invalid("x", ["y", "x"])

    class NoBool:
        def __eq__(self, other: object) -> Any:
            raise ValueError("ambiguous")

    assert not is_invalid(NoBool(), [1])


def test_multiexec_sends_the_first_valid_result_once() -> None:
    m = MultiExec()
    invalid = pickle.dumps([None])
    assert m.outcome("r", "f", 3, None, False, invalid) is None  # invalid: nothing
    assert m.outcome("r", "f", 3, 1, False, invalid) == (1, False)  # first valid: sent
    assert m.outcome("r", "f", 3, 2, False, invalid) is None  # later duplicate: dropped
    # the run's attempts are all in: the next run starts afresh
    assert m.outcome("r", "f", 3, 5, False, invalid) == (5, False)


def test_multiexec_with_only_invalid_results_fails_the_run() -> None:
    m = MultiExec()
    invalid = pickle.dumps([None])
    assert m.outcome("r", "f", 2, None, False, invalid) is None
    value, failed = m.outcome("r", "f", 2, None, False, invalid) or (None, False)
    assert failed and isinstance(value, _Failure)
    assert "invalid results" in str(value.error)


def test_multiexec_passes_on_a_failure_when_nothing_valid_came() -> None:
    m = MultiExec()
    invalid = pickle.dumps([None])
    boom = _Failure(FunctionError("ValueError", "boom"))
    assert m.outcome("r", "f", 2, boom, True, invalid) is None
    assert m.outcome("r", "f", 2, None, False, invalid) == (boom, True)
    # a valid result still wins over an earlier failure
    assert m.outcome("s", "f", 2, boom, True, invalid) is None
    assert m.outcome("s", "f", 2, 3, False, invalid) == (3, False)


# --------------------------------------------------------------------------- user library rules


def test_put_stores_sets_and_lists_as_mergeable_lattices() -> None:
    lattice, raw = user_lattice({1, 2})
    assert lattice == SetLattice({1, 2}) and not raw
    lattice, raw = user_lattice([{"b": 1}, {"a": 2}])  # unorderable values are fine
    assert isinstance(lattice, OrderedSetLattice) and raw
    assert sorted(map(pickle.loads, lattice.reveal()), key=str) == [{"a": 2}, {"b": 1}]
    lattice, raw = user_lattice(frozenset({1}))  # only a set: anything else is one value
    assert lattice.reveal() == frozenset({1}) and not raw


def test_a_stored_list_reads_back_as_a_sorted_list() -> None:
    lattice, _ = user_lattice([3, 1, 2, 3])
    data = encode_lattice(lattice, dump=RAW)
    assert reveal_stored(data) == [1, 2, 3]
    assert reveal_stored(data, deserialize=False).reveal() == [1, 2, 3]


# --------------------------------------------------------------------------- batching


async def test_calls_queued_during_a_batch_run_together_within_the_bound() -> None:
    gate = trio.Event()
    seen: list[list[int]] = []

    async def model(lib: Any, xs: list[int], ys: list[int]) -> list[int]:
        seen.append(list(xs))
        if len(seen) == 1:
            await gate.wait()
        return [x * y for x, y in zip(xs, ys, strict=True)]

    async def no_thread(fn: Any, *args: Any) -> Any:
        raise AssertionError("async targets run in the event loop")

    results: dict[int, Any] = {}
    async with trio.open_nursery() as nursery:
        batcher = Batcher(nursery, no_thread, lambda exc, fn: FunctionError("E", str(exc)),
                          max_batch=2)

        async def one(x: int) -> None:
            results[x] = await batcher.call("model", "v1", model, True, None, [x, 10])

        nursery.start_soon(one, 0)
        await trio.testing.wait_all_tasks_blocked()
        for x in range(1, 6):
            nursery.start_soon(one, x)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert [len(batch) for batch in seen] == [1, 2, 2, 1]
    assert results == {x: (x * 10, False) for x in range(6)}
    assert batcher.statistics().batches == 4 and batcher.statistics().largest == 2


async def test_a_batch_result_of_the_wrong_length_fails_every_call() -> None:
    async def run_in_thread(fn: Any, *args: Any) -> Any:
        return fn(*args)

    async with trio.open_nursery() as nursery:
        batcher = Batcher(nursery, run_in_thread, lambda exc, fn: FunctionError("E", str(exc)))
        value, failed = await batcher.call("m", "v", lambda lib, xs: 42, False, None, [1])
    assert failed and "must return a list of 1 results" in str(value.error)


async def test_a_batch_that_raises_fails_every_call_with_the_error() -> None:
    def broken(lib: Any, xs: list[int]) -> list[int]:
        raise ValueError("bad batch")

    async def run_in_thread(fn: Any, *args: Any) -> Any:
        return fn(*args)

    async with trio.open_nursery() as nursery:
        batcher = Batcher(nursery, run_in_thread,
                          lambda exc, fn: FunctionError(type(exc).__name__, str(exc)))
        value, failed = await batcher.call("m", "v", broken, False, None, [1])
    assert failed and "bad batch" in str(value.error)


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(None, None, None, max_batch=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch"):
        Config(max_batch=0)


# --------------------------------------------------------------------------- resources


def test_resources_from_flags_and_toml() -> None:
    assert parse_resources("gpu=2,tpu=1") == {"gpu": 2, "tpu": 1}
    assert Config(resources={"gpu": 1}).resources == "gpu=1"
    assert Config(resources="gpu").resources == "gpu=1"
    for bad in ("gpu=many", "=1", "gpu=-1"):
        with pytest.raises(ValueError, match="NAME=COUNT"):
            parse_resources(bad)
