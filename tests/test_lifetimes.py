"""Issue 7: every thread, task and child process is owned by a service and ends with it.

Embedded: worker threads end with their LocalCluster, and a sync function that
never returns delays ``close()`` by the grace period only. Real processes
(slow): executor workers exit when their node is SIGKILLed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import droplet
from droplet.executor import threads as worker_threads
from droplet.testing.nodes import start_node

TIMEOUT = 30.0


def _wait_until(condition: Any, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def _worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("droplet-worker")]


def _sleepy(_: Any, x: int) -> int:
    time.sleep(0.01)  # keeps threads busy so each executor starts more than one
    return x


def test_worker_threads_end_with_their_cluster() -> None:
    """Regression: WorkerThreads.close() was never called; five LocalClusters in a
    row left their worker threads behind (3 -> 13 threads)."""
    before = len(_worker_threads())
    for _ in range(5):
        with droplet.LocalCluster(2, placement="spread") as cluster:
            cloud = cluster.connect()
            fn = cloud.register(_sleepy, "sleepy")
            futures = [fn(i) for i in range(8)]
            assert [f.get() for f in futures] == list(range(8))
            assert len(_worker_threads()) > before
    assert _wait_until(lambda: len(_worker_threads()) == before), _worker_threads()


_RELEASE = threading.Event()


def stuck(_: Any) -> str:
    _RELEASE.wait()  # the test lets it go at the end, so no thread outlives it
    return "late"


def test_a_function_that_never_returns_delays_close_only_by_the_grace_period(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Regression: one stuck sync function blocked LocalCluster.close() forever."""
    monkeypatch.setattr(worker_threads, "SHUTDOWN_GRACE", 0.2)
    _RELEASE.clear()
    closer: threading.Thread | None = None
    try:
        cluster = droplet.LocalCluster(1)
        cloud = cluster.connect()
        cloud.register(stuck, "stuck")()
        executor = cluster.node.executors[0]
        assert _wait_until(lambda: executor.statistics().running == 1)
        with caplog.at_level(logging.WARNING, logger="droplet.executor"):
            closer = threading.Thread(target=cluster.close)
            closer.start()
            closer.join(TIMEOUT)
            assert not closer.is_alive(), "close() waited for the stuck function"
        assert "stuck is still running" in caplog.text
        assert "abandoning its thread" in caplog.text
        assert executor.statistics().abandoned_threads == 1
    finally:
        _RELEASE.set()
        if closer is not None:
            closer.join(TIMEOUT)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found.extend(int(p) for p in text.split())
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_executor_workers_exit_when_their_node_is_killed(tmp_path: Path) -> None:
    """Regression: executor children kept running after their node was SIGKILLed."""
    with start_node("--executors", "2", log_path=tmp_path / "node.log") as node:
        workers = _children(node.pid)
        assert len(workers) == 2, node.log_text()
        os.kill(node.pid, signal.SIGKILL)  # the node only, not its process group
        assert _wait_until(lambda: not any(_alive(w) for w in workers)), node.log_text()
        assert "the node that started this executor worker is gone" in node.log_text()
