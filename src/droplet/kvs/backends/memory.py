"""The in-memory backend: a :class:`~droplet.kvs.store.Store` in this process."""

from __future__ import annotations

from ..store import Store
from .base import BackendStatistics, PutResult, StorageBackend

__all__ = ["MemoryBackend"]


class MemoryBackend(StorageBackend):
    """Keys live in this process's memory and die with it. Every operation is immediate."""

    name = "memory"

    def __init__(self, store: Store | None = None) -> None:
        self.store = Store() if store is None else store

    def get_nowait(self, key: str) -> bytes | None:
        return self.store.get(key)

    def put_nowait(self, key: str, data: bytes) -> PutResult:
        return self.store.put(key, data)

    def delete_nowait(self, key: str) -> bool:
        return self.store.delete(key)

    async def get(self, key: str) -> bytes | None:
        return self.store.get(key)

    async def put(self, key: str, data: bytes) -> PutResult:
        return self.store.put(key, data)

    async def delete(self, key: str) -> bool:
        return self.store.delete(key)

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(backend=self.name, keys=len(self.store))
