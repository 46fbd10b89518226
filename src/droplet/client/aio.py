"""``AsyncDropletClient``: the whole client API as ``async def``, for Trio code.

>>> async def main():                                       # doctest: +SKIP
...     async with droplet.open_client("tcp://127.0.0.1:5000") as cloud:
...         square = await cloud.register(lambda _, x: x * x, "square")
...         print(await (await square(3)).get())
"""

from __future__ import annotations

import builtins
import os
import ssl
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..consistency import CAUSAL, NORMAL, REPEATABLE_READ
from ..errors import (
    ConnectionError,
    DagError,
    DropletError,
    TimeoutError,
)
from ..executor.thread_calls import Claim
from ..links import connect_peer
from ..protocol.messages import (
    Blob,
    BoolReply,
    CallDag,
    CallPlaced,
    ClusterInfo,
    DagResult,
    DeleteDag,
    FunctionExists,
    GetStatus,
    Hello,
    KvsForget,
    KvsGet,
    KvsPut,
    KvsValue,
    ListDags,
    ListFunctions,
    Names,
    PlaceCall,
    StatusReply,
)
from ..rpc import Peer, Slot
from ..status import ClusterStatus
from ..transports.base import TransportOptions
from ..transports.registry import normalize_address
from ._core import (
    ClientCore,
    check_chunksize,
    check_key,
    check_timeout,
    direct_result_lattice,
    map_items,
    result_blob,
    result_put,
    unwrap_result,
)
from ._deadlines import Deadlines, Waiter
from ._direct import (
    DIAL_TIMEOUT,
    AsyncDirectCalls,
    may_go_direct,
    reference_set,
    same_scheme,
    triggers_for,
)
from ._lanes import Lanes, lane_of
from ._map import chunks_for
from ._release import FLUSH_DELAY, MAX_BATCH, Releases
from .kvs_client import AsyncKvsClient

__all__ = [
    "CAUSAL",
    "NORMAL",
    "REPEATABLE_READ",
    "AsyncDropletClient",
    "AsyncDropletFunction",
    "AsyncDropletFuture",
    "open_client",
    "unwrap_result",
]

DEFAULT_TIMEOUT = 30.0
#: A call answered within its own send (an in-process executor that ran an
#: async function at once) passes no schedule point: one in this many such
#: calls yields to the loop's other tasks, as a connection's reader does.
CHECKPOINT_EVERY = 32
#: Seconds aclose() may spend telling the store which results it can drop.
CLOSE_FLUSH_TIMEOUT = 1.0


_THREADSAFE_LOCK = threading.Lock()


class AsyncDropletFuture:
    """The pending result of a call, stored in the KVS under ``obj_id``.

    The client starts waiting for the result (a blocking KVS read) as soon as
    the call is sent, so ``get()`` costs no extra round trip.
    """

    def __init__(self, obj_id: str, client: AsyncDropletClient, timeout: float,
                 session: str | None = None) -> None:
        self._key = obj_id
        self._pinned = False
        self._client = client
        self._session = session
        self._timeout = timeout
        self._blob: Blob | None = None
        self._error: BaseException | None = None
        self._arrived = trio.Event()
        # ``arrived_threadsafe``, made only when the sync facade asks (a
        # threading.Event costs a lock and a condition per call).
        self._threadsafe: threading.Event | None = None
        self._fetching = False
        #: called (in the loop) when a reply arrives: droplet.wait and as_completed.
        self._wakers: list[Callable[[], None]] = []
        #: tasks in get(), parked on the client's deadlines (no cancel scope each).
        self._parked: list[Waiter] = []
        #: a task in the loop waited for it in get() (a reply from a thread wakes the loop).
        self._watched = False
        #: a direct result whose key was handed out is stored once (_want_stored).
        self._store_wanted = False
        #: sent straight to an executor, which answers this client alone: the
        #: result is stored only once its key is handed out (``obj_id``).
        self._direct = False
        #: queued from the sync caller's thread for a worker thread, which that
        #: thread may run itself when it waits for it (``run_claimed``).
        self._claim: Claim | None = None

    @property
    def arrived_threadsafe(self) -> threading.Event:
        """Set with ``_arrived``, for the sync facade to wait on without the event loop."""
        event = self._threadsafe
        if event is None:
            with _THREADSAFE_LOCK:
                event = self._threadsafe
                if event is None:
                    event = threading.Event()
                    self._threadsafe = event  # before the check: _fetched may run now
                    if self._arrived.is_set() or self._settled():
                        event.set()
        return event

    @property
    def obj_id(self) -> str:
        """The KVS key of the result; handing it out keeps the result until the client closes.

        Otherwise the result is released when this future is garbage-collected.
        A call answered by its executor alone is stored by this client once
        its key is handed out and its result is in (this client's next request
        that may read it, such as ``get_object``, waits for that).
        """
        if not self._pinned:
            self._pinned = True
            if not self._direct:  # the executor stores it (or nothing was sent)
                self._client._releases.pin(self._key)
            elif self._settled():
                self._client._want_stored(self)
            # else: stored when it arrives (_fetched)
        return self._key

    async def _stored_key(self) -> str:
        """``obj_id`` once the result is stored: waits for the result (up to the
        call's timeout; past that it is stored when it comes) and the store's ack."""
        key = self.obj_id
        if not self._settled():
            with trio.move_on_after(self._timeout):
                await self._arrived.wait()
        await self._client._confirm_stored()
        return key

    def __del__(self) -> None:
        if not self._pinned and not self._direct:
            self._client._releases.release(self._key)

    def fetch_request(self) -> KvsGet:
        """The read of the result: it waits in the KVS up to the call's timeout."""
        return KvsGet(self._key, self._timeout)

    def _watch(self, slot: Slot) -> None:
        # The reply may already be in: submit() yields after sending.
        self._fetching = True
        slot.when_done(lambda: self._fetched(slot.value, slot.error))

    async def _start_fetch(self) -> None:
        try:
            (slot,) = await self._client._kvs.submit(self.fetch_request())
        except DropletError as exc:
            self._fetched(None, exc)
            return
        self._watch(slot)

    def _fetched(self, reply: KvsValue | DagResult | None, error: BaseException | None
                 ) -> None:
        if error is not None:
            self._error = error
        elif isinstance(reply, DagResult):  # straight from the executor
            self._blob = reply.value
        elif reply is not None and reply.lattice is not None:
            try:
                self._blob = result_blob(reply.lattice)
            except DropletError as exc:
                self._error = exc
        self._arrive()

    def _delivered(self, blob: Blob, failed: bool) -> None:
        """The pickled result, from an executor's lane (``executor/inline.py``)."""
        self._blob = blob
        self._arrive()

    def _arrive(self) -> None:
        if self._direct and self._pinned:  # its key was handed out: store it
            self._client._want_stored(self)
        self._fetching = False
        self._arrived.set()
        if self._parked:
            self._client._deadlines.wake(self._parked)
        if self._threadsafe is not None:
            self._threadsafe.set()
        for wake in list(self._wakers):
            wake()

    def _fetched_from_thread(self, reply: DagResult | None,
                             error: BaseException | None) -> None:
        """The reply, from a worker thread (``_embedded.py``): the sync caller's wait ends
        now; the loop does the rest of ``_fetched`` (events, wakers, storing) later,
        and only if something in it waits for this future (a task in ``get()``,
        ``droplet.wait``'s wakers, a key handed out to store): otherwise the
        result is all there is to it, and the loop is not woken at all."""
        if error is not None:
            self._error = error
        elif isinstance(reply, DagResult):
            self._blob = reply.value
        with _THREADSAFE_LOCK:  # pairs with arrived_threadsafe's check
            event = self._threadsafe
        if event is not None:
            event.set()
        # Read after the result was written, as the loop writes these before it
        # looks for the result: either it sees the result, or we see it waits.
        if not (self._pinned or self._watched or self._parked or self._wakers):
            return  # nothing in the loop waits for it: no wakeup of the loop at all
        try:
            self._client._token.run_sync_soon(self._fetched, reply, error)
        except trio.RunFinishedError:
            pass  # the client's loop is gone: nobody in it waits

    def run_claimed(self, timeout: float) -> None:
        """From the sync caller's thread, about to wait up to ``timeout`` seconds:
        run the call here if it was queued for a worker thread that has not
        started it, and it is known to be quick (see ``executor/thread_calls.py``)."""
        claim = self._claim
        if claim is not None:
            self._claim = None
            claim.run_here(timeout)

    def _settled(self) -> bool:
        """Whether the result or an error is in (no waiting, no I/O)."""
        return self._blob is not None or self._error is not None

    def _expired(self) -> bool:
        """Whether the store's wait ran out with no result: the read must be sent again."""
        return not self._settled() and not self._fetching and self._arrived.is_set()

    async def _rearm(self) -> None:
        """Send the result read again after the store's wait ran out."""
        self._arrived = trio.Event()
        if self._threadsafe is not None:
            self._threadsafe.clear()
        await self._start_fetch()

    def result_ready(self) -> Any:
        """The result if it has arrived (raising the call's error), else TimeoutError."""
        if self._blob is not None:
            return self._client._core.finish(unwrap_result(self._blob), self._session)
        if self._error is not None:
            raise self._error
        raise TimeoutError(
            f"no result for {self._key} yet "
            "(pass a larger timeout to get() if the function is slow)")

    async def get(self, timeout: float | None = None) -> Any:
        """Wait for the result (``timeout`` seconds, default the call's or client's).

        Raises:
            FunctionError: the function (or one upstream of it) raised.
            TimeoutError: no result within the timeout.
        """
        wait = check_timeout(timeout, self._timeout)
        if self._blob is None and self._error is None:
            if not self._fetching:  # the first wait expired; wait again
                self._arrived = trio.Event()
                if self._threadsafe is not None:
                    self._threadsafe.clear()
                await self._start_fetch()
            if self._blob is None and self._error is None and not self._arrived.is_set():
                self._watched = True  # before the look below: see _fetched_from_thread
                if self._blob is None and self._error is None:
                    await self._client._deadlines.park(self._parked, wait)
            if self._blob is None and self._error is None:
                raise TimeoutError(
                    f"no result for {self._key} within {wait:g} s "
                    "(pass a larger timeout to get() if the function is slow)")
        return self.result_ready()

    async def done(self) -> bool:
        """Whether the result is ready (does not wait)."""
        await trio.lowlevel.checkpoint()
        return self._blob is not None or self._error is not None

    def __await__(self) -> Any:
        return self.get().__await__()

    def __repr__(self) -> str:
        return f"<AsyncDropletFuture {self._key}>"


class AsyncDropletFunction:
    """A registered function; calling it returns an awaitable future."""

    def __init__(self, name: str, client: AsyncDropletClient) -> None:
        self.name = name
        self._client = client

    async def __call__(self, *args: Any) -> AsyncDropletFuture:
        return await self._client.exec_func(self.name, list(args))

    async def map(self, iterable: Iterable[Any], *,
                  chunksize: int | None = None) -> list[AsyncDropletFuture]:
        """One call per item, many per message: see :meth:`AsyncDropletClient.map`."""
        return await self._client.map(self.name, iterable, chunksize=chunksize)

    def __repr__(self) -> str:
        return f"<AsyncDropletFunction {self.name!r}>"


class AsyncDropletClient:
    """A connection to a Droplet cluster (scheduler plus KVS) from Trio code.

    Create one with :func:`open_client` (which owns its background tasks), or
    with :meth:`connect` giving a nursery you own.
    """

    def __init__(self, scheduler: Peer, kvs: Peer, address: str, timeout: float,
                 nursery: trio.Nursery, *, token: str | None = None,
                 options: TransportOptions | None = None, direct: bool = True) -> None:
        self._nursery = nursery
        self._core = ClientCore()
        self._scheduler = scheduler
        self._kvs = kvs
        self.address = address
        self.timeout = timeout
        self._releases = Releases()
        self._flush_wanted = trio.Event()
        self._flush_scheduled = False
        self._token = trio.lowlevel.current_trio_token()
        self._releases.on_release = self._schedule_flush
        nursery.start_soon(self._flush_releases)
        #: the timeouts of tasks waiting in ``AsyncDropletFuture.get``.
        self._deadlines = Deadlines(nursery)
        #: direct calls answered before their send returned (see _submit_direct).
        self._answered_at_once = 0
        #: call shapes executors would not take from a caller's thread, until when
        #: (the sync facade's ``_embedded.send_from_thread``).
        self._declined_from_thread: dict[tuple[str, bool], float] = {}
        #: Anna-style access to the KVS: ``await kvs_client.get(keys)``, ``.put(key, lattice)``.
        self.kvs_client = AsyncKvsClient(self._fetch_many, self._store)

        async def dial(url: str) -> Peer:
            same_scheme(address, url)
            return await connect_peer(url, nursery, token=token, options=options,
                                      timeout=min(timeout, DIAL_TIMEOUT))

        async def place(target: str, is_function: bool, references: list[str],
                        calls: int) -> CallPlaced:
            reply: CallPlaced = await scheduler.request(
                PlaceCall(target, is_function, references, calls), timeout)
            return reply

        #: calls sent straight to executors (placement cached from the scheduler).
        self._direct = AsyncDirectCalls(dial, place)
        self._direct.enabled = direct
        #: runs prepared on the lanes of executors in this Trio run (_lanes.py).
        self._lanes = Lanes()
        #: direct results whose keys were handed out (obj_id), to store.
        self._to_store: builtins.list[AsyncDropletFuture] = []
        #: True once aclose() began: nothing more is stored for this client.
        self._closing = False
        #: batches of those being stored (set once acknowledged).
        self._storing: builtins.list[trio.Event] = []

    async def _fetch_many(self, keys: list[str]) -> list[bytes | None]:
        await self._confirm_stored()  # they may be direct results' keys handed out
        slots = await self._kvs.submit(*[KvsGet(k) for k in keys])
        replies: list[KvsValue] = [await self._kvs.wait(slot, self.timeout, "KvsGet")
                                   for slot in slots]
        return [r.lattice for r in replies]

    async def _store(self, key: str, data: bytes) -> None:
        await self._kvs.request(KvsPut(key, data), self.timeout)
        self._direct.wrote(key)

    @classmethod
    async def connect(
        cls,
        address: str,
        nursery: trio.Nursery,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        options: TransportOptions | None = None,
        tls_ca: str | None = None,
    ) -> AsyncDropletClient:
        """Connect to the scheduler at ``address`` (and the KVS it names).

        Args:
            token: the cluster token (default: ``$DROPLET_TOKEN``).
            timeout: seconds to connect, and the default wait for replies and results.
            tls_ca: CA certificate file to verify a ``tls://``/``wss://`` node.
        """
        url = normalize_address(address)
        if tls_ca is not None:
            base = options or TransportOptions()
            options = TransportOptions(
                max_frame_size=base.max_frame_size, read_timeout=base.read_timeout,
                ssl_context=ssl.create_default_context(cafile=tls_ca))
        token = token if token is not None else os.environ.get("DROPLET_TOKEN") or None
        scheduler = await connect_peer(url, nursery, token=token, options=options,
                                       timeout=timeout)
        info: ClusterInfo = await scheduler.request(
            Hello("client", uuid.uuid4().hex[:12]), timeout)
        if info.kvs in ("", url):
            kvs = scheduler
        else:
            kvs = await connect_peer(info.kvs, nursery, token=token, options=options,
                                     timeout=timeout)
        return cls(scheduler, kvs, url, timeout, nursery, token=token, options=options)

    async def aclose(self) -> None:
        self._closing = True
        keys = self._releases.take_all()
        if keys and not self._kvs.closed:
            with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
                try:
                    await self._kvs.send_many([KvsForget(keys[i:i + MAX_BATCH])
                                               for i in range(0, len(keys), MAX_BATCH)])
                except DropletError:
                    pass  # the store went away: nothing to release
        self._releases.on_release = None
        self._lanes.clear()
        self._flush_wanted.set()  # lets the flusher see the client closed
        await self._direct.aclose()
        await self._scheduler.aclose()
        await self._kvs.aclose()
        self._deadlines.close()  # after the connections: their waiters heard why

    # ------------------------------------------------------------------ result lifetimes

    def _schedule_flush(self) -> None:
        """A future was collected (any thread, maybe inside a finalizer): wake the flusher."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                self._token.run_sync_soon(self._wake_flusher)
            except trio.RunFinishedError:
                pass

    def _wake_flusher(self) -> None:
        self._flush_wanted.set()  # in the loop: whichever event the flusher waits on now

    async def _flush_releases(self) -> None:
        """Tell the store which results nobody can read any more, in batches."""
        while not self._kvs.closed:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            if self._kvs.closed or self._releases.on_release is None:
                return
            await trio.sleep(FLUSH_DELAY)  # gather a batch
            self._flush_scheduled = False  # before taking: a later release wakes us again
            while len(self._releases) and not self._kvs.closed:
                try:
                    await self._kvs.send(KvsForget(self._releases.take()))
                except DropletError:
                    return

    async def __aenter__(self) -> AsyncDropletClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ functions

    async def register(self, function: Callable[..., Any] | tuple[type, Sequence[Any]],
                       name: str) -> AsyncDropletFunction:
        await self._scheduler.request(ClientCore.register_request(function, name), self.timeout)
        self._direct.forget(name, True)
        return AsyncDropletFunction(name, self)

    async def get_function(self, name: str) -> AsyncDropletFunction | None:
        reply: BoolReply = await self._scheduler.request(FunctionExists(name), self.timeout)
        return AsyncDropletFunction(name, self) if reply.value else None

    async def list(self, prefix: str | None = None) -> list[str]:
        reply: Names = await self._scheduler.request(ListFunctions(prefix), self.timeout)
        return reply.names

    async def exec_func(self, name: str, args: Iterable[Any] = ()) -> AsyncDropletFuture:
        return await self._exec_call(ClientCore.function_call(name, args))

    async def _exec_call(self, call: CallDag) -> AsyncDropletFuture:
        return await self._submit_direct(call) or await self._submit(call, self.timeout)

    def _want_stored(self, future: AsyncDropletFuture) -> None:
        """Store a direct result whose key was handed out (in the loop's thread)."""
        if future._store_wanted:
            return
        future._store_wanted = True
        self._to_store.append(future)
        try:
            self._nursery.start_soon(self._confirm_stored)
        except RuntimeError:  # the client is closing: nothing more is stored
            pass

    async def _confirm_stored(self) -> None:
        """Store the direct results whose keys were handed out (obj_id): their
        executors answered this client alone. Requests that may read them
        (get_object, calls, map, KVS reads) wait for this first."""
        while self._to_store or self._storing:
            if not self._to_store:  # another task stores them: wait for its acks
                await self._storing[0].wait()
                continue
            batch, self._to_store = self._to_store, []
            done = trio.Event()
            self._storing.append(done)
            try:
                puts = []
                for future in batch:
                    lattice = direct_result_lattice(future._blob, future._error)
                    if lattice is not None and not self._closing:
                        puts.append(result_put(future._key, lattice, self._kvs.send_limit))
                        self._releases.pin(future._key)
                if puts:
                    slots = await self._kvs.submit(*puts)
                    for slot in slots:
                        await self._kvs.wait(slot, self.timeout, "KvsPut")
            except DropletError:  # the store went away (the client is closing)
                pass
            finally:
                self._storing.remove(done)
                done.set()

    async def _submit_direct(self, call: CallDag) -> AsyncDropletFuture | None:
        """Send ``call`` straight to an executor (see ``_direct.py``); None when it must
        go through the scheduler (no executor reachable, or a call of another kind)."""
        if self._to_store or self._storing:
            await self._confirm_stored()
        if not may_go_direct(call):
            return None
        references = reference_set(call)
        found = (self._direct.cached_target(call.target, call.is_function, references)
                 or await self._direct.target(call.target, call.is_function, references))
        if found is None:
            return None
        peer, plan = found
        lane = lane_of(peer)
        if lane is not None:  # an executor in this Trio run: no message at all
            future = self._future_for(call, self.timeout)
            if self._lanes.start(lane, peer.remote, call, plan, future):
                self._core.accepted.accepted(call)  # see below
                if future._settled():  # answered at once, as below
                    self._answered_at_once += 1
                    if not self._answered_at_once % CHECKPOINT_EVERY:
                        await trio.lowlevel.checkpoint()
                return future
            future._pinned = True  # not sent: its key goes with the call, another way
        triggers = triggers_for(call, plan, peer.remote)
        if triggers is None:
            return None
        try:  # the first source's trigger carries the request: the sink answers it
            (slot,) = await peer.submit(triggers[0], oneway=triggers[1:])
        except ConnectionError:
            self._direct.executor_left(peer.remote)
            return None
        # Made only now: a future dropped after a failed send would release the
        # result key the call then gets through the scheduler.
        future = self._future_for(call, self.timeout)
        # Placed by the scheduler, so of a shape it accepts: were these calls to
        # go through it later (direct calls off, executors unreachable), they
        # need not wait for CallAccepted (5000 at once would each wait for one).
        self._core.accepted.accepted(call)
        future._direct = True
        future._watch(slot)
        if future._settled():  # answered within the send (in-process, at once)
            self._answered_at_once += 1
            if not self._answered_at_once % CHECKPOINT_EVERY:
                await trio.lowlevel.checkpoint()  # let the loop's other tasks run too
        return future

    async def map(self, name: str, iterable: Iterable[Any], *,
                  chunksize: int | None = None) -> builtins.list[AsyncDropletFuture]:
        """Call ``name`` once per item of ``iterable``: a list of futures, in order.

        Each item is the call's single argument (a tuple item is one argument,
        as in ``concurrent.futures.Executor.map`` with one iterable). Up to
        ``chunksize`` calls (default 256) go in one write: straight to the
        executors the scheduler's placement allows, split evenly over them
        (``_map.py``), else through the scheduler, each with its result read.
        Returns once every call is sent (through the scheduler: accepted); a
        refused call (say, no such function) raises its error. A function that
        raises makes only its own future's ``get()`` raise ``FunctionError``.
        """
        size = check_chunksize(chunksize)
        every = [ClientCore.function_call(name, [item]) for item in map_items(iterable)]
        await self._confirm_stored()  # its items may refer to direct results' keys
        all_futures = [AsyncDropletFuture(c.result_key or "", self, self.timeout)
                       for c in every]
        left = list(range(len(every)))
        if self._direct.enabled and every:
            left = await self._map_direct(every, all_futures, size)
        calls = [every[i] for i in left]
        futures = [all_futures[i] for i in left]
        await self._map_through_scheduler(calls, futures, size)
        return all_futures

    async def _map_direct(self, calls: builtins.list[CallDag],
                          futures: builtins.list[AsyncDropletFuture],
                          size: int) -> builtins.list[int]:
        """Send what of ``calls`` can go straight to executors (see ``_map.py``); the
        indices of those left for the scheduler."""
        groups = Counter(reference_set(c) for c in calls if may_go_direct(c))
        spreads = {}
        for refs, count in groups.items():
            spreads[refs] = await self._direct.spread(calls[0].target, calls[0].is_function,
                                                      refs, count)
        chunks, leftover = chunks_for(calls, size, lambda refs, _: spreads[refs],
                                      lambda peer: peer.remote)
        sent = False
        for chunk in chunks:
            try:
                slots = await chunk.peer.submit(*chunk.triggers)
            except ConnectionError:  # it left: these go through the scheduler
                self._direct.executor_left(chunk.peer.remote)
                leftover += chunk.indices
                continue
            sent = True
            for i, slot in zip(chunk.indices, slots, strict=True):
                futures[i]._direct = True
                futures[i]._watch(slot)
        if sent:  # placed by the scheduler, so of a shape it accepts (see _submit_direct)
            self._core.accepted.accepted(calls[0])
        return sorted(leftover)

    async def _map_through_scheduler(self, calls: builtins.list[CallDag],
                                     futures: builtins.list[AsyncDropletFuture],
                                     size: int) -> None:
        deadline = trio.current_time() + self.timeout
        accepted: builtins.list[Slot] = []
        for start in range(0, len(calls), size):
            chunk = calls[start:start + size]
            mine = futures[start:start + size]
            fetches = [f.fetch_request() for f in mine]
            if self._kvs is self._scheduler:  # calls and result reads, in one write
                slots = await self._scheduler.submit(
                    *[m for pair in zip(chunk, fetches, strict=True) for m in pair])
                call_slots, fetch_slots = slots[0::2], slots[1::2]
            else:
                call_slots = await self._scheduler.submit(*chunk)
                fetch_slots = await self._kvs.submit(*fetches)
            for future, slot in zip(mine, fetch_slots, strict=True):
                future._watch(slot)
            accepted += call_slots
        refusal: DropletError | None = None
        for future, slot in zip(futures, accepted, strict=True):
            try:
                await self._scheduler.wait(slot, max(0.0, deadline - trio.current_time()),
                                           "CallDag")
            except DropletError as exc:
                future._pinned = True  # refused: no result will be stored, none to release
                refusal = refusal or exc
        if refusal is not None:  # the first refusal (say, no such function)
            raise refusal

    def _future_for(self, call: CallDag, wait: float) -> AsyncDropletFuture:
        """The future of ``call`` (callable from any thread: it touches no loop state)."""
        assert call.result_key is not None
        return AsyncDropletFuture(call.result_key, self, wait, ClientCore.session_of(call))

    async def _send_one_way(self, call: CallDag, future: AsyncDropletFuture) -> None:
        if self._kvs is self._scheduler:  # one node: call and result read in one write
            (fetch_slot,) = await self._scheduler.submit(future.fetch_request(),
                                                         oneway=[call])
        else:
            await self._scheduler.send(call)
            (fetch_slot,) = await self._kvs.submit(future.fetch_request())
        future._watch(fetch_slot)

    async def _send_accepted(self, call: CallDag, future: AsyncDropletFuture) -> None:
        """Send a call whose future exists (the sync facade made it), in a task of its
        own: straight to an executor, else one-way; a failure is the future's error."""
        try:
            await self._confirm_stored()
            if may_go_direct(call):
                found = await self._direct.target(call.target, call.is_function,
                                                  reference_set(call))
                lane = found and lane_of(found[0])
                if found and lane is not None and self._lanes.start(
                        lane, found[0].remote, call, found[1], future):
                    self._core.accepted.accepted(call)  # see _submit_direct
                    return
                triggers = found and triggers_for(call, found[1], found[0].remote)
                if found and triggers:
                    try:
                        (slot,) = await found[0].submit(triggers[0], oneway=triggers[1:])
                    except ConnectionError:  # it left: through the scheduler, as _submit_direct
                        self._direct.executor_left(found[0].remote)
                    else:
                        self._core.accepted.accepted(call)  # see _submit_direct
                        future._direct = True
                        future._watch(slot)
                        return
            await self._send_one_way(call, future)
        except Exception as exc:  # a broken connection, a call over the frame limit
            future._pinned = True  # nothing was sent: nothing to release
            future._fetched(None, exc if isinstance(exc, DropletError)
                            else DropletError(f"could not send the call: {exc}"))

    async def _submit(self, call: CallDag, wait: float) -> AsyncDropletFuture:
        """Send a call and start waiting for its result at once (one round trip)."""
        future = self._future_for(call, wait)
        accepted = self._core.accepted
        if accepted.known(call):
            # A call of this shape was accepted before: send it one-way, with no
            # wait for its acceptance; a refusal is stored as its result.
            await self._send_one_way(call, future)
            return future
        if self._kvs is self._scheduler:  # one node: call and result read in one write
            call_slot, fetch_slot = await self._scheduler.submit(call, future.fetch_request())
        else:
            (call_slot,) = await self._scheduler.submit(call)
            (fetch_slot,) = await self._kvs.submit(future.fetch_request())
        future._watch(fetch_slot)
        try:
            await self._scheduler.wait(call_slot, self.timeout, "CallDag")
        except BaseException:
            future._pinned = True  # refused: no result will be stored, nothing to release
            raise
        accepted.accepted(call)
        return future

    # ------------------------------------------------------------------ DAGs

    async def register_dag(self, name: str, functions: Sequence[Any],
                           connections: Iterable[Sequence[str]],
                           colocated: Iterable[str] = (), gpu_functions: Iterable[str] = (),
                           batching_functions: Iterable[str] = ()) -> tuple[bool, None]:
        """Register a DAG; ``(True, None)`` (Cloudburst's shape), or DagError saying why."""
        await self._scheduler.request(
            ClientCore.register_dag_request(name, functions, connections, colocated,
                                            gpu_functions, batching_functions),
            self.timeout)
        self._direct.forget(name, False)
        return True, None

    async def delete_dag(self, name: str) -> tuple[bool, None]:
        """Remove a DAG; ``(True, None)``, or DagError if there is none of that name."""
        if not isinstance(name, str):
            raise DagError(f"delete_dag: the DAG name must be a string, not {name!r}")
        await self._scheduler.request(DeleteDag(name), self.timeout)
        self._direct.forget(name, False)
        return True, None

    async def call_dag(
        self,
        name: str,
        arg_map: dict[str, Any],
        direct_response: bool = False,
        consistency: str = NORMAL,
        output_key: str | None = None,
        client_id: str | None = None,
        timeout: float | None = None,
        dry_run: bool = False,
        continuation: CallDag | None = None,
    ) -> Any:
        """Run a DAG. Returns a future, or the result itself with ``direct_response``.

        ``dry_run`` returns the call unsent, to pass as another call's
        ``continuation``: that DAG then runs on this one's result.
        """
        call = self._core.dag_call(name, arg_map, direct_response, consistency, output_key,
                                   client_id, timeout, continuation)
        if dry_run:
            return call
        wait = self.timeout if timeout is None else timeout
        if not direct_response:
            return await self._submit_direct(call) or await self._submit(call, wait)
        try:
            result: DagResult = await self._scheduler.request(call, wait)
        except TimeoutError as exc:
            raise TimeoutError(f"DAG {name!r} gave no result within {wait:g} s") from exc
        return self._core.finish(unwrap_result(result.value), ClientCore.session_of(call))

    # ------------------------------------------------------------------ KVS

    async def put_object(self, key: str, value: Any) -> bool:
        """Store a value (wrapped in a last-writer-wins lattice) or merge a lattice."""
        put = ClientCore.put_request(key, value)
        await self._kvs.request(put, self.timeout)
        self._direct.wrote(put.key)  # calls naming it wait for the caches to hear (_direct.py)
        return True

    async def get_object(self, key: str) -> Any:
        """The value at ``key`` (a plain value, or the lattice), or None."""
        await self._confirm_stored()
        reply: KvsValue = await self._kvs.request(KvsGet(check_key(key)), self.timeout)
        return ClientCore.stored_object(reply)

    # ------------------------------------------------------------------ cluster

    async def list_dags(self) -> builtins.list[str]:
        """Sorted names of the registered DAGs."""
        reply: Names = await self._scheduler.request(ListDags(), self.timeout)
        return reply.names

    async def status(self) -> ClusterStatus:
        """The cluster as its scheduler sees it: executors, load, cache, functions, DAGs.

        Load and call figures come from the executors' periodic reports (every
        second by default), so they trail the calls just made by up to a period.
        """
        reply: StatusReply = await self._scheduler.request(GetStatus(), self.timeout)
        return ClusterStatus.from_json(reply.data)


@asynccontextmanager
async def open_client(
    address: str = "127.0.0.1",
    *,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    options: TransportOptions | None = None,
    tls_ca: str | None = None,
) -> AsyncIterator[AsyncDropletClient]:
    """Connect to a cluster for the duration of an ``async with`` block.

    Arguments as for :meth:`AsyncDropletClient.connect`.
    """
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            client = await AsyncDropletClient.connect(
                address, nursery, token=token, timeout=timeout, options=options,
                tls_ca=tls_ca)
        except Exception as exc:  # connecting failed: re-raised below, not as a group
            failure = exc
            nursery.cancel_scope.cancel()
        else:
            try:
                yield client
            except BaseException as exc:  # re-raised below, outside our nursery: no group
                failure = exc
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


