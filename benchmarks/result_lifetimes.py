"""Node memory under steady calls whose futures are dropped (result lifetimes).

Starts an all-in-one node (one executor worker), runs ``--threads`` client
threads that each call a function returning ``--size`` bytes, read the result
and drop the future, and prints the node's RSS every ``--every`` seconds, then
the call latency p50/p99. Before results were released when their futures were
collected, the RSS grew with every result until ``result_ttl``; now it is flat.

    python benchmarks/result_lifetimes.py --seconds 90
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from droplet import DropletConnection
from droplet.testing.nodes import start_node


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--size", type=int, default=2000, help="bytes per result")
    p.add_argument("--pause", type=float, default=0.004, help="seconds between calls")
    p.add_argument("--every", type=float, default=15.0, help="seconds between samples")
    args = p.parse_args()
    log = Path(tempfile.mkdtemp(prefix="droplet-lifetimes-")) / "node.log"
    latencies: list[float] = []
    with start_node("--executors", "1", log_path=log) as node:
        stop = threading.Event()

        def worker() -> None:
            with DropletConnection(node.url, timeout=30) as cloud:
                size = args.size
                fn = cloud.register(lambda _, n: b"x" * n, "lifetimes-blob")
                while not stop.is_set():
                    start = time.perf_counter()
                    fn(size).get()
                    latencies.append(time.perf_counter() - start)
                    time.sleep(args.pause)

        threads = [threading.Thread(target=worker) for _ in range(args.threads)]
        for t in threads:
            t.start()
        print(f"{'t s':>6}  {'calls':>8}  {'node RSS MiB':>12}")
        began = time.monotonic()
        while time.monotonic() - began < args.seconds:
            time.sleep(args.every)
            print(f"{time.monotonic() - began:6.0f}  {len(latencies):8d}  "
                  f"{rss_mib(node.pid):12.1f}", flush=True)
        stop.set()
        for t in threads:
            t.join()
    q = statistics.quantiles(latencies, n=100)
    print(f"calls {len(latencies)}: p50 {q[49] * 1e3:.2f} ms, p99 {q[98] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
