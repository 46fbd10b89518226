"""The synchronous client, ``DropletConnection``, compatible with Cloudburst's.

>>> from droplet.client.client import DropletConnection          # doctest: +SKIP
>>> cloud = DropletConnection('127.0.0.1', '127.0.0.1', local=True)
>>> square = cloud.register(lambda _, x: x * x, 'square')
>>> square(2).get()
4

It drives an :class:`~droplet.client.aio.AsyncDropletClient` in a background
Trio thread (:class:`~droplet.client._portal.Portal`); every method is safe to
call from many threads at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import TimeoutError
from ..transports.base import TransportOptions
from ._portal import Portal
from .aio import (
    CAUSAL,
    DEFAULT_TIMEOUT,
    NORMAL,
    REPEATABLE_READ,
    AsyncDropletClient,
    AsyncDropletFunction,
    AsyncDropletFuture,
)

__all__ = ["CAUSAL", "NORMAL", "REPEATABLE_READ", "DropletConnection", "DropletFunction",
           "DropletFuture"]


class DropletFuture:
    """A call's pending result. ``obj_id`` is the KVS key where it will be stored."""

    def __init__(self, inner: AsyncDropletFuture, portal: Portal) -> None:
        self._inner = inner
        self._portal = portal

    @property
    def obj_id(self) -> str:
        return self._inner.obj_id

    def get(self, timeout: float | None = None) -> Any:
        """Block for the result; see :meth:`AsyncDropletFuture.get`."""
        inner = self._inner
        # Fast path: wait here for the fetch the client started with the call,
        # without a round trip through the event loop's thread.
        if inner.arrived_threadsafe.wait(inner._timeout if timeout is None else timeout):
            try:
                return inner.result_ready()
            except TimeoutError:
                pass  # the fetch's own wait expired: let the loop fetch again
            return self._portal.run(inner.get, timeout)
        raise TimeoutError(f"no result for {self.obj_id} within "
                           f"{inner._timeout if timeout is None else timeout:g} s "
                           "(pass a larger timeout to get() if the function is slow)")

    def done(self) -> bool:
        return self._portal.run(self._inner.done)

    def __repr__(self) -> str:
        return f"<DropletFuture {self.obj_id}>"


class DropletFunction:
    """A registered function; calling it returns a :class:`DropletFuture`."""

    def __init__(self, inner: AsyncDropletFunction, conn: DropletConnection) -> None:
        self._inner = inner
        self._conn = conn
        self.name = inner.name

    def __call__(self, *args: Any) -> DropletFuture:
        return self._conn.exec_func(self.name, list(args))

    def __repr__(self) -> str:
        return f"<DropletFunction {self.name!r}>"


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
        self._owns_portal = _portal is None
        self._portal = _portal or Portal("droplet-client")
        try:
            self._client: AsyncDropletClient = self._portal.run(
                self._connect, func_addr, token, timeout, options, tls_ca)
        except BaseException:
            if self._owns_portal:
                self._portal.close()
            raise
        self.address = self._client.address

    async def _connect(self, addr: str, token: str | None, timeout: float,
                       options: TransportOptions | None,
                       tls_ca: str | None) -> AsyncDropletClient:
        return await AsyncDropletClient.connect(
            addr, self._portal.nursery, token=token, timeout=timeout, options=options,
            tls_ca=tls_ca)

    # context manager / lifetime
    def close(self) -> None:
        """Close the connection and its background thread (idempotent)."""
        if self._portal.closed:
            return
        try:
            self._portal.run(self._client.aclose)
        finally:
            if self._owns_portal:
                self._portal.close()

    def __enter__(self) -> DropletConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # functions
    def register(self, function: Callable[..., Any] | tuple[type, Sequence[Any]],
                 name: str) -> DropletFunction:
        return DropletFunction(self._portal.run(self._client.register, function, name), self)

    def get_function(self, name: str) -> DropletFunction | None:
        inner = self._portal.run(self._client.get_function, name)
        return None if inner is None else DropletFunction(inner, self)

    def list(self, prefix: str | None = None) -> list[str]:
        return self._portal.run(self._client.list, prefix)

    def exec_func(self, name: str, args: Iterable[Any] = ()) -> DropletFuture:
        return DropletFuture(self._portal.run(self._client.exec_func, name, list(args)),
                             self._portal)

    # DAGs
    def register_dag(self, name: str, functions: Sequence[str],
                     connections: Iterable[Sequence[str]],
                     colocated: Iterable[str] = ()) -> bool:
        return self._portal.run(self._client.register_dag, name, functions,
                                list(connections), list(colocated))

    def call_dag(self, name: str, arg_map: dict[str, Any], direct_response: bool = False,
                 consistency: str = NORMAL, output_key: str | None = None,
                 client_id: str | None = None, timeout: float | None = None) -> Any:
        result = self._portal.run(self._call_dag, name, arg_map, direct_response,
                                  consistency, output_key, client_id, timeout)
        if isinstance(result, AsyncDropletFuture):
            return DropletFuture(result, self._portal)
        return result

    async def _call_dag(self, *args: Any) -> Any:
        return await self._client.call_dag(*args)

    def delete_dag(self, name: str) -> bool:
        return self._portal.run(self._client.delete_dag, name)

    # KVS
    def put_object(self, key: str, value: Any) -> bool:
        return self._portal.run(self._client.put_object, key, value)

    def get_object(self, key: str) -> Any:
        return self._portal.run(self._client.get_object, key)


