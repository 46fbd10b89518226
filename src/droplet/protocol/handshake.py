"""The connection handshake: mutual challenge-response on a cluster token.

Pure functions, no I/O. The token never crosses the wire: each side proves it
holds the token by MACing the other side's fresh random nonce. Distinct labels
for the two directions stop a peer from reflecting our own proof back at us.

    server -> client   AuthChallenge(version, server_nonce, required)
    client -> server   AuthResponse(client_mac, client_nonce)
    server -> client   AuthResult(ok, server_mac, message)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from ..errors import AuthenticationError, ProtocolError
from .messages import AuthChallenge, AuthResponse, AuthResult

__all__ = [
    "NONCE_SIZE",
    "VERSION",
    "ClientHandshake",
    "client_mac",
    "new_nonce",
    "server_mac",
    "verify",
]

VERSION = 1
NONCE_SIZE = 32


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def _mac(token: str, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(token.encode("utf-8"), label + b"".join(parts), hashlib.sha256).digest()


def client_mac(token: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """The client's proof: HMAC over both nonces, labelled as client-to-server."""
    return _mac(token, b"droplet/v1/client\x00", server_nonce, client_nonce)


def server_mac(token: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """The server's proof, labelled server-to-client so it cannot be replayed as the client's."""
    return _mac(token, b"droplet/v1/server\x00", client_nonce, server_nonce)


def verify(expected: bytes, got: bytes) -> bool:
    """Constant-time comparison of two MACs."""
    return hmac.compare_digest(expected, got)


class ClientHandshake:
    """The client's side of the handshake, fed decoded messages (no I/O).

    >>> hs = ClientHandshake("tcp://n:1", token=None)
    >>> reply = hs.on_challenge(AuthChallenge(VERSION, new_nonce(), False))
    >>> hs.on_result(AuthResult(True, b"", ""))
    """

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.token = token
        self._challenge: AuthChallenge | None = None
        self._nonce = new_nonce()

    def on_challenge(self, msg: Any) -> AuthResponse:
        """The server's first message in; our proof (and our own challenge) out."""
        if type(msg) is not AuthChallenge:
            raise ProtocolError(f"{self.url} did not start with a Droplet handshake")
        if msg.version != VERSION:
            raise ProtocolError(f"{self.url} speaks handshake version {msg.version}")
        self._challenge = msg
        mac = client_mac(self.token, msg.nonce, self._nonce) if self.token else b""
        return AuthResponse(mac, self._nonce)

    def on_result(self, msg: Any) -> None:
        """The server's verdict; raises unless both sides are satisfied."""
        challenge = self._challenge
        assert challenge is not None, "on_challenge first"
        if type(msg) is not AuthResult:
            raise ProtocolError(f"{self.url} sent {type(msg).__name__} instead of AuthResult")
        if not msg.ok:
            raise AuthenticationError(f"{self.url} refused the connection: {msg.message}")
        if self.token and not challenge.required:
            # It cannot prove it knows the token, so it may be an impostor whose
            # "results" we would unpickle: refuse rather than downgrade.
            raise AuthenticationError(
                f"{self.url} does not ask for a cluster token, so it cannot prove it is your "
                "cluster; connect without a token (token='') if it is an open node you trust")
        if self.token:
            expected = server_mac(self.token, challenge.nonce, self._nonce)
            if not verify(expected, msg.mac):
                raise AuthenticationError(
                    f"{self.url} could not prove it holds the cluster token; "
                    "refusing to talk to it")
