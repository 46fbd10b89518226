"""An all-in-one node on ws:// with executor processes: the sync client goes straight
to its executors, which listen on ws:// too (clients go direct only over their own
scheme)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from droplet import DropletConnection
from droplet.client._blocking import BlockingClient
from droplet.testing.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow

TIMEOUT = 20.0


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    with start_node("--executors", "2", "--data-dir", ":memory:",
                    listen="ws://127.0.0.1:0", log_path=tmp_path / "node.log") as running:
        yield running


def test_ws_calls_go_straight_to_ws_executors(node: NodeProcess) -> None:
    def pid(_: Any, x: Any = None) -> int:
        import os

        return os.getpid()

    assert node.url.startswith("ws://")
    with DropletConnection(node.url, timeout=TIMEOUT) as conn:
        backend = conn._backend
        assert isinstance(backend, BlockingClient)
        f = conn.register(pid, "ws_where")
        conn.register(lambda _, x: x + 1, "ws_inc")
        seen = {x.get() for x in [f(i) for i in range(10)]}  # concurrent: spread
        placed = backend.direct.placed("ws_where")
        assert len(placed) == 2 and all(url.startswith("ws://") for url in placed)
        assert len(seen) == 2 and node.pid not in seen  # both worker processes answered
        future = f(1)
        assert future._inner._peer is not backend.kvs  # sent to an executor
        value = future.get()
        assert conn.get_object(future.obj_id) == value  # and the key was written
        conn.register_dag("ws_dag", ["ws_where", "ws_inc"], [("ws_where", "ws_inc")])
        assert conn.call_dag("ws_dag", {"ws_where": 1}).get() in {p + 1 for p in seen}
        assert conn.call_dag("ws_dag", {"ws_where": 1}, direct_response=True) in {
            p + 1 for p in seen}
