"""Issue 2 end to end against real ``python -m droplet.node`` processes over TCP.

One all-in-one node (storage, scheduler, two executor worker processes) is
shared by most tests (module scope); tests keep their function and DAG names
apart. User functions are defined inside the tests, so they pickle by value,
as a script's functions do: the node's processes cannot import this module.

These are socket tests: instead of a MockClock, every connection has a
``timeout`` (each request and each ``get()`` is bounded by it), and
``faulthandler_timeout`` turns a hang into a stack dump.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import droplet
from droplet import DropletConnection, DropletReference
from droplet.node._main import build_parser
from droplet.node._main import main as node_main
from droplet.testing.nodes import NodeProcess, free_port, run_node_command, start_node

pytestmark = pytest.mark.slow

TIMEOUT = 20.0  # seconds: bounds every request and result wait of a test


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    log = tmp_path_factory.mktemp("node") / "node.log"
    with start_node("--executors", "2", log_path=log) as running:
        yield running
        # Everything the module did left no traceback in the node's log.
        assert "Traceback" not in running.log_text(), running.log_text()
    assert running.proc.returncode == 0, running.log_text()


@pytest.fixture(scope="module")
def cloud(node: NodeProcess) -> Iterator[DropletConnection]:
    with DropletConnection(node.url, "127.0.0.1", local=True, timeout=TIMEOUT) as conn:
        yield conn


# --------------------------------------------------------------------------- the issue


def test_issue_example(node: NodeProcess) -> None:
    port = int(node.url.rsplit(":", 1)[1])
    cloud = DropletConnection(f"tcp://127.0.0.1:{port}", "127.0.0.1", local=True)
    try:
        square = cloud.register(lambda _, x: x * x, "square")
        assert square(2).get() == 4
        assert cloud.register_dag("dag", ["square"], []) == (True, None)
        assert cloud.call_dag("dag", {"square": 2}).get() == 4
    finally:
        cloud.close()


def test_two_function_dag(cloud: DropletConnection) -> None:
    cloud.register(lambda _, x: x + 1, "d2_incr")
    cloud.register(lambda _, x: x * x, "d2_square")
    assert cloud.register_dag("d2", ["d2_incr", "d2_square"], [("d2_incr", "d2_square")])
    assert cloud.call_dag("d2", {"d2_incr": 1}).get() == 4
    assert cloud.call_dag("d2", {"d2_incr": 2}, direct_response=True) == 9


def test_ten_function_chain(cloud: DropletConnection) -> None:
    names = [f"chain_{i}" for i in range(10)]
    for i, name in enumerate(names):
        cloud.register(lambda _, acc, i=i: [*acc, i], name)
    assert cloud.register_dag("chain10", names, list(zip(names, names[1:], strict=False)))
    assert cloud.call_dag("chain10", {"chain_0": [[]]}).get() == list(range(10))


def test_fan_out_and_fan_in(cloud: DropletConnection) -> None:
    def tag(name: str) -> Any:
        return lambda _, *args: (name, *args)

    cloud.register(lambda _, x: x + 1, "fo_src")
    cloud.register(tag("a"), "fo_a")
    cloud.register(tag("b"), "fo_b")
    cloud.register(lambda _, *args: args, "fo_sink")
    cloud.register_dag(
        "fanout", ["fo_src", "fo_a", "fo_b", "fo_sink"],
        [("fo_src", "fo_a"), ("fo_src", "fo_b"), ("fo_b", "fo_sink"), ("fo_a", "fo_sink")])
    # the sink's own arguments first, then upstream results in connections order;
    # each upstream tuple becomes two arguments
    assert cloud.call_dag("fanout", {"fo_src": 1, "fo_sink": "own"}).get() == (
        "own", "b", 2, "a", 2)


def test_many_dag_runs_in_flight(cloud: DropletConnection) -> None:
    cloud.register(lambda _, x: ("l", x), "par_left")
    cloud.register(lambda _, x: ("r", x), "par_right")
    cloud.register(lambda _, *args: args, "par_join")
    cloud.register_dag("par", ["par_left", "par_right", "par_join"],
                       [("par_left", "par_join"), ("par_right", "par_join")])
    futures = [cloud.call_dag("par", {"par_left": i, "par_right": -i}) for i in range(40)]
    assert [f.get() for f in futures] == [("l", i, "r", -i) for i in range(40)]


def test_references_and_kvs(cloud: DropletConnection) -> None:
    cloud.put_object("ref_numbers", [1, 2, 3])
    cloud.put_object("ref_offset", 10)
    total = cloud.register(lambda _, xs: sum(xs), "ref_total")
    assert total(DropletReference("ref_numbers")).get() == 6
    cloud.register(lambda _, x, y: x + y, "ref_add")
    cloud.register_dag("refdag", ["ref_total", "ref_add"], [("ref_total", "ref_add")])
    future = cloud.call_dag(
        "refdag", {"ref_total": DropletReference("ref_numbers"),
                   "ref_add": DropletReference("ref_offset")}, output_key="ref_out")
    assert future.get() == 16
    assert cloud.get_object("ref_out") == 16
    assert cloud.get_object(future.obj_id) == 16
    assert cloud.get_object("ref_missing") is None
    cloud.put_object("ref_numbers", [5])
    assert total(DropletReference("ref_numbers")).get() == 5  # caches are kept fresh


def test_user_library_in_sync_and_async_functions(cloud: DropletConnection) -> None:
    def sync_fn(lib: Any, key: str, value: Any) -> Any:
        lib.put(key, value)
        return lib.get(key)

    async def async_fn(lib: Any, key: str) -> Any:
        value = await lib.aget(key)
        await lib.aput(key + "_copy", value)
        return value

    cloud.register(sync_fn, "lib_sync")
    cloud.register(async_fn, "lib_async")
    assert cloud.exec_func("lib_sync", ["lib_k", {"x": 1}]).get() == {"x": 1}
    assert cloud.exec_func("lib_async", ["lib_k"]).get() == {"x": 1}
    assert cloud.get_object("lib_k_copy") == {"x": 1}


def test_send_and_recv_across_processes(cloud: DropletConnection) -> None:
    def receiver(lib: Any, key: str) -> Any:
        import time

        lib.put(key, lib.getid())
        for _ in range(2000):
            messages = lib.recv()
            if messages:
                return messages
            time.sleep(0.005)
        raise AssertionError("no message arrived")

    def sender(lib: Any, key: str) -> Any:
        import time

        for _ in range(2000):
            dest = lib.get(key)
            if dest is not None:
                lib.send(dest, b"ping")
                return lib.getid()
            time.sleep(0.005)
        raise AssertionError("the receiver never published its id")

    cloud.register(receiver, "msg_receiver")
    cloud.register(sender, "msg_sender")
    cloud.register(lambda _, *args: args, "msg_meet")
    cloud.register_dag("msg", ["msg_receiver", "msg_sender", "msg_meet"],
                       [("msg_receiver", "msg_meet"), ("msg_sender", "msg_meet")])
    for run in range(3):
        key = f"msg_rendezvous_{run}"
        messages, sender_id = cloud.call_dag(
            "msg", {"msg_receiver": key, "msg_sender": key}).get()
        assert messages == [(sender_id, b"ping")]


def test_classes(cloud: DropletConnection) -> None:
    class Counter:
        def __init__(self, lib: Any, start: int) -> None:
            self.count = start

        def run(self, lib: Any, step: int) -> tuple[int, int]:
            import os

            self.count += step
            return os.getpid(), self.count

    counter = cloud.register((Counter, (100,)), "cls_counter")
    results = [counter(1).get() for _ in range(12)]
    by_process: dict[int, list[int]] = {}
    for pid, count in results:
        by_process.setdefault(pid, []).append(count)
    assert 1 <= len(by_process) <= 2
    for counts in by_process.values():  # one instance per executor, state kept
        assert counts == list(range(101, 101 + len(counts)))


def test_errors(cloud: DropletConnection) -> None:
    class Oops(Exception):
        pass

    def fails(_: Any, x: Any) -> None:
        raise Oops(f"bad value {x!r}")

    raising_line = fails.__code__.co_firstlineno + 1
    fn = cloud.register(fails, "err_fails")
    with pytest.raises(droplet.FunctionError) as info:
        fn(3).get()
    err = info.value
    assert "Oops" in str(err) and "bad value 3" in str(err)
    assert err.function == "err_fails"
    assert f"line {raising_line}, in fails" in err.remote_traceback
    assert type(err.__cause__).__name__ == "Oops"
    assert err.__cause__ is not None
    assert err.__cause__.args == ("bad value 3",)

    with pytest.raises(droplet.FunctionError, match=r"ValueError.*invalid literal"):
        cloud.register(lambda _, s: int(s), "err_int")("x").get()

    # an error in the first function of a DAG reaches the caller
    cloud.register(lambda _, x: x, "err_next")
    cloud.register_dag("errdag", ["err_fails", "err_next"], [("err_fails", "err_next")])
    with pytest.raises(droplet.FunctionError, match=r"bad value 'first'"):
        cloud.call_dag("errdag", {"err_fails": "first"}).get()
    with pytest.raises(droplet.FunctionError, match=r"bad value 'direct'"):
        cloud.call_dag("errdag", {"err_fails": "direct"}, direct_response=True)

    with pytest.raises(droplet.RegistrationError, match=r"'err_nope'"):
        cloud.exec_func("err_nope", [])
    with pytest.raises(droplet.DagError, match=r"'err_nodag'"):
        cloud.call_dag("err_nodag", {})
    with pytest.raises(droplet.DagError, match=r"cycle"):
        cloud.register_dag("err_cycle", ["err_fails", "err_next"],
                           [("err_fails", "err_next"), ("err_next", "err_fails")])
    assert cloud.get_function("err_nope") is None

    # the executors keep serving
    assert cloud.register(lambda _, x: x * 2, "err_after")(21).get() == 42


def test_list_get_function_delete_and_replace(cloud: DropletConnection) -> None:
    for name in ["adm_b", "adm_a", "adm_c"]:
        cloud.register(lambda _: 1, name)
    assert cloud.list("adm_") == ["adm_a", "adm_b", "adm_c"]
    everything = cloud.list()
    assert everything == sorted(everything)
    assert cloud.get_function("adm_a") is not None
    cloud.register_dag("adm_dag", ["adm_a"], [])
    assert cloud.delete_dag("adm_dag") == (True, None)
    with pytest.raises(droplet.DagError):
        cloud.delete_dag("adm_dag")
    cloud.register(lambda _: 2, "adm_a")
    assert [cloud.exec_func("adm_a").get() for _ in range(4)] == [2, 2, 2, 2]


def test_200_concurrent_callers_from_threads(cloud: DropletConnection) -> None:
    square = cloud.register(lambda _, x: x * x, "thr_square")
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(200)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = square(i).get()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == {i: i * i for i in range(200)}


def test_wrong_token_and_nothing_listening(node: NodeProcess) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(droplet.ConnectionError) as info:
        DropletConnection(url, timeout=TIMEOUT)
    assert url in str(info.value) and "python -m droplet.node" in str(info.value)


# --------------------------------------------------------------------------- a real cluster


def test_multi_process_cluster(tmp_path: Path) -> None:
    token = "cluster-s3cret"
    with start_node(role="kvs", log_path=tmp_path / "kvs.log", token=token) as kvs, \
            start_node("--kvs", kvs.url, "--placement", "spread", role="scheduler",
                       log_path=tmp_path / "scheduler.log", token=token) as scheduler, \
            start_node("--scheduler", scheduler.url, role="executor", listen=None,
                       log_path=tmp_path / "executor1.log", token=token) as ex1, \
            start_node("--scheduler", scheduler.url, role="executor", listen=None,
                       log_path=tmp_path / "executor2.log", token=token) as ex2:
        for ex in (ex1, ex2):
            scheduler.wait_for_log(rf"executor {re.escape(ex.url)} joined")
        with pytest.raises(droplet.AuthenticationError):
            DropletConnection(scheduler.url, timeout=TIMEOUT)
        with DropletConnection(scheduler.url, token=token, timeout=TIMEOUT) as cloud:
            def pid(_: Any) -> int:
                import os

                return os.getpid()

            cloud.register(pid, "pid_a")
            cloud.register(pid, "pid_b")
            cloud.register(lambda _, *pids: sorted(pids), "pids")
            cloud.register_dag("where", ["pid_a", "pid_b", "pids"],
                               [("pid_a", "pids"), ("pid_b", "pids")])
            # spread placement puts the two sources on the two executors
            assert cloud.call_dag("where", {}).get() == sorted([ex1.pid, ex2.pid])
            cloud.put_object("shared", "in the kvs process")
            assert cloud.exec_func("pid_a").get() in (ex1.pid, ex2.pid)
            reader = cloud.register(lambda lib: lib.get("shared"), "reader")
            assert reader().get() == "in the kvs process"

            ex2.kill()
            scheduler.wait_for_log(rf"executor {re.escape(ex2.url)} (disconnected|disappeared)")
            for _ in range(5):
                assert cloud.call_dag("where", {}).get() == [ex1.pid, ex1.pid]
                assert reader().get() == "in the kvs process"
        for proc in (ex1, scheduler, kvs):
            assert proc.stop() == 0, proc.log_text()
            assert "Traceback" not in proc.log_text(), proc.log_text()


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_node_cleanly(tmp_path: Path, signum: int) -> None:
    with start_node("--executors", "1", log_path=tmp_path / "node.log") as node:
        with DropletConnection(node.url, timeout=TIMEOUT) as cloud:
            assert cloud.register(lambda _, x: -x, "neg")(1).get() == -1
        assert node.stop(signum) == 0
        log = node.log_text()
        assert "Traceback" not in log, log
        assert "shutting down" in log
        assert not node.running()


def test_start_local_and_stop_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from droplet.cli import main as cli_main

    monkeypatch.setenv("DROPLET_HOME", str(tmp_path))
    monkeypatch.delenv("DROPLET_TOKEN", raising=False)
    url = f"tcp://127.0.0.1:{free_port()}"
    pid_file = tmp_path / "node.pid"
    try:
        assert cli_main(["start-local", "--listen", url, "--executors", "1"]) == 0
        assert url in capsys.readouterr().out
        assert pid_file.exists() and (tmp_path / "node.log").exists()
        pid = int(pid_file.read_text().split()[0])
        with DropletConnection(url, "127.0.0.1", local=True, timeout=TIMEOUT) as cloud:
            assert cloud.register(lambda _, x: x * x, "square")(5).get() == 25
        # a second start refuses, naming the running node
        assert cli_main(["start-local", "--listen", url]) == 1
        assert str(pid) in capsys.readouterr().err
        assert cli_main(["stop-local"]) == 0
        assert not pid_file.exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert cli_main(["stop-local"]) == 1
        assert "no Droplet node is running" in capsys.readouterr().err
        assert "Traceback" not in (tmp_path / "node.log").read_text()
    finally:
        if pid_file.exists():  # the test failed midway: leave nothing running
            try:
                os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_help_documents_every_flag() -> None:
    result = run_node_command(["--help"])
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for flag in ["--role", "--listen", "--scheduler", "--kvs", "--executors", "--token",
                 "--config"]:
        assert flag in text, flag
    for role in ["all", "kvs", "scheduler", "executor"]:
        assert role in text
    assert "DROPLET_TOKEN" in text
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in text, option
        assert action.help, f"{action.option_strings} has no help text"


def test_bad_config_exits_2_naming_the_key(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "droplet.toml"
    config.write_text('executors = 1\nbogus_setting = "x"\n')
    result = run_node_command(["--config", str(config)])
    assert result.returncode == 2
    assert "bogus_setting" in result.stderr
    assert "Traceback" not in result.stderr
    # the same in-process
    assert node_main(["--config", str(config)]) == 2
    assert "bogus_setting" in capsys.readouterr().err


def test_bad_flag_values_exit_2(tmp_path: Path) -> None:
    result = run_node_command(["--role", "nonsense"])
    assert result.returncode == 2
    assert "nonsense" in result.stderr
    result = run_node_command(["--listen", "udp://127.0.0.1:1"])
    assert result.returncode == 2
    assert "udp" in result.stderr and "Traceback" not in result.stderr
