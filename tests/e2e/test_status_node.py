"""Issue 10 end to end: ``droplet status`` and ``--metrics-listen`` on a real node process.

Socket tests: every wait is bounded (connection timeouts, a deadline on the
polling loops) instead of a MockClock.
"""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from droplet import DropletConnection, DropletReference
from droplet.cli import main as cli_main
from droplet.testing.nodes import NodeProcess, poll_until, start_node

pytestmark = pytest.mark.slow

TIMEOUT = 20.0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    log = tmp_path_factory.mktemp("status-node") / "node.log"
    with start_node("--executors", "2", "--data-dir", ":memory:", "--report-interval", "0.1",
                    "--metrics-listen", "tcp://127.0.0.1:0", log_path=log) as running:
        yield running


def _metrics_url(node: NodeProcess) -> str:
    return node.wait_for_log(r"droplet metrics at (\S+)").group(1)


_until = functools.partial(poll_until, timeout=TIMEOUT, interval=0.05)


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_status_and_metrics_after_calls(node: NodeProcess,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with DropletConnection(node.url, timeout=TIMEOUT) as cloud:
        square = cloud.register(lambda _, x: x * x, "e2e_square")
        cloud.register_dag("e2e_dag", ["e2e_square"], [])
        cloud.put_object("e2e_key", 7)
        for i in range(5):
            assert square(i).get() == i * i
        assert cloud.exec_func("e2e_square", [DropletReference("e2e_key")]).get() == 49

        def counted() -> Any:
            status = cloud.status()
            found = status.function("e2e_square")
            return status if found is not None and found.calls == 6 else None

        status = _until(counted, "six calls reported")
        assert len(status.executors) == 2
        assert status.dags == ("e2e_dag",)
        assert sum(e.cache_misses for e in status.executors) == 1
        assert "e2e_dag" in cloud.list_dags()

    assert cli_main(["status", node.url]) == 0
    out = capsys.readouterr().out
    assert node.url in out
    row = next(line for line in out.splitlines() if line.startswith("e2e_square "))
    assert row.split()[1:3] == ["6", "0"]
    assert "e2e_dag" in out
    assert cli_main(["status", "--json", node.url]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["executors"]) == 2

    samples = _scrape(_metrics_url(node))
    square_label = (("function", "e2e_square"),)
    assert samples[("droplet_function_calls_total", square_label)] == 6
    assert samples[("droplet_function_failures_total", square_label)] == 0
    assert samples[("droplet_function_latency_seconds_count", square_label)] == 6
    assert samples[("droplet_function_latency_seconds_bucket",
                    (*square_label, ("le", "+Inf")))] == 6
    assert samples[("droplet_executors", ())] == 2
    assert sum(v for (name, _), v in samples.items() if name == "droplet_cache_misses_total") == 1
    assert ("droplet_connections", ()) in samples


def test_metrics_endpoint_refuses_other_paths(node: NodeProcess) -> None:
    url = _metrics_url(node)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url.replace("/metrics", "/admin"), timeout=TIMEOUT)
    assert info.value.code == 404
    info.value.close()
    # and the node still serves a call afterwards
    with DropletConnection(node.url, timeout=TIMEOUT) as cloud:
        assert cloud.register(lambda _, x: x, "e2e_after")(1).get() == 1


def test_status_and_metrics_of_a_multi_process_cluster(tmp_path: Path) -> None:
    token = "status-s3cret"
    metrics = ("--metrics-listen", "tcp://127.0.0.1:0", "--report-interval", "0.1")
    with start_node(role="kvs", log_path=tmp_path / "kvs.log", token=token) as kvs, \
            start_node("--kvs", kvs.url, *metrics, role="scheduler",
                       log_path=tmp_path / "scheduler.log", token=token) as scheduler, \
            start_node("--scheduler", scheduler.url, *metrics, role="executor", listen=None,
                       log_path=tmp_path / "executor.log", token=token) as executor:
        scheduler.wait_for_log(r"executor \S+ joined")
        with DropletConnection(scheduler.url, token=token, timeout=TIMEOUT) as cloud:
            cloud.put_object("mp_key", b"x" * 1000)
            reader = cloud.register(lambda _, v: len(v), "mp_len")
            for _ in range(3):
                assert reader(DropletReference("mp_key")).get() == 1000

            def reported() -> Any:
                status = cloud.status()
                found = status.function("mp_len")
                return status if found is not None and found.calls == 3 else None

            status = _until(reported, "three calls reported")
            (only,) = status.executors
            assert only.url == executor.url
            assert (only.cache_misses, only.cache_hits) == (1, 2)
            assert only.cache_bytes >= 1000
        # the executor node exports its own executor; the scheduler the cluster
        local = _scrape(_metrics_url(executor))
        assert local[("droplet_cache_hits_total", (("executor", executor.url),))] == 2
        assert not any(name.startswith("droplet_function") for name, _ in local)
        cluster = _scrape(_metrics_url(scheduler))
        assert cluster[("droplet_function_calls_total", (("function", "mp_len"),))] == 3
        assert cluster[("droplet_executors", ())] == 1
        assert cluster[("droplet_connections", ())] >= 1
        for proc in (executor, scheduler, kvs):
            assert proc.stop() == 0, proc.log_text()
            assert "Traceback" not in proc.log_text(), proc.log_text()


def test_metrics_beyond_loopback_without_token_is_refused(tmp_path: Path) -> None:
    from droplet.testing.nodes import run_node_command

    result = run_node_command(["--listen", "tcp://127.0.0.1:0", "--data-dir", ":memory:",
                               "--metrics-listen", "tcp://0.0.0.0:0"])
    assert result.returncode == 2
    assert "refusing to serve metrics on tcp://0.0.0.0:0" in result.stderr
