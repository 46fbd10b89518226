"""Command-line entry points, in-process: settings errors, --version, start-local."""

from __future__ import annotations

import logging
import os
import signal
import socket
from functools import partial
from pathlib import Path

import pytest
import trio

import droplet
from droplet.cli import main as cli_main
from droplet.links import serve_peers
from droplet.node._main import main as node_main
from droplet.testing.nodes import free_port


@pytest.mark.parametrize("main", [node_main, cli_main], ids=["droplet.node", "droplet"])
def test_version(main: object, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])  # type: ignore[operator]
    assert info.value.code == 0
    assert droplet.__version__ in capsys.readouterr().out


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "droplet.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("text", "words"), [
    ('executors = "two"\n', ["executors", "an integer", "str"]),
    ("insecure = 1\n", ["insecure", "true or false"]),
    ("result_ttl = \"soon\"\n", ["result_ttl", "a number"]),
    ("executors = -1\n", ["executors"]),
    ("log_level = \"LOUD\"\n", ["log_level", "LOUD"]),
], ids=["int", "bool", "float", "validator", "log-level"])
def test_config_errors_name_the_file_key_and_type(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, words: list[str]) -> None:
    path = _config(tmp_path, text)
    assert node_main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert path in err
    for word in words:
        assert word in err
    assert "Traceback" not in err


def test_toml_syntax_error_names_the_file(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, "executors = = 2\n")
    assert node_main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert path in err and "TOML" in err


@pytest.mark.parametrize(("argv", "words"), [
    (["--role", "scheduler"], ["--kvs"]),
    (["--role", "executor"], ["--scheduler"]),
    (["--listen", "tls://127.0.0.1:0"], ["--tls-cert"]),
    (["--listen", "tls://127.0.0.1:0", "--tls-cert", "/nonexistent/c.pem",
      "--tls-key", "/nonexistent/k.pem"], ["/nonexistent/c.pem"]),
    (["--log-level", "LOUD"], ["LOUD"]),
    (["--tls-ca", "/nonexistent/ca.pem"], ["/nonexistent/ca.pem"]),
], ids=["scheduler-without-kvs", "executor-without-scheduler", "tls-without-cert",
        "missing-cert", "log-level", "missing-ca"])
def test_every_invalid_setting_exits_2(argv: list[str], words: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert node_main(argv) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert "Traceback" not in err


def test_address_in_use_names_the_address_and_the_fix(
        caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        with caplog.at_level(logging.ERROR, logger="droplet.node"):
            assert node_main(["--listen", url, "--executors", "0"]) == 1
    assert url in caplog.text
    assert "already in use" in caplog.text
    assert "--listen" in caplog.text


def test_start_local_refuses_invalid_settings_before_starting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pid_file = tmp_path / "node.pid"
    assert cli_main(["start-local", "--log-level", "LOUD", "--pid-file", str(pid_file)]) == 2
    assert "LOUD" in capsys.readouterr().err
    assert not pid_file.exists()
    with pytest.raises(SystemExit) as info:
        cli_main(["start-local", "--placement", "nearest"])
    assert info.value.code == 2


@pytest.mark.slow
def test_start_local_passes_node_flags_and_reports_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DROPLET_HOME", str(tmp_path))
    monkeypatch.delenv("DROPLET_TOKEN", raising=False)
    pid_file = tmp_path / "node.pid"
    url = f"tcp://127.0.0.1:{free_port()}"
    try:
        assert cli_main(["start-local", "--listen", url, "--executors", "1", "--threads", "3",
                         "--placement", "spread", "--token", "s3cret",
                         "--result-ttl", "30", "--log-level", "DEBUG"]) == 0
        assert url in capsys.readouterr().out
        with droplet.DropletConnection(url, token="s3cret", timeout=20) as cloud:
            assert cloud.register(lambda _, x: x + 1, "inc")(1).get() == 2
        with pytest.raises(droplet.AuthenticationError):  # --token reached the node
            droplet.DropletConnection(url, token="wrong", timeout=20)
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        for flag, value in [(b"--threads", b"3"), (b"--placement", b"spread"),
                            (b"--result-ttl", b"30.0"), (b"--log-level", b"DEBUG")]:
            assert cmdline[cmdline.index(flag) + 1] == value
        assert b"s3cret" not in b" ".join(cmdline)  # the token travels in the environment
        # a second node on the same address fails, and says why on the terminal
        # (in memory: the same address would otherwise mean the same, locked, data dir)
        other = tmp_path / "other"
        assert cli_main(["start-local", "--listen", url, "--executors", "1",
                         "--data-dir", ":memory:",
                         "--pid-file", str(other / "node.pid"),
                         "--log-file", str(other / "node.log")]) == 1
        err = capsys.readouterr().err
        assert "already in use" in err and url in err
    finally:
        if pid_file.exists():
            cli_main(["stop-local"])
            if pid_file.exists():  # pragma: no cover - stop failed: leave nothing running
                os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)


async def test_a_bare_tcp_probe_is_not_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def unreachable(*_: object) -> None:
        raise AssertionError("no message may reach a service")

    caplog.set_level(logging.DEBUG, logger="droplet.rpc")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve_peers, "tcp://127.0.0.1:0", unreachable))
            port = int(url.rsplit(":", 1)[1])
            for _ in range(3):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.aclose()  # connect and close, without a byte
            while caplog.text.count("before the handshake") < 3:  # noqa: ASYNC110 (log)
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
