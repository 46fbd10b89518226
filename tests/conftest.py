"""Shared fixtures: a private data root for nodes; a throwaway CA for tls:// and wss://."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest
import trustme


@pytest.fixture(scope="session", autouse=True)
def _private_data_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Nodes started with the default data directory keep it here, never in ~/.local/share."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
        yield


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
