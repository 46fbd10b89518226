"""Placements handed out to clients for direct calls (issue 9): pure, with fake reports.

``PlacementPolicy.whole_run`` decides where a client may send whole runs of a
call shape with given referenced keys; ``hand_out`` turns it into the
``CallPlaced`` answer; the client's cache keys it by the referenced keys.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from droplet.client._core import ClientCore
from droplet.client._direct import (
    MAP_ASKS_AFTER,
    MAX_PLACEMENTS,
    DirectCalls,
    may_go_direct,
    reference_set,
    spread_over,
)
from droplet.client._map import chunks_for
from droplet.errors import DagError
from droplet.protocol.messages import CallDag, CallPlaced, PlaceCall
from droplet.references import DropletReference
from droplet.scheduler.dags import Dag, build_dag
from droplet.scheduler.handout import Offer, hand_out
from droplet.scheduler.placement import (
    Candidate,
    Context,
    DataPolicy,
    LocalityPolicy,
    PlacementPolicy,
    RunPlacement,
    SpreadPolicy,
)

MB = 1024 * 1024


def one(name: str = "f") -> Dag:
    return build_dag(name, [name], [], (), {name})


# --------------------------------------------------------------------------- policy


def test_without_references_every_executor_least_loaded_first() -> None:
    pool = [Candidate("e1", running=3), Candidate("e2", running=0), Candidate("e3", running=1)]
    for policy in (DataPolicy(), LocalityPolicy()):
        assert policy.whole_run(pool) == RunPlacement(("e2", "e3", "e1"), 0)


def test_references_prefer_the_executors_caching_the_most_bytes() -> None:
    pool = [Candidate("e1", running=0, cached={"a": MB}),
            Candidate("e2", running=5, cached={"a": MB, "b": 10 * MB}),
            Candidate("e3", running=1, cached={"b": 10 * MB, "a": MB}),
            Candidate("e4", running=0)]
    run = DataPolicy().whole_run(pool, ("a", "b"))
    # e2 and e3 tie on bytes (both preferred, the less loaded first); the rest fall back
    assert run == RunPlacement(("e3", "e2", "e1", "e4"), 2)


def test_references_cached_nowhere_stick_to_the_least_loaded_in_turn() -> None:
    pool = [Candidate("e1", running=2), Candidate("e2", running=1)]
    assert DataPolicy().whole_run(pool, ("cold",)) == RunPlacement(("e2", "e1"), 1)
    # equals take turns, so cold keys spread over the nodes' caches
    idle = [Candidate("e1"), Candidate("e2")]
    policy = DataPolicy()
    homes = [policy.whole_run(idle, (f"k{i}",)).executors[0] for i in range(4)]
    assert sorted(homes) == ["e1", "e1", "e2", "e2"]


def test_a_backed_up_executor_is_not_preferred_for_its_data() -> None:
    pool = [Candidate("e1", running=40, threads=4, queued=30, cached={"a": MB}),
            Candidate("e2", running=0)]
    run = DataPolicy(max_queue=16).whole_run(pool, ("a",))
    assert run.executors[:run.preferred] == ("e2",)
    assert run.executors == ("e2", "e1")  # still a fallback
    # all backed up: the data decides among them all
    both = [Candidate("e1", running=40, threads=4, queued=30, cached={"a": MB}),
            Candidate("e2", running=40, threads=4, queued=30)]
    assert DataPolicy(max_queue=16).whole_run(both, ("a",)) == RunPlacement(("e1", "e2"), 1)


def test_a_big_map_spills_past_the_executors_caching_its_data() -> None:
    pool = [Candidate("e1", running=2, threads=4, cached={"a": MB}),
            Candidate("e2", running=0, threads=4), Candidate("e3", running=1, threads=4)]
    policy = DataPolicy(max_queue=16)
    assert policy.whole_run(pool, ("a",), calls=1) == RunPlacement(("e1", "e2", "e3"), 1)
    # e1 has room for 4 + 16 - 2 = 18 calls; 30 spill to e2 (room 20)
    assert policy.whole_run(pool, ("a",), calls=18).preferred == 1
    assert policy.whole_run(pool, ("a",), calls=30).preferred == 2
    assert policy.whole_run(pool, ("a",), calls=10_000).preferred == 3


# --------------------------------------------------------------------------- hand_out


def offers() -> list[Offer]:
    return [Offer("e1", 2, 4, 0, {"k": 3 * MB}), Offer("e2", 0, 4, 0, {}),
            Offer("e3", 0, 4, 0, {"k": 9 * MB}, draining=True),
            Offer("g1", 0, 4, 0, {"k": 99 * MB}, gpu=True)]


def test_hand_out_follows_the_data_and_skips_draining_and_gpu_executors() -> None:
    placed = hand_out(PlaceCall("f", True, ["k", "k"]), one(), {"f": "v1"}, offers(),
                      DataPolicy(), lease=2.0)
    assert placed == CallPlaced("f", True, ["f"], ["v1"], [], ["e1", "e2"], 2.0, 1)
    plain = hand_out(PlaceCall("f", True), one(), {"f": "v1"}, offers(), DataPolicy())
    assert plain.executors == ["e2", "e1"] and plain.preferred == 0
    many = hand_out(PlaceCall("f", True, ["k"], 100), one(), {"f": "v1"}, offers(),
                    DataPolicy())
    assert many.executors == ["e1", "e2"] and many.preferred == 2


def test_hand_out_gives_no_executors_where_the_policy_places_every_call() -> None:
    assert hand_out(PlaceCall("f", True, ["k"]), one(), {"f": "v1"}, offers(),
                    SpreadPolicy()).executors == []

    class Nearest(DataPolicy):  # a subclass of "data" that chooses otherwise
        name: ClassVar[str] = "nearest-test"

        def choose(self, pool: Any, context: Context) -> str:
            return str(pool[-1].url)

    assert hand_out(PlaceCall("f", True), one(), {"f": "v1"}, offers(),
                    Nearest()).executors == []
    with pytest.raises(DagError, match="no longer registered"):
        hand_out(PlaceCall("f", True), one(), {}, offers(), DataPolicy())


def test_a_policy_handing_out_an_unknown_executor_is_refused() -> None:
    class Broken(PlacementPolicy):
        whole_runs = True

        def choose(self, pool: Any, context: Context) -> str:
            return str(pool[0].url)

        def whole_run(self, pool: Any, references: Any = (), calls: int = 1) -> RunPlacement:
            return RunPlacement(("elsewhere",))

    with pytest.raises(DagError, match="not among the eligible executors"):
        hand_out(PlaceCall("f", True), one(), {"f": "v1"}, offers(), Broken())


# --------------------------------------------------------------------------- client


class FakePeer:
    def __init__(self, url: str) -> None:
        self.remote = url
        self.closed = False
        #: requests in flight on it, by id (as BlockingPeer and rpc.Peer keep them).
        self._pending: dict[int, object] = {}

    def busy(self, calls: int) -> None:
        """Have ``calls`` requests in flight on this connection."""
        self._pending = dict.fromkeys(range(calls), object())

    def alive(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


def direct_calls(answers: dict[tuple[str, ...], CallPlaced]) -> tuple[DirectCalls, list[Any]]:
    asked: list[Any] = []
    now = [0.0]

    def place(target: str, is_function: bool, references: list[str],
              calls: int) -> CallPlaced:
        asked.append((target, references) if calls == 1 else (target, references, calls))
        return answers[tuple(references)]

    calls = DirectCalls(FakePeer, place, clock=lambda: now[0])
    return calls, asked


def plan(urls: list[str], preferred: int = 0) -> CallPlaced:
    return CallPlaced("f", True, ["f"], ["v1"], [], urls, 2.0, preferred)


def test_placements_are_cached_per_referenced_keys_and_prefer_the_data() -> None:
    calls, asked = direct_calls({(): plan(["e1", "e2"]), ("k",): plan(["e2", "e1"], 1)})
    plain = [calls.target("f", True)[0].remote for _ in range(4)]  # type: ignore[index]
    assert plain == ["e1"] * 4  # one after another (none in flight): they stay on one
    by_data = [calls.target("f", True, ("k",))[0].remote  # type: ignore[index]
               for _ in range(4)]
    assert by_data == ["e2"] * 4  # the preferred one only
    assert asked == [("f", []), ("f", ["k"])]
    # the preferred executor leaves: its placements go, the next asks again
    # a big map with references gets a placement of its own, not cached; a small one not
    assert [p.remote for p, _ in calls.spread("f", True, ("k",), MAP_ASKS_AFTER)] == ["e2"]
    assert len(asked) == 2
    assert [p.remote for p, _ in calls.spread("f", True, ("k",), 500)] == ["e2"]
    assert asked[-1] == ("f", ["k"], 500)
    assert calls.target("f", True, ("k",))[0].remote == "e2"  # type: ignore[index]
    assert len(asked) == 3
    calls.executor_left("e2")
    assert calls.placed("f", True, ("k",)) == [] and calls.placed("f") == []
    calls.forget("f", True)
    assert calls.placements == {}


def test_calls_go_to_the_least_busy_preferred_executor_and_stick_on_a_tie() -> None:
    """Least outstanding with affinity: sequential calls stay on one executor (its
    threads stay warm), concurrent ones spread; fallbacks only when unreachable."""
    calls, asked = direct_calls({(): plan(["e1", "e2", "e3"], 2)})

    def pick() -> str:
        found = calls.target("f", True)
        assert found is not None
        return str(found[0].remote)

    assert [pick() for _ in range(3)] == ["e1"] * 3  # nothing in flight: the first, kept
    peers = calls._peers
    peers["e1"].busy(1)  # a call in flight on e1: the next goes to the idle one
    assert pick() == "e2"
    assert [pick() for _ in range(3)] == ["e2"] * 3  # and stays there (sequential again)
    peers["e2"].busy(1)  # one each: a tie goes to the one used last
    assert pick() == "e2"
    peers["e2"].busy(2)
    assert pick() == "e1"  # fewer in flight wins over affinity
    peers["e1"].busy(0)
    peers["e2"].busy(0)
    assert pick() == "e1"  # idle again: the last one keeps them
    assert "e3" not in peers  # a fallback, never preferred: not even dialled
    # Concurrent calls (each still in flight when the next is made) spread evenly.
    peers["e1"].busy(0)
    seen = []
    for _ in range(6):
        url = pick()
        seen.append(url)
        peers[url].busy(len(peers[url]._pending) + 1)
    assert sorted(seen) == ["e1"] * 3 + ["e2"] * 3
    # A renewed lease keeps the executor used last.
    for peer in peers.values():
        peer.busy(0)
    last = pick()
    other = "e2" if last == "e1" else "e1"
    peers[last].busy(1)
    assert pick() == other and calls.placements[("f", True, ())].last == other
    peers[last].busy(0)
    calls.store(plan(["e1", "e2", "e3"], 2), 0.0)
    assert pick() == other
    assert len(asked) == 1


def test_spread_puts_the_least_busy_first_and_leaves_the_affinity_alone() -> None:
    calls, _ = direct_calls({(): plan(["e1", "e2"])})
    assert calls.target("f", True)[0].remote == "e1"  # type: ignore[index]
    calls._peers["e1"].busy(3)
    assert [p.remote for p, _ in calls.spread("f", True, (), 10)] == ["e2", "e1"]
    assert calls.placements[("f", True, ())].last == "e1"
    calls._peers["e1"].busy(0)
    assert [p.remote for p, _ in calls.spread("f", True, (), 10)] == ["e1", "e2"]


def test_an_unreachable_choice_is_not_the_one_used_last() -> None:
    calls, _ = direct_calls({(): plan(["bad", "e1"])})
    real = calls._dial

    def dial(url: str) -> Any:
        if url == "bad":
            raise OSError("refused")
        return real(url)

    calls._dial = dial
    assert calls.target("f", True)[0].remote == "e1"  # type: ignore[index]
    assert calls.placements[("f", True, ())].last == "e1"
    assert calls.target("f", True)[0].remote == "e1"  # type: ignore[index]


def test_the_fallbacks_serve_when_the_preferred_cannot_be_dialled() -> None:
    calls, _ = direct_calls({("k",): plan(["bad", "e1"], 1)})
    real = calls._dial

    def dial(url: str) -> Any:
        if url == "bad":
            raise OSError("refused")
        return real(url)

    calls._dial = dial
    assert calls.target("f", True, ("k",))[0].remote == "e1"  # type: ignore[index]
    assert [p.remote for p, _ in calls.spread("f", True, ("k",))] == ["e1"]


def test_the_placement_cache_is_bounded() -> None:
    calls, _ = direct_calls({})
    for i in range(MAX_PLACEMENTS + 10):
        calls.store(plan(["e1"]), 0.0, (f"k{i}",))
    assert len(calls.placements) == MAX_PLACEMENTS
    assert ("f", True, ("k0",)) not in calls.placements  # the oldest went first
    assert ("f", True, (f"k{MAX_PLACEMENTS + 9}",)) in calls.placements


def test_calls_with_references_may_go_direct_and_name_their_keys() -> None:
    call = ClientCore.function_call("f", [DropletReference("b"), DropletReference("a"), 1])
    assert may_go_direct(call)
    assert reference_set(call) == ("a", "b")
    assert reference_set(ClientCore.function_call("f", [1])) == ()


# --------------------------------------------------------------------------- map


def test_spread_over_splits_evenly_in_order() -> None:
    assert spread_over(10, 2) == [(0, 5), (5, 10)]
    assert spread_over(5, 3) == [(0, 1), (1, 3), (3, 5)]
    assert spread_over(1, 4) == [(0, 1)]


def test_map_chunks_per_executor_at_most_chunksize_in_order() -> None:
    calls = [ClientCore.function_call("f", [i]) for i in range(10)]
    calls.append(ClientCore.function_call("f", [DropletReference("k")]))
    calls.append(CallDag("f", True, ["f"], [b"x"], result_key="r", output_key="out"))
    p1, p2 = FakePeer("e1"), FakePeer("e2")
    spreads = {(): [(p1, plan(["e1", "e2"])), (p2, plan(["e1", "e2"]))], ("k",): []}
    chunks, left = chunks_for(calls, 3, lambda refs, _: spreads[refs], lambda p: p.remote)
    assert [(c.peer.remote, c.indices) for c in chunks] == [  # the executors take turns
        ("e1", [0, 1, 2]), ("e2", [5, 6, 7]), ("e1", [3, 4]), ("e2", [8, 9])]
    assert all(t.placement == [c.peer.remote] for c in chunks for t in c.triggers)
    assert left == [10, 11]  # no executor for its data; not of a kind to go direct


def test_calls_naming_a_key_this_client_just_wrote_go_through_the_scheduler() -> None:
    """A direct call could overtake the store's news of the write to the caches."""
    from droplet.client._direct import MAX_WRITTEN, WRITE_SETTLE

    now = [100.0]
    asked: list[Any] = []

    def place(target: str, is_function: bool, references: list[str],
              calls: int) -> CallPlaced:
        asked.append(references)
        return plan(["e1"])

    calls = DirectCalls(FakePeer, place, clock=lambda: now[0])
    calls.wrote("k")
    assert calls.target("f", True, ("k",)) is None  # through the scheduler
    assert calls.spread("f", True, ("a", "k"), 3) == []
    assert asked == []
    assert calls.target("f", True, ("other",)) is not None  # other keys still go direct
    assert calls.target("f", True) is not None
    now[0] += WRITE_SETTLE
    assert calls.target("f", True, ("k",)) is not None  # the caches had time to hear
    assert asked == [["other"], [], ["k"]]
    for i in range(MAX_WRITTEN + 5):  # bounded: the oldest are forgotten
        calls.wrote(f"w{i}")
    assert len(calls.written) == MAX_WRITTEN and "w0" not in calls.written


class FakeAsyncPeer(FakePeer):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.on_close: list[Any] = []

    async def aclose(self) -> None:
        self.closed = True


async def test_the_async_client_sticks_and_spreads_the_same_way() -> None:
    from droplet.client._direct import AsyncDirectCalls

    async def dial(url: str) -> Any:
        return FakeAsyncPeer(url)

    async def place(target: str, is_function: bool, references: list[str],
                    calls: int) -> CallPlaced:
        return plan(["e1", "e2"])

    calls = AsyncDirectCalls(dial, place, clock=lambda: 0.0)
    assert calls.cached_target("f", True) is None  # nothing cached: target() asks
    found = await calls.target("f", True)
    assert found is not None and found[0].remote == "e1"
    # Sequential (nothing in flight): every call to e1, without I/O.
    assert [calls.cached_target("f", True)[0].remote  # type: ignore[index]
            for _ in range(3)] == ["e1"] * 3
    peers: Any = calls._peers
    peers["e1"].busy(1)
    # e2's turn, but it is not dialled yet: target() dials it, and it is kept.
    assert calls.cached_target("f", True) is None
    found = await calls.target("f", True)
    assert found is not None and found[0].remote == "e2"
    peers["e1"].busy(0)
    assert calls.cached_target("f", True)[0].remote == "e2"  # type: ignore[index]
    peers["e2"].busy(2)
    assert calls.cached_target("f", True)[0].remote == "e1"  # type: ignore[index]
    assert [p.remote for p, _ in await calls.spread("f", True, (), 10)] == ["e1", "e2"]
    await calls.aclose()


def test_registering_a_function_again_drops_the_placements_of_dags_running_it() -> None:
    """A DAG's schedule names the code version of each function: it is asked again."""
    calls, _ = direct_calls({})
    dag = CallPlaced("d", False, ["f", "g"], ["v1", "v1"], [["f", "g"]], ["e1"], 2.0)
    calls.store(dag, 0.0)
    calls.store(CallPlaced("other", False, ["h"], ["v1"], [], ["e1"], 2.0), 0.0)
    calls.store(plan(["e1"]), 0.0)
    calls.forget("g", True)
    assert set(calls.placements) == {("f", True, ()), ("other", False, ())}
    calls.forget("f", True)
    assert set(calls.placements) == {("other", False, ())}
