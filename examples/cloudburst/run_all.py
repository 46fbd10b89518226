"""Run every Cloudburst port against a Droplet node, checking each one's results.

    python -m droplet.node &                     # or droplet start-local
    python examples/cloudburst/run_all.py        # default tcp://127.0.0.1:5000
    python examples/cloudburst/run_all.py tcp://127.0.0.1:5000 composition summa

Each program is Cloudburst's own (``cloudburst/server/benchmarks`` and the
user-library tests), ported by renaming imports and removing the AWS/ZMQ
harness; see each file's docstring for any other change and why. numpy is
needed here and on the node.
"""

from __future__ import annotations

import importlib
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from droplet.client.client import DropletConnection  # noqa: E402

#: name -> how to run it (create phase first, where upstream had one)
PROGRAMS: dict[str, Callable[[Any, Any, int], list[float]]] = {
    "composition": lambda m, cloud, n: m.run(cloud, n),
    "locality": lambda m, cloud, n: m.run(cloud, 0, True) + m.run(cloud, n, False),
    "scaling": lambda m, cloud, n: m.run(cloud, 0, True) + m.run(cloud, n, False),
    "centr_avg": lambda m, cloud, n: m.run(cloud, n),
    "dist_avg": lambda m, cloud, n: m.run(cloud, 1),
    "summa": lambda m, cloud, n: m.run(cloud, 1),
    "retwis": lambda m, cloud, n: m.run(cloud, n),
    "user_library": lambda m, cloud, n: m.run(cloud, n),
    "predserving": lambda m, cloud, n: m.run(cloud, n),
    "mobilenet": lambda m, cloud, n: m.run(cloud, n),
}


def run_program(name: str, cloud: DropletConnection, num_requests: int = 5) -> list[float]:
    """Run one port; raises AssertionError when its results are wrong."""
    module = importlib.import_module(name)
    return PROGRAMS[name](module, cloud, num_requests)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    address = args.pop(0) if args and "://" in args[0] else "tcp://127.0.0.1:5000"
    names = args or list(PROGRAMS)
    failed = 0
    with DropletConnection(address, timeout=60) as cloud:
        for name in names:
            try:
                times = run_program(name, cloud)
            except AssertionError as exc:
                failed += 1
                print(f"FAIL {name}: {exc}")
                continue
            median = f"{statistics.median(times) * 1000:.1f} ms median" if times else "ok"
            print(f"ok   {name} ({median})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
