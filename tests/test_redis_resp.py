"""The Redis backend's pure parts: RESP commands, hash slots, URLs, change notices, config."""

from __future__ import annotations

from pathlib import Path

import pytest

from droplet.config import Config
from droplet.kvs.backends.redis.resp import key_slot, pack_command, parse_redis_url
from droplet.kvs.backends.redis.scripts import COMPARE_AND_SET, MERGE, pack_notice, unpack_notice
from droplet.node._main import build_parser


def test_commands_are_resp_arrays_of_bulk_strings() -> None:
    assert pack_command("SET", b"k\r\n", 12, 1.5) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n1.5\r\n")
    assert pack_command("GET", "\u00e9") == b"*2\r\n$3\r\nGET\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(TypeError, match="not NoneType"):
        pack_command("GET", None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "slot"), [
    # values from the Redis Cluster specification and CLUSTER KEYSLOT
    (b"foo", 12182), (b"bar", 5061), (b"hello", 866), (b"", 0),
    (b"{user1000}.following", key_slot(b"user1000")),
    (b"foo{}{bar}", key_slot(b"foo{}{bar}")),  # empty tag: the whole key
    (b"foo{{bar}}zap", key_slot(b"{bar")),  # the first { to the first } after it
])
def test_key_slots_follow_the_cluster_spec(key: bytes, slot: int) -> None:
    assert key_slot(key) == slot


def test_redis_urls() -> None:
    url = parse_redis_url("rediss://user:p%40ss@db.example:7000/2?prefix=app:&ssl_ca_certs=/ca")
    assert (url.host, url.port, url.db, url.tls) == ("db.example", 7000, 2, True)
    assert (url.username, url.password, url.prefix, url.ca_file) == ("user", "p@ss", "app:", "/ca")
    assert "p@ss" not in repr(url) and "p@ss" not in url.redacted()
    assert parse_redis_url("redis://h").port == 6379


@pytest.mark.parametrize(("url", "message"), [
    ("http://h:1", "must start with redis://"),
    ("redis://:1/0", "names no host"),
    ("redis://h:x/0", "bad port"),
    ("redis://h/zero", "database number"),
    ("redis://h/0?colour=red", "unknown option"),
    ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
])
def test_bad_redis_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)


def test_change_notices_round_trip_and_garbage_is_refused() -> None:
    notice = pack_notice(b"origin", "k\u00e9y".encode(), b"encoding")
    assert unpack_notice(notice) == (b"origin", "k\u00e9y".encode(), b"encoding")
    assert unpack_notice(pack_notice(b"o", b"k")) == (b"o", b"k", b"")
    for garbage in (b"", b"\x00\x00\x00\x09abc", notice[:12]):
        with pytest.raises(ValueError):
            unpack_notice(garbage)


def test_scripts_are_named_by_their_sha1() -> None:
    assert len(MERGE.sha) == len(COMPARE_AND_SET.sha) == 40
    assert MERGE.sha != COMPARE_AND_SET.sha


def test_storage_setting_and_flag() -> None:
    assert Config().storage is None
    assert Config(storage="redis://127.0.0.1:6379/1").storage == "redis://127.0.0.1:6379/1"
    assert "s3cret" not in repr(Config(storage="redis://:s3cret@h/0"))
    for bad in ("mysql://h/db", "redis://h/x"):
        with pytest.raises(ValueError):
            Config(storage=bad)
    args = build_parser().parse_args(["--role", "kvs", "--storage", "rediss://h:1/0"])
    assert args.storage == "rediss://h:1/0"


def test_a_node_without_its_redis_fails_to_start_with_one_clear_line(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    from droplet.node._main import main
    from droplet.testing.nodes import free_port

    port = free_port()
    status = main(["--role", "kvs", "--listen", "tcp://127.0.0.1:0",
                   "--storage", f"redis://127.0.0.1:{port}/0"])
    assert status == 1
    assert f"cannot connect to Redis at 127.0.0.1:{port}" in caplog.text
    assert "Traceback" not in caplog.text
    status = main(["--storage", "redis://h/0", "--data-dir", "/tmp/x", "--listen",
                   "tcp://127.0.0.1:0"])
    assert status == 1
    assert "drop --data-dir" in caplog.text


def test_storage_in_the_configuration_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[droplet]\nrole = "kvs"\nstorage = "redis://:pw@10.0.0.9:7000/0"\n')
    config = Config.load({}, str(path), environ={})
    assert config.storage == "redis://:pw@10.0.0.9:7000/0"
    path.write_text('storage = "postgres://db"\n')
    with pytest.raises(ValueError, match="storage must be"):
        Config.load({}, str(path), environ={})
