"""Multi-exec functions and how results feed downstream functions. Pure code: no I/O.

A DAG function registered as ``(name, invalid_results)`` is *multi-exec*
(Cloudburst's MULTIEXEC): it runs once per arriving input instead of waiting
for all of them. A result equal to one of ``invalid_results`` goes nowhere;
the first valid result of a run flows on, and later ones are dropped. When
every attempt of a run was invalid (or failed), the run fails with an error
saying so instead of hanging until the caller's timeout.

>>> m = MultiExec()
>>> m.outcome("run", "f", 2, None, False, pickle.dumps([None])) is None
True
>>> m.outcome("run", "f", 2, 7, False, pickle.dumps([None]))
(7, False)
"""

from __future__ import annotations

import pickle
import time
from collections import OrderedDict
from typing import Any

import attrs

from ..errors import DagError, _Failure

__all__ = ["MultiExec", "is_invalid", "spread"]

#: Attempts of runs whose other inputs never came are forgotten after this.
MULTI_TTL = 600.0
#: Runs tracked at most (the oldest is forgotten first).
MULTI_MAX = 100_000
#: The clock expiry uses (a module attribute, so tests can turn it).
_now = time.monotonic


def spread(value: Any) -> list[Any]:
    """The arguments an upstream result becomes downstream: a tuple splats, as in Cloudburst."""
    return list(value) if type(value) is tuple else [value]


def is_invalid(result: Any, invalid: list[Any]) -> bool:
    """Whether ``result`` is one of ``invalid`` (by equality, else by its pickle)."""
    for candidate in invalid:
        try:
            if type(result) is type(candidate) and bool(result == candidate):
                return True
        except Exception:  # e.g. numpy arrays: compare what they serialize to
            try:
                if pickle.dumps(result) == pickle.dumps(candidate):
                    return True
            except Exception:
                pass
    return False


@attrs.define
class _Attempts:
    started: float
    seen: int = 0
    sent: bool = False
    failure: Any = None


class MultiExec:
    """Per run, which attempts of a multi-exec function have finished on this executor."""

    def __len__(self) -> int:
        """Runs still collecting attempts (for statistics)."""
        return len(self._runs)

    def __init__(self) -> None:
        # In arrival order, so expiry looks only at the oldest entries.
        self._runs: OrderedDict[tuple[str, str], _Attempts] = OrderedDict()
        self._invalid: dict[bytes, list[Any]] = {}

    def outcome(self, run_id: str, function: str, expected: int, result: Any, failed: bool,
                invalid_blob: bytes) -> tuple[Any, bool] | None:
        """What to send downstream after one attempt, or None to send nothing.

        ``expected`` is how many attempts the run makes (one per upstream edge).
        """
        key = (run_id, function)
        attempts = self._runs.get(key)
        if attempts is None:
            now = _now()
            self.expire(now)
            if len(self._runs) >= MULTI_MAX:
                self._runs.popitem(last=False)
            attempts = self._runs[key] = _Attempts(now)
        attempts.seen += 1
        send: tuple[Any, bool] | None = None
        if failed:
            if attempts.failure is None:
                attempts.failure = result
        elif not attempts.sent and not is_invalid(result, self._invalid_results(invalid_blob)):
            attempts.sent = True
            send = (result, False)
        if attempts.seen >= expected:
            del self._runs[key]
            if not attempts.sent:
                if attempts.failure is not None:
                    return attempts.failure, True
                return _Failure(DagError(
                    f"every result of multi-exec function {function!r} was one of its "
                    "invalid results, so nothing flowed on")), True
        return send

    def _invalid_results(self, blob: bytes) -> list[Any]:
        found = self._invalid.get(blob)
        if found is None:
            loaded = pickle.loads(blob)
            found = list(loaded) if isinstance(loaded, list | tuple) else [loaded]
            if len(blob) <= 64 * 1024:  # keep small lists only: the cache stays small
                if len(self._invalid) >= 256:
                    self._invalid.clear()
                self._invalid[blob] = found
        return found

    def expire(self, now: float) -> None:
        """Forget runs older than MULTI_TTL (oldest first: amortised O(1) per call)."""
        cutoff = now - MULTI_TTL
        runs = self._runs
        while runs:
            if next(iter(runs.values())).started >= cutoff:
                break
            runs.popitem(last=False)
