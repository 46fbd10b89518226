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
from typing import Any

import trio

from .config import Config
from .errors import DropletError

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
    from . import __version__
    from .node._main import add_node_flags

    p = argparse.ArgumentParser(prog="droplet", description="Droplet command-line tools.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print Droplet's version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser(
        "start-local", help="start an all-in-one node in the background",
        description="Start `python -m droplet.node` in the background; every flag but "
        "--pid-file and --log-file is passed on to it.")
    add_node_flags(start)
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


#: start-local's own flags, not the node's.
_OWN = ("command", "pid_file", "log_file")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":
        url = args.url or _recorded_url(_home() / "node.pid") or DEFAULT_ADDRESS
        return show_status(url, as_json=args.json, token=args.token, timeout=args.timeout)
    pid_file: Path = args.pid_file or _home() / "node.pid"
    if args.command == "start-local":
        flags = {k: v for k, v in vars(args).items() if k not in _OWN and v is not None}
        return start_local(flags, pid_file, args.log_file or _home() / "node.log")
    return stop_local(pid_file)


def show_status(address: str, *, as_json: bool = False, token: str | None = None,
                timeout: float = STATUS_TIMEOUT) -> int:
    """Print the status of the cluster whose scheduler is at ``address``; 0, or 1 if none."""
    import json

    from .client.client import DropletConnection
    from .status import format_status
    from .transports.registry import normalize_address

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


def _node_command(flags: dict[str, Any]) -> list[str]:
    """``python -m droplet.node`` with the given flags (the token travels in the environment)."""
    cmd = [sys.executable, "-m", "droplet.node"]
    for key, value in flags.items():
        if key == "token":
            continue
        option = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(option)
        else:
            cmd += [option, str(value)]
    return cmd


def start_local(flags: dict[str, Any], pid_file: Path, log_file: Path) -> int:
    """Start an all-in-one node in the background; ``flags`` are its settings (as flags).

    Invalid settings exit 2 before anything starts, as ``python -m droplet.node`` does.
    """
    flags = dict(flags)
    flags.setdefault("listen", DEFAULT_ADDRESS)
    if flags.get("config"):
        flags["config"] = str(Path(flags["config"]).resolve())
    node_flags = {k: v for k, v in flags.items() if k != "config"}
    try:
        config = Config.load(node_flags, flags.get("config"))
        if config.role != "all":
            raise ValueError(f"start-local runs the all-in-one node, not role {config.role!r}")
        config.validate()
    except (ValueError, TypeError, OSError) as exc:
        print(f"droplet start-local: {exc}", file=sys.stderr)
        return 2
    url = config.listen_url
    flags["listen"] = url
    pid = _running_pid(pid_file)
    if pid is not None:
        print(f"a Droplet node is already running (pid {pid}, {pid_file}); "
              "`droplet stop-local` stops it", file=sys.stderr)
        return 1
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if config.token:
        env["DROPLET_TOKEN"] = config.token  # never on the command line (visible in ps)
    start_at = log_file.stat().st_size if log_file.exists() else 0
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            _node_command(flags), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
    _started[proc.pid] = proc
    pid_file.write_text(f"{proc.pid}\n{url}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_file.unlink(missing_ok=True)
            last = _last_line(log_file, start_at)
            print(f"the node exited with status {proc.returncode}"
                  + (f": {last}" if last else "") + f" (see {log_file})", file=sys.stderr)
            return 1
        if _answers(url, config) and _log_says_ready(log_file, proc.pid):
            print(f"Droplet node running at {url} (pid {proc.pid}, log {log_file})")
            return 0
        time.sleep(0.1)
    proc.terminate()
    pid_file.unlink(missing_ok=True)
    last = _last_line(log_file, start_at)
    print(f"the node did not become ready within {START_TIMEOUT:g} s"
          + (f"; its last words: {last}" if last else "") + f" (see {log_file})",
          file=sys.stderr)
    return 1


def _last_line(log_file: Path, start_at: int) -> str:
    """The last non-empty line the node wrote to its log (from offset ``start_at``)."""
    try:
        with open(log_file, "rb") as f:
            f.seek(start_at)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _log_says_ready(log_file: Path, pid: int) -> bool:
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return False
    return f"all[{pid}] INFO droplet.node: Droplet all node ready" in text


def _answers(url: str, config: Config) -> bool:
    from .node import cluster_info

    try:
        trio.run(cluster_info, url, config.token, 10.0, config.client_options())
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
