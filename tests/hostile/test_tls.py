"""TLS (``tls://`` and ``wss://``): clients that trust the node's CA get in, others do not.

Embedded clusters (``open_local_cluster(listen="tls://127.0.0.1:0", tls_cert=...,
tls_key=...)``) for the rules, then one real node process started with
``--tls-cert``/``--tls-key`` and the synchronous client's ``tls_ca=``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trustme

import droplet
from droplet import DropletConnection
from droplet.config import Config
from droplet.testing.nodes import start_node
from droplet.transports import TransportOptions

from .conftest import TIMEOUT, TlsFiles, assert_serves

SECURE = ["tls", "wss"]


def trusting(tls_files: TlsFiles) -> TransportOptions:
    """Client options trusting the test CA (``open_client`` has no ``tls_ca=`` yet)."""
    return TransportOptions(ssl_context=ssl.create_default_context(cafile=tls_files.ca))


@asynccontextmanager
async def secure_cluster(scheme: str, tls_files: TlsFiles, **settings: Any
                         ) -> AsyncIterator[str]:
    async with droplet.open_local_cluster(1, listen=f"{scheme}://127.0.0.1:0",
                                          tls_cert=tls_files.cert, tls_key=tls_files.key,
                                          **settings) as cluster:
        assert cluster.address.startswith(f"{scheme}://127.0.0.1:")
        yield cluster.address


@pytest.mark.parametrize("scheme", SECURE)
async def test_client_trusting_the_ca_works(scheme: str, tls_files: TlsFiles) -> None:
    with trio.fail_after(TIMEOUT):
        async with secure_cluster(scheme, tls_files) as url:
            await assert_serves(url, options=trusting(tls_files))
            # The AsyncDropletClient.connect spelling, as DropletConnection uses it.
            async with trio.open_nursery() as nursery:
                cloud = await droplet.AsyncDropletClient.connect(
                    url, nursery, tls_ca=tls_files.ca, timeout=TIMEOUT)
                await cloud.put_object("k", {"secret": 1})
                assert await cloud.get_object("k") == {"secret": 1}
                await cloud.aclose()


@pytest.mark.parametrize("scheme", SECURE)
async def test_client_without_the_ca_is_refused(scheme: str, tls_files: TlsFiles) -> None:
    with trio.fail_after(TIMEOUT):
        async with secure_cluster(scheme, tls_files) as url:
            with pytest.raises(droplet.ConnectionError, match="handshake with .* failed"):
                async with droplet.open_client(url, timeout=TIMEOUT):
                    pass
            # The failed handshake cost the node nothing.
            await assert_serves(url, options=trusting(tls_files))


@pytest.mark.parametrize("scheme", SECURE)
async def test_client_trusting_another_ca_is_refused(scheme: str, tls_files: TlsFiles) -> None:
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)
    with trio.fail_after(TIMEOUT):
        async with secure_cluster(scheme, tls_files) as url:
            with pytest.raises(droplet.ConnectionError):
                async with droplet.open_client(url, timeout=TIMEOUT,
                                               options=TransportOptions(ssl_context=other)):
                    pass
            await assert_serves(url, options=trusting(tls_files))


@pytest.mark.parametrize("scheme", SECURE)
async def test_tls_and_token_together(scheme: str, tls_files: TlsFiles) -> None:
    with trio.fail_after(TIMEOUT):
        async with secure_cluster(scheme, tls_files, token="tls-and-token") as url:
            with pytest.raises(droplet.AuthenticationError):
                async with droplet.open_client(url, timeout=TIMEOUT,
                                               options=trusting(tls_files)):
                    pass
            await assert_serves(url, options=trusting(tls_files), token="tls-and-token")


async def test_plain_client_at_a_tls_node_fails_within_its_timeout(tls_files: TlsFiles) -> None:
    """Both sides wait for the other to speak first: the client's timeout ends it."""
    with trio.fail_after(TIMEOUT):
        async with secure_cluster("tls", tls_files) as url:
            plain = "tcp://" + url.split("://", 1)[1]
            with pytest.raises(droplet.ConnectionError, match="no answer"):
                async with droplet.open_client(plain, timeout=1):
                    pass
            await assert_serves(url, options=trusting(tls_files))


async def test_tls_client_at_a_plain_node_fails(tls_files: TlsFiles) -> None:
    """The ClientHello read as a frame length is far over the limit: the node hangs up."""
    with trio.fail_after(TIMEOUT):
        async with droplet.open_local_cluster(1, listen="tcp://127.0.0.1:0") as cluster:
            secure = "tls://" + cluster.address.split("://", 1)[1]
            with pytest.raises(droplet.ConnectionError):
                async with droplet.open_client(secure, timeout=TIMEOUT,
                                               options=trusting(tls_files)):
                    pass
            await assert_serves(cluster.address)


def test_tls_listener_without_a_certificate_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        Config(listen="tls://127.0.0.1:0").server_options()


# --------------------------------------------------------------------------- a real node


@pytest.mark.slow
def test_node_process_serves_tls(tls_files: TlsFiles, tmp_path: Any) -> None:
    with start_node("--executors", "1", "--tls-cert", tls_files.cert,
                    "--tls-key", tls_files.key, listen="tls://127.0.0.1:0",
                    log_path=tmp_path / "node.log", wait=False) as node:
        # start_node's readiness probe cannot speak TLS: wait for the banner instead.
        node.url = node.wait_for_log(r"droplet all node listening on (tls://\S+)",
                                     TIMEOUT).group(1)
        with DropletConnection(node.url, tls_ca=tls_files.ca, timeout=TIMEOUT) as cloud:
            assert cloud.register(lambda _, x: x * 3, "triple")(14).get() == 42
            cloud.put_object("over-tls", b"\x00" * 100_000)
            assert cloud.get_object("over-tls") == b"\x00" * 100_000
        with pytest.raises(droplet.ConnectionError):
            DropletConnection(node.url, timeout=TIMEOUT)  # no CA: the system's do not know it
        assert "Traceback" not in node.log_text()
