"""Lattices: the mergeable values Droplet stores, caches and passes around.

Every lattice has ``reveal()`` (the plain value a user reads) and
``merge(other)`` (associative, commutative, idempotent; returns a new lattice),
and round-trips through :func:`encode_lattice` / :func:`decode_lattice`.
This package is pure: no trio, no I/O.
"""

from .base import Lattice as Lattice
from .causal import MultiKeyCausalLattice as MultiKeyCausalLattice
from .causal import SingleKeyCausalLattice as SingleKeyCausalLattice
from .causal import VectorClock as VectorClock
from .codec import RAW as RAW
from .codec import decode_lattice as decode_lattice
from .codec import encode_lattice as encode_lattice
from .codec import lattice_type_name as lattice_type_name
from .lww import WRITER_ID as WRITER_ID
from .lww import LWWLattice as LWWLattice
from .lww import next_timestamp as next_timestamp
from .maps import MapLattice as MapLattice
from .priority import PriorityLattice as PriorityLattice
from .sets import MaxLattice as MaxLattice
from .sets import OrderedSetLattice as OrderedSetLattice
from .sets import SetLattice as SetLattice

__all__ = [
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
