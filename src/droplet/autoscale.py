"""When a node starts or stops an executor. Pure code: fed observations and the time.

A node with ``--executors MIN:MAX`` runs between MIN and MAX executors. Its
supervisor (:mod:`droplet.node.pool`) asks an :class:`Autoscaler` once per
report period what to do, handing it what the executors last reported (their
busy threads, queued calls and running invocations, and how many calls the
scheduler placed on each so far) and the current time. The answer is
:data:`UP` (start one executor), ``("down", executor)`` (drain and stop that
one) or None.

- **Up** when calls queue: the queued calls per executor stay at or above
  ``up_queue`` for ``up_after`` seconds in a row, no executor is still
  starting, and fewer than MAX run. The clock restarts after each start, so
  the next one waits for the new executor to be seen and the queue to persist.
- **Down** when an executor has been idle (nothing busy, queued or running,
  and no call placed on it) for ``down_after`` seconds while more than MIN
  run, nothing queues and no other executor is being drained: the one idle
  the longest (the newest among equals) goes.

No I/O and no clock of its own, so it is tested with made-up observations
and times, synchronously.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs

__all__ = ["UP", "Autoscaler", "Decision", "Observation", "ScalingPolicy"]

#: Defaults of the thresholds (``scale_up_queue``, ``scale_up_after``, ``scale_down_after``).
DEFAULT_UP_QUEUE = 1.0
DEFAULT_UP_AFTER = 2.0
DEFAULT_DOWN_AFTER = 30.0

UP: Literal["up"] = "up"
Decision = Literal["up"] | tuple[Literal["down"], str] | None


def _non_negative(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:  # NaN too
        raise ValueError(f"{attribute.name} must not be negative, not {value!r}")


@attrs.frozen
class ScalingPolicy:
    """The bounds and thresholds of an adaptive node."""

    minimum: int
    maximum: int
    #: queued calls per running executor that count as "calls are waiting".
    up_queue: float = attrs.field(default=DEFAULT_UP_QUEUE, validator=_non_negative)
    #: seconds the queue must stay at or above ``up_queue`` before one more starts.
    up_after: float = attrs.field(default=DEFAULT_UP_AFTER, validator=_non_negative)
    #: seconds an executor must stay idle before it is stopped (beyond ``minimum``).
    down_after: float = attrs.field(default=DEFAULT_DOWN_AFTER, validator=_non_negative)

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError(f"executors MIN:MAX needs 1 <= MIN <= MAX, "
                             f"not {self.minimum}:{self.maximum}")

    @property
    def adaptive(self) -> bool:
        return self.maximum > self.minimum


@attrs.frozen
class Observation:
    """What is known of one running executor."""

    busy: int = 0
    queued: int = 0
    running: int = 0
    #: calls the scheduler placed on it so far (a running count, never reset).
    placed: int = 0

    @property
    def idle(self) -> bool:
        return not (self.busy or self.queued or self.running)


class Autoscaler:
    """Decides, one observation at a time, when to start or stop an executor."""

    def __init__(self, policy: ScalingPolicy) -> None:
        self.policy = policy
        self._behind_since: float | None = None
        #: executor -> (idle since, calls placed when last seen)
        self._idle_since: dict[str, tuple[float, int]] = {}

    def observe(self, now: float, executors: Mapping[str, Observation], *,
                starting: int = 0, draining: int = 0) -> Decision:
        """The decision for this moment.

        Args:
            now: the current time, in seconds (any monotonic clock).
            executors: the running executors (not those starting or draining),
                in the order they started.
            starting: executors started that have not joined yet.
            draining: executors being drained (they count for nothing).
        """
        policy = self.policy
        count = len(executors) + starting
        queued = sum(o.queued for o in executors.values())
        behind = bool(executors) and queued >= max(policy.up_queue, 1e-9) * len(executors)
        self._track_idle(now, executors)
        if not behind or starting:  # a starting executor may be all it takes: wait for it
            self._behind_since = None
        elif self._behind_since is None:
            self._behind_since = now
        if count < policy.minimum:
            # Below the floor (a worker that is being replaced, say): add one now.
            self._behind_since = None
            return UP if starting == 0 else None
        if behind and starting == 0 and count < policy.maximum:
            assert self._behind_since is not None
            if now - self._behind_since >= policy.up_after:
                self._behind_since = None
                return UP
            return None
        if queued or starting or draining or count <= policy.minimum:  # queued: behind too
            return None
        longest: tuple[float, str] | None = None
        for name in reversed(list(executors)):  # newest first: it wins ties
            seen = self._idle_since.get(name)
            if seen is not None and now - seen[0] >= policy.down_after:
                if longest is None or seen[0] < longest[0]:
                    longest = (seen[0], name)
        if longest is None:
            return None
        self._idle_since.pop(longest[1], None)
        return ("down", longest[1])

    def _track_idle(self, now: float, executors: Mapping[str, Observation]) -> None:
        for name in list(self._idle_since):
            if name not in executors:
                del self._idle_since[name]
        for name, obs in executors.items():
            seen = self._idle_since.get(name)
            if not obs.idle or (seen is not None and seen[1] != obs.placed):
                # Busy now, or given calls since the last look: idle from now at best.
                if obs.idle:
                    self._idle_since[name] = (now, obs.placed)
                else:
                    self._idle_since.pop(name, None)
            elif seen is None:
                self._idle_since[name] = (now, obs.placed)
