"""Cloudburst's ``composition`` benchmark on Droplet: two functions, then a DAG of them.

Ported from hydro-project/cloudburst ``cloudburst/server/benchmarks/composition.py``:
``CloudburstConnection`` became ``DropletConnection``; the ZMQ socket that
shipped latencies to a benchmark server is gone; checks raise instead of
``sys.exit(1)``.
"""

from __future__ import annotations

import time
from typing import Any

from _checks import expect


def run(cloudburst_client: Any, num_requests: int) -> list[float]:
    # define and register the functions
    def incr(cloudburst: Any, x: int) -> int:
        return x + 1

    def square(cloudburst: Any, x: int) -> int:
        return x * x

    cloud_incr = cloudburst_client.register(incr, "incr")
    cloud_square = cloudburst_client.register(square, "square")
    expect(cloud_incr and cloud_square, "registering incr and square failed")

    # test the registered functions
    expect(cloud_incr(2).get() == 3, "incr(2) != 3")
    expect(cloud_square(2).get() == 4, "square(2) != 4")

    # create the DAG: Cloudburst's (success, error) answer
    success, error = cloudburst_client.register_dag(
        "composition", ["incr", "square"], [("incr", "square")])
    expect(success and error is None, f"register_dag failed: {error}")

    # run it
    total_time = []
    for _ in range(num_requests):
        start = time.time()
        future = cloudburst_client.call_dag("composition", {"incr": [1]})
        result = future.get()
        total_time.append(time.time() - start)
        expect(result == 4, f"composition(1) gave {result!r}, not 4")
    return total_time
