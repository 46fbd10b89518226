"""Prometheus metrics for operators: ``--metrics-listen tcp://127.0.0.1:9100``.

A node serves its figures in the Prometheus text format over plain HTTP
(``GET /metrics``) from a Trio task of its own nursery: the text comes from
``prometheus_client.generate_latest`` over a private registry whose one
collector reads the node's services at scrape time (nothing is counted twice,
and nothing runs between scrapes). prometheus_client's own threaded HTTP
server is not used: the node stays one Trio program.

What a node exports depends on its role. A node with the scheduler (``all``
or ``scheduler``) exports the cluster as its executors report it: calls,
failures and a latency histogram per function, each executor's threads,
queue and cache. An ``executor`` node exports its own load and cache. Every
node exports its open connections.

The endpoint binds loopback by default. On any other address the node needs
a cluster token, and each scrape must send it (``Authorization: Bearer TOKEN``).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .config import is_loopback
from .latency import LATENCY_BOUNDS
from .transports.registry import parse_address

__all__ = ["NodeCollector", "metrics_registry", "serve_metrics"]

log = logging.getLogger("droplet.metrics")

#: Largest HTTP request head read from a scraper, and how long it may take.
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT = 10.0
#: Scrapes served at once; more are answered 503 at once.
MAX_SCRAPES = 64


class NodeCollector(Collector):
    """Reads a :class:`~droplet.node.Node`'s services when Prometheus scrapes."""

    def __init__(self, node: Any, connections: Callable[[], int]) -> None:
        self._node = node
        self._connections = connections

    def collect(self) -> Iterator[Metric]:
        conns = GaugeMetricFamily("droplet_connections", "Open connections to this node.")
        conns.add_metric([], self._connections())
        yield conns
        scheduler = self._node.scheduler
        if scheduler is not None:
            yield from self._cluster(scheduler.cluster_status(),
                                     scheduler.statistics().runs_in_flight)
        elif self._node.executors:
            yield from self._local(self._node.executors)
        pool = getattr(self._node, "pool", None)
        if scheduler is None and pool is not None and pool.policy.adaptive:
            yield from _scaling_metrics(pool.status())  # an adaptive executor node

    @staticmethod
    def _cluster(status: Any, runs: int) -> Iterator[Metric]:
        calls = CounterMetricFamily("droplet_function_calls", "Calls of each function.",
                                    labels=["function"])
        failures = CounterMetricFamily("droplet_function_failures",
                                       "Calls of each function that raised or could not run.",
                                       labels=["function"])
        latency = HistogramMetricFamily("droplet_function_latency_seconds",
                                        "Time from a function's start to its result.",
                                        labels=["function"])
        for f in status.functions:
            calls.add_metric([f.name], f.calls)
            failures.add_metric([f.name], f.failures)
            buckets, seen = [], 0
            for bound, n in zip(LATENCY_BOUNDS, f.latency_buckets, strict=False):
                seen += n
                buckets.append((repr(bound), seen))
            buckets.append(("+Inf", sum(f.latency_buckets)))
            latency.add_metric([f.name], buckets, f.latency_total)
        yield calls
        yield failures
        yield latency
        executors = GaugeMetricFamily("droplet_executors", "Executors connected.")
        executors.add_metric([], len(status.executors))
        yield executors
        if status.scaling is not None:
            yield from _scaling_metrics(status.scaling)
        in_flight = GaugeMetricFamily("droplet_runs_in_flight",
                                      "Calls scheduled and not yet finished.")
        in_flight.add_metric([], runs)
        yield in_flight
        yield from _executor_metrics([
            (e.url, e.threads, e.busy, e.queued, e.running, e.cache_entries, e.cache_bytes,
             e.cache_hits, e.cache_misses, e.cache_evictions) for e in status.executors])

    @staticmethod
    def _local(executors: list[Any]) -> Iterator[Metric]:
        rows = []
        for ex in executors:
            load = ex.load()
            rows.append((ex.url, load.threads, load.busy, load.queued, load.running,
                         load.cache_entries, load.cache_bytes, load.cache_hits,
                         load.cache_misses, load.cache_evictions))
        yield from _executor_metrics(rows)


def _scaling_metrics(scaling: Any) -> Iterator[Metric]:
    """Adaptive executors (``--executors MIN:MAX``): bounds, states and scale events."""
    for name, doc, value in [
        ("droplet_executors_min", "Fewest executors this node runs.", scaling.minimum),
        ("droplet_executors_max", "Most executors this node runs.", scaling.maximum),
        ("droplet_executors_running", "Executors running (joined, not draining).",
         scaling.current),
        ("droplet_executors_starting", "Executors started and not joined yet.",
         scaling.starting),
        ("droplet_executors_draining", "Executors finishing their calls before they stop.",
         scaling.draining),
    ]:
        gauge = GaugeMetricFamily(name, doc)
        gauge.add_metric([], value)
        yield gauge
    events = CounterMetricFamily("droplet_executor_scale_events",
                                 "Executors started (up) and stopped (down) by the autoscaler.",
                                 labels=["direction"])
    events.add_metric(["up"], scaling.scale_ups)
    events.add_metric(["down"], scaling.scale_downs)
    yield events


def _executor_metrics(rows: list[tuple[Any, ...]]) -> Iterator[Metric]:
    gauges = [
        ("droplet_executor_threads", "Worker threads of the executor."),
        ("droplet_executor_busy_threads", "Worker threads running a call now."),
        ("droplet_executor_queued", "Sync calls waiting for a free worker thread."),
        ("droplet_executor_running", "Invocations running on the executor."),
        ("droplet_cache_entries", "Values in the executor's cache."),
        ("droplet_cache_bytes", "Bytes of values in the executor's cache."),
    ]
    counters = [
        ("droplet_cache_hits", "Reads served by the executor's cache."),
        ("droplet_cache_misses", "Reads the executor's cache sent to storage."),
        ("droplet_cache_evictions", "Values the executor's cache dropped to stay in bounds."),
    ]
    families: list[Metric] = [GaugeMetricFamily(n, d, labels=["executor"]) for n, d in gauges]
    families += [CounterMetricFamily(n, d, labels=["executor"]) for n, d in counters]
    for url, *values in rows:
        for family, value in zip(families, values, strict=True):
            family.add_metric([url], value)  # type: ignore[attr-defined]
    yield from families


def metrics_registry(node: Any, connections: Callable[[], int]) -> CollectorRegistry:
    """A private registry holding only this node's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node, connections))
    return registry


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              extra: str = "") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode("latin-1") + body


def answer(head: bytes, registry: CollectorRegistry, token: str | None) -> bytes:
    """The HTTP response to one request head (pure apart from the scrape itself)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _response("400 Bad Request", b"not an HTTP/1.x request line\n")
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"only GET\n", extra="Allow: GET, HEAD\r\n")
    if target.split("?", 1)[0] not in ("/metrics", "/"):
        return _response("404 Not Found", b"metrics are at /metrics\n")
    if token is not None:
        given = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "authorization":
                given = value.strip()
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _response("401 Unauthorized", b"send the cluster token: "
                             b"Authorization: Bearer TOKEN\n",
                             extra='WWW-Authenticate: Bearer realm="droplet"\r\n')
    body = generate_latest(registry)
    response = _response("200 OK", body, CONTENT_TYPE_LATEST)
    return response[: len(response) - len(body)] if method == "HEAD" else response


async def _serve_one(stream: trio.SocketStream, registry: CollectorRegistry,
                     token: str | None) -> None:
    async with stream:
        head = b""
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                while b"\r\n\r\n" not in head:
                    if len(head) > MAX_REQUEST_BYTES:
                        await _refuse(stream, _response("431 Request Header Fields Too Large",
                                                        b"request head too large\n"))
                        return
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    head += chunk
            await stream.send_all(answer(head.split(b"\r\n\r\n", 1)[0], registry, token))
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:
            log.exception("metrics request failed")
            try:
                await stream.send_all(_response("500 Internal Server Error", b"see the log\n"))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


async def _refuse(stream: trio.SocketStream, response: bytes) -> None:
    """Send ``response``, then read (and drop) what the client still sends, briefly.

    Closing a socket with unread bytes makes the kernel reset the connection,
    and the client could lose the response: so shut our side, drain, then close.
    """
    with trio.move_on_after(1):
        try:
            await stream.send_all(response)
            await stream.send_eof()
            drained = 0
            while drained < 16 * MAX_REQUEST_BYTES:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def serve_metrics(url: str, registry: CollectorRegistry, *, token: str | None = None,
                        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``registry`` over HTTP at ``url`` (``tcp://HOST:PORT``) until cancelled.

    ``task_status.started`` gets the bound address (its real port for port 0).
    Beyond loopback, ``token`` is required of every scrape (ValueError without one).
    """
    scheme, host, port = parse_address(url)
    if scheme != "tcp":
        raise ValueError(f"metrics are served over tcp:// (HTTP), not {url}")
    need_token = not is_loopback(url)
    if need_token and not token:
        raise ValueError(f"refusing to serve metrics on {url} without a token")
    listeners = await trio.open_tcp_listeners(port or 0, host=host)
    bound = listeners[0].socket.getsockname()
    bound_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    async with trio.open_nursery() as nursery:
        handler = _handler(registry, token if need_token else None)
        await nursery.start(trio.serve_listeners, handler, listeners)
        address = f"tcp://{bound_host}:{bound[1]}"
        log.info("Prometheus metrics at http://%s:%d/metrics", bound_host, bound[1])
        task_status.started(address)


def _handler(registry: CollectorRegistry, token: str | None
             ) -> Callable[[trio.SocketStream], Any]:
    active = [0]

    async def handle(stream: trio.SocketStream) -> None:
        if active[0] >= MAX_SCRAPES:
            async with stream:
                await _refuse(stream, _response("503 Service Unavailable",
                                                b"too many scrapes at once\n"))
            return
        active[0] += 1
        try:
            await _serve_one(stream, registry, token)
        finally:
            active[0] -= 1

    return handle
