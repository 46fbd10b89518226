"""Issue 10 end to end: calls on a referenced key land on the executor node caching it.

A storage+scheduler node and two ``--role executor`` nodes, each its own
process with its own cache. Socket tests: every wait is bounded.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from droplet import DropletConnection, DropletReference
from droplet.protocol.messages import CallDag, PlaceCall
from droplet.testing.nodes import poll_until, start_node

pytestmark = pytest.mark.slow

TIMEOUT = 30.0
MIB = 1024 * 1024

#: The executor that ran the call (a lambda: pickled by value).
where = lambda lib, *args: lib.getid().rpartition("/")[0]  # noqa: E731


until = functools.partial(poll_until, timeout=TIMEOUT, interval=0.05)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs: Path = tmp_path_factory.mktemp("data-placement")
    with start_node("--executors", "0", "--data-dir", ":memory:",
                    log_path=logs / "head.log") as head:
        executor_flags = ("--scheduler", head.url, "--report-interval", "0.1")
        with start_node(*executor_flags, role="executor", log_path=logs / "e1.log"), \
                start_node(*executor_flags, role="executor", log_path=logs / "e2.log"):
            with DropletConnection(head.url, timeout=TIMEOUT) as cloud:
                until(lambda: len(cloud.status().executors) == 2, "both executors joining")
            yield head.url


def _cached_on(cloud: DropletConnection, url: str, size: int) -> bool:
    status = cloud.status()
    return any(e.url == url and e.cache_bytes >= size for e in status.executors)


def test_calls_go_where_their_reference_is_cached(cluster: str) -> None:
    with DropletConnection(cluster, timeout=TIMEOUT) as cloud:
        fn = cloud.register(where, "where")
        # Without references, calls made together spread over both executors
        # (least loaded); one after another, they stay on one (_direct.py).
        plain = Counter(f.get(timeout=TIMEOUT) for f in [fn(i) for i in range(8)])
        assert len(plain) == 2
        assert len(Counter(fn(i).get(timeout=TIMEOUT) for i in range(8))) == 1
        for key in ("big-a", "big-b"):
            cloud.put_object(key, bytes(2 * MIB))
            home = fn(DropletReference(key)).get(timeout=TIMEOUT)  # a miss: cached there
            until(lambda h=home: _cached_on(cloud, h, 2 * MIB), "the cache report")
            landed = Counter(fn(DropletReference(key)).get(timeout=TIMEOUT) for _ in range(10))
            assert landed == Counter({home: 10}), (key, landed)
        # Each key was read from the store once, by the node that caches it.
        status = until(lambda: (s := cloud.status()) and sum(
            e.cache_hits for e in s.executors) >= 20 and s, "the hits reported")
        assert sum(e.cache_misses for e in status.executors) == 2


def test_calls_with_references_go_straight_to_the_node_caching_them(
        cluster: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Calls naming a key this client just wrote go through the scheduler for a
    # second (tested in test_handout.py); here they are to go direct at once.
    monkeypatch.setattr("droplet.client._direct.WRITE_SETTLE", 0.0)
    with DropletConnection(cluster, timeout=TIMEOUT) as cloud:
        fn = cloud.register(where, "where_direct")
        backend: Any = cloud._backend
        scheduler: Any = backend.scheduler
        calls: list[Any] = []  # the CallDags this client sends the scheduler
        submit, send = scheduler.submit, scheduler.send
        scheduler.submit = lambda *m, **kw: (calls.extend(
            x for x in [*m, *kw.get("oneway", ())] if type(x) is CallDag), submit(*m, **kw))[1]
        scheduler.send = lambda *m, **kw: (calls.extend(
            x for x in m if type(x) is CallDag), send(*m, **kw))[1]
        cloud.put_object("big-c", bytes(2 * MIB))
        home = fn(DropletReference("big-c")).get(timeout=TIMEOUT)

        def placed_by_data() -> bool:
            # A key cached nowhere goes to the executors in turn; by data, always home.
            return all(scheduler.request(PlaceCall("where_direct", True, ["big-c"]),
                                         TIMEOUT).executors[0] == home for _ in range(4))

        until(placed_by_data, "the cache report")
        backend.direct.placements.clear()  # ask again, now that the scheduler knows
        landed = Counter(fn(DropletReference("big-c")).get(timeout=TIMEOUT) for _ in range(10))
        assert landed == Counter({home: 10})
        mapped = Counter(f.get(timeout=TIMEOUT) for f in fn.map([DropletReference("big-c")] * 20))
        assert mapped == Counter({home: 20})
        # None went through the scheduler: each went straight to the executor
        # the scheduler's placement (by data) named, the one caching the key first.
        assert calls == []
        placed = backend.direct.placed("where_direct", True, ("big-c",))
        assert placed[0] == home
