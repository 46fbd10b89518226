"""Pluggable transports, chosen by the scheme of an address URL."""

from .base import Connection as Connection
from .base import Transport as Transport
from .base import TransportOptions as TransportOptions
from .registry import get_transport as get_transport
from .registry import normalize_address as normalize_address
from .registry import open_connection as open_connection
from .registry import parse_address as parse_address
from .registry import register_transport as register_transport

__all__ = [
    "Connection",
    "Transport",
    "TransportOptions",
    "get_transport",
    "normalize_address",
    "open_connection",
    "parse_address",
    "register_transport",
]
