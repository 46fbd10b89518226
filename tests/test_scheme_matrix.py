"""The core behaviours, end to end, over every transport a cluster can listen on.

Each test gets a fresh embedded cluster (two executors, in this process)
listening on ``inproc://``, ``tcp://``, ``ws://``, ``tls://`` or ``wss://``
(the TLS ones with a throwaway CA) and a client connected through that
address, so the same encoded frames cross each transport. The inproc-only
suite with every corner is ``test_end_to_end.py``; this one stays compact.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
import trustme

import droplet
from droplet import AsyncDropletClient, DropletReference
from droplet.transports import TransportOptions
from droplet.transports.registry import known_schemes

SCHEMES = ["inproc", "tcp", "ws", "tls", "wss"]
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def pem_files(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, str]:
    """Certificate, key and CA as files, the way a node is configured."""
    where = tmp_path_factory.mktemp("scheme-matrix-tls")
    issued = tls_ca.issue_cert("127.0.0.1", "localhost")
    files = {"tls_cert": where / "cert.pem", "tls_key": where / "key.pem",
             "ca": where / "ca.pem"}
    files["tls_cert"].write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(files["tls_key"]))
    tls_ca.cert_pem.write_to_path(str(files["ca"]))
    return {name: str(path) for name, path in files.items()}


@pytest.fixture(params=SCHEMES)
async def cloud(request: pytest.FixtureRequest, pem_files: dict[str, str]
                ) -> AsyncIterator[AsyncDropletClient]:
    scheme: str = request.param
    listen = None if scheme == "inproc" else f"{scheme}://127.0.0.1:0"
    server: dict[str, Any] = {}
    client: dict[str, Any] = {}
    if scheme in ("tls", "wss"):
        server = {"tls_cert": pem_files["tls_cert"], "tls_key": pem_files["tls_key"]}
        context = ssl.create_default_context(cafile=pem_files["ca"])
        client = {"options": TransportOptions(ssl_context=context)}
    async with droplet.open_local_cluster(2, listen=listen, **server) as cluster:
        assert cluster.address.startswith(f"{scheme}://")
        async with droplet.open_client(cluster.address, timeout=TIMEOUT, **client) as conn:
            yield conn


def guarded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Socket tests get a ``trio.fail_after`` guard (not a MockClock)."""

    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> None:
        with trio.fail_after(TIMEOUT):
            await test(*args, **kwargs)

    return run


# Module-level functions pickle by reference: the executors run in this process.


def square(_: Any, x: int) -> int:
    return x * x


def incr(_: Any, x: int) -> int:
    return x + 1


def collect(_: Any, *args: Any) -> tuple[Any, ...]:
    return args


def tagged(tag: str) -> Any:
    def fn(_: Any, *args: Any) -> Any:
        return (tag, *args)
    return fn


def fail(_: Any, x: Any) -> Any:
    raise ValueError(f"bad input {x!r}")


class Counter:
    """A registered class: built once per executor, ``run`` per call."""

    def __init__(self, _: Any, start: int) -> None:
        self.start = start

    def run(self, _: Any, x: int) -> int:
        return self.start + x


async def call(cloud: AsyncDropletClient, name: str, *args: Any) -> Any:
    return await (await cloud.exec_func(name, list(args))).get()


@guarded
async def test_register_and_call(cloud: AsyncDropletClient) -> None:
    fn = await cloud.register(square, "square")
    assert await (await fn(7)).get() == 49
    assert await cloud.list() == ["square"]


@guarded
async def test_two_function_dag(cloud: AsyncDropletClient) -> None:
    await cloud.register(incr, "incr")
    await cloud.register(square, "square")
    assert await cloud.register_dag("pipeline", ["incr", "square"], [("incr", "square")])
    assert await (await cloud.call_dag("pipeline", {"incr": 1})).get() == 4


@guarded
async def test_fan_in_receives_upstream_results_in_edge_order(cloud: AsyncDropletClient
                                                              ) -> None:
    for tag in ("a", "b", "c"):
        await cloud.register(tagged(tag), tag)
    await cloud.register(collect, "sink")
    await cloud.register_dag("fan_in", ["a", "b", "c", "sink"],
                             [("b", "sink"), ("c", "sink"), ("a", "sink")])
    result = await (await cloud.call_dag(
        "fan_in", {"a": 1, "b": 2, "c": 3, "sink": ["own"]})).get()
    assert result == ("own", "b", 2, "c", 3, "a", 1)  # each upstream tuple splats


@guarded
async def test_droplet_reference(cloud: AsyncDropletClient) -> None:
    await cloud.put_object("base", 41)
    await cloud.register(incr, "incr")
    assert await call(cloud, "incr", DropletReference("base")) == 42


@guarded
async def test_registered_class(cloud: AsyncDropletClient) -> None:
    await cloud.register((Counter, 100), "counter")  # a lone init argument
    assert await call(cloud, "counter", 5) == 105
    assert await call(cloud, "counter", 6) == 106


@guarded
async def test_function_error_propagates_and_the_next_call_works(cloud: AsyncDropletClient
                                                                  ) -> None:
    await cloud.register(fail, "fail")
    await cloud.register(square, "square")
    with pytest.raises(droplet.FunctionError, match=r"ValueError.*bad input 3") as info:
        await call(cloud, "fail", 3)
    assert isinstance(info.value.__cause__, ValueError)
    assert await call(cloud, "square", 3) == 9


@guarded
async def test_direct_response(cloud: AsyncDropletClient) -> None:
    await cloud.register(incr, "incr")
    await cloud.register(square, "square")
    await cloud.register_dag("pipeline", ["incr", "square"], [("incr", "square")])
    assert await cloud.call_dag("pipeline", {"incr": 2}, direct_response=True) == 9


@guarded
async def test_put_and_get_object(cloud: AsyncDropletClient) -> None:
    value = {"text": "héllo", "blob": b"\x00\xff" * 300_000, "n": [1, 2.5, None]}
    assert await cloud.put_object("obj", value) is True
    assert await cloud.get_object("obj") == value
    assert await cloud.get_object("absent") is None


def test_every_scheme_is_covered() -> None:
    assert sorted(SCHEMES) == known_schemes()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_the_sync_client_over_websocket(scheme: str, pem_files: dict[str, str]) -> None:
    """``DropletConnection`` over ws:// and wss:// (blocking sockets, the WebSocket
    wire of the sync client)."""
    server: dict[str, Any] = {}
    tls_ca = None
    if scheme == "wss":
        server = {"tls_cert": pem_files["tls_cert"], "tls_key": pem_files["tls_key"]}
        tls_ca = pem_files["ca"]
    with droplet.LocalCluster(1, listen=f"{scheme}://127.0.0.1:0", **server) as cluster:
        assert cluster.address.startswith(f"{scheme}://")
        with droplet.DropletConnection(cluster.address, timeout=TIMEOUT, tls_ca=tls_ca) as cloud:
            cloud.register(square, "square")
            cloud.register(incr, "incr")
            cloud.register_dag("sq-incr", ["square", "incr"], [("square", "incr")])
            assert cloud.call_dag("sq-incr", {"square": 3}).get(timeout=TIMEOUT) == 10
            assert cloud.call_dag("sq-incr", {"square": 4}, direct_response=True) == 17
            futures = [cloud.exec_func("square", [i]) for i in range(20)]
            assert [f.get(timeout=TIMEOUT) for f in futures] == [i * i for i in range(20)]
            cloud.put_object("k", b"\x00" * 300_000)  # a frame of many socket reads
            assert cloud.get_object("k") == b"\x00" * 300_000
