"""Storage backends behind the KVS service (see :mod:`droplet.kvs.backends.base`)."""

from __future__ import annotations

from .base import BackendStatistics as BackendStatistics
from .base import ChangeHandler as ChangeHandler
from .base import PutResult as PutResult
from .base import StorageBackend as StorageBackend
from .memory import MemoryBackend as MemoryBackend

__all__ = ["BackendStatistics", "ChangeHandler", "MemoryBackend", "PutResult", "StorageBackend"]
