"""``python -m droplet.node``: run one Droplet node in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import trio

from ..config import FSYNC_POLICIES, ROLES, Config
from ..errors import DropletError
from ..scheduler.placement import POLICIES, check_policy_name
from ._memory import keep_freed_memory

__all__ = ["add_node_flags", "build_parser", "main"]

log = logging.getLogger("droplet.node")

#: Set by an all-in-one node for its executor workers: stdin is a pipe from the
#: node, and its end (EOF) means the node is gone, however it died.
WATCH_PARENT_ENV = "DROPLET_WATCH_PARENT"
#: Seconds an orphaned worker may take to shut down cleanly before it exits hard.
ORPHAN_EXIT_GRACE = 10.0


def watch_parent() -> threading.Thread:
    """Stop this process when stdin reaches EOF (its parent node went away).

    Portable (no ``PR_SET_PDEATHSIG``, which Linux ties to the parent *thread*):
    the node holds the pipe's write end, and the kernel closes it when the
    node exits, even on SIGKILL. A clean SIGTERM shutdown comes first; if that
    takes longer than :data:`ORPHAN_EXIT_GRACE`, the worker exits hard.
    """

    def wait_for_eof() -> None:
        try:
            # os.read, not sys.stdin: a daemon thread blocked in the buffered
            # reader holds its lock, and a worker stopped while the node lives
            # on (adaptive executors) would abort at interpreter shutdown.
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        log.warning("the node that started this executor worker is gone; exiting")
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(ORPHAN_EXIT_GRACE)
        os._exit(1)

    thread = threading.Thread(target=wait_for_eof, name="droplet-parent-watch", daemon=True)
    thread.start()
    return thread


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__  # here: droplet/__init__ imports this module
    p = argparse.ArgumentParser(
        prog="python -m droplet.node",
        description="Run a Droplet node. With no flags: storage, scheduler and two "
        "executor worker processes on tcp://127.0.0.1:5000.",
    )
    p.add_argument("--role", choices=ROLES, default=None,
                   help="which service(s) to run (default: all)")
    add_node_flags(p)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print Droplet's version and exit")
    return p


def _policy(value: str) -> str:
    try:
        check_policy_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_node_flags(p: argparse.ArgumentParser) -> None:
    """Every setting flag but --role (``droplet start-local`` takes the same ones)."""
    p.add_argument("--listen", metavar="URL",
                   help="address to listen on (default: tcp://127.0.0.1:5000; "
                   "executors: tcp://127.0.0.1:0)")
    p.add_argument("--scheduler", metavar="URL",
                   help="scheduler to join (role executor)")
    p.add_argument("--kvs", metavar="URL", help="storage node to use (role scheduler)")
    p.add_argument("--executors", metavar="N|MIN:MAX",
                   help="executor worker processes of the all-in-one node (default: 2); "
                   "MIN:MAX (e.g. 1:4) starts MIN and adds or stops workers with the load")
    p.add_argument("--scale-up-queue", type=float, metavar="CALLS",
                   help="adaptive executors: start one more when at least this many calls "
                   "per executor wait for a thread (default: 1) ...")
    p.add_argument("--scale-up-after", type=float, metavar="SECONDS",
                   help="... for this long (default: 2)")
    p.add_argument("--scale-down-after", type=float, metavar="SECONDS",
                   help="adaptive executors: stop an executor (beyond MIN) after it was idle "
                   "this long; it finishes its calls first (default: 30)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads per executor for sync functions (default: 32)")
    p.add_argument("--placement", metavar="POLICY", type=_policy,
                   help=f"placement policy: {', '.join(POLICIES)} (default: data: calls go "
                   "where their references are cached), or a package.module:Class")
    p.add_argument("--token", metavar="SECRET",
                   help="cluster token required of every connection (or DROPLET_TOKEN)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow listening beyond loopback without a token")
    p.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (tls:// and wss://)")
    p.add_argument("--tls-key", metavar="FILE", help="TLS private key")
    p.add_argument("--tls-ca", metavar="FILE", help="CA bundle to verify TLS peers")
    p.add_argument("--max-frame-size", type=int, metavar="BYTES",
                   help="largest message accepted (default: 64 MiB)")
    p.add_argument("--result-ttl", type=float, metavar="SECONDS",
                   help="backstop: seconds before a call result no client released "
                   "is dropped (default: 600)")
    p.add_argument("--storage", metavar="URL",
                   help="where the storage role keeps lattices: memory (default) or "
                   "redis://HOST:PORT/DB, rediss://... (a Redis server or any node of a "
                   "Redis Cluster)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where the store keeps its log and snapshot (default for the "
                   "all-in-one node: $XDG_DATA_HOME/droplet/HOST-PORT, i.e. "
                   "~/.local/share/droplet/127.0.0.1-5000); ':memory:' keeps nothing")
    p.add_argument("--fsync", choices=FSYNC_POLICIES,
                   help="when the log reaches the disk: always (default; before each "
                   "acknowledgement), everysec, or no (when the OS decides)")
    p.add_argument("--log-results", action="store_true", default=None,
                   help="also log call results (by default they stay in memory: they "
                   "expire after --result-ttl and a crash ends their runs anyway)")
    p.add_argument("--resources", metavar="NAME=COUNT[,...]",
                   help="resource labels of this node's executors, e.g. gpu=1 "
                   "(a DAG's gpu_functions run only on executors with gpu)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="most queued calls of a batching function served in one call "
                   "(default: 16)")
    p.add_argument("--report-interval", type=float, metavar="SECONDS",
                   help="how often executors report load and call statistics to the "
                   "scheduler (default: 1)")
    p.add_argument("--cache-size", metavar="BYTES",
                   help="bytes of values the node's cache keeps, shared by its executors "
                   "(least recently used out first), e.g. 512M or 2G (default: 512M)")
    p.add_argument("--node-cache", metavar="URL",
                   help="(role executor) use the cache of the node at URL instead of one "
                   "of its own; an all-in-one node sets it on its worker processes")
    p.add_argument("--metrics-listen", metavar="URL",
                   help="serve Prometheus metrics over HTTP at this address, e.g. "
                   "tcp://127.0.0.1:9100 (default: off); beyond loopback it needs --token")
    p.add_argument("--config", metavar="FILE", help="TOML file of settings (flags win)")
    p.add_argument("--log-level", metavar="LEVEL",
                   help="DEBUG, INFO (default), WARNING or ERROR")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        config = Config.load(flags, args.config)
        config.validate()
    except (ValueError, TypeError, OSError) as exc:
        # attrs validators put the readable message first, then internals.
        message = exc.args[0] if isinstance(exc, ValueError | TypeError) and exc.args else exc
        print(f"droplet.node: {message}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s {config.role}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        # Big arguments: a copy, not page faults (_memory.py); before any thread starts.
        if config.role == "executor":
            keep_freed_memory()
    except ValueError as exc:
        print(f"droplet.node: {exc}", file=sys.stderr)
        return 2
    if os.environ.get(WATCH_PARENT_ENV) == "stdin":
        watch_parent()
    if config.insecure and not config.token:
        log.warning("--insecure: accepting unauthenticated connections on %s; anyone who "
                    "can reach it can run code on this machine", config.listen_url)
    try:
        return trio.run(_run, config)
    except KeyboardInterrupt:
        return 0


def _startup_failure(exc: BaseException) -> BaseException | None:
    """The error that kept the node from starting, when it deserves one line, not a traceback.

    ``serve_node`` fails inside its nursery, so the error arrives wrapped in
    (single-exception) groups: a missing flag (ValueError), a port in use
    (OSError), a scheduler refusing our token (AuthenticationError), ...
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError | ValueError | RuntimeError | DropletError) else None


async def _run(config: Config) -> int:
    from . import serve_node

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                node = await nursery.start(serve_node, config)
            except BaseException as exc:
                reason = _startup_failure(exc)
                if reason is None:
                    raise
                log.error("could not start: %s", reason)
                nursery.cancel_scope.cancel()
                return 1
            low, high = config.executor_range
            pooled = config.role == "all" or config.max_executors is not None
            workers = (f"{low}" if low == high else f"{low} to {high}"
                       ) if pooled and low else ""
            extra = f" with {workers} executor workers" if workers else ""
            log.info("Droplet %s node ready at %s%s", config.role, node.url, extra)
            # One write, so worker processes sharing this stream cannot split the line.
            metrics = (f"\ndroplet metrics at http{node.metrics_url[3:]}/metrics"
                       if node.metrics_url else "")
            sys.stdout.write(f"droplet {config.role} node listening on {node.url}{metrics}\n")
            sys.stdout.flush()
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    return 0
