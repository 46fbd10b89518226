"""Shared fixtures: a throwaway certificate authority for tls:// and wss:// tests."""

from __future__ import annotations

import ssl

import pytest
import trustme


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_server_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """A server context whose certificate is valid for 127.0.0.1 and localhost."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def tls_client_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts only the test CA."""
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    return ctx
