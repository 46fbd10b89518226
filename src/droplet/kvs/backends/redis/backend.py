"""``RedisBackend``: several stateless Droplet storage nodes in front of one Redis.

What Droplet stores where (see docs/how-to/redis.rst):

- each Droplet key ``k`` is one Redis string ``<prefix>k`` (prefix ``droplet:``
  by default) holding the lattice's canonical encoding, so a Cluster shards
  Droplet keys like any others and ``{hash tags}`` in a key co-locate keys;
- puts merge inside Redis (:mod:`.scripts`), atomically per key, whichever
  storage node they come through;
- each change is published on the channel ``<prefix>changes/<db>``; every
  storage node subscribes and hands changes made through *other* nodes to its
  service, which answers waiting reads and pushes ``KvsUpdate`` to caches.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import secrets
from collections.abc import Iterator
from typing import Any

import trio

from ....errors import LatticeTypeError, ProtocolError, StorageError
from ....lattices import RAW, decode_lattice, encode_lattice
from ....lattices.codec import lattice_type_name
from ...keys import is_result_key
from ..base import BackendStatistics, ChangeHandler, PutResult, StorageBackend
from .client import RedisClient
from .connection import RedisError, StorageUnavailable, open_redis_connection
from .resp import RedisUrl, parse_redis_url
from .scripts import COMPARE_AND_SET, MERGE, unpack_notice

__all__ = ["RedisBackend"]

log = logging.getLogger("droplet.kvs.redis")

#: Encodings up to this size travel inside change notices; larger ones are read back.
INLINE_NOTICE_LIMIT = 64 * 1024
#: Compare-and-set rounds before a contended fallback merge gives up.
MAX_CAS_ROUNDS = 64
#: First backoff after a compare-and-set lost a race (seconds; doubles, capped at 64x).
CAS_BACKOFF = 0.0005
RESUBSCRIBE_BACKOFF = 0.5


class RedisBackend(StorageBackend):
    """Lattices in Redis or a Redis Cluster (``redis://``, ``rediss://``).

    Args:
        url: ``redis[s]://[[user]:password@]host[:port][/db][?prefix=...]``;
            any node of a Cluster will do.
        inline_limit: largest encoding sent inside a change notice.
        result_ttl: seconds Redis keeps a call result (``__droplet/results/...``)
            before it expires; None: until deleted.
    """

    name = "redis"
    concurrent = True

    def __init__(self, url: str | RedisUrl, *, inline_limit: int = INLINE_NOTICE_LIMIT,
                 result_ttl: float | None = None) -> None:
        self.url = parse_redis_url(url) if isinstance(url, str) else url
        self.origin = secrets.token_hex(8).encode()
        self.channel = f"{self.url.prefix}changes/{self.url.db}".encode()
        self.inline_limit = inline_limit
        self._result_ttl_ms = max(1, int(result_ttl * 1000)) if result_ttl else 0
        self._prefix = self.url.prefix.encode("utf-8", "surrogatepass")
        self._client: RedisClient | None = None
        self._ready = trio.Event()
        #: puts merged by a Lua script / by the compare-and-set fallback; notices taken in
        self.script_merges = 0
        self.cas_merges = 0
        self.cas_conflicts = 0
        self.notices = 0

    # ------------------------------------------------------------------ lifecycle

    async def run(self, changed: ChangeHandler, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, load the scripts, subscribe to changes; then relay them until cancelled."""
        async with trio.open_nursery() as nursery:
            client = RedisClient(nursery, self.url)
            try:
                await client.start([MERGE, COMPARE_AND_SET])
                subscribed = trio.Event()
                nursery.start_soon(self._listen, client, changed, subscribed)
                await subscribed.wait()
                self._client = client
                self._ready.set()
                log.info("storage on %s (%s)", self.url.redacted(),
                         f"cluster of {len(client.masters())} masters" if client.cluster
                         else "standalone")
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._client = None
                with trio.CancelScope(shield=True):
                    await client.aclose()

    async def _listen(self, client: RedisClient, changed: ChangeHandler,
                      subscribed: trio.Event) -> None:
        """Keep one pub/sub connection subscribed (any node: PUBLISH reaches all)."""
        while True:
            try:
                await self._listen_once(client, changed, subscribed)
            except (StorageUnavailable, RedisError, OSError) as exc:
                if not subscribed.is_set():
                    raise
                log.warning("change notices from %s interrupted (%s); resubscribing",
                            self.url.redacted(), exc)
            await trio.sleep(RESUBSCRIBE_BACKOFF)

    async def _listen_once(self, client: RedisClient, changed: ChangeHandler,
                           subscribed: trio.Event) -> None:
        async def on_push(reply: Any) -> None:
            if not isinstance(reply, list) or len(reply) < 3:
                return
            kind = reply[0]
            if kind == b"subscribe":
                subscribed.set()
            elif kind == b"message":
                await self._on_notice(client, reply[2], changed)

        masters = client.masters()
        host, port = masters[self.origin[0] % len(masters)]  # spread listeners over masters
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:  # for the connection's reader task
            try:
                conn = await open_redis_connection(nursery, self.url, host, port,
                                                   select_db=False, on_push=on_push)
                try:
                    await conn.send_only("SUBSCRIBE", self.channel)
                    await conn.closed_event.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        await conn.aclose()
                failure = StorageUnavailable(f"pub/sub connection to {host}:{port} closed")
            except (StorageUnavailable, RedisError, OSError) as exc:
                failure = exc  # raised below, outside the nursery: not as a group
            nursery.cancel_scope.cancel()
        raise failure

    async def _on_notice(self, client: RedisClient, data: bytes,
                         changed: ChangeHandler) -> None:
        try:
            origin, raw_key, encoding = unpack_notice(data)
        except ValueError as exc:
            log.warning("ignoring a malformed change notice on %r: %s", self.channel, exc)
            return
        if origin == self.origin:
            return  # our own put: the service already told its waiters
        self.notices += 1
        key = raw_key.decode("utf-8", "surrogatepass")
        if not encoding:  # too big for the notice: read it back
            try:
                value = await client.call(self._prefix + raw_key, "GET", self._prefix + raw_key)
            except RedisError as exc:
                log.warning("cannot read %r, changed through another storage node: %s", key, exc)
                return
            if value is None:
                return
            encoding = value
        try:
            await changed(key, encoding)
        except Exception:
            log.exception("handling a change of %r from another storage node", key)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # ------------------------------------------------------------------ operations

    async def _ready_client(self) -> RedisClient:
        if self._client is None:
            if self._ready.is_set():
                raise StorageUnavailable(f"the Redis backend for {self.url.redacted()} "
                                         "has stopped")
            await self._ready.wait()
            assert self._client is not None
        return self._client

    def redis_key(self, key: str) -> bytes:
        """The Redis key that holds Droplet key ``key``."""
        return self._prefix + key.encode("utf-8", "surrogatepass")

    async def get(self, key: str) -> bytes | None:
        with _as_storage_error():
            client = await self._ready_client()
            rkey = self.redis_key(key)
            value: bytes | None = await client.call(rkey, "GET", rkey)
            return value

    async def delete(self, key: str) -> bool:
        with _as_storage_error():
            client = await self._ready_client()
            rkey = self.redis_key(key)
            removed: int = await client.call(rkey, "DEL", rkey)
            return removed > 0

    async def put(self, key: str, data: bytes) -> PutResult:
        with _as_storage_error():
            return await self._put(key, data)

    async def _put(self, key: str, data: bytes) -> PutResult:
        incoming = decode_lattice(data, load=RAW)  # ProtocolError for the sender
        encoding = encode_lattice(incoming, dump=RAW)
        type_name = incoming.type_name
        client = await self._ready_client()
        rkey = self.redis_key(key)
        notice = (self.channel, self.origin, self.inline_limit,
                  key.encode("utf-8", "surrogatepass"),
                  self._result_ttl_ms if is_result_key(key) else 0)
        reply = await client.run_script(MERGE, rkey, encoding, 10 + len(type_name), type_name,
                                        *notice)
        status = reply[0]
        if status == 0:
            self.script_merges += 1
            return type_name, None
        if status == 1:
            self.script_merges += 1
            return type_name, bytes(reply[1])
        if status == 3:
            raise self._type_error(key, rkey, reply[1], type_name)
        return await self._put_cas(client, key, rkey, incoming, encoding, notice)

    async def _put_cas(self, client: RedisClient, key: str, rkey: bytes, incoming: Any,
                       encoding: bytes, notice: tuple[bytes, bytes, int, bytes, int]
                       ) -> PutResult:
        """Merge in Python and write only if the key did not change meanwhile."""
        type_name: str = incoming.type_name
        for attempt in range(MAX_CAS_ROUNDS):
            current: bytes | None = await client.call(rkey, "GET", rkey)
            if current is None:
                merged, seen = encoding, ""
            else:
                try:
                    stored = decode_lattice(current, load=RAW)
                except ProtocolError as exc:
                    raise RedisError(f"Redis key {rkey!r} holds something that is not a "
                                     f"Droplet lattice: {exc}") from None
                if type(stored) is not type(incoming):
                    raise self._type_error(key, rkey, current, type_name)
                merged = encode_lattice(stored.merge(incoming), dump=RAW)
                if merged == current:
                    self.cas_merges += 1
                    return type_name, None
                seen = hashlib.sha1(current).hexdigest()
            if await client.run_script(COMPARE_AND_SET, rkey, seen, merged, *notice):
                self.cas_merges += 1
                return type_name, merged
            self.cas_conflicts += 1
            # Writers racing on one key: back off a random, growing while (capped).
            await trio.sleep(random.uniform(0, CAS_BACKOFF * 2 ** min(attempt, 6)))
        raise RedisError(f"could not merge into {key!r}: it changed under {MAX_CAS_ROUNDS} "
                         "merges in a row")

    @staticmethod
    def _type_error(key: str, rkey: bytes, stored: bytes, incoming: str) -> Exception:
        try:
            held = lattice_type_name(stored)
        except ProtocolError:
            return RedisError(f"Redis key {rkey!r} holds something that is not a Droplet "
                              "lattice")
        return LatticeTypeError(f"key {key!r} holds a {held} lattice; "
                                f"cannot merge a {incoming} lattice into it")

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(backend=self.name, keys=None)


@contextlib.contextmanager
def _as_storage_error() -> Iterator[None]:
    """Redis failures leave the backend as :class:`~droplet.errors.StorageError` itself,
    the type clients know (the wire carries an error's class name), cause kept."""
    try:
        yield
    except RedisError as exc:
        raise StorageError(str(exc)) from exc
