"""Direct calls' triggers encoded from a template: the blocking client's fast path.

A call sent straight to an executor is one :class:`~droplet.protocol.messages.Trigger`
per source function, and from one call of a function or DAG to the next only
the run id, the result key and the pickled arguments change: the schedule
(functions, versions, placement, edges) and every other field stay. Building
the trigger and encoding its 24-field JSON header costs more than the rest of
the client's work on a call. So the client encodes the triggers
:func:`~droplet.client._direct.triggers_for` makes once per (placement,
executor, functions given arguments), with stand-ins for the run id and the
result key, and splices each call's values into those bytes: byte for byte
what :func:`~droplet.protocol.messages.encode_gather` writes
(``tests/test_lazy_results.py`` holds it to that).

Calls with big arguments (pickled out of band) or references take the
ordinary path.

:meth:`TriggerTemplates.encode_parts` does the same from a call's parts, with
no :class:`~droplet.protocol.messages.CallDag` built: the blocking client's
plain calls (``_blocking.py``) pay for neither the message object nor its
checks; a ``tcp://`` or ``tls://`` frame is then joined once, length prefix
included (:meth:`Encoded.framed`).
"""

from __future__ import annotations

from typing import Any

from ..ids import unique_id
from ..protocol.encoding import _ENVELOPE, _U32, _json_encode
from ..protocol.framing import BIG_FRAME, HEADER_SIZE
from ..protocol.messages import CallDag, CallPlaced, encode_gather
from ._direct import triggers_for

__all__ = ["Encoded", "TriggerTemplates", "json_key"]

#: Stand-in result key while encoding a template (no real key looks like it).
_KEY = "\x01droplet-template-key\x01"
#: Templates kept per client (placements, executors and argument shapes in use).
MAX_TEMPLATES = 256


class Encoded:
    """A message encoded but for its request id, which :meth:`payload` fills in."""

    __slots__ = ("blobs", "head", "tag")

    def __init__(self, tag: int, head: bytes, blobs: bytes) -> None:
        self.tag = tag
        self.head = head
        self.blobs = blobs

    def payload(self, request_id: int = 0) -> bytes:
        head = self.head
        return b"".join((_ENVELOPE.pack(self.tag, 0, request_id, len(head)), head,
                         self.blobs))

    def size(self) -> int:
        """The payload's length in bytes."""
        return _ENVELOPE.size + len(self.head) + len(self.blobs)

    def framed(self, request_id: int) -> bytes:
        """The whole ``tcp://`` frame: the 4-byte length, then :meth:`payload`."""
        head = self.head
        blobs = self.blobs
        return b"".join((_U32.pack(_ENVELOPE.size + len(head) + len(blobs)),
                         _ENVELOPE.pack(self.tag, 0, request_id, len(head)), head, blobs))


assert HEADER_SIZE == _U32.size  # the tcp:// length prefix is a big-endian u32


def json_key(key: str) -> bytes:
    """``key`` as the JSON string a header holds."""
    return _json_encode(key).encode()


class _Template:
    """One source trigger's header, split where the run id and the result key go."""

    __slots__ = ("after_key", "before_key", "before_run", "tag")

    def __init__(self, tag: int, before_run: bytes, before_key: bytes,
                 after_key: bytes) -> None:
        self.tag = tag
        self.before_run = before_run
        self.before_key = before_key
        self.after_key = after_key


def _split(trigger: Any) -> _Template | None:
    """``trigger``'s encoded header around its run id and (stand-in) result key."""
    payload = encode_gather(trigger)
    if type(payload) is not bytes:
        return None
    tag, _, _, head_len = _ENVELOPE.unpack_from(payload)
    head = payload[_ENVELOPE.size:_ENVELOPE.size + head_len]
    run = _json_encode(trigger.run_id).encode()
    key = _json_encode(_KEY).encode()
    if head.count(run) != 1 or head.count(key) != 1:
        return None
    at_run = head.index(run)
    at_key = head.index(key)
    if at_key < at_run:
        return None
    return _Template(tag, head[:at_run], head[at_run + len(run):at_key],
                     head[at_key + len(key):])


class TriggerTemplates:
    """Encoded source triggers of direct calls, by placement, executor and arguments."""

    def __init__(self) -> None:
        #: (id of the placement, executor, *functions given arguments) -> the
        #: placement (it is the key while it lives) and its templates.
        self._templates: dict[tuple[Any, ...],
                              tuple[CallPlaced, list[_Template] | None]] = {}

    def encode(self, call: CallDag, plan: CallPlaced, url: str) -> list[Encoded] | None:
        """The encoded source triggers of ``call`` at ``url`` (the first one is sent
        as the request); None: build them with ``triggers_for`` instead."""
        if call.references or call.result_key is None:
            return None
        return self.encode_parts(call.target, call.is_function, call.arg_fns, call.arg_blobs,
                                 json_key(call.result_key), unique_id(), plan, url)

    def encode_parts(self, target: str, is_function: bool, arg_fns: list[str],
                     blobs: list[Any], key_json: bytes, run_id: str, plan: CallPlaced,
                     url: str) -> list[Encoded] | None:
        """:meth:`encode` of a call without references given by its parts: the
        result key as its JSON string (:func:`json_key`), and the run id (hex
        digits). None: build the call and take the ordinary path."""
        size = 0
        for blob in blobs:
            if type(blob) is not bytes:
                return None
            size += len(blob)
        if size >= BIG_FRAME:
            return None
        shape = (id(plan), url, *arg_fns)
        found = self._templates.get(shape)
        if found is not None and found[0] is plan:
            templates = found[1]
        else:
            templates = self._make(target, is_function, arg_fns, blobs, plan, url)
            if len(self._templates) >= MAX_TEMPLATES:
                self._templates.clear()
            self._templates[shape] = (plan, templates)
        if not templates:
            return None
        run = b'"%s"' % run_id.encode()
        if len(blobs) == 1:
            tail = _U32.pack(len(blobs[0])) + blobs[0]
        else:
            parts: list[bytes] = []
            for blob in blobs:
                parts += (_U32.pack(len(blob)), blob)
            tail = b"".join(parts)
        if len(templates) == 1:
            t = templates[0]
            return [Encoded(t.tag, b"".join((t.before_run, run, t.before_key, key_json,
                                             t.after_key)), tail)]
        return [Encoded(t.tag, b"".join((t.before_run, run, t.before_key, key_json,
                                         t.after_key)), tail) for t in templates]

    @staticmethod
    def _make(target: str, is_function: bool, arg_fns: list[str], blobs: list[Any],
              plan: CallPlaced, url: str) -> list[_Template] | None:
        stand_in = CallDag(target, is_function, list(arg_fns), blobs, result_key=_KEY)
        triggers = triggers_for(stand_in, plan, url)
        if not triggers:
            return None
        templates = [_split(t) for t in triggers]
        if any(t is None for t in templates):
            return None
        return [t for t in templates if t is not None]
