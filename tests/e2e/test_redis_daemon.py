"""Real node processes on one Redis: an all-in-one node and a ``kvs``-role storage node
(with its own scheduler and executor) share state through ``--storage redis://``.

Functions are defined in the test body (cloudpickled by value), because the
nodes' processes cannot import this module.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from droplet import DropletConnection
from droplet.testing.nodes import free_port, start_node
from droplet.testing.redis_servers import RedisServer

pytestmark = pytest.mark.slow

TIMEOUT = 20.0  # seconds: bounds every request and result wait


def test_two_droplet_deployments_front_one_redis(tmp_path: Path, redis_url: str,
                                                 redis_server: RedisServer) -> None:
    storage = ("--storage", redis_url)
    with start_node("--executors", "1", *storage, log_path=tmp_path / "all.log") as all_in_one, \
            start_node(*storage, role="kvs", log_path=tmp_path / "kvs.log") as kvs, \
            start_node("--kvs", kvs.url, role="scheduler",
                       log_path=tmp_path / "scheduler.log") as scheduler, \
            start_node("--scheduler", scheduler.url, role="executor", listen=None,
                       log_path=tmp_path / "executor.log") as executor:
        scheduler.wait_for_log("executor .* joined")
        with DropletConnection(all_in_one.url, timeout=TIMEOUT) as first, \
                DropletConnection(scheduler.url, timeout=TIMEOUT) as second:
            first.put_object("shared", "written through the all-in-one node")
            assert second.get_object("shared") == "written through the all-in-one node"

            def read(lib: Any, key: str) -> Any:
                return lib.get(key)

            reader = second.register(read, "read")
            assert reader("shared").get() == "written through the all-in-one node"
            first.put_object("shared", "changed")  # reaches the other executor's cache
            for _ in range(200):
                if reader("shared").get() == "changed":
                    break
            assert reader("shared").get() == "changed"
            # a call's result whose key is handed out, stored through the
            # kvs-role node, is in Redis too (until the connection closes)
            future = reader("shared")
            assert future.get() == "changed"
            assert first.get_object(future.obj_id) == "changed"
            keys = redis_server.cli("--scan", "--pattern", redis_url.split("prefix=")[1] + "*")
        assert "Redis at" in kvs.log_text()
        assert "shared" in keys and "__droplet/results/" in keys
        for proc in (executor, scheduler, kvs, all_in_one):
            assert proc.stop() == 0, proc.log_text()
            assert "Traceback" not in proc.log_text(), proc.log_text()


def test_start_local_on_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              redis_url: str, redis_server: RedisServer) -> None:
    from droplet.cli import main as cli_main

    monkeypatch.setenv("DROPLET_HOME", str(tmp_path))
    monkeypatch.delenv("DROPLET_TOKEN", raising=False)
    url = f"tcp://127.0.0.1:{free_port()}"
    pid_file = tmp_path / "node.pid"
    try:
        assert cli_main(["start-local", "--listen", url, "--executors", "1",
                         "--storage", redis_url]) == 0
        with DropletConnection(url, timeout=TIMEOUT) as cloud:
            cloud.put_object("kept-in-redis", 1)
        prefix = redis_url.split("prefix=")[1]
        assert redis_server.cli("EXISTS", f"{prefix}kept-in-redis") == "1"
        assert cli_main(["stop-local"]) == 0
        assert "Traceback" not in (tmp_path / "node.log").read_text()
    finally:
        if pid_file.exists():  # the test failed midway: leave nothing running
            try:
                os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
