"""Droplet's exception tree.

Every error a user sees from a public API is one of these; lower-level errors
(socket errors, ``trio.BrokenResourceError``, exception groups) are translated
at the boundary with the original kept as ``__cause__``.

The classes live in this public module (not a private one) because they are
pickled across the wire: their ``__module__`` must import on every peer.
"""

from __future__ import annotations

import builtins

__all__ = [
    "AuthenticationError",
    "ConnectionError",
    "DagError",
    "DropletError",
    "FunctionError",
    "LatticeTypeError",
    "ProtocolError",
    "RegistrationError",
    "StorageError",
    "TimeoutError",
]


class DropletError(Exception):
    """Base class of every error Droplet raises on purpose.

    Attributes:
        remote_traceback: for an error a node reported (an internal error
            there), the traceback text it sent; empty otherwise.
    """

    remote_traceback: str = ""


class ConnectionError(DropletError, builtins.ConnectionError):  # noqa: A001
    """No node answers at an address, or a connection broke mid-request."""


class AuthenticationError(DropletError):
    """The peer refused our credentials, or we refused the peer's."""


class RegistrationError(DropletError):
    """A function could not be registered, loaded or found."""


class DagError(DropletError):
    """A DAG definition or DAG call is invalid (unknown function, cycle, ...)."""


class FunctionError(DropletError):
    """A user function raised.

    Attributes:
        type_name: qualified name of the original exception type.
        remote_message: ``str()`` of the original exception.
        remote_traceback: the traceback text formatted on the executor.
        function: name of the function that raised (when known).
        cause_pickle: the original exception, pickled, or None.
    """

    def __init__(
        self,
        type_name: str,
        remote_message: str,
        remote_traceback: str = "",
        function: str = "",
        cause_pickle: bytes | None = None,
    ) -> None:
        where = f" in function {function!r}" if function else ""
        super().__init__(f"{type_name}{where}: {remote_message}")
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.function = function
        #: the original exception, pickled, when it can be rebuilt on the client.
        self.cause_pickle = cause_pickle

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.type_name, self.remote_message, self.remote_traceback, self.function,
             self.cause_pickle),
        )

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class LatticeTypeError(DropletError, TypeError):
    """A put tried to merge a lattice of one type into a key holding another."""


class TimeoutError(DropletError, builtins.TimeoutError):  # noqa: A001
    """A deadline passed before the result arrived."""


class ProtocolError(DropletError):
    """The peer sent bytes that are not a valid Droplet message."""


class StorageError(DropletError):
    """The storage node cannot keep its promise: its data directory is in use by another
    node, its snapshot is damaged, or its log could not be written (a write then fails
    rather than being acknowledged without being safe)."""


class _Failure:
    """Marks a stored call result that is an error rather than a value.

    The sink of a run pickles ``_Failure(FunctionError(...))`` into the result
    key; a future that reads it raises the wrapped error. Private: users never
    construct one, so no user value can be mistaken for a failure.
    """

    __slots__ = ("error",)

    def __init__(self, error: DropletError) -> None:
        self.error = error

    def __reduce__(self) -> tuple[object, ...]:
        return (_Failure, (self.error,))
