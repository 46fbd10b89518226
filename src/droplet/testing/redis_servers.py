"""Throwaway ``redis-server`` processes for tests and benchmarks.

Each server listens on a free loopback port with persistence off
(``--save '' --appendonly no``) in its own temporary directory; a 3-master
Redis Cluster is built with ``redis-cli --cluster create``. Synchronous, so
session- or module-scoped pytest fixtures can share them.

>>> with start_redis() as server:                          # doctest: +SKIP
...     url = server.url                                   # redis://127.0.0.1:PORT/0
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

__all__ = ["RedisServer", "redis_available", "start_redis", "start_redis_cluster"]

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def redis_available() -> bool:
    """Whether ``redis-server`` and ``redis-cli`` are on PATH."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def _free_port(*, with_bus: bool = False) -> int:
    """A free loopback port (and, for Cluster nodes, port + 10000 free too)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not with_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _command(port: int, *args: str, tls: bool = False, ca: str | None = None) -> str:
    cmd = ["redis-cli", "-h", "127.0.0.1", "-p", str(port)]
    if tls:
        cmd += ["--tls", "--cacert", ca or ""]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=STOP_TIMEOUT,
                          check=False)
    return proc.stdout.strip()


class RedisServer:
    """One running ``redis-server``."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, directory: Path,
                 tls: bool = False, ca: str | None = None) -> None:
        self.proc = proc
        self.port = port
        self.directory = directory
        self.tls = tls
        self.ca = ca

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        """Run ``redis-cli`` against this server; its output."""
        return _command(self.port, *args, tls=self.tls, ca=self.ca)

    def log_text(self) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited: "
                                   f"{self.log_text()[-2000:]}")
            if self.cli("PING"):  # PONG, or NOAUTH from a server with a password
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def start_redis(*args: str, port: int | None = None, tls_files: Sequence[str] | None = None,
                cluster: bool = False) -> Iterator[RedisServer]:
    """Start ``redis-server`` on a free loopback port; stop it on exit.

    ``tls_files`` = ``(cert, key, ca)`` serves TLS only (``--port 0 --tls-port``).
    """
    server_bin = shutil.which("redis-server")
    if server_bin is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = port or _free_port(with_bus=cluster)
    with tempfile.TemporaryDirectory(prefix="droplet-redis-") as tmp:
        directory = Path(tmp)
        cmd = [server_bin, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", tmp, "--logfile", str(directory / "redis.log")]
        ca = None
        if tls_files:
            cert, key, ca = tls_files
            cmd += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", cert,
                    "--tls-key-file", key, "--tls-ca-cert-file", ca,
                    "--tls-auth-clients", "no"]
        else:
            cmd += ["--port", str(port)]
        if cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file",
                    str(directory / "nodes.conf"), "--cluster-node-timeout", "5000"]
        proc = subprocess.Popen([*cmd, *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        server = RedisServer(proc, port, directory, tls=bool(tls_files), ca=ca)
        try:
            server.wait_ready()
            yield server
        finally:
            server.stop()


@contextmanager
def start_redis_cluster(masters: int = 3) -> Iterator[list[RedisServer]]:
    """A Redis Cluster of ``masters`` masters and no replicas, all slots assigned."""
    with ExitStack() as stack:
        servers = [stack.enter_context(start_redis(cluster=True)) for _ in range(masters)]
        nodes = [f"127.0.0.1:{s.port}" for s in servers]
        proc = subprocess.run(["redis-cli", "--cluster", "create", *nodes,
                               "--cluster-replicas", "0", "--cluster-yes"],
                              capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {proc.stdout}{proc.stderr}")
        deadline = time.monotonic() + START_TIMEOUT
        while not all("cluster_state:ok" in s.cli("CLUSTER", "INFO") for s in servers):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield servers
