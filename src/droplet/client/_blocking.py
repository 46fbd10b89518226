"""The synchronous client's fast path: blocking sockets, no event loop.

For ``tcp://``, ``tls://``, ``ws://`` and ``wss://`` addresses
:class:`~droplet.client.client.DropletConnection`
talks to the node directly from the calling thread. Going through a Trio loop
in a background thread costs two thread handoffs per call (each a wakeup of a
sleeping thread: hundreds of microseconds on a small VM); here the caller
writes its request and reads the reply itself.

The socket and its sharing between threads (leader/follower) live in
``_blocking_peer.py``; this module holds the client and its futures over the
sans-IO :class:`ClientCore`.
"""

from __future__ import annotations

import builtins
import os
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from ..consistency import NORMAL
from ..errors import ConnectionError, DropletError, TimeoutError
from ..ids import unique_id
from ..kvs.keys import RESULT_PREFIX
from ..protocol.framing import DEFAULT_MAX_FRAME_SIZE
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
from ..status import ClusterStatus
from ._blocking_peer import BlockingPeer, _AnyOf, _Slot
from ._core import (
    ClientCore,
    check_key,
    check_timeout,
    direct_result_lattice,
    new_result_key,
    plain_args,
    result_blob,
    result_put,
    unwrap_result,
)
from ._direct import (
    DIAL_TIMEOUT,
    DirectCalls,
    may_go_direct,
    reference_set,
    same_scheme,
    triggers_for,
)
from ._map import map_direct
from ._release import FLUSH_DELAY, MAX_BATCH, Releases
from ._wire import TriggerTemplates

__all__ = ["BlockingClient", "BlockingFuture"]

#: Seconds close() may spend telling the store which results it can drop.
CLOSE_FLUSH_TIMEOUT = 1.0


def _flush_releases(client_ref: weakref.ref[BlockingClient], stop: threading.Event) -> None:
    """The flusher thread: sends queued result releases every FLUSH_DELAY seconds.

    It holds the client only weakly, so a client nobody closed can still be
    collected (and then stops this thread).
    """
    while not stop.wait(FLUSH_DELAY):
        client = client_ref()
        if client is None:
            return
        try:
            client.flush_releases()
        except Exception:  # the connection broke: calls will say so
            pass
        del client


class BlockingFuture:
    """A call's pending result; the read of it was sent with the call.

    A call sent straight to an executor (``peer`` given) is answered by it
    alone: the result is stored under its key only when ``obj_id`` is read
    (by this client, and kept until close()), so a result whose key nobody
    asks for costs the store nothing. The futures of calls through the
    scheduler are :class:`_StoredFuture`: see ``_release.py``.
    """

    __slots__ = ("__weakref__", "_blob", "_client", "_key", "_peer", "_pinned", "_session",
                 "_slot", "_wait")

    def __init__(self, key: str, client: BlockingClient, slot: _Slot, wait: float,
                 session: str | None, peer: BlockingPeer | None = None) -> None:
        self._key = key
        self._client = client
        self._slot = slot
        #: where the reply comes from: the store (a KvsValue), or for a call sent
        #: straight to an executor, that executor (a DagResult).
        self._peer = peer or client.kvs
        self._wait = wait
        self._session = session
        self._blob: Blob | None = None
        #: the key was handed out (or there is nothing to release).
        self._pinned = False

    @property
    def obj_id(self) -> str:
        """The KVS key of the result, readable by anyone (kept until close()).

        For a call answered by its executor alone, this stores the result (or
        its error) first: it waits for the result (up to the call's timeout;
        past that, it is stored when it arrives) and for the store's ack.
        """
        if not self._pinned:
            self._pinned = True
            self._store()
        return self._key

    def _store(self) -> None:
        """Store the result the executor sent only to us (see ``obj_id``)."""
        slot = self._slot
        if self._blob is None and not slot.done:
            try:
                self._peer.wait(slot, self._wait, "result")
            except TimeoutError:
                if not slot.done:  # still running: store it when it comes
                    _StoreOnArrival(self)
                    return
            except DropletError:  # the call's error: stored as its result
                pass
        self._put(wait=True)

    def _put(self, *, wait: bool) -> None:
        """Write the arrived result (or error) under its key; ``wait`` for the ack."""
        slot = self._slot
        blob = self._blob
        if blob is None and slot.error is None:
            blob = slot.value.value  # a DagResult
        client = self._client
        lattice = direct_result_lattice(blob, slot.error)
        if lattice is None or client.closing:  # closing: its results are released
            return
        try:
            put = result_put(self._key, lattice, client.kvs.max_frame_size)
            if wait:
                client.kvs.request(put, client.timeout)
            else:
                client.kvs.submit(put, timeout=client.timeout)
        except DropletError:  # the store went away (the connection closed)
            return
        client.releases.pin(self._key)

    def _take_reply(self, remaining: float) -> None:
        """Use the answered slot: the result, its error, or a new read if the wait ran out."""
        slot = self._slot
        if slot.error is not None:
            raise slot.error
        value = slot.value
        if type(value) is DagResult:  # straight from the executor
            self._blob = value.value
            return
        if value.lattice is not None:
            self._blob = result_blob(value.lattice)
        elif remaining > 0:  # the store's wait ran out first: wait there again
            (self._slot,) = self._client.kvs.submit(KvsGet(self._key, remaining),
                                                    timeout=remaining)

    def get(self, timeout: float | None = None) -> Any:
        blob = self._blob
        if blob is None:
            blob = self._arrive(timeout)
        return self._client.core.finish(unwrap_result(blob), self._session)

    def _arrive(self, timeout: float | None) -> Blob:
        """Wait for the result (raising the call's error, or TimeoutError)."""
        wait = self._wait if timeout is None else check_timeout(timeout, self._wait)
        deadline = time.monotonic() + wait
        while self._blob is None:
            slot = self._slot
            if not slot.done and not self._peer._await(slot, deadline):
                raise TimeoutError(
                    f"no result for {self._key} within {wait:g} s "
                    "(pass a larger timeout to get() if the function is slow)")
            self._take_reply(max(0.0, deadline - time.monotonic()))
            if self._blob is None and deadline <= time.monotonic():
                raise TimeoutError(
                    f"no result for {self._key} within {wait:g} s "
                    "(pass a larger timeout to get() if the function is slow)")
        return self._blob

    def done(self) -> bool:
        """Whether the result (or an error) is in; reads what arrived, never waits."""
        if self._blob is not None:
            return True
        self._peer.poll(self._slot)
        return self._settled()

    def _settled(self) -> bool:
        """Whether the result (or an error) is in, from what was read already (no I/O
        unless the store's wait ran out, when the read is sent again)."""
        if self._blob is not None:
            return True
        if not self._slot.done:
            return False
        if self._slot.error is not None:
            return True
        self._take_reply(self._wait)
        return self._blob is not None


class _StoredFuture(BlockingFuture):
    """The future of a call through the scheduler, whose result the executor
    stores: it stays while this future lives, or once ``obj_id`` was handed
    out, until the connection closes (see ``_release.py``)."""

    __slots__ = ()

    @property
    def obj_id(self) -> str:
        """The KVS key of the result; handing it out keeps the result until close()."""
        if not self._pinned:
            self._pinned = True
            self._client.releases.pin(self._key)
        return self._key

    def __del__(self) -> None:
        if not self._pinned:
            self._client.releases.release(self._key)


class _StoreOnArrival(_AnyOf):
    """Stores a direct result when it arrives (``obj_id`` gave up waiting for it).

    Its slot's reader calls :meth:`notify` (it must not block that reader: the
    put is sent without waiting for its ack)."""

    __slots__ = ("future",)

    def __init__(self, future: BlockingFuture) -> None:
        super().__init__()
        self.future = future
        slot = future._slot
        slot.watchers.append(self)
        if slot.done:  # arrived meanwhile (a second put of the same value is harmless)
            self.notify()

    def notify(self) -> None:
        future, self.future = self.future, None  # type: ignore[assignment]
        if future is not None:  # (two racing calls may both put: the same value)
            future._put(wait=False)


class BlockingClient:
    """The client API over :class:`BlockingPeer` (scheduler, and KVS when separate)."""

    def __init__(self, url: str, *, token: str | None, timeout: float,
                 ssl_context: ssl.SSLContext | None = None,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, direct: bool = True) -> None:
        token = token if token is not None else os.environ.get("DROPLET_TOKEN") or None
        self.timeout = timeout
        self.core = ClientCore()
        self.releases = Releases()
        #: True once close() began: nothing more is stored for this client.
        self.closing = False

        def dial(address: str, connect_timeout: float = timeout) -> BlockingPeer:
            return BlockingPeer(address, token=token, timeout=connect_timeout,
                                ssl_context=ssl_context, max_frame_size=max_frame_size)

        def dial_executor(address: str) -> BlockingPeer:
            same_scheme(url, address)
            return dial(address, min(timeout, DIAL_TIMEOUT))

        def place(target: str, is_function: bool, references: list[str],
                  calls: int) -> CallPlaced:
            reply: CallPlaced = self.scheduler.request(
                PlaceCall(target, is_function, references, calls), timeout)
            return reply

        #: calls sent straight to executors (placement cached from the scheduler).
        self.direct = DirectCalls(dial_executor, place)
        self.direct.enabled = direct
        #: their triggers, encoded from templates (see _wire.py).
        self._templates = TriggerTemplates()

        self.scheduler = dial(url)
        try:
            info: ClusterInfo = self.scheduler.request(
                Hello("client", uuid.uuid4().hex[:12]), timeout)
            self.kvs = self.scheduler if info.kvs in ("", url) else dial(info.kvs)
        except BaseException:
            self.scheduler.close()
            raise
        self._stop_flusher = threading.Event()
        flusher = threading.Thread(target=_flush_releases,
                                   args=(weakref.ref(self), self._stop_flusher),
                                   name="droplet-client-releases", daemon=True)
        flusher.start()
        self._flusher = flusher

    def close(self) -> None:
        self.closing = True  # direct results are no longer stored (see _put)
        self._stop_flusher.set()
        if self._flusher is not threading.current_thread():
            self._flusher.join()
        try:
            keys = self.releases.take_all()
            for start in range(0, len(keys), MAX_BATCH):
                self.kvs.send(KvsForget(keys[start:start + MAX_BATCH]),
                              timeout=CLOSE_FLUSH_TIMEOUT)
        finally:
            self.direct.close()
            self.scheduler.close()
            self.kvs.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop_flusher", None)
        if stop is not None:
            stop.set()

    def _releases_due(self) -> list[Any]:
        """A KvsForget of the queued releases, to ride along with the next write."""
        if not len(self.releases):
            return []
        return [KvsForget(self.releases.take())]

    def flush_releases(self) -> None:
        """Tell the store about collected futures now (the flusher does it on a timer)."""
        while len(self.releases):
            keys = self.releases.take()
            if not self.kvs.send(KvsForget(keys), timeout=self.timeout):
                return

    # functions
    def register(self, function: Callable[..., Any] | tuple[type, Sequence[Any]],
                 name: str) -> None:
        self.scheduler.request(ClientCore.register_request(function, name), self.timeout)
        self.direct.forget(name, True)

    def function_exists(self, name: str) -> bool:
        reply: BoolReply = self.scheduler.request(FunctionExists(name), self.timeout)
        return reply.value

    def list(self, prefix: str | None = None) -> list[str]:
        reply: Names = self.scheduler.request(ListFunctions(prefix), self.timeout)
        return reply.names

    def exec_func(self, name: str, args: Iterable[Any]) -> BlockingFuture:
        if self.direct.enabled and type(args) is list and type(name) is str:
            blob = plain_args(args)
            if blob is not None:  # no CallDag needed unless it must go the long way
                call_id = unique_id()
                future = self._send_plain(name, True, [name], [blob], call_id)
                if future is not None:
                    return future
                call = CallDag(name, True, [name], [blob],
                               result_key=RESULT_PREFIX + call_id)
                return self._submit_direct(call) or self._submit(call, self.timeout)
        call = ClientCore.function_call(name, args)
        return self._submit_direct(call) or self._submit(call, self.timeout)

    def _send_plain(self, target: str, is_function: bool, arg_fns: builtins.list[str],
                    blobs: builtins.list[bytes], call_id: str) -> BlockingFuture | None:
        """The fast way of :meth:`_submit_direct`, for a call without references
        given by its parts (plain arguments, pickled): to the executor the cached
        placement chooses, encoded from a template (``_wire.py``), with no
        CallDag built. None: nothing was sent (no placement cached, no live
        connection, no template): build the call and send it the ordinary way.

        ``call_id`` (hex digits) is the run id, and the result key's suffix.
        """
        found = self.direct.quick(target, is_function)
        if found is None:
            return None
        peer, plan = found
        key = RESULT_PREFIX + call_id
        encoded = self._templates.encode_parts(target, is_function, arg_fns, blobs,
                                               b'"%s"' % key.encode(), call_id, plan,
                                               peer.remote)
        if encoded is None or len(encoded) != 1:
            return None
        try:
            slot = peer.submit_encoded(encoded[0], timeout=self.timeout, batch=True)
        except ConnectionError:
            self.direct.executor_left(peer.remote)
            return None
        # Placed, hence accepted (see _submit_direct).
        self.core.accepted.accepted_shape((target, is_function, tuple(arg_fns)))
        return BlockingFuture(key, self, slot, self.timeout, None, peer=peer)

    def _submit_direct(self, call: CallDag) -> BlockingFuture | None:
        """Send ``call`` straight to an executor (see ``_direct.py``); None when it must
        go through the scheduler (no executor reachable, or a call of another kind)."""
        if not may_go_direct(call):
            return None
        found = self.direct.target(call.target, call.is_function, reference_set(call))
        if found is None:
            return None
        peer, plan = found
        triggers: builtins.list[Any] | None = self._templates.encode(call, plan, peer.remote)
        if triggers is None:
            triggers = triggers_for(call, plan, peer.remote)
            if triggers is None:
                return None
        assert call.result_key is not None
        try:  # the first source's trigger carries the request: the sink answers it
            (slot,) = peer.submit(triggers[0], timeout=self.timeout, oneway=triggers[1:],
                                  batch=True)
        except ConnectionError:
            self.direct.executor_left(peer.remote)
            return None
        # Placed by the scheduler, so of a shape it accepts: were these calls to
        # go through it later (direct calls off, executors unreachable), they
        # need not wait for CallAccepted.
        self.core.accepted.accepted(call)
        return BlockingFuture(call.result_key, self, slot, self.timeout, None, peer=peer)

    def map(self, name: str, items: Iterable[Any],
            chunksize: int) -> builtins.list[BlockingFuture]:
        """One call of ``name`` per item, at most ``chunksize`` calls per write:
        straight to the executors where the scheduler's placement allows
        (``_map.py``), else through the scheduler, each call with its result read,
        every call accepted (or the first refusal raised) before returning."""
        calls = [ClientCore.function_call(name, [item]) for item in items]
        if not (self.direct.enabled and calls):
            return self._map_through_scheduler(calls, chunksize)
        left, placed = map_direct(self, calls, chunksize)
        rest = iter(self._map_through_scheduler(left, chunksize) if left else [])
        return [f if f is not None else next(rest) for f in placed]

    def _map_through_scheduler(self, calls: builtins.list[CallDag],
                               chunksize: int) -> builtins.list[BlockingFuture]:
        keys = [c.result_key or "" for c in calls]
        deadline = time.monotonic() + self.timeout
        same = self.kvs is self.scheduler
        accepted: builtins.list[_Slot] = []
        futures: builtins.list[BlockingFuture] = []
        for start in range(0, len(calls), chunksize):
            chunk = calls[start:start + chunksize]
            fetches = [KvsGet(key, self.timeout) for key in keys[start:start + chunksize]]
            remaining = max(0.0, deadline - time.monotonic())
            if same:  # calls and result reads interleaved, in one write
                slots = self.scheduler.submit(
                    *[m for pair in zip(chunk, fetches, strict=True) for m in pair],
                    timeout=remaining, oneway=self._releases_due())
                call_slots, fetch_slots = slots[0::2], slots[1::2]
            else:
                call_slots = self.scheduler.submit(*chunk, timeout=remaining)
                fetch_slots = self.kvs.submit(*fetches, timeout=remaining,
                                              oneway=self._releases_due())
            accepted += call_slots
            futures += [_StoredFuture(f.key, self, slot, self.timeout, None)
                        for f, slot in zip(fetches, fetch_slots, strict=True)]
        refusal: DropletError | None = None
        for future, slot in zip(futures, accepted, strict=True):
            try:
                self.scheduler.wait(slot, max(0.0, deadline - time.monotonic()), "CallDag")
            except DropletError as exc:
                future._pinned = True  # refused: no result will be stored, none to release
                refusal = refusal or exc
        if refusal is not None:  # the first refusal (say, no such function)
            raise refusal
        return futures

    def _submit(self, call: CallDag, wait: float) -> BlockingFuture:
        assert call.result_key is not None
        fetch = KvsGet(call.result_key, wait)
        deadline = time.monotonic() + self.timeout
        accepted = self.core.accepted
        if accepted.known(call):
            # A call of this shape was accepted before: send it one-way, with no
            # wait for its acceptance; a refusal is stored as its result.
            if self.kvs is self.scheduler:  # one node: call and result read in one write
                (fetch_slot,) = self.scheduler.submit(
                    fetch, timeout=self.timeout, oneway=[*self._releases_due(), call])
            else:
                if not self.scheduler.send(call, timeout=self.timeout):
                    raise TimeoutError(
                        f"could not send the call to {self.scheduler.remote} within "
                        f"{self.timeout:g} s: the node is not reading")
                (fetch_slot,) = self.kvs.submit(fetch, timeout=self.timeout,
                                                oneway=self._releases_due())
            return _StoredFuture(call.result_key, self, fetch_slot, wait,
                                 ClientCore.session_of(call))
        if self.kvs is self.scheduler:  # one node: call and result read in one write
            call_slot, fetch_slot = self.scheduler.submit(
                call, fetch, timeout=self.timeout, oneway=self._releases_due())
        else:
            (call_slot,) = self.scheduler.submit(call, timeout=self.timeout)
            (fetch_slot,) = self.kvs.submit(fetch, timeout=self.timeout,
                                            oneway=self._releases_due())
        future = _StoredFuture(call.result_key, self, fetch_slot, wait,
                               ClientCore.session_of(call))
        try:
            self.scheduler.wait(call_slot, max(0.0, deadline - time.monotonic()), "CallDag")
        except BaseException:
            future._pinned = True  # refused: no result will be stored, nothing to release
            raise
        accepted.accepted(call)
        return future

    # DAGs
    def register_dag(self, name: str, functions: Sequence[Any], connections: Any,
                     colocated: Any, gpu_functions: Any = (),
                     batching_functions: Any = ()) -> None:
        self.scheduler.request(
            ClientCore.register_dag_request(name, functions, connections, colocated,
                                            gpu_functions, batching_functions),
            self.timeout)
        self.direct.forget(name, False)

    def delete_dag(self, name: str) -> None:
        self.scheduler.request(DeleteDag(name), self.timeout)
        self.direct.forget(name, False)

    def call_dag(self, name: str, arg_map: dict[str, Any], direct_response: bool,
                 consistency: str, output_key: str | None, client_id: str | None,
                 timeout: float | None, dry_run: bool = False,
                 continuation: CallDag | None = None) -> Any:
        if (not dry_run and output_key is None and client_id is None
                and timeout is None and continuation is None and consistency == NORMAL
                and self.direct.enabled and type(arg_map) is dict and type(name) is str):
            future = self._call_dag_plain(name, arg_map)
            if future is not None:
                return self._answer(future, name) if direct_response else future
        call = self.core.dag_call(name, arg_map, direct_response, consistency, output_key,
                                  client_id, timeout, continuation)
        if dry_run:
            return call
        wait = self.timeout if timeout is None else timeout
        if not direct_response:
            return self._submit_direct(call) or self._submit(call, wait)
        if may_go_direct(attrs.evolve(call, direct=False, result_key="")):
            # The executor answers a direct call with the result anyway: the same
            # as direct_response, one hop shorter (a result key nobody stores).
            future = self._submit_direct(attrs.evolve(call, direct=False,
                                                      result_key=new_result_key()))
            if future is not None:
                return self._answer(future, name)
        try:
            result: DagResult = self.scheduler.request(call, wait)
        except TimeoutError as exc:
            raise TimeoutError(f"DAG {name!r} gave no result within {wait:g} s") from exc
        return self.core.finish(unwrap_result(result.value), ClientCore.session_of(call))

    def _answer(self, future: BlockingFuture, name: str) -> Any:
        """The result of a direct_response call sent straight to an executor."""
        try:
            return future.get()
        except TimeoutError as exc:
            raise TimeoutError(
                f"DAG {name!r} gave no result within {self.timeout:g} s") from exc

    def _call_dag_plain(self, name: str, arg_map: dict[str, Any]) -> BlockingFuture | None:
        """A NORMAL DAG call with plain arguments sent the fast way (see
        :meth:`_send_plain`); None: nothing was sent."""
        blobs: builtins.list[bytes] = []
        for fn, args in arg_map.items():
            if type(fn) is not str:
                return None
            blob = plain_args(args if isinstance(args, builtins.list) else [args])
            if blob is None:
                return None
            blobs.append(blob)
        return self._send_plain(name, False, builtins.list(arg_map), blobs, unique_id())

    # KVS
    def put_object(self, key: str, value: Any) -> bool:
        put = ClientCore.put_request(key, value)
        self.kvs.request(put, self.timeout)
        self.direct.wrote(put.key)  # calls naming it wait for the caches to hear (_direct.py)
        return True

    def get_object(self, key: str) -> Any:
        reply: KvsValue = self.kvs.request(KvsGet(check_key(key)), self.timeout)
        return ClientCore.stored_object(reply)

    def fetch_many(self, keys: builtins.list[str]) -> builtins.list[bytes | None]:
        """The stored encodings of ``keys``: all reads in one write."""
        deadline = time.monotonic() + self.timeout
        slots = self.kvs.submit(*[KvsGet(k) for k in keys], timeout=self.timeout)
        replies: builtins.list[KvsValue] = [
            self.kvs.wait(slot, max(0.0, deadline - time.monotonic()), "KvsGet")
            for slot in slots]
        return [r.lattice for r in replies]

    def store(self, key: str, data: bytes) -> None:
        self.kvs.request(KvsPut(key, data), self.timeout)
        self.direct.wrote(key)

    # cluster
    def list_dags(self) -> builtins.list[str]:
        reply: Names = self.scheduler.request(ListDags(), self.timeout)
        return reply.names

    def status(self) -> ClusterStatus:
        reply: StatusReply = self.scheduler.request(GetStatus(), self.timeout)
        return ClusterStatus.from_json(reply.data)
