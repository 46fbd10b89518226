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

A context is bounded (:data:`MAX_CONTEXT_KEYS`): past that, the keys touched
least recently are forgotten and the context is marked *truncated*. A truncated
context no longer trusts a cached value of a key it does not list: that read
goes to the store (authoritative: it holds every acknowledged write), so the
guarantees hold and only the cache is skipped for such keys.
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

__all__ = ["CONSISTENCY_LEVELS", "MAX_CONTEXT_KEYS", "CausalContext", "SessionResult",
           "check_level"]

NORMAL = "NORMAL"
REPEATABLE_READ = "REPEATABLE_READ"
CAUSAL = "CAUSAL"
CONSISTENCY_LEVELS = (NORMAL, REPEATABLE_READ, CAUSAL)
#: Keys a causal context (and so a causal write's dependencies) lists at most.
MAX_CONTEXT_KEYS = 1024


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
    """The newest vector clock seen per key, by one run or one client session.

    Holds at most ``max_keys`` keys, least recently touched first out; a context
    that forgot a key is ``truncated`` (see the module docstring).
    """

    __slots__ = ("clocks", "max_keys", "truncated")

    def __init__(self, clocks: Mapping[str, VectorClock] | None = None, *,
                 truncated: bool = False, max_keys: int | None = None) -> None:
        self.clocks: dict[str, VectorClock] = {}
        self.truncated = truncated
        self.max_keys = MAX_CONTEXT_KEYS if max_keys is None else max_keys
        for key, clock in (clocks or {}).items():
            self._raise(key, clock)

    def required(self, key: str) -> VectorClock:
        return self.clocks.get(key) or VectorClock()

    def fresh_enough(self, key: str, lattice: Lattice | None) -> bool:
        """Whether a cached version is at least as new as what this context has seen.

        In a truncated context a key it does not list may have been forgotten:
        only the store's version is trusted for it.
        """
        need = self.clocks.get(key)
        if need is None:
            return not self.truncated
        if not len(need):
            return True
        clock = _clock_of(lattice) if lattice is not None else None
        return clock is not None and clock.compare(need) in ("after", "equal")

    def observe(self, key: str, lattice: Lattice | None) -> None:
        """Record a version read or written: its clock and its dependencies."""
        clock = _clock_of(lattice) if lattice is not None else None
        if clock is None:
            if self.truncated:
                # Read from the store (fresh_enough said so): later reads of
                # this key in the context may use the cache again.
                self._raise(key, VectorClock())
            return
        if isinstance(lattice, MultiKeyCausalLattice):
            for dep_key, dep_clock in lattice.dependencies.items():
                if isinstance(dep_key, str) and isinstance(dep_clock, VectorClock):
                    self._raise(dep_key, dep_clock)
        self._raise(key, clock)  # last: the key read or written is the most recent

    def _raise(self, key: str, clock: VectorClock) -> None:
        clocks = self.clocks
        old = clocks.pop(key, None)  # re-inserted last: the most recently touched
        if old is None and len(clocks) >= self.max_keys:
            del clocks[next(iter(clocks))]
            self.truncated = True
        clocks[key] = clock if old is None else old.merge(clock)

    def stamp(self, key: str, writer: str, value: Any) -> MultiKeyCausalLattice:
        """A write of ``value`` that supersedes every version of ``key`` seen so far.

        The executor passes the value already pickled (``bytes``), so values
        need not be hashable; see :func:`droplet.executor.user_library.reveal_stored`.
        """
        clock = self.required(key).increment(writer)
        deps = MapLattice({k: c for k, c in self.clocks.items() if k != key})
        return MultiKeyCausalLattice(clock, deps, [value])

    def merge(self, other: CausalContext) -> CausalContext:
        merged = CausalContext(self.clocks, truncated=self.truncated or other.truncated,
                               max_keys=self.max_keys)
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
        """A map of key -> clock; a truncated context is ``[map, True]``."""
        clocks = {k: c.reveal() for k, c in sorted(self.clocks.items())}
        return values.dumps([clocks, True] if self.truncated else clocks)

    @classmethod
    def decode(cls, data: bytes | None) -> CausalContext:
        """Parse a peer's context; malformed input is a ProtocolError."""
        if not data:
            return cls()
        plain = values.loads(data)
        truncated = False
        if type(plain) is list and len(plain) == 2 and plain[1] is True:
            plain, truncated = plain[0], True
        if type(plain) is not dict:
            raise ProtocolError("causal context must be a map of key -> clock")
        if len(plain) > MAX_CONTEXT_KEYS:
            raise ProtocolError(f"causal context lists {len(plain)} keys; "
                                f"at most {MAX_CONTEXT_KEYS} are allowed")
        clocks: dict[str, VectorClock] = {}
        for key, raw in plain.items():
            if type(key) is not str or type(raw) is not dict:
                raise ProtocolError("causal context must be a map of str key -> clock")
            try:
                clocks[key] = VectorClock(raw)
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"bad clock for {key!r} in causal context: {exc}") from exc
        return cls(clocks, truncated=truncated)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CausalContext) and self.clocks == other.clocks
                and self.truncated == other.truncated)

    def __repr__(self) -> str:
        return f"CausalContext({self.clocks!r}{', truncated=True' if self.truncated else ''})"


class SessionResult:
    """A CAUSAL run's result plus the context the client session continues from."""

    __slots__ = ("causal", "value")

    def __init__(self, value: Any, causal: bytes) -> None:
        self.value = value
        self.causal = causal

    def __reduce__(self) -> tuple[Any, ...]:
        return (SessionResult, (self.value, self.causal))
