"""What a trigger carries of the run's arguments (the scheduler's and each executor's).

A trigger carries the run's whole schedule, and with it the callers' pickled
arguments; a function that already ran needs its arguments no more, so the
trigger for the next function keeps only those of the functions still ahead
of it (itself and everything downstream of it). A big argument then crosses
the network once, to the executor of the function it is for, instead of
riding along with every later hop. Likewise the scheduler gives each source
function of a DAG with several sources only the arguments ahead of it.
"""

from __future__ import annotations

from typing import Any

from ..protocol.messages import Trigger

__all__ = ["arguments_for"]


def ahead_of(edges: list[list[str]], start: str) -> set[str]:
    """``start`` and every function downstream of it.

    >>> sorted(ahead_of([["a", "b"], ["b", "c"], ["x", "c"]], "b"))
    ['b', 'c']
    """
    seen = {start}
    todo = [start]
    while todo:
        fn = todo.pop()
        for src, dst in edges:
            if src == fn and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return seen


def arguments_for(t: Trigger, dst: str) -> dict[str, Any]:
    """``arg_fns``/``arg_blobs`` for the trigger of ``dst`` (``attrs.evolve`` keywords)."""
    if not t.arg_fns:
        return {}
    ahead = ahead_of(t.edges, dst)
    kept = [(fn, blob) for fn, blob in zip(t.arg_fns, t.arg_blobs, strict=True) if fn in ahead]
    if len(kept) == len(t.arg_fns):
        return {}
    return {"arg_fns": [fn for fn, _ in kept], "arg_blobs": [blob for _, blob in kept]}
