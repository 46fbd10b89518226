"""Cloudburst's ``locality`` benchmark: a function over ten KVS references.

Ported from ``cloudburst/server/benchmarks/locality.py`` with
``CloudburstReference`` renamed ``DropletReference`` and smaller arrays
(``OSIZE``) so it runs in a test. The "hot" run checks each result against
the average computed here (upstream only checked the first call).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from _checks import expect

from droplet import DropletReference

OSIZE = 1000


def run(cloudburst_client: Any, num_requests: int, create: bool) -> list[float]:
    dag_name = "locality"
    kvs_key = "LOCALITY_OIDS"

    if create:
        def dot(cloudburst: Any, v1: Any, v2: Any, v3: Any, v4: Any, v5: Any, v6: Any,
                v7: Any, v8: Any, v9: Any, v10: Any) -> Any:
            import numpy as np

            s1 = np.add(np.add(v1, v2), np.add(v3, v4))
            s2 = np.add(np.add(v5, v6), np.add(v7, v8))
            return np.average(np.add(np.add(s1, s2), np.add(v9, v10)))

        cloud_dot = cloudburst_client.register(dot, "dot")
        expect(cloud_dot, "registering dot failed")

        refs: tuple[DropletReference, ...] = ()
        for _ in range(10):
            key = str(uuid.uuid4())
            cloudburst_client.put_object(key, np.zeros(OSIZE))
            refs += (DropletReference(key, True),)
        dot_test = cloud_dot(*refs).get()
        expect(dot_test == 0.0, f"dot of zeros gave {dot_test!r}")

        success, error = cloudburst_client.register_dag(dag_name, ["dot"], [])
        expect(success, f"register_dag failed: {error}")

        oid = str(uuid.uuid4())
        cloudburst_client.put_object(oid, np.random.randn(OSIZE))
        cloudburst_client.put_object(kvs_key, [oid])
        return []

    oids = cloudburst_client.get_object(kvs_key)
    expected = 10 * float(np.average(cloudburst_client.get_object(oids[0])))
    total_time = []
    for _ in range(num_requests):
        arg_map = {"dot": [DropletReference(oids[0], True) for _ in range(10)]}
        start = time.time()
        result = cloudburst_client.call_dag(dag_name, arg_map, True)
        total_time.append(time.time() - start)
        expect(np.isclose(result, expected), f"dot gave {result!r}, not {expected!r}")
    return total_time
