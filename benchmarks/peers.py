"""Droplet side by side with Ray and Dask distributed, in one run.

    python benchmarks/peers.py [--quick] [--only ROWS] [--targets tcp,embedded]
                               [--peers ray,dask] [--json FILE]

Runs the comparable rows (``COMPARED``) on Droplet's targets (see run.py) and on
each installed peer (see bench_peers.py), then prints the full table and a
comparison: p50 and p99 per system and the peer-to-Droplet ratio (for latency,
peer p50 / Droplet p50: above 1 means Droplet is faster; for throughput, Droplet
calls/s / peer calls/s). ``nox -s bench-peers`` installs the peers into its own
virtualenv and runs this script.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import shlex
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cases import CASES, Context  # noqa: E402
from bench_peers import PEERS, Peer  # noqa: E402
from bench_report import Result, environment_line, format_table, summarize  # noqa: E402
from bench_targets import TargetOptions, make_target  # noqa: E402
from run import run_cases, time_calls  # noqa: E402

COMPARED = ("noop", "dag2", "chain10", "fanin3", "throughput-sync", "bigarg10", "bigarg50",
            "ref1k-warm", "ref1m-warm", "ref10m-warm")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/peers.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="400 samples, 50 warm-up calls")
    p.add_argument("-n", "--samples", type=int, metavar="N", help="timed calls per row "
                   "(default 2000; big-argument rows are capped)")
    p.add_argument("--warmup", type=int, metavar="N", help="warm-up calls (default 200)")
    p.add_argument("--calls", type=int, default=5000, metavar="N",
                   help="calls of the throughput row (default 5000)")
    p.add_argument("--only", metavar="ROWS", default=",".join(COMPARED),
                   help=f"comma-separated rows or globs (default {','.join(COMPARED)})")
    p.add_argument("--targets", default="tcp,embedded", metavar="LIST",
                   help="Droplet targets (default tcp,embedded; see run.py)")
    p.add_argument("--peers", default="ray,dask", metavar="LIST",
                   help=f"peers to run (default ray,dask; known: {', '.join(PEERS)})")
    p.add_argument("--executors", type=int, default=2, metavar="N",
                   help="Droplet executors and peer worker processes (default 2)")
    p.add_argument("--node-args", default="", metavar="ARGS",
                   help="extra flags for the Droplet nodes started")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run_peer(peer: Peer, rows: Sequence[str], ctx: Context, results: list[Result]) -> None:
    for row in rows:
        case = CASES[row]
        try:
            if case.kind == "sync-throughput":
                gc.collect()
                m = peer.throughput(ctx.concurrent_calls, ctx.warmup)
                results.append(summarize(row, peer.name, m.latencies_ns, m.total_ns,
                                         m.calls, m.note))
                continue
            call = peer.call(row)
            if call is None:
                continue
            results.append(time_calls(case, peer.name, call, ctx))
        except Exception as exc:
            traceback.print_exc()
            results.append(Result(row, peer.name, error=f"{type(exc).__name__}: {exc}"))


def comparison(results: Sequence[Result], rows: Sequence[str], systems: Sequence[str],
               base: str) -> str:
    """One line per row: p50/p99 (or calls/s) per system, and ratios against ``base``."""
    by = {(r.case, r.target): r for r in results if r.error is None}
    others = [s for s in systems if s != base]
    headers = ["row", *systems, *(f"{o}/{base}" for o in others)]
    lines = []
    for row in rows:
        throughput = CASES[row].kind != "latency"
        cells = [row]
        for s in systems:
            r = by.get((row, s))
            if r is None:
                cells.append("-")
            elif throughput:
                cells.append(f"{r.per_s:,.0f}/s")
            else:
                cells.append(f"{r.p50_ns / 1e6:.3f} / {r.p99_ns / 1e6:.3f}")
        b = by.get((row, base))
        for o in others:
            r = by.get((row, o))
            if r is None or b is None:
                cells.append("-")
            elif throughput:  # how many times Droplet's throughput
                cells.append(f"{b.per_s / r.per_s:.1f}x")
            else:  # how many times slower the peer is
                cells.append(f"{r.p50_ns / b.p50_ns:.1f}x")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*headers), "  ".join("-" * w for w in widths),
                      *(fmt.format(*c) for c in lines)])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.samples = args.samples or (400 if args.quick else 2000)
    args.warmup = args.warmup or (50 if args.quick else 200)
    patterns = [p.strip() for p in args.only.split(",") if p.strip()]
    rows = [r for r in COMPARED if any(fnmatch.fnmatchcase(r, p) for p in patterns)]
    if not rows:
        raise SystemExit(f"peers.py: no row matches {args.only!r}; rows: {', '.join(COMPARED)}")
    args.only = ",".join(rows)  # run_cases reads it
    opts = TargetOptions(executors=args.executors, node_args=shlex.split(args.node_args),
                         verbose=args.verbose)
    print(environment_line())
    print(f"samples {args.samples} per latency row after {args.warmup} warm-up calls "
          f"(big-argument rows capped); throughput: {args.calls} calls", flush=True)
    results: list[Result] = []
    described: list[str] = []
    cases = [CASES[r] for r in rows]
    systems: list[str] = []
    for spec in [s.strip() for s in args.targets.split(",") if s.strip()]:
        with make_target(spec, opts) as target:
            described.append(target.describe())
            systems.append(target.name)
            run_cases(spec, cases, target, args, results)
    for name in [s.strip() for s in args.peers.split(",") if s.strip()]:
        if name not in PEERS:
            raise SystemExit(f"peers.py: unknown peer {name!r}; known: {', '.join(PEERS)}")
        try:
            peer = PEERS[name](args.executors)
        except ImportError as exc:
            print(f"peer {name} is not installed ({exc}); `nox -s bench-peers` installs it",
                  file=sys.stderr)
            continue
        with peer:
            described.append(peer.version())
            systems.append(peer.name)
            ctx = Context(samples=args.samples, warmup=args.warmup,
                          concurrent_calls=args.calls, target=None)
            run_peer(peer, rows, ctx, results)
    print("systems: " + "; ".join(described))
    print()
    print(format_table(results))
    print()
    print("p50 / p99 ms (throughput rows: calls/s); ratios: peer p50 / Droplet p50, "
          "throughput: Droplet / peer")
    print(comparison(results, rows, systems, systems[0]))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "environment": environment_line(), "systems": described,
            "samples": args.samples, "warmup": args.warmup, "calls": args.calls,
            "results": [vars(r) for r in results]}, indent=2) + "\n")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
