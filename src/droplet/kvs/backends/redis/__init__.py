"""The Redis storage backend: ``--storage redis://HOST:PORT/DB`` (see docs/how-to/redis.rst)."""

from __future__ import annotations

from .backend import RedisBackend as RedisBackend
from .connection import RedisError as RedisError
from .connection import RedisReplyError as RedisReplyError
from .connection import StorageUnavailable as StorageUnavailable

__all__ = ["RedisBackend", "RedisError", "RedisReplyError", "StorageUnavailable"]
