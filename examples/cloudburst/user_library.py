"""Cloudburst's user-library tests, run as functions on a real cluster.

Ported from ``tests/server/executor/test_user_library.py``, which drove the
library against a mock KVS and mock ZMQ sockets; here each test is a
function the cluster runs. Upstream's receive test expected the messages in
reverse (an artefact of its mock inbox); Droplet delivers them in order.
"""

from __future__ import annotations

from typing import Any

from _checks import expect


def run(cloudburst_client: Any, num_requests: int) -> list[float]:
    def kvs_io(cloudburst: Any, key: str) -> Any:
        cloudburst.put(key, 2)
        return cloudburst.get(key)

    def send_to_self(cloudburst: Any, msg: Any) -> Any:
        import time

        dest = cloudburst.getid()
        cloudburst.send(dest, msg)
        for _ in range(1000):
            received = cloudburst.recv()
            if received:
                return dest, received
            time.sleep(0.005)
        return dest, []

    def receive(cloudburst: Any, message1: Any, message2: Any) -> Any:
        import time

        me = cloudburst.getid()
        cloudburst.send(me, message1)
        cloudburst.send(me, message2)
        msgs: list[Any] = []
        for _ in range(1000):
            msgs += cloudburst.recv()
            if len(msgs) >= 2:
                break
            time.sleep(0.005)
        return me, msgs

    io = cloudburst_client.register(kvs_io, "ul_kvs_io")
    send = cloudburst_client.register(send_to_self, "ul_send")
    recv = cloudburst_client.register(receive, "ul_receive")

    expect(io("ul-key").get() == 2, "put(key, 2) then get(key) did not give 2")

    dest, received = send("hello!").get()
    expect(len(received) == 1, f"expected one message, got {received!r}")
    sender, message = received[0]
    expect(message == "hello!", f"the message came back as {message!r}")
    expect(sender == dest, f"the sender is {sender!r}, not {dest!r}")

    me, msgs = recv("hello", "goodbye").get()
    expect(len(msgs) == 2, f"expected two messages, got {msgs!r}")
    expect(msgs[0][0] == me and msgs[1][0] == me, "wrong sender ids")
    expect([m for _, m in msgs] == ["hello", "goodbye"], f"messages out of order: {msgs!r}")
    return []
