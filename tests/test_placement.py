"""Placement policies (scheduler/placement.py): pure, synchronous."""

from __future__ import annotations

import pytest

from droplet.errors import DropletError
from droplet.scheduler.dags import Dag, build_dag
from droplet.scheduler.placement import POLICIES, Placement

EXECUTORS = ["tcp://e1", "tcp://e2", "tcp://e3"]


def dag(functions: list[str], connections: list[tuple[str, str]],
        colocated: tuple[str, ...] = ()) -> Dag:
    return build_dag("g", functions, connections, colocated, set(functions))


def chain(n: int) -> Dag:
    names = [f"f{i}" for i in range(n)]
    return dag(names, list(zip(names, names[1:], strict=False)))


def test_policies() -> None:
    assert set(POLICIES) == {"data", "locality", "spread"}
    assert Placement().policy == "data"


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match=r"'nearest'.*data, locality, random, spread"):
        Placement("nearest")


@pytest.mark.parametrize("policy", POLICIES)
def test_no_executors_is_a_clear_error(policy: str) -> None:
    with pytest.raises(DropletError, match=r"no executors.*--role executor"):
        Placement(policy).place(chain(2), [], {})


@pytest.mark.parametrize("policy", POLICIES)
def test_every_function_placed_on_a_known_executor(policy: str) -> None:
    d = dag(["a", "b", "c", "d"], [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    where = Placement(policy).place(d, EXECUTORS, {})
    assert set(where) == {"a", "b", "c", "d"}
    assert set(where.values()) <= set(EXECUTORS)


def test_locality_keeps_a_pipeline_on_one_executor() -> None:
    placement = Placement("locality")
    for _ in range(5):  # whatever the round-robin turn
        where = placement.place(chain(10), EXECUTORS, {})
        assert len(set(where.values())) == 1


def test_spread_spreads_a_pipeline() -> None:
    where = Placement("spread").place(chain(3), EXECUTORS, {})
    assert len(set(where.values())) == 3


def test_spread_uses_every_executor_for_parallel_functions() -> None:
    d = dag(["a", "b", "c", "d"], [("a", "d"), ("b", "d"), ("c", "d")])
    where = Placement("spread").place(d, EXECUTORS, {})
    assert {where["a"], where["b"], where["c"]} == set(EXECUTORS)


def test_locality_does_not_pin_fan_out_branches_to_the_source() -> None:
    # a feeds two functions, so neither is a pipeline step of a: they go to the
    # least-loaded executors, not automatically to a's.
    d = dag(["a", "b", "c", "d"], [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    where = Placement("locality").place(d, EXECUTORS, {})
    assert where["b"] != where["a"]


@pytest.mark.parametrize("policy", POLICIES)
def test_least_loaded_executor_is_chosen(policy: str) -> None:
    where = Placement(policy).place(chain(1), EXECUTORS, {"tcp://e1": 4, "tcp://e2": 0,
                                                          "tcp://e3": 2})
    assert where == {"f0": "tcp://e2"}


@pytest.mark.parametrize("policy", POLICIES)
def test_colocated_functions_share_an_executor(policy: str) -> None:
    d = dag(["a", "b", "c", "d"], [("a", "d"), ("b", "d"), ("c", "d")], ("a", "c"))
    where = Placement(policy).place(d, EXECUTORS, {})
    assert where["a"] == where["c"]


@pytest.mark.parametrize("policy", POLICIES)
def test_colocated_chain_shares_an_executor(policy: str) -> None:
    where = Placement(policy).place(
        dag(["a", "b", "c"], [("a", "b"), ("b", "c")], ("a", "b", "c")), EXECUTORS, {})
    assert len(set(where.values())) == 1


def test_round_robin_among_equally_loaded_executors() -> None:
    placement = Placement("spread")
    chosen = {placement.place(chain(1), EXECUTORS, {})["f0"] for _ in range(3)}
    assert chosen == set(EXECUTORS)


def test_place_does_not_mutate_running() -> None:
    running = {"tcp://e1": 1}
    Placement("spread").place(chain(3), EXECUTORS, running)
    assert running == {"tcp://e1": 1}
