"""The user library: the first argument of every Droplet function.

Sync functions run in worker threads and call the plain methods (``get``,
``put``, ``send``), which hop into the executor's Trio loop when they need
I/O. ``async def`` functions run as Trio tasks and await the ``a``-prefixed
twins (``aget``, ``aput``, ``asend``); the plain methods still work there when
no I/O is needed (a cache hit, ``getid``, ``recv``).
"""

from __future__ import annotations

import logging
import pickle
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import cloudpickle
import trio

from ..lattices import (
    RAW,
    Lattice,
    LWWLattice,
    MultiKeyCausalLattice,
    OrderedSetLattice,
    SetLattice,
    SingleKeyCausalLattice,
    decode_lattice,
)
from ..references import DropletReference
from ..serialization import dumps, loads

if TYPE_CHECKING:
    from .service import ExecutorService, RunContext

__all__ = ["UserLibrary", "reveal_stored", "user_lattice"]

T = TypeVar("T")

log = logging.getLogger("droplet.executor")

#: Messages an invocation's mailbox holds; more are dropped (and counted) until
#: ``recv()`` empties it.
MAX_MAILBOX = 10_000


def reveal_stored(data: bytes | None, deserialize: bool = True) -> Any:
    """What ``get`` returns for a stored encoding.

    Plain values come back plain: an LWW value, or a causal value. Concurrent
    causal values come back together, as a ``frozenset`` when they are all
    hashable and otherwise as a list (in a deterministic order). An
    ordered set (what ``put`` makes of a list) comes back as a list, in order.
    Other lattices come back as lattices; ``deserialize=False`` returns the
    stored lattice as is.
    """
    if data is None:
        return None
    raw = decode_lattice(data, load=RAW)
    if deserialize and isinstance(raw, LWWLattice):
        return loads(raw.value)  # plain pickle, or a call value's out-of-band form
    if deserialize and isinstance(raw, OrderedSetLattice):
        items = [pickle.loads(blob) for blob in raw.reveal()]
        try:
            return sorted(items)
        except TypeError:  # not mutually orderable: the order of their pickles
            return items
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


def user_lattice(value: Any) -> tuple[Lattice, bool]:
    """What the user library's ``put`` stores, by Cloudburst's serializer rules.

    A ``set`` becomes a :class:`SetLattice` (concurrent adds merge), a ``list``
    an :class:`OrderedSetLattice` of its elements (concurrent appends merge), a
    lattice stays itself and anything else is last-writer-wins. Returns
    ``(lattice, raw)``; ``raw`` means its elements are already pickled.
    """
    if type(value) is set:
        return SetLattice(value), False
    if type(value) is list:
        try:
            pickled = [cloudpickle.dumps(item) for item in value]
        except Exception as exc:
            raise TypeError(f"put(): a list is stored as an ordered set of its elements "
                            f"(as in Cloudburst), and one cannot be serialized: {exc}") from exc
        return OrderedSetLattice(pickled), True
    return as_lattice(value), False


class UserLibrary:
    """KVS access and messaging for one function invocation."""

    def __init__(self, executor: ExecutorService, invocation_id: str, run: RunContext) -> None:
        self._executor = executor
        self._id = invocation_id
        self._run = run
        # A deque: the loop thread appends while a worker thread pops, each
        # step atomic, so no message slips between a read and a swap.
        self._mailbox: deque[tuple[str, Any]] = deque()
        #: messages dropped because the mailbox was full.
        self.dropped = 0

    # ---------------------------------------------------------------- identity
    def getid(self) -> str:
        """This invocation's messaging id, for ``send`` from other invocations."""
        return self._id

    get_id = getid

    # ---------------------------------------------------------------- sync API
    def get(self, key: str | DropletReference | list[str | DropletReference],
            deserialize: bool = True) -> Any:
        """Read a value through this executor's cache (None when absent).

        A list of keys returns ``{key: value}``. ``deserialize=False`` returns
        the stored lattice instead of the value it holds. Under CAUSAL,
        concurrent versions come back together as a frozenset.
        """
        if isinstance(key, list):
            keys = [_key(k) for k in key]
            found: dict[str, Any] = {}
            missing = []
            for k in keys:
                known, value = self._executor.read_local_value(k, self._run, deserialize)
                if known:
                    found[k] = value
                elif k not in missing:
                    missing.append(k)
            if missing:  # one hop into the event loop for all of them
                found.update(self._in_trio(self.aget, missing, deserialize))
            return {k: found[k] for k in keys}
        k = _key(key)
        known, value = self._executor.read_local_value(k, self._run, deserialize)
        if known:  # no I/O needed: skip the hop into the event loop's thread
            return value
        return self._in_trio(self.aget, k, deserialize)

    get_object = get

    def put(self, key: str | DropletReference, value: Any) -> str:
        """Write a value (lattice-merged); returns the stored lattice type name.

        As in Cloudburst, a ``set`` is stored as a SetLattice and a ``list`` as
        an OrderedSetLattice, so that concurrent writers' elements merge.
        """
        return self._in_trio(self.aput, key, value)

    put_object = put

    def send(self, dest_id: str, obj: Any) -> None:
        """Send any picklable object to the invocation ``dest_id``, wherever it runs."""
        self._in_trio(self.asend, dest_id, obj)

    def recv(self) -> list[tuple[str, Any]]:
        """Messages received so far (and not yet returned): ``[(sender_id, object)]``."""
        box = self._mailbox
        messages: list[tuple[str, Any]] = []
        while True:
            try:
                messages.append(box.popleft())
            except IndexError:
                return messages

    # ---------------------------------------------------------------- async API
    async def aget(self, key: str | DropletReference | list[str | DropletReference],
                   deserialize: bool = True) -> Any:
        if isinstance(key, list):
            return {_key(k): await self.aget(k, deserialize) for k in key}
        return await self._executor.read_value(_key(key), self._run, deserialize)

    async def aput(self, key: str | DropletReference, value: Any) -> str:
        if self._run.causal is not None or isinstance(value, Lattice):
            return await self._executor.write(_key(key), value, self._run)
        lattice, raw = user_lattice(value)
        return await self._executor.write(_key(key), lattice, self._run, raw=raw)

    async def asend(self, dest_id: str, obj: Any) -> None:
        if not isinstance(dest_id, str):
            raise TypeError(f"send(): the destination is an id from getid() (a string), "
                            f"not {type(dest_id).__name__}")
        try:
            data = dumps(obj)
        except TypeError as exc:
            raise TypeError(f"send(): cannot serialize the message: {exc}") from exc
        await self._executor.send_mail(dest_id, self._id, data)

    # ---------------------------------------------------------------- plumbing
    def deliver(self, sender: str, data: bytes) -> None:
        """A message arrived: unpickle it (a message that does not unpickle is dropped)."""
        if len(self._mailbox) >= MAX_MAILBOX:
            self.dropped += 1
            return
        try:
            obj = pickle.loads(data)
        except Exception as exc:
            log.warning("dropping a message from %s to %s that does not unpickle: %s",
                        sender, self._id, exc)
            return
        self._mailbox.append((sender, obj))

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
