"""The cluster's status as a frozen record, its JSON form and its table. Pure code.

The scheduler builds a :class:`ClusterStatus` from its registry and the
executors' periodic reports (:mod:`droplet.scheduler.reports`);
``conn.status()`` returns it and ``droplet status`` prints it
(:func:`format_status`). On the wire it travels as JSON, and
:meth:`ClusterStatus.from_json` checks every field's type, so a garbled reply
is a :class:`~droplet.errors.ProtocolError`, never a half-built record.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import attrs

from .errors import ProtocolError

__all__ = ["ClusterStatus", "ExecutorStatus", "FunctionStatus", "ScaleEvent", "ScalingStatus",
           "format_status"]


def _ratio(hits: int, misses: int) -> float | None:
    total = hits + misses
    return hits / total if total else None


@attrs.frozen
class ExecutorStatus:
    """One executor (a worker process, or an ``--role executor`` node) and its load."""

    #: where it serves triggers.
    url: str
    #: worker threads for plain ``def`` functions, and how many run one now.
    threads: int
    busy: int
    #: sync calls waiting for a free thread.
    queued: int
    #: invocations running (async functions and those in threads).
    running: int
    cache_entries: int
    cache_bytes: int
    cache_hits: int
    cache_misses: int
    #: seconds since its last report (None: none yet).
    last_report_age: float | None = None
    #: values its cache dropped to stay within ``--cache-size``.
    cache_evictions: int = 0

    @property
    def cache_hit_ratio(self) -> float | None:
        """Hits / (hits + misses) of its cache, None before any read."""
        return _ratio(self.cache_hits, self.cache_misses)


@attrs.frozen
class FunctionStatus:
    """One registered function and what its calls did, over the whole cluster."""

    name: str
    calls: int = 0
    failures: int = 0
    #: calls per second over the scheduler's recent window (see ``rate_window``).
    calls_per_second: float = 0.0
    #: latency quantiles in seconds (the upper bound of their histogram
    #: bucket; ``inf`` past the last bucket); None before any call.
    p50: float | None = None
    p99: float | None = None
    #: total latency of all calls, in seconds.
    latency_total: float = 0.0
    #: call counts per bucket of :data:`droplet.latency.LATENCY_BOUNDS` (plus overflow).
    latency_buckets: tuple[int, ...] = ()


@attrs.frozen
class ScaleEvent:
    """An executor started or stopped by an adaptive node (``--executors MIN:MAX``)."""

    #: when, in seconds since the epoch.
    time: float
    #: ``"up"`` (one started) or ``"down"`` (one drained and stopped).
    direction: str
    #: executors running after the event.
    executors: int
    #: why, in words (e.g. "3.0 queued calls per executor for 2.0 s").
    reason: str


@attrs.frozen
class ScalingStatus:
    """The adaptive executors of the scheduler's node: bounds, count and recent events."""

    minimum: int
    maximum: int
    #: executors running now (joined, not being drained).
    current: int
    #: started and not joined yet; being drained (finishing their calls).
    starting: int = 0
    draining: int = 0
    #: executors started and stopped since the node started.
    scale_ups: int = 0
    scale_downs: int = 0
    #: the latest events, oldest first.
    events: tuple[ScaleEvent, ...] = ()
    #: which node: "" for the scheduler's own, else an executor node's address.
    node: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self, recurse=False),
                "events": [attrs.asdict(e) for e in self.events]}

    @classmethod
    def from_dict(cls, data: Any) -> ScalingStatus:
        d = _fields(data, "status.scaling", _SCALING_FIELDS)
        d["events"] = tuple(ScaleEvent(**_fields(e, "status.scaling.events[]",
                                                 _EVENT_FIELDS))
                            for e in d["events"])
        return cls(**d)


@attrs.frozen
class ClusterStatus:
    """What ``conn.status()`` returns: the cluster as its scheduler sees it."""

    #: the scheduler's node id.
    scheduler: str
    executors: tuple[ExecutorStatus, ...]
    #: every registered function (sorted by name), with its call statistics.
    functions: tuple[FunctionStatus, ...]
    #: registered DAG names, sorted.
    dags: tuple[str, ...]
    #: seconds over which ``calls_per_second`` is measured.
    rate_window: float = 10.0
    #: the scheduler's node runs adaptive executors: their bounds and events.
    scaling: ScalingStatus | None = None
    #: ``--role executor`` nodes running adaptive executors (``--executors MIN:MAX``).
    pools: tuple[ScalingStatus, ...] = ()

    @property
    def busy(self) -> int:
        return sum(e.busy for e in self.executors)

    @property
    def queued(self) -> int:
        return sum(e.queued for e in self.executors)

    @property
    def cache_bytes(self) -> int:
        return sum(e.cache_bytes for e in self.executors)

    @property
    def cache_hit_ratio(self) -> float | None:
        """Over every executor's cache; None before any read."""
        return _ratio(sum(e.cache_hits for e in self.executors),
                      sum(e.cache_misses for e in self.executors))

    def function(self, name: str) -> FunctionStatus | None:
        """The statistics of function ``name``, or None when it is not registered."""
        return next((f for f in self.functions if f.name == name), None)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler,
            "rate_window": self.rate_window,
            "executors": [attrs.asdict(e) for e in self.executors],
            "functions": [{**attrs.asdict(f), "latency_buckets": list(f.latency_buckets),
                           "p50": _finite(f.p50), "p99": _finite(f.p99)}
                          for f in self.functions],
            "dags": list(self.dags),
            **({} if self.scaling is None else {"scaling": self.scaling.to_dict()}),
            **({"pools": [p.to_dict() for p in self.pools]} if self.pools else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ClusterStatus:
        """Parse and check a status; ProtocolError naming the first bad field."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"status: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> ClusterStatus:
        scaling = None
        pools: tuple[ScalingStatus, ...] = ()
        if type(data) is dict and ("scaling" in data or "pools" in data):
            data = dict(data)
            if "scaling" in data:
                scaling = ScalingStatus.from_dict(data.pop("scaling"))
            found = data.pop("pools", [])
            if type(found) is not list:
                raise ProtocolError("status.pools must be a list")
            pools = tuple(ScalingStatus.from_dict(p) for p in found)
        d = _fields(data, "status", {"scheduler": str, "rate_window": float,
                                     "executors": list, "functions": list, "dags": list})
        executors = tuple(ExecutorStatus(**_fields(e, "status.executors[]", _EXECUTOR_FIELDS))
                          for e in d["executors"])
        functions = []
        for f in d["functions"]:
            fd = _fields(f, "status.functions[]", _FUNCTION_FIELDS)
            buckets = fd["latency_buckets"]
            if not all(type(b) is int and b >= 0 for b in buckets):
                raise ProtocolError("status.functions[].latency_buckets must be counts")
            fd["latency_buckets"] = tuple(buckets)
            for q in ("p50", "p99"):  # JSON has no inf: a huge value stands for it
                if fd[q] is not None and fd[q] >= _INF_STANDIN:
                    fd[q] = math.inf
            functions.append(FunctionStatus(**fd))
        if not all(type(n) is str for n in d["dags"]):
            raise ProtocolError("status.dags must be a list of names")
        return cls(d["scheduler"], executors, tuple(functions), tuple(d["dags"]),
                   d["rate_window"], scaling, pools)


_INF_STANDIN = 1e300
_EXECUTOR_FIELDS: dict[str, Any] = {
    "url": str, "threads": int, "busy": int, "queued": int, "running": int,
    "cache_entries": int, "cache_bytes": int, "cache_hits": int, "cache_misses": int,
    "last_report_age": (float, None), "cache_evictions": int,
}
_SCALING_FIELDS: dict[str, Any] = {
    "minimum": int, "maximum": int, "current": int, "starting": int, "draining": int,
    "scale_ups": int, "scale_downs": int, "events": list, "node": str,
}
_EVENT_FIELDS: dict[str, Any] = {
    "time": float, "direction": str, "executors": int, "reason": str,
}
_FUNCTION_FIELDS: dict[str, Any] = {
    "name": str, "calls": int, "failures": int, "calls_per_second": float,
    "p50": (float, None), "p99": (float, None), "latency_total": float,
    "latency_buckets": list,
}


def _finite(value: float | None) -> float | None:
    return _INF_STANDIN if value is not None and math.isinf(value) else value


def _fields(data: Any, where: str, spec: dict[str, Any]) -> dict[str, Any]:
    if type(data) is not dict:
        raise ProtocolError(f"{where} must be an object, not {type(data).__name__}")
    if set(data) != set(spec):
        missing = sorted(set(spec) - set(data))
        extra = sorted(set(data) - set(spec))
        raise ProtocolError(f"{where}: missing fields {missing}, unknown fields {extra}")
    out = dict(data)
    for name, kind in spec.items():
        value = data[name]
        optional = isinstance(kind, tuple)
        base = kind[0] if optional else kind
        if optional and value is None:
            continue
        if base is float:
            ok = type(value) in (int, float) and math.isfinite(value) and value >= 0
            out[name] = float(value) if ok else value
        elif base is int:
            ok = type(value) is int and value >= 0
        else:
            ok = type(value) is base
        if not ok:
            raise ProtocolError(f"{where}.{name} must be a non-negative {base.__name__}"
                                if base in (int, float) else
                                f"{where}.{name} must be {base.__name__}, "
                                f"not {type(value).__name__}")
    return out


# ---------------------------------------------------------------------- table


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return f">{60_000:g}"
    return f"{seconds * 1000:.3g}"


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.0%}"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(headers, widths, strict=True)))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return lines


def format_status(status: ClusterStatus, address: str = "") -> str:
    """The human-readable tables ``droplet status`` prints."""
    where = f" at {address}" if address else ""
    lines = [
        f"Droplet cluster{where} (scheduler {status.scheduler})",
        f"  executors: {len(status.executors)}   busy threads: {status.busy}   "
        f"queued: {status.queued}   cache: {_bytes(status.cache_bytes)}, "
        f"hit ratio {_percent(status.cache_hit_ratio)}",
        "",
    ]
    for scaling in ((status.scaling,) if status.scaling else ()) + status.pools:
        lines[-1:-1] = _scaling_lines(scaling)
    lines += _table(
        ["EXECUTOR", "THREADS", "BUSY", "QUEUED", "RUNNING", "CACHED", "CACHE", "HITS",
         "EVICTED", "SEEN"],
        [[e.url, str(e.threads), str(e.busy), str(e.queued), str(e.running),
          str(e.cache_entries), _bytes(e.cache_bytes), _percent(e.cache_hit_ratio),
          str(e.cache_evictions), "-" if e.last_report_age is None else f"{e.last_report_age:.1f}s"]
         for e in status.executors])
    lines.append("")
    lines += _table(
        ["FUNCTION", "CALLS", "FAILED", "CALLS/S", "P50 MS", "P99 MS"],
        [[f.name, str(f.calls), str(f.failures), f"{f.calls_per_second:.1f}", _ms(f.p50),
          _ms(f.p99)] for f in status.functions])
    lines.append("")
    lines.append(f"DAGS ({len(status.dags)}): {', '.join(status.dags) or '-'}")
    return "\n".join(lines)


def _scaling_lines(scaling: ScalingStatus) -> list[str]:
    where = f" of {scaling.node}" if scaling.node else ""
    lines = [f"  adaptive executors{where}: {scaling.current} running (min {scaling.minimum}, "
             f"max {scaling.maximum}), {scaling.starting} starting, {scaling.draining} "
             f"draining; {scaling.scale_ups} started, {scaling.scale_downs} stopped"]
    for event in scaling.events[-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(event.time))
        lines.append(f"    {when} {event.direction:<4} -> {event.executors}: {event.reason}")
    return lines
