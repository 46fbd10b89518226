"""What one invocation runs with: its run's consistency state and its steps.

Shared by the executor's ordinary path (a task per invocation) and its fast
lane (a worker thread from start to reply).
"""

from __future__ import annotations

import threading
from typing import Any

import attrs

from ..consistency import CausalContext
from ..errors import _Failure
from ..references import DropletReference
from ..serialization import loads
from .copies import private
from .multiexec import spread
from .outcomes import function_error
from .user_library import UserLibrary

__all__ = ["RunContext", "Step", "run_sync_steps"]


@attrs.define
class RunContext:
    """Consistency state shared by the functions of one run that execute together here."""

    run_id: str
    consistency: str
    writer: str  # vector-clock node id for CAUSAL writes: the session or the run
    causal: CausalContext | None = None
    pins: dict[str, bytes | None] = attrs.Factory(dict)


@attrs.define
class Step:
    """One function of a segment, ready to call."""

    function: str
    target: Any
    is_async: bool
    args: list[Any]
    lib: UserLibrary


def build_steps(t: Any, segment: list[str], targets: list[Any], libs: list[UserLibrary],
                is_async: bool) -> list[Step] | _Failure:
    """The steps of ``segment`` (a Trigger's pipeline), each with its own unpickled
    arguments; the failure of the first whose arguments do not unpickle."""
    steps = []
    for fn, target, lib in zip(segment, targets, libs, strict=True):
        args: list[Any] = []
        if fn in t.arg_fns:
            try:
                args = list(loads(t.arg_blobs[t.arg_fns.index(fn)]))
            except Exception as exc:
                return _Failure(function_error(exc, fn))
        steps.append(Step(fn, target, is_async, args, lib))
    return steps


class _Interrupted(threading.local):
    """Set in the thread whose run of a user function a Ctrl-C interrupted."""

    set = False


interrupted = _Interrupted()


def run_sync_steps(steps: list[Step], carried: list[Any]) -> tuple[Any, bool]:
    """In a worker thread: run consecutive sync steps, each fed the previous result.

    Each step gets a private copy of its input, as it would on another executor.
    """
    value: Any = None
    for i, step in enumerate(steps):
        try:
            if i:  # the previous step's result: a tuple splats, references resolve
                carried = [step.lib.get(a.key, a.deserialize)
                           if isinstance(a, DropletReference) else a
                           for a in spread(private(value))]
            value = step.target(step.lib, *step.args, *carried)
        except BaseException as exc:  # sys.exit() too: in a worker thread it is the
            # function's own error (no Ctrl-C or cancellation is delivered there)
            if type(exc) is KeyboardInterrupt and threading.current_thread() is \
                    threading.main_thread():
                # A caller's own thread ran it (Claim.run_here) and the user pressed
                # Ctrl-C: the call fails, and the caller gets the interrupt after.
                interrupted.set = True
            return _Failure(function_error(exc, step.function)), True
    return value, False
