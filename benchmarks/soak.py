"""Soak test: steady mixed calls against a real node; RSS and table sizes over time.

    python benchmarks/soak.py [--minutes 10] [--rate 200] [--threads 4] [--executors 2]

Starts ``python -m droplet.node`` (and its executor worker processes), then
for ``--minutes`` issues calls at a steady ``--rate`` (calls per second, over
``--threads`` client threads): single functions that write, read and mail
themselves (cache subscriptions, messages), a fan-in DAG, direct-response
calls and client puts/gets. Every ``--every`` seconds it samples the RSS of
every process and the table sizes each process reports (``GetStatistics``).
Prints the first and the last minute side by side: calls, errors, latency
p50/p99, RSS per process and every table size. Not a CI test (Linux: reads
/proc for RSS and the worker processes).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

import droplet
from droplet.links import one_request
from droplet.protocol.messages import GetStatistics, Statistics
from droplet.testing.nodes import start_node


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(p) for p in (task / "children").read_text().split())
    return sorted(found)


def _stats(url: str) -> dict[str, int]:
    reply = trio.run(one_request, url, GetStatistics())
    assert isinstance(reply, Statistics)
    return reply.values


def _register(cloud: Any) -> None:
    def touch(lib: Any, i: int) -> int:
        key = f"soak-{i % 500}"
        lib.put(key, i)
        lib.get(key)
        lib.send(lib.getid(), b"ping")
        lib.recv()
        return i

    cloud.register(touch, "touch")
    cloud.register(lambda _, i: i, "src")
    cloud.register(lambda _, i: i + 1, "left")
    cloud.register(lambda _, i: i * 2, "right")
    cloud.register(lambda _, a, b: a + b, "join")
    cloud.register_dag("fan", ["src", "left", "right", "join"],
                       [("src", "left"), ("src", "right"), ("left", "join"),
                        ("right", "join")])


class Load:
    """Client threads issuing calls at a steady rate; latencies per second."""

    def __init__(self, url: str, rate: float, threads: int) -> None:
        self.url = url
        self.interval = threads / rate
        self.threads = threads
        self.stop = threading.Event()
        self.lock = threading.Lock()
        #: (second since start, latency in s, ok)
        self.samples: list[tuple[int, float, bool]] = []
        self.errors: dict[str, int] = {}
        self.t0 = time.monotonic()

    def one(self, cloud: Any, i: int) -> None:
        kind = i % 5
        if kind in (0, 1):
            assert cloud.exec_func("touch", [i]).get() == i
        elif kind == 2:
            assert cloud.call_dag("fan", {"src": [i]}).get() == 3 * i + 1
        elif kind == 3:
            assert cloud.call_dag("fan", {"src": [i]}, direct_response=True) == 3 * i + 1
        else:
            cloud.put_object(f"client-{i % 500}", i)
            cloud.get_object(f"client-{i % 500}")

    def worker(self, n: int) -> None:
        with droplet.DropletConnection(self.url, timeout=30) as cloud:
            i, next_at = n, time.monotonic() + n * self.interval / self.threads
            while not self.stop.is_set():
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += self.interval
                start = time.monotonic()
                try:
                    self.one(cloud, i)
                    ok = True
                except Exception as exc:  # counted and reported, never fatal
                    ok = False
                    with self.lock:
                        name = type(exc).__name__
                        self.errors[name] = self.errors.get(name, 0) + 1
                end = time.monotonic()
                with self.lock:
                    self.samples.append((int(end - self.t0), end - start, ok))
                i += self.threads


def _minute_row(load: Load, minute: int) -> dict[str, Any]:
    lat = sorted(s[1] for s in load.samples if s[0] // 60 == minute and s[2])
    errors = sum(1 for s in load.samples if s[0] // 60 == minute and not s[2])
    if not lat:
        return {"calls": 0, "errors": errors}
    return {"calls": len(lat), "errors": errors,
            "p50 ms": round(statistics.median(lat) * 1000, 2),
            "p99 ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=200.0, help="calls per second")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--executors", type=int, default=2)
    p.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--node-args", default="", help="extra flags for the node")
    args = p.parse_args(argv)
    where = Path(tempfile.mkdtemp(prefix="droplet-soak-"))
    with start_node("--executors", str(args.executors), *args.node_args.split(),
                    log_path=where / "node.log") as node:
        workers = _children(node.pid)
        executor_urls = re.findall(r"executor (tcp://\S+) joined", node.log_text())
        with droplet.DropletConnection(node.url, timeout=30) as cloud:
            _register(cloud)
        load = Load(node.url, args.rate, args.threads)
        threads = [threading.Thread(target=load.worker, args=(n,), daemon=True)
                   for n in range(args.threads)]
        for t in threads:
            t.start()
        samples: list[tuple[float, dict[str, float]]] = []
        end = load.t0 + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(args.every, max(0.0, end - time.monotonic())))
            row: dict[str, float] = {"rss node MiB": _rss_mib(node.pid)}
            for n, pid in enumerate(workers):
                row[f"rss worker{n} MiB"] = _rss_mib(pid)
            row.update(_stats(node.url))
            for n, url in enumerate(executor_urls):
                row.update({f"worker{n}.{k.split('.', 1)[1]}": v
                            for k, v in _stats(url).items()})
            samples.append((time.monotonic() - load.t0, row))
            print(f"{samples[-1][0]:7.0f} s  calls {len(load.samples):8d}  rss node "
                  f"{row['rss node MiB']:.1f} MiB", file=sys.stderr, flush=True)
        load.stop.set()
        for t in threads:
            t.join(60)
    last_minute = int(args.minutes * 60 - 1) // 60
    first = [r for t, r in samples if t < 60]
    last = [r for t, r in samples if int(t) // 60 == last_minute] or first
    print(f"\nsoak: {args.minutes:g} min at {args.rate:g} calls/s over {args.threads} threads,"
          f" {args.executors} executor workers; errors: {load.errors or 'none'}")
    calls_first, calls_last = _minute_row(load, 0), _minute_row(load, last_minute)
    print(f"{'':32s} {'first minute':>14s} {'last minute':>14s}")
    for key in ("calls", "errors", "p50 ms", "p99 ms"):
        print(f"{key:32s} {calls_first.get(key, '-')!s:>14s} {calls_last.get(key, '-')!s:>14s}")
    # Tables and RSS: the last sample of each minute (a table is a level, not a rate).
    for key in samples[0][1]:
        a, b = first[-1].get(key, float("nan")), last[-1].get(key, float("nan"))
        if isinstance(a, float) or isinstance(b, float):
            print(f"{key:32s} {a:14.1f} {b:14.1f}")
        else:
            print(f"{key:32s} {a:14d} {b:14d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
