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

#: Seconds a call waits for a stopping loop to record why it stopped.
STOP_GRACE = 5.0


def _describe(exc: BaseException) -> str:
    """One line for what crashed a loop: the innermost single exception of any groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


class Portal:
    def __init__(self, name: str = "droplet-portal") -> None:
        self._name = name
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
        except BaseException as exc:  # a background task crashed (or trio itself failed)
            self._error = exc
            self._ready.set()

    @property
    def crash(self) -> BaseException | None:
        """What stopped the loop before close(), if anything did."""
        return self._error

    def _stopped(self, exc: BaseException) -> ConnectionError:
        """The error for a call into a loop that is gone: what stopped it, as the cause."""
        self._thread.join(STOP_GRACE)  # the loop is ending: let it record why
        crash = self._error
        if crash is None:
            error = ConnectionError(f"{self._name}: its event loop has stopped")
        else:
            error = ConnectionError(
                f"{self._name}: its event loop stopped after an internal error "
                f"({_describe(crash)}); start a new one")
        return error

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
        try:
            return trio.from_thread.run(afn, *args, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled) as exc:
            # Calls run in the loop's system nursery, cancelled only when the loop ends.
            error = self._stopped(exc)
            raise error from self._error or exc

    def post(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start ``afn(*args)`` in the portal's loop and return at once (no result).

        One wakeup of the loop's thread instead of the two handoffs of :meth:`run`.
        ``afn`` must report its own errors: one escaping it stops the loop.
        """
        if self.closed:
            raise ConnectionError("this Droplet connection is closed")
        assert self._token is not None
        try:
            self._token.run_sync_soon(self.nursery.start_soon, afn, *args)
        except trio.RunFinishedError as exc:
            raise self._stopped(exc) from self._error or exc

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
