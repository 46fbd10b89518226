"""Compose Droplet's services into a node, by role.

- ``all``: KVS and scheduler behind one address, plus executor workers as
  child processes (so CPU-bound functions use every core).
- ``kvs``, ``scheduler``, ``executor``: one service per process, for a real
  cluster. Executors join a scheduler; the scheduler tells everyone where the
  KVS is.

:func:`serve_node` is the single entry point; ``python -m droplet.node``
(:mod:`droplet.node._main`) and :class:`droplet.LocalCluster` both use it.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from ..autoscale import ScalingPolicy
from ..config import IN_MEMORY, Config, parse_resources
from ..errors import ProtocolError
from ..executor.cache import Cache
from ..executor.cache_service import NodeCacheService, open_node_cache
from ..executor.service import ExecutorService
from ..kvs.backends import MemoryBackend, StorageBackend
from ..kvs.backends.durable import DurableBackend
from ..kvs.keys import RESULT_PREFIX
from ..kvs.service import KvsService
from ..links import connect_peer, one_request, serve_peers
from ..protocol.messages import ClusterInfo, GetStatistics, Hello, Statistics
from ..rpc import NOT_NOW, Limits, Peer, ReaderHandler
from ..scheduler.service import SchedulerService
from ..transports.base import TransportOptions
from ..transports.registry import parse_address
from ._main import WATCH_PARENT_ENV
from .pool import ExecutorPool, LocalControl, RemoteControl

__all__ = ["Node", "Router", "serve_node"]

log = logging.getLogger("droplet.node")

EXECUTOR_JOIN_TIMEOUT = 60.0
#: Set by an all-in-one node for each executor worker: the id it joins with,
#: by which the node finds the worker's address (to drain it, say).
WORKER_ID_ENV = "DROPLET_WORKER_ID"
#: Seconds a worker process gets to exit after SIGTERM before SIGKILL.
WORKER_STOP_GRACE = 10.0


class Router:
    """One listener, several services: dispatch each message by its class."""

    def __init__(self) -> None:
        self._routes: dict[type[Any], Callable[[Peer, Any, int], Awaitable[Any]]] = {}
        #: services' synchronous sides (``handle_now``), by message class.
        self._now: dict[type[Any], Callable[[Peer, Any, int], Any]] = {}
        #: and their thread-safe sides (``handle_from_thread``).
        self._from_threads: dict[type[Any], Callable[[Peer, Any, int], Any]] = {}
        #: and what they serve in a connection's reader thread (``handle_in_reader``).
        self._in_reader: dict[type[Any], ReaderHandler] = {}
        self._reader_services: list[Any] = []
        #: open connections accepted by this router's listeners (metrics).
        self.connections = 0

    def connected(self, peer: Peer) -> None:
        self.connections += 1
        peer.on_close.append(self._disconnected)

    def _disconnected(self, peer: Peer) -> None:
        self.connections -= 1

    def add(self, service: Any) -> None:
        for cls in service.MESSAGES:
            self._routes[cls] = service.handle
        for cls in getattr(service, "MESSAGES_NOW", ()):
            self._now[cls] = service.handle_now
        for cls in getattr(service, "MESSAGES_FROM_THREADS", ()):
            self._from_threads[cls] = service.handle_from_thread
        if hasattr(service, "messages_in_reader"):
            self._reader_services.append(service)

    def in_reader(self) -> ReaderHandler | None:
        """What serves messages in a connection's reader thread; None when no service
        serves any there now (the connection then needs no reader thread)."""
        routes = {cls: service.handle_in_reader for service in self._reader_services
                  for cls in service.messages_in_reader}
        if not routes:
            return None
        self._in_reader = routes
        return self.handle_in_reader

    def handle_in_reader(self, peer: Peer, msg: Any, request_id: int,
                         inline: bool) -> bool | Callable[[], None]:
        """A message in a connection's reader thread (see :data:`droplet.rpc.ReaderHandler`)."""
        route = self._in_reader.get(type(msg))
        return False if route is None else route(peer, msg, request_id, inline)

    def handle_from_thread(self, peer: Peer, msg: Any, request_id: int) -> Any:
        """A request from another thread, served there (thread-safe; else NOT_NOW)."""
        route = self._from_threads.get(type(msg))
        return NOT_NOW if route is None else route(peer, msg, request_id)

    def handle_now(self, peer: Peer, msg: Any, request_id: int) -> Any:
        """A request served without waiting (see :data:`droplet.rpc.NowHandler`)."""
        route = self._now.get(type(msg))
        return NOT_NOW if route is None else route(peer, msg, request_id)

    async def handle(self, peer: Peer, msg: Any, request_id: int) -> Any:
        route = self._routes.get(type(msg))
        if route is None:
            # The peer's mistake, not ours: a ProtocolError reply (and, for a
            # one-way message, one log line rather than a traceback).
            raise ProtocolError(f"this node does not serve {type(msg).__name__} messages")
        return await route(peer, msg, request_id)


@attrs.define
class Node:
    """What a running node offers to its owner (tests, LocalCluster, the CLI)."""

    url: str
    role: str
    kvs: KvsService | None = None
    scheduler: SchedulerService | None = None
    executors: list[ExecutorService] = attrs.Factory(list)
    router: Router | None = None
    #: where Prometheus metrics are served (``--metrics-listen``), or None.
    metrics_url: str | None = None
    #: the cache the node's executors share (all-in-one node), or None.
    cache: Cache | None = None
    #: the executors of an all-in-one node (adaptive with ``--executors MIN:MAX``).
    pool: ExecutorPool | None = None

    def statistics(self) -> dict[str, int]:
        """Every integer field of every service's ``statistics()``, as ``service.field``."""
        found: dict[str, int] = {}
        services: list[tuple[str, Any]] = [("kvs", self.kvs), ("scheduler", self.scheduler),
                                           ("cache", self.cache)]
        services += [(f"executor{i}", ex) for i, ex in enumerate(self.executors)]
        for prefix, service in services:
            if service is None:
                continue
            for name, value in attrs.asdict(service.statistics()).items():
                if type(value) is int:
                    found[f"{prefix}.{name}"] = value
        return found


class _StatisticsService:
    """Answers GetStatistics for the services of this process (soak tests, status)."""

    MESSAGES = (GetStatistics,)

    def __init__(self, node: Node) -> None:
        self.node = node

    async def handle(self, peer: Peer, msg: Any, request_id: int) -> Any:
        return Statistics(self.node.statistics())


async def serve_node(
    config: Config,
    *,
    in_process_executors: bool = False,
    skip_encoding: bool = False,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one node until cancelled; ``task_status.started`` gets the ready :class:`Node`.

    With ``in_process_executors`` the ``all`` role runs its executors as tasks
    of this process instead of child processes (the embedded LocalCluster).
    With ``skip_encoding`` its ``inproc://`` listeners (the public one, the
    executors') carry message objects instead of encoded frames (see
    :mod:`droplet.protocol.parcel`). The scheduler's and the cache's link to the
    node's own store always does: services of one process never encode to
    each other.
    """
    # The library refuses an exposed address without a token, as the CLI does:
    # LocalCluster(listen="tcp://0.0.0.0:0") would otherwise run anyone's code.
    config.check_exposure()
    server_opts = config.server_options()
    if skip_encoding and parse_address(config.listen_url)[0] == "inproc":
        server_opts.skip_encoding = True
    client_opts = config.client_options()
    limits = Limits(max_inflight=config.max_inflight)
    token = config.token
    async with trio.open_nursery() as nursery:
        router = Router()
        if config.role == "executor" and config.max_executors is not None:
            node = await _start_executor_pool(nursery, config, client_opts)
            await _start_metrics(nursery, config, node)
            task_status.started(node)
            return
        if config.role == "executor":
            node = await _start_executor(nursery, config, config.listen_url, token,
                                         server_opts, client_opts, limits,
                                         node_id=os.environ.get(WORKER_ID_ENV))
            await _start_metrics(nursery, config, node)
            task_status.started(node)
            return

        # The public address opens last, once the node can serve calls.
        node = Node("", config.role, router=router)
        router.add(_StatisticsService(node))
        if config.role in ("all", "kvs"):
            node.kvs = KvsService(nursery, open_backend(config), result_ttl=config.result_ttl)
            await nursery.start(node.kvs.serve)  # a durable backend replays its log first
            router.add(node.kvs)
        if config.role in ("all", "scheduler"):
            if config.role == "all":
                internal = await nursery.start(_serve, f"inproc://node-{uuid.uuid4().hex}",
                                               router, token, _objects(server_opts), limits)
                kvs_peer = await connect_peer(internal, nursery, token=token)
                kvs_url = ""  # "the address you reached me at"
            else:
                if not config.kvs:
                    raise ValueError("--role scheduler needs --kvs URL (the storage node)")
                kvs_url = config.kvs
                kvs_peer = await connect_peer(kvs_url, nursery, token=token,
                                              options=client_opts)
            node.scheduler = SchedulerService(nursery, kvs=kvs_peer, kvs_url=kvs_url,
                                              placement=config.placement)
            await node.scheduler.restore()  # what was registered before a restart
            router.add(node.scheduler)
        if config.role == "all" and config.executors:
            # One cache for the node's executors, on a link of its own to the store.
            node.cache = await open_node_cache(nursery, internal, token=token,
                                               max_bytes=config.cache_size,
                                               shared_memory=not in_process_executors)
            router.add(NodeCacheService(node.cache))
            node.url = await _start_workers(nursery, config, node, router, token, server_opts,
                                            limits, in_process_executors, skip_encoding)
        else:
            node.url = await nursery.start(_serve, config.listen_url, router, token,
                                           server_opts, limits)
        await _start_metrics(nursery, config, node)
        task_status.started(node)


def _objects(options: TransportOptions) -> TransportOptions:
    """``options`` for an inproc listener whose connections carry message objects."""
    return TransportOptions(max_frame_size=options.max_frame_size,
                            read_timeout=options.read_timeout, skip_encoding=True)


async def _start_metrics(nursery: trio.Nursery, config: Config, node: Node) -> None:
    """Serve Prometheus metrics when ``metrics_listen`` is set (imported only then)."""
    if config.metrics_listen is None:
        return
    from ..metrics import metrics_registry, serve_metrics

    router = node.router
    registry = metrics_registry(node, lambda: router.connections if router else 0)
    node.metrics_url = await nursery.start(functools.partial(
        serve_metrics, config.metrics_listen, registry, token=config.token))


def open_backend(config: Config) -> StorageBackend:
    """The storage backend the configuration asks for: Redis, durable in a data dir, or memory."""
    if config.storage and config.storage.startswith(("redis://", "rediss://")):
        from ..kvs.backends.redis import RedisBackend

        if config.data_dir and config.data_dir != IN_MEMORY:
            raise ValueError("--storage redis://... keeps the data in Redis; "
                             "drop --data-dir (or use one, not both)")
        backend = RedisBackend(config.storage, result_ttl=config.result_ttl)
        log.info("storage: Redis at %s", backend.url.redacted())
        return backend
    path = config.storage_dir
    if path is None:
        log.info("storage: in memory (nothing survives a restart; --data-dir DIR keeps it)")
        return MemoryBackend()
    log.info("storage: durable in %s (fsync=%s%s)", path, config.fsync,
             ", call results too" if config.log_results else "")
    volatile = () if config.log_results else (RESULT_PREFIX,)
    return DurableBackend(path, fsync=config.fsync, compact_bytes=config.compact_bytes,
                          volatile_prefixes=volatile)


async def _serve(url: str, router: Router, token: str | None, options: Any, limits: Limits,
                 *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    await serve_peers(url, router.handle, token=token, options=options, limits=limits,
                      on_connect=router.connected, now=router.handle_now,
                      thread_now=router.handle_from_thread, in_reader=router.in_reader,
                      task_status=task_status)


async def _start_executor(nursery: trio.Nursery, config: Config, listen: str,
                          token: str | None, server_opts: Any, client_opts: Any,
                          limits: Limits, node_id: str | None = None,
                          cache: Cache | None = None) -> Node:
    if not config.scheduler:
        raise ValueError("--role executor needs --scheduler URL")
    router = Router()
    url: str = await nursery.start(_serve, listen, router, token, server_opts, limits)
    executor = await ExecutorService.join(
        nursery, url=url, scheduler_url=config.scheduler, workers=config.threads,
        token=token, options=client_opts, threads=config.threads,
        resources=parse_resources(config.resources), max_batch=config.max_batch,
        report_interval=config.report_interval, node_id=node_id, before_join=router.add,
        cache=cache, node_cache=config.node_cache, cache_size=config.cache_size)
    node = Node(url, "executor", executors=[executor])
    router.add(_StatisticsService(node))
    node.router = router
    return node


async def _start_workers(nursery: trio.Nursery, config: Config, node: Node, router: Router,
                         token: str | None, server_opts: Any, limits: Limits,
                         in_process: bool, skip_encoding: bool = False) -> str:
    """Start the executors, wait until the minimum joined, then open the public address."""
    scheduler = node.scheduler
    assert scheduler is not None
    launch: Callable[[str], Awaitable[None]]
    if in_process:
        # Executors and their links to the scheduler stay in-process (inproc://),
        # whatever scheme the public address uses.
        base = f"inproc://node-{uuid.uuid4().hex[:12]}"
        # The node's frame limit holds on these links too (either way of crossing).
        inproc_opts = TransportOptions(max_frame_size=config.max_frame_size,
                                       skip_encoding=skip_encoding)
        workers_url: str = await nursery.start(_serve, f"{base}-workers", router, token,
                                               inproc_opts, limits)
        launch = functools.partial(_run_in_process, node, workers_url, base, config, token,
                                   limits, inproc_opts)
    else:
        # Child processes join over a loopback TCP listener of their own, whatever
        # scheme (ws, TLS) the public address uses.
        workers_url = await nursery.start(_serve, "tcp://127.0.0.1:0", router, token,
                                          None, limits)
        # They share this node's cache, through that listener (and /dev/shm).
        extra: tuple[str, ...] = ("--node-cache", workers_url)
        if _workers_on_public_scheme(config):
            extra = (*_worker_flags(config), *extra)
        launch = functools.partial(_supervise_worker, scheduler_url=workers_url,
                                   config=config, extra=extra)
    minimum, maximum = config.executor_range
    policy = ScalingPolicy(minimum, maximum, up_queue=config.scale_up_queue,
                           up_after=config.scale_up_after,
                           down_after=config.scale_down_after)
    name = f"{uuid.uuid4().hex[:8]}-w"
    scheduler.claim_pool(name, scheduler)  # its workers are this node's to drain
    node.pool = pool = ExecutorPool(LocalControl(scheduler), launch, policy,
                                    interval=config.report_interval, name=name)
    if policy.adaptive:
        scheduler.scaling = pool.status
    await nursery.start(pool.run)
    with trio.move_on_after(EXECUTOR_JOIN_TIMEOUT):
        while len(scheduler.executor_urls) < minimum:
            await scheduler.executors_changed.wait()
    if len(scheduler.executor_urls) < minimum:
        raise RuntimeError(
            f"only {len(scheduler.executor_urls)} of {minimum} executor workers "
            f"joined within {EXECUTOR_JOIN_TIMEOUT:g} s; see the log above")
    await pool.refresh()  # their addresses, before anyone asks for the status
    public_url: str = await nursery.start(_serve, config.listen_url, router, token,
                                          server_opts, limits)
    return public_url


async def _start_executor_pool(nursery: trio.Nursery, config: Config, client_opts: Any
                               ) -> Node:
    """``--role executor --executors MIN:MAX``: worker processes joining a remote scheduler.

    Each worker is an ordinary executor process; this process starts them,
    asks the scheduler how they are doing and has it drain one before it stops.
    """
    if not config.scheduler:
        raise ValueError("--role executor needs --scheduler URL")
    control = await connect_peer(config.scheduler, nursery, token=config.token,
                                 options=client_opts)
    launch = functools.partial(_supervise_worker, scheduler_url=config.scheduler,
                               config=config, extra=_worker_flags(config))
    minimum, maximum = config.executor_range
    policy = ScalingPolicy(minimum, maximum, up_queue=config.scale_up_queue,
                           up_after=config.scale_up_after,
                           down_after=config.scale_down_after)
    pool = ExecutorPool(RemoteControl(control), launch, policy,
                        interval=config.report_interval, name=f"{uuid.uuid4().hex[:8]}-w")
    await nursery.start(pool.run)
    with trio.move_on_after(EXECUTOR_JOIN_TIMEOUT):
        while pool.status().current < minimum:
            await trio.sleep(0.1)
            await pool.refresh()
    running = [slot for slot, state in pool.slots.items() if state == "running"]
    if len(running) < minimum:
        raise RuntimeError(
            f"only {len(running)} of {minimum} executor workers joined {config.scheduler} "
            f"within {EXECUTOR_JOIN_TIMEOUT:g} s; see the log above")
    pool.node = pool.url_of(running[0]) or ""
    return Node(pool.node or config.scheduler, "executor", pool=pool)


def _workers_on_public_scheme(config: Config) -> bool:
    """Whether an all-in-one node's workers listen on its public scheme and host.

    Clients send calls straight to executors only over their own scheme
    (client/_direct.py, same_scheme), so on ``ws://`` they do, and ``ws://``
    clients go direct as ``tcp://`` ones do. On ``tls://`` and ``wss://`` the
    executors would also dial each other over TLS: only with ``--tls-ca`` (to
    verify them by) and a host a certificate can name (not 0.0.0.0 or ::).
    """
    scheme, host, _ = parse_address(config.listen_url)
    if scheme == "ws":
        return True
    return (scheme in ("tls", "wss") and bool(config.tls_ca)
            and host not in ("0.0.0.0", "::", ""))


def _worker_flags(config: Config) -> list[str]:
    """An executor node's flags its workers need: its host (any free port), TLS, exposure."""
    flags = []
    if config.listen:
        scheme, host, _ = parse_address(config.listen_url)
        flags += ["--listen", f"{scheme}://[{host}]:0" if ":" in host else
                  f"{scheme}://{host}:0"]
    for flag, value in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key),
                        ("--tls-ca", config.tls_ca)):
        if value:
            flags += [flag, value]
    if config.insecure:
        flags.append("--insecure")
    return flags


async def _run_in_process(node: Node, scheduler_url: str, base: str, config: Config,
                          token: str | None, limits: Limits,
                          inproc_opts: TransportOptions | None, worker_id: str) -> None:
    """Run one executor of the embedded cluster as tasks of this process, until cancelled."""
    ex_config = attrs.evolve(config, role="executor", scheduler=scheduler_url)
    async with trio.open_nursery() as nursery:
        worker = await _start_executor(nursery, ex_config, f"{base}-executor-{worker_id}",
                                       token, inproc_opts, None, limits, node_id=worker_id,
                                       cache=node.cache)
        for ex in worker.executors:  # one executor reports the shared cache's size
            ex.reports_cache = not any(e.reports_cache for e in node.executors)
        node.executors.extend(worker.executors)
        try:
            await trio.sleep_forever()
        finally:
            for ex in worker.executors:
                node.executors.remove(ex)
                if ex.reports_cache and node.executors:
                    node.executors[0].reports_cache = True


async def _supervise_worker(index: str, *, scheduler_url: str, config: Config,
                            extra: Sequence[str] = ()) -> None:
    """Run executor worker ``index`` as a child process, restarting it if it dies."""
    cmd = [sys.executable, "-m", "droplet.node", "--role", "executor",
           "--scheduler", scheduler_url, "--threads", str(config.threads),
           "--max-frame-size", str(config.max_frame_size), "--log-level", config.log_level,
           "--max-batch", str(config.max_batch),
           "--report-interval", repr(config.report_interval)]
    if config.resources:
        cmd += ["--resources", config.resources]
    cmd += extra
    env = dict(os.environ)
    if config.token:
        env["DROPLET_TOKEN"] = config.token  # never on the command line (visible in ps)
    # The worker exits when its stdin (a pipe from us) ends: when this node
    # goes away, even by SIGKILL (see droplet.node._main.watch_parent).
    env[WATCH_PARENT_ENV] = "stdin"
    env[WORKER_ID_ENV] = index
    while True:
        returncode = await _run_worker(cmd, env)
        log.warning("executor worker %s exited with status %s; restarting it",
                    index, returncode)
        await trio.sleep(1.0)


async def _run_worker(cmd: list[str], env: dict[str, str]) -> int:
    """Run one worker process until it exits; on cancellation stop it (TERM, then KILL)."""
    proc = await trio.lowlevel.open_process(cmd, env=env, stdin=subprocess.PIPE)
    try:
        return await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(WORKER_STOP_GRACE):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            if proc.stdin is not None:
                await proc.stdin.aclose()


async def cluster_info(url: str, token: str | None = None, timeout: float = 10.0,
                       options: Any = None) -> ClusterInfo:
    """Ask the node at ``url`` for its cluster addresses (used by health checks).

    ``options`` (a TransportOptions) carries e.g. the SSL context for tls:// and wss://.
    """
    info: ClusterInfo = await one_request(url, Hello("probe", "probe"), token=token,
                                          timeout=timeout, options=options)
    return info
