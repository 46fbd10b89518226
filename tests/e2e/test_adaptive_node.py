"""Adaptive executors on a real node: ``--executors 1:2`` grows under a queue, then shrinks.

Socket test: every wait is bounded by a deadline on a polling loop; nothing
asserts a duration.
"""

from __future__ import annotations

import functools
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from droplet import DropletConnection
from droplet.status import ClusterStatus
from droplet.testing.nodes import poll_until, start_node

pytestmark = pytest.mark.slow

TIMEOUT = 60.0


_until = functools.partial(poll_until, timeout=TIMEOUT, interval=0.05)


def _scaling(cloud: DropletConnection) -> Any:
    status: ClusterStatus = cloud.status()
    assert status.scaling is not None
    return status.scaling


def test_node_grows_to_max_under_load_and_shrinks_when_idle(tmp_path: Path) -> None:
    with start_node("--executors", "1:2", "--threads", "1", "--data-dir", ":memory:",
                    "--report-interval", "0.1", "--scale-up-after", "0.2",
                    "--scale-down-after", "1", "--metrics-listen", "tcp://127.0.0.1:0",
                    log_path=tmp_path / "node.log") as node, \
            DropletConnection(node.url, timeout=TIMEOUT) as cloud:
        metrics_url = node.wait_for_log(r"droplet metrics at (\S+)").group(1)
        assert _scaling(cloud).current == 1

        def slow(_: Any, x: int) -> int:
            import time

            time.sleep(0.2)
            return x + 1

        fn = cloud.register(slow, "adaptive_slow")
        futures = [fn(i) for i in range(10)]  # one thread: nine of them queue

        def grown() -> bool:
            status = cloud.status()
            assert status.scaling is not None
            if status.scaling.current < 2:
                if status.queued < 3:
                    futures.append(fn(len(futures)))  # keep calls queueing until it grows
                return False
            return True

        _until(grown, "a second executor")
        assert len(cloud.status().executors) == 2
        assert [f.get(timeout=TIMEOUT) for f in futures] == list(range(1, len(futures) + 1))
        _until(lambda: _scaling(cloud).current == 1 and not _scaling(cloud).draining,
               "the idle executor stopping")
        scaling = _scaling(cloud)
        assert [e.direction for e in scaling.events] == ["up", "down"]
        assert (scaling.scale_ups, scaling.scale_downs) == (1, 1)
        with urllib.request.urlopen(metrics_url, timeout=TIMEOUT) as reply:
            text = reply.read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert samples[("droplet_executors_min", ())] == 1
        assert samples[("droplet_executors_max", ())] == 2
        assert samples[("droplet_executors_running", ())] == 1
        assert samples[("droplet_executor_scale_events_total", (("direction", "up"),))] == 1
        assert samples[("droplet_executor_scale_events_total", (("direction", "down"),))] == 1
        assert fn(41).get(timeout=TIMEOUT) == 42  # still serving
        assert "disappeared" not in node.log_text()  # drained, not lost


def test_executor_node_with_min_max_scales_its_worker_processes(tmp_path: Path) -> None:
    """``--role executor --executors 1:2``: workers join a remote scheduler, scaled and drained."""
    token = "adaptive-s3cret"
    fast = ("--report-interval", "0.1", "--scale-up-after", "0.2", "--scale-down-after", "1")
    with start_node(role="kvs", log_path=tmp_path / "kvs.log", token=token) as kvs, \
            start_node("--kvs", kvs.url, "--report-interval", "0.1", role="scheduler",
                       log_path=tmp_path / "scheduler.log", token=token) as scheduler, \
            start_node("--scheduler", scheduler.url, "--executors", "1:2", "--threads", "1",
                       "--metrics-listen", "tcp://127.0.0.1:0", *fast, role="executor",
                       listen=None, log_path=tmp_path / "executor.log",
                       token=token) as executor, \
            DropletConnection(scheduler.url, token=token, timeout=TIMEOUT) as cloud:
        assert len(cloud.status().executors) == 1

        def slow(_: Any, x: int) -> int:
            import time

            time.sleep(0.2)
            return -x

        fn = cloud.register(slow, "adaptive_remote_slow")
        futures = [fn(i) for i in range(10)]

        def grown() -> bool:
            status = cloud.status()
            if len(status.executors) < 2:
                if status.queued < 3:
                    futures.append(fn(len(futures)))
                return False
            return True

        _until(grown, "a second worker joining the scheduler")
        assert [f.get(timeout=TIMEOUT) for f in futures] == [-i for i in range(len(futures))]
        _until(lambda: len(cloud.status().executors) == 1, "the idle worker stopping")
        scheduler.wait_for_log(r"executor \S+ drained and retired")
        # The executor node's scaling shows in the cluster's status.
        (pool,) = _until(lambda: cloud.status().pools if any(
            p.scale_downs for p in cloud.status().pools) else None,
            "the executor node's scaling in the status")
        assert (pool.minimum, pool.maximum, pool.current) == (1, 2, 1)
        assert [e.direction for e in pool.events] == ["up", "down"]
        assert pool.node.startswith("tcp://127.0.0.1:")
        assert cloud.status().scaling is None  # the scheduler's own node has no executors
        metrics_url = executor.wait_for_log(r"droplet metrics at (\S+)").group(1)
        with urllib.request.urlopen(metrics_url, timeout=TIMEOUT) as reply:
            text = reply.read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert samples[("droplet_executors_max", ())] == 2
        assert samples[("droplet_executor_scale_events_total", (("direction", "down"),))] == 1
        assert fn(7).get(timeout=TIMEOUT) == -7
        assert "disappeared" not in scheduler.log_text()
        for proc in (executor, scheduler, kvs):
            assert proc.stop() == 0, proc.log_text()
            assert "Traceback" not in proc.log_text(), proc.log_text()
