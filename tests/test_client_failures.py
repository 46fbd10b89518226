"""What the client says when things go wrong behind it: crashed loops, node errors."""

from __future__ import annotations

import functools
import threading
from typing import Any

import pytest
import trio

import droplet
from droplet.protocol.messages import ErrorReply
from droplet.rpc import error_from_reply


class Boom(RuntimeError):
    pass


async def _crash() -> None:
    raise Boom("a background task failed")


def _crash_cluster(local: droplet.LocalCluster) -> None:
    portal = local._portal
    trio.from_thread.run_sync(portal.nursery.start_soon, _crash, trio_token=portal._token)
    portal._thread.join(20)
    assert not portal._thread.is_alive()


def _caused_by_boom(exc: BaseException) -> bool:
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    return isinstance(cause, Boom)


def test_calls_after_a_background_crash_raise_a_droplet_error() -> None:
    local = droplet.LocalCluster(executors=1)
    cloud = local.connect()
    fn = cloud.register(lambda _, x: x, "ident")
    assert fn(1).get() == 1
    _crash_cluster(local)
    with pytest.raises(droplet.ConnectionError, match="Boom") as info:
        fn(2)
    assert not isinstance(info.value, trio.RunFinishedError)
    assert _caused_by_boom(info.value)
    with pytest.raises(droplet.ConnectionError, match="crashed") as info:
        local.__exit__(None, None, None)
    assert _caused_by_boom(info.value)
    local.close()  # idempotent, and quiet the second time


def test_a_future_waiting_when_the_loop_crashes_raises_promptly() -> None:
    local = droplet.LocalCluster(executors=1)

    async def forever(_: Any) -> None:
        await trio.sleep_forever()

    future = local.connect().register(forever, "forever")()
    outcome: dict[str, Any] = {}

    def wait() -> None:
        try:
            future.get(timeout=600)
        except BaseException as exc:
            outcome["error"] = exc

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    _crash_cluster(local)
    waiter.join(20)
    assert not waiter.is_alive()
    assert isinstance(outcome["error"], droplet.ConnectionError)
    with pytest.raises(droplet.ConnectionError):
        local.close()


def test_error_from_reply_keeps_the_remote_traceback() -> None:
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1\nKeyError: 1\n'
    error = error_from_reply(ErrorReply("DropletError", "internal error: KeyError: 1", trace),
                             "tcp://127.0.0.1:5000")
    assert type(error) is droplet.DropletError
    assert error.remote_traceback == trace
    assert 'File "x.py", line 1' in str(error)
    assert "tcp://127.0.0.1:5000" in str(error)
    plain = error_from_reply(ErrorReply("DagError", "no DAG named 'x'"), "inproc://n")
    assert isinstance(plain, droplet.DagError)
    assert str(plain) == "no DAG named 'x'" and plain.remote_traceback == ""


def test_portal_future_waits_one_timeout_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the store's own wait runs out first, get() waits only what is left of its timeout."""
    from droplet.client.aio import AsyncDropletFuture

    asked: list[float | None] = []
    original = AsyncDropletFuture.get

    async def recording_get(self: AsyncDropletFuture, timeout: float | None = None) -> Any:
        asked.append(timeout)
        return await original(self, timeout)

    monkeypatch.setattr(AsyncDropletFuture, "get", recording_get)

    async def forever(_: Any) -> None:
        await trio.sleep_forever()

    with droplet.LocalCluster(executors=1) as local:
        cloud = local.connect()
        cloud.register(forever, "forever")
        cloud.register_dag("never", ["forever"], [])
        future = cloud.call_dag("never", {}, timeout=0.1)  # the store waits 0.1 s for it
        with pytest.raises(droplet.TimeoutError):
            future.get(timeout=0.5)
    assert asked and all(t is not None and t < 0.5 for t in asked)


async def test_async_client_to_another_service_is_a_connection_error() -> None:
    """A port whose service talks first, and not Droplet (an SSH banner)."""
    async def banner(stream: trio.SocketStream) -> None:
        await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n" + b"x" * 64)
        await stream.receive_some()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(
                functools.partial(trio.serve_tcp, banner, 0, host="127.0.0.1"))
            url = f"tcp://127.0.0.1:{listener.socket.getsockname()[1]}"
            with pytest.raises(droplet.ConnectionError) as info:
                async with droplet.open_client(url, timeout=5):
                    pass  # pragma: no cover
            nursery.cancel_scope.cancel()
    assert url in str(info.value)
