"""CPU per call, per process: robust to other load on the machine (wall time is not).

    python benchmarks/cpuprobe.py [--scheme tcp|ws] [--executors N] [--calls N]
                                  [--case noop|ref1k|ref10m|map|dag2|dag2-direct|fanin3]
                                  [-- extra node flags]

Starts an all-in-one node listening on ``SCHEME://127.0.0.1:PORT``, makes
sequential calls (``map``: one ``f.map`` of all of them, then every ``get()``;
``dag2``: a 2-function DAG, ``dag2-direct`` with ``direct_response``; ``fanin3``: three
no-op sources feeding one function) and prints the p50 and p99 (sequential cases),
and the CPU microseconds per call of the client and of each node process, with each
process's voluntary context switches per call (its threads going to sleep, each later woken).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import droplet
from droplet.client._direct import WRITE_SETTLE


def _cpu(pid: int) -> float:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _switches(pid: int) -> int:
    """Context switches of all of ``pid``'s threads so far (each a sleep and a wakeup)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    total += int(line.split()[1])
    return total


def _family(pid: int) -> list[int]:
    out = [pid]
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    for child in children.stdout.split():
        out += _family(int(child))
    return out


def _node_url(node: subprocess.Popen[str]) -> str:
    """The URL the all-in-one node says it listens on (its executors say theirs too);
    the rest of its output is drained in the background."""
    assert node.stdout is not None
    for line in node.stdout:
        if " all node listening on " in line:
            threading.Thread(target=node.stdout.read, daemon=True).start()
            return line.split(" listening on ", 1)[1].split()[0]
    raise SystemExit(f"the node exited ({node.wait()}) before it listened")


def _connect(url: str) -> droplet.DropletConnection:
    deadline = time.monotonic() + 60
    while True:
        try:
            return droplet.DropletConnection(url)
        except droplet.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class _Done:
    """A result already in, with a future's ``get``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


def _dag(conn: droplet.DropletConnection, case: str) -> Any:
    """A callable ``f(arg)`` running the DAG of ``case``, with ``.get()`` on its result."""
    if case.startswith("dag2"):
        conn.register(lambda _, x: x + 1, "probe_inc")
        conn.register_dag("probe_dag2", ["probe_noop", "probe_inc"],
                          [("probe_noop", "probe_inc")])
        if case == "dag2-direct":  # the value itself comes back: wrap it for .get()
            return lambda x: _Done(conn.call_dag("probe_dag2", {"probe_noop": x},
                                                 direct_response=True))
        return lambda x: conn.call_dag("probe_dag2", {"probe_noop": x})
    sources = [f"probe_s{i}" for i in range(3)]
    for name in sources:
        conn.register(lambda _, x: x, name)
    conn.register(lambda _, a, b, c: a + b + c, "probe_add3")
    conn.register_dag("probe_fanin3", [*sources, "probe_add3"],
                      [(name, "probe_add3") for name in sources])
    return lambda x: conn.call_dag("probe_fanin3", {name: x for name in sources})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/cpuprobe.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", choices=("tcp", "ws"), default="tcp")
    p.add_argument("--executors", default="1")
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--case", choices=("noop", "ref1k", "ref10m", "map", "dag2", "dag2-direct",
                                         "fanin3"),
                   default="noop")
    p.add_argument("flags", nargs="*", help="extra node flags (after --)")
    args = p.parse_args(argv)
    # Port 0: the node picks a free port and says which (a port picked here and
    # released could be taken by one of its executors meanwhile).
    node = subprocess.Popen([sys.executable, "-m", "droplet.node", "--listen",
                             f"{args.scheme}://127.0.0.1:0", "--executors", args.executors,
                             "--data-dir", ":memory:", *args.flags],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = _node_url(node)
    try:
        with _connect(url) as conn:
            arg: Any = 1
            if args.case.startswith("ref"):
                conn.put_object("probe", b"v" * (1024 if args.case == "ref1k" else 10 << 20))
                arg = droplet.DropletReference("probe")
                time.sleep(WRITE_SETTLE)  # own writes settle: then calls go direct
                f = conn.register(lambda _, x: len(x), "probe_len")
            else:
                f = conn.register(lambda _, x: x, "probe_noop")
            if args.case in ("dag2", "dag2-direct", "fanin3"):
                f = _dag(conn, args.case)
            for _ in range(300):
                f(arg).get()
            pids = _family(node.pid)
            names = {}
            for pid in pids:
                with open(f"/proc/{pid}/cmdline") as f_:
                    names[pid] = f_.read().replace("\0", " ")[:90]
            before = {pid: _cpu(pid) for pid in pids}
            switches = {pid: _switches(pid) for pid in pids}
            client0, t0 = time.process_time(), time.perf_counter()
            latencies = []
            if args.case == "map":
                for future in f.map([arg] * args.calls):
                    future.get()
            else:
                for _ in range(args.calls):
                    start = time.perf_counter()
                    f(arg).get()
                    latencies.append(time.perf_counter() - start)
            wall = time.perf_counter() - t0
            client = time.process_time() - client0
            after = {pid: _cpu(pid) for pid in pids}
            switches = {pid: _switches(pid) - switches[pid] for pid in pids}
    finally:
        node.terminate()
        node.wait()
    n = args.calls
    node_cpu = sum(after[pid] - before[pid] for pid in pids)
    p50 = ""
    if latencies:
        latencies.sort()
        p50 = (f"p50 {statistics.median(latencies) * 1e3:.3f} ms, "
               f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.3f} ms; ")
    print(f"{args.case}: {p50}node cpu/call {node_cpu / n * 1e6:.0f} us; "
          f"client cpu/call {client / n * 1e6:.0f} us; wall/call {wall / n * 1e6:.0f} us")
    for pid in pids:
        print(f"  {pid}: {(after[pid] - before[pid]) / n * 1e6:.0f} us/call, "
              f"{switches[pid] / n:.1f} sleeps/call  {names[pid]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
