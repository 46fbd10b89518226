"""CPU per sequential no-op call, per process of a local node.

    python benchmarks/cpuprobe.py EXECUTORS [extra node flags]

Starts a node (``--executors EXECUTORS``), makes 3000 sequential no-op calls
with the blocking client and prints the p50 latency and the CPU each process
spent per call. CPU per call is robust to other load on a shared machine,
unlike wall time. (The lead's probe, kept here; it waits for the node to
listen and always stops it.)
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
WARMUP = 300


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of ``pid``."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    found = [pid]
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    for child in children.stdout.split():
        found += descendants(int(child))
    return found


def main() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    executors = sys.argv[1] if len(sys.argv) > 1 else "1"
    node = subprocess.Popen([sys.executable, "-m", "droplet.node", "--listen",
                             f"tcp://127.0.0.1:{port}", "--executors", executors,
                             "--data-dir", ":memory:", *sys.argv[2:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or node.poll() is not None:
                    raise SystemExit("the node did not start") from None
                time.sleep(0.2)
        conn = droplet.DropletConnection(f"tcp://127.0.0.1:{port}")
        try:
            noop = conn.register(lambda lib, x: x, "noop")
            for _ in range(WARMUP):
                noop(1).get()
            time.sleep(1)  # the executor workers have joined and warmed up
            pids = descendants(node.pid)
            before = {pid: cpu_seconds(pid) for pid in pids}
            mine0, t0 = time.process_time(), time.perf_counter()
            latencies = []
            for _ in range(CALLS):
                start = time.perf_counter()
                noop(1).get()
                latencies.append(time.perf_counter() - start)
            mine1, t1 = time.process_time(), time.perf_counter()
            after = {pid: cpu_seconds(pid) for pid in pids}
        finally:
            conn.close()
        node_cpu = sum(after[p] - before[p] for p in pids)
        print(f"p50 {statistics.median(latencies) * 1e3:.3f} ms; node cpu/call "
              f"{node_cpu / CALLS * 1e6:.0f} us; client cpu/call "
              f"{(mine1 - mine0) / CALLS * 1e6:.0f} us; wall/call {(t1 - t0) / CALLS * 1e6:.0f}")
        for pid in pids:
            with open(f"/proc/{pid}/cmdline") as f:
                cmdline = f.read().replace("\0", " ")[:90]
            print(f"{pid} {(after[pid] - before[pid]) / CALLS * 1e6:.0f} us/call {cmdline}")
    finally:
        node.terminate()
        node.wait()


if __name__ == "__main__":
    main()
