"""The user library: the first argument of every Droplet function.

Sync functions run in worker threads and call the plain methods (``get``,
``put``, ``send``), which hop into the executor's Trio loop when they need
I/O. ``async def`` functions run as Trio tasks and await the ``a``-prefixed
twins (``aget``, ``aput``, ``asend``); the plain methods still work there when
no I/O is needed (a cache hit, ``getid``, ``recv``).
"""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..lattices import (
    RAW,
    Lattice,
    LWWLattice,
    MultiKeyCausalLattice,
    SingleKeyCausalLattice,
    decode_lattice,
)
from ..references import DropletReference

if TYPE_CHECKING:
    from .service import ExecutorService, RunContext

__all__ = ["UserLibrary", "reveal_stored"]

T = TypeVar("T")


def reveal_stored(data: bytes | None, deserialize: bool = True) -> Any:
    """What ``get`` returns for a stored encoding.

    Plain values come back plain: an LWW value, or a causal value. Concurrent
    causal values come back together, as a ``frozenset`` when they are all
    hashable and otherwise as a list (in a deterministic order). Other
    lattices come back as lattices; ``deserialize=False`` returns the stored
    lattice as is.
    """
    if data is None:
        return None
    raw = decode_lattice(data, load=RAW)
    if deserialize and isinstance(raw, LWWLattice):
        return pickle.loads(raw.value)
    if deserialize and isinstance(raw, SingleKeyCausalLattice | MultiKeyCausalLattice):
        found = [pickle.loads(blob) for blob in sorted(raw.values)]
        if len(found) == 1:
            return found[0]
        try:
            return frozenset(found)
        except TypeError:
            return found
    return decode_lattice(data, load=pickle.loads)


def _key(key: str | DropletReference) -> str:
    if isinstance(key, DropletReference):
        return key.key
    if not isinstance(key, str):
        raise TypeError(f"KVS keys are strings, not {type(key).__name__}")
    return key


def as_lattice(value: Any) -> Lattice:
    """Plain values are wrapped in a last-writer-wins lattice stamped now."""
    if isinstance(value, Lattice):
        return value
    return LWWLattice.now(value)


class UserLibrary:
    """KVS access and messaging for one function invocation."""

    def __init__(self, executor: ExecutorService, invocation_id: str, run: RunContext) -> None:
        self._executor = executor
        self._id = invocation_id
        self._run = run
        # A deque: the loop thread appends while a worker thread pops, each
        # step atomic, so no message slips between a read and a swap.
        self._mailbox: deque[tuple[str, bytes]] = deque()

    # ---------------------------------------------------------------- identity
    def getid(self) -> str:
        """This invocation's messaging id, for ``send`` from other invocations."""
        return self._id

    get_id = getid

    # ---------------------------------------------------------------- sync API
    def get(self, key: str | DropletReference) -> Any:
        """Read a value through this executor's cache (None when absent).

        Under CAUSAL, concurrent versions come back together as a frozenset.
        """
        k = _key(key)
        known, data = self._executor.read_local(k, self._run)
        if known:  # no I/O needed: skip the hop into the event loop's thread
            return reveal_stored(data)
        return self._in_trio(self.aget, k)

    get_object = get

    def put(self, key: str, value: Any) -> str:
        """Write a value (lattice-merged); returns the stored lattice type name."""
        return self._in_trio(self.aput, key, value)

    put_object = put

    def send(self, dest_id: str, data: bytes) -> None:
        """Send bytes to the invocation ``dest_id``, wherever it runs."""
        self._in_trio(self.asend, dest_id, data)

    def recv(self) -> list[tuple[str, bytes]]:
        """Messages received so far (and not yet returned): ``[(sender_id, bytes)]``."""
        box = self._mailbox
        messages: list[tuple[str, bytes]] = []
        while True:
            try:
                messages.append(box.popleft())
            except IndexError:
                return messages

    # ---------------------------------------------------------------- async API
    async def aget(self, key: str | DropletReference) -> Any:
        return reveal_stored(await self._executor.read(_key(key), self._run))

    async def aput(self, key: str, value: Any) -> str:
        return await self._executor.write(_key(key), value, self._run)

    async def asend(self, dest_id: str, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray):
            raise TypeError(f"send() takes bytes, not {type(data).__name__}")
        await self._executor.send_mail(dest_id, self._id, bytes(data))

    # ---------------------------------------------------------------- plumbing
    def deliver(self, sender: str, data: bytes) -> None:
        self._mailbox.append((sender, data))

    def _in_trio(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            in_loop = False
        else:
            in_loop = True
        if not in_loop:  # outside the except block: errors chain no "not in async context"
            return trio.from_thread.run(afn, *args, trio_token=self._executor.trio_token)
        raise RuntimeError(
            f"{afn.__name__[1:]}() needs I/O here; in an async function use "
            f"`await lib.{afn.__name__}(...)`"
        )
