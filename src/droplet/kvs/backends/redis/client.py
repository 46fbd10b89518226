"""Route commands to the right Redis server: one standalone server, or a Redis Cluster.

Given any node of a Cluster, :class:`RedisClient` reads ``CLUSTER SLOTS`` and
sends each command to the master owning its key's hash slot (CRC16, honouring
``{hash tags}``); ``MOVED`` refreshes the slot map, ``ASK`` retries once on the
named node after ``ASKING``, ``TRYAGAIN``/``CLUSTERDOWN`` and broken connections
are retried with a short backoff (Droplet's writes are lattice merges, so a
retried write is harmless). A standalone server answers ``CLUSTER SLOTS`` with
an error, and then every command goes to it. Scripts are loaded on every master
up front (``SCRIPT LOAD``) and reloaded on ``NOSCRIPT``.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import trio

from .connection import (
    RedisConnection,
    RedisError,
    RedisReplyError,
    StorageUnavailable,
    make_ssl_context,
    open_redis_connection,
)
from .resp import CLUSTER_SLOTS, Arg, RedisUrl, key_slot
from .scripts import Script

__all__ = ["RedisClient"]

log = logging.getLogger("droplet.kvs.redis")

MAX_ATTEMPTS = 6
BACKOFF = 0.05


class RedisClient:
    """Commands by key, to a standalone Redis or a Cluster (see the module docstring)."""

    def __init__(self, nursery: trio.Nursery, url: RedisUrl) -> None:
        self.url = url
        self._nursery = nursery
        self._ssl: ssl.SSLContext | None = make_ssl_context(url) if url.tls else None
        self._conns: dict[tuple[str, int], RedisConnection] = {}
        self._connecting: dict[tuple[str, int], trio.Lock] = {}
        self.cluster = False
        self._slots: list[tuple[str, int]] = []
        self._seed = (url.host, url.port)
        self._scripts: list[Script] = []

    async def start(self, scripts: list[Script]) -> None:
        """Connect, learn the topology, load the scripts on every master."""
        self._scripts = scripts
        conn = await self._conn(self._seed)
        try:
            slots = await conn.execute("CLUSTER", "SLOTS")
        except RedisReplyError as exc:
            if "cluster support disabled" not in str(exc):
                raise
            self.cluster = False
        else:
            if self.url.db:
                raise ValueError(f"{self.url.redacted()}: a Redis Cluster has only database 0")
            self.cluster = True
            self._apply_slots(slots)
        for address in self.masters():
            await self._load_scripts(await self._conn(address))

    def masters(self) -> list[tuple[str, int]]:
        if not self.cluster:
            return [self._seed]
        return sorted(set(self._slots))

    def node_for(self, key: bytes) -> tuple[str, int]:
        """The server that owns ``key``."""
        if not self.cluster:
            return self._seed
        return self._slots[key_slot(key)]

    def _apply_slots(self, reply: list[Any]) -> None:
        table: list[tuple[str, int] | None] = [None] * CLUSTER_SLOTS
        for entry in reply:
            start, end, master = entry[0], entry[1], entry[2]
            host = master[0].decode() if master[0] else self._seed[0]
            for slot in range(start, end + 1):
                table[slot] = (host, int(master[1]))
        missing = sum(1 for node in table if node is None)
        if missing:
            raise RedisError(f"Redis Cluster at {self.url.redacted()} leaves {missing} hash "
                             "slots unassigned; fix the cluster (redis-cli --cluster fix)")
        self._slots = table  # type: ignore[assignment]  # no None left

    async def refresh_slots(self) -> None:
        """Re-read the slot map from any node that answers."""
        for address in [self._seed, *self.masters()]:
            try:
                conn = await self._conn(address)
                self._apply_slots(await conn.execute("CLUSTER", "SLOTS"))
                return
            except (StorageUnavailable, RedisReplyError) as exc:
                log.debug("cannot read the slot map from %s:%d: %s", *address, exc)
        raise StorageUnavailable(f"no node of the Redis Cluster at {self.url.redacted()} "
                                 "answers CLUSTER SLOTS")

    async def _conn(self, address: tuple[str, int]) -> RedisConnection:
        conn = self._conns.get(address)
        if conn is not None and not conn.closed:
            return conn
        lock = self._connecting.setdefault(address, trio.Lock())
        async with lock:
            conn = self._conns.get(address)
            if conn is None or conn.closed:
                conn = await open_redis_connection(
                    self._nursery, self.url, *address, ssl_context=self._ssl,
                    select_db=not self.cluster)
                self._conns[address] = conn
            return conn

    async def _load_scripts(self, conn: RedisConnection) -> None:
        for script in self._scripts:
            sha = await conn.execute("SCRIPT", "LOAD", script.source)
            if sha.decode() != script.sha:
                raise RedisError(f"Redis at {conn.address} hashed script {script.name} "
                                 f"to {sha!r}, not {script.sha}")

    async def call(self, key: bytes, *args: Arg) -> Any:
        """Run a command on ``key``'s server, following redirections."""
        return await self._call(key, list(args), None)

    async def run_script(self, script: Script, key: bytes, *argv: Arg) -> Any:
        """``EVALSHA`` of a loaded script on ``key``'s server (reloaded on NOSCRIPT)."""
        return await self._call(key, ["EVALSHA", script.sha, 1, key, *argv], script)

    async def _call(self, key: bytes, args: list[Arg], script: Script | None) -> Any:
        address = self.node_for(key)
        asking = False
        failure: Exception | None = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                conn = await self._conn(address)
                if asking:
                    replies = await conn.execute_many([["ASKING"], args])
                    reply = replies[1]
                    if isinstance(reply, RedisReplyError):
                        raise reply
                    return reply
                return await conn.execute(*args)
            except RedisReplyError as exc:
                failure = exc
                code = exc.code
                asking = False
                if code == "MOVED" and self.cluster:
                    await self.refresh_slots()
                    address = _redirect_target(exc)
                elif code == "ASK" and self.cluster:
                    address, asking = _redirect_target(exc), True
                elif code == "NOSCRIPT" and script is not None:
                    await self._load_scripts(await self._conn(address))
                elif code in ("TRYAGAIN", "CLUSTERDOWN", "LOADING"):
                    await trio.sleep(BACKOFF * 2**attempt)
                else:
                    raise
            except StorageUnavailable as exc:
                failure = exc
                asking = False
                if attempt >= 2:
                    raise
                await trio.sleep(BACKOFF * 2**attempt)
                if self.cluster:
                    try:
                        await self.refresh_slots()
                    except StorageUnavailable:
                        pass
                    address = self.node_for(key)
        raise RedisError(f"Redis at {self.url.redacted()} did not take the command after "
                         f"{MAX_ATTEMPTS} attempts: {failure}")

    async def aclose(self) -> None:
        for conn in list(self._conns.values()):
            await conn.aclose()
        self._conns.clear()


def _redirect_target(exc: RedisReplyError) -> tuple[str, int]:
    # "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381"
    try:
        host, _, port = str(exc).split()[2].rpartition(":")
        return host, int(port)
    except (IndexError, ValueError):
        raise RedisError(f"cannot parse the Redis redirection {exc}") from exc
