"""A Trio event loop in a background thread, for the synchronous API.

One thread and one loop per portal, created once: each sync call is a
``trio.from_thread.run`` into it (thread-safe, no new thread or connection
per call), so many user threads can share one connection.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from ..errors import ConnectionError

__all__ = ["Portal"]

T = TypeVar("T")


class Portal:
    def __init__(self, name: str = "droplet-portal") -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        self.closed = False

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # pragma: no cover - only if trio itself fails
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await trio.sleep_forever()

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await afn(*args)`` in the portal's loop and return its result."""
        if self.closed:
            raise ConnectionError("this Droplet connection is closed")
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def close(self) -> None:
        """Cancel everything in the loop and join the thread (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if threading.current_thread() is self._thread:
            raise RuntimeError("cannot close a portal from inside its own loop")
        try:
            trio.from_thread.run_sync(self.nursery.cancel_scope.cancel, trio_token=self._token)
        except trio.RunFinishedError:
            pass
        self._thread.join()
