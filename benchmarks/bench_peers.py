"""The same benchmark rows on Droplet's peers: Ray tasks and Dask distributed.

Each peer implements the rows of ``bench_cases.py`` that have a natural
equivalent, in the peer's idiomatic form:

| row | Ray | Dask distributed |
|---|---|---|
| noop | ``ray.get(noop.remote(1))`` | ``client.submit(noop, 1, pure=False).result()`` |
| dag2 | ``ray.get(inc.remote(square.remote(3)))`` | the same with futures as arguments |
| chain10 | 10 chained ``inc.remote`` | 10 chained ``submit`` |
| fanin3 | ``add3.remote(noop.remote(1), noop.remote(2), noop.remote(3))`` | likewise |
| bigarg10/50 | ``length.remote(noop.remote(data))`` | likewise (``data`` scattered per call) |
| ref*-warm | ``length.remote(ref)`` (``ref = ray.put(data)``) | ``submit(length, scattered)`` |
| throughput-sync | N ``noop.remote(i)``, ``ray.get`` each | N ``submit``, ``result()`` each |

Peers run with as many worker processes as Droplet's executors (``--executors``)
on this machine; only loopback is used (Ray's and Dask's local clusters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench_cases import MIB, REF_SIZES, Measured, issue_then_get

__all__ = ["PEERS", "Peer"]


def _identity(x: Any) -> Any:
    return x


def _square(x: Any) -> Any:
    return x * x


def _increment(x: Any) -> Any:
    return x + 1


def _add3(a: Any, b: Any, c: Any) -> Any:
    return a + b + c


def _length(data: Any) -> Any:
    return len(data)


class Peer:
    """A peer system: started once, then each row's call built by ``call(row)``."""

    name = "?"

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def version(self) -> str:
        raise NotImplementedError

    def call(self, row: str) -> Callable[[], Any] | None:
        """The zero-argument call for a latency row, or None if the peer has no such row."""
        raise NotImplementedError

    def throughput(self, n: int, warmup: int) -> Measured:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RayPeer(Peer):
    name = "ray"

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        import ray

        self._ray = ray
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=False)
        remote = ray.remote
        self._noop = remote(_identity)
        self._square = remote(_square)
        self._inc = remote(_increment)
        self._add3 = remote(_add3)
        self._len = remote(_length)

    def version(self) -> str:
        return f"ray {self._ray.__version__}"

    def call(self, row: str) -> Callable[[], Any] | None:
        ray, noop, inc = self._ray, self._noop, self._inc
        if row == "noop":
            return lambda: ray.get(noop.remote(1))
        if row == "dag2":
            return lambda: ray.get(inc.remote(self._square.remote(3)))
        if row == "chain10":
            def chain() -> Any:
                ref = inc.remote(0)
                for _ in range(9):
                    ref = inc.remote(ref)
                return ray.get(ref)
            return chain
        if row == "fanin3":
            return lambda: ray.get(self._add3.remote(noop.remote(1), noop.remote(2),
                                                     noop.remote(3)))
        if row.startswith("bigarg"):
            data = b"x" * (int(row[len("bigarg"):]) * MIB)
            return lambda: ray.get(self._len.remote(noop.remote(data)))
        if row.startswith("ref") and row.endswith("-warm"):
            # The object lives in Ray's shared-memory store; each task gets it by reference.
            stored = ray.put(b"r" * REF_SIZES[row[len("ref"):-len("-warm")]])
            return lambda: ray.get(self._len.remote(stored))
        return None

    def throughput(self, n: int, warmup: int) -> Measured:
        for _ in range(warmup):
            self._ray.get(self._noop.remote(1))
        return issue_then_get(n, lambda k: [self._noop.remote(i) for i in range(k)],
                              self._ray.get)

    def close(self) -> None:
        self._ray.shutdown()


class DaskPeer(Peer):
    name = "dask"

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        import distributed

        self._distributed = distributed
        self._cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True,
            dashboard_address=None, host="127.0.0.1")
        self._client = distributed.Client(self._cluster)

    def version(self) -> str:
        return f"dask distributed {self._distributed.__version__}"

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        # pure=False: Dask would otherwise answer a repeated call from its cache.
        return self._client.submit(fn, *args, pure=False)

    def call(self, row: str) -> Callable[[], Any] | None:
        s = self._submit
        if row == "noop":
            return lambda: s(_identity, 1).result()
        if row == "dag2":
            return lambda: s(_increment, s(_square, 3)).result()
        if row == "chain10":
            def chain() -> Any:
                fut = s(_increment, 0)
                for _ in range(9):
                    fut = s(_increment, fut)
                return fut.result()
            return chain
        if row == "fanin3":
            return lambda: s(_add3, s(_identity, 1), s(_identity, 2), s(_identity, 3)).result()
        if row.startswith("bigarg"):
            data = b"x" * (int(row[len("bigarg"):]) * MIB)
            return lambda: s(_length, s(_identity, data)).result()
        if row.startswith("ref") and row.endswith("-warm"):
            stored = self._client.scatter(b"r" * REF_SIZES[row[len("ref"):-len("-warm")]],
                                          broadcast=True)
            return lambda: s(_length, stored).result()
        return None

    def throughput(self, n: int, warmup: int) -> Measured:
        for _ in range(warmup):
            self._submit(_identity, 1).result()
        return issue_then_get(n, lambda k: [self._submit(_identity, i) for i in range(k)],
                              lambda f: f.result())

    def close(self) -> None:
        self._client.close()
        self._cluster.close()


PEERS: dict[str, type[Peer]] = {"ray": RayPeer, "dask": DaskPeer}
