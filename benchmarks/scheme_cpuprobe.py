"""CPU per sequential no-op call, per process, on any scheme (cpuprobe.py: tcp only).

    python benchmarks/scheme_cpuprobe.py [--scheme tcp|ws|...] [--executors N] [--calls N]
                                  [-- extra node flags]

Starts a node (``--listen SCHEME://127.0.0.1:PORT``), makes ``--calls``
sequential no-op calls with the sync client and prints p50 and the CPU each
process spent per call (from /proc, Linux only). Wall time is noisy when other
work shares the machine; CPU per call is not.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

import droplet


def _cpu(pid: int) -> float:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    out = [pid]
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    for child in children.stdout.split():
        out += _tree(int(child))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scheme", default="tcp")
    p.add_argument("--executors", default="1")
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("node_flags", nargs="*")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"{args.scheme}://127.0.0.1:{port}"
    node = subprocess.Popen([sys.executable, "-m", "droplet.node", "--listen", url,
                             "--executors", args.executors, "--data-dir", ":memory:",
                             *args.node_flags], stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                conn = droplet.DropletConnection(url, timeout=10)
                break
            except droplet.ConnectionError:
                time.sleep(0.1)
        else:
            raise SystemExit(f"no node at {url}")
        f = conn.register(lambda _, x: x, "noop")
        for _ in range(300):
            f(1).get()
        pids = _tree(node.pid)
        before = {q: _cpu(q) for q in pids}
        mine = time.process_time()
        lat = []
        for _ in range(args.calls):
            t = time.perf_counter()
            f(1).get()
            lat.append(time.perf_counter() - t)
        after = {q: _cpu(q) for q in pids}
        mine = time.process_time() - mine
        n = args.calls
        node_cpu = sum(after[q] - before[q] for q in pids) / n * 1e6
        print(f"{url}: p50 {statistics.median(lat) * 1e3:.3f} ms; node cpu/call "
              f"{node_cpu:.0f} us; client cpu/call {mine / n * 1e6:.0f} us")
        for q in pids:
            with open(f"/proc/{q}/cmdline") as cmd:
                what = cmd.read().replace("\0", " ")[:90]
            print(f"  {q}: {(after[q] - before[q]) / n * 1e6:6.0f} us/call  {what}")
        conn.close()
    finally:
        node.terminate()
        node.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
