"""``LocalCluster``: a whole Droplet cluster embedded in this process.

The same services as a daemon, talking over ``inproc://`` (the same encoded
frames as TCP, minus the kernel). For tests and notebooks.

>>> with droplet.LocalCluster(executors=2) as cluster:      # doctest: +SKIP
...     cloud = cluster.connect()
...     cloud.register(lambda _, x: x + 1, "inc")(1).get()
2
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .client._portal import Portal, _describe
from .client.aio import AsyncDropletClient, open_client
from .client.client import DropletConnection
from .config import IN_MEMORY, Config, parse_executors
from .errors import ConnectionError
from .node import Node, serve_node
from .scheduler.placement import DEFAULT_POLICY

__all__ = ["LocalCluster", "open_local_cluster"]

_names = itertools.count(1)

#: Set to ``1`` to make embedded clusters skip encoding unless told otherwise.
SKIP_ENCODING_ENV = "DROPLET_SKIP_ENCODING"


def skip_encoding_default(value: bool | None) -> bool:
    """``skip_encoding`` as given, or (None) from ``DROPLET_SKIP_ENCODING``."""
    if value is None:
        return os.environ.get(SKIP_ENCODING_ENV, "").strip().lower() in ("1", "true", "yes")
    if type(value) is not bool:
        raise TypeError(f"skip_encoding must be True, False or None, not {value!r}")
    return value


@asynccontextmanager
async def open_local_cluster(
    executors: int | tuple[int, int] = 2, *, placement: str = DEFAULT_POLICY,
    token: str | None = None, threads: int = 32, listen: str | None = None,
    skip_encoding: bool | None = None, **settings: Any,
) -> AsyncIterator[RunningCluster]:
    """Run an embedded cluster for the duration of an ``async with`` block.

    Args:
        executors: executors, as tasks of this process (sharing one cache);
            ``(min, max)`` for adaptive executors (see ``scale_up_after`` and
            ``scale_down_after`` in :class:`~droplet.config.Config`).
        placement: placement policy: ``"data"`` (default), ``"locality"``, ``"spread"``
            or a ``"package.module:Class"`` (see :mod:`droplet.scheduler.placement`).
        token: cluster token clients must present (default: none).
        threads: worker threads per executor for sync functions.
        listen: the cluster's public address (default: a fresh ``inproc://`` name;
            e.g. ``tcp://127.0.0.1:0`` to reach it from other processes).
        skip_encoding: messages between the cluster's services, and from
            clients in this process, cross as Python objects instead of encoded
            frames (see :mod:`droplet.protocol.parcel`): faster, with the same
            semantics (values stay pickled and isolated). ``None`` (the
            default): on when the environment variable ``DROPLET_SKIP_ENCODING``
            is ``1``, otherwise off, so embedded tests exercise the bytes TCP
            sends (and a test suite can run both ways without changes).
        settings: any other :class:`~droplet.config.Config` field, e.g.
            ``data_dir="state"`` to keep the store on disk (default: in memory).
    """
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            cluster = await nursery.start(_serve_cluster, executors, placement, token,
                                          threads, dict(settings, listen=listen,
                                                        skip_encoding=skip_encoding))
        except Exception as exc:  # could not start: re-raised below, not as a group
            failure = exc
            nursery.cancel_scope.cancel()
        else:
            try:
                yield cluster
            except BaseException as exc:  # re-raised outside our nursery: no ExceptionGroup
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _serve_cluster(executors: int | tuple[int, int], placement: str,
                         token: str | None, threads: int, settings: dict[str, Any], *,
                         task_status: trio.TaskStatus[RunningCluster]) -> None:
    settings = dict(settings)
    listen = settings.pop("listen", None) or f"inproc://droplet-{next(_names)}"
    skip_encoding = skip_encoding_default(settings.pop("skip_encoding", None))
    if settings.get("data_dir") is None:
        settings["data_dir"] = IN_MEMORY  # embedded clusters keep nothing unless asked
    low, high = parse_executors(executors)
    if high is not None:
        settings["max_executors"] = high
    config = Config(role="all", listen=listen, executors=low, placement=placement,
                    token=token, threads=threads, **settings)
    config.check_exposure()  # before any nursery, so the ValueError arrives bare
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(
            functools.partial(serve_node, config, in_process_executors=True,
                              skip_encoding=skip_encoding))
        task_status.started(RunningCluster(node, token))


class RunningCluster:
    """A running embedded cluster: its address, services and clients."""

    def __init__(self, node: Node, token: str | None) -> None:
        self.node = node
        self.address = node.url
        self.token = token

    def client(self) -> Any:
        """``async with cluster.client() as cloud:`` an AsyncDropletClient."""
        return open_client(self.address, token=self.token or "")

    async def connect(self, nursery: trio.Nursery) -> AsyncDropletClient:
        return await AsyncDropletClient.connect(self.address, nursery, token=self.token or "")


class LocalCluster:
    """An embedded cluster in a background thread; ``connect()`` for clients.

    Args:
        executors: number of executors (sharing one cache), or ``(min, max)``
            for adaptive executors.
        placement: placement policy: ``"data"`` (default), ``"locality"``, ``"spread"``
            or a ``"package.module:Class"`` (see :mod:`droplet.scheduler.placement`).
        token: require this cluster token of clients (default: none).
        listen: public address (default: a fresh ``inproc://`` name).
        skip_encoding: messages cross between the cluster's services as Python
            objects instead of encoded frames (see :func:`open_local_cluster`).
    """

    def __init__(self, executors: int | tuple[int, int] = 2, *,
                 placement: str = DEFAULT_POLICY,
                 token: str | None = None, threads: int = 32, listen: str | None = None,
                 skip_encoding: bool | None = None, **settings: Any) -> None:
        self._portal = Portal("droplet-local-cluster")
        self._token = token
        self._connections: list[DropletConnection] = []
        try:
            self._cluster: RunningCluster = self._portal.run(
                self._start, executors, placement, token, threads,
                dict(settings, listen=listen, skip_encoding=skip_encoding))
        except BaseException:
            self._portal.close()
            raise
        self.address = self._cluster.address

    async def _start(self, *args: Any) -> RunningCluster:
        cluster: RunningCluster = await self._portal.nursery.start(_serve_cluster, *args)
        return cluster

    @property
    def node(self) -> Node:
        return self._cluster.node

    def connect(self, *, timeout: float = 30.0) -> DropletConnection:
        """A client connection to this cluster (closed with the cluster)."""
        conn = DropletConnection(self.address, token=self._token or "", timeout=timeout,
                                 _portal=self._portal)
        self._connections.append(conn)
        return conn

    def close(self) -> None:
        """Stop every service and the background thread (idempotent)."""
        if self._portal.closed:
            return
        try:
            for conn in self._connections:
                conn.close()
        finally:
            self._portal.close()
        crash = self._portal.crash
        if crash is not None:
            raise ConnectionError(
                f"the embedded cluster at {self.address} crashed: {_describe(crash)}"
            ) from crash

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
