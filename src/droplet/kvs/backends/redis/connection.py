"""A Trio-native, pipelined Redis connection on ``hiredis``'s sans-IO parser.

One reader task per connection owns the receive side and the ``hiredis.Reader``;
callers queue their commands (coalesced into one write while another write is
in flight) and wait for their replies in FIFO order, so many tasks share one
connection with their commands pipelined. A caller cancelled while it waits
leaves its slot in the queue (the reply is read and dropped); writes are
shielded from cancellation and bounded by a timeout, and a write that fails
breaks the connection, which is then closed, never reused.
"""

from __future__ import annotations

import collections
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hiredis
import trio

from ....errors import ConnectionError as DropletConnectionError
from ....errors import StorageError
from .resp import Arg, RedisUrl, pack_command, pack_commands

__all__ = ["RedisConnection", "RedisError", "RedisReplyError", "StorageUnavailable",
           "open_redis_connection"]

log = logging.getLogger("droplet.kvs.redis")

CONNECT_TIMEOUT = 10.0
READ_SIZE = 65536
#: A write Redis does not take within this long breaks the connection.
WRITE_TIMEOUT = 30.0


class RedisError(StorageError):
    """Something went wrong talking to the Redis storage tier (a write then fails
    rather than being acknowledged)."""


class StorageUnavailable(RedisError, DropletConnectionError):
    """The Redis server cannot be reached, or the connection broke."""


class RedisReplyError(RedisError):
    """Redis answered a command with an error reply (``-ERR ...``)."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


class _Slot:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Any = None


class RedisConnection:
    """A connection to one Redis server; use :func:`open_redis_connection`."""

    def __init__(self, stream: trio.abc.Stream, address: str,
                 on_push: Callable[[Any], Awaitable[None]] | None = None) -> None:
        self.address = address
        self._stream = stream
        self._reader = hiredis.Reader(replyError=RedisReplyError)
        self._pending: collections.deque[_Slot] = collections.deque()
        self._outbox: list[bytes] = []
        self._writing = False
        self._on_push = on_push  # pub/sub mode: every reply goes here
        self.closed = False
        #: set once the connection is closed or broken
        self.closed_event = trio.Event()
        self._failure: BaseException | None = None

    async def execute(self, *args: Arg) -> Any:
        """Send one command and return its reply (error replies are raised)."""
        reply = (await self.execute_many([args]))[0]
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def execute_many(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send commands back to back; their replies, error replies returned not raised."""
        data = pack_commands(commands) if len(commands) > 1 else pack_command(*commands[0])
        slots = [_Slot() for _ in commands]
        await self._send(data, slots)
        for slot in slots:
            await slot.done.wait()
        if self._failure is not None and any(s.reply is _LOST for s in slots):
            raise StorageUnavailable(
                f"connection to Redis at {self.address} broke: {self._failure}"
            ) from self._failure
        return [slot.reply for slot in slots]

    async def send_only(self, *args: Arg) -> None:
        """Send a command whose answers arrive as pushes (SUBSCRIBE and friends)."""
        await self._send(pack_command(*args), [])

    async def _send(self, data: bytes, slots: list[_Slot]) -> None:
        """Queue ``data``; the task already writing sends it with its next write.

        Commands that arrive while a write is in flight are coalesced into one
        ``send_all``, so concurrent tasks pipeline without a writer task of
        their own. The write is shielded from the caller's cancellation (it
        carries other callers' commands) and bounded by ``WRITE_TIMEOUT``; one
        that fails leaves the protocol state unknown, so the connection is then
        closed, never reused, and every command still waiting fails with
        :class:`StorageUnavailable`.
        """
        if self.closed:
            raise StorageUnavailable(f"connection to Redis at {self.address} is closed"
                                     + (f": {self._failure}" if self._failure else ""))
        self._pending.extend(slots)
        self._outbox.append(data)
        if self._writing:
            return  # the writer takes it along
        self._writing = True
        try:
            # Shielded: the queue holds other tasks' commands too, and a cancelled
            # write would break the connection under them. Bounded instead.
            with trio.CancelScope(shield=True):
                with trio.fail_after(WRITE_TIMEOUT):
                    while self._outbox:
                        chunk = (self._outbox[0] if len(self._outbox) == 1
                                 else b"".join(self._outbox))
                        self._outbox.clear()
                        await self._stream.send_all(chunk)
        except BaseException as exc:
            self._fail(exc)
            if isinstance(exc, trio.Cancelled | KeyboardInterrupt):
                raise
            raise StorageUnavailable(
                f"cannot write to Redis at {self.address}: {exc}") from exc
        finally:
            self._writing = False

    async def run_reader(self) -> None:
        """Read replies until the connection closes (the connection's own task)."""
        reader = self._reader
        try:
            while True:
                data = await self._stream.receive_some(READ_SIZE)
                if not data:
                    raise StorageUnavailable(f"Redis at {self.address} closed the connection")
                reader.feed(data)  # type: ignore[arg-type]  # any bytes-like works
                while True:
                    reply = reader.gets()
                    if reply is False:
                        break
                    if self._on_push is not None and not self._pending:
                        await self._on_push(reply)
                        continue
                    if not self._pending:
                        raise RedisError(f"unexpected reply from Redis at {self.address}")
                    slot = self._pending.popleft()
                    slot.reply = reply
                    slot.done.set()
        except BaseException as exc:
            self._fail(exc)
            if not isinstance(exc, trio.Cancelled | trio.ClosedResourceError
                              | trio.BrokenResourceError | OSError | RedisError):
                raise
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self.closed = True
        self.closed_event.set()
        self._outbox.clear()
        while self._pending:
            slot = self._pending.popleft()
            slot.reply = _LOST
            slot.done.set()

    async def aclose(self) -> None:
        self.closed = True
        self._fail(StorageUnavailable("connection closed"))
        try:
            await trio.aclose_forcefully(self._stream)
        except Exception as exc:  # already broken: nothing to tell
            log.debug("closing Redis connection to %s: %s", self.address, exc)


_LOST: Any = object()


async def _handshake(conn: RedisConnection, url: RedisUrl, *, select_db: bool) -> None:
    commands: list[list[Arg]] = []
    if url.password is not None:
        commands.append(["AUTH", url.username, url.password] if url.username
                        else ["AUTH", url.password])
    if select_db and url.db:
        commands.append(["SELECT", url.db])
    if not commands:
        return
    for reply in await conn.execute_many(commands):
        if isinstance(reply, RedisReplyError):
            raise RedisError(f"Redis at {url.redacted()} refused the connection setup: {reply}")


def make_ssl_context(url: RedisUrl) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=url.ca_file)
    if not url.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def open_redis_connection(
    nursery: trio.Nursery, url: RedisUrl, host: str | None = None, port: int | None = None,
    *, ssl_context: ssl.SSLContext | None = None, select_db: bool = True,
    on_push: Callable[[Any], Awaitable[None]] | None = None,
) -> RedisConnection:
    """Connect (TCP, or TLS for ``rediss://``), AUTH and SELECT as the URL says.

    ``host``/``port`` override the URL's (Cluster nodes); the reader task runs
    in ``nursery`` until the connection closes.

    Raises:
        StorageUnavailable: nothing answers, or the TLS handshake failed.
        RedisError: Redis refused AUTH or SELECT.
    """
    host = url.host if host is None else host
    port = url.port if port is None else port
    address = f"{host}:{port}"
    stream: trio.abc.Stream
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            tcp = await trio.open_tcp_stream(host, port)
            stream = tcp
            if url.tls:
                ctx = ssl_context or make_ssl_context(url)
                tls = trio.SSLStream(tcp, ctx, server_hostname=host)
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tcp)
                    raise
                stream = tls
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        raise StorageUnavailable(
            f"cannot connect to Redis at {address} ({url.redacted()}): {exc}") from exc
    conn = RedisConnection(stream, address, on_push=on_push)
    nursery.start_soon(conn.run_reader)
    try:
        await _handshake(conn, url, select_db=select_db)
    except BaseException:
        await conn.aclose()
        raise
    return conn
