"""The storage service: a :class:`~droplet.kvs.store.Store` behind the RPC layer.

Besides get/put it offers two things Droplet's other services lean on:

- *waiting reads*: ``KvsGet(wait=s)`` answers as soon as the key exists, which
  is how a future's ``get()`` learns its result without polling;
- *subscriptions*: caches that read a key with ``subscribe=True`` are pushed
  each later change (``KvsUpdate``), keeping executor caches fresh.

A put runs in the putting connection's reader, so it never writes to another
peer there: waiting reads are answered and updates pushed through each peer's
bounded outbox (:meth:`~droplet.rpc.Peer.post`). A subscriber or waiter whose
outbox fills (it stopped reading) is disconnected, which drops its
subscriptions and waiting reads; the putter and everyone else carry on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from typing import Any

import attrs
import trio

from ..errors import DropletError, ProtocolError
from ..protocol.messages import (
    KvsForget,
    KvsGet,
    KvsPut,
    KvsRelease,
    KvsStored,
    KvsUnsubscribe,
    KvsUpdate,
    KvsValue,
)
from ..rpc import DEFERRED, Peer
from .keys import is_result_key
from .store import Store

__all__ = ["KvsService", "KvsStatistics"]

log = logging.getLogger("droplet.kvs")

MAX_WAIT = 3600.0
#: Pinned versions of runs whose release never came (a lost scheduler) expire.
PIN_TTL = 600.0
#: The backstop for call results nobody released: a client releases a result
#: (KvsForget) once its future is collected, or, when it handed out the
#: ``obj_id``, when it closes; a client that vanishes leaves its results for
#: this long. ``output_key`` copies stay.
DEFAULT_RESULT_TTL = 600.0
PIN_SWEEP_EVERY = 1000
#: Releases of results not stored yet that the store remembers at most (oldest
#: go first: such a result then lives until result_ttl, as if never released).
MAX_EARLY_RELEASES = 100_000
#: Keys one connection may subscribe to (an executor's cache unsubscribes what it evicts).
MAX_SUBSCRIPTIONS_PER_PEER = 200_000


@attrs.frozen
class KvsStatistics:
    keys: int
    gets: int
    puts: int
    subscriptions: int
    pinned_runs: int
    #: keys with at least one subscriber (no empty entries are kept).
    subscribed_keys: int = 0
    #: reads waiting for their key to be put, and the keys they wait on.
    waiting_reads: int = 0
    waited_keys: int = 0
    #: call results tracked for expiry.
    results: int = 0
    #: releases of results not stored yet (each forgotten after result_ttl).
    early_releases: int = 0


@attrs.define
class _Waiter:
    """A read waiting for its key: answered by the first put, or by its timer."""

    peer: Peer
    request_id: int
    timer: trio.CancelScope
    answered: bool = False


def _cancel_waits(peer: Peer) -> None:
    for scope in peer.state.get("kvs_waits", ()):
        scope.cancel()


def _bounded_wait(wait: float | None) -> float:
    """A peer's requested wait as seconds in [0, MAX_WAIT] (NaN and junk mean 0)."""
    try:
        seconds = float(wait or 0)
    except OverflowError:  # an int past float range: as long as we allow
        return MAX_WAIT
    if not seconds > 0:  # also catches NaN
        return 0.0
    return min(seconds, MAX_WAIT)


class KvsService:
    """Serves KVS messages; plug ``handle`` into a node's router."""

    MESSAGES = (KvsGet, KvsPut, KvsUnsubscribe, KvsRelease, KvsForget)

    def __init__(self, nursery: trio.Nursery, store: Store | None = None, *,
                 result_ttl: float = DEFAULT_RESULT_TTL) -> None:
        self.store = store or Store()
        self.result_ttl = result_ttl
        # Call results by expiry time (one TTL for all, so insertion order is expiry order).
        self._results: OrderedDict[str, float] = OrderedDict()
        # Results released before they were stored, by expiry time: dropped on arrival.
        self._forgotten: OrderedDict[str, float] = OrderedDict()
        self._nursery = nursery
        self._waiters: dict[str, list[_Waiter]] = {}
        self._subscribers: defaultdict[str, set[Peer]] = defaultdict(set)
        self._gets = 0
        self._puts = 0
        # REPEATABLE_READ version store: run id -> (created, key -> pinned encoding)
        self._pins: dict[str, tuple[float, dict[str, bytes | None]]] = {}

    def statistics(self) -> KvsStatistics:
        return KvsStatistics(
            keys=len(self.store),
            gets=self._gets,
            puts=self._puts,
            subscriptions=sum(len(s) for s in self._subscribers.values()),
            pinned_runs=len(self._pins),
            subscribed_keys=len(self._subscribers),
            waiting_reads=sum(len(w) for w in self._waiters.values()),
            waited_keys=len(self._waiters),
            results=len(self._results),
            early_releases=len(self._forgotten),
        )

    async def handle(self, peer: Peer, msg: Any, request_id: int) -> Any:
        kind = type(msg)
        if kind is KvsGet:
            return self._get(peer, msg, request_id)
        if kind is KvsPut:
            return await self._put(peer, msg)
        if kind is KvsUnsubscribe:
            self._unsubscribe(peer, msg.key)
            return None
        if kind is KvsRelease:
            self._pins.pop(msg.run_id, None)
            return None
        if kind is KvsForget:
            self._forget(msg.keys)
            return None
        raise ProtocolError(f"the store does not serve {kind.__name__} messages")

    def _get(self, peer: Peer, msg: KvsGet, request_id: int) -> Any:
        self._gets += 1
        value = self.store.get(msg.key)
        if msg.subscribe and value is not None:
            # Only to a key that exists: a cache keeps no entry for an absent
            # key, so it would never evict (and unsubscribe) it.
            self._subscribe(peer, msg.key)
        if msg.pin is not None:
            return KvsValue(msg.key, self._pinned(msg.pin, msg.key))
        wait = _bounded_wait(msg.wait)
        if value is not None or wait <= 0:
            return KvsValue(msg.key, value)
        # Registered before yielding, so a put that lands before the timer starts finds it.
        waiter = _Waiter(peer, request_id, trio.CancelScope())
        self._waiters.setdefault(msg.key, []).append(waiter)
        self._nursery.start_soon(self._expire_waiter, msg.key, waiter, wait)
        return DEFERRED

    def _pinned(self, run_id: str, key: str) -> bytes | None:
        """The run's version of ``key``: pinned now on its first read, the same after."""
        entry = self._pins.get(run_id)
        if entry is None:
            if len(self._pins) % PIN_SWEEP_EVERY == PIN_SWEEP_EVERY - 1:
                cutoff = trio.current_time() - PIN_TTL
                for old in [r for r, (t0, _) in self._pins.items() if t0 < cutoff]:
                    del self._pins[old]
            entry = self._pins[run_id] = (trio.current_time(), {})
        versions = entry[1]
        if key not in versions:
            versions[key] = self.store.get(key)
        return versions[key]

    async def _expire_waiter(self, key: str, waiter: _Waiter, wait: float) -> None:
        """Answer "absent" when the wait runs out (a put answers it first otherwise)."""
        if "kvs_waits" not in waiter.peer.state:
            # A waiter that hangs up takes its waiting reads with it.
            waiter.peer.state["kvs_waits"] = set()
            waiter.peer.on_close.append(_cancel_waits)
        waits: set[trio.CancelScope] = waiter.peer.state["kvs_waits"]
        waits.add(waiter.timer)
        if waiter.peer.closed:  # it hung up before this task started
            waiter.timer.cancel()
        try:
            with waiter.timer:
                await trio.sleep(wait)
        finally:
            waits.discard(waiter.timer)
        if waiter.answered:
            return
        waiter.answered = True
        pending = self._waiters.get(key)
        if pending is not None:
            pending.remove(waiter)
            if not pending:
                del self._waiters[key]
        if not waiter.peer.closed:
            self._answer(waiter, KvsValue(key, self.store.get(key)))

    def _answer(self, waiter: _Waiter, reply: KvsValue) -> None:
        try:
            waiter.peer.post_reply(waiter.request_id, reply)
        except Exception as exc:  # the waiter went away or stopped reading
            log.debug("could not answer waiting get of %r: %s", reply.key, exc)

    def _subscribe(self, peer: Peer, key: str) -> None:
        mine: set[str] | None = peer.state.get("kvs_subscriptions")
        if mine is None:
            mine = peer.state["kvs_subscriptions"] = set()
            peer.on_close.append(self._forget_peer)
        if key in mine:
            return
        if len(mine) >= MAX_SUBSCRIPTIONS_PER_PEER:
            raise DropletError(
                f"a connection may subscribe to at most {MAX_SUBSCRIPTIONS_PER_PEER} keys; "
                "unsubscribe some first")
        mine.add(key)
        self._subscribers[key].add(peer)

    def _unsubscribe(self, peer: Peer, key: str) -> None:
        mine: set[str] | None = peer.state.get("kvs_subscriptions")
        if mine is not None:
            mine.discard(key)
        subs = self._subscribers.get(key)
        if subs is not None:
            subs.discard(peer)
            if not subs:
                del self._subscribers[key]

    def _forget_peer(self, peer: Peer) -> None:
        for key in peer.state.get("kvs_subscriptions", ()):
            subs = self._subscribers.get(key)
            if subs is not None:
                subs.discard(peer)
                if not subs:
                    del self._subscribers[key]

    async def _put(self, peer: Peer, msg: KvsPut) -> KvsStored:
        self._puts += 1
        type_name, changed = self.store.put(msg.key, msg.lattice)
        forgotten = False
        if is_result_key(msg.key):
            forgotten = self._forgotten.pop(msg.key, None) is not None
            if forgotten:  # released before it came: answer the waiters, keep nothing
                self.store.delete(msg.key)
                self._results.pop(msg.key, None)
            else:
                self._expire_results(msg.key)
        if msg.subscribe:
            self._subscribe(peer, msg.key)
        if changed is not None:
            waiting = self._waiters.pop(msg.key, None)
            if waiting:  # answered through each waiter's outbox: never waits here
                reply = KvsValue(msg.key, changed)
                for waiter in waiting:
                    waiter.answered = True
                    waiter.timer.cancel()
                    self._answer(waiter, reply)
            subs = None if forgotten else self._subscribers.get(msg.key)
            if subs:
                update = KvsUpdate(msg.key, changed)
                for sub in list(subs):
                    await self._push(peer, sub, update)
        return KvsStored(type_name)

    def _forget(self, keys: list[str]) -> None:
        """Delete released call results; remember those not stored yet (until the TTL)."""
        now = trio.current_time()
        forgotten = self._forgotten
        for key in keys:
            if not is_result_key(key):
                continue  # clients release call results only, never users' keys
            if self.store.delete(key):
                self._results.pop(key, None)
            else:
                forgotten[key] = now + self.result_ttl
                forgotten.move_to_end(key)
        while len(forgotten) > MAX_EARLY_RELEASES:  # a bound, whatever peers send
            forgotten.popitem(last=False)
        while forgotten:
            key, expiry = next(iter(forgotten.items()))
            if expiry > now:
                break
            del forgotten[key]

    def _expire_results(self, stored: str) -> None:
        """Note a stored result and drop those past their time (cheap: oldest first)."""
        now = trio.current_time()
        results = self._results
        results[stored] = now + self.result_ttl
        results.move_to_end(stored)
        while results:
            key, expiry = next(iter(results.items()))
            if expiry > now:
                break
            del results[key]
            self.store.delete(key)

    async def _push(self, putter: Peer, sub: Peer, update: KvsUpdate) -> None:
        try:
            if sub is putter:
                # Inline, before the put's reply: the putter's cache must hold
                # its own write when the put returns (read your writes).
                await sub.send(update)
            else:
                sub.post(update)
        except Exception as exc:
            log.debug("dropping subscriber %s: %s", sub.remote, exc)
            self._unsubscribe(sub, update.key)
