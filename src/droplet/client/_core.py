"""What every client shares, without I/O: building requests, reading replies, sessions.

:class:`~droplet.client.aio.AsyncDropletClient` (Trio) and the blocking-socket
client behind :class:`~droplet.client.client.DropletConnection` send these
messages their own way; the rules (validation, pickling, CAUSAL sessions,
unwrapping results) live here once.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..consistency import CAUSAL, CausalContext, SessionResult, check_level
from ..errors import (
    DagError,
    DropletError,
    FunctionError,
    RegistrationError,
    _Failure,
)
from ..executor.outcomes import lww
from ..executor.user_library import as_lattice, reveal_stored
from ..ids import unique_id
from ..kvs.keys import RESULT_PREFIX
from ..lattices import RAW, decode_lattice, encode_lattice
from ..protocol.messages import (
    Blob,
    CallDag,
    KvsPut,
    KvsValue,
    RegisterDag,
    RegisterFunction,
    encode_gather,
)
from ..protocol.messages import encode as encode_message
from ..references import DropletReference
from ..registration import Registration, source_of
from ..scheduler.dags import check_dag_arguments
from ..serialization import OUT_OF_BAND_MIN, dumps, dumps_code, dumps_value, loads

__all__ = ["AcceptedCalls", "ClientCore", "check_timeout", "direct_result_lattice",
           "plain_args", "result_blob", "result_put", "unwrap_result"]


#: CAUSAL sessions (client_ids) one client keeps contexts for.
MAX_SESSIONS = 10_000
#: Call shapes a client remembers as accepted (see :class:`AcceptedCalls`).
MAX_ACCEPTED_SHAPES = 4096


class AcceptedCalls:
    """Which call shapes the scheduler accepted before: calls of those skip the wait.

    A call's reply from the scheduler (``CallAccepted``, or the error refusing
    it) comes before its result, but waiting for it costs the caller a round
    trip per call, and issuing 5000 calls then 5000 round trips. The client
    picks the result key, so it needs nothing from that reply: it only tells
    whether the call was refused (no such function or DAG, arguments for a
    function not in the DAG, no executor to run it). So a client waits for the
    reply only the first time it makes a call of a given shape (target, the
    functions given arguments); once one was accepted, later ones go out
    without waiting, and a refusal (the DAG was deleted since, every executor
    left) reaches the caller from the future's ``get()`` instead (later calls
    of that shape too: a shape is forgotten only after MAX_ACCEPTED_SHAPES
    others). A shape the scheduler placed for a direct call counts as accepted.
    Calls with a continuation always wait.
    """

    def __init__(self, limit: int = MAX_ACCEPTED_SHAPES) -> None:
        self._shapes: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self.limit = limit

    @staticmethod
    def shape(call: CallDag) -> tuple[Any, ...] | None:
        if call.continuation is not None or call.direct:
            return None
        return (call.target, call.is_function, tuple(call.arg_fns))

    def known(self, call: CallDag) -> bool:
        """Whether a call of this shape was accepted before (no need to wait)."""
        shape = self.shape(call)
        return shape is not None and shape in self._shapes

    def accepted(self, call: CallDag) -> None:
        self.accepted_shape(self.shape(call))

    def accepted_shape(self, shape: tuple[Any, ...] | None) -> None:
        """A call of ``shape`` (see :meth:`shape`) was accepted (or placed)."""
        if shape is None or shape in self._shapes:
            return
        self._shapes[shape] = None
        if len(self._shapes) > self.limit:
            try:
                self._shapes.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                pass

    def refused(self, call: CallDag) -> None:
        shape = self.shape(call)
        if shape is not None:
            self._shapes.pop(shape, None)

#: Argument types that plain pickle writes exactly as :func:`dumps_value` does
#: (no big buffer to take out of band, no code).
_PLAIN = frozenset({int, float, str, bool, type(None)})


def plain_args(args: list[Any]) -> bytes | None:
    """``dumps_value(args)`` for a list of plain values (ints, floats, bools, None,
    strings, and bytes too small to go out of band) at the cost of one
    ``pickle.dumps``; None for anything else (say, a DropletReference): use
    :meth:`ClientCore.function_call`."""
    for arg in args:
        kind = type(arg)
        if kind not in _PLAIN and (kind is not bytes or len(arg) >= OUT_OF_BAND_MIN):
            return None
    data = pickle.dumps(args, protocol=5)
    return None if b"__main__" in data else data


def unwrap_result(blob: Blob) -> Any:
    """A stored result value, raising the error if the call failed."""
    value = loads(blob)
    if isinstance(value, _Failure):
        error = value.error
        if isinstance(error, FunctionError) and error.cause_pickle:
            try:
                cause = loads(error.cause_pickle)
            except Exception:
                cause = None
            if isinstance(cause, BaseException):
                raise error from cause
        raise error
    return value


def direct_result_lattice(blob: Blob | None, error: BaseException | None) -> bytes | None:
    """What a client stores under a direct call's result key when the key is asked
    for (the executor answered only the client): the result, or the call's error
    (``get_object`` raises it, as for a stored failure), including a broken
    connection to the executor (as the scheduler stores for an executor that
    disappeared); None when there is nothing (yet) to store."""
    if blob is not None:
        return lww(bytes(blob))
    if error is None:
        return None
    try:
        failure = dumps(_Failure(error if isinstance(error, DropletError)
                                 else DropletError(f"{type(error).__name__}: {error}")))
    except Exception:  # an error that does not pickle: its message does
        failure = dumps(_Failure(DropletError(f"{type(error).__name__}: {error}")))
    return lww(failure)


def result_put(key: str, lattice: bytes, limit: int | None) -> KvsPut:
    """The write of a direct result: in its place, a failure saying why, when the
    write would exceed the store connection's frame limit (a result that just
    fit its reply frame, which carries less around it)."""
    put = KvsPut(key, lattice)
    if limit is not None and len(lattice) > limit - 4096 and len(encode_gather(put)) > limit:
        failure = direct_result_lattice(None, DropletError(
            f"the result under {key!r} could not be stored: {len(lattice)} bytes, over "
            f"max_frame_size={limit}"))
        assert failure is not None
        put = KvsPut(key, failure)
    return put


def result_blob(lattice: bytes) -> bytes:
    """The pickled result inside a stored result lattice (an LWW of bytes)."""
    value = decode_lattice(lattice, load=RAW).reveal()
    assert isinstance(value, bytes)
    return value


#: Reference keys a call names per function, for placement (the rest still resolve).
MAX_REFERENCES_PER_FUNCTION = 64


def reference_keys(args: list[Any]) -> list[str]:
    """The keys of the DropletReference arguments among ``args`` (for data-aware placement)."""
    keys: list[str] = []
    for arg in args:
        if isinstance(arg, DropletReference) and arg.key not in keys:
            keys.append(arg.key)
            if len(keys) >= MAX_REFERENCES_PER_FUNCTION:
                break
    return keys


def new_result_key() -> str:
    """Clients pick the result key, so they can wait for it while the call is scheduled."""
    return f"{RESULT_PREFIX}{unique_id()}"


def check_timeout(timeout: float | None, default: float) -> float:
    """``timeout`` as seconds to wait (``default`` when None); a negative one is a ValueError."""
    if timeout is None:
        return default
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
        raise ValueError(f"timeout must be None or a number of seconds >= 0, not {timeout!r}")
    return float(timeout)


#: Calls per message (write) for ``map`` when no ``chunksize`` is given.
DEFAULT_CHUNKSIZE = 256


def check_chunksize(chunksize: Any) -> int:
    """``map``'s ``chunksize`` (default :data:`DEFAULT_CHUNKSIZE`); ValueError if not >= 1."""
    if chunksize is None:
        return DEFAULT_CHUNKSIZE
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError(f"map: chunksize must be None or an int >= 1, not {chunksize!r}")
    return chunksize


def map_items(iterable: Any) -> list[Any]:
    """``map``'s items as a list: each is one call's single argument."""
    try:
        return list(iterable)
    except TypeError:
        if not hasattr(iterable, "__iter__"):
            raise TypeError(f"map: expected an iterable of arguments (one call each), "
                            f"not {type(iterable).__name__}") from None
        raise


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"key must be a non-empty string, not {key!r}")
    return key


class ClientCore:
    """A client's state (CAUSAL sessions) and its request/reply rules."""

    def __init__(self, max_sessions: int = MAX_SESSIONS) -> None:
        #: CAUSAL sessions by client_id: what each session has read and written,
        #: least recently used first; at most ``max_sessions`` are kept.
        self.sessions: OrderedDict[str, CausalContext] = OrderedDict()
        self.max_sessions = max_sessions
        #: Whether a session was ever forgotten: from then on a session this
        #: client does not know may be one it forgot, so it starts truncated
        #: (reads go to the store until they are known again) to keep its guarantees.
        self.forgot_sessions = False
        #: call shapes accepted before: their calls do not wait for the acceptance.
        self.accepted = AcceptedCalls()

    @staticmethod
    def register_request(function: Callable[..., Any] | tuple[type, Sequence[Any]],
                         name: str) -> RegisterFunction:
        if not isinstance(name, str) or not name:
            raise RegistrationError(f"function name must be a non-empty string, not {name!r}")
        if isinstance(function, tuple):
            if len(function) != 2 or not isinstance(function[0], type):
                raise RegistrationError(
                    f"register({name!r}): a tuple must be (cls, init_args) with a class "
                    f"first, not a tuple of {len(function)} starting with "
                    f"{type(function[0]).__name__ if function else 'nothing'}")
            if not callable(getattr(function[0], "run", None)):
                raise RegistrationError(
                    f"register({name!r}): class {function[0].__name__} has no "
                    "run(user_library, *args) method")
            # As in Cloudburst: a tuple is the init arguments, anything else is one.
            init = function[1]
            function = (function[0], init if type(init) is tuple else (init,))
        elif not callable(function):
            raise RegistrationError(
                f"register({name!r}): {type(function).__name__} is not callable")
        try:
            # The source rides along, so tracebacks on the executor show the user's lines.
            code = dumps_code(Registration(function, source_of(function)))
        except TypeError as exc:
            what = type(function[0] if isinstance(function, tuple) else function).__name__
            raise RegistrationError(
                f"register({name!r}): cannot serialize the {what}: "
                f"{str(exc).split(': ', 1)[-1]}") from exc
        return RegisterFunction(name, code)

    @staticmethod
    def function_call(name: str, args: Iterable[Any], snapshot: bool = False) -> CallDag:
        """A one-function call; ``snapshot``: copy writable buffers now (a caller
        whose message is written after it returns, see ``dumps_value``)."""
        listed = list(args)
        refs = reference_keys(listed)
        return CallDag(name, True, [name], [dumps_value(listed, snapshot=snapshot)],
                       result_key=new_result_key(),
                       references=[refs] if refs else [])

    @staticmethod
    def register_dag_request(name: str, functions: Any, connections: Any,
                             colocated: Any = (), gpu_functions: Any = (),
                             batching_functions: Any = ()) -> RegisterDag:
        """The request for ``register_dag``; DagError for an argument of the wrong type."""
        args = check_dag_arguments(name, functions, connections, colocated, gpu_functions,
                                   batching_functions)
        invalid = []
        for fn, results in args.multiexec.items():
            try:
                invalid.append(dumps(results))
            except TypeError as exc:
                raise DagError(f"register_dag({name!r}): the invalid results of {fn!r} "
                               f"cannot be serialized: {exc}") from None
        return RegisterDag(args.name, args.functions, args.connections, args.colocated,
                           list(args.multiexec), invalid, args.gpu_functions,
                           args.batching_functions)

    def dag_call(self, name: str, arg_map: dict[str, Any], direct_response: bool,
                 consistency: str, output_key: str | None, client_id: str | None,
                 timeout: float | None, continuation: CallDag | None = None,
                 snapshot: bool = False) -> CallDag:
        if not isinstance(name, str) or not name:
            raise DagError(f"call_dag: the DAG name must be a non-empty string, not {name!r}")
        if not isinstance(arg_map, dict):
            raise TypeError(f"arg_map must be a dict of function name -> arguments, "
                            f"not {type(arg_map).__name__}")
        for fn in arg_map:
            if not isinstance(fn, str):
                raise DagError(f"call_dag({name!r}): arg_map key {fn!r} is not a function "
                               "name (a string)")
        if output_key is not None and (not isinstance(output_key, str) or not output_key):
            raise DagError(f"call_dag({name!r}): output_key must be a non-empty string, "
                           f"not {output_key!r}")
        if client_id is not None and not isinstance(client_id, str):
            raise DagError(f"call_dag({name!r}): client_id must be a string, "
                           f"not {client_id!r}")
        follow: bytes | None = None
        if continuation is not None:
            if not isinstance(continuation, CallDag) or continuation.is_function:
                raise DagError(f"call_dag({name!r}): continuation must be a DAG call made "
                               "with call_dag(..., dry_run=True), not "
                               f"{type(continuation).__name__}")
            if continuation.direct != bool(direct_response):
                raise DagError(f"call_dag({name!r}): the continuation must have the same "
                               "direct_response setting as this call")
            follow = encode_message(continuation)
        try:
            check_level(str(consistency))
        except ValueError as exc:
            raise DagError(f"call_dag({name!r}): {exc}") from None
        lists = [a if isinstance(a, list) else [a] for a in arg_map.values()]
        blobs: list[Blob] = [dumps_value(a, snapshot=snapshot) for a in lists]
        refs = [reference_keys(a) for a in lists]
        causal = None
        if consistency == CAUSAL and client_id is not None:
            session = self.sessions.get(client_id)
            if session is not None:
                self.sessions.move_to_end(client_id)
                causal = session.encode()
            elif self.forgot_sessions:
                causal = CausalContext(truncated=True).encode()
        return CallDag(name, False, list(arg_map), blobs, str(consistency), output_key,
                       client_id, bool(direct_response), timeout,
                       None if direct_response else new_result_key(), causal, follow,
                       refs if any(refs) else [])

    @staticmethod
    def session_of(call: CallDag) -> str | None:
        return call.client_id if call.consistency == CAUSAL else None

    def finish(self, value: Any, session: str | None) -> Any:
        """Unwrap a CAUSAL result, advancing the client session it belongs to."""
        if isinstance(value, SessionResult):
            if session is not None:
                seen = CausalContext.decode(value.causal)
                sessions = self.sessions
                old = sessions.pop(session, None)
                sessions[session] = seen if old is None else old.merge(seen)
                if len(sessions) > self.max_sessions:
                    sessions.popitem(last=False)
                    self.forgot_sessions = True
            return value.value
        return value

    @staticmethod
    def put_request(key: str, value: Any) -> KvsPut:
        return KvsPut(check_key(key), encode_lattice(as_lattice(value)))

    @staticmethod
    def stored_object(reply: KvsValue) -> Any:
        value = reveal_stored(reply.lattice)
        if isinstance(value, _Failure):  # the result key of a call that failed
            raise value.error
        return value
