"""The public surface is exactly what API.md promises, importable from the documented paths."""

from __future__ import annotations

import builtins
import importlib
import pickle

import pytest

import droplet
import droplet.errors

# (module path, name) for every name API.md documents.
API_NAMES = [
    ("droplet", "DropletConnection"),
    ("droplet.client.client", "DropletConnection"),
    ("droplet", "LocalCluster"),
    ("droplet", "open_local_cluster"),
    ("droplet", "AsyncDropletClient"),
    ("droplet", "DropletReference"),
    ("droplet", "NORMAL"),
    ("droplet", "REPEATABLE_READ"),
    ("droplet", "CAUSAL"),
    ("droplet", "wait"),
    ("droplet", "as_completed"),
    ("droplet", "wait_async"),
    ("droplet", "as_completed_async"),
    ("droplet", "FIRST_COMPLETED"),
    ("droplet", "FIRST_EXCEPTION"),
    ("droplet", "ALL_COMPLETED"),
    ("droplet.client.waiting", "wait"),
    ("droplet.node", "cluster_info"),
    ("droplet.cli", "main"),
    ("droplet", "ClusterStatus"),
    ("droplet", "ExecutorStatus"),
    ("droplet", "FunctionStatus"),
    ("droplet.status", "ClusterStatus"),
    *[
        ("droplet.lattices", name)
        for name in (
            "LWWLattice",
            "SetLattice",
            "OrderedSetLattice",
            "MaxLattice",
            "MapLattice",
            "VectorClock",
            "SingleKeyCausalLattice",
            "MultiKeyCausalLattice",
            "PriorityLattice",
        )
    ],
]

ERROR_NAMES = [
    "DropletError",
    "ConnectionError",
    "AuthenticationError",
    "RegistrationError",
    "DagError",
    "FunctionError",
    "TimeoutError",
    "ProtocolError",
    "LatticeTypeError",
]


@pytest.mark.parametrize(("module", "name"), API_NAMES, ids=[f"{m}.{n}" for m, n in API_NAMES])
def test_api_name_imports_from_documented_path(module: str, name: str) -> None:
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"{module}.{name} is documented in API.md but missing"


def test_sync_client_is_the_same_class_at_both_paths() -> None:
    from droplet.client.client import DropletConnection

    assert droplet.DropletConnection is DropletConnection


def test_wait_constants_match_concurrent_futures() -> None:
    import concurrent.futures as cf

    assert droplet.FIRST_COMPLETED == cf.FIRST_COMPLETED
    assert droplet.FIRST_EXCEPTION == cf.FIRST_EXCEPTION
    assert droplet.ALL_COMPLETED == cf.ALL_COMPLETED


def test_map_is_on_every_client() -> None:
    for cls in (droplet.DropletConnection, droplet.DropletFunction,
                droplet.AsyncDropletClient, droplet.AsyncDropletFunction):
        assert callable(getattr(cls, "map", None)), cls


def test_consistency_levels_are_distinct() -> None:
    levels = {droplet.NORMAL, droplet.REPEATABLE_READ, droplet.CAUSAL}
    assert len(levels) == 3


def test_lattice_names_have_reveal_and_merge() -> None:
    import droplet.lattices as lattices

    for _, name in API_NAMES:
        if hasattr(lattices, name) and name.endswith(("Lattice", "Clock")):
            cls = getattr(lattices, name)
            assert callable(getattr(cls, "reveal", None)), name
            assert callable(getattr(cls, "merge", None)), name


def test_dunder_all_lists_only_real_names() -> None:
    for name in droplet.__all__:
        assert hasattr(droplet, name), name
    assert len(set(droplet.__all__)) == len(droplet.__all__)
    for module, name in API_NAMES:
        if module == "droplet":
            assert name in droplet.__all__, name
    for name in ERROR_NAMES:
        assert name in droplet.__all__, name
        assert name in droplet.errors.__all__, name


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_error_is_reexported_from_droplet(name: str) -> None:
    assert getattr(droplet, name) is getattr(droplet.errors, name)


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_error_has_public_module(name: str) -> None:
    cls = getattr(droplet.errors, name)
    assert cls.__module__ == "droplet.errors"
    assert cls.__qualname__ == name


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_error_tree(name: str) -> None:
    cls = getattr(droplet.errors, name)
    assert issubclass(cls, droplet.DropletError)
    assert issubclass(cls, Exception)


def test_errors_also_match_the_builtin_they_shadow() -> None:
    assert issubclass(droplet.ConnectionError, builtins.ConnectionError)
    assert issubclass(droplet.TimeoutError, builtins.TimeoutError)
    assert issubclass(droplet.LatticeTypeError, TypeError)


@pytest.mark.parametrize("name", [n for n in ERROR_NAMES if n != "FunctionError"])
def test_error_pickle_round_trip(name: str) -> None:
    cls = getattr(droplet.errors, name)
    err = cls(f"something about {name}")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err)
    assert back.args == err.args


def test_function_error_pickle_round_trip_keeps_attributes() -> None:
    cause = pickle.dumps(ValueError("bad input 3"))
    err = droplet.FunctionError(
        "ValueError", "bad input 3", "Traceback...\n  raise ValueError\n", "square", cause
    )
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is droplet.FunctionError
    assert back.type_name == "ValueError"
    assert back.remote_message == "bad input 3"
    assert back.remote_traceback == "Traceback...\n  raise ValueError\n"
    assert back.function == "square"
    assert back.cause_pickle == cause
    assert str(back) == str(err)
    text = str(back)
    assert "ValueError" in text and "bad input 3" in text and "'square'" in text
    assert "raise ValueError" in text  # the remote traceback is shown


def test_function_error_without_optional_attributes() -> None:
    err = droplet.FunctionError("KeyError", "'k'")
    back = pickle.loads(pickle.dumps(err))
    assert (back.type_name, back.remote_message, back.remote_traceback, back.function,
            back.cause_pickle) == ("KeyError", "'k'", "", "", None)
    assert str(back) == "KeyError: 'k'"


def test_status_methods_exist_on_every_client() -> None:
    from droplet.client.client import DropletConnection

    for cls in (DropletConnection, droplet.AsyncDropletClient):
        assert callable(cls.status) and callable(cls.list_dags), cls
    assert droplet.ClusterStatus.__module__ == "droplet.status"
