"""Waiting for many futures: ``wait`` and ``as_completed``, as in ``concurrent.futures``.

Sync forms take :class:`~droplet.DropletFuture` objects; the async forms
(:func:`wait_async`, :func:`as_completed_async`) take
:class:`~droplet.AsyncDropletFuture` objects, in Trio code. None of them spin:
a sync wait reads the connection's socket itself (or sleeps while another
thread reads it) until one of the futures' replies is in, with the remaining
deadline; an async wait sleeps on an event the replies set.
"""

from __future__ import annotations

import math
import select
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, TypeVar

import trio

from ..errors import TimeoutError
from ._blocking import BlockingFuture
from ._blocking_peer import HANDOFF_POLL, BlockingPeer, _Slot
from .aio import AsyncDropletFuture
from .client import DropletFuture, _PortalFuture

__all__ = ["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "as_completed",
           "as_completed_async", "wait", "wait_async"]

#: ``wait`` returns when any future finishes (the same strings as concurrent.futures).
FIRST_COMPLETED = "FIRST_COMPLETED"
#: ``wait`` returns when any future raises, or all finished.
FIRST_EXCEPTION = "FIRST_EXCEPTION"
#: ``wait`` returns when all futures finished (the default).
ALL_COMPLETED = "ALL_COMPLETED"
_RETURN_WHEN = (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED)
#: A sync wait on futures of an event-loop backend re-checks this often (seconds).
PORTAL_POLL = 0.5
#: The longest single sleep of a sync wait (an infinite one cannot be passed to select()).
MAX_BLOCK = 60.0

F = TypeVar("F", DropletFuture, AsyncDropletFuture)


def _check(fs: Iterable[F], kind: type[F], what: str) -> list[F]:
    try:
        futures = list(dict.fromkeys(fs))  # once each, in order
    except TypeError:
        raise TypeError(f"{what}: expected an iterable of {kind.__name__}, "
                        f"not {type(fs).__name__}") from None
    for f in futures:
        if not isinstance(f, kind):
            raise TypeError(f"{what}: expected {kind.__name__} objects, "
                            f"got {type(f).__name__}")
    return futures


def _check_timeout(timeout: float | None, what: str) -> float:
    """The timeout in seconds (inf for None); ValueError when negative or not a number."""
    if timeout is None:
        return math.inf
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
        raise ValueError(f"{what}: timeout must be None or a number of seconds >= 0, "
                         f"not {timeout!r}")
    return float(timeout)


def _check_return_when(return_when: str) -> None:
    if return_when not in _RETURN_WHEN:
        raise ValueError(f"wait: return_when must be FIRST_COMPLETED, FIRST_EXCEPTION or "
                         f"ALL_COMPLETED, not {return_when!r}")


def _finished_waiting(return_when: str, done: set[Any], not_done: set[Any],
                      raised: bool) -> bool:
    if not not_done:
        return True
    if return_when == FIRST_COMPLETED:
        return bool(done)
    return return_when == FIRST_EXCEPTION and raised


# ---------------------------------------------------------------------- sync


def _raised(future: DropletFuture) -> bool:
    """Whether a finished future's call failed."""
    try:
        future.get(0)
    except Exception:
        return True
    return False


def _block(pending: Iterable[DropletFuture], deadline: float) -> None:
    """Sleep (or read the socket for everyone) until one of ``pending`` may have
    finished, or ``deadline`` (time.monotonic()) passed."""
    groups: dict[BlockingPeer, list[_Slot]] = {}
    portal: list[_PortalFuture] = []
    for future in pending:
        inner: Any = future._inner
        if isinstance(inner, BlockingFuture):
            groups.setdefault(inner._peer, []).append(inner._slot)
        elif isinstance(inner, _PortalFuture):
            portal.append(inner)
    remaining = min(max(0.0, deadline - time.monotonic()), MAX_BLOCK)
    if len(groups) == 1 and not portal:  # one connection: wait on its socket
        ((peer, slots),) = groups.items()
        peer.wait_any(slots, remaining)
        return
    if groups:
        # Futures of several connections (calls sent straight to executors):
        # read what each has, then sleep until any of them has more.
        for peer, slots in groups.items():
            if peer.wait_any(slots, 0):
                return
        socks = [peer._sock for peer in groups if peer._failure is None]
        if not socks:
            return
        try:
            # Not longer than HANDOFF_POLL: another thread leading one of these
            # sockets may read our reply off it (the socket is then quiet, the
            # reply in) and nothing would wake us (as BlockingPeer's followers).
            select.select(socks, [], [], min(remaining, HANDOFF_POLL))
        except (OSError, ValueError):  # one was closed meanwhile: its waiters were told
            return
    if portal:
        _block_portal(portal, min(remaining, HANDOFF_POLL if groups else PORTAL_POLL))


def _block_portal(futures: list[_PortalFuture], timeout: float) -> None:
    arrived = threading.Event()
    for f in futures:
        f._inner._wakers.append(arrived.set)
    try:
        if not any(f._inner.arrived_threadsafe.is_set() for f in futures):
            arrived.wait(timeout)
    finally:
        for f in futures:
            f._inner._wakers.remove(arrived.set)
    for portal in {f._portal for f in futures}:
        if portal.crash is not None:  # its loop stopped: raise what stopped it
            portal.run(trio.lowlevel.checkpoint)


def wait(fs: Iterable[DropletFuture], timeout: float | None = None,
         return_when: str = ALL_COMPLETED) -> tuple[set[DropletFuture], set[DropletFuture]]:
    """Wait for futures, as ``concurrent.futures.wait``: ``(done, not_done)`` sets.

    ``return_when`` is :data:`FIRST_COMPLETED`, :data:`FIRST_EXCEPTION` (the
    first call that raised, or all) or :data:`ALL_COMPLETED` (default). Past
    ``timeout`` seconds it returns what finished so far (no error).
    """
    futures = _check(fs, DropletFuture, "wait")
    deadline = time.monotonic() + _check_timeout(timeout, "wait")
    _check_return_when(return_when)
    done: set[DropletFuture] = set()
    not_done = set(futures)
    raised = False
    while True:
        newly = {f for f in not_done if f._inner._settled()}
        done |= newly
        not_done -= newly
        if return_when == FIRST_EXCEPTION and not raised:
            raised = any(_raised(f) for f in newly)
        if _finished_waiting(return_when, done, not_done, raised):
            break
        if time.monotonic() >= deadline:
            break
        _block(not_done, deadline)
    return done, not_done


def as_completed(fs: Iterable[DropletFuture],
                 timeout: float | None = None) -> Iterator[DropletFuture]:
    """Yield futures as they finish, as ``concurrent.futures.as_completed``.

    Those already finished come first. If ``timeout`` seconds (counted from
    this call) pass before all finished, the iterator raises
    ``droplet.TimeoutError``.
    """
    futures = _check(fs, DropletFuture, "as_completed")
    limit = _check_timeout(timeout, "as_completed")
    return _as_completed(futures, time.monotonic() + limit, limit)


def _as_completed(futures: list[DropletFuture], deadline: float,
                  limit: float) -> Iterator[DropletFuture]:
    pending = futures
    while pending:
        ready = [f for f in pending if f._inner._settled()]
        if ready:
            gone = set(ready)
            pending = [f for f in pending if f not in gone]
            yield from ready
            continue
        if time.monotonic() >= deadline:
            raise TimeoutError(f"as_completed: {len(pending)} (of {len(futures)}) futures "
                               f"unfinished after {limit:g} s")
        _block(pending, deadline)


# ---------------------------------------------------------------------- async


async def _arrival(futures: Iterable[AsyncDropletFuture], deadline: float) -> None:
    """Sleep until one of ``futures`` gets a reply, or ``deadline`` (trio clock)."""
    event = trio.Event()
    watched = list(futures)
    for f in watched:
        f._wakers.append(event.set)
    try:
        with trio.move_on_at(deadline):
            await event.wait()
    finally:
        for f in watched:
            f._wakers.remove(event.set)


async def _settled(future: AsyncDropletFuture) -> bool:
    if future._expired():  # the store's wait ran out: read again
        await future._rearm()
    return future._settled()


def _raised_async(future: AsyncDropletFuture) -> bool:
    try:
        future.result_ready()
    except Exception:
        return True
    return False


async def wait_async(fs: Iterable[AsyncDropletFuture], timeout: float | None = None,
                     return_when: str = ALL_COMPLETED
                     ) -> tuple[set[AsyncDropletFuture], set[AsyncDropletFuture]]:
    """:func:`wait` for :class:`~droplet.AsyncDropletFuture` objects, in Trio code."""
    futures = _check(fs, AsyncDropletFuture, "wait_async")
    deadline = trio.current_time() + _check_timeout(timeout, "wait_async")
    _check_return_when(return_when)
    await trio.lowlevel.checkpoint()
    done: set[AsyncDropletFuture] = set()
    not_done = set(futures)
    raised = False
    while True:
        newly = {f for f in not_done if await _settled(f)}
        done |= newly
        not_done -= newly
        if return_when == FIRST_EXCEPTION and not raised:
            raised = any(_raised_async(f) for f in newly)
        if _finished_waiting(return_when, done, not_done, raised):
            break
        if trio.current_time() >= deadline:
            break
        await _arrival(not_done, deadline)
    return done, not_done


def as_completed_async(fs: Iterable[AsyncDropletFuture],
                       timeout: float | None = None) -> AsyncIterator[AsyncDropletFuture]:
    """:func:`as_completed` for :class:`~droplet.AsyncDropletFuture` objects:
    ``async for future in droplet.as_completed_async(futures): ...``.

    Call it inside Trio code: ``timeout`` counts from this call.
    """
    futures = _check(fs, AsyncDropletFuture, "as_completed_async")
    limit = _check_timeout(timeout, "as_completed_async")
    return _as_completed_async(futures, trio.current_time() + limit, limit)


async def _as_completed_async(futures: list[AsyncDropletFuture], deadline: float,
                              limit: float) -> AsyncIterator[AsyncDropletFuture]:
    pending = futures
    while pending:
        ready = [f for f in pending if await _settled(f)]
        if ready:
            gone = set(ready)
            pending = [f for f in pending if f not in gone]
            for f in ready:
                yield f
            continue
        if trio.current_time() >= deadline:
            raise TimeoutError(f"as_completed_async: {len(pending)} (of {len(futures)}) "
                               f"futures unfinished after {limit:g} s")
        await _arrival(pending, deadline)
