"""Statistics and the plain-text table of results."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Result", "environment_line", "format_table", "summarize"]


@dataclasses.dataclass
class Result:
    """One row of the table: a case measured on a target."""

    case: str
    target: str
    n: int = 0
    p50_ns: float | None = None
    p99_ns: float | None = None
    mean_ns: float | None = None
    total_s: float | None = None
    #: Calls per second: N / total for sequential latency rows, concurrent
    #: completions per second for throughput rows.
    per_s: float | None = None
    error: str | None = None
    note: str = ""


def percentile(sorted_ns: Sequence[int], q: int) -> float:
    """The q-th percentile (1..99) of sorted samples (``statistics.quantiles``, inclusive)."""
    if len(sorted_ns) == 1:
        return float(sorted_ns[0])
    return statistics.quantiles(sorted_ns, n=100, method="inclusive")[q - 1]


def summarize(case: str, target: str, samples_ns: Sequence[int], total_ns: int,
              calls: int | None = None, note: str = "") -> Result:
    """A row from per-call latencies (ns) and the wall time of the whole measurement."""
    data = sorted(samples_ns)
    calls = len(data) if calls is None else calls
    total_s = total_ns / 1e9
    return Result(
        case=case, target=target, n=calls,
        p50_ns=percentile(data, 50) if data else None,
        p99_ns=percentile(data, 99) if data else None,
        mean_ns=statistics.fmean(data) if data else None,
        total_s=total_s,
        per_s=calls / total_s if total_s > 0 else None,
        note=note,
    )


def _ms(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:.3f}"


def format_table(results: Sequence[Result]) -> str:
    headers = ["case", "target", "N", "p50 ms", "p99 ms", "mean ms", "calls/s", "total s",
               "note"]
    right = {"N", "p50 ms", "p99 ms", "mean ms", "calls/s", "total s"}
    rows: list[list[str]] = []
    for r in results:
        if r.error is not None:
            rows.append([r.case, r.target, "-", "-", "-", "-", "-", "-",
                         f"FAILED: {r.error}"])
            continue
        rows.append([
            r.case, r.target, str(r.n), _ms(r.p50_ns), _ms(r.p99_ns), _ms(r.mean_ns),
            "-" if r.per_s is None else f"{r.per_s:,.0f}",
            "-" if r.total_s is None else f"{r.total_s:.2f}",
            r.note,
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if h in right else c.ljust(w)
               for c, w, h in zip(cells, widths, headers, strict=True)]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(row) for row in rows)])


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def environment_line() -> str:
    import trio

    import droplet

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return (f"{platform.python_implementation()} {platform.python_version()} "
            f"on {sys.platform} ({platform.machine()}), "
            f"{os.cpu_count()} CPUs ({usable} usable), {now}, "
            f"droplet {droplet.__version__} @ {_git_commit()}, trio {trio.__version__}")
