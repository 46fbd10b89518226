"""Big arguments and results between real node processes (issue 9).

A node with two executor processes and the ``spread`` policy, so a pipeline's
steps run in different processes and a big result crosses from one executor
to the next over TCP (gathered on the way out, received in place on the way
in). The bytes are checked here; benchmarks/ measures the speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from droplet import DropletConnection
from droplet.testing.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow

TIMEOUT = 60.0
MIB = 1024 * 1024
DATA = bytes(range(256)) * (6 * MIB // 256)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    log = tmp_path_factory.mktemp("node") / "node.log"
    with start_node("--executors", "2", "--placement", "spread", log_path=log) as running:
        yield running
        assert "Traceback" not in running.log_text(), running.log_text()
    assert running.proc.returncode == 0, running.log_text()


def test_big_values_cross_executor_processes(node: NodeProcess) -> None:
    def identity(_: Any, x: Any) -> Any:
        return x

    def join(_: Any, suffix: bytes, x: bytes) -> int:
        return len(x) + len(suffix)

    def where(_: Any, x: Any) -> tuple[bytes, int]:
        import os

        return x, os.getpid()

    def pair(_: Any, data: bytes, pid: int) -> tuple[int, int, int]:  # a tuple spreads
        import os

        return len(data), pid, os.getpid()

    with DropletConnection(node.url, timeout=TIMEOUT) as cloud:
        for fn, name in [(identity, "bv_id"), (join, "bv_join"), (where, "bv_where"),
                         (pair, "bv_pair")]:
            cloud.register(fn, name)
        cloud.register_dag("bv_chain", ["bv_id", "bv_join"], [("bv_id", "bv_join")])
        cloud.register_dag("bv_procs", ["bv_where", "bv_pair"], [("bv_where", "bv_pair")])
        cloud.register_dag("bv_echo", ["bv_id"], [])
        for _ in range(3):
            # the sink's own big argument rides with the trigger the first function forwards
            result = cloud.call_dag("bv_chain", {"bv_id": DATA, "bv_join": DATA[:MIB]})
            assert result.get() == len(DATA) + MIB
        size, first, second = cloud.call_dag("bv_procs", {"bv_where": [DATA]}).get()
        assert size == len(DATA) and first != second  # the big result crossed processes
        assert cloud.call_dag("bv_echo", {"bv_id": DATA}).get() == DATA
        assert cloud.call_dag("bv_echo", {"bv_id": DATA}, direct_response=True) == DATA
        assert cloud.exec_func("bv_id", [bytearray(DATA)]).get() == bytearray(DATA)
