"""DAG validation (scheduler/dags.py): pure, synchronous."""

from __future__ import annotations

import pytest

from droplet.errors import DagError
from droplet.scheduler.dags import Dag, build_dag

REGISTERED = {"a", "b", "c", "d", "e"}


def build(functions: list[str], connections: list[tuple[str, str]],
          colocated: tuple[str, ...] = ()) -> Dag:
    return build_dag("g", functions, connections, colocated, REGISTERED)


def test_single_function_dag() -> None:
    dag = build(["a"], [])
    assert dag.sink == "a"
    assert dag.sources == ("a",)
    assert dag.functions == ("a",)
    assert dag.upstream("a") == ()
    assert dag.downstream("a") == ()


def test_chain_is_topologically_ordered() -> None:
    dag = build(["c", "b", "a"], [("b", "c"), ("a", "b")])
    assert dag.functions == ("a", "b", "c")
    assert dag.sources == ("a",)
    assert dag.sink == "c"


def test_fan_out_and_fan_in() -> None:
    dag = build(["a", "b", "c", "d"], [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    assert dag.sources == ("a",)
    assert dag.sink == "d"
    assert dag.downstream("a") == ("b", "c")
    assert dag.functions.index("a") < dag.functions.index("b") < dag.functions.index("d")


def test_fan_in_upstream_order_is_connections_order() -> None:
    dag = build(["a", "b", "d"], [("b", "d"), ("a", "d")])
    assert dag.upstream("d") == ("b", "a")
    assert dag.connections == (("b", "d"), ("a", "d"))
    dag2 = build(["a", "b", "d"], [("a", "d"), ("b", "d")])
    assert dag2.upstream("d") == ("a", "b")


def test_connections_may_be_lists() -> None:
    dag = build_dag("g", ["a", "b"], [["a", "b"]], [], REGISTERED)
    assert dag.connections == (("a", "b"),)


def test_unknown_function() -> None:
    with pytest.raises(DagError, match=r"'zzz'.*not registered"):
        build(["a", "zzz"], [("a", "zzz")])


def test_cycle() -> None:
    with pytest.raises(DagError, match=r"cycle") as info:
        build(["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "b")])
    assert "'g'" in str(info.value)
    assert "b" in str(info.value) and "c" in str(info.value)


def test_two_node_cycle_with_no_sink_is_reported_as_a_cycle() -> None:
    with pytest.raises(DagError, match=r"cycle"):
        build(["a", "b"], [("a", "b"), ("b", "a")])


def test_self_loop() -> None:
    with pytest.raises(DagError, match=r"'a' is connected to itself"):
        build(["a", "b"], [("a", "a"), ("a", "b")])


def test_two_sinks() -> None:
    with pytest.raises(DagError, match=r"exactly one sink.*it has 2: .*b.*c"):
        build(["a", "b", "c"], [("a", "b"), ("a", "c")])


def test_disconnected_functions_are_two_sinks() -> None:
    with pytest.raises(DagError, match=r"exactly one sink"):
        build(["a", "b"], [])


def test_edge_naming_function_not_in_dag() -> None:
    # "c" is registered, but not one of this DAG's functions.
    with pytest.raises(DagError, match=r"names 'c', which is not one of the DAG's functions"):
        build(["a", "b"], [("a", "b"), ("b", "c")])
    with pytest.raises(DagError, match=r"names 'zzz'"):
        build(["a", "b"], [("zzz", "b")])


def test_duplicate_edge() -> None:
    with pytest.raises(DagError, match=r"\('a', 'b'\) appears twice"):
        build(["a", "b"], [("a", "b"), ("a", "b")])


def test_colocated_not_in_dag() -> None:
    with pytest.raises(DagError, match=r"colocated function 'c' is not in the DAG"):
        build(["a", "b"], [("a", "b")], ("a", "c"))


def test_colocated_kept() -> None:
    dag = build(["a", "b"], [("a", "b")], ("a", "b"))
    assert dag.colocated == ("a", "b")


def test_function_listed_twice() -> None:
    with pytest.raises(DagError, match=r"lists function 'a' twice"):
        build(["a", "a"], [])


def test_no_functions() -> None:
    with pytest.raises(DagError, match=r"no functions"):
        build([], [])


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_name(name: object) -> None:
    with pytest.raises(DagError, match=r"non-empty string"):
        build_dag(name, ["a"], [], (), REGISTERED)  # type: ignore[arg-type]


def test_non_string_function_name() -> None:
    with pytest.raises(DagError, match=r"must be strings"):
        build_dag("g", ["a", 3], [], (), REGISTERED)  # type: ignore[list-item]


def test_connection_not_a_pair() -> None:
    with pytest.raises(DagError, match=r"not a \(source, sink\) pair"):
        build_dag("g", ["a", "b"], [("a", "b", "c")], (), REGISTERED)


def test_same_shape() -> None:
    one = build(["a", "b"], [("a", "b")])
    assert one.same_shape(build(["b", "a"], [("a", "b")]))
    assert not one.same_shape(build(["a", "c"], [("a", "c")]))
    assert not one.same_shape(build(["a", "b"], [("a", "b")], ("a",)))


def test_ten_function_chain() -> None:
    names = [f"f{i}" for i in range(10)]
    dag = build_dag("chain", list(reversed(names)),
                    list(zip(names, names[1:], strict=False)), (), set(names))
    assert dag.functions == tuple(names)
    assert dag.sink == "f9"
    assert dag.sources == ("f0",)
