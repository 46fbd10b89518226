"""Cloudburst's ``centr_avg`` benchmark: followers store values, a leader averages them.

Ported from ``cloudburst/server/benchmarks/centr_avg.py``. Upstream never
checked the leader's answer; here the followers' values (each returns
``(key, id, value)``) are compared with it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from _checks import expect


def run(cloudburst_client: Any, num_requests: int) -> list[float]:
    def follower(cloudburst: Any, exec_id: str, my_id: int) -> tuple[str, int, int]:
        import random

        val = random.randint(0, 100)
        key = "%s-%d" % (exec_id, my_id)
        cloudburst.put(key, val)
        return key, my_id, val

    def leader(cloudburst: Any, exec_id: str, num_execs: int) -> float:
        values = []
        for i in range(num_execs):
            key = "%s-%d" % (exec_id, i)
            result = cloudburst.get(key)
            while result is None:
                result = cloudburst.get(key)
            values.append(result)

        import numpy as np

        return float(np.mean(values))

    cloud_follow = cloudburst_client.register(follower, "follower")
    cloud_lead = cloudburst_client.register(leader, "leader")
    expect(cloud_follow and cloud_lead, "registering follower and leader failed")

    n = 5
    latencies = []
    for _ in range(num_requests):
        start = time.time()
        uid = str(uuid.uuid4())
        followers = [cloud_follow(uid, i) for i in range(n)]
        result = cloud_lead(uid, n).get()
        latencies.append(time.time() - start)
        values = [f.get()[2] for f in followers]
        expect(np.isclose(result, np.mean(values)),
               f"the leader's average {result!r} is not the mean of {values!r}")
    return latencies
