"""The conformance suite every transport must pass (STYLE.md 13).

Run all of it::

    await check_transport("tcp://127.0.0.1:0", server_options, client_options)

or one check at a time, for sharper failure reports::

    for name, check in CHECKS.items():
        await check("ws://127.0.0.1:0", server_options, client_options)

``base_url`` is a listen address with port 0 (or ``inproc://`` without a name),
so each check starts and stops its own listeners; the options carry the TLS
contexts ``tls://`` and ``wss://`` need (server side: certificate chain loaded;
client side: trusting its CA). Checks derive smaller ``max_frame_size`` limits
from the given options where they test limits.

A failed check raises AssertionError naming what broke. The checks do real
socket I/O: guard them with ``trio.fail_after`` (a hang is a failure too), never
with a MockClock, whose autojump can fire while bytes are in flight.
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from ..errors import ConnectionError, ProtocolError
from ..transports.base import Connection, TransportOptions
from ..transports.registry import get_transport, parse_address

__all__ = [
    "CHECKS",
    "check_aclose",
    "check_big_frames",
    "check_bound_url",
    "check_cancelled_send",
    "check_clean_close",
    "check_concurrent_senders",
    "check_connect_refused",
    "check_empty_frame",
    "check_handler_peer_gone",
    "check_objects",
    "check_order",
    "check_oversize_frame",
    "check_transport",
    "check_vanished_peer",
]

Check = Callable[[str, TransportOptions, TransportOptions], Awaitable[None]]

BIG_FRAME = 4 * 1024 * 1024
SMALL_LIMIT = 64 * 1024  # max_frame_size used where a check needs a low limit
_HEADER = struct.Struct(">HII")  # task, sequence number, payload length


# --------------------------------------------------------------------------- helpers


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


async def _expect_raises(
    expected: type[BaseException] | tuple[type[BaseException], ...],
    what: str,
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
) -> BaseException:
    """Await ``fn(*args)`` and return the exception it raised, which must be ``expected``."""
    names = (
        expected.__name__
        if isinstance(expected, type)
        else " or ".join(e.__name__ for e in expected)
    )
    try:
        await fn(*args)
    except expected as exc:
        return exc
    except Exception as exc:
        raise AssertionError(f"{what}: expected {names}, got {exc!r}") from exc
    raise AssertionError(f"{what}: expected {names}, but it succeeded")


def _options(base: TransportOptions, *, max_frame_size: int | None = None) -> TransportOptions:
    return TransportOptions(
        max_frame_size=base.max_frame_size if max_frame_size is None else max_frame_size,
        read_timeout=base.read_timeout,
        ssl_context=base.ssl_context,
        skip_encoding=base.skip_encoding,
    )


def _pattern(task: int, seq: int, size: int) -> bytes:
    """A frame whose every byte depends on (task, seq): interleaving shows."""
    stamp = struct.pack(">HI", task, seq) + b"\xa5\x5a"
    body = (stamp * (size // len(stamp) + 1))[:size]
    return _HEADER.pack(task, seq, size) + body


def _check_pattern(frame: bytes) -> tuple[int, int]:
    _expect(len(frame) >= _HEADER.size, f"frame of {len(frame)} bytes lost its header")
    task, seq, size = _HEADER.unpack_from(frame)
    _expect(
        frame == _pattern(task, seq, size),
        f"frame {seq} of sender {task} arrived corrupted or interleaved ({len(frame)} bytes)",
    )
    return task, seq


async def _vanish(conn: Connection) -> None:
    """Drop a connection without a goodbye, as a crashed process would.

    Stream-based connections (``tcp``, ``tls``, ``ws``, ``wss``) keep their byte
    stream in ``_stream``; closing it forcefully skips any close frame or TLS
    close_notify. An in-memory pipe has no goodbye to skip: closing it is all a
    crash would do.
    """
    stream = getattr(conn, "_stream", None)
    if isinstance(stream, trio.abc.AsyncResource):
        await trio.aclose_forcefully(stream)
    else:
        await conn.aclose()


class _Listener:
    """A running listener whose server-side connections the check drives itself.

    Client connections run their background tasks (if any) in ``nursery``.
    """

    def __init__(
        self,
        url: str,
        accepted: trio.MemoryReceiveChannel[Connection],
        nursery: trio.Nursery,
    ) -> None:
        self.url = url
        self.nursery = nursery
        self._accepted = accepted
        self._clients: list[Connection] = []

    async def connect(self, options: TransportOptions) -> Connection:
        return await get_transport(self.url).connect(self.url, options, self.nursery)

    async def pair(self, options: TransportOptions) -> tuple[Connection, Connection]:
        """Connect once; return (client end, server end)."""
        client = await self.connect(options)
        self._clients.append(client)
        server = await self._accepted.receive()
        return client, server

    async def aclose_clients(self) -> None:
        for client in self._clients:
            await client.aclose()


@contextlib.asynccontextmanager
async def _listening(base_url: str, options: TransportOptions) -> AsyncIterator[_Listener]:
    """Serve at ``base_url`` until the block ends, then stop (by cancellation)."""
    accepted_send, accepted_recv = trio.open_memory_channel[Connection](math.inf)

    async def handler(conn: Connection) -> None:
        accepted_send.send_nowait(conn)
        await trio.sleep_forever()  # the check owns the connection until we stop

    transport = get_transport(base_url)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(transport.serve, base_url, handler, options)
        listener = _Listener(url, accepted_recv, nursery)
        try:
            yield listener
        finally:
            await listener.aclose_clients()
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _connected(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> AsyncIterator[tuple[Connection, Connection]]:
    async with _listening(base_url, options_server) as listener:
        yield await listener.pair(options_client)


async def _send_each(conn: Connection, frames: list[bytes]) -> None:
    for frame in frames:
        await conn.send(frame)


async def _expect_frames(conn: Connection, frames: list[bytes], what: str) -> None:
    for i, expected in enumerate(frames):
        got = await conn.receive()
        _expect(
            got == expected,
            f"{what}: frame {i} differs (got {len(got)} bytes, expected {len(expected)})",
        )


async def _round_trip(client: Connection, server: Connection, frames: list[bytes]) -> None:
    """Send ``frames`` both ways, sending and receiving concurrently (big frames block)."""
    for sender, receiver, what in ((client, server, "client->server"),
                                   (server, client, "server->client")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_each, sender, frames)
            await _expect_frames(receiver, frames, what)


# --------------------------------------------------------------------------- checks


async def check_order(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """Frames arrive whole and in the order they were sent, both ways."""
    frames = [_pattern(0, i, (i * 37) % 3000) for i in range(300)]
    async with _connected(base_url, options_server, options_client) as (client, server):
        await _round_trip(client, server, frames)


async def check_send_many(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """``send_many`` delivers its frames whole, in order, interleaved with ``send``
    (an empty ``send_many`` sends nothing)."""
    batches = [[_pattern(0, 3 * i + j, (i * 53 + j) % 2000) for j in range(3)]
               for i in range(50)]
    expected = [f for batch in batches for f in batch]
    async with _connected(base_url, options_server, options_client) as (client, server):
        async def send_all() -> None:
            await client.send_many([])  # nothing: the stream stays in step
            for i, batch in enumerate(batches):
                if i % 2:
                    await client.send_many(batch)
                else:
                    for frame in batch:
                        await client.send(frame)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            await _expect_frames(server, expected, "client->server (send_many)")


async def check_big_frames(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """A 4 MiB frame (or the largest both limits allow) round-trips intact."""
    size = min(BIG_FRAME, options_server.max_frame_size, options_client.max_frame_size)
    big = _pattern(1, 1, size - _HEADER.size)
    async with _connected(base_url, options_server, options_client) as (client, server):
        await _round_trip(client, server, [big, b"after", big])


async def check_empty_frame(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """An empty frame is a frame (not a close), and the stream stays in step after it."""
    async with _connected(base_url, options_server, options_client) as (client, server):
        await _round_trip(client, server, [b"", b"x", b"", b"", b"yz"])


async def check_clean_close(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """Frames sent before ``aclose`` arrive, then the peer sees EndOfChannel (twice)."""
    frames = [b"one", b"two", _pattern(2, 3, 100_000)]
    async with _listening(base_url, options_server) as listener:
        for closing_side in ("client", "server"):
            client, server = await listener.pair(options_client)
            closer, peer = (client, server) if closing_side == "client" else (server, client)
            await _send_each(closer, frames)
            await closer.aclose()
            what = f"after the {closing_side} closed"
            await _expect_frames(peer, frames, what)
            await _expect_raises(trio.EndOfChannel, what, peer.receive)
            await _expect_raises(trio.EndOfChannel, f"{what}, receiving again", peer.receive)


async def check_concurrent_senders(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """Many tasks sending on one connection never interleave or tear frames."""
    tasks, per_task = 16, 40
    limit = min(options_server.max_frame_size, options_client.max_frame_size)

    def size(task: int, seq: int) -> int:
        return min((seq * 7919 + task * 104_729) % 70_000, limit - _HEADER.size)

    async def sender(conn: Connection, task: int) -> None:
        for seq in range(per_task):
            await conn.send(_pattern(task, seq, size(task, seq)))

    async with _connected(base_url, options_server, options_client) as (client, server):
        for src, dst, what in ((client, server, "client->server"),
                               (server, client, "server->client")):
            next_seq = [0] * tasks
            async with trio.open_nursery() as nursery:
                for task in range(tasks):
                    nursery.start_soon(sender, src, task)
                for _ in range(tasks * per_task):
                    task, seq = _check_pattern(await dst.receive())
                    _expect(
                        seq == next_seq[task],
                        f"{what}: sender {task}'s frame {seq} overtook frame {next_seq[task]}",
                    )
                    next_seq[task] += 1


async def check_vanished_peer(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """A peer that vanishes (no goodbye) ends ``receive`` and, soon, ``send``; no hang."""
    gone = (trio.EndOfChannel, trio.BrokenResourceError)
    async with _listening(base_url, options_server) as listener:
        for vanishing in ("client", "server"):
            client, server = await listener.pair(options_client)
            lost, peer = (client, server) if vanishing == "client" else (server, client)
            await _vanish(lost)
            await _expect_raises(gone, f"receiving after the {vanishing} vanished", peer.receive)

        # Sending to a vanished peer fails within a few attempts: the first send
        # may only reach the kernel, which then learns the peer is gone.
        client, server = await listener.pair(options_client)
        await _vanish(server)
        for _attempt in range(300):
            try:
                await client.send(b"anyone there?")
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.01)
        else:
            raise AssertionError("send to a vanished peer kept succeeding")

        # The listener is unaffected.
        client, server = await listener.pair(options_client)
        await _round_trip(client, server, [b"still serving"])


async def check_oversize_frame(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """Frames over ``max_frame_size``: ValueError to send, ProtocolError to receive."""
    small_server = _options(options_server, max_frame_size=SMALL_LIMIT)
    async with _listening(base_url, small_server) as listener:
        # Our own oversize frame is refused before anything is written.
        client, server = await listener.pair(_options(options_client, max_frame_size=SMALL_LIMIT))
        await _expect_raises(
            ValueError, "sending a frame over max_frame_size", client.send,
            b"\0" * (SMALL_LIMIT + 1),
        )
        await _round_trip(client, server, [b"unaffected", b"\1" * SMALL_LIMIT])

        # A peer with a larger limit sends one: the receiver refuses it.
        big_client = _options(options_client, max_frame_size=4 * SMALL_LIMIT)
        client, server = await listener.pair(big_client)
        async with trio.open_nursery() as nursery:

            async def send_oversize() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await client.send(b"\2" * (SMALL_LIMIT + 1))

            nursery.start_soon(send_oversize)
            await _expect_raises(ProtocolError, "receiving an oversize frame", server.receive)
        await server.aclose()

        # The listener still serves well-behaved peers.
        client, server = await listener.pair(big_client)
        await _round_trip(client, server, [b"next peer", b"\3" * SMALL_LIMIT])


async def check_limit_incoming(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """``limit_incoming`` lowers the receive limit (the handshake's), None restores it."""
    async with _listening(base_url, options_server) as listener:
        client, server = await listener.pair(options_client)
        server.limit_incoming(SMALL_LIMIT)
        server.limit_incoming(None)  # back to max_frame_size: a big frame passes
        await _round_trip(client, server, [b"\4" * (4 * SMALL_LIMIT)])
        server.limit_incoming(SMALL_LIMIT)
        async with trio.open_nursery() as nursery:

            async def send_big() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await client.send(b"\5" * (SMALL_LIMIT + 1))

            nursery.start_soon(send_big)
            await _expect_raises(ProtocolError, "receiving over a lowered limit", server.receive)
        await server.aclose()


async def check_aclose(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """``aclose`` is idempotent, closes even when cancelled, and forbids further use."""
    async with _listening(base_url, options_server) as listener:
        client, server = await listener.pair(options_client)
        for conn in (client, server):
            await conn.aclose()
            await conn.aclose()
            await _expect_raises(trio.ClosedResourceError, "send after aclose", conn.send, b"x")
            await _expect_raises(trio.ClosedResourceError, "receive after aclose", conn.receive)

        client, server = await listener.pair(options_client)
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.aclose()
        await _expect_raises(
            (trio.EndOfChannel, trio.BrokenResourceError),
            "receiving from a peer whose aclose was cancelled",
            server.receive,
        )
        await client.aclose()


async def check_cancelled_send(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """A send cancelled midway never tears a frame: the peer gets whole frames only.

    The client sends big frames to a peer that does not read until one blocks,
    and cancels it (partly written, on a socket). The transport may close the
    connection (then the peer's receive ends) or keep it in step (then a later
    frame arrives whole), never deliver part of a frame as a frame.
    """
    size = min(BIG_FRAME, options_server.max_frame_size, options_client.max_frame_size)
    big = _pattern(4, 0, size - _HEADER.size)
    async with _connected(base_url, options_server, options_client) as (client, server):
        with trio.move_on_after(0.2):
            while True:
                await client.send(big)
        sent_after: list[bool] = []

        async def send_after() -> None:
            try:
                await client.send(b"after")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                sent_after.append(False)
            else:
                sent_after.append(True)

        ended = (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError,
                 ProtocolError)
        connection_ended = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_after)  # a connection kept in step may be full
            while True:
                try:
                    got = await server.receive()
                except ended:
                    connection_ended = True
                    break
                if got == b"after":
                    break
                _expect(got == big, f"a cancelled send tore a frame: got {len(got)} bytes")
        if connection_ended:
            _expect(sent_after == [False],
                    "the connection ended, yet a send after the cancelled one succeeded")


async def check_bound_url(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """The listener reports the URL it really bound (port 0 becomes a real port)."""
    scheme = parse_address(base_url)[0]
    async with _listening(base_url, options_server) as listener:
        bound_scheme, _, port = parse_address(listener.url)
        _expect(bound_scheme == scheme, f"listener at {base_url} reported {listener.url}")
        _expect(port != 0, f"listener at {base_url} reported port 0: {listener.url}")
        client, server = await listener.pair(options_client)
        for conn in (client, server):
            _expect(
                isinstance(conn.remote_address, str)
                and conn.remote_address.startswith(f"{scheme}://"),
                f"remote_address {conn.remote_address!r} is not a {scheme}:// URL",
            )
        await _round_trip(client, server, [b"hello"])


async def check_connect_refused(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """Connecting where nothing listens raises droplet's ConnectionError naming the URL."""
    async with _listening(base_url, options_server) as listener:
        url = listener.url
    async with trio.open_nursery() as nursery:
        exc = await _expect_raises(
            ConnectionError, f"connecting to {url} after its listener stopped",
            get_transport(url).connect, url, options_client, nursery,
        )
    _expect(url in str(exc), f"ConnectionError does not name {url}: {exc}")
    if parse_address(url)[2] is not None:  # a network address: say how to get a node there
        _expect(
            "python -m droplet.node" in str(exc),
            f"ConnectionError does not say how to start a node: {exc}",
        )


async def check_handler_peer_gone(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """A handler ending in BrokenResourceError (its peer went away) keeps the listener up."""
    calls = 0

    async def handler(conn: Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise trio.BrokenResourceError("simulated: the peer went away mid-reply")
        await conn.send(await conn.receive())

    async with trio.open_nursery() as nursery:
        url = await nursery.start(get_transport(base_url).serve, base_url, handler, options_server)
        transport = get_transport(url)
        first = await transport.connect(url, options_client, nursery)
        await _expect_raises(
            (trio.EndOfChannel, trio.BrokenResourceError),
            "receiving from a handler that failed",
            first.receive,
        )
        await first.aclose()
        second = await transport.connect(url, options_client, nursery)
        try:
            await second.send(b"echo")
            got = await second.receive()
            _expect(got == b"echo", f"the listener's second connection echoed {got!r}")
        finally:
            await second.aclose()
        nursery.cancel_scope.cancel()


async def check_objects(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """Message objects cross only where the listener asked for them (``skip_encoding``).

    A connection carries objects exactly when its listener's options say so
    (only ``inproc://`` honours the option). Then a
    :class:`~droplet.protocol.parcel.Parcel` arrives as the object sent, in order
    with frames, and one whose values exceed ``max_frame_size`` is refused
    before anything is sent, as an oversize frame is. Both ends of a
    connection agree.
    """
    from ..protocol.messages import KvsPut, Ok
    from ..protocol.parcel import pack

    wants = options_server.skip_encoding and parse_address(base_url)[0] == "inproc"
    async with _listening(base_url, _options(options_server, max_frame_size=SMALL_LIMIT)
                          ) as listener:
        client, server = await listener.pair(options_client)
        _expect(client.carries_objects == wants and server.carries_objects == wants,
                f"carries_objects is {client.carries_objects}/{server.carries_objects} "
                f"(client/server) with skip_encoding={options_server.skip_encoding}")
        if not wants:
            await _round_trip(client, server, [b"frame"])
            return
        first = pack(KvsPut("k", b"v" * 10), 7)
        reply = pack(Ok(), 7, reply=True)
        await client.send(first)  # type: ignore[arg-type]
        await client.send(b"a frame between objects")
        got: object = await server.receive()
        _expect(got is first, f"sent a Parcel, received {got!r}")
        _expect(await server.receive() == b"a frame between objects",
                "a frame after a Parcel was lost or reordered")
        await server.send(reply)  # type: ignore[arg-type]
        _expect(id(await client.receive()) == id(reply), "the reply Parcel did not arrive")
        too_big = pack(KvsPut("k", b"x" * (SMALL_LIMIT + 1)))
        await _expect_raises(ValueError, "sending a Parcel over max_frame_size",
                             server.send, too_big)
        await _round_trip(client, server, [b"still usable"])


CHECKS: dict[str, Check] = {
    "order": check_order,
    "send_many": check_send_many,
    "big_frames": check_big_frames,
    "empty_frame": check_empty_frame,
    "clean_close": check_clean_close,
    "concurrent_senders": check_concurrent_senders,
    "vanished_peer": check_vanished_peer,
    "oversize_frame": check_oversize_frame,
    "limit_incoming": check_limit_incoming,
    "aclose": check_aclose,
    "cancelled_send": check_cancelled_send,
    "bound_url": check_bound_url,
    "connect_refused": check_connect_refused,
    "handler_peer_gone": check_handler_peer_gone,
    "objects": check_objects,
}


async def check_transport(
    base_url: str, options_server: TransportOptions, options_client: TransportOptions
) -> None:
    """Run every check in :data:`CHECKS` against the transport of ``base_url``."""
    for check in CHECKS.values():
        await check(base_url, options_server, options_client)
