"""WorkerThreads: one warm worker runs queued jobs back to back; a standby helps
when the busy workers make no progress (a job that blocks)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import trio

from droplet.executor.threads import WorkerThreads

TIMEOUT = 30


def _names() -> list[str]:
    return [threading.current_thread().name]


async def test_sequential_jobs_reuse_one_warm_worker() -> None:
    threads = WorkerThreads(8)
    try:
        with trio.fail_after(TIMEOUT):
            names = {(await threads.run(_names))[0] for _ in range(50)}
        # a job queued while none runs wakes the worker that parked last: the same one
        assert len(names) == 1
        assert threads.threads == 1
    finally:
        threads.close()


def test_a_burst_of_jobs_runs_every_one_without_a_thread_each() -> None:
    threads = WorkerThreads(32)
    gate = threading.Event()
    ran: list[int] = []
    done = threading.Event()
    try:
        threads.start(gate.wait, TIMEOUT, label="gate")  # holds the first worker
        for i in range(200):
            threads.start(ran.append, i)
        threads.start(done.set)
        gate.set()
        assert done.wait(TIMEOUT)
        # every job ran, once
        assert sorted(ran) == list(range(200))
        # not a thread per queued job: busy workers get help one at a time
        assert threads.threads < 32
    finally:
        threads.close()


@pytest.mark.parametrize("blocked", [1, 3])
def test_jobs_behind_blocking_jobs_get_a_worker_of_their_own(blocked: int) -> None:
    """A job that waits for a later job would deadlock if queued jobs only ran
    after the busy ones: the standby takes them once no progress is made."""
    threads = WorkerThreads(8)
    released = [threading.Event() for _ in range(blocked)]
    finished = threading.Event()
    count = [0]
    lock = threading.Lock()

    def wait_for(event: threading.Event) -> None:
        assert event.wait(TIMEOUT)
        with lock:
            count[0] += 1
            if count[0] == blocked:
                finished.set()

    try:
        for event in released:
            threads.start(wait_for, event)
        for event in released:
            threads.start(event.set)
        assert finished.wait(TIMEOUT)
        assert threads.threads >= blocked + 1
    finally:
        threads.close()


def test_at_most_max_threads_run_and_the_rest_wait_their_turn() -> None:
    threads = WorkerThreads(2)
    gate = threading.Event()
    running = [0]
    peak = [0]
    lock = threading.Lock()
    done = threading.Event()
    left = [6]

    def job() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(TIMEOUT)
        with lock:
            running[0] -= 1
            left[0] -= 1
            if not left[0]:
                done.set()

    try:
        for _ in range(6):
            threads.start(job)
        # both workers end up busy (the standby helps), the others queue
        deadline = threading.Event()
        for _ in range(1000):
            with lock:
                if running[0] == 2:
                    break
            deadline.wait(0.01)
        assert threads.queued >= 1
        gate.set()
        assert done.wait(TIMEOUT)
        assert peak[0] == 2
    finally:
        threads.close()


async def test_run_returns_results_and_raises_errors_under_load() -> None:
    threads = WorkerThreads(4)

    def fail(x: int) -> Any:
        raise ValueError(f"bad {x}")

    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        try:
            results[i] = await threads.run(fail if i % 7 == 0 else (lambda v: v * 2), i)
        except ValueError as exc:
            results[i] = str(exc)

    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, i)
        assert results == {i: f"bad {i}" if i % 7 == 0 else i * 2 for i in range(100)}
    finally:
        threads.close()


def test_close_lets_parked_and_standby_workers_exit() -> None:
    threads = WorkerThreads(4)
    gate = threading.Event()
    done = threading.Event()
    threads.start(gate.wait, TIMEOUT)
    threads.start(gate.wait, TIMEOUT)
    threads.start(done.set)
    gate.set()
    assert done.wait(TIMEOUT)
    threads.close()
    for _ in range(3000):
        if threads.threads == 0:
            break
        threading.Event().wait(0.01)
    assert threads.threads == 0
    with pytest.raises(RuntimeError):
        threads.start(done.set)


def test_jobs_queued_from_the_loop_run_and_the_pool_outlives_the_run() -> None:
    """Jobs queued from inside a Trio run, from a later run and from no run at
    all each get a worker."""
    threads = WorkerThreads(4)
    done = [threading.Event() for _ in range(3)]

    async def queue_and_wait(event: threading.Event) -> None:
        threads.start(event.set)
        with trio.fail_after(TIMEOUT):
            while not event.is_set():  # noqa: ASYNC110 (a thread sets it)
                await trio.sleep(0.001)

    try:
        trio.run(queue_and_wait, done[0])
        trio.run(queue_and_wait, done[1])  # a new run: not the one the pool knew
        threads.start(done[2].set)  # no run at all
        assert done[2].wait(TIMEOUT)
    finally:
        threads.close()


async def test_close_in_the_loop_still_runs_what_was_queued() -> None:
    threads = WorkerThreads(2)
    event = threading.Event()
    threads.start(event.set)
    threads.close()  # what was queued still runs
    with trio.fail_after(TIMEOUT):
        await trio.to_thread.run_sync(event.wait, TIMEOUT)
    assert event.is_set()
