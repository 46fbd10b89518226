"""The benchmark cases: a registry of (name, setup, call).

Two kinds of case:

- **latency** (:func:`latency_case`): ``setup(conn, ctx)`` gets a synchronous
  :class:`droplet.DropletConnection`, registers what it needs and returns the
  zero-argument *call* to time. The runner calls it ``warmup`` times (checking
  the first result against ``expect``), then times ``samples`` sequential calls
  with ``time.perf_counter_ns``.
- **throughput** (:func:`throughput_case`): ``async run(client, ctx)`` gets an
  :class:`droplet.AsyncDropletClient` inside one ``trio.run`` and returns a
  :class:`Measured` (per-call latencies plus the total wall time).

Adding a row is one decorated function (see README.md, "Adding rows"), e.g.
one of the consistency rows below::

    @latency_case("dag2-keys-rr", "...", expect=16)
    def dag2_keys_rr(conn, ctx):
        square_reading, inc_reading = _put_lww_keys(conn)
        return dag_chain(conn, "bench-dag2-keys-rr", [square_reading, inc_reading], 3,
                         consistency=droplet.REPEATABLE_READ)

where ``square_reading``/``inc_reading`` are nested functions (see
``_remote_functions``, ``_key_reading_functions``) that also ``lib.get`` both
keys. Names must be unique; ``--only`` selects cases by name or glob (``dag*``).
Each target is a fresh cluster, but ``--target-url`` may reuse a node, so
register functions, DAGs and keys under ``bench-`` names.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

import droplet
from droplet.client._direct import WRITE_SETTLE

__all__ = ["CASES", "Case", "Context", "Measured", "dag_chain", "latency_case",
           "sync_throughput_case", "throughput_case"]

_MISSING: Any = object()


@dataclasses.dataclass
class Context:
    """Run settings a case may read (sizes come from the command line)."""

    samples: int
    warmup: int
    concurrent_calls: int
    target: Any  # bench_targets.Target


@dataclasses.dataclass
class Measured:
    """What a throughput case returns."""

    latencies_ns: list[int]
    total_ns: int
    calls: int
    note: str = ""


@dataclasses.dataclass
class Case:
    name: str
    description: str
    kind: str  # "latency" or "throughput"
    setup: Callable[[droplet.DropletConnection, Context], Callable[[], Any]] | None = None
    run: Callable[[droplet.AsyncDropletClient, Context], Awaitable[Measured]] | None = None
    expect: Any = _MISSING
    #: Target names this case runs on (None: all).
    targets: frozenset[str] | None = None
    #: At most this many timed (and warm-up) calls, for rows whose calls are slow.
    max_samples: int | None = None
    #: For "sync-throughput" cases: ``run(conn, ctx) -> Measured`` with the sync client.
    sync_run: Callable[[droplet.DropletConnection, Context], Measured] | None = None

    def applies_to(self, target_name: str) -> bool:
        return self.targets is None or target_name in self.targets


#: Every case, in table order.
CASES: dict[str, Case] = {}


def _add(case: Case) -> None:
    if case.name in CASES:
        raise ValueError(f"duplicate benchmark case {case.name!r}")
    CASES[case.name] = case


def latency_case(name: str, description: str, *, expect: Any = _MISSING,
                 targets: Sequence[str] | None = None,
                 max_samples: int | None = None) -> Callable[..., Any]:
    """Register ``setup(conn, ctx) -> call`` as a latency row."""
    def deco(setup: Callable[[droplet.DropletConnection, Context], Callable[[], Any]]) -> Any:
        _add(Case(name, description, "latency", setup=setup, expect=expect,
                  targets=frozenset(targets) if targets else None, max_samples=max_samples))
        return setup
    return deco


def sync_throughput_case(name: str, description: str) -> Callable[..., Any]:
    """Register ``run(conn, ctx) -> Measured`` (synchronous client) as a throughput row."""
    def deco(run: Callable[[droplet.DropletConnection, Context], Measured]) -> Any:
        _add(Case(name, description, "sync-throughput", sync_run=run))
        return run
    return deco


def throughput_case(name: str, description: str, *,
                    targets: Sequence[str] | None = None) -> Callable[..., Any]:
    """Register ``async run(client, ctx) -> Measured`` as a throughput row."""
    def deco(run: Callable[[droplet.AsyncDropletClient, Context], Awaitable[Measured]]) -> Any:
        _add(Case(name, description, "throughput", run=run,
                  targets=frozenset(targets) if targets else None))
        return run
    return deco


# --------------------------------------------------------------------------- helpers

def _remote_functions() -> tuple[Callable[..., Any], ...]:
    # Defined inside a function on purpose: executors of a node subprocess cannot
    # import this module, and Droplet pickles module-level functions by reference
    # (plain pickle first); nested functions are shipped by value (cloudpickle).
    def noop(_: Any, x: Any) -> Any:
        return x

    def square(_: Any, x: Any) -> Any:
        return x * x

    def increment(_: Any, x: Any) -> Any:
        return x + 1

    return noop, square, increment


noop, square, increment = _remote_functions()


def _fanin_and_size_functions() -> tuple[Callable[..., Any], ...]:
    def add3(_: Any, a: Any, b: Any, c: Any) -> Any:
        return a + b + c

    def length(_: Any, data: Any) -> Any:
        return len(data)

    return add3, length


add3, length = _fanin_and_size_functions()
MIB = 1024 * 1024

#: Keys read by the consistency rows. NORMAL and REPEATABLE_READ rows read
#: last-writer-wins values stored with ``put_object``; CAUSAL rows read causal
#: values written by a CAUSAL DAG run (a key keeps the lattice type of its first
#: write, so the two kinds need their own keys).
LWW_KEYS = ("bench-keys-k1", "bench-keys-k2")
CAUSAL_KEYS = ("bench-causal-k1", "bench-causal-k2")
KEY_VALUES = (1, 2)
CAUSAL_SESSION = "bench-session"


def _key_reading_functions(k1: str, k2: str) -> tuple[Callable[..., Any], ...]:
    """``square``/``increment`` that also read keys ``k1`` and ``k2`` (``lib.get``).

    Each adds both values to its result: with 1 and 2 stored, the 2-function
    DAG gives 3*3 + 3 = 12, then 12 + 1 + 3 = 16; a chain of 10 gives 10 * 4.
    Nested (closures over the key names), so they are shipped by value.
    """
    def square_reading(lib: Any, x: Any) -> Any:
        return x * x + lib.get(k1) + lib.get(k2)

    def inc_reading(lib: Any, x: Any) -> Any:
        return x + 1 + lib.get(k1) + lib.get(k2)

    return square_reading, inc_reading


def _causal_writer() -> Callable[..., Any]:
    def write_keys(lib: Any, pairs: Any) -> Any:
        # Read before writing: the write then supersedes every version read (also
        # concurrent ones a previous run on a reused node may have left), so each
        # key holds one version and reads back as a plain value.
        for key, value in pairs:
            lib.get(key)
            lib.put(key, value)
        return len(pairs)

    return write_keys


def _put_lww_keys(conn: droplet.DropletConnection) -> tuple[Callable[..., Any], ...]:
    """Store the LWW keys (``put_object``); the functions that read them."""
    for key, value in zip(LWW_KEYS, KEY_VALUES, strict=True):
        conn.put_object(key, value)
    return _key_reading_functions(*LWW_KEYS)


def _write_causal_keys(conn: droplet.DropletConnection) -> tuple[Callable[..., Any], ...]:
    """Write the causal keys through a CAUSAL DAG run in session ``CAUSAL_SESSION``.

    The session's context then holds the keys' vector clocks (and the second
    key's dependency on the first), so every timed CAUSAL read compares the
    cached version's clock against it: the clock-checking path, not just the
    CAUSAL bookkeeping around LWW values. Returns the functions that read them.
    """
    name = "bench-causal-writer"
    conn.register(_causal_writer(), name)
    conn.register_dag(name, [name], [])
    pairs = list(zip(CAUSAL_KEYS, KEY_VALUES, strict=True))
    written = conn.call_dag(name, {name: [pairs]}, consistency=droplet.CAUSAL,
                            client_id=CAUSAL_SESSION).get()
    if written != len(pairs):
        raise AssertionError(f"causal writer returned {written!r}")
    return _key_reading_functions(*CAUSAL_KEYS)


def dag_chain(conn: droplet.DropletConnection, name: str,
              functions: Sequence[Callable[..., Any]], arg: Any, *,
              direct_response: bool = False, consistency: str = droplet.NORMAL,
              client_id: str | None = None) -> Callable[[], Any]:
    """Register ``functions`` as ``name-0 -> name-1 -> ...`` and DAG ``name``.

    Returns the call: ``call_dag(name, {first: arg}).get()`` (or the direct
    response's value with ``direct_response=True``).
    """
    names = [f"{name}-{i}" for i in range(len(functions))]
    for fn, fn_name in zip(functions, names, strict=True):
        conn.register(fn, fn_name)
    conn.register_dag(name, names, list(zip(names[:-1], names[1:], strict=True)))
    arg_map = {names[0]: arg}
    if direct_response:
        return lambda: conn.call_dag(name, arg_map, direct_response=True,
                                     consistency=consistency, client_id=client_id)
    return lambda: conn.call_dag(name, arg_map, consistency=consistency,
                                 client_id=client_id).get()


# --------------------------------------------------------------------------- rows

@latency_case("noop", "one no-op function call: f(1).get(), f = lambda _, x: x", expect=1)
def noop_call(conn: droplet.DropletConnection, ctx: Context) -> Callable[[], Any]:
    f = conn.register(noop, "bench-noop")
    return lambda: f(1).get()


@latency_case("dag2", "2-function DAG square -> increment: call_dag(..., {square: 3}).get()",
              expect=10)
def dag2(conn: droplet.DropletConnection, ctx: Context) -> Callable[[], Any]:
    return dag_chain(conn, "bench-dag2", [square, increment], 3)


@latency_case("dag2-direct", "the same 2-function DAG with direct_response=True", expect=10)
def dag2_direct(conn: droplet.DropletConnection, ctx: Context) -> Callable[[], Any]:
    return dag_chain(conn, "bench-dag2", [square, increment], 3, direct_response=True)


@latency_case("chain10", "10-function chain of increments: call_dag(..., {inc0: 0}).get()",
              expect=10)
def chain10(conn: droplet.DropletConnection, ctx: Context) -> Callable[[], Any]:
    return dag_chain(conn, "bench-chain10", [increment] * 10, 0)


@latency_case("fanin3", "3->1 fan-in: three no-op sources feed add3(a, b, c): "
              "call_dag(..., {s0: 1, s1: 2, s2: 3}).get()", expect=6)
def fanin3(conn: droplet.DropletConnection, ctx: Context) -> Callable[[], Any]:
    sources = [f"bench-fanin3-s{i}" for i in range(3)]
    for name in sources:
        conn.register(noop, name)
    conn.register(add3, "bench-fanin3-add3")
    conn.register_dag("bench-fanin3", [*sources, "bench-fanin3-add3"],
                      [(name, "bench-fanin3-add3") for name in sources])
    arg_map = {name: i + 1 for i, name in enumerate(sources)}
    return lambda: conn.call_dag("bench-fanin3", arg_map).get()


def _bigarg_row(mib: int, max_samples: int) -> None:
    @latency_case(f"bigarg{mib}", f"2-function DAG passing a {mib} MiB bytes argument: "
                  "identity -> len", expect=mib * MIB, max_samples=max_samples)
    def bigarg(conn: droplet.DropletConnection, ctx: Context) -> Callable[[], Any]:
        data = b"x" * (mib * MIB)
        call = dag_chain(conn, f"bench-bigarg{mib}", [noop, length], data)
        return call


_bigarg_row(10, 100)
_bigarg_row(50, 30)


# Cloudburst's locality experiment, warm half: a function returning len() of a
# DropletReference argument, the same key read again and again (served by the
# node's cache; see benchmarks/locality.py for cold reads and placement).
REF_SIZES = {"1k": 1024, "1m": MIB, "10m": 10 * MIB}


def _ref_row(label: str, size: int) -> None:
    @latency_case(f"ref{label}-warm", f"len() of a {label.upper()}iB DropletReference "
                  "argument, key cached on the node (warm)", expect=size)
    def ref_warm(conn: droplet.DropletConnection, ctx: Context) -> Callable[[], Any]:
        key = f"bench-ref-{label}"
        conn.put_object(key, b"r" * size)
        fn = conn.register(length, "bench-length")
        ref = droplet.DropletReference(key)
        # Steady state: calls naming a key this client has just written go through
        # the scheduler for WRITE_SETTLE seconds (client/_direct.py).
        time.sleep(WRITE_SETTLE)
        return lambda: fn(ref).get()


for _label, _size in REF_SIZES.items():
    _ref_row(_label, _size)


# Consistency overhead: the same DAG under NORMAL, REPEATABLE_READ and CAUSAL,
# every function reading 2 keys.

def _consistency_rows(prefix: str, description: str, length: int, arg: int,
                      expect: int) -> None:
    def shape(square_reading: Callable[..., Any], inc_reading: Callable[..., Any]
              ) -> list[Callable[..., Any]]:
        return [square_reading, inc_reading] if length == 2 else [inc_reading] * length

    @latency_case(f"{prefix}-keys-normal", f"{description}, NORMAL: each function "
                  "lib.get()s 2 keys stored with put_object", expect=expect)
    def normal(conn: droplet.DropletConnection, ctx: Context) -> Callable[[], Any]:
        return dag_chain(conn, f"bench-{prefix}-keys-normal", shape(*_put_lww_keys(conn)), arg)

    @latency_case(f"{prefix}-keys-rr", "the same, REPEATABLE_READ (reads pinned per run)",
                  expect=expect)
    def rr(conn: droplet.DropletConnection, ctx: Context) -> Callable[[], Any]:
        return dag_chain(conn, f"bench-{prefix}-keys-rr", shape(*_put_lww_keys(conn)), arg,
                         consistency=droplet.REPEATABLE_READ)

    @latency_case(f"{prefix}-keys-causal", "the same, CAUSAL, client_id session; the 2 keys "
                  "written by a CAUSAL DAG run", expect=expect)
    def causal(conn: droplet.DropletConnection, ctx: Context) -> Callable[[], Any]:
        return dag_chain(conn, f"bench-{prefix}-keys-causal", shape(*_write_causal_keys(conn)),
                         arg, consistency=droplet.CAUSAL, client_id=CAUSAL_SESSION)


_consistency_rows("dag2", "2-function DAG square -> increment", 2, 3, expect=16)
_consistency_rows("chain10", "10-function chain of increments", 10, 0, expect=40)


# --------------------------------------------------------------------------- storage

@latency_case("put", "put_object of a new key (an LWW value): acknowledged once stored")
def put(conn: droplet.DropletConnection, ctx: Context) -> Callable[[], Any]:
    keys = itertools.count()
    run = uuid.uuid4().hex[:8]
    return lambda: conn.put_object(f"bench-put-{run}-{next(keys)}", 1)


@latency_case("get", "get_object of an existing key", expect=1)
def get(conn: droplet.DropletConnection, ctx: Context) -> Callable[[], Any]:
    conn.put_object("bench-get", 1)
    return lambda: conn.get_object("bench-get")


@throughput_case("put-throughput",
                 "N concurrent put_object of distinct keys (async API): the store's "
                 "group commit under load")
async def put_throughput(client: droplet.AsyncDropletClient, ctx: Context) -> Measured:
    run = uuid.uuid4().hex[:8]
    for i in range(ctx.warmup):
        await client.put_object(f"bench-warm-{run}-{i}", i)
    n = ctx.concurrent_calls
    latencies = [0] * n

    async def one(i: int) -> None:
        t0 = time.perf_counter_ns()
        await client.put_object(f"bench-tput-{run}-{i}", i)
        latencies[i] = time.perf_counter_ns() - t0

    t0 = time.perf_counter_ns()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    total = time.perf_counter_ns() - t0
    return Measured(latencies, total, n)


def _async_functions() -> tuple[Callable[..., Any], ...]:
    # Nested for the same reason as _remote_functions; ``async def`` functions
    # run as trio tasks on the executor (no worker thread).
    async def square_async(_: Any, x: Any) -> Any:
        return x * x

    async def increment_async(_: Any, x: Any) -> Any:
        return x + 1

    return square_async, increment_async


square_async, increment_async = _async_functions()


async def _sequential(ctx: Context, call: Callable[[], Awaitable[Any]], expect: Any
                      ) -> Measured:
    """Warm up, then time ``ctx.samples`` sequential awaited calls (latency rows, async)."""
    first = await call()
    if first != expect:
        raise AssertionError(f"returned {first!r}, expected {expect!r}")
    for _ in range(ctx.warmup - 1):
        await call()
    n = ctx.samples
    latencies = [0] * n
    clock = time.perf_counter_ns
    t0 = clock()
    for i in range(n):
        start = clock()
        await call()
        latencies[i] = clock() - start
    return Measured(latencies, clock() - t0, n)


@throughput_case("noop-async", "no-op `async def` call with the async client: "
                 "await (await f(1)).get() (sequential; a latency row)")
async def noop_async(client: droplet.AsyncDropletClient, ctx: Context) -> Measured:
    f = await client.register(increment_async, "bench-inc-async")

    async def call() -> Any:
        return await (await f(1)).get()

    return await _sequential(ctx, call, 2)


@throughput_case("dag2-async", "2-function DAG of `async def` square -> increment with the "
                 "async client: await (await call_dag(...)).get() (sequential; a latency row)")
async def dag2_async(client: droplet.AsyncDropletClient, ctx: Context) -> Measured:
    names = ["bench-dag2a-0", "bench-dag2a-1"]
    await client.register(square_async, names[0])
    await client.register(increment_async, names[1])
    await client.register_dag("bench-dag2-async", names, [(names[0], names[1])])

    async def call() -> Any:
        return await (await client.call_dag("bench-dag2-async", {names[0]: 3})).get()

    return await _sequential(ctx, call, 10)


@throughput_case("throughput",
                 "N concurrent no-op calls (async API): issue all exec_func, then get all")
async def throughput(client: droplet.AsyncDropletClient, ctx: Context) -> Measured:
    f = await client.register(noop, "bench-noop")
    for _ in range(ctx.warmup):
        await (await f(1)).get()
    n = ctx.concurrent_calls
    futures: list[Any] = [None] * n
    started = [0] * n
    latencies = [0] * n
    errors: list[BaseException] = []

    async def issue(i: int) -> None:
        started[i] = time.perf_counter_ns()
        futures[i] = await client.exec_func("bench-noop", [i])

    async def collect(i: int) -> None:
        try:
            value = await futures[i].get()
        except droplet.DropletError as exc:
            errors.append(exc)
            return
        latencies[i] = time.perf_counter_ns() - started[i]
        if value != i:
            errors.append(AssertionError(f"call {i} returned {value!r}"))

    t0 = time.perf_counter_ns()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(issue, i)
    issued = time.perf_counter_ns()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(collect, i)
    total = time.perf_counter_ns() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} calls failed; first: {errors[0]!r}")
    return Measured(latencies, total, n, note=f"issue {(issued - t0) / 1e9:.2f} s")


def issue_then_get(n: int, issue: Callable[[int], list[Any]],
                   get: Callable[[Any], Any]) -> Measured:
    """Issue ``n`` calls of ``i -> i`` at once, then ``get`` each future in order.

    The latency of call *i* is the time from the first issue until its ``get``
    returned; the note says how long issuing took. Shared by the sync throughput
    rows and the peers (bench_peers.py).
    """
    t0 = time.perf_counter_ns()
    futures = issue(n)
    issued = time.perf_counter_ns()
    latencies = [0] * n
    for i, future in enumerate(futures):
        value = get(future)
        latencies[i] = time.perf_counter_ns() - t0
        if value != i:
            raise AssertionError(f"call {i} returned {value!r}")
    total = time.perf_counter_ns() - t0
    return Measured(latencies, total, n, note=f"issue {(issued - t0) / 1e9:.2f} s")


def _warm_noop(conn: droplet.DropletConnection, ctx: Context) -> Any:
    f = conn.register(noop, "bench-noop")
    for _ in range(ctx.warmup):
        f(1).get()
    return f


@sync_throughput_case("throughput-sync",
                      "N concurrent no-op calls from one DropletConnection: issue all "
                      "f(i), then get() each future")
def throughput_sync(conn: droplet.DropletConnection, ctx: Context) -> Measured:
    f = _warm_noop(conn, ctx)
    return issue_then_get(ctx.concurrent_calls, lambda n: [f(i) for i in range(n)],
                          lambda future: future.get())


@sync_throughput_case("map-throughput",
                      "N no-op calls from one DropletConnection in one f.map(range(N)) "
                      "(many calls per write), then get() each future")
def map_throughput(conn: droplet.DropletConnection, ctx: Context) -> Measured:
    f = _warm_noop(conn, ctx)
    return issue_then_get(ctx.concurrent_calls, lambda n: f.map(range(n)),
                          lambda future: future.get())


def _model_functions() -> tuple[Callable[..., Any], ...]:
    # A stand-in for a model on one accelerator per executor: calls run one at a
    # time (a process-wide lock) and cost 20 ms each, however many inputs they carry.
    def device() -> Any:
        import sys
        import threading

        return sys.__dict__.setdefault("_droplet_bench_device", threading.Lock())

    def model_one(_: Any, x: Any) -> Any:
        with device():
            time.sleep(0.020)
        return x

    def model_batch(_: Any, xs: list[Any]) -> list[Any]:
        with device():
            time.sleep(0.020)
        return list(xs)

    return model_one, model_batch


async def _model_dag(client: droplet.AsyncDropletClient, ctx: Context, batching: bool
                     ) -> Measured:
    model_one, model_batch = _model_functions()
    name = "bench-model-batch" if batching else "bench-model-one"
    await client.register(model_batch if batching else model_one, name)
    await client.register_dag(name, [name], [],
                              batching_functions=[name] if batching else [])
    n = min(ctx.concurrent_calls, 200)
    started = [0] * n
    latencies = [0] * n
    futures: list[Any] = [None] * n
    t0 = time.perf_counter_ns()
    for i in range(n):
        started[i] = time.perf_counter_ns()
        futures[i] = await client.call_dag(name, {name: i})
    for i in range(n):
        value = await futures[i].get()
        if value != i:
            raise RuntimeError(f"call {i} returned {value!r}")
        latencies[i] = time.perf_counter_ns() - started[i]
    return Measured(latencies, time.perf_counter_ns() - t0, n)


@throughput_case("model-batched",
                 "min(N, 200) concurrent calls of a model that serves one call at a time, "
                 "20 ms each, with batching_functions=[model] (a call serves <= 16 inputs)")
async def model_batched(client: droplet.AsyncDropletClient, ctx: Context) -> Measured:
    return await _model_dag(client, ctx, batching=True)


@throughput_case("model-unbatched", "the same calls of the same model without batching")
async def model_unbatched(client: droplet.AsyncDropletClient, ctx: Context) -> Measured:
    return await _model_dag(client, ctx, batching=False)
