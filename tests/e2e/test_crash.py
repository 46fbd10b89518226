"""Crash safety against real ``python -m droplet.node`` processes: SIGKILL, restart, replay."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import droplet
from droplet import DropletConnection
from droplet.kvs.backends.wal import LOG_MAGIC, PUT, decode_log, encode_record
from droplet.lattices import SetLattice
from droplet.testing.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow

CLIENTS = 8
ACKNOWLEDGED = 1000


def durable_node(tmp_path: Path, data: Path, *flags: str) -> Any:
    logs = len(list(tmp_path.glob("node-*.log")))  # one log per start: each prints its URL
    return start_node("--executors", "1", "--data-dir", str(data), *flags,
                      log_path=tmp_path / f"node-{logs}.log")


def register_work(cloud: DropletConnection) -> None:
    def double(_: Any, x: int) -> int:
        return 2 * x

    def describe(_: Any, x: int) -> str:
        return f"got {x}"

    cloud.register(double, "double")
    cloud.register(describe, "describe")
    cloud.register_dag("double-then-describe", ["double", "describe"], [("double", "describe")])


async def put_until_killed(node: NodeProcess) -> tuple[dict[str, int], set[int]]:
    """Concurrent clients put until ACKNOWLEDGED puts were acknowledged, then SIGKILL the node
    while more are in flight. Returns what was acknowledged."""
    acknowledged: dict[str, int] = {}
    members: set[int] = set()
    killed = trio.Event()

    async def client(c: int) -> None:
        async with droplet.open_client(node.url, timeout=30) as cloud:
            for i in range(10_000):
                key, value = f"c{c}-{i}", c * 100_000 + i
                try:
                    await cloud.put_object(key, value)
                    # every client also merges into one shared set key
                    await cloud.put_object("shared", SetLattice({value}))
                except droplet.DropletError:
                    assert killed.is_set(), "a put failed before the node was killed"
                    return
                acknowledged[key] = value
                members.add(value)
                if len(acknowledged) >= ACKNOWLEDGED and not killed.is_set():
                    node.kill()  # SIGKILL the node and its workers, puts still in flight
                    killed.set()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for c in range(CLIENTS):
                nursery.start_soon(client, c)
    assert killed.is_set()
    return acknowledged, members


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "data"


@pytest.mark.parametrize("fsync", ["always", "everysec", "no", "always-compacting"])
def test_sigkill_loses_no_acknowledged_put_nor_registration(
        tmp_path: Path, data: Path, fsync: str) -> None:
    """Every fsync policy survives a killed process; "always-compacting" writes a snapshot
    every few dozen puts, so the kill lands around compactions."""
    flags = ["--fsync", fsync]
    if fsync == "always-compacting":
        config = tmp_path / "node.toml"
        config.write_text("compact_bytes = 4000\n")
        flags = ["--config", str(config)]
    with durable_node(tmp_path, data, *flags) as node:
        with DropletConnection(node.url, timeout=30) as cloud:
            register_work(cloud)
            assert cloud.call_dag("double-then-describe", {"double": [4]}).get() == "got 8"
        acknowledged, members = trio.run(put_until_killed, node)
        assert node.proc.returncode == -signal.SIGKILL
        first_log = node.log_text()
    assert len(acknowledged) >= ACKNOWLEDGED

    with durable_node(tmp_path, data, *flags) as node:
        with DropletConnection(node.url, timeout=30) as cloud:
            missing = [k for k, v in acknowledged.items() if cloud.get_object(k) != v]
            assert missing == []
            shared = cloud.get_object("shared")
            assert isinstance(shared, SetLattice) and members <= shared.reveal()
            assert sorted(cloud.list()) == ["describe", "double"]
            assert cloud.exec_func("double", [21]).get() == 42
            assert cloud.call_dag("double-then-describe", {"double": [5]}).get() == "got 10"
        assert "replayed" in node.log_text()
    if fsync == "always-compacting":
        assert first_log.count("snapshot of") >= 2  # compactions before the kill
        assert re.search(r"[1-9]\d* keys from the snapshot", node.log_text())


def test_damaged_log_tail_is_cut_and_reported(tmp_path: Path, data: Path) -> None:
    with durable_node(tmp_path, data) as node:
        with DropletConnection(node.url, timeout=30) as cloud:
            for i in range(50):
                cloud.put_object(f"k{i}", i)
        node.kill()
    [last] = [p for p in sorted(data.glob("log.*")) if p.stat().st_size > len(LOG_MAGIC)][-1:]
    good = last.read_bytes()
    replayed = decode_log(good)
    assert replayed.damage is None and len(replayed.records) == 50
    # what a crash mid-write leaves, then a flipped bit in the last whole record
    torn = encode_record(PUT, "torn", b"never acknowledged")[:-4]
    damaged = bytearray(good + torn)
    last_start = len(good) - len(encode_record(PUT, "k49", replayed.records[-1].data))
    damaged[last_start + 20] ^= 0x40
    last.write_bytes(bytes(damaged))

    with durable_node(tmp_path, data) as node:
        with DropletConnection(node.url, timeout=30) as cloud:
            assert [cloud.get_object(f"k{i}") for i in range(49)] == list(range(49))
            assert cloud.get_object("k49") is None  # its record no longer checks out
            assert cloud.get_object("torn") is None
        report = node.log_text()
    dropped = len(damaged) - last_start
    assert (f"dropped {dropped} bytes from offset {last_start} (checksum mismatch)"
            in report)
    assert last.read_bytes() == good[:last_start]
    assert (data / f"{last.name}.damaged-{last_start}").read_bytes() == bytes(
        damaged[last_start:])
