"""The blocking client's fast way for plain calls (``_blocking.py``: ``_send_plain``):
the same bytes on the wire as the ordinary way, pure and synchronous."""

from __future__ import annotations

import pickle
from typing import Any

import attrs
import pytest

from droplet.client._core import AcceptedCalls, plain_args
from droplet.client._direct import triggers_for
from droplet.client._wire import TriggerTemplates, json_key
from droplet.kvs.keys import RESULT_PREFIX
from droplet.protocol.framing import frame
from droplet.protocol.messages import CallDag, CallPlaced, decode, encode
from droplet.references import DropletReference
from droplet.serialization import OUT_OF_BAND_MIN, dumps_value

URL = "tcp://127.0.0.1:9"


@pytest.mark.parametrize("args", [[], [1], [1, 2.5, "x", None, True, b"bytes"],
                                  ["é" * 100, -(10**30)], [b"y" * (OUT_OF_BAND_MIN - 1)]])
def test_plain_arguments_pickle_as_dumps_value_does(args: list[Any]) -> None:
    assert plain_args(args) == dumps_value(args)
    assert pickle.loads(plain_args(args) or b"") == args


@pytest.mark.parametrize("args", [[DropletReference("k")], [bytearray(b"x")], [[1]],
                                  [b"z" * OUT_OF_BAND_MIN], [lambda: 1], ["in __main__"],
                                  [1, {"a": 1}]])
def test_anything_else_takes_the_ordinary_way(args: list[Any]) -> None:
    assert plain_args(args) is None


def _plan(is_function: bool) -> CallPlaced:
    if is_function:
        return CallPlaced("f", True, ["f"], ["v1"], [], [URL], 2.0)
    return CallPlaced("d", False, ["a", "b", "c"], ["1", "2", "3"], [["a", "c"], ["b", "c"]],
                      [URL], 2.0)


@pytest.mark.parametrize("is_function", [True, False])
def test_a_plain_call_encodes_to_the_bytes_of_its_trigger(is_function: bool) -> None:
    plan = _plan(is_function)
    target = plan.target
    fns = ["f"] if is_function else ["a", "b"]
    templates = TriggerTemplates()
    for i in range(3):  # the first makes the template, the others reuse it
        blobs = [plain_args([i, "x"]) or b"" for _ in fns]
        call_id = f"{i:032x}"
        key = RESULT_PREFIX + call_id
        assert json_key(key) == b'"%s"' % key.encode()  # what _send_plain writes
        encoded = templates.encode_parts(target, is_function, fns, blobs, json_key(key),
                                         call_id, plan, URL)
        assert encoded is not None and len(encoded) == 1
        call = CallDag(target, is_function, fns, blobs, result_key=key)
        (want,) = triggers_for(call, plan, URL) or []
        want = attrs.evolve(want, run_id=call_id)
        assert encoded[0].payload(5) == encode(want, 5)
        assert encoded[0].framed(5) == frame(encode(want, 5))
        assert encoded[0].size() == len(encode(want, 5))
        assert decode(encoded[0].payload(5)) == (want, 5, False)


def test_no_template_for_arguments_outside_the_run() -> None:
    templates = TriggerTemplates()
    plan = _plan(False)
    assert templates.encode_parts("d", False, ["zzz"], [b"x"], b'"k"', "1", plan, URL) is None
    assert templates.encode_parts("d", False, ["a"], [b"x" * 300_000], b'"k"', "1", plan,
                                  URL) is None  # too big: the ordinary (gather) write


def test_accepted_shapes_stay_in_their_place() -> None:
    accepted = AcceptedCalls(limit=2)
    accepted.accepted_shape(("f", True, ("f",)))
    accepted.accepted_shape(("g", True, ("g",)))
    accepted.accepted_shape(("f", True, ("f",)))  # known: not moved to the end
    accepted.accepted_shape(("h", True, ("h",)))  # the oldest (f) goes
    assert list(accepted._shapes) == [("g", True, ("g",)), ("h", True, ("h",))]
    accepted.accepted_shape(None)
    assert len(accepted._shapes) == 2
