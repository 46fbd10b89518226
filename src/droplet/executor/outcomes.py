"""What a function's outcome becomes: a result blob, or a FunctionError to send on.

Pure helpers of the executor (no I/O): results are pickled once per hop, a
result that cannot be pickled becomes a FunctionError instead of an internal
error, and an exception keeps its traceback text and, when the client can
rebuild it, the pickled exception itself as the cause.

The traceback starts at the user's code (the executor's own frames that called
it, and the frames of the hop from a worker thread into the event loop, are
left out), and a ``TypeError`` raised by the call itself, the classic
``f() takes 1 positional argument but 2 were given``, says what is missing.
"""

from __future__ import annotations

import os
import pickle
import re
import traceback
from types import TracebackType
from typing import Any

import outcome
import trio

from ..errors import FunctionError, _Failure
from ..lattices import RAW, LWWLattice, encode_lattice
from ..protocol.framing import Gather
from ..registration import restore_lines
from ..serialization import dumps, dumps_value

__all__ = ["function_error", "lww", "pickle_result", "pickle_value"]


def lww(blob: bytes) -> bytes:
    return encode_lattice(LWWLattice.now(blob), dump=RAW)


def pickle_result(result: Any) -> bytes:
    """The result as a plain pickle: what the store keeps."""
    try:
        return dumps(result)
    except TypeError as exc:
        return _unpicklable(exc)


def pickle_value(result: Any) -> bytes | Gather:
    """The result for a message (to the next function, or a direct reply): big
    buffers out of band (``serialization.dumps_value``), never stored as is."""
    try:
        # snapshot: a function may keep (and change) a buffer it returned
        # while the message is still being written.
        return dumps_value(result, snapshot=True)
    except TypeError as exc:
        return _unpicklable(exc)


def _unpicklable(exc: TypeError) -> bytes:
    return dumps(_Failure(FunctionError(
        "TypeError", f"the function's result cannot be serialized: {exc}")))


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_PLUMBING = tuple(os.path.dirname(os.path.abspath(m.__file__ or "")) + os.sep
                  for m in (trio, outcome))
_ARITY = re.compile(r"takes \d+ positional arguments? but \d+ (?:were|was) given"
                    r"|missing \d+ required positional arguments?"
                    r"|takes no arguments")
HINT = ("Droplet functions take the user library as their first argument: "
        "def f(lib, *args), or lambda lib, x: ...")


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the first frame that is not Droplet's own."""
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        tb = tb.tb_next
    return tb


def _drop_plumbing(report: traceback.TracebackException) -> None:
    """Leave out the frames of the hop from a worker thread into the event loop."""
    seen: set[int] = set()
    todo: list[traceback.TracebackException | None] = [report]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        item.stack = traceback.StackSummary.from_list(
            [f for f in item.stack if not f.filename.startswith(_PLUMBING)])
        todo += [item.__cause__, item.__context__]


def function_error(exc: BaseException, function: str) -> FunctionError:
    """The FunctionError for ``exc``, raised by (or calling) user function ``function``."""
    if isinstance(exc, FunctionError):
        return exc
    user_tb = _user_frames(exc.__traceback__)
    message = str(exc)
    if user_tb is None and isinstance(exc, TypeError) and _ARITY.search(message):
        message = f"{message}. {HINT}"  # raised by the call itself: a missing parameter
    restore_lines(user_tb)
    report = traceback.TracebackException(type(exc), exc, user_tb)
    _drop_plumbing(report)
    lines = list(report.format())
    if user_tb is None and lines and lines[0].startswith("Traceback"):
        lines = lines[1:]  # no frame of the user's own to show
    kind = type(exc)
    type_name = kind.__qualname__ if kind.__module__ == "builtins" else (
        f"{kind.__module__}.{kind.__qualname__}")
    cause: bytes | None
    try:
        cause = dumps(exc)
        pickle.loads(cause)  # only keep a cause the client can rebuild
    except Exception:
        cause = None
    return FunctionError(type_name, message, "".join(lines), function, cause)
