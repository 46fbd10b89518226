"""Droplet's messages: one frozen attrs class per message, registered under its
one-byte tag, with the checks beyond field types that every decoded one passes.

Their wire encoding is :mod:`droplet.protocol.encoding`; its functions are
re-exported here, where the services import them from with the messages.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs

from ..errors import ProtocolError
from .encoding import (
    FLAG_REPLY,
    MESSAGES,
    Blob,
    InvalidMessage,
    _validator,
    decode,
    encode,
    encode_gather,
    message,
)

__all__ = ["FLAG_REPLY", "MESSAGES", "Blob", "InvalidMessage", "decode", "encode",
           "encode_gather"]

# --------------------------------------------------------------------------- generic


@message(1)
@attrs.frozen
class Ok:
    """Empty success reply."""


@message(2)
@attrs.frozen
class ErrorReply:
    """A request failed; ``kind`` names a ``droplet.errors`` class."""

    kind: str
    message: str
    traceback: str = ""


@message(3)
@attrs.frozen
class Hello:
    """First request of a client or node: who am I; answered by ClusterInfo."""

    role: str
    node_id: str
    url: str | None = None


@message(4)
@attrs.frozen
class ClusterInfo:
    kvs: str
    scheduler: str
    node_id: str


@message(5)
@attrs.frozen
class AuthChallenge:
    """Server -> client, first frame on every connection (see handshake.py)."""

    version: int
    nonce: bytes
    required: bool


@message(6)
@attrs.frozen
class AuthResponse:
    """Client -> server: proof of the token, and the client's own challenge."""

    mac: bytes
    nonce: bytes


@message(7)
@attrs.frozen
class AuthResult:
    """Server -> client: accepted (with the server's proof) or refused (with why)."""

    ok: bool
    mac: bytes
    message: str


@message(8)
@attrs.frozen
class BoolReply:
    value: bool


@message(9)
@attrs.frozen
class Names:
    names: list[str]


@message(17)
@attrs.frozen
class GetStatistics:
    """Ask a node process for the sizes and counters of its services."""


@message(18)
@attrs.frozen
class Statistics:
    """``service.field`` -> value, for every integer field of every ``statistics()``."""

    values: dict[str, int]


# --------------------------------------------------------------------------- KVS


@message(10)
@attrs.frozen
class KvsGet:
    """Read ``key``. ``wait`` > 0 blocks up to that many seconds until it exists.

    ``subscribe`` asks the store to push later updates of the key (cache coherence).
    """

    key: str
    wait: float | None = None
    subscribe: bool = False
    #: REPEATABLE_READ: the run id whose pinned version of the key to return
    #: (pinning the current version on the run's first read of it).
    pin: str | None = None


@message(11)
@attrs.frozen
class KvsValue:
    key: str
    lattice: bytes | None


@message(12)
@attrs.frozen
class KvsPut:
    key: str
    lattice: bytes
    subscribe: bool = False


@message(13)
@attrs.frozen
class KvsStored:
    """Reply to KvsPut: the key's stored lattice type after the merge."""

    type_name: str


@message(14)
@attrs.frozen
class KvsUpdate:
    """Store -> subscribed cache: the key's merged value changed."""

    key: str
    lattice: bytes


@message(15)
@attrs.frozen
class KvsUnsubscribe:
    key: str


@message(16)
@attrs.frozen
class KvsRelease:
    """Scheduler -> store, one-way: a run ended; drop the versions pinned for it."""

    run_id: str


@message(19)
@attrs.frozen
class KvsForget:
    """Client -> store, one-way: nobody will read these call results again.

    Sent in batches when futures are garbage-collected (see
    ``client/_release.py``). The store deletes the keys that are call results
    (``__droplet/results/...``) and ignores any other key; a result that is
    not stored yet is dropped as soon as it arrives.
    """

    keys: list[str]


# --------------------------------------------------------------------------- scheduler


@message(20)
@attrs.frozen
class RegisterFunction:
    name: str
    code: bytes


@message(21)
@attrs.frozen
class ListFunctions:
    prefix: str | None = None


@message(22)
@attrs.frozen
class FunctionExists:
    name: str


@message(23)
@attrs.frozen
class RegisterDag:
    """A DAG definition (checked on the client, validated again by the scheduler).

    ``multiexec`` names the multi-exec functions and ``invalid_results`` holds,
    for each of them in order, its pickled list of invalid results.
    """

    name: str
    functions: list[str]
    connections: list[list[str]]
    colocated: list[str]
    multiexec: list[str] = attrs.Factory(list)
    invalid_results: list[bytes] = attrs.Factory(list)
    gpu_functions: list[str] = attrs.Factory(list)
    batching_functions: list[str] = attrs.Factory(list)


@message(24)
@attrs.frozen
class DeleteDag:
    name: str


@message(25)
@attrs.frozen
class CallDag:
    """Run a DAG (or, with ``is_function``, one function as a one-node DAG)."""

    target: str
    is_function: bool
    arg_fns: list[str]
    arg_blobs: list[Blob]
    consistency: str = "NORMAL"
    output_key: str | None = None
    client_id: str | None = None
    direct: bool = False
    timeout: float | None = None
    #: chosen by the client so it can wait for the result while the call is
    #: still being scheduled (saves a round trip); generated when None.
    result_key: str | None = None
    #: CAUSAL: the client session's causal context (consistency.CausalContext).
    causal: bytes | None = None
    #: another DAG's call (an encoded, unsent CallDag from ``dry_run``) to run
    #: on this DAG's result; its result is this call's result.
    continuation: bytes | None = None
    #: per ``arg_fns`` entry, the keys of the DropletReference arguments it
    #: gets (empty list: none known), so placement can prefer executors whose
    #: node caches them without unpickling the arguments.
    references: list[list[str]] = attrs.Factory(list)


@message(26)
@attrs.frozen
class CallAccepted:
    run_id: str
    result_key: str


@message(27)
@attrs.frozen
class DagResult:
    """The sink's outcome: a pickled value, or a pickled FunctionError when failed."""

    run_id: str
    value: Blob
    failed: bool


@message(28)
@attrs.frozen
class RunDone:
    """Executor -> scheduler, one-way: a run's sink finished.

    Carries the result only for direct-response runs (the scheduler holds the
    caller's request open and answers it with this value).
    """

    run_id: str
    value: Blob | None
    failed: bool


@message(29)
@attrs.frozen
class ExecutorJoin:
    """Executor -> scheduler: I serve triggers at ``url``; keep this link open."""

    url: str
    node_id: str
    workers: int
    #: resource labels, e.g. ``{"gpu": 1}`` (``--resources gpu=1``).
    resources: dict[str, int] = attrs.Factory(dict)


@message(30)
@attrs.frozen
class ExecutorReport:
    """Executor -> scheduler, one-way, every report period: load and deltas.

    ``threads``/``busy``/``queued``/``running`` and the ``cache_entries`` and
    ``cache_bytes`` are current values; everything else counts what happened
    since the previous report. ``latency`` holds, per function in
    ``functions`` order, its :data:`droplet.latency.BUCKETS` bucket counts;
    ``latency_us`` the sum of those latencies in microseconds.
    """

    url: str
    threads: int
    busy: int
    queued: int
    running: int
    cache_entries: int
    cache_bytes: int
    cache_hits: int
    cache_misses: int
    functions: list[str]
    calls: list[int]
    failures: list[int]
    latency: list[int]
    latency_us: list[int]
    #: entries the cache evicted since the previous report.
    cache_evictions: int = 0
    #: what the executor's node caches, for data-aware placement: keys of at
    #: least REPORT_MIN_SIZE bytes (the largest, at most REPORT_MAX_KEYS) with
    #: their sizes, added or resized since the previous report, and keys gone
    #: since. ``cache_full``: ``cached_keys`` is the whole summary (the first
    #: report, and the one after a report was dropped), not a change.
    cached_keys: list[str] = attrs.Factory(list)
    cached_sizes: list[int] = attrs.Factory(list)
    uncached_keys: list[str] = attrs.Factory(list)
    cache_full: bool = False


@message(31)
@attrs.frozen
class GetStatus:
    """Ask the scheduler for the cluster's status; answered by StatusReply."""


@message(32)
@attrs.frozen
class StatusReply:
    """The cluster status as JSON (:meth:`droplet.status.ClusterStatus.to_json`)."""

    data: str


@message(33)
@attrs.frozen
class ListDags:
    """Ask for the registered DAG names; answered by Names."""


@message(36)
@attrs.frozen
class PoolQuery:
    """Adaptive executor node -> scheduler: how are my workers (node ids with ``prefix``)?

    Answered by :class:`PoolReply`. ``status`` is the node's own scaling status
    as JSON (:meth:`droplet.status.ScalingStatus.to_dict`), shown in the
    cluster's status; empty for none.

    The first query claims ``prefix`` for this link: one prefix per link, with a
    "-" in it, overlapping no other node's; executors that join with node ids
    ``prefix...`` are then this link's to drain (:class:`DrainExecutor`).
    """

    prefix: str
    status: str = ""


@message(37)
@attrs.frozen
class PoolReply:
    """The executors whose node ids start with the asked prefix, one entry per list index.

    ``busy``/``queued``/``running`` are from each executor's latest report;
    ``in_flight`` and ``placed`` count the functions the scheduler placed on it
    that have not finished, and all it ever placed there.
    """

    node_ids: list[str]
    urls: list[str]
    busy: list[int]
    queued: list[int]
    running: list[int]
    in_flight: list[int]
    placed: list[int]


@message(38)
@attrs.frozen
class DrainExecutor:
    """Adaptive executor node -> scheduler: place nothing more on ``url``.

    Answered with ``BoolReply(True)`` once nothing placed there runs any more
    (the executor is then forgotten and may stop), ``BoolReply(False)`` when
    no executor joined at ``url``. Refused (ProtocolError) for an executor that
    is not one of this link's workers (see :class:`PoolQuery`).
    """

    url: str

@message(46)
@attrs.frozen
class PlaceCall:
    """Client -> scheduler: where may calls of ``target`` go straight to?

    ``target`` is a function (``is_function``) or a DAG. Answered by
    :class:`CallPlaced`, or the error a call of it would get (no such function
    or DAG). ``references``: the keys of the call's ``DropletReference``
    arguments (empty for none), so the placement can follow their data;
    ``calls``: how many such calls the client is about to send (a ``map``).
    """

    target: str
    is_function: bool
    references: list[str] = attrs.Factory(list)
    calls: int = 1


@message(47)
@attrs.frozen
class CallPlaced:
    """A whole run of ``target`` may go to any one of ``executors`` (least loaded first).

    ``functions``, ``versions`` and ``edges`` are the run's schedule, as in a
    :class:`Trigger`. The client may send runs straight to those executors for
    ``lease`` seconds, then asks again (the scheduler owns placement and load).
    No executors: send calls of ``target`` through the scheduler.
    ``preferred``: spread runs over the first ``preferred`` executors only (those
    caching the call's referenced data), the others being fallbacks in order;
    0 spreads them over all.
    """

    target: str
    is_function: bool
    functions: list[str]
    versions: list[str]
    edges: list[list[str]]
    executors: list[str]
    lease: float
    preferred: int = 0


# --------------------------------------------------------------------------- executor


@message(48)
@attrs.frozen
class FunctionRegistered:
    """Scheduler -> executors, one-way: function ``name`` is registered at ``version``.

    Executors load its code now, so its first call does not wait for the store.
    """

    name: str
    version: str


@message(40)
@attrs.frozen
class Trigger:
    """Run ``function`` of a scheduled DAG run (one-way).

    The schedule travels with every trigger, so an executor needs no state from
    the scheduler: ``placement[i]`` is the executor URL of ``functions[i]``, and
    ``arg_fns``/``arg_blobs`` carry the callers' pickled arguments. ``source``
    names the upstream function whose pickled ``result`` this is (None for a
    source function).
    """

    run_id: str
    function: str
    functions: list[str]
    versions: list[str]
    placement: list[str]
    edges: list[list[str]]
    arg_fns: list[str]
    arg_blobs: list[Blob]
    source: str | None
    result: Blob | None
    failed: bool
    result_key: str
    output_key: str | None
    direct: bool
    consistency: str
    client_id: str | None
    deadline: float | None
    scheduler: str
    #: CAUSAL: the causal context of the run so far.
    causal: bytes | None = None
    #: multi-exec functions, with each one's pickled list of invalid results.
    multiexec: list[str] = attrs.Factory(list)
    invalid_results: list[bytes] = attrs.Factory(list)
    #: functions whose queued calls an executor runs as one batch.
    batching: list[str] = attrs.Factory(list)
    #: a pickled value appended to a source function's arguments (continuations).
    carried: Blob | None = None
    #: False: a run a client sent straight to this executor whose result goes
    #: only to that client (in its DagResult); the executor writes no result
    #: key (the client stores the result itself if anyone asks for the key).
    store_result: bool = True
    #: True: a client's direct run of a DAG with several sources, sent as this
    #: one trigger (a request) for all of them: the executor starts every
    #: source of the run (each with the arguments this trigger carries).
    whole_run: bool = False

    #: ``store_result`` and ``whole_run`` came last: older clients send the
    #: trigger without them.
    OPTIONAL_TAIL: ClassVar[int] = 2


@message(41)
@attrs.frozen
class Mail:
    """Invocation-to-invocation message (user library ``send``)."""

    dest: str
    sender: str
    data: bytes


# --------------------------------------------------------------------------- node cache


@message(42)
@attrs.frozen
class CacheGet:
    """Worker process -> its node's cache: the value of ``key``, unless I hold ``version``.

    ``refresh`` reads the store even when the key is cached (a read that must
    not be stale); ``inline`` asks for the bytes in the reply rather than a
    shared-memory segment (after a segment vanished before it was mapped).
    """

    key: str
    version: int = 0
    refresh: bool = False
    inline: bool = False


@message(43)
@attrs.frozen
class CacheValue:
    """Node cache -> worker: ``key`` at ``version`` (0: absent).

    Exactly one of: ``data`` (the encoded lattice), ``segment`` (the name of a
    shared-memory segment of ``size`` bytes holding it, laid out as
    ``layout`` says), or neither when the worker already holds ``version``.
    ``hit``: the node had it cached. ``keep``: the worker may hold it until
    told otherwise; False when the node keeps no copy (too big for its cache),
    so no invalidation would ever come: serve this read only.
    """

    key: str
    version: int
    hit: bool
    size: int = 0
    data: bytes | None = None
    segment: str | None = None
    #: how the segment holds the value: "" the encoded lattice, "oob" a
    #: protocol-5 pickle with out-of-band buffers (numpy; see executor/oob.py).
    layout: str = ""
    keep: bool = True


@message(44)
@attrs.frozen
class CachePut:
    """Worker process -> its node's cache: merge ``lattice`` into ``key`` (through the store).

    Answered with KvsStored once the node's cache holds the merged value, so
    the writer reads its own write.
    """

    key: str
    lattice: bytes


@message(45)
@attrs.frozen
class CacheInvalidate:
    """Node cache -> worker process, one-way: these keys changed or left the node's cache.

    Sent to the workers that were given a version of them: a worker serves
    its held versions locally until told this (so a warm read needs no
    round trip), then asks again.
    """

    keys: list[str]


# --------------------------------------------------------------------------- validation

#: The longest wait or timeout a peer may ask for (a day), in seconds.
MAX_SECONDS = 86_400.0


def _check_seconds(cls: str, name: str, value: float | None, *, absolute: bool = False) -> None:
    if value is None:
        return
    finite = type(value) is int or math.isfinite(value)  # isfinite(10**400) overflows
    if not finite or (not absolute and not 0 <= value <= MAX_SECONDS):
        raise ProtocolError(f"{cls}.{name} must be a finite number of seconds"
                            f"{'' if absolute else f' in [0, {MAX_SECONDS:g}]'}, not {value!r}")


def _check_causal(cls: str, data: bytes | None) -> None:
    if data:
        from ..consistency import CausalContext  # pure code; imported late (cycle)

        try:
            CausalContext.decode(data)
        except ProtocolError as exc:
            raise ProtocolError(f"{cls}.causal: {exc}") from None


@_validator(CallDag)
def _check_call(m: CallDag) -> None:
    if len(m.arg_fns) != len(m.arg_blobs):
        raise ProtocolError(f"CallDag: {len(m.arg_fns)} arg_fns but {len(m.arg_blobs)} "
                            "arg_blobs")
    _check_seconds("CallDag", "timeout", m.timeout)
    _check_causal("CallDag", m.causal)
    if m.references and len(m.references) != len(m.arg_fns):
        raise ProtocolError(f"CallDag: {len(m.references)} reference lists for "
                            f"{len(m.arg_fns)} arg_fns")
    if sum(len(keys) for keys in m.references) > MAX_CALL_REFERENCES:
        raise ProtocolError(f"CallDag: more than {MAX_CALL_REFERENCES} reference keys")


@_validator(Trigger)
def _check_trigger(m: Trigger) -> None:
    n = len(m.functions)
    if len(m.versions) != n or len(m.placement) != n:
        raise ProtocolError(f"Trigger: {n} functions but {len(m.versions)} versions and "
                            f"{len(m.placement)} placements")
    known = set(m.functions)
    if m.function not in known:
        raise ProtocolError(f"Trigger: function {m.function!r} is not in the run")
    if m.source is not None and m.source not in known:
        raise ProtocolError(f"Trigger: source {m.source!r} is not in the run")
    for edge in m.edges:
        if len(edge) != 2 or edge[0] not in known or edge[1] not in known:
            raise ProtocolError(f"Trigger: edge {edge!r} is not a pair of the run's functions")
    if len(m.arg_fns) != len(m.arg_blobs):
        raise ProtocolError(f"Trigger: {len(m.arg_fns)} arg_fns but {len(m.arg_blobs)} "
                            "arg_blobs")
    for fn in m.arg_fns:
        if fn not in known:
            raise ProtocolError(f"Trigger: arguments for {fn!r}, which is not in the run")
    if len(m.multiexec) != len(m.invalid_results):
        raise ProtocolError(f"Trigger: {len(m.multiexec)} multiexec functions but "
                            f"{len(m.invalid_results)} invalid_results")
    for fn in (*m.multiexec, *m.batching):
        if fn not in known:
            raise ProtocolError(f"Trigger: multiexec or batching names {fn!r}, which is not "
                                "in the run")
    if (m.source is None) != (m.result is None):
        raise ProtocolError("Trigger: a result needs a source, and a source a result")
    _check_seconds("Trigger", "deadline", m.deadline, absolute=True)
    _check_causal("Trigger", m.causal)
    if not m.store_result and (m.direct or m.output_key is not None
                               or m.consistency != "NORMAL" or m.scheduler):
        raise ProtocolError("Trigger.store_result may be false only for a NORMAL run a "
                            "client sent straight to an executor (not direct, no output "
                            "key, no scheduler)")
    if m.whole_run and (m.source is not None or m.direct or m.scheduler
                        or m.carried is not None):
        raise ProtocolError("Trigger.whole_run may be true only for a source trigger a "
                            "client sent straight to an executor (not direct, no "
                            "scheduler, no continuation)")


@_validator(KvsGet)
def _check_get(m: KvsGet) -> None:
    if type(m.wait) is float and math.isnan(m.wait):
        raise ProtocolError("KvsGet.wait must be a number of seconds, not NaN")


#: Most reference keys one CallDag may name (clients send at most 64 per function).
MAX_CALL_REFERENCES = 4096
#: Most functions one executor report may name.
MAX_REPORTED_FUNCTIONS = 10_000
#: Most cached keys (added and removed) one executor report may name.
MAX_REPORTED_KEYS = 4096


@_validator(PlaceCall)
def _check_place(m: PlaceCall) -> None:
    if len(m.references) > MAX_CALL_REFERENCES:
        raise ProtocolError(f"PlaceCall: more than {MAX_CALL_REFERENCES} reference keys")
    if m.calls < 1:
        raise ProtocolError(f"PlaceCall.calls must be at least 1, not {m.calls!r}")


@_validator(CallPlaced)
def _check_placed(m: CallPlaced) -> None:
    if type(m.preferred) is not int or not 0 <= m.preferred <= len(m.executors):
        raise ProtocolError(f"CallPlaced.preferred must be 0..{len(m.executors)}, "
                            f"not {m.preferred!r}")


@_validator(ExecutorReport)
def _check_report(m: ExecutorReport) -> None:
    from ..latency import BUCKETS  # pure code

    n = len(m.functions)
    if n > MAX_REPORTED_FUNCTIONS:
        raise ProtocolError(f"ExecutorReport: {n} functions, more than "
                            f"{MAX_REPORTED_FUNCTIONS}")
    if len(set(m.functions)) != n:
        raise ProtocolError("ExecutorReport: a function is named twice")
    for name, values, size in (("calls", m.calls, n), ("failures", m.failures, n),
                               ("latency", m.latency, n * BUCKETS),
                               ("latency_us", m.latency_us, n)):
        if len(values) != size:
            raise ProtocolError(f"ExecutorReport: {len(values)} {name} for {n} functions "
                                f"(expected {size})")
        if any(v < 0 for v in values):
            raise ProtocolError(f"ExecutorReport.{name} must not be negative")
    if len(m.cached_keys) != len(m.cached_sizes):
        raise ProtocolError(f"ExecutorReport: {len(m.cached_keys)} cached_keys but "
                            f"{len(m.cached_sizes)} cached_sizes")
    if len(m.cached_keys) + len(m.uncached_keys) > MAX_REPORTED_KEYS:
        raise ProtocolError(f"ExecutorReport: more than {MAX_REPORTED_KEYS} cached keys")
    if any(v < 0 for v in m.cached_sizes):
        raise ProtocolError("ExecutorReport.cached_sizes must not be negative")
    for name in ("threads", "busy", "queued", "running", "cache_entries", "cache_bytes",
                 "cache_hits", "cache_misses", "cache_evictions"):
        if getattr(m, name) < 0:
            raise ProtocolError(f"ExecutorReport.{name} must not be negative")
    for i, (fn, calls, failures) in enumerate(zip(m.functions, m.calls, m.failures,
                                                  strict=True)):
        if failures > calls:
            raise ProtocolError(f"ExecutorReport: {fn!r} has more failures than calls")
        if sum(m.latency[i * BUCKETS:(i + 1) * BUCKETS]) != calls:
            raise ProtocolError(f"ExecutorReport: {fn!r} latency buckets do not add up to "
                                "its calls")


@_validator(CacheValue)
def _check_cache_value(m: CacheValue) -> None:
    if m.version < 0 or m.size < 0:
        raise ProtocolError("CacheValue.version and size must not be negative")
    if m.data is not None and m.segment is not None:
        raise ProtocolError("CacheValue carries data or a segment, not both")
    if m.layout not in ("", "oob"):
        raise ProtocolError(f"CacheValue.layout {m.layout!r} is not '' or 'oob'")


@_validator(StatusReply)
def _check_status(m: StatusReply) -> None:
    from ..status import ClusterStatus  # pure code; imported late (cycle)

    ClusterStatus.from_json(m.data)
