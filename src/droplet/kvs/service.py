"""The storage service: a storage backend (:mod:`droplet.kvs.backends`) behind the RPC layer.

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
from collections import OrderedDict, defaultdict, deque
from typing import Any

import attrs
import trio

from ..errors import DropletError, ProtocolError, StorageError
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
from .backends.base import BackendStatistics, StorageBackend
from .backends.memory import MemoryBackend
from .keys import is_result_key

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
    storage: BackendStatistics
    #: keys with at least one subscriber (no empty entries are kept).
    subscribed_keys: int = 0
    #: reads waiting for their key to be put, and the keys they wait on.
    waiting_reads: int = 0
    waited_keys: int = 0
    #: call results tracked for expiry.
    results: int = 0
    #: releases of results not stored yet (each forgotten after result_ttl).
    early_releases: int = 0


@attrs.frozen
class _Ack:
    """A put merged in memory whose reply waits until the backend says it is safe."""

    ticket: int
    peer: Peer
    request_id: int
    key: str
    type_name: str
    changed: bytes | None


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

    def __init__(self, nursery: trio.Nursery, backend: StorageBackend | None = None, *,
                 result_ttl: float = DEFAULT_RESULT_TTL) -> None:
        self.backend: StorageBackend = MemoryBackend() if backend is None else backend
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
        # puts merged but not yet safe, in ticket order (see StorageBackend.put_pending)
        self._acks: deque[_Ack] = deque()
        self._acks_waiting = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Run the backend's background work (see :meth:`StorageBackend.run`) until cancelled.

        A node starts it with ``await nursery.start(kvs.serve)`` before serving
        requests; the in-memory backend has no background work, so a service
        built on it also works without.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.backend.run, self._notify)
            nursery.start_soon(self._send_acks)
            task_status.started()

    def statistics(self) -> KvsStatistics:
        storage = self.backend.statistics()
        return KvsStatistics(
            keys=storage.keys if storage.keys is not None else -1,
            gets=self._gets,
            puts=self._puts,
            subscriptions=sum(len(s) for s in self._subscribers.values()),
            pinned_runs=len(self._pins),
            storage=storage,
            subscribed_keys=len(self._subscribers),
            waiting_reads=sum(len(w) for w in self._waiters.values()),
            waited_keys=len(self._waiters),
            results=len(self._results),
            early_releases=len(self._forgotten),
        )

    async def _read(self, key: str) -> bytes | None:
        try:
            return self.backend.get_nowait(key)  # no task switch when the backend can
        except trio.WouldBlock:
            return await self.backend.get(key)

    async def handle(self, peer: Peer, msg: Any, request_id: int) -> Any:
        kind = type(msg)
        if self.backend.concurrent and request_id and (kind is KvsGet or kind is KvsPut):
            # A remote backend (Redis): each request waits a network round trip, so
            # a connection's requests overlap instead of queueing behind each other.
            self._nursery.start_soon(self._answer_later, peer, msg, request_id)
            return DEFERRED
        if kind is KvsGet:
            return await self._get(peer, msg, request_id)
        if kind is KvsPut:
            return await self._put(peer, msg, request_id)
        if kind is KvsUnsubscribe:
            self._unsubscribe(peer, msg.key)
            return None
        if kind is KvsRelease:
            self._pins.pop(msg.run_id, None)
            return None
        if kind is KvsForget:
            if self.backend.concurrent:  # many round trips: never in the reader
                self._nursery.start_soon(self._forget, msg.keys)
            else:
                await self._forget(msg.keys)
            return None
        raise ProtocolError(f"the store does not serve {kind.__name__} messages")

    async def _answer_later(self, peer: Peer, msg: KvsGet | KvsPut, request_id: int) -> None:
        """Serve one get or put in a task of its own and reply (see ``concurrent``)."""
        try:
            if isinstance(msg, KvsGet):
                result = await self._get(peer, msg, request_id)
            else:
                result = await self._put(peer, msg, request_id)
        except Exception as exc:  # a bad request or a storage failure: tell the peer
            if not isinstance(exc, DropletError):
                log.exception("error handling %s from %s", type(msg).__name__, peer.remote)
            result = exc
        if result is DEFERRED or peer.closed:
            return
        try:
            if isinstance(result, Exception):
                await peer.reply_error(request_id, result)
            else:
                await peer.reply(request_id, result)
        except Exception as exc:  # the peer went away meanwhile
            log.debug("could not answer %s of %s: %s", type(msg).__name__, peer.remote, exc)

    async def _get(self, peer: Peer, msg: KvsGet, request_id: int) -> Any:
        self._gets += 1
        try:
            value = self.backend.get_nowait(msg.key)
        except trio.WouldBlock:
            return await self._get_async(peer, msg, request_id)
        if msg.subscribe and value is not None:
            # Only to a key that exists: a cache keeps no entry for an absent
            # key, so it would never evict (and unsubscribe) it.
            self._subscribe(peer, msg.key)
        if msg.pin is not None:
            return KvsValue(msg.key, await self._pinned(msg.pin, msg.key))
        wait = _bounded_wait(msg.wait) if request_id else 0.0  # one-way: nobody waits
        if value is not None or wait <= 0:
            return KvsValue(msg.key, value)
        # Registered before yielding, so a put that lands before the timer starts finds it.
        self._wait_for(peer, msg.key, request_id, wait)
        return DEFERRED

    def _wait_for(self, peer: Peer, key: str, request_id: int, wait: float) -> _Waiter:
        waiter = _Waiter(peer, request_id, trio.CancelScope())
        self._waiters.setdefault(key, []).append(waiter)
        self._nursery.start_soon(self._expire_waiter, key, waiter, wait)
        return waiter

    async def _get_async(self, peer: Peer, msg: KvsGet, request_id: int) -> Any:
        """A read from a backend that must wait: a put may land while we read."""
        key = msg.key
        if msg.pin is not None:
            if msg.subscribe:
                await self._read_subscribing(peer, msg)
            return KvsValue(key, await self._pinned(msg.pin, key))
        wait = _bounded_wait(msg.wait) if request_id else 0.0  # one-way: nobody waits
        if wait <= 0:
            return KvsValue(key, await self._read_subscribing(peer, msg))
        waiter = self._wait_for(peer, key, request_id, wait)  # before reading, not after
        try:
            value = await self._read_subscribing(peer, msg)
        except Exception:
            if waiter.answered:  # a put answered it meanwhile: that answer stands
                return DEFERRED
            self._drop_waiter(key, waiter)
            raise
        except BaseException:
            self._drop_waiter(key, waiter)
            raise
        if waiter.answered:  # a put answered it while we read
            return DEFERRED
        if value is None:
            return DEFERRED
        self._drop_waiter(key, waiter)
        return KvsValue(key, value)

    async def _read_subscribing(self, peer: Peer, msg: KvsGet) -> bytes | None:
        """Read from the backend; a subscribing read subscribes *before* it waits, so a
        change landing meanwhile (through another storage node) is pushed, and drops
        the subscription again if the key turns out absent."""
        mine = peer.state.get("kvs_subscriptions")
        fresh = msg.subscribe and not (mine is not None and msg.key in mine)
        if not fresh:
            return await self.backend.get(msg.key)
        self._subscribe(peer, msg.key)
        # key -> whether an update was pushed to this peer while we read
        reading: dict[str, bool] = peer.state.setdefault("kvs_reading", {})
        reading[msg.key] = False
        value = None
        try:
            value = await self.backend.get(msg.key)
        finally:
            pushed = reading.pop(msg.key, False)
            if value is None and not pushed:  # absent: a cache holds no entry to evict
                self._unsubscribe(peer, msg.key)
        return value

    def _drop_waiter(self, key: str, waiter: _Waiter) -> None:
        waiter.answered = True
        waiter.timer.cancel()
        pending = self._waiters.get(key)
        if pending is not None and waiter in pending:
            pending.remove(waiter)
            if not pending:
                del self._waiters[key]

    async def _pinned(self, run_id: str, key: str) -> bytes | None:
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
            versions[key] = await self._read(key)
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
        if waiter.peer.closed:
            return
        try:
            value = await self._read(key)
        except DropletError as exc:  # the backend failed (Redis): tell the reader
            try:
                waiter.peer.post_error(waiter.request_id, exc)
            except DropletError:
                pass  # it went away meanwhile
            return
        self._answer(waiter, KvsValue(key, value))

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
        self._check_room(peer, key)
        mine.add(key)
        self._subscribers[key].add(peer)

    @staticmethod
    def _check_room(peer: Peer, key: str) -> None:
        """Raise if ``peer`` may not subscribe to one more key (before any change is made)."""
        mine: set[str] | None = peer.state.get("kvs_subscriptions")
        if mine is not None and key not in mine and len(mine) >= MAX_SUBSCRIPTIONS_PER_PEER:
            raise DropletError(
                f"a connection may subscribe to at most {MAX_SUBSCRIPTIONS_PER_PEER} keys; "
                "unsubscribe some first")

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

    async def _put(self, peer: Peer, msg: KvsPut, request_id: int) -> Any:
        self._puts += 1
        if msg.subscribe:  # refused before the merge, not after it
            self._check_room(peer, msg.key)
        backend = self.backend
        try:
            type_name, changed = backend.put_nowait(msg.key, msg.lattice)
        except trio.WouldBlock:
            try:
                (type_name, changed), ticket = backend.put_pending(msg.key, msg.lattice)
            except trio.WouldBlock:
                type_name, changed = await backend.put(msg.key, msg.lattice)
            else:
                # Merged now, in order; answered once safe, by _send_acks: this
                # connection's next puts join the same log write meanwhile.
                await self._note_result(msg.key)
                if msg.subscribe:
                    self._subscribe(peer, msg.key)
                self._acks.append(_Ack(ticket, peer, request_id, msg.key, type_name, changed))
                self._acks_waiting.set()
                return DEFERRED
        await self._note_result(msg.key)
        if msg.subscribe:
            self._subscribe(peer, msg.key)
        if changed is not None:
            await self._notify(msg.key, changed, putter=peer)
        return KvsStored(type_name)

    async def _note_result(self, key: str) -> None:
        """Track a stored call result; one whose release came first is dropped at once.

        (Its waiting reads are still answered, from the put itself.)
        """
        if not is_result_key(key):
            return
        if self._forgotten.pop(key, None) is not None:
            self._results.pop(key, None)
            await self._delete(key)
        else:
            await self._expire_results(key)

    async def _delete(self, key: str) -> bool:
        try:
            return self.backend.delete_nowait(key)
        except trio.WouldBlock:
            return await self.backend.delete(key)

    async def _forget(self, keys: list[str]) -> None:
        """Delete released call results; remember those not stored yet (until the TTL)."""
        now = trio.current_time()
        forgotten = self._forgotten
        for key in keys:
            if not is_result_key(key):
                continue  # clients release call results only, never users' keys
            try:
                deleted = await self._delete(key)
            except DropletError as exc:  # the backend failed: the TTL drops it later
                log.debug("could not delete released result %r: %s", key, exc)
                continue
            if deleted:
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

    async def _send_acks(self) -> None:
        """Answer puts (and tell waiters and subscribers) as the backend makes them safe."""
        acks = self._acks
        while True:
            if not acks:
                await self._acks_waiting.wait()
                self._acks_waiting = trio.Event()
                continue
            error: StorageError | None = None
            try:
                safe = await self.backend.wait_committed(acks[0].ticket)
            except StorageError as exc:
                error, safe = exc, acks[-1].ticket
            while acks and acks[0].ticket <= safe:
                ack = acks.popleft()
                if error is not None:
                    if ack.request_id:
                        await self._answer_put(ack, error)
                    continue
                if ack.changed is not None:
                    await self._notify(ack.key, ack.changed)
                if ack.request_id:
                    await self._answer_put(ack, KvsStored(ack.type_name))

    async def _answer_put(self, ack: _Ack, reply: KvsStored | StorageError) -> None:
        # Through the writer's outbox: one stuck writer never holds up the
        # answers of the others, and the answer follows the writer's own
        # KvsUpdate (posted by _notify just before), so it reads its write.
        try:
            if isinstance(reply, StorageError):
                ack.peer.post_error(ack.request_id, reply)
            else:
                ack.peer.post_reply(ack.request_id, reply)
        except Exception as exc:  # the writer went away or stopped reading
            log.debug("could not answer put of %r: %s", ack.key, exc)

    async def _notify(self, key: str, changed: bytes, putter: Peer | None = None) -> None:
        """Tell waiting reads and subscribed caches that ``key`` is now ``changed``.

        Called for puts through this node (``putter`` is the writer, told inline
        before its reply), after a durable backend made puts safe (``putter``
        None: everyone through their outboxes), and by the backend for changes
        made through other storage nodes (a shared Redis).
        """
        waiting = self._waiters.pop(key, None)
        if waiting:  # answered through each waiter's outbox: never waits here
            reply = KvsValue(key, changed)
            for waiter in waiting:
                waiter.answered = True
                waiter.timer.cancel()
                self._answer(waiter, reply)
        subs = self._subscribers.get(key)
        if subs:
            update = KvsUpdate(key, changed)
            for sub in list(subs):
                reading = sub.state.get("kvs_reading")
                if reading and key in reading:  # see _read_subscribing
                    reading[key] = True
                await self._push(putter, sub, update)

    async def _expire_results(self, stored: str) -> None:
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
            await self._delete(key)

    async def _push(self, putter: Peer | None, sub: Peer, update: KvsUpdate) -> None:
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
