"""The transport contract: message-oriented connections addressed by URL.

Every transport (``inproc://``, ``tcp://``, ``ws://``, their TLS variants)
implements these two small ABCs; services and clients see nothing else, so a
transport can be swapped, mocked or simulated without touching them.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence

import trio

from ..protocol.framing import DEFAULT_MAX_FRAME_SIZE

__all__ = ["Connection", "ConnectionHandler", "Transport", "TransportOptions"]


class Connection(abc.ABC):
    """A bidirectional, ordered, reliable stream of whole frames (``bytes``).

    Contract:

    - ``send`` may be called from many tasks at once; frames never interleave.
      A ``send`` cancelled midway leaves the connection closed, never half-written.
    - ``receive`` is called by one task at a time (the connection's reader). It
      returns one whole frame, or raises ``trio.EndOfChannel`` on a clean close
      by the peer, ``trio.BrokenResourceError`` when the connection broke, or
      ``droplet.ProtocolError`` when the peer sent bytes that are not frames.
    - ``aclose`` is idempotent and always leaves the connection closed.
    """

    #: URL of the other end, for logs and error messages.
    remote_address: str = ""
    #: True when the connection may also carry message objects
    #: (:class:`~droplet.protocol.parcel.Parcel`) instead of encoded frames: an
    #: ``inproc://`` connection with ``skip_encoding`` (see TransportOptions).
    carries_objects: bool = False

    @abc.abstractmethod
    async def send(self, frame: bytes) -> None: ...

    @abc.abstractmethod
    def limit_incoming(self, max_frame_size: int | None) -> None:
        """Change the largest frame ``receive`` accepts from now on (None: back to
        the connection's ``max_frame_size``).

        The handshake runs under a small limit, so a peer that has not
        authenticated cannot make us buffer a big frame.
        """

    async def send_many(self, frames: Sequence[bytes]) -> None:
        """Send several frames in order, as one write where the transport can.

        Socket transports override this: one system call instead of one per
        frame matters on every hop (a call sends its request and the read of
        its result together).
        """
        for frame in frames:
            await self.send(frame)

    @abc.abstractmethod
    async def receive(self) -> bytes: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


ConnectionHandler = Callable[[Connection], Awaitable[None]]


class TransportOptions:
    """Limits and TLS settings shared by all transports.

    Attributes:
        max_frame_size: largest frame accepted or sent, checked before allocation.
        read_timeout: seconds a peer may take to finish a frame it started.
        ssl_context: server-side context for ``tls://`` / ``wss://`` listeners,
            client-side context for connecting to them.
        skip_encoding: ``inproc://`` listeners only: their connections carry
            messages as Python objects (:mod:`droplet.protocol.parcel`) instead
            of encoded frames. Values stay pickled and isolated; only the
            envelope encoding is skipped. Other transports ignore it.
    """

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        read_timeout: float = 30.0,
        ssl_context: object | None = None,
        skip_encoding: bool = False,
    ) -> None:
        self.max_frame_size = max_frame_size
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context
        self.skip_encoding = skip_encoding


class Transport(abc.ABC):
    """One URL scheme's way to listen and connect.

    ``serve`` runs each connection's background tasks in a nursery of its own,
    per connection; ``connect`` runs them in the caller's nursery, so no task
    outlives a nursery the caller can see (STYLE.md 9).
    """

    #: URL schemes this transport serves, e.g. ``("tcp",)``.
    schemes: tuple[str, ...] = ()

    @abc.abstractmethod
    async def serve(
        self,
        url: str,
        handler: ConnectionHandler,
        options: TransportOptions,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections at ``url`` forever, running ``handler(conn)`` for each.

        Reports the bound URL through ``task_status.started`` (so
        ``tcp://127.0.0.1:0`` yields the real port). The handler's connection is
        closed when the handler returns. Cancel to stop.
        """

    @abc.abstractmethod
    async def connect(
        self, url: str, options: TransportOptions, nursery: trio.Nursery
    ) -> Connection:
        """Open a connection to a listener at ``url``.

        Tasks the connection needs in the background (the WebSocket
        transport's reader) run in ``nursery``, which must outlive the
        connection; ``aclose`` ends them. Transports that need none ignore it.
        :func:`~droplet.transports.open_connection` supplies a nursery of its
        own for a connection used within one block.
        """
