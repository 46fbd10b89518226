"""A seeded generator of hostile frames for every Droplet link.

Each case is one frame: a registered message whose field values are hostile
(wrong JSON types, garbage bytes in binary fields, unknown names, huge counts
and numbers), or random bytes. Deterministic for a seed, so a failure names
the case that caused it.

Strings are drawn from a fixed list on purpose: a trigger's placement is a
list of URLs an executor may dial, and a random string is a host name; every
string here is either not an address, an ``inproc://`` name, or a closed
loopback port, so no case ever reaches beyond this machine.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from typing import Any

from droplet.consistency import CausalContext
from droplet.protocol import messages
from droplet.protocol.messages import ExecutorJoin, encode

__all__ = ["EXECUTOR_CLASSES", "MESSAGE_CLASSES", "cases"]

#: Every message but ExecutorJoin: joining as an executor is a capability every
#: authenticated peer has by design (a fake executor would take calls), not a value.
MESSAGE_CLASSES = [cls for _, cls in sorted(messages.MESSAGES.items()) if cls is not ExecutorJoin]

#: What an executor serves (Trigger, Mail, KvsUpdate), often, and the rest now and then.
EXECUTOR_CLASSES = [messages.Trigger] * 12 + [messages.Mail, messages.KvsUpdate] * 3 + [
    messages.KvsValue, messages.Ok, messages.ErrorReply, messages.RunDone, messages.CallDag]

STRINGS = [
    "", "\x00bad", "inproc://nowhere", "tcp://127.0.0.1:1", "x" * 70, "echo", "ghost",
    "NORMAL", "CAUSAL", "REPEATABLE_READ", "__droplet/results/x", "__droplet/functions/echo",
    "tcp://127.0.0.1:1/7", "\u2603",
]
NUMBERS: list[Any] = [0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 10**400, -(10**400), 0.5,
                      -0.0, 1e308, -1e308]
WRONG_TYPES: list[Any] = [None, True, 7, -3.5, "str", [], {}, [1, "a"], {"k": []}, [[[]]]]
_ENVELOPE = struct.Struct(">BBII")


def _bytes(rng: random.Random) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:
        return b""
    if choice == 1:
        return rng.randbytes(rng.randrange(1, 64))
    if choice == 2:  # a pickle opcode stream that ends abruptly
        return b"\x80\x05\x95" + rng.randbytes(8)
    if choice == 3:  # a lattice-looking frame with garbage inside
        return b"\x01" + rng.randbytes(rng.randrange(0, 32))
    if choice == 4:
        return CausalContext().encode()
    return rng.randbytes(rng.randrange(1000, 5000))


def _value(rng: random.Random, kind: str) -> Any:
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if optional and rng.random() < 0.2:
        return None
    if base not in ("bytes", "list[bytes]") and rng.random() < 0.15:
        return rng.choice(WRONG_TYPES)  # the decoder must refuse it by name
    if base == "str":
        return rng.choice(STRINGS)
    if base in ("int", "float"):
        return rng.choice(NUMBERS)
    if base == "bool":
        return rng.random() < 0.5
    if base == "bytes":
        return _bytes(rng)
    if base == "list[bytes]":
        return [_bytes(rng) for _ in range(rng.choice([0, 1, 2, 50]))]
    if base == "list[str]":
        return [rng.choice(STRINGS) for _ in range(rng.choice([0, 1, 2, 3, 2000]))]
    if base == "list[int]":
        return [rng.choice(NUMBERS) for _ in range(rng.choice([0, 1, 3]))]
    if base == "list[list[str]]":
        return [[rng.choice(STRINGS) for _ in range(rng.choice([0, 1, 2, 3]))]
                for _ in range(rng.choice([0, 1, 2, 500]))]
    if base == "dict[str, int]":
        return {rng.choice(STRINGS): rng.choice(NUMBERS) for _ in range(rng.randrange(3))}
    raise AssertionError(f"no generator for {kind}")


def _trigger_like(rng: random.Random) -> messages.Trigger:
    """A Trigger that passes the decoder's checks, so the executor acts on it."""
    names = rng.sample(["echo", "ghost", "a", "b"], rng.randrange(1, 4))
    # Now and then an edge names a function that is not in the run.
    pick = names if rng.random() < 0.8 else [*names, "stranger"]
    edges = [[rng.choice(pick), rng.choice(pick)] for _ in range(rng.randrange(3))]
    fn = rng.choice(names)
    source = rng.choice([None, *names])
    args = [n for n in names if rng.random() < 0.5]
    return messages.Trigger(
        rng.choice(["r1", "r2", ""]), fn, names, [rng.choice(STRINGS) for _ in names],
        [rng.choice(["inproc://nowhere", "tcp://127.0.0.1:1", ""]) for _ in names], edges,
        args, [_bytes(rng) for _ in args], source,
        None if source is None else _bytes(rng), rng.random() < 0.3,
        rng.choice(STRINGS), rng.choice([None, *STRINGS]), rng.random() < 0.3,
        rng.choice(["NORMAL", "CAUSAL", "REPEATABLE_READ", "ghost"]),
        rng.choice([None, "client"]), rng.choice([None, 0.0, 1e12]),
        rng.choice(["", "inproc://nowhere", "tcp://127.0.0.1:1"]),
        rng.choice([None, CausalContext().encode(), b"\xff"]))


def _message(rng: random.Random, classes: list[type[Any]]) -> Any:
    cls = rng.choice(classes)
    if cls is messages.Trigger and rng.random() < 0.5:
        return _trigger_like(rng)
    return cls(*[_value(rng, kind) for kind in cls._schema.kinds])


def cases(seed: int, n: int, classes: list[type[Any]] | None = None
          ) -> Iterator[tuple[str, bytes]]:
    """``n`` hostile frames (payloads) and a short description of each."""
    rng = random.Random(seed)
    classes = classes or MESSAGE_CLASSES
    for i in range(n):
        roll = rng.random()
        if roll < 0.1:
            yield f"{i}: random bytes", rng.randbytes(rng.randrange(0, 200))
        elif roll < 0.2:  # a known tag with a header that lies about its length
            tag = rng.choice(classes)._schema.tag
            yield f"{i}: bad envelope", _ENVELOPE.pack(
                tag, 0, 1, rng.choice([0, 2**32 - 1])) + rng.randbytes(8)
        else:
            msg = _message(rng, classes)
            request_id = rng.choice([0, 1, 2**32 - 1])
            reply = rng.random() < 0.1
            yield f"{i}: {type(msg).__name__}", encode(msg, request_id, reply)
