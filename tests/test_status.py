"""Issue 10, status view, embedded: conn.status(), list_dags(), reports, metrics, the CLI."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

import droplet
from droplet.cli import main as cli_main
from droplet.errors import ProtocolError
from droplet.latency import BUCKETS
from droplet.links import connect_peer
from droplet.protocol.messages import ExecutorReport


async def _calls_reported(cloud: Any, name: str, calls: int) -> droplet.ClusterStatus:
    """Wait (in virtual or real time) until the reports have counted ``calls`` of ``name``."""
    while True:
        status = await cloud.status()
        found = status.function(name)
        if found is not None and found.calls >= calls:
            return status
        await trio.sleep(0.05)


async def test_status_after_calls_in_virtual_time(
        mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0

    async def double(_: Any, x: int) -> int:
        return 2 * x

    async def boom(_: Any) -> None:
        raise ValueError("no")

    async with droplet.open_local_cluster(executors=2, report_interval=0.5) as cluster:
        async with cluster.client() as cloud:
            f = await cloud.register(double, "double")
            b = await cloud.register(boom, "boom")
            await cloud.register_dag("twice", ["double"], [])
            await cloud.put_object("k", 21)
            for i in range(10):
                assert await (await f(i)).get() == 2 * i
            assert await (await cloud.exec_func("double", [droplet.DropletReference("k")])
                          ).get() == 42
            with pytest.raises(droplet.FunctionError):
                await (await b()).get()
            assert await cloud.list_dags() == ["twice"]
            with trio.fail_after(30):
                status = await _calls_reported(cloud, "double", 11)
                status = await _calls_reported(cloud, "boom", 1)
            assert isinstance(status, droplet.ClusterStatus)
            assert [fn.name for fn in status.functions] == ["boom", "double"]
            double_status = status.function("double")
            assert double_status is not None
            assert double_status.calls == 11 and double_status.failures == 0
            assert double_status.p50 is not None and double_status.p99 is not None
            assert double_status.p50 <= double_status.p99
            assert sum(double_status.latency_buckets) == 11
            assert 0 < double_status.calls_per_second <= 11 / status.rate_window
            boom_status = status.function("boom")
            assert boom_status is not None and boom_status.failures == 1
            assert len(status.executors) == 2
            assert all(e.threads == 32 and e.busy == 0 for e in status.executors)
            # the reference was read once through one executor's cache
            assert sum(e.cache_misses for e in status.executors) == 1
            assert status.cache_bytes > 0
            assert status.dags == ("twice",)
            with pytest.raises(AttributeError):
                status.dags = ()  # type: ignore[misc]


async def test_a_report_from_a_client_is_refused_and_the_link_still_works() -> None:
    async with droplet.open_local_cluster(executors=1) as cluster:
        async with trio.open_nursery() as nursery:
            peer = await connect_peer(cluster.address, nursery)
            fake = ExecutorReport(cluster.node.executors[0].url, 1, 0, 0, 0, 0, 0, 0, 0,
                                  ["x"], [1], [0], [1] + [0] * (BUCKETS - 1), [5])
            with pytest.raises(ProtocolError, match="not it"):
                await peer.request(fake, 10)
            async with cluster.client() as cloud:
                status = await cloud.status()
                assert status.functions == () and len(status.executors) == 1
            await peer.aclose()
            nursery.cancel_scope.cancel()


def test_sync_connection_status_and_list_dags() -> None:
    with droplet.LocalCluster(executors=1, report_interval=0.05) as cluster:
        conn = cluster.connect(timeout=20)
        inc = conn.register(lambda _, x: x + 1, "inc")
        conn.register_dag("b_dag", ["inc"], [])
        conn.register_dag("a_dag", ["inc"], [])
        assert inc(1).get() == 2
        assert conn.list_dags() == ["a_dag", "b_dag"]
        status = conn.status()
        assert status.dags == ("a_dag", "b_dag")
        assert [f.name for f in status.functions] == ["inc"]
        assert status.executors[0].threads == 32


async def test_cli_and_metrics_against_an_embedded_tcp_cluster(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with droplet.open_local_cluster(executors=1, listen="tcp://127.0.0.1:0",
                                          metrics_listen="tcp://127.0.0.1:0",
                                          report_interval=0.05) as cluster:
        async with cluster.client() as cloud:
            f = await cloud.register(lambda _, x: x, "echo")
            for i in range(3):
                assert await (await f(i)).get() == i
            with trio.fail_after(30):
                await _calls_reported(cloud, "echo", 3)
        code = await trio.to_thread.run_sync(cli_main, ["status", cluster.address])
        out = capsys.readouterr().out
        assert code == 0
        assert cluster.address in out
        echo = next(line for line in out.splitlines() if line.startswith("echo "))
        assert echo.split()[1] == "3"
        code = await trio.to_thread.run_sync(cli_main, ["status", "--json", cluster.address])
        data = json.loads(capsys.readouterr().out)
        assert code == 0 and data["functions"][0]["name"] == "echo"
        assert data["functions"][0]["calls"] == 3
        # without a URL: the node start-local recorded (here, this process)
        monkeypatch.setenv("DROPLET_HOME", str(tmp_path))
        (tmp_path / "node.pid").write_text(f"{os.getpid()}\n{cluster.address}\n")
        code = await trio.to_thread.run_sync(cli_main, ["status", "--json"])
        assert code == 0 and json.loads(capsys.readouterr().out)["functions"][0]["calls"] == 3

        url = cluster.node.metrics_url
        assert url is not None and url.startswith("tcp://127.0.0.1:")

        def scrape() -> str:
            with urllib.request.urlopen(f"http{url[3:]}/metrics", timeout=20) as reply:
                return reply.read().decode()

        with trio.fail_after(30):
            text = await trio.to_thread.run_sync(scrape)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert samples[("droplet_function_calls_total", (("function", "echo"),))] == 3
        assert samples[("droplet_function_latency_seconds_count", (("function", "echo"),))] == 3
        assert samples[("droplet_executors", ())] == 1
        assert samples[("droplet_connections", ())] >= 1


def test_cli_status_without_a_node_names_the_address(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    from droplet.testing.nodes import free_port

    url = f"tcp://127.0.0.1:{free_port()}"
    assert cli_main(["status", "--timeout", "5", url]) == 1
    err = capsys.readouterr().err
    assert url in err and "droplet status" in err


def test_metrics_beyond_loopback_need_a_token() -> None:
    with pytest.raises(ValueError, match="refusing to serve metrics on tcp://0.0.0.0:9100"):
        droplet.LocalCluster(executors=1, metrics_listen="tcp://0.0.0.0:9100")
    with pytest.raises(ValueError, match="tcp://"):
        droplet.LocalCluster(executors=1, metrics_listen="ws://127.0.0.1:9100")


async def test_metrics_server_bounds_request_heads_and_concurrent_scrapes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from droplet import metrics
    from droplet.transports.registry import parse_address

    class _Bare:
        scheduler = None
        executors: list[Any] = []

    monkeypatch.setattr(metrics, "MAX_SCRAPES", 1)
    registry = metrics.metrics_registry(_Bare(), lambda: 0)

    async def exchange(port: int, data: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            reply = b""
            while chunk := await stream.receive_some(65536):
                reply += chunk
            return reply

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(metrics.serve_metrics, "tcp://127.0.0.1:0", registry)
            port = parse_address(url)[2]
            assert port
            huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10_000
            assert (await exchange(port, huge)).startswith(b"HTTP/1.1 431")
            # one scrape stalls mid-head: the next one is turned away, not queued
            stalled = await trio.open_tcp_stream("127.0.0.1", port)
            await stalled.send_all(b"GET /metrics HTTP/1.1\r\n")
            # (until the server has taken the stalled one, a scrape still gets a 200)
            while True:
                reply = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
                if reply.startswith(b"HTTP/1.1 503"):
                    break
                await trio.sleep(0.05)
            await stalled.send_all(b"\r\n")
            reply = b""
            while chunk := await stalled.receive_some(65536):
                reply += chunk
            await stalled.aclose()
            assert reply.startswith(b"HTTP/1.1 200") and b"droplet_connections 0.0" in reply
            nursery.cancel_scope.cancel()
