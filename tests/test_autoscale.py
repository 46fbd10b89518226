"""The autoscaler's decisions, from made-up observations and times (no clock, no I/O)."""

from __future__ import annotations

import pytest

from droplet.autoscale import UP, Autoscaler, Observation, ScalingPolicy
from droplet.config import Config, parse_executors
from droplet.status import ClusterStatus, ScaleEvent, ScalingStatus, format_status

IDLE = Observation()
BUSY = Observation(busy=1, running=1)


def queued(n: int) -> Observation:
    return Observation(busy=1, queued=n, running=1 + n)


def scaler(minimum: int = 1, maximum: int = 4, **kw: float) -> Autoscaler:
    kw = {"up_queue": 1.0, "up_after": 2.0, "down_after": 30.0, **kw}
    return Autoscaler(ScalingPolicy(minimum, maximum, **kw))


def test_starts_one_only_after_the_queue_persisted() -> None:
    a = scaler()
    assert a.observe(0.0, {"w0": queued(3)}) is None
    assert a.observe(1.0, {"w0": queued(3)}) is None
    assert a.observe(2.0, {"w0": queued(3)}) == UP


def test_a_queue_that_empties_restarts_the_wait() -> None:
    a = scaler()
    assert a.observe(0.0, {"w0": queued(3)}) is None
    assert a.observe(1.5, {"w0": BUSY}) is None  # drained in time: no new executor
    assert a.observe(2.5, {"w0": queued(3)}) is None
    assert a.observe(4.0, {"w0": queued(3)}) is None
    assert a.observe(4.5, {"w0": queued(3)}) == UP


def test_threshold_is_per_executor() -> None:
    a = scaler(up_queue=2.0)
    two = {"w0": queued(1), "w1": queued(2)}  # 1.5 per executor: below 2
    assert a.observe(0.0, two) is None
    assert a.observe(10.0, two) is None
    busier = {"w0": queued(2), "w1": queued(2)}
    assert a.observe(11.0, busier) is None
    assert a.observe(13.0, busier) == UP


def test_no_second_start_while_one_is_starting_and_the_clock_restarts() -> None:
    a = scaler()
    a.observe(0.0, {"w0": queued(5)})
    assert a.observe(2.0, {"w0": queued(5)}) == UP
    assert a.observe(5.0, {"w0": queued(5)}, starting=1) is None
    # Joined: the queue must persist up_after again before the next start.
    assert a.observe(6.0, {"w0": queued(5), "w1": queued(5)}) is None
    assert a.observe(7.9, {"w0": queued(5), "w1": queued(5)}) is None
    assert a.observe(8.0, {"w0": queued(5), "w1": queued(5)}) == UP


def test_never_past_the_maximum() -> None:
    a = scaler(maximum=2)
    full = {"w0": queued(9), "w1": queued(9)}
    for t in range(100):
        assert a.observe(float(t), full) is None


def test_below_the_minimum_starts_one_at_once() -> None:
    a = scaler(minimum=2)
    assert a.observe(0.0, {"w0": IDLE}) == UP
    assert a.observe(0.1, {"w0": IDLE}, starting=1) is None


def test_stops_the_executor_idle_longest_after_the_cool_down() -> None:
    a = scaler(down_after=30.0)
    assert a.observe(0.0, {"w0": IDLE, "w1": BUSY, "w2": IDLE}) is None
    assert a.observe(10.0, {"w0": BUSY, "w1": IDLE, "w2": IDLE}) is None
    assert a.observe(29.0, {"w0": BUSY, "w1": IDLE, "w2": IDLE}) is None
    assert a.observe(30.0, {"w0": BUSY, "w1": IDLE, "w2": IDLE}) == ("down", "w2")


def test_newest_idle_executor_goes_first_among_equals() -> None:
    a = scaler(down_after=5.0)
    three = {"w0": IDLE, "w1": IDLE, "w2": IDLE}
    a.observe(0.0, three)
    assert a.observe(5.0, three) == ("down", "w2")


def test_calls_placed_since_the_last_look_reset_the_idle_clock() -> None:
    """Short calls may finish between two reports: placing one counts as work."""
    a = scaler(down_after=5.0)
    a.observe(0.0, {"w0": BUSY, "w1": Observation(placed=1)})
    assert a.observe(4.0, {"w0": BUSY, "w1": Observation(placed=7)}) is None
    assert a.observe(8.0, {"w0": BUSY, "w1": Observation(placed=7)}) is None
    assert a.observe(9.0, {"w0": BUSY, "w1": Observation(placed=7)}) == ("down", "w1")


def test_never_below_the_minimum_nor_while_calls_queue_or_one_drains() -> None:
    a = scaler(minimum=2, down_after=1.0)
    two_idle = {"w0": IDLE, "w1": IDLE}
    for t in range(10):
        assert a.observe(float(t), two_idle) is None
    b = scaler(minimum=1, down_after=1.0)
    b.observe(0.0, {"w0": IDLE, "w1": IDLE})
    assert b.observe(5.0, {"w0": IDLE, "w1": IDLE}, draining=1) is None
    assert b.observe(6.0, {"w0": IDLE, "w1": IDLE}, starting=1) is None
    c = scaler(minimum=1, maximum=2, down_after=1.0)
    c.observe(0.0, {"w0": queued(4), "w1": IDLE})
    assert c.observe(5.0, {"w0": queued(4), "w1": IDLE}) is None
    # Calls queue, though below the threshold for one more: none stops either
    # (the documented rule: "while nothing queues anywhere").
    d = scaler(minimum=1, maximum=3, up_queue=2.0, down_after=1.0)
    d.observe(0.0, {"w0": queued(1), "w1": IDLE})
    assert d.observe(5.0, {"w0": queued(1), "w1": IDLE}) is None


def test_forgets_executors_that_left() -> None:
    a = scaler(down_after=5.0)
    a.observe(0.0, {"w0": BUSY, "w1": IDLE})
    a.observe(1.0, {"w0": BUSY})
    # w1 came back (a restarted worker): idle from now, not from t=0.
    assert a.observe(5.0, {"w0": BUSY, "w1": IDLE}) is None
    assert a.observe(10.0, {"w0": BUSY, "w1": IDLE}) == ("down", "w1")


@pytest.mark.parametrize("bounds", [(0, 2), (3, 2), (-1, 1)])
def test_policy_refuses_bad_bounds(bounds: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="MIN:MAX"):
        ScalingPolicy(*bounds)


def test_policy_refuses_negative_thresholds() -> None:
    with pytest.raises(ValueError, match="up_after"):
        ScalingPolicy(1, 2, up_after=-1.0)


# ---------------------------------------------------------------------- settings


def test_parse_executors() -> None:
    assert parse_executors("1:4") == (1, 4)
    assert parse_executors(" 2 ") == (2, None)
    assert parse_executors(3) == (3, None)
    assert parse_executors((1, 3)) == (1, 3)
    assert parse_executors("2:2") == (2, 2)
    for bad in ("1:", "a:b", "0:3", "4:1", (1,), 1.5, (1, "x")):
        with pytest.raises(ValueError, match="executors"):
            parse_executors(bad)


def test_config_from_flags_and_file(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    config = Config.load({"executors": "1:4", "scale_up_after": 0.5})
    assert config.executor_range == (1, 4) and config.scale_up_after == 0.5
    assert Config.load({"executors": "3"}).executor_range == (3, 3)
    toml = tmp_path / "node.toml"
    toml.write_text('executors = "2:5"\nscale_down_after = 10\nscale_up_queue = 4\n')
    config = Config.load({}, str(toml))
    assert config.executor_range == (2, 5)
    assert (config.scale_down_after, config.scale_up_queue) == (10, 4)
    # A plain --executors N on the command line means a fixed N, whatever the file said.
    assert Config.load({"executors": "3"}, str(toml)).executor_range == (3, 3)
    toml.write_text("executors = 2\nmax_executors = 6\n")
    assert Config.load({}, str(toml)).executor_range == (2, 6)
    toml.write_text('executors = "0:x"\n')
    with pytest.raises(ValueError, match="executors"):
        Config.load({}, str(toml))
    with pytest.raises(ValueError, match="scale_up_queue"):
        Config.load({"scale_up_queue": 0.0})
    with pytest.raises(ValueError, match="MIN:MAX"):
        Config(executors=3, max_executors=2)


@pytest.mark.parametrize("name", ["scale_up_queue", "scale_up_after", "scale_down_after"])
def test_a_threshold_that_is_not_a_number_is_refused(name: str) -> None:
    # `--scale-up-after nan` parses as a float; every comparison with it is False,
    # so the node would silently never scale.
    with pytest.raises(ValueError, match=name):
        Config.load({"executors": "1:3", name: float("nan")})
    policy_name = name.removeprefix("scale_")
    with pytest.raises(ValueError, match=policy_name):
        ScalingPolicy(1, 3, **{policy_name: float("nan")})


# ---------------------------------------------------------------------- status


def _status(scaling: ScalingStatus | None) -> ClusterStatus:
    return ClusterStatus("sched", (), (), (), 10.0, scaling)


def test_scaling_status_round_trips_and_prints() -> None:
    scaling = ScalingStatus(1, 4, 2, starting=1, draining=0, scale_ups=2, scale_downs=1,
                            events=(ScaleEvent(1000.0, "up", 2, "3.0 queued calls"),
                                    ScaleEvent(1001.5, "down", 1, "idle for 30 s")))
    status = _status(scaling)
    assert ClusterStatus.from_json(status.to_json()) == status
    remote = ScalingStatus(1, 8, 3, node="tcp://10.0.0.3:7001")
    both = ClusterStatus("sched", (), (), (), 10.0, scaling, (remote,))
    assert ClusterStatus.from_json(both.to_json()) == both
    assert "adaptive executors of tcp://10.0.0.3:7001: 3 running (min 1, max 8)" in (
        format_status(both))
    assert ClusterStatus.from_json(_status(None).to_json()).scaling is None
    text = format_status(status)
    assert "adaptive executors: 2 running (min 1, max 4), 1 starting" in text
    assert "up   -> 2: 3.0 queued calls" in text and "down -> 1: idle for 30 s" in text
    assert "adaptive" not in format_status(_status(None))


def test_garbled_scaling_status_is_a_protocol_error() -> None:
    from droplet.errors import ProtocolError

    data = _status(ScalingStatus(1, 2, 1)).to_dict()
    data["scaling"]["current"] = -1
    with pytest.raises(ProtocolError, match="scaling.current"):
        ClusterStatus.from_dict(data)
    data["scaling"] = {"minimum": 1}
    with pytest.raises(ProtocolError, match="status.scaling"):
        ClusterStatus.from_dict(data)
    data = _status(None).to_dict()
    data["pools"] = {"minimum": 1}
    with pytest.raises(ProtocolError, match="status.pools"):
        ClusterStatus.from_dict(data)
