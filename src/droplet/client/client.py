"""The synchronous client, ``DropletConnection``, compatible with Cloudburst's.

>>> from droplet.client.client import DropletConnection          # doctest: +SKIP
>>> cloud = DropletConnection('127.0.0.1', '127.0.0.1', local=True)
>>> square = cloud.register(lambda _, x: x * x, 'square')
>>> square(2).get()
4

Every method is safe to call from many threads at once, over one connection.
Two backends stand behind it:

- ``tcp://``, ``tls://``, ``ws://`` and ``wss://``: blocking sockets driven by
  the calling threads (:mod:`droplet.client._blocking`), with no event loop in
  between (WebSocket framing: :mod:`droplet.client._ws_codec`);
- ``inproc://`` (a :class:`~droplet.LocalCluster`): an
  :class:`~droplet.client.aio.AsyncDropletClient` in a background Trio thread
  (:class:`~droplet.client._portal.Portal`).
"""

from __future__ import annotations

import builtins
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import trio

from ..errors import ConnectionError, DagError, TimeoutError
from ..protocol.messages import CallDag
from ..status import ClusterStatus
from ..transports.base import TransportOptions
from ..transports.registry import normalize_address, parse_address
from ._blocking import BlockingClient
from ._blocking_wire import SCHEMES as BLOCKING_SCHEMES
from ._core import ClientCore, check_chunksize, check_timeout, map_items
from ._direct import may_go_direct, reference_set
from ._embedded import send_from_thread
from ._portal import Portal
from .aio import (
    CAUSAL,
    DEFAULT_TIMEOUT,
    NORMAL,
    REPEATABLE_READ,
    AsyncDropletClient,
    AsyncDropletFuture,
)
from .kvs_client import KvsClient

#: While waiting for a result, check this often (seconds) that the loop still runs.
CRASH_POLL = 0.5

__all__ = ["CAUSAL", "NORMAL", "REPEATABLE_READ", "DropletConnection", "DropletFunction",
           "DropletFuture"]


class _Future(Protocol):
    _key: str  # obj_id without pinning the result

    @property
    def obj_id(self) -> str: ...

    def get(self, timeout: float | None = None) -> Any: ...

    def done(self) -> bool: ...

    def _settled(self) -> bool: ...


class DropletFuture:
    """A call's pending result. ``obj_id`` is the KVS key where it will be stored."""

    def __init__(self, inner: _Future) -> None:
        self._inner = inner

    @property
    def obj_id(self) -> str:
        """The KVS key of the result.

        The result stays in the store while this future lives; once you read
        ``obj_id`` (to hand the key to ``get_object`` or a
        :class:`~droplet.DropletReference`), it stays until the connection closes.
        """
        return self._inner.obj_id

    def get(self, timeout: float | None = None) -> Any:
        """Block for the result: ``timeout`` seconds, default the call's or connection's.

        Raises:
            FunctionError: the function (or one upstream of it) raised.
            TimeoutError: no result within the timeout.
        """
        return self._inner.get(timeout)

    def done(self) -> bool:
        """Whether the result (or the call's error) has arrived."""
        return self._inner.done()

    def __repr__(self) -> str:
        return f"<DropletFuture {self._inner._key}>"


class DropletFunction:
    """A registered function; calling it returns a :class:`DropletFuture`."""

    def __init__(self, name: str, conn: DropletConnection) -> None:
        self.name = name
        self._conn = conn

    def __call__(self, *args: Any) -> DropletFuture:
        return self._conn.exec_func(self.name, list(args))

    def map(self, iterable: Iterable[Any], *, chunksize: int | None = None
            ) -> builtins.list[DropletFuture]:
        """One call per item, many calls per message: see :meth:`DropletConnection.map`."""
        return self._conn.map(self.name, iterable, chunksize=chunksize)

    def __repr__(self) -> str:
        return f"<DropletFunction {self.name!r}>"


class _PortalFuture:
    """An AsyncDropletFuture seen from another thread."""

    def __init__(self, inner: AsyncDropletFuture, portal: Portal) -> None:
        self._inner = inner
        self._portal = portal
        self._key = inner._key

    @property
    def obj_id(self) -> str:
        inner = self._inner
        if inner._pinned:
            return inner._key
        return self._portal.run(inner._stored_key)  # readable by anyone once it returns

    def get(self, timeout: float | None = None) -> Any:
        inner = self._inner
        wait = check_timeout(timeout, inner._timeout)
        deadline = time.monotonic() + wait
        inner.run_claimed(wait)  # an embedded call no worker thread started: run it here
        # Wait here for the read the client sent with the call, not in the loop's thread.
        if inner._settled() or self._wait_arrival(deadline):
            try:
                return inner.result_ready()
            except TimeoutError:
                pass  # the store's own wait expired: let the loop read again, in what is left
            remaining = deadline - time.monotonic()
            if remaining > 0:
                return self._portal.run(inner.get, remaining)
        raise TimeoutError(f"no result for {inner._key} within {wait:g} s "
                           "(pass a larger timeout to get() if the function is slow)")

    def _wait_arrival(self, deadline: float) -> bool:
        """Wait for the result's arrival until ``deadline``; a stopped loop raises."""
        arrived = self._inner.arrived_threadsafe
        while not arrived.wait(min(CRASH_POLL, max(0.0, deadline - time.monotonic()))):
            if self._portal.crash is not None:
                self._portal.run(trio.lowlevel.checkpoint)  # raises what stopped the loop
            if time.monotonic() >= deadline:
                return False
        return True

    def done(self) -> bool:
        return self._portal.run(self._inner.done)

    def _settled(self) -> bool:
        """Whether the result or an error is in, without a trip through the loop
        (unless the store's wait ran out: then the read is sent again)."""
        inner = self._inner
        if inner._settled():
            return True
        if inner._expired():
            self._portal.run(inner._rearm)
        return False


class _PortalClient:
    """The blocking client interface, served by an AsyncDropletClient in a portal."""

    def __init__(self, portal: Portal, client: AsyncDropletClient) -> None:
        self._portal = portal
        self._client = client

    def register(self, function: Any, name: str) -> None:
        self._portal.run(self._client.register, function, name)

    def function_exists(self, name: str) -> bool:
        return self._portal.run(self._client.get_function, name) is not None

    def list(self, prefix: str | None) -> list[str]:
        return self._portal.run(self._client.list, prefix)

    def exec_func(self, name: str, args: Iterable[Any]) -> _PortalFuture:
        client = self._client
        # snapshot: a posted call is written after we return, when the caller
        # may already be changing a bytearray it passed.
        call = ClientCore.function_call(name, args, snapshot=True)
        if (client._core.accepted.known(call)
                or client._direct.ready(name, True, reference_set(call))):
            # Sent one-way, with nothing to wait for: hand it to the loop and return.
            future = client._future_for(call, client.timeout)
            if not (may_go_direct(call) and send_from_thread(client, call, future)):
                self._portal.post(client._send_accepted, call, future)
            return _PortalFuture(future, self._portal)
        return _PortalFuture(self._portal.run(client._exec_call, call), self._portal)

    def map(self, name: str, items: builtins.list[Any], chunksize: int
            ) -> builtins.list[_PortalFuture]:
        futures = self._portal.run(self._map, name, items, chunksize)
        return [_PortalFuture(f, self._portal) for f in futures]

    async def _map(self, name: str, items: builtins.list[Any], chunksize: int
                   ) -> builtins.list[AsyncDropletFuture]:
        return await self._client.map(name, items, chunksize=chunksize)

    def register_dag(self, name: str, functions: Sequence[Any], connections: Any,
                     colocated: Any, gpu_functions: Any = (),
                     batching_functions: Any = ()) -> None:
        self._portal.run(self._client.register_dag, name, functions, connections, colocated,
                         gpu_functions, batching_functions)

    def delete_dag(self, name: str) -> None:
        self._portal.run(self._client.delete_dag, name)

    def call_dag(self, name: str, arg_map: dict[str, Any], direct_response: bool,
                 consistency: str, output_key: str | None, client_id: str | None,
                 timeout: float | None, dry_run: bool = False,
                 continuation: CallDag | None = None) -> Any:
        args = (name, arg_map, direct_response, consistency, output_key, client_id, timeout,
                dry_run, continuation)
        client = self._client
        # NORMAL without a session only: building a CAUSAL call reads the client's
        # sessions, which belong to the loop's thread.
        if (not (dry_run or direct_response) and consistency == NORMAL and client_id is None
                and client._direct.enabled):
            call = client._core.dag_call(name, arg_map, direct_response, consistency,
                                         output_key, client_id, timeout, continuation,
                                         snapshot=True)  # written after we return
            if may_go_direct(call) and client._direct.ready(name, False, reference_set(call)):
                # to the executor, from this thread or posted: no wait for the loop
                future = client._future_for(call, client.timeout)
                if not send_from_thread(client, call, future):
                    self._portal.post(client._send_accepted, call, future)
                return _PortalFuture(future, self._portal)
            wait = client.timeout if timeout is None else timeout
            # Built already (its arguments pickled): sent as call_dag would send it.
            return _PortalFuture(self._portal.run(self._send_built, call, wait), self._portal)
        result = self._portal.run(self._call_dag, *args)
        if isinstance(result, AsyncDropletFuture):
            return _PortalFuture(result, self._portal)
        return result

    async def _call_dag(self, *args: Any) -> Any:
        return await self._client.call_dag(*args)

    async def _send_built(self, call: CallDag, wait: float) -> AsyncDropletFuture:
        client = self._client
        return await client._submit_direct(call) or await client._submit(call, wait)

    def put_object(self, key: str, value: Any) -> bool:
        return self._portal.run(self._client.put_object, key, value)

    def get_object(self, key: str) -> Any:
        return self._portal.run(self._client.get_object, key)

    def fetch_many(self, keys: builtins.list[str]) -> builtins.list[bytes | None]:
        return self._portal.run(self._client._fetch_many, keys)

    def store(self, key: str, data: bytes) -> None:
        self._portal.run(self._client._store, key, data)

    def list_dags(self) -> builtins.list[str]:
        return self._portal.run(self._client.list_dags)

    def status(self) -> ClusterStatus:
        return self._portal.run(self._client.status)

    def close(self) -> None:
        self._portal.run(self._client.aclose)


class DropletConnection:
    """A connection to a Droplet cluster.

    Args:
        func_addr: the scheduler's address, a URL or a bare host (``tcp://HOST:5000``).
        ip, tid, local: accepted for compatibility with Cloudburst's client; unused.
        token: the cluster token (default: ``$DROPLET_TOKEN``).
        timeout: seconds to connect, and the default wait for requests and results.
        tls_ca: CA certificate file to verify a ``tls://`` or ``wss://`` node.
    """

    def __init__(
        self,
        func_addr: str,
        ip: str | None = None,
        tid: int = 0,
        local: bool = False,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        options: TransportOptions | None = None,
        tls_ca: str | None = None,
        _portal: Portal | None = None,
    ) -> None:
        url = normalize_address(func_addr)
        self.address = url
        self._portal: Portal | None = None
        self._owns_portal = False
        self._closed = False
        if _portal is None and parse_address(url)[0] in BLOCKING_SCHEMES:
            ctx = options.ssl_context if options is not None else None
            if tls_ca is not None:
                ctx = ssl.create_default_context(cafile=tls_ca)
            self._backend: Any = BlockingClient(
                url, token=token, timeout=timeout,
                ssl_context=ctx if isinstance(ctx, ssl.SSLContext) else None,
                max_frame_size=(options or TransportOptions()).max_frame_size)
            self.kvs_client = self._make_kvs_client()
            return
        self._owns_portal = _portal is None
        self._portal = _portal or Portal("droplet-client")
        try:
            client: AsyncDropletClient = self._portal.run(
                self._connect, url, token, timeout, options, tls_ca)
        except BaseException:
            if self._owns_portal:
                self._portal.close()
            raise
        self._backend = _PortalClient(self._portal, client)
        self.kvs_client = self._make_kvs_client()

    def _make_kvs_client(self) -> KvsClient:
        return KvsClient(lambda keys: self._live().fetch_many(keys),
                         lambda key, data: self._live().store(key, data))

    async def _connect(self, addr: str, token: str | None, timeout: float,
                       options: TransportOptions | None,
                       tls_ca: str | None) -> AsyncDropletClient:
        assert self._portal is not None
        return await AsyncDropletClient.connect(
            addr, self._portal.nursery, token=token, timeout=timeout, options=options,
            tls_ca=tls_ca)

    # context manager / lifetime
    def close(self) -> None:
        """Close the connection (and its background thread, if any); idempotent."""
        if self._closed or (self._portal is not None and self._portal.closed):
            return
        self._closed = True
        try:
            self._backend.close()
        except ConnectionError:
            # Its event loop is gone (the cluster or client crashed): nothing is
            # left to close gracefully, and calls already said why.
            if self._portal is None or self._portal.crash is None:
                raise
        finally:
            if self._owns_portal and self._portal is not None:
                self._portal.close()

    def __enter__(self) -> DropletConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> Any:
        if self._closed:
            raise ConnectionError("this Droplet connection is closed")
        return self._backend

    # functions
    def register(self, function: Callable[..., Any] | tuple[type, Sequence[Any]],
                 name: str) -> DropletFunction:
        """Store ``function`` under ``name`` (replacing any earlier one); see API.md."""
        self._live().register(function, name)
        return DropletFunction(name, self)

    def get_function(self, name: str) -> DropletFunction | None:
        """The registered function ``name``, or None."""
        return DropletFunction(name, self) if self._live().function_exists(name) else None

    def list(self, prefix: str | None = None) -> list[str]:
        """Sorted names of the registered functions (those starting with ``prefix``)."""
        return self._live().list(prefix)  # type: ignore[no-any-return]

    def exec_func(self, name: str, args: Iterable[Any] = ()) -> DropletFuture:
        """Call function ``name`` with the list ``args``."""
        return DropletFuture(self._live().exec_func(name, list(args)))

    def map(self, name: str, iterable: Iterable[Any], *, chunksize: int | None = None
            ) -> builtins.list[DropletFuture]:
        """Call function ``name`` once per item of ``iterable``: a list of futures, in order.

        Each item is the call's single argument (a tuple item is one argument,
        as in ``concurrent.futures.Executor.map`` with one iterable; use
        ``exec_func`` for calls with several arguments). Up to ``chunksize``
        calls (default 256), with the reads of their results, go to the node
        in one write. Returns once the node accepted every call; a refused
        call (say, no function of that name) raises its error. A function that
        raises makes only its own future's ``get()`` raise ``FunctionError``.
        Wait for the futures with :func:`droplet.wait` or
        :func:`droplet.as_completed`.
        """
        size = check_chunksize(chunksize)
        items = map_items(iterable)
        if not items:
            return []
        return [DropletFuture(f) for f in self._live().map(name, items, size)]

    # DAGs
    def register_dag(self, name: str, functions: Sequence[Any],
                     connections: Iterable[Sequence[str]],
                     colocated: Iterable[str] = (), gpu_functions: Iterable[str] = (),
                     batching_functions: Iterable[str] = ()) -> tuple[bool, None]:
        """Register a DAG of registered functions.

        ``functions`` entries are names, or ``(name, invalid_results)`` for a
        multi-exec function. Returns ``(True, None)``, Cloudburst's
        ``(success, error)`` shape; failures raise ``DagError`` naming what is
        wrong (arguments of the wrong type are caught here, before sending).
        """
        self._live().register_dag(name, functions, connections, colocated, gpu_functions,
                                  batching_functions)
        return True, None

    def call_dag(self, name: str, arg_map: dict[str, Any], direct_response: bool = False,
                 consistency: str = NORMAL, output_key: str | None = None,
                 client_id: str | None = None, timeout: float | None = None,
                 dry_run: bool = False, continuation: CallDag | None = None) -> Any:
        """Run a DAG: a :class:`DropletFuture`, or the result with ``direct_response``.

        ``dry_run=True`` returns the call without sending it; pass that as
        another call's ``continuation`` to run its DAG on this DAG's result.
        """
        result = self._live().call_dag(name, arg_map, direct_response, consistency,
                                       output_key, client_id, timeout, dry_run, continuation)
        return result if direct_response or dry_run else DropletFuture(result)

    def delete_dag(self, name: str) -> tuple[bool, None]:
        """Remove a DAG: ``(True, None)``, or ``DagError`` if there is none of that name."""
        if not isinstance(name, str):
            raise DagError(f"delete_dag: the DAG name must be a string, not {name!r}")
        self._live().delete_dag(name)
        return True, None

    # KVS
    def put_object(self, key: str, value: Any) -> bool:
        """Store a value (last-writer-wins) or merge a lattice into ``key``."""
        return self._live().put_object(key, value)  # type: ignore[no-any-return]

    def get_object(self, key: str) -> Any:
        """The value at ``key`` (plain, or the lattice), or None."""
        return self._live().get_object(key)

    # the cluster
    def list_dags(self) -> builtins.list[str]:
        """Sorted names of the registered DAGs."""
        return self._live().list_dags()  # type: ignore[no-any-return]

    def status(self) -> ClusterStatus:
        """The cluster as its scheduler sees it (a frozen :class:`~droplet.ClusterStatus`).

        Executors and their load (busy threads, queued calls), cache bytes and
        hit ratio, per-function calls, calls/s and p50/p99 latency, and the
        registered functions and DAGs. Load and call figures come from the
        executors' periodic reports (every second by default), so they trail
        the calls just made by up to a period. ``droplet status`` prints it.
        """
        return self._live().status()  # type: ignore[no-any-return]
