"""Shared fixtures: a private data root for nodes; a throwaway CA for tls:// and wss://;
a throwaway redis-server for the Redis backend (``storage`` runs a cluster on each backend)."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterator

import pytest
import trustme
from hypothesis import HealthCheck, settings

from droplet.testing.redis_servers import RedisServer, redis_available, start_redis

# No wall-clock limits on Hypothesis examples: on a busy 2-core machine a slow
# example is load, not a bug (the same rule as every other test: no timing asserts).
settings.register_profile("droplet", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("droplet")


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


# --------------------------------------------------------------------------- Redis

@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One throwaway redis-server for the session (tests isolate by key prefix)."""
    if not redis_available():
        pytest.skip("redis-server is not installed (apt-get install redis-server); "
                    "CI installs it, so these tests run there")
    with start_redis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, under a key prefix of this test's own."""
    return f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:10]}:"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.slow)])
def storage(request: pytest.FixtureRequest) -> str | None:
    """Run a cluster fixture on each storage backend: None (memory) or a Redis URL."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("redis_url")
    return url
