"""The blocking client's byte stream: a socket, and what turns it into Droplet frames.

:class:`~droplet.client._blocking_peer.BlockingPeer` (the one leader/follower
implementation) reads and writes a socket through a *wire*: an object with
``FrameDecoder``'s reading interface (``feed``, ``next_frame``,
``receive_buffer``, ``received``), ``frame_parts(payload)`` for writing, and
``has_output`` / ``take_output()`` / ``goodbye()`` for bytes the wire itself
owes the peer.

- ``tcp://`` and ``tls://``: :class:`PrefixWire`, the 4-byte length prefix;
- ``ws://`` and ``wss://``: :class:`~droplet.client._ws_codec.WsClientCodec`,
  one binary WebSocket message per frame, after an HTTP upgrade.

:func:`open_wire` dials, runs the TLS handshake (``tls://``, ``wss://``) and the
WebSocket upgrade, all within the caller's timeout, and returns the socket in
non-blocking mode (every later wait is a ``select()`` with a deadline).
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from typing import Protocol

from ..errors import ConnectionError
from ..protocol.framing import Buffer, FrameDecoder, Payload, frame_parts
from ..transports.registry import parse_address
from ._ws_codec import Upgrade, WsClientCodec

__all__ = ["SCHEMES", "PrefixWire", "Wire", "open_wire"]

#: The schemes the blocking client speaks.
SCHEMES = ("tcp", "tls", "ws", "wss")


class Wire(Protocol):
    max_frame_size: int

    def feed(self, data: Buffer) -> None: ...
    def next_frame(self) -> bytes | memoryview | None: ...
    def receive_buffer(self) -> memoryview | None: ...
    def received(self, n: int) -> None: ...
    def frame_parts(self, payload: Payload | memoryview) -> list[Buffer]: ...
    def take_output(self) -> bytes: ...
    def goodbye(self) -> bytes: ...
    @property
    def has_output(self) -> bool: ...


class PrefixWire(FrameDecoder):
    """``tcp://`` framing: a 4-byte length, then the payload."""

    has_output = False

    def frame_parts(self, payload: Payload | memoryview) -> list[Buffer]:
        return frame_parts(payload, self.max_frame_size)

    def take_output(self) -> bytes:
        return b""

    def goodbye(self) -> bytes:
        return b""


def open_wire(url: str, *, timeout: float, ssl_context: ssl.SSLContext | None,
              max_frame_size: int) -> tuple[socket.socket, Wire]:
    """A connected non-blocking socket to ``url`` and its wire; ConnectionError naming
    ``url`` (and the fix) when it cannot be had within ``timeout`` seconds."""
    scheme, host, port = parse_address(url)
    if scheme not in SCHEMES or port is None:
        raise ValueError(f"the blocking client speaks {', '.join(s + '://' for s in SCHEMES)}"
                         f" not {url!r}")
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ConnectionError(
            f"no Droplet node at {url} ({exc.strerror or exc}); "
            "start one with `python -m droplet.node`") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme in ("tls", "wss"):
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock = (ssl_context or ssl.create_default_context()).wrap_socket(
                    sock, server_hostname=host)
            except (OSError, ssl.SSLError) as exc:
                raise ConnectionError(f"TLS handshake with {url} failed: {exc}") from exc
        sock.setblocking(False)
        if scheme in ("tcp", "tls"):
            return sock, PrefixWire(max_frame_size)
        codec = WsClientCodec(url, max_frame_size)
        shown = f"[{host}]" if ":" in host else host
        codec.feed(_upgrade(sock, Upgrade(url, f"{shown}:{port}"), deadline, timeout))
        return sock, codec
    except BaseException:
        sock.close()
        raise


def _upgrade(sock: socket.socket, upgrade: Upgrade, deadline: float, timeout: float) -> bytes:
    """Run the HTTP upgrade on the non-blocking ``sock``; the bytes that followed it."""
    url = upgrade.url

    def wait(read: bool) -> None:
        if isinstance(sock, ssl.SSLSocket) and read and sock.pending():
            return
        remaining = deadline - time.monotonic()
        ready = select.select([sock] if read else [], [] if read else [sock], [],
                              max(0.0, remaining))
        if not (ready[0] or ready[1]):
            raise ConnectionError(
                f"{url} did not finish the WebSocket handshake within {timeout:g} s; "
                "is it a Droplet ws:// listener?")

    try:
        view = memoryview(upgrade.request)
        while view:
            try:
                view = view[sock.send(view):]
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                wait(False)
        data = b""
        while (rest := upgrade.receive(data)) is None:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                data = b""
                wait(True)
                continue
            if not data:
                raise ConnectionError(
                    f"{url} hung up during the WebSocket upgrade; "
                    "is it a Droplet ws:// listener?")
        return rest
    except OSError as exc:
        raise ConnectionError(f"connection to {url} broke during the WebSocket upgrade: "
                              f"{exc}") from exc
