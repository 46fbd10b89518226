"""Which Redis client for a Trio service: measured, not guessed.

Compares, against one local ``redis-server`` (started here on a free port):

- ``trio-hiredis``: Droplet's Trio-native client (``droplet.kvs.backends.redis``),
  one pipelined connection;
- ``redis-py-thread``: redis-py's blocking client called through
  ``trio.to_thread.run_sync`` (the other way to keep the loop unblocked).

Prints p50/p99 of one GET issued alone (latency), and GETs per second with 64
tasks issuing GETs at once (throughput). Needs ``redis-server`` on PATH and
``pip install redis`` for the second row::

    python benchmarks/redis_client_choice.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable

import trio

from droplet.kvs.backends.redis.connection import open_redis_connection
from droplet.kvs.backends.redis.resp import parse_redis_url
from droplet.testing.redis_servers import start_redis

CONCURRENT = 64


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


async def _measure(name: str, get: Callable[[], Awaitable[object]], samples: int) -> None:
    for _ in range(100):
        await get()
    lat = []
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        await get()
        lat.append(time.perf_counter_ns() - t0)
    done = 0
    t0 = time.perf_counter()

    async def worker() -> None:
        nonlocal done
        for _ in range(samples // CONCURRENT * 4):
            await get()
            done += 1

    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENT):
            nursery.start_soon(worker)
    rate = done / (time.perf_counter() - t0)
    print(f"| {name:16} | {_pct(lat, 0.5):8.1f} | {_pct(lat, 0.99):8.1f} | {rate:10.0f} |")


async def main(url_text: str, samples: int) -> None:
    url = parse_redis_url(url_text)
    print("| client           | p50 (µs) | p99 (µs) | GET/s (64 tasks) |")
    print("|---|---|---|---|")
    async with trio.open_nursery() as nursery:
        conn = await open_redis_connection(nursery, url)
        await conn.execute("SET", "bench", b"x" * 100)
        await _measure("trio-hiredis", lambda: conn.execute("GET", "bench"), samples)
        await conn.aclose()
    try:
        import redis
    except ImportError:
        print("| redis-py-thread  | (pip install redis to measure) |")
        return
    pool = redis.ConnectionPool(host=url.host, port=url.port, max_connections=CONCURRENT)
    client = redis.Redis(connection_pool=pool)
    limiter = trio.CapacityLimiter(CONCURRENT)

    async def threaded_get() -> object:
        return await trio.to_thread.run_sync(client.get, "bench", limiter=limiter)

    await _measure("redis-py-thread", threaded_get, samples)
    client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    samples = parser.parse_args().samples
    with start_redis() as server:
        trio.run(main, server.url, samples)
