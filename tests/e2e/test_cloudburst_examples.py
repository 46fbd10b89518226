"""Every Cloudburst port in examples/cloudburst/ against a real ``python -m droplet.node``.

Each program checks its own results (raising AssertionError); the node must
log no traceback while serving them all.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import droplet
from droplet import DropletConnection
from droplet.testing.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow

pytest.importorskip("numpy")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cloudburst"


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cloudburst_run_all", EXAMPLES / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts examples/cloudburst on sys.path
    return module


RUN_ALL = _runner()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    log = tmp_path_factory.mktemp("node") / "node.log"
    with start_node("--executors", "2", log_path=log) as running:
        yield running
        assert "Traceback" not in running.log_text(), running.log_text()
    assert running.proc.returncode == 0, running.log_text()


@pytest.fixture(scope="module")
def cloud(node: NodeProcess) -> Iterator[DropletConnection]:
    with DropletConnection(node.url, "127.0.0.1", local=True, timeout=60) as conn:
        yield conn


@pytest.mark.parametrize("program", list(RUN_ALL.PROGRAMS))
def test_cloudburst_program_runs_unchanged(cloud: DropletConnection, program: str) -> None:
    RUN_ALL.run_program(program, cloud, 3)


def test_the_runner_reports_each_program(node: NodeProcess,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert RUN_ALL.main([node.url, "composition", "user_library"]) == 0
    out = capsys.readouterr().out
    assert "ok   composition" in out and "ok   user_library" in out


def test_gpu_functions_need_a_node_started_with_resources(
        cloud: DropletConnection, tmp_path: Path) -> None:
    cloud.register(lambda lib: lib.getid(), "gpu_where")
    cloud.register_dag("gpu_dag", ["gpu_where"], [], gpu_functions=["gpu_where"])
    with pytest.raises(droplet.DagError, match="--resources gpu=1"):
        cloud.call_dag("gpu_dag", {}, direct_response=True)
    with start_node("--executors", "1", "--resources", "gpu=1", "--max-batch", "4",
                    log_path=tmp_path / "gpu.log") as gpu_node:
        with DropletConnection(gpu_node.url, timeout=60) as gpu_cloud:
            gpu_cloud.register(lambda lib: lib.getid(), "gpu_where")
            gpu_cloud.register_dag("gpu_dag", ["gpu_where"], [], gpu_functions=["gpu_where"])
            assert gpu_cloud.call_dag("gpu_dag", {}, direct_response=True).startswith("tcp://")
