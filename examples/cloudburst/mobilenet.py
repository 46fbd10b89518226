"""Cloudburst's ``mobilenet`` benchmark: a model class fed from the KVS.

Ported from ``cloudburst/server/benchmarks/mobilenet.py``
(``anna.lattices.LWWPairLattice`` -> ``droplet.lattices.LWWLattice``).
TensorFlow's MobileNet and scikit-image are replaced by numpy stand-ins:
the "model" is a weight matrix uploaded as bytes through ``kvs_client`` with
a JSON label map, exactly as upstream uploads its frozen graph.
Registration as ``(Mobilenet, (model_key, label_key))``, ``kvs_client``,
references and the direct-response calls are as upstream.

One documented difference: ``get(key, deserialize=False)`` returns the
stored lattice in Droplet, where Cloudburst returned the lattice's raw
payload, so the class calls ``.reveal()`` on it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import numpy as np
from _checks import expect

from droplet import DropletReference
from droplet.lattices import LWWLattice

SIDE = 8
CLASSES = ["cat", "dog", "bird", "fish"]


def run(cloudburst_client: Any, num_requests: int) -> list[float]:
    model_key = "mobilenet-model"
    label_key = "mobilenet-label-map"
    weights = np.random.default_rng(7).standard_normal((SIDE * SIDE * 3, len(CLASSES)))

    # upload the model object
    bts = json.dumps(dict(enumerate(CLASSES))).encode()
    cloudburst_client.kvs_client.put(label_key, LWWLattice(0, bts))
    cloudburst_client.kvs_client.put(model_key, LWWLattice(0, weights.tobytes()))

    def preprocess(cloudburst: Any, inp: Any) -> Any:
        import numpy as np

        return np.clip(inp, -2, 2).reshape(1, SIDE, SIDE, 3)

    class Mobilenet:
        def __init__(self, cloudburst: Any, model_key: str, label_map_key: str) -> None:
            import json

            import numpy as np

            self.model = cloudburst.get(model_key, deserialize=False).reveal()
            self.label_map = json.loads(cloudburst.get(label_map_key,
                                                       deserialize=False).reveal())
            self.weights = np.frombuffer(self.model).reshape(-1, len(self.label_map))

        def run(self, cloudburst: Any, img: Any) -> Any:
            import numpy as np

            scores = img.reshape(1, -1) @ self.weights
            return np.exp(scores) / np.exp(scores).sum()

    def average(cloudburst: Any, inp: Any) -> Any:
        import numpy as np

        return np.mean([inp], axis=0)

    cloud_prep = cloudburst_client.register(preprocess, "preprocess")
    cloud_mnet = cloudburst_client.register((Mobilenet, (model_key, label_key)), "mnet")
    cloud_average = cloudburst_client.register(average, "average")
    expect(cloud_prep and cloud_mnet and cloud_average, "registration failed")

    arr = np.random.randn(1, SIDE, SIDE, 3)
    prep_test = cloud_prep(arr).get()
    expect(type(prep_test) is np.ndarray, f"preprocess gave {prep_test!r}")
    mnet_test = cloud_mnet(prep_test).get()
    expect(type(mnet_test) is np.ndarray, f"mnet gave {mnet_test!r}")
    average_test = cloud_average(mnet_test).get()
    expect(type(average_test) is np.ndarray, f"average gave {average_test!r}")

    success, error = cloudburst_client.register_dag(
        "mnet", ["preprocess", "mnet", "average"],
        [("preprocess", "mnet"), ("mnet", "average")])
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
        result = cloudburst_client.call_dag("mnet", arg_map, True)
        total_time.append(time.time() - start)
        scores = np.clip(arr, -2, 2).reshape(1, -1) @ weights
        expect(np.allclose(result, np.exp(scores) / np.exp(scores).sum()),
               "the DAG's prediction differs from a local one")
    return total_time
