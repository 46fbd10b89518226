"""What a run reads and writes, as its consistency level allows (the executor's part).

The executor's user libraries (``lib.get``/``lib.put``) and reference
arguments read and write through these methods of :class:`ExecutorService`:
NORMAL reads whatever the executor's cache holds (fresh through its
subscriptions), REPEATABLE_READ pins the version a run first read, and CAUSAL
refreshes a cached value that is behind what the run or session has seen, and
stamps writes with the run's causal context.
"""

from __future__ import annotations

from typing import Any

from ..consistency import REPEATABLE_READ
from ..lattices import RAW, Lattice, decode_lattice
from ..protocol.messages import KvsGet, KvsValue
from ..rpc import Peer
from ..serialization import dumps
from .cache import Cache, Counts
from .cache_service import RemoteCache
from .steps import RunContext
from .user_library import as_lattice, reveal_stored

__all__ = ["RunState"]


class RunState:
    """Reads and writes of runs (a part of :class:`~droplet.executor.service.ExecutorService`)."""

    cache: Cache | RemoteCache
    _kvs: Peer
    _cache_counts: Counts

    def read_local(self, key: str, run: RunContext) -> tuple[bool, bytes | None]:
        """``read`` without I/O, when what this executor holds is enough.

        Returns ``(True, data)`` when the answer is known here (a version the run
        pinned, or a cached value fresh enough for the run), else ``(False, None)``.
        Pure and callable from a worker thread: a segment's functions run one at
        a time, so nothing else touches ``run`` meanwhile.
        """
        if run.consistency == REPEATABLE_READ:
            if key in run.pins:
                return True, run.pins[key]
            return False, None
        data = self.cache.peek(key)
        if data is None:
            return False, None
        if run.causal is not None:
            lattice = decode_lattice(data, load=RAW)
            if not run.causal.fresh_enough(key, lattice):
                return False, None
            run.causal.observe(key, lattice)
        return True, data

    def read_local_value(self, key: str, run: RunContext, deserialize: bool
                         ) -> tuple[bool, Any]:
        """``read_local``, decoded: ``(True, value)`` when known here without I/O."""
        if deserialize and run.consistency != REPEATABLE_READ and run.causal is None:
            return self.cache.peek_value(key)
        known, data = self.read_local(key, run)
        return known, (reveal_stored(data, deserialize) if known else None)

    async def read_value(self, key: str, run: RunContext, deserialize: bool = True) -> Any:
        """The value of ``key`` as a function receives it (``get``, a reference).

        Under NORMAL consistency an immutable value decoded before for the same
        cached version is handed out as is (no copy, no unpickling); anything
        else is decoded for this reader.
        """
        if deserialize and run.consistency != REPEATABLE_READ and run.causal is None:
            return await self.cache.get_value(key, self._cache_counts)
        return reveal_stored(await self.read(key, run), deserialize)

    async def read(self, key: str, run: RunContext) -> bytes | None:
        """The encoded value of ``key`` as the run's consistency level allows."""
        if run.consistency == REPEATABLE_READ:
            if key not in run.pins:
                reply: KvsValue = await self._kvs.request(KvsGet(key, pin=run.run_id))
                run.pins[key] = reply.lattice
            return run.pins[key]
        data = await self.cache.get(key, self._cache_counts)
        if run.causal is not None:
            lattice = decode_lattice(data, load=RAW) if data is not None else None
            if not run.causal.fresh_enough(key, lattice):
                # The cache is behind what this run or session has already seen.
                data = await self.cache.refresh(key)
                lattice = decode_lattice(data, load=RAW) if data is not None else None
            run.causal.observe(key, lattice)
        return data

    async def write(self, key: str, value: Any, run: RunContext, *, raw: bool = False) -> str:
        """Merge ``value`` into ``key``; under CAUSAL, as a write that saw the run's reads.

        ``raw``: ``value`` is a lattice whose user values are already pickled.
        """
        if raw:
            return await self.cache.put(key, value, raw=True)
        if run.causal is not None and not isinstance(value, Lattice):
            # Pickled before stamping, so any picklable value works (hashable or not).
            lattice: Lattice = run.causal.stamp(key, run.writer, dumps(value))
            type_name = await self.cache.put(key, lattice, raw=True)
            run.causal.observe(key, lattice)
            return type_name
        return await self.cache.put(key, as_lattice(value))
