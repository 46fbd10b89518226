"""Request/reply, error replies, the auth handshake and timeouts (rpc.py), over inproc://.

Timeouts run in virtual time: tests that wait request ``autojump_clock``
(pytest-trio's MockClock(autojump_threshold=0) fixture).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

import droplet
from droplet import errors
from droplet.links import connect_peer, one_request, serve_peers
from droplet.protocol.messages import (
    BoolReply,
    FunctionExists,
    Hello,
    KvsGet,
    ListFunctions,
    Names,
    Ok,
)
from droplet.protocol.messages import encode as encode_message
from droplet.rpc import DEFERRED, Limits, Peer
from droplet.transports import TransportOptions, get_transport

_names = itertools.count(1)
Handler = Callable[[Peer, Any, int], Awaitable[Any]]


def fresh_url() -> str:
    return f"inproc://test-rpc-{next(_names)}"


@asynccontextmanager
async def serving(handler: Handler, *, token: str | None = None,
                  limits: Limits | None = None) -> AsyncIterator[str]:
    """Serve ``handler`` at a fresh inproc:// address; stopped on exit."""
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_peers, fresh_url(), handler, token=token,
                                          limits=limits))
        yield url
        nursery.cancel_scope.cancel()


async def echo(peer: Peer, msg: Any, request_id: int) -> Any:
    """Names([...]) for ListFunctions(prefix); BoolReply for FunctionExists; else None."""
    if isinstance(msg, ListFunctions):
        return Names([msg.prefix or "", "echo"])
    if isinstance(msg, FunctionExists):
        return BoolReply(msg.name == "yes")
    return None


# --------------------------------------------------------------------------- basics


async def test_request_reply() -> None:
    async with serving(echo) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        assert await peer.request(ListFunctions("p")) == Names(["p", "echo"])
        assert await peer.request(FunctionExists("yes")) == BoolReply(True)
        assert await peer.request(FunctionExists("no")) == BoolReply(False)
        assert await peer.request(Hello("client", "x")) == Ok()  # None answers Ok
        await peer.aclose()


async def test_submit_pipelines_requests_and_slots_report_late_watchers() -> None:
    """submit() sends several requests in one write; a watcher added after the
    reply landed (submit yields after sending) is still told (regression: a
    future's result was lost that way)."""
    async with serving(echo) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        first, second = await peer.submit(ListFunctions("a"), FunctionExists("b"))
        with trio.fail_after(5):
            await first.event.wait()
            await second.event.wait()
        seen: list[Any] = []
        second.when_done(lambda: seen.append(second.result()))
        assert seen == [BoolReply(False)]
        assert await peer.wait(first, 5, "ListFunctions") == Names(["a", "echo"])
        await peer.aclose()


async def test_concurrent_requests_on_one_connection_get_their_own_replies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow_echo(peer: Peer, msg: Any, request_id: int) -> Any:
        # Answer in reverse order of arrival, to prove replies match by request id.
        async def later() -> None:
            await trio.sleep(1000 - int(msg.prefix))
            await peer.reply(request_id, Names([msg.prefix]))

        nursery.start_soon(later)
        return DEFERRED

    results: dict[int, Any] = {}
    async with trio.open_nursery() as nursery:
        async with serving(slow_echo) as url, trio.open_nursery() as clients:
            peer = await connect_peer(url, clients)

            async def call(i: int) -> None:
                results[i] = await peer.request(ListFunctions(str(i)))

            async with trio.open_nursery() as callers:
                for i in range(20):
                    callers.start_soon(call, i)
            await peer.aclose()
        nursery.cancel_scope.cancel()
    assert results == {i: Names([str(i)]) for i in range(20)}


async def test_one_request() -> None:
    async with serving(echo) as url:
        assert await one_request(url, ListFunctions("q")) == Names(["q", "echo"])


async def test_one_way_message_reaches_the_handler() -> None:
    got: list[Any] = []
    seen = trio.Event()

    async def record(peer: Peer, msg: Any, request_id: int) -> Any:
        got.append((msg, request_id))
        seen.set()

    async with serving(record) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        await peer.send(KvsGet("k"))
        await seen.wait()
        await peer.aclose()
    assert got == [(KvsGet("k"), 0)]


# --------------------------------------------------------------------------- errors

REMOTE_ERRORS = [
    errors.DropletError, errors.ConnectionError, errors.AuthenticationError,
    errors.RegistrationError, errors.DagError, errors.TimeoutError, errors.ProtocolError,
    errors.LatticeTypeError,
]


@pytest.mark.parametrize("cls", REMOTE_ERRORS, ids=lambda c: c.__name__)
async def test_droplet_error_in_handler_is_raised_at_the_caller(cls: type[Exception]) -> None:
    async def fail(peer: Peer, msg: Any, request_id: int) -> Any:
        raise cls(f"refused {msg.prefix}")

    async with serving(fail) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        with pytest.raises(cls) as info:
            await peer.request(ListFunctions("p1"))
        assert type(info.value) is cls
        assert str(info.value) == "refused p1"
        # the connection keeps serving
        with pytest.raises(cls, match="refused p2"):
            await peer.request(ListFunctions("p2"))
        await peer.aclose()


async def test_unexpected_exception_becomes_droplet_error_and_connection_keeps_serving(
) -> None:
    async def buggy(peer: Peer, msg: Any, request_id: int) -> Any:
        if msg.prefix == "crash":
            raise RuntimeError("handler bug")
        if msg.prefix == "bad":
            raise ValueError("no such thing")
        return Names(["fine"])

    async with serving(buggy) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        with pytest.raises(droplet.DropletError) as info:
            await peer.request(ListFunctions("crash"))
        assert type(info.value) is droplet.DropletError
        assert "RuntimeError" in str(info.value) and "handler bug" in str(info.value)
        with pytest.raises(droplet.DropletError, match=r"bad request: no such thing"):
            await peer.request(ListFunctions("bad"))
        assert await peer.request(ListFunctions("ok")) == Names(["fine"])
        await peer.aclose()


async def test_deferred_reply_error() -> None:
    async def later(peer: Peer, msg: Any, request_id: int) -> Any:
        await peer.reply_error(request_id, droplet.DagError("later, no"))
        return DEFERRED

    async with serving(later) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        with pytest.raises(droplet.DagError, match="later, no"):
            await peer.request(ListFunctions())
        await peer.aclose()


async def test_a_posted_reply_over_the_frame_limit_becomes_an_error_reply() -> None:
    """A deferred answer sent through the outbox that is too large reaches the caller
    as an error naming the reason, instead of leaving it waiting for its timeout."""
    from droplet.transports import TransportOptions

    async def later(peer: Peer, msg: Any, request_id: int) -> Any:
        peer.post_reply(request_id, Names(["x" * 10_000]))
        return DEFERRED

    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_peers, fresh_url(), later,
                                          options=TransportOptions(max_frame_size=4096)))
        peer = await connect_peer(url, nursery)
        with trio.fail_after(10), pytest.raises(droplet.DropletError, match="too large"):
            await peer.request(ListFunctions())
        await peer.aclose()
        nursery.cancel_scope.cancel()


async def test_request_to_endpoint_without_handler_is_refused() -> None:
    """A server that asks the client something the client does not serve gets an error."""
    outcome: list[BaseException] = []
    done = trio.Event()

    async def ask_back(peer: Peer, msg: Any, request_id: int) -> Any:
        async def ask() -> None:
            try:
                await peer.request(ListFunctions())
            except BaseException as exc:
                outcome.append(exc)
            done.set()

        helper.start_soon(ask)

    async with trio.open_nursery() as helper:
        async with serving(ask_back) as url, trio.open_nursery() as nursery:
            peer = await connect_peer(url, nursery)  # no handler
            await peer.send(Hello("client", "x"))
            await done.wait()
            await peer.aclose()
    assert len(outcome) == 1
    assert isinstance(outcome[0], droplet.ProtocolError)
    assert "ListFunctions" in str(outcome[0])


async def test_garbage_frame_closes_only_that_connection() -> None:
    async with serving(echo) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        await peer.conn.send(b"\xfe garbage that is no message")
        # the server hangs up saying why; the request in flight fails with that reason
        with pytest.raises(droplet.ProtocolError, match=r"unknown message type 254"):
            await peer.request(ListFunctions("after garbage"))
        assert peer.closed
        # the server keeps serving new connections
        fresh = await connect_peer(url, nursery)
        assert await fresh.request(ListFunctions("x")) == Names(["x", "echo"])
        await fresh.aclose()


async def test_wrong_field_types_close_the_connection_and_server_keeps_serving() -> None:
    async with serving(echo) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        frame = bytearray(encode_message(ListFunctions("p"), 1))
        # turn the header ["p"] into [5] (same length, wrong type)
        at = bytes(frame).index(b'["p"]')
        frame[at:at + 5] = b"[555]"
        await peer.conn.send(bytes(frame))
        with pytest.raises(droplet.ProtocolError,
                           match=r"ListFunctions.prefix must be str \| None, got int"):
            await peer.request(ListFunctions("next"))
        assert peer.closed
        fresh = await connect_peer(url, nursery)
        assert await fresh.request(ListFunctions("x")) == Names(["x", "echo"])
        await fresh.aclose()


async def test_an_invalid_reply_fails_its_request_at_once_and_the_link_stays() -> None:
    async def odd(peer: Peer, msg: Any, request_id: int) -> Any:
        if isinstance(msg, ListFunctions) and msg.prefix == "odd":
            return KvsGet("k", wait=float("nan"))  # well framed, but no valid message
        return await echo(peer, msg, request_id)

    async with serving(odd) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        with trio.fail_after(5):  # not the request's (absent) timeout: at once
            with pytest.raises(droplet.ProtocolError, match=r"invalid reply: .*NaN"):
                await peer.request(ListFunctions("odd"))
        assert await peer.request(ListFunctions("x")) == Names(["x", "echo"])
        await peer.aclose()


# --------------------------------------------------------------------------- handshake


async def test_token_required_but_client_has_none() -> None:
    async with serving(echo, token="s3cret") as url, trio.open_nursery() as nursery:
        with pytest.raises(droplet.AuthenticationError) as info:
            await connect_peer(url, nursery)
        message = str(info.value)
        assert url in message
        assert "requires the cluster token" in message
        assert "DROPLET_TOKEN" in message
        assert "s3cret" not in message


async def test_wrong_token() -> None:
    async with serving(echo, token="s3cret") as url, trio.open_nursery() as nursery:
        with pytest.raises(droplet.AuthenticationError, match=r"wrong cluster token"):
            await connect_peer(url, nursery, token="guess")


async def test_right_token() -> None:
    async with serving(echo, token="s3cret") as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery, token="s3cret")
        assert await peer.request(ListFunctions("t")) == Names(["t", "echo"])
        await peer.aclose()
        assert await one_request(url, ListFunctions("u"), token="s3cret") == Names(
            ["u", "echo"])
        with pytest.raises(droplet.AuthenticationError):
            await one_request(url, ListFunctions("u"))


async def test_client_with_token_refuses_open_server() -> None:
    """An open server cannot prove it is our cluster: no silent downgrade."""
    async with serving(echo) as url, trio.open_nursery() as nursery:
        with pytest.raises(droplet.AuthenticationError, match="cannot prove"):
            await connect_peer(url, nursery, token="whatever")
        peer = await connect_peer(url, nursery, token="")  # an explicit "no token" works
        assert await peer.request(ListFunctions("o")) == Names(["o", "echo"])
        await peer.aclose()


async def test_refused_client_does_not_stop_the_server() -> None:
    async with serving(echo, token="s3cret") as url, trio.open_nursery() as nursery:
        for bad in (None, "nope"):
            with pytest.raises(droplet.AuthenticationError):
                await connect_peer(url, nursery, token=bad)
        peer = await connect_peer(url, nursery, token="s3cret")
        assert await peer.request(ListFunctions()) == Names(["", "echo"])
        await peer.aclose()


async def test_nothing_listening() -> None:
    async with trio.open_nursery() as nursery:
        url = fresh_url()
        with pytest.raises(droplet.ConnectionError, match=url):
            await connect_peer(url, nursery)


async def test_silent_server_times_out_the_handshake(autojump_clock: trio.testing.MockClock
                                                     ) -> None:
    async def silent(conn: Any) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(get_transport("inproc://").serve, fresh_url(),
                                          silent, TransportOptions()))
        with pytest.raises(droplet.ConnectionError, match=rf"no answer .*{url}.* within 3 s"):
            await connect_peer(url, nursery, timeout=3)
        with pytest.raises(droplet.ConnectionError, match=r"within 2 s"):
            await one_request(url, ListFunctions(), timeout=2)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- timeouts, closes


async def never(peer: Peer, msg: Any, request_id: int) -> Any:
    return DEFERRED


async def test_request_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(never) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        start = trio.current_time()
        with pytest.raises(droplet.TimeoutError) as info:
            await peer.request(ListFunctions(), timeout=5)
        assert trio.current_time() - start == pytest.approx(5)
        assert "ListFunctions" in str(info.value) and "5 s" in str(info.value)
        assert isinstance(info.value, TimeoutError)  # the builtin, too
        await peer.aclose()


async def test_peer_closing_fails_pending_requests() -> None:
    server_side: list[Peer] = []
    arrived = trio.Event()

    async def hold(peer: Peer, msg: Any, request_id: int) -> Any:
        server_side.append(peer)
        arrived.set()
        return DEFERRED

    async with serving(hold) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        failures: list[BaseException] = []

        async def call() -> None:
            try:
                await peer.request(ListFunctions())
            except BaseException as exc:
                failures.append(exc)

        async with trio.open_nursery() as callers:
            for _ in range(3):
                callers.start_soon(call)
            await arrived.wait()
            await trio.testing.wait_all_tasks_blocked()
            await server_side[0].aclose()
        assert len(failures) == 3
        for exc in failures:
            assert isinstance(exc, droplet.ConnectionError)
            assert url in str(exc)
        assert peer.closed
        with pytest.raises(droplet.ConnectionError, match="closed"):
            await peer.request(ListFunctions())


async def test_closing_our_end_fails_our_pending_requests() -> None:
    async with serving(never) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        failures: list[BaseException] = []

        async def call() -> None:
            try:
                await peer.request(ListFunctions())
            except BaseException as exc:
                failures.append(exc)

        async with trio.open_nursery() as callers:
            callers.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            await peer.aclose()
        assert [type(e) for e in failures] == [droplet.ConnectionError]
        await peer.aclose()  # idempotent


async def test_on_close_callbacks_run_once() -> None:
    async with serving(echo) as url, trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        calls: list[Peer] = []
        peer.on_close.append(calls.append)
        await peer.aclose()
        await peer.aclose()
        assert calls == [peer]


async def test_max_inflight_stops_reading_until_a_reply() -> None:
    held: list[tuple[Peer, int, str]] = []

    async def hold(peer: Peer, msg: Any, request_id: int) -> Any:
        held.append((peer, request_id, msg.prefix))
        return DEFERRED

    async with serving(hold, limits=Limits(max_inflight=1)) as url, \
            trio.open_nursery() as nursery:
        peer = await connect_peer(url, nursery)
        results: list[Any] = []

        async def call(prefix: str) -> None:
            results.append(await peer.request(ListFunctions(prefix)))

        async with trio.open_nursery() as callers:
            callers.start_soon(call, "first")
            await trio.testing.wait_all_tasks_blocked()
            callers.start_soon(call, "second")
            await trio.testing.wait_all_tasks_blocked()
            assert [p for _, _, p in held] == ["first"]  # second not read yet
            server_peer, rid, _ = held[0]
            await server_peer.reply(rid, Names(["1"]))
            await trio.testing.wait_all_tasks_blocked()
            assert [p for _, _, p in held] == ["first", "second"]
            server_peer, rid, _ = held[1]
            await server_peer.reply(rid, Names(["2"]))
        assert results == [Names(["1"]), Names(["2"])]
        await peer.aclose()
