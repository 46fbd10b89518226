"""Issue 10: executors report what their node caches; the scheduler keeps it (pure code)."""

from __future__ import annotations

import pytest

from droplet.errors import ProtocolError
from droplet.executor.reports import CachedKeys, CallRecorder, Load, _Reporter
from droplet.protocol.messages import ExecutorReport, decode, encode
from droplet.scheduler.reports import MAX_CACHED_KEYS, ClusterView


def load(cached: dict[str, int], evictions: int = 0) -> Load:
    return Load(4, 1, 2, 3, len(cached), sum(cached.values()), 0, 0, evictions, cached)


def test_cached_keys_are_sent_whole_then_as_changes() -> None:
    keys = CachedKeys()
    assert keys.changes({"a": 1, "b": 2}) == (["a", "b"], [1, 2], [], True)
    assert keys.changes({"a": 1, "b": 2}) == ([], [], [], False)
    assert keys.changes({"a": 5, "c": 3}) == (["a", "c"], [5, 3], ["b"], False)
    keys.resync = True  # a report was lost
    assert keys.changes({"c": 3}) == (["c"], [3], [], True)


def test_the_scheduler_view_follows_the_changes() -> None:
    view = ClusterView()
    view.join("e1")
    reporter = _Reporter("e1", CallRecorder())
    for cached in ({"a": 100, "b": 200}, {"a": 100, "c": 50}, {}, {"z": 1}):
        report = reporter.build(load(cached, evictions=2))
        assert decode(encode(report))[0] == report
        assert view.report(report, 1.0)
        assert view.load("e1") == (4, 2, cached)
    # A lost report: the next one is whole, and the view recovers.
    reporter.build(load({"lost": 1}))
    reporter.cached.resync = True
    view.report(reporter.build(load({"after": 7})), 2.0)
    assert view.load("e1")[2] == {"after": 7}
    # evictions are a total (2 in the first report, none new since)
    assert view.status("s", [], [], 2.0).executors[0].cache_evictions == 2
    assert view.load("nobody") == (0, 0, {})


def test_evictions_add_up_in_the_status() -> None:
    view = ClusterView()
    view.join("e1")
    reporter = _Reporter("e1", CallRecorder())
    view.report(reporter.build(load({}, evictions=3)), 1.0)
    view.report(reporter.build(load({}, evictions=5)), 2.0)
    assert view.status("s", [], [], 2.0).executors[0].cache_evictions == 5


def test_the_view_bounds_the_keys_it_remembers() -> None:
    view = ClusterView()
    view.join("e1")
    for start in range(0, MAX_CACHED_KEYS + 2000, 1000):
        names = [f"k{i}" for i in range(start, start + 1000)]
        view.report(ExecutorReport("e1", 1, 0, 0, 0, 0, 0, 0, 0, [], [], [], [], [], 0,
                                   names, [1] * len(names), [], False), 1.0)
    assert len(view.load("e1")[2]) == MAX_CACHED_KEYS


@pytest.mark.parametrize(("keys", "sizes", "removed", "problem"), [
    (["a"], [], [], "cached_sizes"),
    (["a"], [-1], [], "negative"),
    ([f"k{i}" for i in range(5000)], [0] * 5000, [], "more than"),
])
def test_bad_cached_keys_are_refused(keys: list[str], sizes: list[int], removed: list[str],
                                     problem: str) -> None:
    report = ExecutorReport("e", 1, 0, 0, 0, 0, 0, 0, 0, [], [], [], [], [], 0, keys, sizes,
                            removed, False)
    with pytest.raises(ProtocolError, match=problem):
        decode(encode(report))
