"""Issue 10 end to end: an all-in-one node's worker processes share the node's cache.

Socket tests: every wait is bounded (connection timeouts, deadlines on polling).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from droplet import DropletConnection, DropletReference
from droplet.executor.segments import segment_dir
from droplet.links import one_request
from droplet.protocol.messages import GetStatistics, Statistics
from droplet.testing.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow

TIMEOUT = 30.0
MIB = 1024 * 1024


#: len() of a referenced value, and the executor that ran it (a lambda: pickled by value).
blen = lambda lib, value: (len(value), lib.getid().rpartition("/")[0])  # noqa: E731


def statistics(url: str) -> dict[str, int]:
    reply: Statistics = trio.run(one_request, url, GetStatistics())
    return reply.values


def segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir(segment_dir()) if n.startswith(f"droplet-{pid}-")]


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        pytest.skip("needs /proc (Linux)")
    found = []
    for task in tasks.iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:  # a thread that ended meanwhile
            pass
    return found


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    with start_node("--executors", "2", "--data-dir", ":memory:", "--placement", "spread",
                    log_path=tmp_path / "node.log") as running:
        yield running
    assert segments_of(running.pid) == []  # removed when the node stopped


def test_two_workers_read_a_large_value_fetched_once(node: NodeProcess) -> None:
    with DropletConnection(node.url, timeout=TIMEOUT) as cloud:
        cloud.put_object("big", b"b" * (2 * MIB))
        cloud.put_object("warm", b"w")
        cloud.register(blen, "blen")
        cloud.register_dag("len", ["blen"], [])

        def call(key: str) -> tuple[int, str]:
            # A direct response: the result does not go through the store.
            result: tuple[int, str] = cloud.call_dag(
                "len", {"blen": [DropletReference(key)]}, direct_response=True)
            return result

        # Both workers load the function (spread alternates between them).
        assert len({call("warm")[1] for _ in range(4)}) == 2
        gets = statistics(node.url)["kvs.gets"]
        seen = set()
        for _ in range(6):  # spread: calls alternate between the two workers
            size, where = call("big")
            assert size == 2 * MIB
            seen.add(where)
        assert len(seen) == 2
        stats = statistics(node.url)
        assert stats["kvs.gets"] - gets == 1  # the store read the value once, for both
        assert stats["cache.fetches"] == 2  # "warm" and "big"
        assert stats["cache.segments"] == 1  # one copy in shared memory
        assert len(segments_of(node.pid)) == 1
        # A new version replaces the segment (the old one is removed).
        cloud.put_object("big", b"c" * MIB)
        deadline = time.monotonic() + TIMEOUT
        while call("big")[0] != MIB:
            assert time.monotonic() < deadline, "the new version never reached the workers"
        assert len(segments_of(node.pid)) == 1


def test_a_killed_worker_leaks_no_segments(node: NodeProcess) -> None:
    with DropletConnection(node.url, timeout=TIMEOUT) as cloud:
        cloud.put_object("big", b"k" * MIB)
        fn = cloud.register(blen, "blen")
        for _ in range(2):
            assert fn(DropletReference("big")).get(timeout=TIMEOUT)[0] == MIB
        workers = children(node.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        # The node restarts the worker; calls go on, from the same segment.
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                if all(fn(DropletReference("big")).get(timeout=TIMEOUT)[0] == MIB
                       for _ in range(4)):
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert len(segments_of(node.pid)) == 1


#: Whether a referenced numpy array is writable and owns its memory, and where it ran.
flags = lambda lib, a: (a.flags.writeable, a.flags.owndata, float(a.sum()),  # noqa: E731
                        lib.getid().rpartition("/")[0])


def test_workers_get_numpy_arrays_from_shared_memory_without_copies(node: NodeProcess) -> None:
    np = pytest.importorskip("numpy")
    with DropletConnection(node.url, timeout=TIMEOUT) as cloud:
        cloud.put_object("array", np.ones(MIB // 8))
        fn = cloud.register(flags, "flags")
        seen = set()
        for _ in range(4):
            writable, owndata, total, where = fn(DropletReference("array")).get(
                timeout=TIMEOUT)
            assert (writable, owndata, total) == (False, False, MIB // 8)
            seen.add(where)
        assert len(seen) == 2  # both workers: views of the node's one copy
        assert len(segments_of(node.pid)) == 1
