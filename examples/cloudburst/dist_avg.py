"""Cloudburst's ``dist_avg`` benchmark: gossip averaging with send/recv.

Ported from ``cloudburst/server/benchmarks/dist_avg.py``
(``anna.lattices.LWWPairLattice`` -> ``droplet.lattices.LWWLattice``). Two
changes to the function, each a documented difference:

- ``get(keyset, deserialize=False)``: Droplet's ``get`` returns the value an
  LWW lattice holds (the pickled id here); upstream's returned the lattice,
  which the function then ``reveal()``-ed. ``deserialize=False`` gives the
  lattice, so the rest is unchanged.
- ``random.sample(sorted(procs), 1)``: Python 3.11 no longer samples sets.

Upstream printed the error of the estimates; each estimate is a weighted
average of the inputs (push-sum moves value and weight together), so it
must lie between their minimum and maximum, which is what is checked.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from _checks import expect


def run(cloudburst_client: Any, num_requests: int) -> list[float]:
    def avg(cloudburst: Any, uid: str, eid: int, num_execs: int, val: int) -> float:
        import random
        import time

        import cloudpickle as cp
        import numpy as np

        from droplet.lattices import LWWLattice

        myid = cloudburst.getid()
        key = "%s:%d" % (uid, eid)
        cloudburst.put(key, LWWLattice(0, cp.dumps(myid)))

        procs = set()
        keyset = []
        for i in range(num_execs):
            if i == eid:
                continue
            keyset.append("%s:%d" % (uid, i))

        locs = cloudburst.get(keyset, deserialize=False)
        while None in locs.values():
            locs = cloudburst.get(keyset, deserialize=False)
        for key in locs:
            procs.add(cp.loads(locs[key].reveal()))

        curr_val = val
        curr_weight = 1
        curr_avg = None
        val_msgs = [curr_val]
        weight_msgs = [curr_weight]
        rounds = 0
        while rounds < 5:
            curr_val = np.sum(val_msgs)
            curr_weight = np.sum(weight_msgs)

            dst = random.sample(sorted(procs), 1)[0]
            cloudburst.send(dst, cp.dumps((curr_val * 0.5, curr_weight * 0.5)))

            val_msgs.clear()
            weight_msgs.clear()
            val_msgs.append(curr_val * 0.5)
            weight_msgs.append(curr_weight * 0.5)

            start = time.time()
            while time.time() - start < 0.1:
                for msg in cloudburst.recv():
                    body = cp.loads(msg[1])
                    val_msgs.append(body[0])
                    weight_msgs.append(body[1])

            curr_avg = curr_val / curr_weight
            rounds += 1
        return float(curr_avg)

    cloud_avg = cloudburst_client.register(avg, "avg")
    expect(cloud_avg, "registering avg failed")

    n = 10
    latencies = []
    for _ in range(num_requests):
        start = time.time()
        uid = str(uuid.uuid4())
        vals = [int(v) for v in np.random.randint(100, size=n)]
        futures = [cloud_avg(uid, i, n, vals[i]) for i in range(n)]
        results = [f.get() for f in futures]
        latencies.append(time.time() - start)
        for r in results:
            expect(min(vals) - 1e-9 <= r <= max(vals) + 1e-9,
                   f"estimate {r!r} is outside the inputs' range {vals!r}")
        print("dist_avg: mean %.3f, mean of estimates %.3f" % (np.mean(vals), np.mean(results)))
    return latencies
