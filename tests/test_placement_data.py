"""Issue 10: data-aware placement and pluggable policies (pure, with fake reports)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from droplet import DropletReference
from droplet.client._core import MAX_REFERENCES_PER_FUNCTION, ClientCore
from droplet.config import Config
from droplet.errors import DropletError, ProtocolError
from droplet.protocol.messages import CallDag, decode, encode
from droplet.scheduler.dags import Dag, build_dag
from droplet.scheduler.placement import (
    Candidate,
    Context,
    DataPolicy,
    Placement,
    PlacementPolicy,
    SpreadPolicy,
    policy_class,
    register_policy,
)

MB = 1024 * 1024


def one(name: str = "f") -> Dag:
    return build_dag(name, [name], [], (), {name})


def chain(*names: str) -> Dag:
    return build_dag("g", list(names), list(zip(names, names[1:], strict=False)), (),
                     set(names))


def test_the_executor_caching_the_most_bytes_wins() -> None:
    executors = [Candidate("e1", cached={"a": MB}),
                 Candidate("e2", cached={"a": MB, "b": 10 * MB}),
                 Candidate("e3", cached={"c": 100 * MB})]
    policy = DataPolicy()
    for _ in range(5):  # whatever the round-robin turn
        assert policy.place(one(), executors, {"f": ["a", "b"]}) == {"f": "e2"}
        assert policy.place(one(), executors, {"f": ["a"]})["f"] in {"e1", "e2"}
        assert policy.place(one(), executors, {"f": ["c", "a"]}) == {"f": "e3"}


def test_ties_are_broken_by_load() -> None:
    executors = [Candidate("e1", running=3, cached={"a": MB}),
                 Candidate("e2", running=1, cached={"a": MB}),
                 Candidate("e3", running=0)]
    assert DataPolicy().place(one(), executors, {"f": ["a"]}) == {"f": "e2"}


def test_a_backed_up_executor_is_skipped() -> None:
    executors = [Candidate("e1", running=40, threads=4, cached={"a": 10 * MB}),
                 Candidate("e2", running=1, threads=4, cached={"a": MB}),
                 Candidate("e3", running=0, threads=4)]
    assert DataPolicy(max_queue=8).place(one(), executors, {"f": ["a"]}) == {"f": "e2"}
    # A reported queue counts too.
    queued = [Candidate("e1", queued=20, cached={"a": MB}), Candidate("e2")]
    assert DataPolicy(max_queue=8).place(one(), queued, {"f": ["a"]}) == {"f": "e2"}
    # Everyone backed up: the least loaded of them all.
    busy = [Candidate("e1", queued=20, running=5), Candidate("e2", queued=30, running=2)]
    assert DataPolicy(max_queue=8).place(one(), busy, {"f": ["a"]}) == {"f": "e2"}


def test_without_cached_references_it_is_locality() -> None:
    executors = [Candidate("e1", running=2), Candidate("e2", running=0)]
    policy = DataPolicy()
    assert policy.place(one(), executors, {"f": ["nowhere"]}) == {"f": "e2"}
    where = policy.place(chain("a", "b", "c"), executors)
    assert len(set(where.values())) == 1  # a pipeline stays on one executor
    # A referenced step leaves the pipeline for its data.
    data = [Candidate("e1"), Candidate("e2", running=5, cached={"k": MB})]
    where = policy.place(chain("a", "b"), data, {"b": ["k"]})
    assert where == {"a": "e1", "b": "e2"}


def test_gpu_and_colocation_still_hold() -> None:
    dag = build_dag("g", ["a", "b"], [("a", "b")], ("a", "b"), {"a", "b"},
                    gpu_functions=("b",))
    executors = [Candidate("cpu", cached={"k": MB}), Candidate("gpu", gpu=True)]
    assert DataPolicy().place(dag, executors, {"a": ["k"]}) == {"a": "gpu", "b": "gpu"}


def test_no_executors_and_bad_choices_are_clear_errors() -> None:
    with pytest.raises(DropletError, match="no executors"):
        DataPolicy().place(one(), [])

    class Wrong(PlacementPolicy):
        def choose(self, pool: Sequence[Candidate], context: Context) -> str:
            return "elsewhere"

    with pytest.raises(DropletError, match="not an eligible executor"):
        Wrong().place(one(), [Candidate("e1")])
    with pytest.raises(ValueError, match="negative"):
        DataPolicy(max_queue=-1)


def test_policies_plug_in_by_name_or_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # A registry of this test's own: the policy it adds must not outlive it
    # (test_placement.py lists the known policies in an error message).
    from droplet.scheduler import placement

    monkeypatch.setattr(placement, "_REGISTRY", dict(placement._REGISTRY))

    @register_policy
    class First(PlacementPolicy):
        name = "first-test"

        def choose(self, pool: Sequence[Candidate], context: Context) -> str:
            return sorted(c.url for c in pool)[0]

    assert Placement("first-test").place(one(), ["e2", "e1"], {}) == {"f": "e1"}
    assert policy_class("droplet.scheduler.placement:SpreadPolicy") is SpreadPolicy
    assert Config(placement="first-test").placement == "first-test"
    assert Config(placement="droplet.scheduler.placement:DataPolicy").placement
    with pytest.raises(ValueError, match="cannot be loaded"):
        policy_class("droplet.nowhere:Policy")
    with pytest.raises(ValueError, match="not a PlacementPolicy"):
        policy_class("droplet.config:Config")
    with pytest.raises(ValueError, match="unknown placement policy 'nearest'"):
        Config(placement="nearest")
    with pytest.raises(ValueError, match="needs a `name`"):
        register_policy(SpreadPolicy.__base__)  # type: ignore[arg-type]


def test_calls_name_their_references() -> None:
    call = ClientCore.function_call("f", [DropletReference("a"), 1, DropletReference("a"),
                                          DropletReference("b")])
    assert call.references == [["a", "b"]]
    assert ClientCore.function_call("f", [1]).references == []
    many = ClientCore.function_call("f", [DropletReference(f"k{i}") for i in range(100)])
    assert len(many.references[0]) == MAX_REFERENCES_PER_FUNCTION
    assert decode(encode(call))[0] == call
    bad = CallDag("f", True, ["f"], [b""], references=[["a"], ["b"]])
    with pytest.raises(ProtocolError, match="reference lists"):
        decode(encode(bad))


def test_random_placement_uses_every_eligible_executor() -> None:
    from droplet.scheduler.placement import RandomPolicy

    policy = RandomPolicy(seed=1)
    executors = [Candidate("e1", cached={"a": MB}), Candidate("e2")]
    seen = {policy.place(one(), executors, {"f": ["a"]})["f"] for _ in range(50)}
    assert seen == {"e1", "e2"}
