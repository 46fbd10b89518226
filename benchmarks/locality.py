"""Cloudburst's locality experiment: cold vs warm cache, data-aware vs random placement.

    python benchmarks/locality.py [--quick] [-n N] [--sizes 1,10] [--cache-size 32M]

A function returns ``len()`` of a ``DropletReference`` argument. The cluster is
a storage+scheduler node and two ``--role executor`` nodes (separate
processes, loopback TCP), each with its own cache of ``--cache-size`` bytes.
For each value size (MiB) it times, p50/p99 over sequential calls:

- ``cold``: every call reads a key no cache holds (the keys cycle through a set
  three times bigger than both caches together, so LRU never keeps one);
- ``warm``: one key, read again and again (placement ``data``);
- ``set-data`` / ``set-random``: a working set of keys 1.5 times one node's
  cache, read in turn, under data-aware placement (each key goes where it is
  cached, so the two caches split the set) and under random placement (each
  node sees the whole set and its LRU thrashes). The hit ratio is in the note.

Like run.py it prints an environment line and a table.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_report import Result, environment_line, format_table, summarize  # noqa: E402

import droplet  # noqa: E402
from droplet.client._direct import WRITE_SETTLE  # noqa: E402
from droplet.config import parse_size  # noqa: E402
from droplet.testing.nodes import start_node  # noqa: E402

MIB = 1024 * 1024


def _length() -> Callable[..., Any]:
    # Nested: pickled by value, so executor processes need not import this script.
    def length(_: Any, data: Any) -> Any:
        return len(data)
    return length


@contextmanager
def cluster(placement: str, cache_size: str, logs: Path) -> Iterator[str]:
    """A head node and two executor nodes; yields the head's URL."""
    with ExitStack() as stack:
        head = stack.enter_context(start_node(
            "--executors", "0", "--data-dir", ":memory:", "--placement", placement,
            log_path=logs / f"head-{placement}.log"))
        for i in range(2):
            stack.enter_context(start_node(
                "--scheduler", head.url, "--report-interval", "0.1", "--cache-size",
                cache_size, role="executor", log_path=logs / f"executor{i}-{placement}.log"))
        with droplet.DropletConnection(head.url, timeout=30) as cloud:
            deadline = time.monotonic() + 30
            while len(cloud.status().executors) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError("the executor nodes did not join")
                time.sleep(0.05)
        yield head.url


def _hit_ratio(cloud: droplet.DropletConnection) -> tuple[int, int]:
    status = cloud.status()
    return (sum(e.cache_hits for e in status.executors),
            sum(e.cache_misses for e in status.executors))


def measure(cloud: droplet.DropletConnection, row: str, target: str, keys: Sequence[str],
            samples: int, warmup: int, expect: int) -> Result:
    fn = cloud.register(_length(), "bench-locality-length")
    refs = [droplet.DropletReference(k) for k in keys]
    for i in range(warmup):
        assert fn(refs[i % len(refs)]).get() == expect
    # The executors' cache reports reach the scheduler, and this client's own
    # writes settle (calls naming them go through the scheduler until then).
    time.sleep(max(0.3, WRITE_SETTLE))
    hits0, misses0 = _hit_ratio(cloud)
    gc.collect()
    latencies = []
    start = time.perf_counter_ns()
    for i in range(samples):
        t0 = time.perf_counter_ns()
        assert fn(refs[i % len(refs)]).get() == expect
        latencies.append(time.perf_counter_ns() - t0)
    total = time.perf_counter_ns() - start
    time.sleep(0.3)
    hits, misses = _hit_ratio(cloud)
    hits, misses = hits - hits0, misses - misses0
    note = f"hits {hits / max(1, hits + misses):.0%}, {len(keys)} key(s)"
    return summarize(row, target, latencies, total, note=note)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/locality.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="60 samples per row")
    p.add_argument("-n", "--samples", type=int, metavar="N", help="calls per row (default 200)")
    p.add_argument("--sizes", default="1,10", metavar="MIB", help="value sizes (default 1,10)")
    p.add_argument("--cache-size", default="32M", metavar="BYTES",
                   help="each executor node's cache (default 32M)")
    args = p.parse_args(argv)
    samples = args.samples or (60 if args.quick else 200)
    cache = parse_size(args.cache_size)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    print(environment_line())
    print(f"{samples} calls per row; 2 executor nodes with --cache-size {args.cache_size} "
          "each, tcp on loopback", flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="droplet-locality-") as tmp:
        for placement in ("data", "random"):
            with cluster(placement, args.cache_size, Path(tmp)) as url, \
                    droplet.DropletConnection(url, timeout=60) as cloud:
                for mib in sizes:
                    size = mib * MIB
                    value = b"v" * size
                    working = [f"bench-loc-{mib}-set-{i}"
                               for i in range(max(2, math.ceil(1.5 * cache / size)))]
                    for key in working:
                        cloud.put_object(key, value)
                    target = f"2 nodes, {placement}"
                    if placement == "data":
                        cold = [f"bench-loc-{mib}-cold-{i}"
                                for i in range(max(3, math.ceil(6 * cache / size)))]
                        for key in cold:
                            cloud.put_object(key, value)
                        results.append(measure(cloud, f"cold-{mib}m", target, cold,
                                               min(samples, 3 * len(cold)), 0, size))
                        cloud.put_object(f"bench-loc-{mib}-one", value)
                        results.append(measure(cloud, f"warm-{mib}m", target,
                                               [f"bench-loc-{mib}-one"], samples, 10, size))
                    results.append(measure(cloud, f"set-{placement}-{mib}m", target, working,
                                           samples, 3 * len(working), size))
                    print(format_table(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
