"""Adaptive executors: a burst of slow calls on one node with ``--executors 1:4``.

Starts an all-in-one node with adaptive executors (few threads each, so calls
queue), keeps ``--concurrency`` calls of a function that sleeps ``--sleep``
seconds in flight for ``--burst`` seconds, then lets the node sit idle for
``--idle`` seconds. Every ``--every`` seconds it prints the timeline: time,
executors running (and starting/draining), calls queued on the executors,
completed calls per second; then the node's scale events and the call
latency p50/p99 per phase.

    python benchmarks/adaptive.py
    python benchmarks/adaptive.py --executors 1:4 --threads 4 --burst 10 --idle 8

What to look for: the executors grow while calls queue, throughput rises
with them (each executor completes at most threads/sleep calls per second),
and once the burst ends the idle executors are drained and stopped, back to MIN.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from droplet.client.aio import open_client
from droplet.testing.nodes import start_node


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/adaptive.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--executors", default="1:4", help="MIN:MAX (default 1:4)")
    p.add_argument("--threads", type=int, default=4, help="threads per executor (default 4)")
    p.add_argument("--sleep", type=float, default=0.05, help="seconds per call (default 0.05)")
    p.add_argument("--concurrency", type=int, default=64,
                   help="calls kept in flight during the burst (default 64)")
    p.add_argument("--burst", type=float, default=10.0, help="seconds of load (default 10)")
    p.add_argument("--idle", type=float, default=8.0, help="seconds idle after (default 8)")
    p.add_argument("--every", type=float, default=0.5, help="seconds per timeline row")
    p.add_argument("--scale-up-after", default="0.5", help="node flag (default 0.5)")
    p.add_argument("--scale-down-after", default="3", help="node flag (default 3)")
    p.add_argument("--report-interval", default="0.25", help="node flag (default 0.25)")
    return p


async def _run(url: str, args: argparse.Namespace) -> None:
    latencies: dict[str, list[float]] = {"burst": []}
    completed = 0
    rows: list[tuple[float, str, int, float]] = []
    async with open_client(url, timeout=60) as cloud:
        sleep = args.sleep

        def slow(_: Any, x: int) -> int:
            import time

            time.sleep(sleep)
            return x

        fn = await cloud.register(slow, "adaptive_bench_slow")
        began = trio.current_time()
        burst_over = trio.Event()

        async def caller(i: int) -> None:
            nonlocal completed
            while not burst_over.is_set():
                start = time.perf_counter()
                assert await (await fn(i)).get() == i
                latencies["burst"].append(time.perf_counter() - start)
                completed += 1

        async def sample() -> None:
            last, last_t = 0, trio.current_time()
            while True:
                await trio.sleep(args.every)
                status = await cloud.status()
                now = trio.current_time()
                s = status.scaling
                executors = (f"{s.current}" + (f" +{s.starting}" if s.starting else "")
                             + (f" -{s.draining}" if s.draining else "")
                             if s is not None else str(len(status.executors)))
                rate = (completed - last) / (now - last_t)
                last, last_t = completed, now
                rows.append((now - began, executors, status.queued, rate))
                print(f"{now - began:6.1f}  {executors:>9}  {status.queued:6d}  {rate:9.1f}",
                      flush=True)

        print(f"{'t s':>6}  {'executors':>9}  {'queued':>6}  {'calls/s':>9}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            async with trio.open_nursery() as callers:
                for i in range(args.concurrency):
                    callers.start_soon(caller, i)
                await trio.sleep(args.burst)
                burst_over.set()
            print(f"{trio.current_time() - began:6.1f}  -- burst over --", flush=True)
            await trio.sleep(args.idle)
            nursery.cancel_scope.cancel()
        status = await cloud.status()
    if status.scaling is not None:
        print("\nscale events:")
        t0 = status.scaling.events[0].time if status.scaling.events else 0.0
        for e in status.scaling.events:
            print(f"  +{e.time - t0:5.1f} s  {e.direction:<4} -> {e.executors}  ({e.reason})")
    burst = latencies["burst"]
    if len(burst) >= 2:
        q = statistics.quantiles(burst, n=100)
        print(f"\nburst calls: {len(burst)}, latency p50 {q[49] * 1e3:.1f} ms, "
              f"p99 {q[98] * 1e3:.1f} ms (client side, queueing included)")
    peak = max((r[3] for r in rows), default=0.0)
    print(f"peak throughput {peak:.0f} calls/s; one executor's ceiling "
          f"{args.threads / args.sleep:.0f} calls/s")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = Path(tempfile.mkdtemp(prefix="droplet-adaptive-")) / "node.log"
    with start_node("--executors", args.executors, "--threads", str(args.threads),
                    "--data-dir", ":memory:", "--report-interval", args.report_interval,
                    "--scale-up-after", args.scale_up_after,
                    "--scale-down-after", args.scale_down_after, log_path=log) as node:
        print(f"node {node.url}: --executors {args.executors} --threads {args.threads}, "
              f"{args.concurrency} calls of {args.sleep * 1e3:g} ms in flight for "
              f"{args.burst:g} s, then {args.idle:g} s idle (log: {log})\n")
        trio.run(_run, node.url, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
