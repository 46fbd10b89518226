"""What a user sees when their function fails: their own lines, and hints."""

from __future__ import annotations

import linecache
from collections.abc import Iterator
from typing import Any

import pytest

import droplet


@pytest.fixture(scope="module")
def cloud() -> Iterator[droplet.DropletConnection]:
    with droplet.LocalCluster(executors=1) as local:
        yield local.connect()


SCRIPT = "/nonexistent/droplet-test/user_script.py"
SOURCE = '''\
# a user's script, defined where the executor cannot read it


def parse(lib, text):
    value = int(text)  # the line the user wants to see
    return value
'''


def _function_from_elsewhere() -> Any:
    """A function pickled by value whose file the executor cannot read, like a notebook's."""
    lines = SOURCE.splitlines(keepends=True)
    linecache.cache[SCRIPT] = (len(SOURCE), None, lines, SCRIPT)  # as IPython does
    namespace: dict[str, Any] = {"__name__": "droplet_test_not_importable"}
    exec(compile(SOURCE, SCRIPT, "exec"), namespace)
    return namespace["parse"]


def test_traceback_shows_the_users_source_lines(cloud: droplet.DropletConnection) -> None:
    parse = cloud.register(_function_from_elsewhere(), "parse_elsewhere")
    del linecache.cache[SCRIPT]  # the executor has only what the registration shipped
    with pytest.raises(droplet.FunctionError) as info:
        parse("forty-two").get()
    tb = info.value.remote_traceback
    assert f'File "{SCRIPT}", line 5, in parse' in tb
    assert "value = int(text)  # the line the user wants to see" in tb
    assert "<dynamic-code>" not in tb
    assert "droplet/executor" not in tb  # no frames of the executor's own


def test_no_internal_chained_exception(cloud: droplet.DropletConnection) -> None:
    def bad_send(lib: Any) -> None:
        lib.send("nobody", b"hello")  # fails in the event loop, after the hop

    with pytest.raises(droplet.FunctionError) as info:
        cloud.register(bad_send, "bad_send")().get()
    text = str(info.value)
    assert "'nobody' is not an invocation id" in text
    assert "async context" not in text
    assert "During handling" not in text
    assert "trio/_threads.py" not in text


@pytest.mark.parametrize("function", [lambda x: x, lambda: 1],
                         ids=["one-parameter", "no-parameter"])
def test_missing_user_library_parameter_gets_a_hint(
        cloud: droplet.DropletConnection, function: Any) -> None:
    with pytest.raises(droplet.FunctionError) as info:
        cloud.register(function, "no_lib")(5).get()
    assert "user library as their first argument" in info.value.remote_message
    assert "user library" in str(info.value).splitlines()[0]


def test_a_type_error_inside_the_function_gets_no_hint(
        cloud: droplet.DropletConnection) -> None:
    def inner_error(lib: Any) -> Any:
        return (lambda: 1)(2)  # type: ignore[call-arg]

    with pytest.raises(droplet.FunctionError) as info:
        cloud.register(inner_error, "inner_error")().get()
    assert "takes 0 positional arguments" in info.value.remote_message
    assert "user library" not in str(info.value)


class NoLibrary:
    def __init__(self, lib: Any) -> None:
        pass

    def run(self, x: int) -> int:  # forgot the user library
        return x


def test_a_class_whose_run_misses_the_user_library_gets_a_hint(
        cloud: droplet.DropletConnection) -> None:
    with pytest.raises(droplet.FunctionError) as info:
        cloud.register((NoLibrary, ()), "no_lib_class")(5).get()
    assert "user library as their first argument" in info.value.remote_message


def test_odd_shipped_source_is_ignored() -> None:
    """A registration's source is a hint: anything odd in it is skipped, never an error."""
    from droplet.registration import Registration, SourceSpan, install

    def f(lib: Any) -> int:
        return 1

    for span in [SourceSpan("/nonexistent/x.py", 10**9, ["x = 1\n"]),
                 SourceSpan("/nonexistent/x.py", 1, [b"bytes"]),  # type: ignore[list-item]
                 SourceSpan(7, 1, ["x\n"]),  # type: ignore[arg-type]
                 "not a span"]:
        assert install(Registration(f, span)) is f  # type: ignore[arg-type]
    assert "/nonexistent/x.py" not in linecache.cache
