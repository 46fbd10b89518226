"""What a function's outcome becomes: a result blob, or a FunctionError to send on.

Pure helpers of the executor (no I/O): results are pickled once per hop, a
result that cannot be pickled becomes a FunctionError instead of an internal
error, and an exception keeps its traceback text and, when the client can
rebuild it, the pickled exception itself as the cause.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from ..errors import FunctionError, _Failure
from ..lattices import RAW, LWWLattice, encode_lattice
from ..serialization import dumps

__all__ = ["function_error", "lww", "pickle_result"]


def lww(blob: bytes) -> bytes:
    return encode_lattice(LWWLattice.now(blob), dump=RAW)


def pickle_result(result: Any) -> bytes:
    try:
        return dumps(result)
    except TypeError as exc:
        return dumps(_Failure(FunctionError(
            "TypeError", f"the function's result cannot be serialized: {exc}")))


def function_error(exc: BaseException, function: str) -> FunctionError:
    if isinstance(exc, FunctionError):
        return exc
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    kind = type(exc)
    type_name = kind.__qualname__ if kind.__module__ == "builtins" else (
        f"{kind.__module__}.{kind.__qualname__}")
    cause: bytes | None
    try:
        cause = dumps(exc)
        pickle.loads(cause)  # only keep a cause the client can rebuild
    except Exception:
        cause = None
    return FunctionError(type_name, str(exc), tb, function, cause)
