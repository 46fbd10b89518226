"""The scheduler's registry as a KVS value, so registrations outlive a restart. Pure.

Functions' code already lives in the KVS (one LWW value per name); the
registry adds what the scheduler otherwise holds only in memory: which
functions are registered (name -> code version) and each DAG's definition.
It is one :class:`~droplet.lattices.MapLattice` under
:data:`~droplet.kvs.keys.REGISTRY_KEY`, ``"f/NAME"`` and ``"d/NAME"`` mapped
to LWW values, so each registration is a small merge (a one-entry map) and a
deleted DAG is an LWW tombstone (empty bytes) that a later registration
outranks. The values are JSON bytes: the store never unpickles anything.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ProtocolError
from ..lattices import RAW, LWWLattice, MapLattice, decode_lattice, encode_lattice
from .dags import Dag

__all__ = ["DagDefinition", "dag_entry", "decode_registry", "function_entry"]

#: (functions, connections, colocated) as given to build_dag
DagDefinition = tuple[list[str], list[list[str]], list[str]]


def _entry(name: str, value: bytes) -> bytes:
    return encode_lattice(MapLattice({name: LWWLattice.now(value)}), dump=RAW)


def function_entry(name: str, version: str) -> bytes:
    """The registry delta recording that ``name`` is registered with code ``version``."""
    return _entry("f/" + name, version.encode())


def dag_entry(name: str, dag: Dag | None) -> bytes:
    """The registry delta recording DAG ``name`` (None: deleted)."""
    if dag is None:
        return _entry("d/" + name, b"")
    definition = [list(dag.functions), [list(e) for e in dag.connections], list(dag.colocated)]
    return _entry("d/" + name, json.dumps(definition).encode())


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return value


def decode_registry(data: bytes) -> tuple[dict[str, str], dict[str, DagDefinition], list[str]]:
    """``(functions: name -> version, dags: name -> definition, problems)`` from the registry.

    Entries that do not decode (anyone holding the cluster token can write any
    key) are skipped and described in ``problems``, so one bad entry never
    keeps a scheduler from starting with the others.
    """
    try:
        registry = decode_lattice(data, load=RAW)
    except ProtocolError as exc:
        return {}, {}, [f"the registry does not decode: {exc}"]
    if not isinstance(registry, MapLattice):
        return {}, {}, [f"the registry is a {registry.type_name} lattice, not a Map"]
    functions: dict[str, str] = {}
    dags: dict[str, DagDefinition] = {}
    problems: list[str] = []
    for key, value in registry.items():
        raw = value.reveal() if isinstance(value, LWWLattice) else None
        kind, _, name = key.partition("/") if isinstance(key, str) else ("", "", "")
        try:
            if not isinstance(raw, bytes) or kind not in ("f", "d") or not name:
                raise ValueError("not a registry entry")
            if kind == "f":
                functions[name] = raw.decode()
            elif raw:
                fns, edges, colocated = json.loads(raw)
                dags[name] = (_strings(fns), [_strings(e) for e in edges], _strings(colocated))
        except (ValueError, TypeError) as exc:  # UnicodeDecodeError, JSONDecodeError included
            problems.append(f"entry {key!r}: {exc}")
    return functions, dags, problems
