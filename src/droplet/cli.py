"""The ``droplet`` console command: run a node in the background, stop it, watch it.

``droplet start-local`` starts ``python -m droplet.node`` detached, with a pid
file and a log file, and returns once the node answers a handshake;
``droplet stop-local`` sends it SIGTERM and waits for it to exit;
``droplet status [URL]`` prints the cluster's status (``--json`` for scripts).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from .errors import DropletError
from .transports.registry import normalize_address

__all__ = ["main"]

DEFAULT_ADDRESS = "tcp://127.0.0.1:5000"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
STATUS_TIMEOUT = 5.0

#: Nodes started by this process (``main()`` called in-process, as tests do). The
#: node is then our child: once it exits it lingers as a zombie that ``kill(pid, 0)``
#: still finds, until its Popen reaps it (which also spares Popen's ResourceWarning).
_started: dict[int, subprocess.Popen[bytes]] = {}


def _home() -> Path:
    return Path(os.environ.get("DROPLET_HOME", Path.home() / ".droplet"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="droplet", description="Droplet command-line tools.")
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start-local", help="start an all-in-one node in the background")
    start.add_argument("--listen", default=DEFAULT_ADDRESS, metavar="URL")
    start.add_argument("--executors", type=int, default=2, metavar="N")
    start.add_argument("--data-dir", metavar="DIR",
                       help="where the node keeps its store (default: "
                       "$XDG_DATA_HOME/droplet/HOST-PORT; ':memory:' keeps nothing)")
    start.add_argument("--fsync", choices=("always", "everysec", "no"),
                       help="log fsync policy (default: always)")
    start.add_argument("--pid-file", type=Path, default=None, metavar="FILE",
                       help="default: $DROPLET_HOME/node.pid (~/.droplet)")
    start.add_argument("--log-file", type=Path, default=None, metavar="FILE",
                       help="default: $DROPLET_HOME/node.log")
    stop = sub.add_parser("stop-local", help="stop the node started by start-local")
    stop.add_argument("--pid-file", type=Path, default=None, metavar="FILE")
    status = sub.add_parser("status", help="print the cluster's executors, load, cache, "
                            "functions and DAGs")
    status.add_argument("url", nargs="?", default=None, metavar="URL",
                        help="the scheduler's address (default: the node start-local "
                        f"started, else {DEFAULT_ADDRESS})")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.add_argument("--token", metavar="SECRET",
                        help="the cluster token (default: $DROPLET_TOKEN)")
    status.add_argument("--timeout", type=float, default=STATUS_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for the node (default: {STATUS_TIMEOUT:g})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":
        url = args.url or _recorded_url(_home() / "node.pid") or DEFAULT_ADDRESS
        return show_status(url, as_json=args.json, token=args.token, timeout=args.timeout)
    pid_file: Path = args.pid_file or _home() / "node.pid"
    if args.command == "start-local":
        extra = []
        if args.data_dir:
            extra += ["--data-dir", args.data_dir]
        if args.fsync:
            extra += ["--fsync", args.fsync]
        return start_local(args.listen, args.executors, pid_file,
                           args.log_file or _home() / "node.log", extra)
    return stop_local(pid_file)


def show_status(address: str, *, as_json: bool = False, token: str | None = None,
                timeout: float = STATUS_TIMEOUT) -> int:
    """Print the status of the cluster whose scheduler is at ``address``; 0, or 1 if none."""
    import json

    from .client.client import DropletConnection
    from .status import format_status

    try:
        url = normalize_address(address)
    except ValueError as exc:
        print(f"droplet status: {exc}", file=sys.stderr)
        return 2
    try:
        with DropletConnection(url, token=token, timeout=timeout) as conn:
            status = conn.status()
    except DropletError as exc:
        where = "" if url in str(exc) else f"no Droplet node answered at {url}: "
        print(f"droplet status: {where}{exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(status.to_dict(), indent=2))
    else:
        print(format_status(status, url))
    return 0


def _recorded_url(pid_file: Path) -> str | None:
    """The address start-local recorded for a node that is still running."""
    if _running_pid(pid_file) is None:
        return None
    lines = pid_file.read_text().split()
    return lines[1] if len(lines) > 1 else None


def _running_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def start_local(listen: str, executors: int, pid_file: Path, log_file: Path,
                extra: Sequence[str] = ()) -> int:
    url = normalize_address(listen)
    pid = _running_pid(pid_file)
    if pid is not None:
        print(f"a Droplet node is already running (pid {pid}, {pid_file}); "
              "`droplet stop-local` stops it", file=sys.stderr)
        return 1
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "droplet.node", "--listen", url,
             "--executors", str(executors), *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _started[proc.pid] = proc
    pid_file.write_text(f"{proc.pid}\n{url}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_file.unlink(missing_ok=True)
            print(f"the node exited with status {proc.returncode}; see {log_file}",
                  file=sys.stderr)
            return 1
        if _answers(url) and _log_says_ready(log_file, proc.pid):
            print(f"Droplet node running at {url} (pid {proc.pid}, log {log_file})")
            return 0
        time.sleep(0.1)
    proc.terminate()
    pid_file.unlink(missing_ok=True)
    print(f"the node did not become ready within {START_TIMEOUT:g} s; see {log_file}",
          file=sys.stderr)
    return 1


def _log_says_ready(log_file: Path, pid: int) -> bool:
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return False
    return f"all[{pid}] INFO droplet.node: Droplet all node ready" in text


def _answers(url: str) -> bool:
    from .node import cluster_info

    try:
        trio.run(cluster_info, url, os.environ.get("DROPLET_TOKEN") or None)
    except (DropletError, OSError):
        return False
    return True


def stop_local(pid_file: Path) -> int:
    pid = _running_pid(pid_file)
    if pid is None:
        print(f"no Droplet node is running (no live pid in {pid_file})", file=sys.stderr)
        pid_file.unlink(missing_ok=True)
        return 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if _exited(pid):
            break
        time.sleep(0.05)
    else:
        # The node leads its own process group (start_new_session): kill its
        # executor workers with it.
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            os.kill(pid, signal.SIGKILL)
        ours = _started.pop(pid, None)
        if ours is not None:
            ours.wait()
    pid_file.unlink(missing_ok=True)
    print(f"stopped Droplet node (pid {pid})")
    return 0


def _exited(pid: int) -> bool:
    """Whether the node ``pid`` is gone (reaping it if this process started it)."""
    proc = _started.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return False
        del _started[pid]
        return True
    try:
        os.kill(pid, 0)
    except OSError:
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
