"""Which scheme an all-in-one node's executor workers listen on (clients go
straight to executors only over their own scheme)."""

from __future__ import annotations

import pytest

from droplet.config import Config
from droplet.node import _worker_flags, _workers_on_public_scheme


@pytest.mark.parametrize(("listen", "tls_ca", "public"), [
    ("tcp://127.0.0.1:5000", None, False),  # workers on loopback TCP already
    ("ws://127.0.0.1:5000", None, True),
    ("ws://0.0.0.0:5000", None, True),
    ("wss://127.0.0.1:5000", None, False),  # executors could not verify each other
    ("wss://127.0.0.1:5000", "ca.pem", True),
    ("tls://node.example:5000", "ca.pem", True),
    ("wss://0.0.0.0:5000", "ca.pem", False),  # no certificate names 0.0.0.0
])
def test_workers_listen_on_the_public_scheme_when_clients_can_use_it(
        listen: str, tls_ca: str | None, public: bool) -> None:
    config = Config(listen=listen, tls_ca=tls_ca)
    assert _workers_on_public_scheme(config) is public
    if public:
        scheme, rest = listen.split("://")
        assert _worker_flags(config)[:2] == ["--listen",
                                             f"{scheme}://{rest.rsplit(':', 1)[0]}:0"]
