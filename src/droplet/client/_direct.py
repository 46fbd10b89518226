"""Calls sent straight to an executor, with placement from the scheduler.

Through the scheduler a call crosses four connections (client -> scheduler ->
executor -> store -> client); sent straight to an executor it crosses two
(client -> executor -> client); the client alone gets the result, and it
stores it if ``future.obj_id`` is read. The scheduler still owns placement and load: it hands
out, per function or DAG and set of referenced keys (the call's
``DropletReference`` arguments), the executors that may run a whole call of
it, best first, with the call's schedule
(:class:`~droplet.protocol.messages.CallPlaced`), for a short lease; the
client sends each call to one of the ``preferred`` ones (the executors whose
node caches the referenced data) and asks again when the lease ends.

Which preferred executor: the one with the fewest calls of this client in
flight on it, and on a tie the one this client used last (*least outstanding,
with affinity*). Calls made one after another so stay on one executor, whose
threads are still warm from the previous call (a sleeping thread's wakeup
costs more than the call itself on a small machine), while calls made
concurrently spread over all of them. ``map()`` sends its calls to every
preferred executor of the placement, least loaded first, many per write.

A cached placement is dropped when an executor on it leaves (its connection
ends, or it cannot be reached), and calls go through the scheduler whenever
no executor of the placement can be reached (executors listening on an
address this client cannot dial, or a scheduler that does not hand out
placements).

Other clients learn that a function was registered again, or a DAG deleted,
when their lease ends (a few seconds): until then their calls run the
function's new code (executors load what is stored) or the deleted DAG.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..consistency import NORMAL
from ..errors import DropletError, ProtocolError
from ..ids import unique_id
from ..protocol.messages import CallDag, CallPlaced, Trigger
from ..rpc import Peer
from ..transports.registry import parse_address

__all__ = ["CONFIRM_WAIT", "DIAL_TIMEOUT", "MAP_ASKS_AFTER", "MAX_PLACEMENTS",
           "UNREACHABLE_RETRY",
           "AsyncDirectCalls", "DirectCalls", "may_go_direct", "reference_set", "same_scheme",
           "spread_over", "triggers_for"]

#: Seconds to connect to an executor before sending its calls through the scheduler.
DIAL_TIMEOUT = 2.0
#: Seconds a client waits for the store to hold a direct result whose key it
#: handed out (the executor answered first, and stores it right after).
CONFIRM_WAIT = 5.0
#: Seconds an executor that could not be reached is not tried again.
UNREACHABLE_RETRY = 30.0
#: Placements a client caches at most (one per call shape and set of
#: referenced keys); past it, expired ones go, then the oldest.
MAX_PLACEMENTS = 1024
#: Seconds after this client wrote a key during which its calls that reference
#: that key go through the scheduler (see ``_Cache.wrote``), and how many such
#: keys are remembered.
WRITE_SETTLE = 1.0
MAX_WRITTEN = 10_000

#: A map of more calls than this with references asks for a placement of its
#: own (PlaceCall.calls), which may spread it past the executors caching the
#: data; smaller ones use the cached placement.
MAP_ASKS_AFTER = 16

#: A cached placement's key: (target, is_function, referenced keys).
Key = tuple[str, bool, tuple[str, ...]]


class _Placed:
    __slots__ = ("expires", "last", "plan", "preferred", "urls")

    def __init__(self, plan: CallPlaced, expires: float, last: str | None = None) -> None:
        self.plan = plan
        self.urls = list(plan.executors)
        self.preferred = plan.preferred or len(self.urls)
        self.expires = expires
        #: the executor this client sent the last call of this placement to.
        self.last = last


def outstanding(peer: Any) -> int:
    """The requests this client has in flight on ``peer`` (a BlockingPeer or an
    rpc Peer: both keep their unanswered requests in ``_pending``)."""
    return len(peer._pending)


def reference_set(call: CallDag) -> tuple[str, ...]:
    """The keys of ``call``'s DropletReference arguments, sorted, each once."""
    if not call.references:
        return ()
    return tuple(sorted({key for keys in call.references for key in keys}))


def spread_over(count: int, ways: int) -> list[tuple[int, int]]:
    """``count`` items in ``ways`` contiguous runs as even as can be: (start, stop) each."""
    ways = max(1, min(ways, count))
    return [(count * i // ways, count * (i + 1) // ways) for i in range(ways)]


def may_go_direct(call: CallDag) -> bool:
    """Whether ``call`` is of a kind a client may send straight to an executor."""
    return not (call.direct or call.consistency != NORMAL or call.output_key is not None
                or call.client_id is not None or call.timeout is not None
                or call.continuation is not None or call.result_key is None)


def triggers_for(call: CallDag, plan: CallPlaced, url: str, *,
                 store_result: bool = False) -> list[Trigger] | None:
    """The trigger of ``call`` run wholly at executor ``url``, to send as the
    request (a list of one); None when its arguments do not fit the plan (the
    scheduler then says what is wrong). ``store_result=False``: the executor
    answers with the result only, the client stores it when its key is asked for.

    A DAG with several sources is sent as one trigger for its first source
    marked ``whole_run``: the executor starts every source of the run from it.
    """
    if call.result_key is None or not set(call.arg_fns) <= set(plan.functions):
        return None
    run_id = unique_id()
    placement = [url] * len(plan.functions)
    fed = {dst for _, dst in plan.edges}
    sources = [fn for fn in plan.functions if fn not in fed]
    if not sources:
        return None
    return [Trigger(run_id, sources[0], plan.functions, plan.versions, placement, plan.edges,
                    call.arg_fns, call.arg_blobs, None, None, False, call.result_key,
                    None, False, NORMAL, None, None, "", store_result=store_result,
                    whole_run=len(sources) > 1)]


def same_scheme(client_url: str, executor_url: str) -> None:
    """ValueError unless the executor speaks the client's scheme (a tls:// or wss://
    client's calls never go out in clear, nor over a transport it did not choose)."""
    scheme = parse_address(client_url)[0]
    if parse_address(executor_url)[0] != scheme:
        raise ValueError(f"executor {executor_url} does not speak {scheme}://")


class _Cache:
    """Placements by (target, is_function, referenced keys), and executors not to
    dial for a while."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.placements: dict[Key, _Placed] = {}
        #: connections to executors, by URL (see the subclasses).
        self._peers: dict[str, Any] = {}
        self.unreachable: dict[str, float] = {}
        #: False once the scheduler turned out not to hand out placements.
        self.enabled = True
        #: Keys this client wrote lately (oldest first) and when.
        self.written: dict[str, float] = {}

    def wrote(self, key: str) -> None:
        """This client wrote ``key``: for WRITE_SETTLE seconds, calls that reference
        it go through the scheduler.

        The store tells the executors' caches of a write after acknowledging it
        to us, over its own connections: a call sent straight to an executor at
        once could overtake that news and read the old value. Through the
        scheduler it is one hop behind, as before calls with references went
        direct, so a client reads its own writes.
        """
        written = self.written
        written.pop(key, None)
        written[key] = self.clock()
        while len(written) > MAX_WRITTEN:  # the oldest first
            try:
                written.pop(next(iter(written)), None)
            except (RuntimeError, StopIteration):  # another thread changed it: later
                break

    def settled(self, references: tuple[str, ...], now: float) -> bool:
        """Whether no key of ``references`` was written by this client lately."""
        written = self.written
        return not written or not any(
            now - written.get(key, -math.inf) < WRITE_SETTLE for key in references)

    def fresh(self, target: str, is_function: bool, now: float,
              references: tuple[str, ...] = ()) -> _Placed | None:
        placed = self.placements.get((target, is_function, references))
        return placed if placed is not None and placed.expires > now else None

    def store(self, plan: CallPlaced, now: float, references: tuple[str, ...] = ()) -> _Placed:
        key = (plan.target, plan.is_function, references)
        old_placed = self.placements.pop(key, None)  # to the end: the oldest go first
        # A renewed lease keeps the executor used last (sequential calls stay there).
        placed = _Placed(plan, now + plan.lease,
                         old_placed.last if old_placed is not None else None)
        if len(self.placements) >= MAX_PLACEMENTS:
            # list() snapshots: other threads may store meanwhile (DirectCalls)
            for old in [k for k, p in list(self.placements.items()) if p.expires <= now]:
                self.placements.pop(old, None)
            for old in list(self.placements)[:len(self.placements) - MAX_PLACEMENTS + 1]:
                self.placements.pop(old, None)
        self.placements[key] = placed
        return placed

    def choose(self, placed: _Placed) -> int:
        """The index in ``placed.urls`` of the executor for the next call: the
        preferred one with the fewest calls of this client in flight, on a tie
        the one used last (else the first in the scheduler's order)."""
        urls = placed.urls
        count = min(placed.preferred, len(urls))
        if count <= 1:
            return 0
        peers = self._peers
        last = placed.last
        best, best_load = 0, -1
        for i in range(count):
            url = urls[i]
            peer = peers.get(url)
            load = outstanding(peer) if peer is not None else 0
            if best_load < 0 or load < best_load or (load == best_load and url == last):
                best, best_load = i, load
        return best

    def in_turn(self, placed: _Placed) -> list[str]:
        """The placement's executors to try, best first (:meth:`choose`), then the
        other preferred ones, then the others (fallbacks), in order. The first is
        remembered as used last (the caller updates ``placed.last`` when it ends
        up using another one: the first could not be reached)."""
        urls = placed.urls
        if not urls:
            return []
        best = self.choose(placed)
        placed.last = urls[best]
        if best == 0:
            return list(urls)
        return [urls[best], *urls[:best], *urls[best + 1:]]

    def least_loaded(self, placed: _Placed) -> list[str]:
        """The placement's preferred executors, fewest calls of this client in
        flight first (in the scheduler's order on ties), then the others; for
        ``spread`` (it does not change the executor used last)."""
        urls = placed.urls
        peers = self._peers

        def load(url: str) -> int:
            peer = peers.get(url)
            return outstanding(peer) if peer is not None else 0

        first = sorted(urls[:placed.preferred], key=load)  # stable: order on ties
        return first + urls[placed.preferred:]

    def drop_url(self, url: str) -> None:
        for key, placed in list(self.placements.items()):
            if url in placed.urls:  # a reference placement too: its data may be elsewhere
                self.placements.pop(key, None)

    def forget(self, target: str, is_function: bool) -> None:
        """Drop the placements of ``target`` (this client changed or deleted it); for a
        function, those of the DAGs running it too (their schedules name the code
        version each function runs at)."""
        for key, placed in list(self.placements.items()):
            if (key[0] == target and key[1] == is_function) or (
                    is_function and target in placed.plan.functions):
                self.placements.pop(key, None)

    def placed(self, target: str, is_function: bool = True,
               references: tuple[str, ...] = ()) -> list[str]:
        """The executors cached for ``target`` (empty when none are)."""
        placed = self.placements.get((target, is_function, references))
        return list(placed.urls) if placed is not None else []


class DirectCalls(_Cache):
    """Cached placements and connections to executors, for the blocking client.

    ``dial(url)`` opens a connection to an executor (anything with ``alive()``
    and ``close()``); ``place(target, is_function)`` asks the scheduler (a
    CallPlaced, or the error of an unknown function or DAG). Thread-safe.
    """

    def __init__(self, dial: Callable[[str], Any],
                 place: Callable[[str, bool, list[str], int], CallPlaced],
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self._dial = dial
        self._place = place
        self._peers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _placement(self, target: str, is_function: bool, references: tuple[str, ...],
                   now: float, calls: int = 1) -> _Placed | None:
        if not self.enabled or not self.settled(references, now):
            return None
        placed = self.fresh(target, is_function, now, references) if calls == 1 else None
        if placed is None:
            try:
                plan = self._place(target, is_function, list(references), calls)
            except ProtocolError:  # a scheduler that does not place calls for clients
                self.enabled = False
                return None
            placed = (self.store(plan, now, references) if calls == 1
                      else _Placed(plan, now + plan.lease))
        return placed

    def target(self, target: str, is_function: bool,
               references: tuple[str, ...] = ()) -> tuple[Any, CallPlaced] | None:
        """A live connection to an executor for a call of ``target`` whose
        DropletReference arguments name ``references`` (see :func:`reference_set`),
        and its schedule.

        None: send the call through the scheduler. Raises what the scheduler
        said about ``target`` (say, RegistrationError: no function of that name).
        """
        now = self.clock()
        placed = self._placement(target, is_function, references, now)
        if placed is None:
            return None
        for i, url in enumerate(self.in_turn(placed)):
            peer = self._peer(url, now)
            if peer is not None:
                if i:
                    placed.last = url
                return peer, placed.plan
        return None

    def spread(self, target: str, is_function: bool, references: tuple[str, ...] = (),
               calls: int = 1) -> list[tuple[Any, CallPlaced]]:
        """Live connections to every preferred executor for ``calls`` calls of
        ``target`` (to the first fallback reachable when none of them is), for
        ``map``; empty: send the calls through the scheduler.

        More than MAP_ASKS_AFTER calls with references get a placement of their
        own, not cached: the scheduler may spread them past the executors
        caching the data (load)."""
        now = self.clock()
        placed = self._placement(target, is_function, references, now,
                                 calls if references and calls > MAP_ASKS_AFTER else 1)
        if placed is None:
            return []
        found: list[tuple[Any, CallPlaced]] = []
        for i, url in enumerate(self.least_loaded(placed)):
            if found and i >= placed.preferred:
                break
            peer = self._peer(url, now)
            if peer is not None:
                found.append((peer, placed.plan))
        return found

    def quick(self, target: str, is_function: bool) -> tuple[Any, CallPlaced] | None:
        """:meth:`target` for a call without references, when it needs no I/O: a fresh
        placement cached, and a live connection to the executor it chooses
        (else None: ask :meth:`target`, which dials or asks the scheduler)."""
        placed = self.placements.get((target, is_function, ()))
        if placed is None or placed.expires <= self.clock() or not self.enabled:
            return None
        urls = placed.urls
        if not urls:
            return None
        url = urls[self.choose(placed)] if placed.preferred != 1 else urls[0]
        peer = self._peers.get(url)
        if peer is None or not peer.alive():
            return None
        placed.last = url
        return peer, placed.plan

    def _peer(self, url: str, now: float) -> Any:
        peer = self._peers.get(url)
        if peer is not None:
            if peer.alive():
                return peer
            self.executor_left(url)
        if self.unreachable.get(url, 0.0) > now:
            return None
        with self._lock:  # one dial per executor, however many threads call
            peer = self._peers.get(url)
            if peer is not None:
                return peer
            try:
                peer = self._dial(url)
            except (DropletError, ValueError, OSError):
                self.unreachable[url] = now + UNREACHABLE_RETRY
                return None
            self.unreachable.pop(url, None)
            self._peers[url] = peer
            return peer

    def executor_left(self, url: str) -> None:
        """Forget ``url``: its connection, and every placement naming it."""
        peer = self._peers.pop(url, None)
        if peer is not None:
            peer.close()
        self.drop_url(url)

    def close(self) -> None:
        peers, self._peers = self._peers, {}
        self.placements.clear()
        for peer in peers.values():
            peer.close()


class AsyncDirectCalls(_Cache):
    """The same for the async client: ``dial`` and ``place`` are coroutines, and a
    connection is a :class:`~droplet.rpc.Peer` (alive while not ``closed``).

    Placements are looked up in the event loop only; :meth:`ready` may be
    called from another thread (the sync facade) to see whether a call can be
    sent with no request to the scheduler first.
    """

    def __init__(self, dial: Callable[[str], Awaitable[Peer]],
                 place: Callable[[str, bool, list[str], int], Awaitable[CallPlaced]],
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self._dial = dial
        self._place = place
        self._peers: dict[str, Peer] = {}
        #: dials under way: concurrent first calls wait for one connection, never
        #: open their own (a second would be left running, unclosed by aclose()).
        self._dialing: dict[str, trio.Event] = {}
        self._shut = False  # aclose() was called

    def ready(self, target: str, is_function: bool, references: tuple[str, ...] = ()) -> bool:
        """A fresh placement with a live connection is cached for ``target``."""
        now = self.clock()
        placed = (self.fresh(target, is_function, now, references)
                  if self.enabled and self.settled(references, now) else None)
        return placed is not None and any(
            (peer := self._peers.get(url)) is not None and not peer.closed
            for url in placed.urls)

    async def _placement(self, target: str, is_function: bool, references: tuple[str, ...],
                         now: float, calls: int = 1) -> _Placed | None:
        if not self.enabled or not self.settled(references, now):
            return None
        placed = self.fresh(target, is_function, now, references) if calls == 1 else None
        if placed is None:
            try:
                plan = await self._place(target, is_function, list(references), calls)
            except ProtocolError:
                self.enabled = False
                return None
            placed = (self.store(plan, now, references) if calls == 1
                      else _Placed(plan, now + plan.lease))
        return placed

    async def _peer(self, url: str, now: float) -> Peer | None:
        peer = self._peers.get(url)
        if peer is not None and not peer.closed:
            return peer
        if peer is not None:
            self.executor_left(url)
        if self.unreachable.get(url, 0.0) > now:
            return None
        dialing = self._dialing.get(url)
        if dialing is not None:  # another task dials it: use its connection
            await dialing.wait()
            peer = self._peers.get(url)
            return peer if peer is not None and not peer.closed else None
        self._dialing[url] = done = trio.Event()
        try:
            peer = await self._dial(url)
        except (DropletError, ValueError, OSError):
            self.unreachable[url] = now + UNREACHABLE_RETRY
            return None
        else:
            if self._shut:  # aclose() came while dialling: it closes this one too
                await peer.aclose()
                return None
            self._peers[url] = peer
            peer.on_close.append(functools.partial(self._closed, url))
            return peer
        finally:
            del self._dialing[url]
            done.set()

    def cached_target(self, target: str, is_function: bool,
                      references: tuple[str, ...] = ()) -> tuple[Peer, CallPlaced] | None:
        """:meth:`target` when it needs no I/O (a fresh placement whose chosen
        executor is connected); else None, leaving the choice to :meth:`target`."""
        now = self.clock()
        if not self.enabled or not self.settled(references, now):
            return None
        placed = self.fresh(target, is_function, now, references)
        if placed is None:
            return None
        if not placed.urls:
            return None
        url = placed.urls[self.choose(placed)]
        peer = self._peers.get(url)
        if peer is None or peer.closed:
            return None
        placed.last = url
        return peer, placed.plan

    async def target(self, target: str, is_function: bool,
                     references: tuple[str, ...] = ()) -> tuple[Peer, CallPlaced] | None:
        """As :meth:`DirectCalls.target`."""
        now = self.clock()
        placed = await self._placement(target, is_function, references, now)
        if placed is None:
            return None
        for i, url in enumerate(self.in_turn(placed)):
            peer = await self._peer(url, now)
            if peer is not None:
                if i:
                    placed.last = url
                return peer, placed.plan
        return None

    async def spread(self, target: str, is_function: bool, references: tuple[str, ...] = (),
                     calls: int = 1) -> list[tuple[Peer, CallPlaced]]:
        """As :meth:`DirectCalls.spread`."""
        now = self.clock()
        placed = await self._placement(target, is_function, references, now,
                                       calls if references and calls > MAP_ASKS_AFTER else 1)
        if placed is None:
            return []
        found: list[tuple[Peer, CallPlaced]] = []
        for i, url in enumerate(self.least_loaded(placed)):
            if found and i >= placed.preferred:
                break
            peer = await self._peer(url, now)
            if peer is not None:
                found.append((peer, placed.plan))
        return found

    def _closed(self, url: str, peer: Peer) -> None:
        if self._peers.get(url) is peer:
            self.executor_left(url)

    def executor_left(self, url: str) -> None:
        self._peers.pop(url, None)
        self.drop_url(url)

    async def aclose(self) -> None:
        self._shut = True
        peers, self._peers = self._peers, {}
        self.placements.clear()
        for peer in peers.values():
            await peer.aclose()
