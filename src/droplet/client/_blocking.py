"""The synchronous client's fast path: blocking sockets, no event loop.

For ``tcp://`` and ``tls://`` addresses :class:`~droplet.client.client.DropletConnection`
talks to the node directly from the calling thread. Going through a Trio loop
in a background thread costs two thread handoffs per call (each a wakeup of a
sleeping thread: hundreds of microseconds on a small VM); here the caller
writes its request and reads the reply itself.

Many threads share one socket with the *leader/follower* pattern: whichever
waiting thread holds the read lock reads frames and hands every reply to the
thread waiting for it; when its own reply is in, it passes the read lock on
to another waiter. Writes take a lock, one whole batch of frames per write.
The wire rules are the sans-IO ones everyone uses (framing, messages,
:class:`~droplet.protocol.handshake.ClientHandshake`, :class:`ClientCore`).
"""

from __future__ import annotations

import builtins
import itertools
import os
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import ConnectionError, DropletError, TimeoutError
from ..protocol.framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, frame
from ..protocol.handshake import ClientHandshake
from ..protocol.messages import (
    BoolReply,
    CallDag,
    ClusterInfo,
    DagResult,
    DeleteDag,
    ErrorReply,
    FunctionExists,
    GetStatus,
    Hello,
    KvsGet,
    KvsPut,
    KvsValue,
    ListDags,
    ListFunctions,
    Names,
    StatusReply,
)
from ..protocol.messages import decode as decode_message
from ..protocol.messages import encode as encode_message
from ..rpc import error_from_reply
from ..status import ClusterStatus
from ..transports.registry import parse_address
from ._core import ClientCore, check_key, result_blob, unwrap_result

__all__ = ["BlockingClient", "BlockingFuture", "BlockingPeer"]

RECEIVE_SIZE = 256 * 1024
#: A waiting follower re-checks for a missed leader handoff this often (seconds).
HANDOFF_POLL = 0.05


class _Slot:
    __slots__ = ("done", "error", "value", "wake")

    def __init__(self) -> None:
        self.wake = threading.Event()  # set when done, or when asked to take over reading
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


class BlockingPeer:
    """Requests and replies over one socket, usable from many threads at once."""

    def __init__(self, url: str, *, token: str | None, timeout: float,
                 ssl_context: ssl.SSLContext | None = None,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        scheme, host, port = parse_address(url)
        if scheme not in ("tcp", "tls") or port is None:
            raise ValueError(f"the blocking client speaks tcp:// and tls://, not {url!r}")
        self.remote = url
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectionError(
                f"no Droplet node at {url} ({exc.strerror or exc}); "
                "start one with `python -m droplet.node`") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "tls":
            try:
                sock = (ssl_context or ssl.create_default_context()).wrap_socket(
                    sock, server_hostname=host)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise ConnectionError(f"TLS handshake with {url} failed: {exc}") from exc
        self._sock = sock
        self._decoder = FrameDecoder(max_frame_size)
        self._max = max_frame_size
        self._ids = itertools.count(1)
        self._pending: dict[int, _Slot] = {}
        self._waiting: set[_Slot] = set()
        self._state = threading.Lock()
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._failure: BaseException | None = None
        try:
            self._handshake(token, timeout)
        except BaseException:
            self.close()
            raise
        sock.settimeout(None)  # reads wait in select(), with the caller's deadline

    def _handshake(self, token: str | None, timeout: float) -> None:
        hs = ClientHandshake(self.remote, token)
        deadline = time.monotonic() + timeout
        self._sock.sendall(frame(encode_message(hs.on_challenge(self._next_message(deadline)))))
        hs.on_result(self._next_message(deadline))

    def _next_message(self, deadline: float) -> Any:
        while (payload := self._decoder.next_frame()) is None:
            self._fill(deadline)
        return decode_message(payload)[0]

    def _fill(self, deadline: float) -> bool:
        """Read what the socket has into the decoder; False when the deadline passed."""
        sock = self._sock
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        if not pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
                return False
        try:
            data = sock.recv(RECEIVE_SIZE)
        except ssl.SSLWantReadError:
            return True
        except OSError as exc:
            raise ConnectionError(f"connection to {self.remote} broke: {exc}") from exc
        if not data:
            raise ConnectionError(f"{self.remote} closed the connection")
        self._decoder.feed(data)
        return True

    # ------------------------------------------------------------------ requests

    def submit(self, *msgs: Any) -> list[_Slot]:
        """Send requests in one write; each reply lands in its slot."""
        if self._failure is not None:
            raise ConnectionError(f"connection to {self.remote} is closed: {self._failure}")
        slots = [_Slot() for _ in msgs]
        with self._state:
            ids = [next(self._ids) for _ in msgs]
            self._pending.update(zip(ids, slots, strict=True))
        data = b"".join([frame(encode_message(m, i), self._max)
                         for m, i in zip(msgs, ids, strict=True)])
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError as exc:
            failure = ConnectionError(f"connection to {self.remote} broke: {exc}")
            self._fail(failure)
            raise failure from exc
        return slots

    def wait(self, slot: _Slot, timeout: float, what: str) -> Any:
        """The reply in ``slot`` within ``timeout`` seconds (reading for others meanwhile)."""
        deadline = time.monotonic() + timeout
        while not slot.done:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what} to {self.remote} got no reply in {timeout:g} s")
            if self._read_lock.acquire(blocking=False):
                try:
                    self._lead(slot, deadline)
                finally:
                    self._read_lock.release()
                    self._hand_off()
            else:
                with self._state:
                    self._waiting.add(slot)
                try:
                    slot.wake.wait(min(HANDOFF_POLL, max(0.0, deadline - time.monotonic())))
                    slot.wake.clear()
                finally:
                    with self._state:
                        self._waiting.discard(slot)
        if slot.error is not None:
            raise slot.error
        return slot.value

    def request(self, msg: Any, timeout: float) -> Any:
        (slot,) = self.submit(msg)
        return self.wait(slot, timeout, type(msg).__name__)

    def _lead(self, slot: _Slot, deadline: float) -> None:
        """Read and dispatch frames until ``slot`` is answered or the deadline passes."""
        try:
            while not slot.done:
                payload = self._decoder.next_frame()
                if payload is None:
                    if not self._fill(deadline):
                        return
                    continue
                self._dispatch(payload)
        except DropletError as exc:  # ConnectionError, ProtocolError: the socket is done
            self._fail(exc)

    def _dispatch(self, payload: bytes) -> None:
        msg, request_id, is_reply = decode_message(payload)
        if not is_reply:
            return  # a node sends clients nothing but replies
        if request_id == 0 and type(msg) is ErrorReply:  # the node hangs up, saying why
            raise error_from_reply(msg, self.remote)
        with self._state:
            slot = self._pending.pop(request_id, None)
        if slot is None:
            return
        if type(msg) is ErrorReply:
            slot.error = error_from_reply(msg, self.remote)
        else:
            slot.value = msg
        slot.done = True
        slot.wake.set()

    def _hand_off(self) -> None:
        """Ask one waiting thread to take over reading."""
        with self._state:
            for other in self._waiting:
                if not other.done:
                    other.wake.set()
                    return

    def _fail(self, error: BaseException) -> None:
        with self._state:
            if self._failure is None:
                self._failure = error
            pending, self._pending = self._pending, {}
        for slot in pending.values():
            slot.error = error
            slot.done = True
            slot.wake.set()
        self.close()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
        if self._failure is None:
            self._failure = ConnectionError("closed")


class BlockingFuture:
    """A call's pending result; the read of it was sent with the call."""

    def __init__(self, obj_id: str, client: BlockingClient, slot: _Slot, wait: float,
                 session: str | None) -> None:
        self.obj_id = obj_id
        self._client = client
        self._slot = slot
        self._wait = wait
        self._session = session
        self._blob: bytes | None = None

    def get(self, timeout: float | None = None) -> Any:
        wait = self._wait if timeout is None else timeout
        deadline = time.monotonic() + wait
        while self._blob is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no result for {self.obj_id} within {wait:g} s "
                    "(pass a larger timeout to get() if the function is slow)")
            try:
                reply: KvsValue = self._client.kvs.wait(self._slot, remaining, "result")
            except TimeoutError:
                continue
            if reply.lattice is not None:
                self._blob = result_blob(reply.lattice)
            else:  # the store's wait ran out first: wait there again
                (self._slot,) = self._client.kvs.submit(KvsGet(self.obj_id, remaining))
        return self._client.core.finish(unwrap_result(self._blob), self._session)

    def done(self) -> bool:
        if self._blob is None and self._slot.done and self._slot.error is None:
            reply: KvsValue = self._slot.value
            if reply.lattice is not None:
                self._blob = result_blob(reply.lattice)
        return self._blob is not None or self._slot.error is not None


class BlockingClient:
    """The client API over :class:`BlockingPeer` (scheduler, and KVS when separate)."""

    def __init__(self, url: str, *, token: str | None, timeout: float,
                 ssl_context: ssl.SSLContext | None = None,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        token = token if token is not None else os.environ.get("DROPLET_TOKEN") or None
        self.timeout = timeout
        self.core = ClientCore()

        def dial(address: str) -> BlockingPeer:
            return BlockingPeer(address, token=token, timeout=timeout,
                                ssl_context=ssl_context, max_frame_size=max_frame_size)

        self.scheduler = dial(url)
        try:
            info: ClusterInfo = self.scheduler.request(
                Hello("client", uuid.uuid4().hex[:12]), timeout)
            self.kvs = self.scheduler if info.kvs in ("", url) else dial(info.kvs)
        except BaseException:
            self.scheduler.close()
            raise

    def close(self) -> None:
        self.scheduler.close()
        self.kvs.close()

    # functions
    def register(self, function: Callable[..., Any] | tuple[type, Sequence[Any]],
                 name: str) -> None:
        self.scheduler.request(ClientCore.register_request(function, name), self.timeout)

    def function_exists(self, name: str) -> bool:
        reply: BoolReply = self.scheduler.request(FunctionExists(name), self.timeout)
        return reply.value

    def list(self, prefix: str | None = None) -> list[str]:
        reply: Names = self.scheduler.request(ListFunctions(prefix), self.timeout)
        return reply.names

    def exec_func(self, name: str, args: Iterable[Any]) -> BlockingFuture:
        return self._submit(ClientCore.function_call(name, args), self.timeout)

    def _submit(self, call: CallDag, wait: float) -> BlockingFuture:
        assert call.result_key is not None
        fetch = KvsGet(call.result_key, wait)
        if self.kvs is self.scheduler:  # one node: call and result read in one write
            call_slot, fetch_slot = self.scheduler.submit(call, fetch)
        else:
            (call_slot,) = self.scheduler.submit(call)
            (fetch_slot,) = self.kvs.submit(fetch)
        self.scheduler.wait(call_slot, self.timeout, "CallDag")
        return BlockingFuture(call.result_key, self, fetch_slot, wait,
                              ClientCore.session_of(call))

    # DAGs
    def register_dag(self, name: str, functions: Sequence[Any], connections: Any,
                     colocated: Any, gpu_functions: Any = (),
                     batching_functions: Any = ()) -> None:
        self.scheduler.request(
            ClientCore.register_dag_request(name, functions, connections, colocated,
                                            gpu_functions, batching_functions),
            self.timeout)

    def delete_dag(self, name: str) -> None:
        self.scheduler.request(DeleteDag(name), self.timeout)

    def call_dag(self, name: str, arg_map: dict[str, Any], direct_response: bool,
                 consistency: str, output_key: str | None, client_id: str | None,
                 timeout: float | None, dry_run: bool = False,
                 continuation: CallDag | None = None) -> Any:
        call = self.core.dag_call(name, arg_map, direct_response, consistency, output_key,
                                  client_id, timeout, continuation)
        if dry_run:
            return call
        wait = self.timeout if timeout is None else timeout
        if not direct_response:
            return self._submit(call, wait)
        try:
            result: DagResult = self.scheduler.request(call, wait)
        except TimeoutError as exc:
            raise TimeoutError(f"DAG {name!r} gave no result within {wait:g} s") from exc
        return self.core.finish(unwrap_result(result.value), ClientCore.session_of(call))

    # KVS
    def put_object(self, key: str, value: Any) -> bool:
        self.kvs.request(ClientCore.put_request(key, value), self.timeout)
        return True

    def get_object(self, key: str) -> Any:
        reply: KvsValue = self.kvs.request(KvsGet(check_key(key)), self.timeout)
        return ClientCore.stored_object(reply)

    def fetch_many(self, keys: builtins.list[str]) -> builtins.list[bytes | None]:
        """The stored encodings of ``keys``: all reads in one write."""
        slots = self.kvs.submit(*[KvsGet(k) for k in keys])
        replies: builtins.list[KvsValue] = [
            self.kvs.wait(slot, self.timeout, "KvsGet") for slot in slots]
        return [r.lattice for r in replies]

    def store(self, key: str, data: bytes) -> None:
        self.kvs.request(KvsPut(key, data), self.timeout)

    # cluster
    def list_dags(self) -> builtins.list[str]:
        reply: Names = self.scheduler.request(ListDags(), self.timeout)
        return reply.names

    def status(self) -> ClusterStatus:
        reply: StatusReply = self.scheduler.request(GetStatus(), self.timeout)
        return ClusterStatus.from_json(reply.data)

