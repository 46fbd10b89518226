"""Droplet quick start: functions, DAGs and references against a running node.

Start a node first, then run this script::

    python -m droplet.node            # or: droplet start-local
    python examples/quickstart.py     # another terminal

The node's address defaults to ``127.0.0.1`` (that is ``tcp://127.0.0.1:5000``);
pass another as the first argument or in ``DROPLET_ADDRESS``. The script prints
each result and exits with status 1 if any differs from what Droplet promises.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import droplet
from droplet import DropletReference
from droplet.client.client import DropletConnection

failures = 0


def check(what: str, got: Any, expected: Any) -> None:
    global failures
    ok = got == expected
    failures += not ok
    note = "" if ok else f" (expected {expected!r})"
    print(f"{'ok  ' if ok else 'FAIL'} {what} = {got!r}{note}")


def main() -> int:
    address = (sys.argv[1] if len(sys.argv) > 1 else None) or os.environ.get(
        "DROPLET_ADDRESS", "127.0.0.1")

    # The original Cloudburst-style constructor, DropletConnection('127.0.0.1',
    # '127.0.0.1', local=True): the second and third arguments are accepted for
    # compatibility; a bare host means tcp://HOST:5000.
    try:
        cloud = DropletConnection(address, "127.0.0.1", local=True)
    except (droplet.ConnectionError, droplet.AuthenticationError) as exc:  # says how to fix it
        print(f"error: {exc}", file=sys.stderr)
        return 2

    with cloud:
        print(f"connected to {cloud.address}")

        # 1. Register a function and call it. Every function receives the user
        #    library (KVS access, messaging) as its first argument.
        def square(_, x):
            return x * x

        cloud_sq = cloud.register(square, "square")
        check("cloud_sq(2).get()", cloud_sq(2).get(), 4)

        # 2. A DAG: each function's result feeds the next.
        def increment(_, x):
            return x + 1

        cloud.register(increment, "increment")
        cloud.register_dag("inc_then_square", ["increment", "square"],
                           [("increment", "square")])
        future = cloud.call_dag("inc_then_square", {"increment": 1})
        check("call_dag('inc_then_square', {'increment': 1}).get()", future.get(), 4)
        check("same DAG with direct_response=True",
              cloud.call_dag("inc_then_square", {"increment": 2}, direct_response=True), 9)

        # 3. Composition of two functions, each given arguments of its own:
        #    `scale` gets its own argument first, then the upstream result.
        cloud.register(lambda _, factor, x: factor * x, "scale")
        cloud.register_dag("square_then_scale", ["square", "scale"], [("square", "scale")])
        check("scale(10, square(3))",
              cloud.call_dag("square_then_scale", {"square": 3, "scale": 10}).get(), 90)

        # 4. A DropletReference argument is replaced, on the executor, by the
        #    value stored under its key.
        cloud.put_object("quickstart/numbers", [1, 2, 3, 4])
        check("get_object('quickstart/numbers')",
              cloud.get_object("quickstart/numbers"), [1, 2, 3, 4])
        total = cloud.register(lambda _, numbers: sum(numbers), "total")
        check("total(DropletReference('quickstart/numbers'))",
              total(DropletReference("quickstart/numbers")).get(), 10)

        # 5. Functions can read and write the KVS through the user library.
        def remember(lib, key, value):
            lib.put(key, value)
            return lib.get(key)

        check("remember('quickstart/greeting', 'hello')",
              cloud.register(remember, "remember")("quickstart/greeting", "hello").get(),
              "hello")
        check("get_object('quickstart/greeting')",
              cloud.get_object("quickstart/greeting"), "hello")

        # 6. A function that raises: get() raises FunctionError with the remote
        #    traceback, and the original exception as its __cause__.
        def divide(_, a, b):
            return a / b

        try:
            cloud.register(divide, "divide")(1, 0).get()
        except droplet.FunctionError as exc:
            check("type of the FunctionError's __cause__",
                  type(exc.__cause__).__name__, "ZeroDivisionError")
        else:
            check("divide(1, 0) raised", False, True)

        check("list('s')", cloud.list("s"), ["scale", "square"])

    if failures:
        print(f"{failures} check(s) failed", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
