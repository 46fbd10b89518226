"""Cloudburst's ``scaling`` benchmark: a one-function DAG that sleeps 50 ms.

Ported from ``cloudburst/server/benchmarks/scaling.py``. The epoch reports to
a benchmark server are gone; each direct-response result is checked.
"""

from __future__ import annotations

import time
from typing import Any

from _checks import expect


def run(cloudburst_client: Any, num_requests: int, create: bool) -> list[float]:
    dag_name = "scaling"
    if create:
        def slp(cloudburst: Any, x: Any) -> Any:
            import time

            time.sleep(0.050)
            return x

        cloud_sleep = cloudburst_client.register(slp, "sleep")
        expect(cloud_sleep, "registering sleep failed")
        expect(cloud_sleep(2).get() == 2, "sleep(2) != 2")
        success, error = cloudburst_client.register_dag(dag_name, ["sleep"], [])
        expect(success, f"register_dag failed: {error}")
        return []

    total_time = []
    for _ in range(num_requests):
        start = time.time()
        res = cloudburst_client.call_dag(dag_name, {"sleep": [1]}, True)
        total_time.append(time.time() - start)
        expect(res == 1, f"the scaling DAG returned {res!r}, not 1")
    return total_time
