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


def decode_registry(data: bytes) -> tuple[dict[str, str], dict[str, DagDefinition]]:
    """``(functions: name -> version, dags: name -> definition)`` from the registry value.

    Raises:
        ProtocolError: ``data`` is not a registry.
    """
    registry = decode_lattice(data, load=RAW)
    if not isinstance(registry, MapLattice):
        raise ProtocolError(f"the registry is a {registry.type_name} lattice, not a Map")
    functions: dict[str, str] = {}
    dags: dict[str, DagDefinition] = {}
    for key, value in registry.items():
        if not isinstance(key, str) or not isinstance(value, LWWLattice):
            raise ProtocolError(f"unexpected registry entry {key!r}")
        raw = value.reveal()
        if not isinstance(raw, bytes):
            raise ProtocolError(f"registry entry {key!r} is not bytes")
        kind, _, name = key.partition("/")
        if kind == "f":
            functions[name] = raw.decode()
        elif kind == "d" and raw:
            try:
                fns, edges, colocated = json.loads(raw)
                definition = (_strings(fns), [_strings(e) for e in edges], _strings(colocated))
            except ValueError as exc:
                raise ProtocolError(f"registry entry {key!r} does not decode: {exc}") from exc
            dags[name] = definition
    return functions, dags
