"""The durable backend (kvs/backends/durable.py) over a real data directory."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import droplet
from droplet.kvs.backends.durable import DurableBackend
from droplet.kvs.backends.wal import LOG_MAGIC, PUT, decode_log, encode_record
from droplet.kvs.keys import RESULT_PREFIX
from droplet.lattices import RAW, LWWLattice, SetLattice, decode_lattice, encode_lattice


def lww(ts: int, value: bytes) -> bytes:
    return encode_lattice(LWWLattice(ts, value, "w"), dump=RAW)


def raw_set(*elements: bytes) -> bytes:
    return encode_lattice(SetLattice(elements), dump=RAW)


def revealed(data: bytes | None) -> Any:
    assert data is not None
    return decode_lattice(data, load=RAW).reveal()


async def _ignore(key: str, data: bytes) -> None:
    raise AssertionError("a single durable node has no other writers")


@asynccontextmanager
async def running(path: Path, **options: Any) -> AsyncIterator[DurableBackend]:
    backend = DurableBackend(path, **options)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            await nursery.start(backend.run, _ignore)
        yield backend
        nursery.cancel_scope.cancel()


async def snapshot_written(backend: DurableBackend) -> None:
    with trio.fail_after(10):
        while backend.statistics().snapshots == 0 or backend._compacting:
            await backend.compaction_finished.wait()


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("log.????????"))


@pytest.mark.parametrize("fsync", ["always", "everysec", "no"])
async def test_puts_survive_a_restart(tmp_path: Path, fsync: str) -> None:
    async with running(tmp_path, fsync=fsync) as backend:
        assert await backend.put("a", lww(1, b"one")) == ("LWW", lww(1, b"one"))
        await backend.put("s", raw_set(b"x"))
        await backend.put("s", raw_set(b"y"))
        assert await backend.put("s", raw_set(b"x")) == ("Set", None)
        await backend.put(RESULT_PREFIX + "r1", lww(1, b"result"))
        assert backend.statistics().logged == 3  # changes only; results stay in memory
    async with running(tmp_path, fsync=fsync) as again:
        assert revealed(again.get_nowait("a")) == b"one"
        assert revealed(await again.get("s")) == {b"x", b"y"}
        assert again.get_nowait(RESULT_PREFIX + "r1") is None
        assert again.recovery is not None and again.recovery.replayed_records == 3
        assert again.statistics().keys == 2


async def test_an_acknowledged_put_is_already_in_the_log(tmp_path: Path) -> None:
    async with running(tmp_path) as backend:
        with pytest.raises(trio.WouldBlock):
            backend.put_nowait("k", lww(1, b"v"))  # durable keys always wait for the log
        await backend.put("k", lww(1, b"v"))
        replay = decode_log(segments(tmp_path)[-1].read_bytes())  # while still running
        assert [(r.op, r.key, r.data) for r in replay.records] == [(PUT, "k", lww(1, b"v"))]
        assert replay.damage is None


async def test_concurrent_puts_share_commits(tmp_path: Path) -> None:
    async with running(tmp_path) as backend:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(backend.put, f"k{i}", lww(1, b"v"))
        stats = backend.statistics()
        assert stats.logged == 200
        assert 1 <= stats.commits < 200  # group commit: fewer fsyncs than puts
    async with running(tmp_path) as again:
        assert again.statistics().keys == 200


async def test_bad_input_is_refused_and_never_logged(tmp_path: Path) -> None:
    async with running(tmp_path) as backend:
        await backend.put("k", lww(1, b"v"))
        with pytest.raises(droplet.ProtocolError):
            await backend.put("k2", b"garbage")
        with pytest.raises(droplet.LatticeTypeError):
            await backend.put("k", raw_set(b"x"))
        assert backend.statistics().logged == 1
    async with running(tmp_path) as again:
        assert again.statistics().keys == 1


async def test_compaction_writes_a_snapshot_and_drops_old_segments(tmp_path: Path) -> None:
    async with running(tmp_path, compact_bytes=2000, volatile_prefixes=()) as backend:
        for i in range(300):
            await backend.put(f"k{i % 50}", raw_set(str(i).encode()))
        await backend.delete("k0")
        await backend.put("after-delete", lww(1, b"x"))
        await snapshot_written(backend)
        assert (tmp_path / "snapshot").stat().st_mode & 0o077 == 0  # the owner's only
        assert all(seg.stat().st_mode & 0o077 == 0 for seg in segments(tmp_path))
        assert len(segments(tmp_path)) <= 2
        # compacted again once the log outgrows both the threshold and the snapshot
        threshold = max(2000, (tmp_path / "snapshot").stat().st_size)
        assert backend.statistics().log_bytes < threshold + 1000
        expected = {f"k{k}": {str(i).encode() for i in range(300) if i % 50 == k}
                    for k in range(1, 50)}
    async with running(tmp_path) as again:
        got = {k: revealed(again.get_nowait(k)) for k in expected}
        assert got == expected
        assert again.get_nowait("k0") is None  # the delete replays too
        assert revealed(again.get_nowait("after-delete")) == b"x"
        assert again.recovery is not None and again.recovery.snapshot_keys > 0


async def test_torn_tail_is_cut_reported_and_kept(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    async with running(tmp_path) as backend:
        for i in range(10):
            await backend.put(f"k{i}", lww(1, b"v"))
    last = segments(tmp_path)[-1]
    whole = last.read_bytes()
    record = encode_record(PUT, "torn", lww(1, b"never acknowledged"))
    last.write_bytes(whole + record[:-3])  # the crash hit mid-write
    caplog.set_level(logging.WARNING, "droplet.kvs.durable")
    async with running(tmp_path) as again:
        assert again.statistics().keys == 10
        assert again.get_nowait("torn") is None
        assert again.recovery is not None
        [(name, damage)] = again.recovery.damaged
        assert name == last.name
        assert (damage.offset, damage.dropped_bytes) == (len(whole), len(record) - 3)
        assert damage.records_after == 0
    assert last.read_bytes() == whole  # cut back to the last good record
    kept = tmp_path / f"{last.name}.damaged-{len(whole)}"
    assert kept.read_bytes() == record[:-3]
    assert f"dropped {len(record) - 3} bytes from offset {len(whole)}" in caplog.text
    async with running(tmp_path) as third:  # once cut, the next start is clean
        assert third.recovery is not None and third.recovery.damaged == []


async def test_corruption_in_the_middle_is_reported_as_such(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running(tmp_path) as backend:
        for i in range(10):
            await backend.put(f"k{i}", lww(1, b"v"))
    last = segments(tmp_path)[-1]
    data = bytearray(last.read_bytes())
    size = len(encode_record(PUT, "k0", lww(1, b"v")))
    data[len(LOG_MAGIC) + 4 * size + 10] ^= 0x01  # a bit of record 4 (k4)
    last.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, "droplet.kvs.durable")
    async with running(tmp_path) as again:
        assert sorted(again.store.encodings()) == sorted(
            (f"k{i}", lww(1, b"v")) for i in range(4))
        assert again.recovery is not None
        [(_, damage)] = again.recovery.damaged
        assert damage.reason == "checksum mismatch" and damage.records_after == 5
    assert any(r.levelno == logging.ERROR and "5 well-formed record(s)" in r.getMessage()
               for r in caplog.records)


async def test_damaged_snapshot_refuses_to_start(tmp_path: Path) -> None:
    async with running(tmp_path, compact_bytes=100) as backend:
        for i in range(20):
            await backend.put(f"k{i}", lww(1, b"v"))
        await snapshot_written(backend)
    snapshot = tmp_path / "snapshot"
    snapshot.write_bytes(snapshot.read_bytes()[:-5])
    with pytest.raises(droplet.StorageError, match="snapshot .* is damaged.*backup"):
        await DurableBackend(tmp_path).run(_ignore)  # raises before it is ready


async def test_a_data_dir_serves_one_node_at_a_time(tmp_path: Path) -> None:
    async with running(tmp_path):
        with pytest.raises(droplet.StorageError, match=f"in use by another.*pid {os.getpid()}"):
            await DurableBackend(tmp_path).run(_ignore)
    async with running(tmp_path):  # released when the first one stopped
        pass


async def test_a_failed_log_write_refuses_writes_but_keeps_reads(tmp_path: Path) -> None:
    async with running(tmp_path) as backend:
        await backend.put("k", lww(1, b"v"))
        os.close(backend._fd)
        backend._fd = os.open(tmp_path / "LOCK", os.O_RDONLY)  # writes now fail (EBADF)
        with pytest.raises(droplet.StorageError, match="could not be written"):
            await backend.put("k2", lww(1, b"v"))
        with pytest.raises(droplet.StorageError, match="refuses writes until it is restarted"):
            await backend.put("k3", lww(1, b"v"))
        assert revealed(backend.get_nowait("k")) == b"v"


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync must be one of always, everysec, no"):
        DurableBackend(tmp_path, fsync="sometimes")
    with pytest.raises(ValueError, match="compact_bytes must be positive"):
        DurableBackend(tmp_path, compact_bytes=0)


# --------------------------------------------------------------------------- behind KvsService

@asynccontextmanager
async def durable_service(path: Path, *, result_ttl: float = 600.0, **options: Any
                          ) -> AsyncIterator[tuple[Any, DurableBackend, Any, Any]]:
    """(service, backend, a peer, connect(handler) for more peers)"""
    from functools import partial

    from droplet.kvs.service import KvsService
    from droplet.links import connect_peer, serve_peers

    backend = DurableBackend(path, **options)
    async with trio.open_nursery() as nursery:
        service = KvsService(nursery, backend, result_ttl=result_ttl)
        with trio.fail_after(20):
            await nursery.start(service.serve)
        url = await nursery.start(partial(serve_peers, f"inproc://durable-{path.name}",
                                          service.handle))
        peer = await connect_peer(url, nursery)
        yield service, backend, peer, partial(connect_peer, url, nursery)
        await peer.aclose()
        nursery.cancel_scope.cancel()


async def test_one_connections_pipelined_puts_share_log_writes(tmp_path: Path) -> None:
    from droplet.protocol.messages import KvsGet, KvsPut, KvsStored

    async with durable_service(tmp_path) as (_, backend, peer, _):
        replies: list[Any] = []

        async def put(i: int) -> None:
            replies.append(await peer.request(KvsPut(f"k{i}", lww(1, b"v"))))

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(put, i)
        assert replies == [KvsStored("LWW")] * 300
        stats = backend.statistics()
        assert stats.logged == 300 and stats.commits < 300
        # acknowledged means logged: every one of them is in the log file already
        logged = [r.key for seg in segments(tmp_path) for r in decode_log(seg.read_bytes()).records]
        assert sorted(logged) == sorted(f"k{i}" for i in range(300))
        assert revealed((await peer.request(KvsGet("k7"))).lattice) == b"v"


async def test_waiters_and_subscribers_hear_of_a_durable_put(tmp_path: Path) -> None:
    from droplet.protocol.messages import KvsGet, KvsPut, KvsUpdate

    async with durable_service(tmp_path) as (service, _, peer, connect):
        updates: list[KvsUpdate] = []
        got: list[Any] = []

        async def wait() -> None:
            got.append(await peer.request(KvsGet("later", 30.0)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            await peer.request(KvsPut("later", raw_set(b"a"), True))  # and subscribe
        assert revealed(got[0].lattice) == {b"a"}
        send, receive = trio.open_memory_channel[KvsUpdate](10)

        async def on_update(_: Any, msg: Any, request_id: int) -> None:
            await send.send(msg)

        cache = await connect(handler=on_update)
        await cache.request(KvsGet("later", None, True))  # subscribe
        await peer.request(KvsPut("later", raw_set(b"b")))
        with trio.fail_after(5):
            updates.append(await receive.receive())
        assert updates[0].key == "later"
        assert revealed(updates[-1].lattice) == {b"a", b"b"}
        assert service.statistics().storage.backend == "durable"
        await cache.aclose()


async def test_a_failed_log_write_is_an_error_reply_and_the_node_keeps_serving(
        tmp_path: Path) -> None:
    from droplet.protocol.messages import KvsGet, KvsPut

    async with durable_service(tmp_path) as (_, backend, peer, _):
        await peer.request(KvsPut("k", lww(1, b"v")))
        os.close(backend._fd)
        backend._fd = os.open(tmp_path / "LOCK", os.O_RDONLY)
        with pytest.raises(droplet.StorageError, match="could not be written"):
            await peer.request(KvsPut("k2", lww(1, b"v")))
        with pytest.raises(droplet.StorageError, match="refuses writes"):
            await peer.request(KvsPut("k3", lww(1, b"v")))
        assert revealed((await peer.request(KvsGet("k"))).lattice) == b"v"


async def test_a_crash_in_the_middle_of_a_compaction_recovers_the_same_state(
        tmp_path: Path) -> None:
    """Killed after the snapshot's rename but before the old segments went (and with a
    half-written snapshot.tmp of a later compaction): nothing is applied twice or lost."""
    async with running(tmp_path, volatile_prefixes=()) as backend:
        await backend.put("s", raw_set(b"1"))
        await backend.put("gone", lww(1, b"x"))
        await backend.delete("gone")
    old = {seg.name: seg.read_bytes() for seg in segments(tmp_path)}
    async with running(tmp_path, compact_bytes=1, volatile_prefixes=()) as backend:
        await backend.put("s", raw_set(b"2"))  # the first batch triggers a snapshot
        await snapshot_written(backend)
        await backend.put("after", lww(1, b"y"))
    assert not any((tmp_path / name).exists() for name in old)
    for name, data in old.items():  # as if the crash came before their deletion
        (tmp_path / name).write_bytes(data)
    (tmp_path / "snapshot.tmp").write_bytes(b"DRPSNP01 half written")
    async with running(tmp_path) as again:
        assert revealed(again.get_nowait("s")) == {b"1", b"2"}
        assert again.get_nowait("gone") is None
        assert revealed(again.get_nowait("after")) == b"y"
        assert again.recovery is not None and again.recovery.damaged == []
    assert not (tmp_path / "snapshot.tmp").exists()
    assert not any((tmp_path / name).exists() for name in old)


async def test_logged_results_still_expire_and_their_deletion_is_logged(tmp_path: Path) -> None:
    from droplet.protocol.messages import KvsPut

    async with durable_service(tmp_path, result_ttl=0.01, volatile_prefixes=()) as (
            _, backend, peer, _):
        await peer.request(KvsPut(RESULT_PREFIX + "old", lww(1, b"1")))
        await trio.sleep(0.05)  # past its ttl: the next result's put drops it
        await peer.request(KvsPut(RESULT_PREFIX + "new", lww(1, b"2")))
        assert backend.get_nowait(RESULT_PREFIX + "old") is None
    async with running(tmp_path, volatile_prefixes=()) as again:
        assert again.get_nowait(RESULT_PREFIX + "old") is None
        assert revealed(again.get_nowait(RESULT_PREFIX + "new")) == b"2"


async def test_a_long_replayed_log_is_compacted_at_the_first_write(tmp_path: Path) -> None:
    async with running(tmp_path) as backend:
        for i in range(100):
            await backend.put(f"k{i}", lww(1, b"v" * 50))
    async with running(tmp_path, compact_bytes=1000) as again:
        assert again.statistics().log_bytes > 1000
        await again.put("one more", lww(1, b"v"))
        await snapshot_written(again)
        assert again.statistics().log_bytes < 1000
    async with running(tmp_path) as third:
        assert third.recovery is not None and third.recovery.snapshot_keys == 101


async def test_backup_by_copying_log_segments_then_the_snapshot(tmp_path: Path) -> None:
    """The how-to's backup recipe, with a snapshot written between its two copies."""
    import shutil

    data, backup = tmp_path / "data", tmp_path / "backup"
    backup.mkdir()
    async with running(data, compact_bytes=500) as backend:
        for i in range(20):
            await backend.put(f"before-{i}", lww(1, b"v" * 20))
        await snapshot_written(backend)
        await backend.put("in-the-log", raw_set(b"a"))
        for seg in segments(data):  # 1. the log segments
            shutil.copy(seg, backup)
        snapshots = backend.statistics().snapshots
        for i in range(40):  # a new snapshot replaces the old one meanwhile
            await backend.put(f"during-{i}", lww(1, b"v" * 20))
        with trio.fail_after(10):
            while backend.statistics().snapshots == snapshots or backend._compacting:
                await backend.compaction_finished.wait()
        shutil.copy(data / "snapshot", backup)  # 2. the snapshot
    async with running(backup) as restored:
        for i in range(20):
            assert revealed(restored.get_nowait(f"before-{i}")) == b"v" * 20
        assert revealed(restored.get_nowait("in-the-log")) == {b"a"}
        assert restored.recovery is not None and restored.recovery.damaged == []


# --------------------------------------------------------------------------- model-based

_keys = st.sampled_from(["a", "b", "c", "d"])
_ops = st.one_of(
    st.tuples(st.just("lww"), _keys, st.integers(0, 20), st.binary(max_size=8)),
    st.tuples(st.just("set"), _keys, st.binary(max_size=3), st.just(b"")),
    st.tuples(st.just("delete"), _keys, st.just(0), st.just(b"")),
)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(_ops, max_size=25), min_size=1, max_size=4), st.integers(40, 600))
def test_every_restart_recovers_exactly_what_was_written(
        sessions: list[list[tuple[str, str, int, bytes]]], compact: int) -> None:
    """Random puts, type clashes and deletes over several restarts, with snapshots every few
    hundred bytes: each start finds exactly the state a plain in-memory store would hold."""
    from droplet.kvs.store import Store

    model = Store()

    async def session(path: Path, ops: list[tuple[str, str, int, bytes]]) -> None:
        async with running(path, compact_bytes=compact, volatile_prefixes=()) as backend:
            assert dict(backend.store.encodings()) == dict(model.encodings())
            for kind, key, ts, value in ops:
                if kind == "delete":
                    assert await backend.delete(key) == model.delete(key)
                    continue
                data = lww(ts, value) if kind == "lww" else raw_set(value)
                try:
                    expected: Any = model.put(key, data)
                except droplet.LatticeTypeError:
                    expected = droplet.LatticeTypeError
                if expected is droplet.LatticeTypeError:
                    with pytest.raises(droplet.LatticeTypeError):
                        await backend.put(key, data)
                else:
                    assert await backend.put(key, data) == expected

    with tempfile.TemporaryDirectory() as tmp:
        for ops in [*sessions, []]:
            trio.run(session, Path(tmp), ops)

