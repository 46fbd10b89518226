"""Consistency levels: the pure bookkeeping behind REPEATABLE_READ and CAUSAL.

No I/O here; the executor and client call into it.

- ``NORMAL``: read the latest value the executor's cache knows.
- ``REPEATABLE_READ``: the first read of a key in a DAG run *pins* the version
  in the storage tier's version store (keyed by run id); every later read of
  that key by any function of the run, on any executor, gets the pinned
  version. The scheduler releases the run's pins when the run ends.
- ``CAUSAL``: values are :class:`~droplet.lattices.MultiKeyCausalLattice`
  (vector clock, the clocks of the keys the writer had read, the value). A
  :class:`CausalContext` (key -> the newest clock seen) travels with the run
  and, with ``client_id``, with the client session across calls: a read whose
  version is older than the context requires is refetched from the store, so
  a session reads its own writes and never goes back in time, and reading a
  value pulls its dependencies into the context (causal snapshot). Writes
  increment the context's clock, so concurrent writers keep both values and
  a write that saw both replaces them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ProtocolError
from .lattices import (
    Lattice,
    MapLattice,
    MultiKeyCausalLattice,
    SingleKeyCausalLattice,
    VectorClock,
)
from .protocol import values

__all__ = ["CONSISTENCY_LEVELS", "CausalContext", "SessionResult", "check_level"]

NORMAL = "NORMAL"
REPEATABLE_READ = "REPEATABLE_READ"
CAUSAL = "CAUSAL"
CONSISTENCY_LEVELS = (NORMAL, REPEATABLE_READ, CAUSAL)


def check_level(level: str) -> str:
    if level not in CONSISTENCY_LEVELS:
        raise ValueError(
            f"unknown consistency level {level!r}; use one of {', '.join(CONSISTENCY_LEVELS)}")
    return level


def _clock_of(lattice: Lattice) -> VectorClock | None:
    if isinstance(lattice, MultiKeyCausalLattice | SingleKeyCausalLattice):
        return lattice.clock
    return None


class CausalContext:
    """The newest vector clock seen per key, by one run or one client session."""

    __slots__ = ("clocks",)

    def __init__(self, clocks: Mapping[str, VectorClock] | None = None) -> None:
        self.clocks: dict[str, VectorClock] = dict(clocks or {})

    def required(self, key: str) -> VectorClock:
        return self.clocks.get(key) or VectorClock()

    def fresh_enough(self, key: str, lattice: Lattice | None) -> bool:
        """Whether a stored version is at least as new as what this context has seen."""
        need = self.clocks.get(key)
        if need is None or not len(need):
            return True
        clock = _clock_of(lattice) if lattice is not None else None
        return clock is not None and clock.compare(need) in ("after", "equal")

    def observe(self, key: str, lattice: Lattice | None) -> None:
        """Record a version read or written: its clock and its dependencies."""
        if lattice is None:
            return
        clock = _clock_of(lattice)
        if clock is None:
            return
        self._raise(key, clock)
        if isinstance(lattice, MultiKeyCausalLattice):
            for dep_key, dep_clock in lattice.dependencies.items():
                if isinstance(dep_key, str) and isinstance(dep_clock, VectorClock):
                    self._raise(dep_key, dep_clock)

    def _raise(self, key: str, clock: VectorClock) -> None:
        old = self.clocks.get(key)
        self.clocks[key] = clock if old is None else old.merge(clock)

    def stamp(self, key: str, writer: str, value: Any) -> MultiKeyCausalLattice:
        """A write of ``value`` that supersedes every version of ``key`` seen so far.

        The executor passes the value already pickled (``bytes``), so values
        need not be hashable; see :func:`droplet.executor.user_library.reveal_stored`.
        """
        clock = self.required(key).increment(writer)
        deps = MapLattice({k: c for k, c in self.clocks.items() if k != key})
        return MultiKeyCausalLattice(clock, deps, [value])

    def merge(self, other: CausalContext) -> CausalContext:
        merged = CausalContext(self.clocks)
        for key, clock in other.clocks.items():
            merged._raise(key, clock)
        return merged

    @classmethod
    def merge_all(cls, contexts: Iterable[CausalContext]) -> CausalContext:
        result = cls()
        for ctx in contexts:
            result = result.merge(ctx)
        return result

    def encode(self) -> bytes:
        return values.dumps({k: c.reveal() for k, c in sorted(self.clocks.items())})

    @classmethod
    def decode(cls, data: bytes | None) -> CausalContext:
        """Parse a peer's context; malformed input is a ProtocolError."""
        if not data:
            return cls()
        plain = values.loads(data)
        if type(plain) is not dict:
            raise ProtocolError("causal context must be a map of key -> clock")
        clocks: dict[str, VectorClock] = {}
        for key, raw in plain.items():
            if type(key) is not str or type(raw) is not dict:
                raise ProtocolError("causal context must be a map of str key -> clock")
            try:
                clocks[key] = VectorClock(raw)
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"bad clock for {key!r} in causal context: {exc}") from exc
        return cls(clocks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CausalContext) and self.clocks == other.clocks

    def __repr__(self) -> str:
        return f"CausalContext({self.clocks!r})"


class SessionResult:
    """A CAUSAL run's result plus the context the client session continues from."""

    __slots__ = ("causal", "value")

    def __init__(self, value: Any, causal: bytes) -> None:
        self.value = value
        self.causal = causal

    def __reduce__(self) -> tuple[Any, ...]:
        return (SessionResult, (self.value, self.causal))
