"""Run real ``python -m droplet.node`` processes from tests.

Synchronous on purpose: a module-scoped pytest fixture can share one node
across many tests (pytest-trio's async fixtures are function-scoped), and the
sync :class:`~droplet.DropletConnection` talks to it from plain test functions.

>>> with start_node("--executors", "1", log_path=tmp / "node.log") as node:  # doctest: +SKIP
...     with DropletConnection(node.url, timeout=20) as cloud:
...         ...

Every node listens on ``127.0.0.1`` port 0 unless told otherwise; its real
address is read from the ``listening on URL`` line the node prints once it
serves. Each node runs in its own process group, so stopping it also stops
the executor worker processes an all-in-one node starts, even when the node
has to be killed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from ..errors import DropletError

__all__ = ["NodeProcess", "NodeStartError", "free_port", "run_node_command", "start_node"]

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# Printed by the node (not its workers, whose output shares the log) once it serves.
_LISTENING = "droplet {role} node listening on (\\S+)"
# Roles whose router answers Hello (and so droplet.node.cluster_info).
_PROBED_ROLES = ("all", "scheduler")


class NodeStartError(RuntimeError):
    """The node exited or did not become ready; the message ends with its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for flags that need one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeProcess:
    """A running node process: its address, log and lifetime."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, role: str,
                 token: str | None) -> None:
        self.proc = proc
        self.log_path = log_path
        self.role = role
        self.token = token
        #: the node's public address, known once :meth:`wait_ready` returned.
        self.url = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait until the log matches the regular expression ``pattern``."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            found = regex.search(self.log_text())
            if found:
                return found
            if time.monotonic() > deadline:
                raise NodeStartError(
                    f"{pattern!r} did not appear in {self.log_path} within {timeout:g} s"
                    + self._log_tail())
            time.sleep(0.02)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        """Wait until the node serves; returns its URL."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(_LISTENING.format(role=self.role), self.log_text())
            if found:
                self.url = found.group(1)
                break
            if self.proc.poll() is not None:
                raise NodeStartError(
                    f"the {self.role} node exited with status {self.proc.returncode} "
                    "before it was ready" + self._log_tail())
            if time.monotonic() > deadline:
                raise NodeStartError(
                    f"the {self.role} node was not ready within {timeout:g} s"
                    + self._log_tail())
            time.sleep(0.02)
        if self.role in _PROBED_ROLES:
            self._probe(max(deadline - time.monotonic(), 1.0))
        return self.url

    def _probe(self, timeout: float) -> None:
        from ..node import cluster_info

        try:
            trio.run(cluster_info, self.url, self.token, timeout)
        except (DropletError, OSError) as exc:
            raise NodeStartError(
                f"the {self.role} node at {self.url} does not answer: {exc}"
                + self._log_tail()) from exc

    def send_signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``signum`` and wait for the exit; kill the whole group on timeout.

        Returns the exit status (negative: killed by that signal).
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the node and every process of its group (its workers)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def _reap_group(self) -> None:
        # Workers of a node that exited cleanly are gone already; this catches
        # any left behind by a node that crashed or was killed.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(tail)


@contextmanager
def start_node(
    *args: str,
    log_path: Path,
    role: str = "all",
    listen: str | None = "tcp://127.0.0.1:0",
    token: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT,
    wait: bool = True,
) -> Iterator[NodeProcess]:
    """Start ``python -m droplet.node --role ROLE --listen LISTEN ARGS...``; stop it on exit.

    Args:
        args: further command-line flags.
        log_path: file receiving the node's stdout and stderr (appended).
        role: the ``--role`` flag.
        listen: the ``--listen`` flag (None: leave it out, the node's default).
        token: passed as ``DROPLET_TOKEN`` in the environment (never on the
            command line), and used for the readiness probe.
        env: extra environment variables.
        timeout: seconds to wait until the node serves.
        wait: wait for readiness before entering the block.
    """
    cmd = [sys.executable, "-m", "droplet.node", "--role", role]
    if listen is not None:
        cmd += ["--listen", listen]
    cmd += list(args)
    full_env = dict(os.environ)
    full_env.pop("DROPLET_TOKEN", None)
    full_env["PYTHONUNBUFFERED"] = "1"
    if token is not None:
        full_env["DROPLET_TOKEN"] = token
    full_env.update(env or {})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
    node = NodeProcess(proc, log_path, role, token)
    try:
        if wait:
            node.wait_ready(timeout)
        yield node
    finally:
        node.stop()


def run_node_command(args: Sequence[str],
                     timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m droplet.node ARGS`` to completion (``--help``, bad flags)."""
    return subprocess.run([sys.executable, "-m", "droplet.node", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def poll_until(check: Callable[[], Any], what: str, timeout: float = 60.0,
               interval: float = 0.05) -> Any:
    """``check()``'s first truthy result, polled every ``interval`` seconds;
    AssertionError naming ``what`` once ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(interval)
