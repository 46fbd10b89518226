"""A WebSocket client's wire, sans-IO: the upgrade, then masked frames out, server frames in.

The blocking client (:mod:`droplet.client._blocking_peer`) speaks ``ws://`` and
``wss://`` through this, over its own blocking socket. The HTTP upgrade runs
through h11 (:class:`Upgrade`); the frames are
:class:`~droplet.protocol.wsframes.WsCodec`'s, in the client role (it masks
every frame it sends and accepts only unmasked frames), which the async
transport uses too. A close frame from the server is a ``ConnectionError``
naming its code and reason. This module does no I/O; it is tested synchronously.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import h11

from ..errors import ConnectionError
from ..protocol.framing import DEFAULT_MAX_FRAME_SIZE, BufferPool
from ..protocol.wsframes import WsCodec, close_frame, encode_frame, mask

__all__ = ["Upgrade", "WsClientCodec", "close_frame", "encode_frame", "mask"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Bytes of HTTP response we accept before giving up on an upgrade.
MAX_UPGRADE_RESPONSE = 16 * 1024


class Upgrade:
    """The client side of the HTTP upgrade, over h11.

    ``request`` is what to send; feed the reply to :meth:`receive` until it
    returns the bytes that came after the reply (frames already sent, maybe
    none); ``None`` means more is needed. A refusal or a reply that is not a
    WebSocket upgrade raises ``ConnectionError`` naming ``url``.
    """

    def __init__(self, url: str, host_header: str, path: str = "/") -> None:
        self.url = url
        self._key = base64.b64encode(os.urandom(16))
        headers: list[tuple[bytes, bytes]] = [
            (b"Host", host_header.encode()), (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Key", self._key),
            (b"Sec-WebSocket-Version", b"13")]
        self._expect = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_UPGRADE_RESPONSE)
        self.request = self._h11.send(
            h11.Request(method="GET", target=path, headers=headers)) or b""

    def _not_ws(self, why: str) -> ConnectionError:
        return ConnectionError(f"{self.url} {why}; is it a Droplet ws:// listener?")

    def receive(self, data: bytes) -> bytes | None:
        conn = self._h11
        if data:
            conn.receive_data(data)
        try:
            event: Any = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise self._not_ws(f"answered the WebSocket upgrade with something else ({exc})"
                               ) from None
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            headers = {name.lower(): value for name, value in event.headers}
            if headers.get(b"sec-websocket-accept") != self._expect:
                raise self._not_ws("accepted the upgrade with a wrong Sec-WebSocket-Accept")
            if headers.get(b"sec-websocket-extensions"):
                raise self._not_ws("chose a WebSocket extension this client did not offer")
            return conn.trailing_data[0]
        if isinstance(event, h11.Response | h11.InformationalResponse):
            raise self._not_ws(f"refused the WebSocket upgrade (HTTP {event.status_code})")
        raise self._not_ws("hung up during the WebSocket upgrade")


class WsClientCodec(WsCodec):
    """:class:`~droplet.protocol.wsframes.WsCodec` in the client role, as the
    blocking client's wire (see :mod:`droplet.client._blocking_wire`)."""

    def __init__(self, remote: str, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 pool: BufferPool | None = None) -> None:
        super().__init__(remote, max_frame_size, pool, client=True)
