"""Connecting to and serving Droplet peers: the transport, the handshake, a reader.

:func:`connect_peer` dials, authenticates (``protocol/handshake.py``) and starts
a :class:`~droplet.rpc.Peer`'s reader; :func:`serve_peers` listens, runs the
server side of the handshake on each connection (small frames only until it
succeeds) and serves it with a Peer; :func:`one_request` is a whole connection
for one request; :class:`PeerPool` keeps one connection per address.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from .errors import ConnectionError, ProtocolError
from .protocol import handshake
from .protocol.messages import AuthChallenge, AuthResponse, AuthResult, ErrorReply
from .protocol.messages import decode as decode_message
from .protocol.messages import encode as encode_message
from .rpc import Handler, Limits, NowHandler, Peer, ReaderHandler, error_from_reply
from .transports.base import Connection, TransportOptions
from .transports.registry import get_transport, open_connection

__all__ = ["HANDSHAKE_MAX_FRAME", "HANDSHAKE_TIMEOUT", "PeerPool", "connect_peer",
           "one_request", "serve_peers"]

log = logging.getLogger("droplet.rpc")

HANDSHAKE_TIMEOUT = 10.0
#: The largest frame a peer may send before it has authenticated (an
#: AuthResponse is about 90 bytes).
HANDSHAKE_MAX_FRAME = 4096


# --------------------------------------------------------------------------- connecting


async def connect_peer(
    url: str,
    nursery: trio.Nursery,
    *,
    token: str | None = None,
    handler: Handler | None = None,
    options: TransportOptions | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> Peer:
    """Connect, authenticate and start the reader in ``nursery``."""
    options = options or TransportOptions()
    transport = get_transport(url)
    with trio.move_on_after(timeout) as scope:
        conn = await transport.connect(url, options, nursery)
        try:
            await _client_handshake(conn, url, token)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await conn.aclose()
            if isinstance(exc, ProtocolError):
                raise ConnectionError(
                    f"{url} does not speak Droplet's protocol ({exc}); is it another "
                    "service, or a node of another scheme (ws://, tls://)?") from exc
            raise
    if scope.cancelled_caught:
        raise ConnectionError(
            f"no answer from a Droplet node at {url} within {timeout:g} s; "
            "is a node running there? start one with `python -m droplet.node`"
        )
    peer = Peer(conn, handler, name=url)
    peer.remote = url
    peer.send_limit = options.max_frame_size
    nursery.start_soon(peer.run)
    return peer


async def one_request(
    url: str,
    msg: Any,
    *,
    token: str | None = None,
    options: TransportOptions | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> Any:
    """Connect, send one request, return its reply, close. No task outlives the call."""
    options = options or TransportOptions()
    with trio.move_on_after(timeout):
        async with open_connection(url, options) as conn:
            try:
                await _client_handshake(conn, url, token)
                await conn.send(encode_message(msg, 1))
                while True:
                    reply, request_id, is_reply = decode_message(await conn.receive())
                    if is_reply and request_id == 1:
                        break
            except (trio.EndOfChannel, trio.BrokenResourceError) as exc:
                raise ConnectionError(f"{url} closed the connection") from exc
        if type(reply) is ErrorReply:
            raise error_from_reply(reply, url)
        return reply
    raise ConnectionError(f"no answer from a Droplet node at {url} within {timeout:g} s")


async def _client_handshake(conn: Connection, url: str, token: str | None) -> None:
    hs = handshake.ClientHandshake(url, token)
    try:
        challenge, _, _ = decode_message(await conn.receive())
        await conn.send(encode_message(hs.on_challenge(challenge)))
        result, _, _ = decode_message(await conn.receive())
    except (trio.EndOfChannel, trio.BrokenResourceError) as exc:
        raise ConnectionError(f"{url} closed the connection during the handshake") from exc
    hs.on_result(result)


async def _server_handshake(conn: Connection, token: str | None) -> bool:
    """Run the server side; until it succeeds, the peer may send only small frames."""
    conn.limit_incoming(HANDSHAKE_MAX_FRAME)
    try:
        return await _server_handshake_steps(conn, token)
    finally:
        conn.limit_incoming(None)


async def _server_handshake_steps(conn: Connection, token: str | None) -> bool:
    nonce = handshake.new_nonce()
    await conn.send(encode_message(AuthChallenge(handshake.VERSION, nonce, bool(token))))
    response, _, _ = decode_message(await conn.receive())
    if type(response) is not AuthResponse:
        raise ProtocolError(f"expected AuthResponse, got {type(response).__name__}")
    if not token:
        await conn.send(encode_message(AuthResult(True, b"", "")))
        return True
    if not response.mac:
        reason = "this node requires the cluster token (pass token= or set DROPLET_TOKEN)"
    elif not handshake.verify(handshake.client_mac(token, nonce, response.nonce), response.mac):
        reason = "wrong cluster token"
    else:
        mac = handshake.server_mac(token, nonce, response.nonce)
        await conn.send(encode_message(AuthResult(True, mac, "")))
        return True
    log.warning("refused connection from %s: %s", conn.remote_address, reason)
    await conn.send(encode_message(AuthResult(False, b"", reason)))
    return False


async def serve_peers(
    url: str,
    handler: Handler,
    *,
    token: str | None = None,
    options: TransportOptions | None = None,
    limits: Limits | None = None,
    on_connect: Callable[[Peer], None] | None = None,
    now: NowHandler | None = None,
    thread_now: NowHandler | None = None,
    in_reader: Callable[[], ReaderHandler | None] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen at ``url``; authenticate each connection, then serve it with ``handler``
    (and ``now``, see :data:`NowHandler`, where the transport hands messages over
    in the sender's task). ``in_reader()``, asked once per connection once it is
    authenticated: the :data:`~droplet.rpc.ReaderHandler` that serves messages in
    the connection's own reader thread, where the transport has one (plain TCP and ws),
    or None (the read loop serves everything)."""
    options = options or TransportOptions()

    async def on_connection(conn: Connection) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                if not await _server_handshake(conn, token):
                    return
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
            # Hung up before the handshake: a port probe or health check (connect,
            # close), or a client that gave up. Nothing anyone needs to act on.
            log.debug("%s closed the connection before the handshake", conn.remote_address)
            return
        except (trio.TooSlowError, ProtocolError) as exc:
            log.warning("dropped connection from %s during handshake: %s",
                        conn.remote_address, exc or type(exc).__name__)
            return
        peer = Peer(conn, handler, limits=limits, now=now, thread_now=thread_now,
                    in_reader=in_reader() if in_reader is not None else None)
        if on_connect is not None:
            on_connect(peer)
        try:
            await peer.run()
        except Exception:
            # One connection's failure must never take down the listener (and
            # with it the node): log it and drop only this connection.
            log.exception("closed connection from %s after an unexpected error",
                          conn.remote_address)

    await get_transport(url).serve(url, on_connection, options, task_status=task_status)


class PeerPool:
    """Outgoing connections by URL, opened on first use and reused."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        token: str | None = None,
        options: TransportOptions | None = None,
        handler: Handler | None = None,
    ) -> None:
        self._nursery = nursery
        self._token = token
        self._options = options
        self._handler = handler
        self._peers: dict[str, Peer] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def get(self, url: str) -> Peer:
        peer = self._peers.get(url)
        if peer is not None and not peer.closed:
            return peer
        # One lock per URL being dialled, dropped afterwards: a peer naming
        # many addresses (a hostile trigger's placement) leaves nothing behind.
        lock = self._locks.setdefault(url, trio.Lock())
        try:
            async with lock:
                peer = self._peers.get(url)
                if peer is None or peer.closed:
                    peer = await connect_peer(url, self._nursery, token=self._token,
                                              options=self._options, handler=self._handler)
                    self.add(url, peer)
                return peer
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(url, None)

    def __len__(self) -> int:
        return len(self._peers)

    def peek(self, url: str) -> Peer | None:
        """The open connection to ``url``, if there is one (never dials)."""
        peer = self._peers.get(url)
        return peer if peer is not None and not peer.closed else None

    def add(self, url: str, peer: Peer) -> None:
        self._peers[url] = peer

        def forget(closed: Peer) -> None:
            if self._peers.get(url) is closed:
                del self._peers[url]

        peer.on_close.append(forget)

    async def aclose(self) -> None:
        for peer in list(self._peers.values()):
            await peer.aclose()
        self._peers.clear()

