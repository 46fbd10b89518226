"""Count the work of one embedded call: CPU per call and Trio task steps per call.

    python benchmarks/embedded_probe.py [-n CALLS] [--modes frames,objects]

For each mode (``frames``: the default encoded inproc://; ``objects``:
``skip_encoding=True``) it runs a 2-function DAG (square -> increment) of
``async def`` functions with the async client inside one ``trio.run``, and the
same DAG of plain functions with the sync ``LocalCluster`` client, and prints
p50 latency, CPU microseconds per call (this process, every thread) and, for
the async client, Trio task steps and scheduler batches per call; then the
async DAG again with a first function that awaits (a task per run). CPU and step
counts hold up on a busy machine where wall-clock latency does not.
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import trio

import droplet


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.on = False
        self.steps: collections.Counter[str] = collections.Counter()
        self.batches = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.steps[task.name] += 1

    def after_io_wait(self, timeout: float) -> None:
        if self.on:
            self.batches += 1


async def _square(_: Any, x: int) -> int:
    return x * x


async def _increment(_: Any, x: int) -> int:
    return x + 1


async def _square_awaits(_: Any, x: int) -> int:
    await trio.lowlevel.checkpoint()  # may suspend: the run is a task of the executor
    return x * x


def _square_sync(_: Any, x: int) -> int:
    return x * x


def _increment_sync(_: Any, x: int) -> int:
    return x + 1


def _report(label: str, samples: list[float], cpu: float, extra: str = "") -> None:
    samples.sort()
    n = len(samples)
    print(f"{label:28s} p50 {samples[n // 2] * 1e3:6.3f} ms  p99 "
          f"{samples[int(n * 0.99)] * 1e3:6.3f} ms  cpu/call {cpu / n * 1e6:5.0f} us{extra}")


def probe_async(skip: bool, n: int) -> None:
    async def main() -> None:
        async with droplet.open_local_cluster(executors=2, skip_encoding=skip) as cluster, \
                cluster.client() as cloud:
            await cloud.register(_square, "sq")
            await cloud.register(_increment, "inc")
            await cloud.register_dag("d", ["sq", "inc"], [("sq", "inc")])
            for _ in range(200):
                await (await cloud.call_dag("d", {"sq": [3]})).get()
            steps = _Steps()
            trio.lowlevel.add_instrument(steps)
            samples = [0.0] * n
            steps.on = True
            cpu0 = time.process_time()
            for i in range(n):
                t0 = time.perf_counter()
                result = await (await cloud.call_dag("d", {"sq": [3]})).get()
                samples[i] = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            steps.on = False
            trio.lowlevel.remove_instrument(steps)
            assert result == 10
            total = sum(steps.steps.values())
            _report(f"async dag2 ({'objects' if skip else 'frames'})", samples, cpu,
                    f"  task steps/call {total / n:4.1f}  batches/call {steps.batches / n:3.1f}")
            # The same DAG whose first function awaits (a task per run).
            await cloud.register(_square_awaits, "sqa")
            await cloud.register_dag("da", ["sqa", "inc"], [("sqa", "inc")])
            for _ in range(200):
                await (await cloud.call_dag("da", {"sqa": [3]})).get()
            cpu0 = time.process_time()
            for i in range(n):
                t0 = time.perf_counter()
                result = await (await cloud.call_dag("da", {"sqa": [3]})).get()
                samples[i] = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            assert result == 10
            _report(f"async dag2 awaiting ({'objects' if skip else 'frames'})", samples, cpu)

    trio.run(main)


def probe_sync(skip: bool, n: int) -> None:
    with droplet.LocalCluster(executors=2, skip_encoding=skip) as cluster:
        conn = cluster.connect()
        conn.register(_square_sync, "sq")
        conn.register(_increment_sync, "inc")
        conn.register_dag("d", ["sq", "inc"], [("sq", "inc")])
        for _ in range(200):
            conn.call_dag("d", {"sq": [3]}).get()
        samples = [0.0] * n
        cpu0 = time.process_time()
        for i in range(n):
            t0 = time.perf_counter()
            result = conn.call_dag("d", {"sq": [3]}).get()
            samples[i] = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        assert result == 10
        _report(f"sync dag2 ({'objects' if skip else 'frames'})", samples, cpu)


def probe_alternating(n: int, block: int = 100) -> None:
    """Both modes in one Trio run, in alternating blocks: the fairest CPU comparison."""

    async def main() -> None:
        async with droplet.open_local_cluster(executors=2, skip_encoding=False) as frames, \
                droplet.open_local_cluster(executors=2, skip_encoding=True) as objects, \
                frames.client() as a, objects.client() as b:
            clients = {"frames": a, "objects": b}
            for cloud in clients.values():
                await cloud.register(_square, "sq")
                await cloud.register(_increment, "inc")
                await cloud.register_dag("d", ["sq", "inc"], [("sq", "inc")])
                for _ in range(200):
                    await (await cloud.call_dag("d", {"sq": [3]})).get()
            samples: dict[str, list[float]] = {mode: [] for mode in clients}
            cpu = dict.fromkeys(clients, 0.0)
            for _ in range(max(1, n // block)):
                for mode, cloud in clients.items():
                    cpu0 = time.process_time()
                    for _ in range(block):
                        t0 = time.perf_counter()
                        await (await cloud.call_dag("d", {"sq": [3]})).get()
                        samples[mode].append(time.perf_counter() - t0)
                    cpu[mode] += time.process_time() - cpu0
            for mode in clients:
                _report(f"async dag2 ({mode}, alternating)", samples[mode], cpu[mode])

    trio.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--calls", type=int, default=1000)
    parser.add_argument("--modes", default="frames,objects")
    parser.add_argument("--alternate", action="store_true",
                        help="also run both modes (async) in one process, in alternating "
                        "blocks of 100 calls")
    args = parser.parse_args(argv)
    if args.alternate:
        probe_alternating(args.calls)
    for mode in args.modes.split(","):
        if mode not in ("frames", "objects"):
            parser.error(f"unknown mode {mode!r}: frames or objects")
        probe_async(mode == "objects", args.calls)
        probe_sync(mode == "objects", args.calls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
