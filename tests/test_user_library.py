"""The user library's mailbox: recv() in a worker thread while the loop delivers."""

from __future__ import annotations

import pickle
import threading
import time
from typing import Any

from droplet.executor.user_library import UserLibrary


class _Preempted:
    """Wraps a container; every method call pauses first, as if its thread were preempted
    between looking the container up and using it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        def call(*args: Any) -> Any:
            time.sleep(0.002)
            return method(*args)

        return call

    def __len__(self) -> int:
        return len(self._inner)

    def __iter__(self) -> Any:
        return iter(list(self._inner))


def test_no_message_is_lost_between_deliver_and_recv() -> None:
    lib = UserLibrary(None, "me", None)  # type: ignore[arg-type]
    lib._mailbox = _Preempted(lib._mailbox)  # type: ignore[assignment]
    count = 50
    received: list[Any] = []
    delivering = threading.Event()

    def deliver() -> None:
        delivering.set()
        for i in range(count):
            lib.deliver("sender", pickle.dumps(i))

    thread = threading.Thread(target=deliver)
    thread.start()
    delivering.wait(10)
    while thread.is_alive():
        received.extend(list(lib.recv()))  # what recv returned, read at once
    thread.join()
    received.extend(list(lib.recv()))
    assert sorted(data for _, data in received) == list(range(count))
