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

__all__ = ["NONCE_SIZE", "VERSION", "client_mac", "new_nonce", "server_mac", "verify"]

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
