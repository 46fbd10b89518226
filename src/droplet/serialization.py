"""How user objects become bytes: cloudpickle out, pickle in.

Only authenticated peers' bytes are ever unpickled (see the Security page):
the wire layer itself never unpickles; user values travel as opaque blobs.
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

__all__ = ["dumps", "dumps_code", "loads"]


def dumps(obj: Any) -> bytes:
    """Serialize a user object (functions, closures, values).

    Plain data goes through the C pickler (about 8x faster than cloudpickle's
    Python subclass, and it is on every call's path); anything it refuses, or
    that refers to ``__main__`` (which the executor cannot import), goes
    through cloudpickle, which pickles such code by value.
    """
    if not callable(obj):
        try:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            pass
        else:
            if b"__main__" not in data:
                return data
    return dumps_code(obj)


def dumps_code(obj: Any) -> bytes:
    """Serialize with cloudpickle only: for functions and classes being registered.

    Code always takes this path so that cloudpickle decides by-value versus
    by-reference (``cloudpickle.register_pickle_by_value`` is honoured).
    """
    try:
        data = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(f"cannot serialize {type(obj).__name__} object: {exc}") from exc
    assert isinstance(data, bytes)
    return data


loads = pickle.loads
