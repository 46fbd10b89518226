"""CPU per sequential no-op call, per process: ``python benchmarks/cpuprobe.py [EXECUTORS]
[extra node flags]``.

Starts ``python -m droplet.node`` on a free port, makes 3000 sequential no-op
calls with the blocking client and prints p50 and the CPU each process (the
node, its executors, this client) spent per call. CPU per call is robust to
other load on the machine, unlike wall time.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time

import droplet

CALLS = 3000
WARM_UP = 300


def cpu_seconds(pid: int) -> float:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    out = [pid]
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    for child in children.stdout.split():
        out += descendants(int(child))
    return out


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    executors = sys.argv[1] if len(sys.argv) > 1 else "1"
    node = subprocess.Popen(
        [sys.executable, "-m", "droplet.node", "--listen", f"tcp://127.0.0.1:{port}",
         "--executors", executors, "--data-dir", ":memory:", *sys.argv[2:]],
        stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):  # up to 30 s for the node to accept connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(0.5)
        conn = droplet.DropletConnection(f"tcp://127.0.0.1:{port}")
        f = conn.register(lambda lib, x: x, "noop")
        for _ in range(WARM_UP):
            f(1).get()
        pids = descendants(node.pid)
        before = {pid: cpu_seconds(pid) for pid in pids}
        mine = time.process_time()
        start = time.perf_counter()
        latencies = []
        for _ in range(CALLS):
            t = time.perf_counter()
            f(1).get()
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
        mine = time.process_time() - mine
        after = {pid: cpu_seconds(pid) for pid in pids}
        node_cpu = sum(after[p] - before[p] for p in pids)
        print(f"p50 {statistics.median(latencies) * 1e3:.3f} ms; "
              f"node cpu/call {node_cpu / CALLS * 1e6:.0f} us; "
              f"client cpu/call {mine / CALLS * 1e6:.0f} us; wall/call {wall / CALLS * 1e6:.0f}")
        for pid in pids:
            with open(f"/proc/{pid}/cmdline") as cmd:
                line = cmd.read().replace("\0", " ")[:100]
            print(pid, f"{(after[pid] - before[pid]) / CALLS * 1e6:.0f} us/call", line)
        conn.close()
    finally:
        node.terminate()
        node.wait()


if __name__ == "__main__":
    main()
