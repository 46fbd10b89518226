"""Batching functions: one call of the function serves many queued calls.

A DAG's ``batching_functions`` (Cloudflow's batching, for models that serve a
batch as fast as one input) run here. Calls of such a function that are
waiting on this executor are gathered, at most ``max_batch`` at a time, and
the function is called once with, for each argument position, the list of
that position's arguments. It returns a list with one result per call, which
is split back so each call's run carries on with its own result.

While a batch runs, new calls queue; when it ends, the next batch takes what
has queued. A lone call is a batch of one, so no call waits for company.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ..errors import FunctionError, _Failure

__all__ = ["DEFAULT_MAX_BATCH", "BatchStatistics", "Batcher"]

#: The largest batch an executor forms unless configured otherwise.
DEFAULT_MAX_BATCH = 16

RunInThread = Callable[..., Awaitable[Any]]
Fail = Callable[[BaseException, str], FunctionError]


@attrs.frozen
class BatchStatistics:
    batches: int
    calls: int
    largest: int


@attrs.define
class _Pending:
    args: list[Any]
    lib: Any
    done: trio.Event = attrs.Factory(trio.Event)
    value: Any = None
    failed: bool = False


class Batcher:
    """Queues of calls to batching functions on one executor."""

    def __init__(self, nursery: trio.Nursery, run_in_thread: RunInThread, fail: Fail,
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch!r}")
        self.max_batch = max_batch
        self._nursery = nursery
        self._run_in_thread = run_in_thread
        self._fail = fail
        self._queues: dict[tuple[str, str], list[_Pending]] = {}
        self._batches = 0
        self._calls = 0
        self._largest = 0

    def statistics(self) -> BatchStatistics:
        return BatchStatistics(self._batches, self._calls, self._largest)

    async def call(self, function: str, version: str, target: Callable[..., Any],
                   is_async: bool, lib: Any, args: list[Any]) -> tuple[Any, bool]:
        """Queue one call; returns ``(value, failed)`` once its batch has run."""
        entry = _Pending(args, lib)
        key = (function, version)
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = [entry]
            self._nursery.start_soon(self._drain, key, target, is_async)
        else:
            queue.append(entry)
        await entry.done.wait()
        return entry.value, entry.failed

    async def _drain(self, key: tuple[str, str], target: Callable[..., Any],
                     is_async: bool) -> None:
        queue = self._queues[key]
        try:
            while queue:
                batch = queue[: self.max_batch]
                del queue[: len(batch)]
                # Calls with different numbers of arguments cannot share columns.
                width = len(batch[0].args)
                same = [e for e in batch if len(e.args) == width]
                queue[:0] = [e for e in batch if len(e.args) != width]
                await self._run(key[0], target, is_async, same)
        finally:
            del self._queues[key]
            for entry in queue:  # only when cancelled: nobody is left to serve them
                entry.value, entry.failed = _Failure(FunctionError(
                    "Cancelled", "the executor stopped before this call's batch ran",
                    function=key[0])), True
                entry.done.set()

    async def _run(self, function: str, target: Callable[..., Any], is_async: bool,
                   batch: list[_Pending]) -> None:
        self._batches += 1
        self._calls += len(batch)
        self._largest = max(self._largest, len(batch))
        columns = [[e.args[i] for e in batch] for i in range(len(batch[0].args))]
        lib = batch[0].lib
        try:
            try:
                if is_async:
                    results = await target(lib, *columns)
                else:
                    results = await self._run_in_thread(target, lib, *columns)
            except (Exception, SystemExit) as exc:  # sys.exit() never ends the node
                error = self._fail(exc, function)
                for entry in batch:
                    entry.value, entry.failed = _Failure(error), True
                return
            if not isinstance(results, list | tuple) or len(results) != len(batch):
                got = (f"{len(results)} results" if isinstance(results, list | tuple)
                       else f"a {type(results).__name__}")
                error = FunctionError(
                    "TypeError",
                    f"batching function {function!r} was called with a batch of "
                    f"{len(batch)} and must return a list of {len(batch)} results "
                    f"(one per call), not {got}", function=function)
                for entry in batch:
                    entry.value, entry.failed = _Failure(error), True
                return
            for entry, value in zip(batch, results, strict=True):
                entry.value = value
        finally:
            for entry in batch:
                entry.done.set()
