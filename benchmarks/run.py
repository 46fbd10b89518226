"""Droplet latency and throughput benchmarks.

    python benchmarks/run.py [--quick] [--only NAMES] [--targets embedded,tcp,ws,tls,wss]

Prints an environment line and a table: for each case (see bench_cases.py) on
each target (see bench_targets.py), latency p50/p99/mean in milliseconds and
calls per second. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio  # noqa: E402
from bench_cases import _MISSING, CASES, Case, Context  # noqa: E402
from bench_report import Result, environment_line, format_table, summarize  # noqa: E402
from bench_targets import (  # noqa: E402
    DEFAULT_CASES,
    DEFAULT_TARGETS,
    TARGETS,
    Target,
    TargetOptions,
    UrlTarget,
    make_target,
)

DEFAULT_SAMPLES = 2000
QUICK_SAMPLES = 300
DEFAULT_WARMUP = 200
QUICK_WARMUP = 50
DEFAULT_CONCURRENT = 5000


def _default_cases_help() -> str:
    groups: dict[tuple[str, ...], list[str]] = {}
    for target, names in DEFAULT_CASES.items():
        groups.setdefault(names, []).append(target)
    return "; ".join(f"{'/'.join(ts)} run only {', '.join(names)}"
                     for names, ts in groups.items())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py", description=__doc__.split("\n\n")[0],
        epilog="cases: " + ", ".join(CASES) + "; targets: " + ", ".join(TARGETS)
        + ", node:SCHEME")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_SAMPLES} samples and {QUICK_WARMUP} warm-up calls "
                   "per latency row (unless -n/--warmup are given)")
    p.add_argument("-n", "--samples", type=int, metavar="N",
                   help=f"timed calls per latency row (default {DEFAULT_SAMPLES})")
    p.add_argument("--warmup", type=int, metavar="N",
                   help=f"untimed calls before each row (default {DEFAULT_WARMUP})")
    p.add_argument("--calls", type=int, default=DEFAULT_CONCURRENT, metavar="N",
                   help=f"concurrent calls of the throughput row (default {DEFAULT_CONCURRENT})")
    p.add_argument("--only", metavar="NAMES",
                   help="comma-separated case names or globs (e.g. 'noop,dag*')")
    p.add_argument("--targets", default=DEFAULT_TARGETS, metavar="LIST",
                   help="comma-separated targets: " + ", ".join(TARGETS)
                   + ", or node:SCHEME for a node listening on SCHEME://127.0.0.1:PORT "
                   f"(default: {DEFAULT_TARGETS}; without --only, {_default_cases_help()})")
    p.add_argument("--target-url", action="append", default=[], metavar="URL",
                   help="also measure the node already running at URL (repeatable); "
                   "it is neither started nor stopped")
    p.add_argument("--node-args", default="", metavar="ARGS",
                   help="extra arguments for every `python -m droplet.node` started "
                   "(one shell-quoted string, e.g. \"--threads 8\")")
    p.add_argument("--executors", type=int, default=2, metavar="N",
                   help="executors of the embedded cluster and of started nodes (default 2)")
    p.add_argument("--token", metavar="SECRET",
                   help="cluster token for the clusters started and --target-url nodes")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print progress and keep node logs")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p


def select_cases(only: str | None) -> list[Case]:
    if not only:
        return list(CASES.values())
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in CASES)]
    if unknown:
        raise SystemExit(f"run.py: no case matches {', '.join(unknown)}; "
                         f"cases: {', '.join(CASES)}")
    return [c for c in CASES.values() if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


def cases_for(spec: str, target_name: str, cases: Sequence[Case],
              only: str | None) -> list[Case]:
    """The cases to run on a target: the cases' ``targets=`` filter, and without
    ``--only`` the default cases of the ``--targets`` item ``spec``
    (``bench_targets.DEFAULT_CASES``; ``node:ws`` is not ``ws``: it runs all)."""
    default = None if only else DEFAULT_CASES.get(spec)
    return [c for c in cases if c.applies_to(target_name)
            and (default is None or any(fnmatch.fnmatchcase(c.name, p) for p in default))]


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def time_calls(case: Case, target_name: str, call: Callable[[], Any], ctx: Context) -> Result:
    """Check the first result, warm up, then time sequential calls (also used for peers)."""
    n = min(ctx.samples, case.max_samples or ctx.samples)
    warmup = min(ctx.warmup, case.max_samples or ctx.warmup)
    first = call()
    if case.expect is not _MISSING and first != case.expect:
        raise AssertionError(f"returned {first!r}, expected {case.expect!r}")
    for _ in range(warmup - 1):
        call()
    gc.collect()
    samples = [0] * n
    clock = time.perf_counter_ns
    t0 = clock()
    for i in range(n):
        start = clock()
        call()
        samples[i] = clock() - start
    total = clock() - t0
    return summarize(case.name, target_name, samples, total)


def run_latency(case: Case, target: Target, ctx: Context) -> Result:
    assert case.setup is not None
    return time_calls(case, target.name, case.setup(target.connect(), ctx), ctx)


def run_sync_throughput(case: Case, target: Target, ctx: Context) -> Result:
    assert case.sync_run is not None
    gc.collect()
    m = case.sync_run(target.connect(), ctx)
    return summarize(case.name, target.name, m.latencies_ns, m.total_ns, m.calls, m.note)


def run_throughput(case: Case, target: Target, ctx: Context) -> Result:
    assert case.run is not None
    run = case.run

    async def main() -> Any:
        async with target.async_client() as client:
            return await run(client, ctx)

    gc.collect()
    try:
        m = trio.run(main)
    except BaseExceptionGroup as group:
        # Ctrl-C inside a nursery arrives wrapped; unwrap it so it stops the run.
        if group.subgroup(KeyboardInterrupt) is not None:
            raise KeyboardInterrupt from group
        if group.subgroup(SystemExit) is not None:
            raise SystemExit(1) from group
        raise
    return summarize(case.name, target.name, m.latencies_ns, m.total_ns, m.calls, m.note)


def run_cases(spec: str, cases: Sequence[Case], target: Target, args: argparse.Namespace,
              results: list[Result]) -> None:
    for case in cases_for(spec, target.name, cases, args.only):
        ctx = Context(samples=args.samples, warmup=args.warmup,
                      concurrent_calls=args.calls, target=target)
        _log(args.verbose, f"{case.name} on {target.name} ...")
        try:
            if case.kind == "latency":
                result = run_latency(case, target, ctx)
            elif case.kind == "sync-throughput":
                result = run_sync_throughput(case, target, ctx)
            else:
                result = run_throughput(case, target, ctx)
        except Exception as exc:
            if args.verbose:
                traceback.print_exc()
            first_line = (str(exc).splitlines() or [""])[0]
            result = Result(case.name, target.name,
                            error=f"{type(exc).__name__}: {first_line}")
            problem = target.diagnose()
            print(f"{case.name} on {target.name} failed: {type(exc).__name__}: {exc}"
                  + (f"\n  ({problem})" if problem else ""), file=sys.stderr, flush=True)
        results.append(result)
        _log(args.verbose, f"  {result}")


def _interrupt(signum: int, frame: Any) -> None:
    # As if Ctrl-C: trio.run (when running) turns SIGINT into KeyboardInterrupt at
    # a safe point; raising here directly could abandon a Trio run half-way.
    signal.raise_signal(signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for case in CASES.values():
            print(f"{case.name:20} {case.kind:10} {case.description}")
        return 0
    if args.samples is None:
        args.samples = QUICK_SAMPLES if args.quick else DEFAULT_SAMPLES
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if args.samples < 1 or args.warmup < 1 or args.calls < 1:
        raise SystemExit("run.py: --samples, --warmup and --calls must be at least 1")
    cases = select_cases(args.only)
    specs = [s.strip() for s in args.targets.split(",") if s.strip()]
    for spec in specs:
        if spec not in TARGETS and not spec.startswith("node:"):
            raise SystemExit(f"run.py: unknown target {spec!r}; known: "
                             f"{', '.join(TARGETS)}, node:SCHEME")
    opts = TargetOptions(executors=args.executors, node_args=shlex.split(args.node_args),
                         token=args.token, verbose=args.verbose)

    # SIGTERM unwinds like Ctrl-C, so the `finally` below stops every node.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # e.g. started with `&`
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)

    print(environment_line())
    print(f"samples {args.samples} per latency row after {args.warmup} warm-up calls; "
          f"throughput: {args.calls} concurrent calls", flush=True)
    results: list[Result] = []
    descriptions: list[str] = []
    status = 0
    try:
        for spec in [*specs, *(f"url:{u}" for u in args.target_url)]:
            _log(args.verbose, f"starting target {spec}")
            try:
                if spec.startswith("url:"):
                    url = spec[4:]
                    name = "url" if len(args.target_url) == 1 else url
                    target: Target = UrlTarget(url, opts, name=name)
                else:
                    target = make_target(spec, opts)
            except Exception as exc:
                status = 1
                print(f"target {spec} could not start: {exc}", file=sys.stderr)
                results.extend(Result(c.name, spec, error="target did not start")
                               for c in cases_for(spec, spec, cases, args.only))
                continue
            with target:
                descriptions.append(target.describe())
                run_cases(spec, cases, target, args, results)
    except KeyboardInterrupt:
        print("\ninterrupted; partial results:", file=sys.stderr)
        status = 130
    print("targets: " + "; ".join(descriptions))
    print()
    print(format_table(results))
    if any(r.error for r in results) and status == 0:
        status = 1
    if args.json:
        Path(args.json).write_text(json.dumps({
            "environment": environment_line(),
            "samples": args.samples, "warmup": args.warmup, "calls": args.calls,
            "targets": descriptions,
            "results": [vars(r) for r in results],
        }, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
