"""Cloudburst's ``predserving`` benchmark: preprocess, three models, average.

Ported from ``cloudburst/server/benchmarks/predserving.py``. scikit-image's
Gaussian filter and torchvision's SqueezeNet are replaced by small numpy
stand-ins of the same shape of work (an image filter, a fixed-weight model),
and images are 1 x 16 x 16 x 3. Registration, references and the
direct-response DAG call are as upstream; the DAG's answer is checked
against the same computation done here.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from _checks import expect

from droplet import DropletReference

SIDE = 16


def run(cloudburst_client: Any, num_requests: int) -> list[float]:
    def preprocess(cloudburst: Any, inp: Any) -> Any:
        # stand-in for skimage.filters.gaussian: a 3-tap blur along each image row
        import numpy as np

        blurred = (np.roll(inp, 1, axis=2) + 2 * inp + np.roll(inp, -1, axis=2)) / 4
        return blurred.reshape(1, 3, SIDE, SIDE)

    def sqnet(cloudburst: Any, inp: Any) -> Any:
        # stand-in for torchvision's squeezenet1_1: fixed weights, 10 classes
        import numpy as np

        weights = np.random.default_rng(1).standard_normal((inp.size, 10))
        scores = inp.reshape(1, -1).astype(np.float32) @ weights
        return np.exp(scores) / np.exp(scores).sum()

    def average(cloudburst: Any, inp1: Any, inp2: Any, inp3: Any) -> Any:
        import numpy as np

        return np.mean([inp1, inp2, inp3], axis=0)

    cloud_prep = cloudburst_client.register(preprocess, "preprocess")
    cloud_sqnet1 = cloudburst_client.register(sqnet, "sqnet1")
    cloud_sqnet2 = cloudburst_client.register(sqnet, "sqnet2")
    cloud_sqnet3 = cloudburst_client.register(sqnet, "sqnet3")
    cloud_average = cloudburst_client.register(average, "average")
    expect(all([cloud_prep, cloud_sqnet1, cloud_sqnet2, cloud_sqnet3, cloud_average]),
           "registration failed")

    arr = np.random.randn(1, SIDE, SIDE, 3)
    prep_test = cloud_prep(arr).get()
    expect(type(prep_test) is np.ndarray, f"preprocess gave {prep_test!r}")
    tests = [f(prep_test).get() for f in (cloud_sqnet1, cloud_sqnet2, cloud_sqnet3)]
    for t in tests:
        expect(type(t) is np.ndarray and t.shape == (1, 10), f"sqnet gave {t!r}")
    average_test = cloud_average(*tests).get()
    expect(type(average_test) is np.ndarray, f"average gave {average_test!r}")

    functions = ["preprocess", "sqnet1", "sqnet2", "sqnet3", "average"]
    connections = [("preprocess", "sqnet1"), ("preprocess", "sqnet2"),
                   ("preprocess", "sqnet3"), ("sqnet1", "average"),
                   ("sqnet2", "average"), ("sqnet3", "average")]
    success, error = cloudburst_client.register_dag("pred_serving", functions, connections)
    expect(success, f"register_dag failed: {error}")

    oids = []
    inputs = []
    for _ in range(num_requests):
        arr = np.random.randn(1, SIDE, SIDE, 3)
        oid = str(uuid.uuid4())
        cloudburst_client.put_object(oid, arr)
        oids.append(oid)
        inputs.append(arr)

    total_time = []
    for oid, arr in zip(oids, inputs, strict=True):
        arg_map = {"preprocess": [DropletReference(oid, True)]}
        start = time.time()
        result = cloudburst_client.call_dag("pred_serving", arg_map, True)
        total_time.append(time.time() - start)
        scores = sqnet(None, preprocess(None, arr))
        expect(np.allclose(result, scores), "the DAG's prediction differs from a local one")
    return total_time
