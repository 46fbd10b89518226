"""Issue 10, status view: executor reports, their aggregation, the status record. No I/O."""

from __future__ import annotations

import math

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from droplet.errors import ProtocolError
from droplet.executor.reports import CallRecorder, Load, _Reporter
from droplet.latency import BUCKETS, LATENCY_BOUNDS, bucket_of, quantile
from droplet.metrics import answer, metrics_registry
from droplet.protocol.messages import ExecutorReport, InvalidMessage, decode, encode
from droplet.scheduler.reports import ClusterView
from droplet.status import ClusterStatus, ExecutorStatus, FunctionStatus, format_status

# --------------------------------------------------------------------------- latency


def test_bucket_bounds_are_inclusive_and_overflow_is_last() -> None:
    assert bucket_of(0.0) == 0
    assert bucket_of(LATENCY_BOUNDS[0]) == 0
    assert bucket_of(LATENCY_BOUNDS[0] * 1.01) == 1
    assert bucket_of(LATENCY_BOUNDS[-1] * 2) == BUCKETS - 1


def test_quantiles_from_buckets() -> None:
    counts = [0] * BUCKETS
    assert quantile(counts, 0.5) is None
    for _ in range(98):
        counts[bucket_of(0.002)] += 1
    counts[bucket_of(0.2)] += 2
    assert quantile(counts, 0.5) == 0.0025
    assert quantile(counts, 0.99) == 0.25
    counts[-1] += 100
    assert quantile(counts, 0.99) == math.inf
    with pytest.raises(ValueError, match="quantile"):
        quantile(counts, 1.5)


# --------------------------------------------------------------------------- executor side


def _load(hits: int = 0, misses: int = 0) -> Load:
    return Load(threads=4, busy=1, queued=2, running=3, cache_entries=5, cache_bytes=600,
                cache_hits=hits, cache_misses=misses)


def test_recorder_reports_deltas_and_resets() -> None:
    recorder = CallRecorder()
    reporter = _Reporter("tcp://e1", recorder)
    recorder.record("f", 0.003, False)
    recorder.record("f", 0.003, True)
    recorder.record("a", 0.00005, False)
    first = reporter.build(_load(hits=7, misses=3))
    assert first.functions == ["a", "f"]
    assert first.calls == [1, 2] and first.failures == [0, 1]
    assert len(first.latency) == 2 * BUCKETS
    assert first.latency[bucket_of(0.00005)] == 1
    assert first.latency[BUCKETS + bucket_of(0.003)] == 2
    assert first.latency_us == [50, 6000]
    assert (first.cache_hits, first.cache_misses) == (7, 3)
    # the report survives the wire (and its decode-time checks)
    assert decode(encode(first))[0] == first
    second = reporter.build(_load(hits=9, misses=3))
    assert second.functions == [] and (second.cache_hits, second.cache_misses) == (2, 0)
    assert (second.busy, second.queued, second.cache_bytes) == (1, 2, 600)


def _report(url: str = "tcp://e1", **changes: object) -> ExecutorReport:
    base = ExecutorReport(url, 4, 1, 0, 1, 2, 300, 3, 1, ["f"], [2], [1],
                          [0] * (BUCKETS - 2) + [2, 0], [4_000_000])
    return attrs.evolve(base, **changes)


@pytest.mark.parametrize(("changes", "problem"), [
    ({"calls": [2, 3]}, "calls for 1 functions"),
    ({"latency": [0] * 3}, "latency for 1 functions"),
    ({"failures": [3]}, "more failures than calls"),
    ({"busy": -1}, "busy must not be negative"),
    ({"calls": [-2]}, "must not be negative"),
    ({"latency": [1] + [0] * (BUCKETS - 1)}, "do not add up"),
    ({"functions": ["f", "f"], "calls": [0, 0], "failures": [0, 0],
      "latency": [0] * (2 * BUCKETS), "latency_us": [0, 0]}, "named twice"),
])
def test_bad_reports_are_refused_at_decode(changes: dict[str, object], problem: str) -> None:
    with pytest.raises(InvalidMessage, match=problem):
        decode(encode(_report(**changes)))


# --------------------------------------------------------------------------- aggregation


def test_view_adds_up_reports_from_several_executors() -> None:
    view = ClusterView(rate_window=10.0)
    view.join("tcp://e1", 4)
    view.join("tcp://e2", 4)
    assert view.report(_report("tcp://e1"), now=1.0)
    assert view.report(_report("tcp://e2", busy=3, cache_hits=1, cache_misses=1), now=1.5)
    assert view.report(_report("tcp://e1", busy=0, cache_hits=0, cache_misses=0), now=2.0)
    status = view.status("sched", ["f", "g"], ["dag"], now=3.0)
    f = status.function("f")
    assert f is not None and (f.calls, f.failures) == (6, 3)
    assert f.calls_per_second == pytest.approx(6 / 10.0)
    assert f.p50 == LATENCY_BOUNDS[-1] and f.p99 == LATENCY_BOUNDS[-1]
    assert f.latency_total == pytest.approx(12.0)
    assert sum(f.latency_buckets) == 6
    g = status.function("g")
    assert g is not None and g.calls == 0 and g.p50 is None
    e1, e2 = status.executors
    assert (e1.url, e1.busy, e1.cache_hits, e1.cache_misses) == ("tcp://e1", 0, 3, 1)
    assert e1.last_report_age == pytest.approx(1.0)
    assert (e2.busy, e2.cache_hits) == (3, 1)
    assert status.busy == 3 and status.cache_bytes == 600
    assert status.cache_hit_ratio == pytest.approx(4 / 6)
    assert status.dags == ("dag",)


def test_rate_covers_only_the_window_and_totals_outlive_executors() -> None:
    view = ClusterView(rate_window=5.0)
    view.join("tcp://e1")
    view.report(_report(), now=0.0)
    view.report(_report(), now=4.0)
    assert view.function_status("f", now=4.5).calls_per_second == pytest.approx(4 / 5)
    assert view.function_status("f", now=7.0).calls_per_second == pytest.approx(2 / 5)
    assert view.function_status("f", now=9.5).calls_per_second == 0.0
    view.leave("tcp://e1")
    status = view.status("s", ["f"], [], now=10.0)
    assert status.executors == () and status.functions[0].calls == 4


def test_reports_of_unknown_executors_and_surplus_functions_are_not_counted() -> None:
    view = ClusterView(max_functions=1)
    assert not view.report(_report("tcp://stranger"), now=0.0)
    view.join("tcp://e1")
    view.report(_report(), now=0.0)
    view.report(_report(functions=["other"]), now=0.0)
    assert view.dropped == 1
    assert view.function_status("other", now=0.0).calls == 0
    registered = ClusterView()
    registered.join("tcp://e1")
    registered.report(_report(functions=["junk"]), now=0.0, known={"f"})
    registered.report(_report(), now=0.0, known={"f"})
    assert registered.dropped == 1
    assert registered.status("s", ["f"], [], now=0.0).functions[0].calls == 2
    with pytest.raises(ValueError, match="rate_window"):
        ClusterView(rate_window=0)


# --------------------------------------------------------------------------- the record


def _status() -> ClusterStatus:
    return ClusterStatus(
        "sched",
        (ExecutorStatus("tcp://127.0.0.1:7001", 32, 2, 1, 3, 10, 5 * 1024 * 1024, 9, 1, 0.5),),
        (FunctionStatus("inc", 10, 1, 2.5, 0.001, math.inf, 0.25, (1,) * BUCKETS),
         FunctionStatus("idle")),
        ("pipeline",))


def test_status_round_trips_through_json() -> None:
    status = _status()
    assert ClusterStatus.from_json(status.to_json()) == status


@pytest.mark.parametrize(("text", "problem"), [
    ("{", "not valid JSON"),
    ("[]", "must be an object"),
    ('{"scheduler": "s"}', "missing fields"),
    ('{"scheduler": 1, "rate_window": 1, "executors": [], "functions": [], "dags": []}',
     "scheduler must be str"),
    ('{"scheduler": "s", "rate_window": -1, "executors": [], "functions": [], "dags": []}',
     "rate_window must be a non-negative float"),
    ('{"scheduler": "s", "rate_window": 1, "executors": [], "functions": [], "dags": [1]}',
     "dags"),
])
def test_garbled_status_is_a_protocol_error(text: str, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        ClusterStatus.from_json(text)


def test_status_table_names_every_figure() -> None:
    text = format_status(_status(), "tcp://127.0.0.1:5000")
    assert "tcp://127.0.0.1:5000" in text
    assert "tcp://127.0.0.1:7001" in text and "5.0 MiB" in text and "90%" in text
    executor = next(line for line in text.splitlines() if line.startswith("tcp://127.0.0.1:7001"))
    assert executor.split() == ["tcp://127.0.0.1:7001", "32", "2", "1", "3", "10", "5.0", "MiB",
                                "90%", "0", "0.5s"]
    inc = next(line for line in text.splitlines() if line.startswith("inc "))
    assert inc.split() == ["inc", "10", "1", "2.5", "1", ">60000"]
    assert "DAGS (1): pipeline" in text


# --------------------------------------------------------------------------- metrics


class _Scheduler:
    def __init__(self, status: ClusterStatus) -> None:
        self.status = status

    def cluster_status(self) -> ClusterStatus:
        return self.status

    def statistics(self) -> object:
        return type("S", (), {"runs_in_flight": 4})()


class _Node:
    def __init__(self) -> None:
        self.scheduler = _Scheduler(_status())
        self.executors: list[object] = []


def _request(target: str, *headers: str, method: str = "GET") -> bytes:
    return "\r\n".join([f"{method} {target} HTTP/1.1", "Host: x", *headers]).encode()


def test_metrics_text_parses_and_carries_the_status() -> None:
    registry = metrics_registry(_Node(), lambda: 7)
    response = answer(_request("/metrics"), registry, None)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("droplet_connections", ())] == 7
    assert samples[("droplet_function_calls_total", (("function", "inc"),))] == 10
    assert samples[("droplet_function_failures_total", (("function", "inc"),))] == 1
    assert samples[("droplet_function_latency_seconds_count", (("function", "inc"),))] == BUCKETS
    assert samples[("droplet_function_latency_seconds_bucket",
                    (("function", "inc"), ("le", "0.0001")))] == 1
    assert samples[("droplet_function_latency_seconds_sum", (("function", "inc"),))] == 0.25
    assert samples[("droplet_executors", ())] == 1
    assert samples[("droplet_runs_in_flight", ())] == 4
    executor = (("executor", "tcp://127.0.0.1:7001"),)
    assert samples[("droplet_executor_queued", executor)] == 1
    assert samples[("droplet_cache_hits_total", executor)] == 9
    assert samples[("droplet_cache_bytes", executor)] == 5 * 1024 * 1024


@pytest.mark.parametrize(("request_head", "token", "status"), [
    (_request("/nope"), None, b"404"),
    (_request("/metrics", method="POST"), None, b"405"),
    (b"garbage", None, b"400"),
    (_request("/metrics"), "s3cret", b"401"),
    (_request("/metrics", "Authorization: Bearer wrong"), "s3cret", b"401"),
    (_request("/metrics", "authorization: Bearer s3cret"), "s3cret", b"200"),
])
def test_metrics_requests_are_answered_by_status(request_head: bytes, token: str | None,
                                                 status: bytes) -> None:
    registry = metrics_registry(_Node(), lambda: 0)
    assert answer(request_head, registry, token).split(b" ")[1] == status


class _Executor:
    url = "inproc://e"

    def load(self) -> Load:
        return _load(hits=5, misses=2)


class _ExecutorNode:
    scheduler = None
    executors = [_Executor()]


def test_an_executor_node_exports_its_own_load_and_cache() -> None:
    registry = metrics_registry(_ExecutorNode(), lambda: 1)
    body = answer(_request("/metrics"), registry, None).partition(b"\r\n\r\n")[2]
    samples = {(s.name, tuple(s.labels.values())): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples[("droplet_executor_queued", ("inproc://e",))] == 2
    assert samples[("droplet_cache_hits_total", ("inproc://e",))] == 5
    assert samples[("droplet_cache_misses_total", ("inproc://e",))] == 2
    assert not any(name.startswith("droplet_function") for name, _ in samples)


def test_a_head_request_gets_headers_only() -> None:
    registry = metrics_registry(_Node(), lambda: 0)
    response = answer(_request("/metrics", method="HEAD"), registry, None)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""
    assert b"Content-Length: 0" not in head
