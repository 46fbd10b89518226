"""Loading registered functions from the store, once per version per executor."""

from __future__ import annotations

import pickle
from typing import Any

import attrs
import trio

from ..errors import RegistrationError
from ..kvs.keys import function_key
from ..lattices import RAW, decode_lattice
from ..protocol.messages import KvsGet, KvsValue
from ..registration import code_version, install
from ..rpc import Peer

__all__ = ["FunctionLoader", "Loaded"]

#: Seconds a function's code may take to arrive from the store.
LOAD_TIMEOUT = 60.0


@attrs.define
class Loaded:
    version: str
    obj: Any
    instance: Any = None  # for (cls, init_args) registrations: built once
    init_lock: trio.Lock = attrs.Factory(trio.Lock)


class FunctionLoader:
    """Loaded functions by name (bounded by what is registered: unknown names are not kept)."""

    def __init__(self, kvs: Peer) -> None:
        self._kvs = kvs
        self._functions: dict[str, Loaded] = {}
        self._locks: dict[str, trio.Lock] = {}

    def __len__(self) -> int:
        return len(self._functions)

    @property
    def loading(self) -> int:
        """Names being loaded right now (one lock each, dropped when done)."""
        return len(self._locks)

    def peek(self, name: str, version: str) -> Loaded | None:
        """Function ``name`` at ``version`` if it is loaded already (no I/O)."""
        loaded = self._functions.get(name)
        return loaded if loaded is not None and loaded.version == version else None

    async def load(self, name: str, version: str | None) -> Loaded:
        """Function ``name`` at ``version``, fetched from the store unless loaded already.

        ``version`` None (a prefetch of whatever is registered): the stored code's.
        """
        loaded = self._functions.get(name)
        if loaded is not None and loaded.version == version:
            return loaded
        lock = self._locks.setdefault(name, trio.Lock())
        try:
            async with lock:
                loaded = self._functions.get(name)
                if loaded is not None and loaded.version == version:
                    return loaded
                found, obj = await self._fetch(name)
                loaded = Loaded(found, obj)
                self._functions[name] = loaded
                return loaded
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(name, None)

    async def _fetch(self, name: str) -> tuple[str, Any]:
        """The stored code's version (as the scheduler computes it) and the function."""
        reply: KvsValue = await self._kvs.request(KvsGet(function_key(name)), LOAD_TIMEOUT)
        if reply.lattice is None:
            raise RegistrationError(f"function {name!r} is not registered")
        code = decode_lattice(reply.lattice, load=RAW).reveal()
        return code_version(code), self._install(name, code)

    @staticmethod
    def _install(name: str, code: bytes) -> Any:
        obj = install(pickle.loads(code))  # files shipped source for tracebacks
        if isinstance(obj, tuple) and not (
            len(obj) == 2 and isinstance(obj[0], type) and hasattr(obj[0], "run")
        ):
            raise RegistrationError(
                f"function {name!r}: a tuple registration must be (cls, init_args) "
                "with a class that has a run(user_library, *args) method")
        if isinstance(obj, tuple):  # as in Cloudburst: a non-tuple is one init argument
            return (obj[0], obj[1] if type(obj[1]) is tuple else (obj[1],))
        if not callable(obj):
            raise RegistrationError(f"{name!r} is registered as a non-callable "
                                    f"{type(obj).__name__}")
        return obj
