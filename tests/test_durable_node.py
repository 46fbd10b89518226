"""State that survives a restart, embedded: data_dir for LocalCluster, config, the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import droplet
from droplet.config import Config, default_data_root
from droplet.lattices import SetLattice
from droplet.node._main import build_parser
from droplet.scheduler.dags import build_dag
from droplet.scheduler.registry import dag_entry, decode_registry, function_entry


def square(_: Any, x: int) -> int:
    return x * x


def incr(_: Any, x: int) -> int:
    return x + 1


async def test_a_local_cluster_with_a_data_dir_keeps_keys_functions_and_dags(
        tmp_path: Path) -> None:
    async with droplet.open_local_cluster(executors=1, data_dir=str(tmp_path)) as cluster:
        assert cluster.node.kvs.statistics().storage.backend == "durable"
        async with cluster.client() as cloud:
            await cloud.put_object("user", {"kept": True})
            await cloud.put_object("set", SetLattice({1, 2}))
            await cloud.register(square, "square")
            await cloud.register(incr, "incr")
            await cloud.register_dag("pipeline", ["square", "incr"], [("square", "incr")])
            await cloud.register_dag("gone", ["incr"], [])
            await cloud.delete_dag("gone")
            future = await cloud.exec_func("square", [3])
            assert await future.get() == 9
    async with droplet.open_local_cluster(executors=1, data_dir=str(tmp_path)) as cluster:
        stats = cluster.node.scheduler.statistics()
        assert (stats.functions, stats.dags) == (2, 1)
        async with cluster.client() as cloud:
            assert await cloud.get_object("user") == {"kept": True}
            assert await cloud.get_object("set") == SetLattice({1, 2})
            assert sorted(await cloud.list()) == ["incr", "square"]
            assert await (await cloud.exec_func("square", [4])).get() == 16
            assert await (await cloud.call_dag("pipeline", {"square": [5]})).get() == 26
            with pytest.raises(droplet.DagError, match="gone"):
                await cloud.call_dag("gone", {"incr": [1]})
            # a deleted DAG can be registered again, and that sticks too
            await cloud.register_dag("gone", ["square"], [])
    async with droplet.open_local_cluster(executors=1, data_dir=str(tmp_path)) as cluster:
        assert cluster.node.scheduler.statistics().dags == 2


async def test_a_local_cluster_keeps_nothing_by_default() -> None:
    async with droplet.open_local_cluster(executors=0) as cluster:
        assert cluster.node.kvs.statistics().storage.backend == "memory"


def test_registry_round_trip_and_tombstones() -> None:
    from droplet.lattices import RAW, decode_lattice, encode_lattice

    registered = {"a": "v1", "b": "v2"}
    dag = build_dag("d", ["a", "b"], [["a", "b"]], ["a"], registered)
    merged = decode_lattice(function_entry("a", "v1"), load=RAW)
    for delta in (function_entry("b", "v2"), dag_entry("d", dag), dag_entry("x", dag)):
        merged = merged.merge(decode_lattice(delta, load=RAW))
    merged = merged.merge(decode_lattice(dag_entry("x", None), load=RAW))  # deleted later
    functions, dags, problems = decode_registry(encode_lattice(merged, dump=RAW))
    assert problems == []
    assert functions == registered
    assert dags == {"d": (["a", "b"], [["a", "b"]], ["a"])}


def test_registry_entries_that_do_not_decode_are_skipped_and_named() -> None:
    from droplet.lattices import RAW, LWWLattice, MapLattice, SetLattice, encode_lattice

    assert decode_registry(encode_lattice(LWWLattice(1, b"x"), dump=RAW))[2] == [
        "the registry is a LWW lattice, not a Map"]
    assert "does not decode" in decode_registry(b"garbage")[2][0]
    bad = MapLattice({
        "d/x": LWWLattice(1, b"[1, 2]"),  # not three lists
        "d/y": LWWLattice(1, b"{not json"),
        "f/ok": LWWLattice(1, b"v1"),
        "f/bad": LWWLattice(1, b"\xff"),
        "zzz": LWWLattice(1, b"?"),
        "f/set": SetLattice({b"a"}),
    })
    functions, dags, problems = decode_registry(encode_lattice(bad, dump=RAW))
    assert (functions, dags) == ({"ok": "v1"}, {})
    assert sorted(p.split(":")[0] for p in problems) == [
        "entry 'd/x'", "entry 'd/y'", "entry 'f/bad'", "entry 'f/set'", "entry 'zzz'"]


async def test_a_scheduler_starts_over_a_registry_a_user_broke(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from droplet.kvs.keys import REGISTRY_KEY

    async with droplet.open_local_cluster(executors=1, data_dir=str(tmp_path)) as cluster:
        async with cluster.client() as cloud:
            await cloud.register(square, "square")
            await cloud.put_object(REGISTRY_KEY, droplet.lattices.MapLattice(
                {"d/evil": droplet.lattices.LWWLattice.now(b"junk")}))
    async with droplet.open_local_cluster(executors=1, data_dir=str(tmp_path)) as cluster:
        async with cluster.client() as cloud:
            assert await (await cloud.exec_func("square", [3])).get() == 9
    assert "skipping entry 'd/evil'" in caplog.text


def test_storage_dir_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_root() == tmp_path / "droplet"
    assert Config().storage_dir == tmp_path / "droplet" / "127.0.0.1-5000"
    assert Config(listen="ws://[::1]:8080").storage_dir == tmp_path / "droplet" / "__1-8080"
    assert Config(listen="tcp://127.0.0.1:0").storage_dir is None
    assert Config(listen="inproc://x").storage_dir is None
    assert Config(role="kvs").storage_dir is None  # other roles: only when given
    assert Config(role="kvs", data_dir="~/kvs").storage_dir == Path.home() / "kvs"
    assert Config(data_dir=":memory:").storage_dir is None
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_root() == Path.home() / ".local" / "share" / "droplet"


def test_data_dir_and_fsync_from_flags_and_toml(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('data_dir = "/srv/droplet"\nfsync = "everysec"\n')
    config = Config.load({}, str(toml))
    assert (config.storage_dir, config.fsync) == (Path("/srv/droplet"), "everysec")
    args = vars(build_parser().parse_args(["--data-dir", ":memory:", "--fsync", "no"]))
    flags = {k: v for k, v in args.items() if k != "config"}
    config = Config.load(flags, str(toml))
    assert (config.storage_dir, config.fsync) == (None, "no")
    with pytest.raises(ValueError, match="fsync"):
        Config(fsync="sometimes")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--fsync", "sometimes"])


def test_a_node_whose_data_dir_is_unusable_says_so_and_exits_1(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from droplet.node._main import main as node_main

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    code = node_main(["--listen", "tcp://127.0.0.1:0", "--executors", "0",
                      "--data-dir", str(not_a_dir / "data")])
    assert code == 1
    assert f"could not start: cannot use data directory {not_a_dir / 'data'}" in caplog.text
