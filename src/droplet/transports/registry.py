"""Address parsing and the URL-scheme registry.

Transports register under their schemes; the WebSocket transport is imported
only when a ``ws://`` or ``wss://`` address is first used.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator, Callable

import trio

from .base import Connection, Transport, TransportOptions

__all__ = [
    "DEFAULT_PORT",
    "get_transport",
    "known_schemes",
    "open_connection",
    "parse_address",
    "register_transport",
]

DEFAULT_PORT = 5000

# scheme -> "module:attribute" for lazy import, or a ready Transport.
_REGISTRY: dict[str, str | Transport] = {
    "inproc": "droplet.transports.inproc:InprocTransport",
    "tcp": "droplet.transports.tcp:TcpTransport",
    "tls": "droplet.transports.tcp:TcpTransport",
    "ws": "droplet.transports.websocket:WebSocketTransport",
    "wss": "droplet.transports.websocket:WebSocketTransport",
}
_INSTANCES: dict[str, Transport] = {}


def known_schemes() -> list[str]:
    return sorted(_REGISTRY)


def register_transport(scheme: str, transport: Transport | str) -> None:
    """Register a transport (or a lazy ``"module:Class"`` reference) for a scheme."""
    _REGISTRY[scheme] = transport
    _INSTANCES.pop(scheme, None)


def parse_address(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, str, int | None]:
    """Split an address into ``(scheme, host_or_name, port)``.

    A bare host means TCP on the default port:

    >>> parse_address("127.0.0.1")
    ('tcp', '127.0.0.1', 5000)
    >>> parse_address("tcp://10.0.0.5:7000")
    ('tcp', '10.0.0.5', 7000)
    >>> parse_address("127.0.0.1:6000")
    ('tcp', '127.0.0.1', 6000)
    >>> parse_address("inproc://kvs-1")
    ('inproc', 'kvs-1', None)
    >>> parse_address("ws://[::1]:80")
    ('ws', '::1', 80)
    >>> parse_address("udp://x:1")
    Traceback (most recent call last):
      ...
    ValueError: unknown address scheme 'udp' in 'udp://x:1'; known schemes: inproc, tcp, tls, ws, wss
    """  # noqa: E501 (a doctest's expected output cannot be wrapped)
    if not isinstance(address, str) or not address:
        raise ValueError(f"address must be a non-empty string, not {address!r}")
    if "://" in address:
        scheme, rest = address.split("://", 1)
        scheme = scheme.lower()
    else:
        scheme, rest = "tcp", address
    if scheme not in _REGISTRY:
        raise ValueError(
            f"unknown address scheme {scheme!r} in {address!r}; "
            f"known schemes: {', '.join(known_schemes())}"
        )
    rest = rest.rstrip("/")
    if scheme == "inproc":
        return scheme, rest, None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    else:
        host, port_text = rest, ""
    if not host:
        raise ValueError(f"address {address!r} has no host")
    if not port_text:
        return scheme, host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port {port_text!r} in address {address!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range in address {address!r}")
    return scheme, host, port


def normalize_address(address: str) -> str:
    """The canonical URL form of an address: ``'h'`` -> ``'tcp://h:5000'``.

    >>> normalize_address("127.0.0.1")
    'tcp://127.0.0.1:5000'
    >>> normalize_address("ws://[::1]:1")
    'ws://[::1]:1'
    """
    scheme, host, port = parse_address(address)
    if port is None:
        return f"{scheme}://{host}"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def get_transport(address: str) -> Transport:
    """The transport for an address's scheme (importing it on first use)."""
    scheme = parse_address(address)[0]
    inst = _INSTANCES.get(scheme)
    if inst is not None:
        return inst
    entry = _REGISTRY[scheme]
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        factory: Callable[[], Transport] = getattr(importlib.import_module(module_name), attr)
        inst = factory()
    else:
        inst = entry
    _INSTANCES[scheme] = inst
    return inst


@contextlib.asynccontextmanager
async def open_connection(
    url: str, options: TransportOptions | None = None
) -> AsyncIterator[Connection]:
    """Connect to ``url`` for the length of a block; closed when the block ends.

    The connection's background tasks (if its transport has any) run in a
    nursery of this context manager's own. An exception from the block (or
    from connecting) comes out as itself, never wrapped in an ExceptionGroup:
    it is caught inside the nursery and raised again after it closed.
    """
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            conn = await get_transport(url).connect(url, options or TransportOptions(), nursery)
        except BaseException as exc:
            failure = exc
        else:
            try:
                yield conn
            except BaseException as exc:
                failure = exc
            finally:
                await conn.aclose()
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
