"""What a benchmark runs against: an embedded cluster, a node subprocess, or a URL.

A target gives the cases two things:

- ``connect()``: a synchronous :class:`droplet.DropletConnection` (latency rows),
  created on first use and shared by all latency cases of that target;
- ``async_client()``: an async context manager yielding an
  :class:`droplet.AsyncDropletClient`, used inside one ``trio.run`` (throughput
  rows).

Targets are built by name from :data:`TARGETS` (``--targets embedded,tcp``):
``embedded``, and nodes on ``tcp``, ``ws``, ``tls`` and ``wss``. A plain node is
one line::

    TARGETS["ws"] = lambda opts: NodeTarget("ws", opts, scheme="ws")

The TLS nodes (:class:`TlsNodeTarget`) get a throw-away CA and a certificate for
127.0.0.1 from ``trustme``, made in a temporary directory when the target starts.
:data:`DEFAULT_CASES` limits what a target runs when ``--only`` is not given (the
ws/tls/wss nodes: the transport rows ``dag2`` and ``dag2-direct``). Besides the
registry, ``node:SCHEME`` starts a node listening on that scheme with no extra
setup (all rows), and ``--target-url URL`` measures a node someone else started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

import droplet
from droplet.node import cluster_info
from droplet.transports import TransportOptions

__all__ = ["DEFAULT_CASES", "DEFAULT_TARGETS", "TARGETS", "DurableNodeTarget", "EmbeddedTarget",
           "NodeTarget", "RedisNodeTarget", "Target", "TargetOptions", "TlsNodeTarget",
           "UrlTarget", "make_target"]

START_TIMEOUT = 60.0  # node start: executor workers are child processes
STOP_TIMEOUT = 10.0  # SIGTERM, then SIGKILL of the node's whole process group


@dataclasses.dataclass
class TargetOptions:
    """Settings from the command line that targets may use."""

    executors: int = 2
    node_args: list[str] = dataclasses.field(default_factory=list)
    token: str | None = None
    verbose: bool = False


class Target:
    """Base class: lifetime (a context manager) plus the two kinds of client."""

    name = "?"
    #: Transport scheme of the client's connection ("inproc", "tcp", "ws", ...).
    scheme = "?"

    def __init__(self) -> None:
        self._conn: droplet.DropletConnection | None = None

    def connect(self) -> droplet.DropletConnection:
        """The shared synchronous connection (opened on first use)."""
        if self._conn is None:
            self._conn = self._open_connection()
        return self._conn

    def _open_connection(self) -> droplet.DropletConnection:
        raise NotImplementedError

    def async_client(self) -> Any:
        """``async with target.async_client() as client`` inside ``trio.run``."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def diagnose(self) -> str | None:
        """After a failed case: what is wrong with the target, if known."""
        return None

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EmbeddedTarget(Target):
    """``droplet.LocalCluster`` in this process (inproc transport, no sockets).

    The sync connection uses a ``LocalCluster`` (its own background Trio thread);
    async rows start a fresh ``droplet.open_local_cluster`` inside their own
    ``trio.run``, since inproc connections live in one Trio loop.
    """

    name = "embedded"
    scheme = "inproc"

    def __init__(self, opts: TargetOptions, *, skip_encoding: bool = False) -> None:
        super().__init__()
        self._opts = opts
        self._skip = skip_encoding
        if skip_encoding:
            self.name = "embedded-objects"
        self._cluster: droplet.LocalCluster | None = None

    def _open_connection(self) -> droplet.DropletConnection:
        if self._cluster is None:
            self._cluster = droplet.LocalCluster(executors=self._opts.executors,
                                                 token=self._opts.token,
                                                 skip_encoding=self._skip)
        return self._cluster.connect()

    @asynccontextmanager
    async def async_client(self) -> AsyncIterator[droplet.AsyncDropletClient]:
        async with droplet.open_local_cluster(executors=self._opts.executors,
                                              token=self._opts.token,
                                              skip_encoding=self._skip) as cluster:
            async with cluster.client() as client:
                yield client

    def describe(self) -> str:
        return (f"{self.name}: droplet.LocalCluster(executors={self._opts.executors}, "
                f"skip_encoding={self._skip})")

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._cluster is not None:
                cluster, self._cluster = self._cluster, None
                cluster.close()


class UrlTarget(Target):
    """A node already running at ``url`` (not started or stopped here)."""

    def __init__(self, url: str, opts: TargetOptions, *, name: str = "url",
                 client_options: Any = None) -> None:
        super().__init__()
        self.url = url
        self.name = name
        self.scheme = url.split("://", 1)[0] if "://" in url else "tcp"
        self._opts = opts
        self.client_options = client_options

    def _open_connection(self) -> droplet.DropletConnection:
        return droplet.DropletConnection(self.url, token=self._opts.token,
                                         options=self.client_options)

    @asynccontextmanager
    async def async_client(self) -> AsyncIterator[droplet.AsyncDropletClient]:
        async with droplet.open_client(self.url, token=self._opts.token,
                                       options=self.client_options) as client:
            yield client

    def describe(self) -> str:
        return f"{self.name}: node at {self.url}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class NodeTarget(UrlTarget):
    """A real all-in-one node: ``python -m droplet.node --listen SCHEME://127.0.0.1:PORT``.

    Started on a free loopback port when the target is created, ready once
    ``droplet.node.cluster_info`` answers (the node opens its public address only
    after its executor workers joined). ``close()`` always stops it: SIGTERM,
    wait, then SIGKILL of its process group (the node and its executor workers).
    The node's output goes to a temporary log file, shown if it fails to start.
    """

    def __init__(self, name: str, opts: TargetOptions, *, scheme: str = "tcp",
                 node_args: Sequence[str] = (), client_options: Any = None) -> None:
        super().__init__("", opts, name=name, client_options=client_options)
        self.scheme = scheme
        self._extra = [*node_args, *opts.node_args]
        self._proc: subprocess.Popen[bytes] | None = None
        self.keep_log = opts.verbose
        self._log = tempfile.NamedTemporaryFile(prefix=f"droplet-bench-{name}-",
                                                suffix=".log", delete=False)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _command(self, url: str) -> list[str]:
        # In memory unless the target says otherwise: a node on a fixed port would
        # otherwise keep a durable store under ~/.local/share/droplet.
        storage = [] if "--data-dir" in self._extra else ["--data-dir", ":memory:"]
        return [sys.executable, "-m", "droplet.node", "--listen", url,
                "--executors", str(self._opts.executors), *storage, *self._extra]

    def _start(self) -> None:
        for attempt in range(3):  # a free port can be taken before the node binds it
            self.url = f"{self.scheme}://127.0.0.1:{free_port()}"
            env = dict(os.environ)
            if self._opts.token:
                env["DROPLET_TOKEN"] = self._opts.token
            self._proc = subprocess.Popen(
                self._command(self.url), stdin=subprocess.DEVNULL, stdout=self._log,
                stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # its own process group: we stop it, not Ctrl-C
            )
            if self._wait_ready():
                return
            code = self._proc.poll()
            self._stop()
            tail = self._log_tail()
            if code is not None and attempt < 2 and "already in use" in tail.lower():
                continue
            why = (f"did not answer within {START_TIMEOUT:g} s" if code is None
                   else f"exited with status {code}")
            raise RuntimeError(
                f"{self.name}: the node at {self.url} {why}; "
                f"command: {shlex.join(self._command(self.url))}\n"
                f"--- {self._log.name} (tail) ---\n{tail}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                trio.run(self._probe)
                return True
            except (droplet.DropletError, OSError):
                time.sleep(0.05)
        return False

    async def _probe(self) -> None:
        await cluster_info(self.url, self._opts.token, timeout=2.0)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            with open(self._log.name, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the node leads its own process group
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"[bench] {self.name}: node {proc.pid} ignored SIGTERM for "
                      f"{STOP_TIMEOUT:g} s; killing it", file=sys.stderr)
            except KeyboardInterrupt:  # second Ctrl-C: stop waiting, kill below
                pass
        # Anything of the node's group still alive (the node after a SIGTERM
        # timeout, or an executor worker it did not take down): kill it, so that
        # nothing is left behind.
        deadline = time.monotonic() + 1.0
        while _group_exists(pgid) and time.monotonic() < deadline and proc.poll() is not None:
            time.sleep(0.02)  # orphaned workers still exiting on their own
        if _group_exists(pgid):
            if proc.poll() is not None:
                print(f"[bench] {self.name}: processes of the node's group {pgid} outlived "
                      "it; killing them", file=sys.stderr)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.wait(STOP_TIMEOUT)

    def diagnose(self) -> str | None:
        self.keep_log = True
        proc = self._proc
        if proc is None or proc.poll() is None:
            return f"node log: {self._log.name}"
        code = proc.returncode
        how = (f"killed by {signal.Signals(-code).name}" if code < 0
               else f"exited with status {code}")
        return f"the node (pid {proc.pid}) {how}; node log: {self._log.name}"

    def describe(self) -> str:
        pid = self._proc.pid if self._proc is not None else "?"
        return f"{self.name}: {shlex.join(self._command(self.url))} (pid {pid})"

    def close(self) -> None:
        try:
            super().close()
        finally:
            try:
                self._stop()
            finally:
                self._log.close()
                if self.keep_log:
                    print(f"[bench] {self.name}: node log kept at {self._log.name}",
                          file=sys.stderr)
                else:
                    try:
                        os.unlink(self._log.name)
                    except OSError:
                        pass


class TlsNodeTarget(NodeTarget):
    """A node on ``tls://`` or ``wss://`` with a certificate from a throw-away CA.

    At start, ``trustme`` makes a CA and a certificate for 127.0.0.1 (and
    localhost) in a temporary directory (removed by ``close()``); the node gets
    ``--tls-cert``/``--tls-key``, clients trust only that CA: the sync
    connection through ``DropletConnection(url, tls_ca=CA_FILE)``, async
    clients and the readiness probe through ``TransportOptions(ssl_context=...)``
    (``open_client`` and ``cluster_info`` take no ``tls_ca``).
    """

    def __init__(self, name: str, opts: TargetOptions, *, scheme: str) -> None:
        try:
            import trustme
        except ImportError as exc:
            raise RuntimeError(f"the {name} target needs trustme (pip install trustme) "
                               "to make its test certificate") from exc
        self._certs: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
            prefix=f"droplet-bench-{name}-certs-")
        try:
            ca = trustme.CA()
            server = ca.issue_cert("127.0.0.1", "localhost")
            self.ca_file = os.path.join(self._certs.name, "ca.pem")
            cert_file = os.path.join(self._certs.name, "server.pem")
            key_file = os.path.join(self._certs.name, "server.key")
            ca.cert_pem.write_to_path(self.ca_file)
            for i, blob in enumerate(server.cert_chain_pems):  # leaf first
                blob.write_to_path(cert_file, append=i > 0)
            server.private_key_pem.write_to_path(key_file)
            client_options = TransportOptions(
                ssl_context=ssl.create_default_context(cafile=self.ca_file))
        except BaseException:
            self._remove_certs()
            raise
        # NodeTarget starts the node (and calls close() if that fails).
        super().__init__(name, opts, scheme=scheme, client_options=client_options,
                         node_args=["--tls-cert", cert_file, "--tls-key", key_file,
                                    # executors verify each other by it, so they listen
                                    # on this scheme and clients call them directly
                                    "--tls-ca", self.ca_file])

    def _open_connection(self) -> droplet.DropletConnection:
        return droplet.DropletConnection(self.url, token=self._opts.token, tls_ca=self.ca_file)

    async def _probe(self) -> None:
        # cluster_info() has no TLS options; the same one request, trusting our CA.
        from droplet.links import one_request
        from droplet.protocol.messages import Hello
        await one_request(self.url, Hello("probe", "probe"), token=self._opts.token,
                          options=self.client_options, timeout=2.0)

    def _remove_certs(self) -> None:
        certs, self._certs = self._certs, None
        if certs is not None:
            certs.cleanup()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._remove_certs()


class DurableNodeTarget(NodeTarget):
    """A tcp node whose store is durable: ``--data-dir TMP --fsync POLICY``.

    The data directory is a fresh temporary directory (on the file system of
    ``$TMPDIR``), removed when the target stops.
    """

    def __init__(self, name: str, opts: TargetOptions, *, fsync: str,
                 log_results: bool = False) -> None:
        self._data: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
            prefix=f"droplet-bench-{name}-")
        self.fsync = fsync
        extra = ["--log-results"] if log_results else []
        super().__init__(name, opts, scheme="tcp",
                         node_args=["--data-dir", self._data.name, "--fsync", fsync, *extra])

    def close(self) -> None:
        try:
            super().close()
        finally:
            data, self._data = self._data, None
            if data is not None:
                data.cleanup()


class RedisNodeTarget(NodeTarget):
    """A tcp node whose store is Redis: ``--storage redis://127.0.0.1:PORT/0``.

    A throw-away ``redis-server`` (or, with ``cluster``, a 3-master Redis
    Cluster) is started on free loopback ports with persistence off, and
    stopped with the target. Needs ``redis-server`` and ``redis-cli`` on PATH.
    """

    def __init__(self, name: str, opts: TargetOptions, *, cluster: bool = False) -> None:
        from droplet.testing.redis_servers import start_redis, start_redis_cluster

        self._redis = contextlib.ExitStack()
        try:
            if cluster:
                servers = self._redis.enter_context(start_redis_cluster(3))
            else:
                servers = [self._redis.enter_context(start_redis())]
            super().__init__(name, opts, scheme="tcp",
                             node_args=["--storage", servers[0].url])
        except BaseException:
            self._redis.close()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._redis.close()


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


TargetFactory = Callable[[TargetOptions], Target]

#: Targets by name, for ``--targets``.
TARGETS: dict[str, TargetFactory] = {
    "embedded": EmbeddedTarget,
    # inproc without the wire encoding: messages cross as objects (skip_encoding=True)
    "embedded-objects": lambda opts: EmbeddedTarget(opts, skip_encoding=True),
    "tcp": lambda opts: NodeTarget("tcp", opts, scheme="tcp"),
    "ws": lambda opts: NodeTarget("ws", opts, scheme="ws"),
    "tls": lambda opts: TlsNodeTarget("tls", opts, scheme="tls"),
    "wss": lambda opts: TlsNodeTarget("wss", opts, scheme="wss"),
    "durable-always": lambda opts: DurableNodeTarget("durable-always", opts, fsync="always"),
    "durable-everysec": lambda opts: DurableNodeTarget("durable-everysec", opts,
                                                       fsync="everysec"),
    "durable-no": lambda opts: DurableNodeTarget("durable-no", opts, fsync="no"),
    # call results logged too: what keeping them in memory saves a call
    "durable-results": lambda opts: DurableNodeTarget("durable-results", opts, fsync="always",
                                                      log_results=True),
    "redis": lambda opts: RedisNodeTarget("redis", opts),
    "redis-cluster": lambda opts: RedisNodeTarget("redis-cluster", opts, cluster=True),
}

#: What ``python benchmarks/run.py`` measures without ``--targets``.
DEFAULT_TARGETS = "embedded,tcp,ws,tls,wss"

#: The cases (names or globs) a target runs when ``--only`` is not given; a
#: target not listed runs every case. The other transports only need the
#: transport comparison, the 2-function composition beside tcp; ``--only``
#: (e.g. ``--only '*' --targets ws``) runs any case on them.
TRANSPORT_CASES = ("dag2", "dag2-direct")
#: The durable store's rows: the storage operations, and a call (whose result
#: is kept in memory only) to show what durability costs a call.
STORAGE_CASES = ("put", "get", "put-throughput", "noop")
DEFAULT_CASES: dict[str, tuple[str, ...]] = {
    "ws": TRANSPORT_CASES,
    "tls": TRANSPORT_CASES,
    "wss": TRANSPORT_CASES,
    "durable-always": STORAGE_CASES,
    "durable-everysec": STORAGE_CASES,
    "durable-no": STORAGE_CASES,
    "durable-results": ("noop", "dag2", "throughput"),
    "redis": STORAGE_CASES,
    "redis-cluster": STORAGE_CASES,
}


def make_target(spec: str, opts: TargetOptions) -> Target:
    """A target from a ``--targets`` item: a registered name, or ``node:SCHEME``."""
    if spec in TARGETS:
        return TARGETS[spec](opts)
    if spec.startswith("node:"):
        scheme = spec.split(":", 1)[1]
        return NodeTarget(scheme, opts, scheme=scheme)
    raise ValueError(f"unknown target {spec!r}; known: {', '.join(TARGETS)}, node:SCHEME")
