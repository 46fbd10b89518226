"""What the socket transports (tcp/tls, ws/wss) share: listeners, dialing, peer names."""

from __future__ import annotations

import errno
import ssl
from typing import Any

import trio

from ..errors import ConnectionError
from .base import TransportOptions
from .registry import parse_address

__all__ = ["dial", "open_listeners", "peer_url"]


def _show(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def peer_url(scheme: str, stream: trio.abc.Stream) -> str:
    """``scheme://host:port`` of the far end of a (possibly TLS-wrapped) socket stream."""
    sock_stream: Any = stream
    while not isinstance(sock_stream, trio.SocketStream):
        sock_stream = getattr(sock_stream, "transport_stream", None)
        if sock_stream is None:
            return f"{scheme}://?"
    try:
        host, port = sock_stream.socket.getpeername()[:2]
    except OSError:
        return f"{scheme}://?"
    return f"{scheme}://{_show(host)}:{port}"


async def open_listeners(
    url: str, options: TransportOptions, *, tls: bool, https_compatible: bool = False
) -> tuple[list[trio.abc.Listener[Any]], str]:
    """Bind ``url`` (TLS-wrapped when ``tls``); return the listeners and the bound URL."""
    scheme, host, port = parse_address(url)
    assert port is not None
    ctx = options.ssl_context
    if tls and not isinstance(ctx, ssl.SSLContext):
        raise ValueError(f"{url}: {scheme}:// needs options.ssl_context: an ssl.SSLContext "
                         "with the certificate and key loaded (tls_cert/tls_key)")
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, (
                f"{url} is already in use: another program (perhaps another Droplet "
                "node: `droplet stop-local` stops one started in the background) "
                "listens there; stop it, or pick another address with --listen "
                f"{scheme}://{_show(host)}:PORT (port 0 picks a free one)")) from exc
        raise
    bound_host, bound_port = listeners[0].socket.getsockname()[:2]
    bound = f"{scheme}://{_show(bound_host)}:{bound_port}"
    if tls:
        assert isinstance(ctx, ssl.SSLContext)
        return [trio.SSLListener(lst, ctx, https_compatible=https_compatible)
                for lst in listeners], bound
    return list(listeners), bound


async def dial(url: str) -> tuple[trio.SocketStream, str, int]:
    """Open a TCP connection to ``url``'s host and port (``ConnectionError`` naming the fix)."""
    _, host, port = parse_address(url)
    assert port is not None
    try:
        return await trio.open_tcp_stream(host, port), host, port
    except OSError as exc:
        raise ConnectionError(
            f"no Droplet node at {url} ({exc.strerror or exc}); "
            "start one with `python -m droplet.node`"
        ) from exc
